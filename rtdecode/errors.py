"""The error hierarchy.

Every error rtdecode raises on purpose subclasses :class:`RtDecodeError` and the builtin it
refines, so callers can catch either. Messages name the parameter or file, the rule, and the value.
"""


class RtDecodeError(Exception):
    """Root of every error rtdecode raises on purpose."""


class ConfigError(RtDecodeError, ValueError):
    """A configuration value (file, environment or command line) breaks a rule."""


class StoreError(RtDecodeError, ValueError):
    """A subject or session id, or the store layout on disk, is invalid."""


class VolumeFileError(RtDecodeError, ValueError):
    """A scanner file is not a readable MR volume (corrupt, not MR, unsupported layout)."""


class IncompleteFileError(VolumeFileError):
    """A scanner file is not (yet) complete: its content is shorter than its header says."""


class DuplicateFileError(VolumeFileError):
    """A scanner file repeats what another file already delivered (same content): reported, not used."""


class VolumeShapeError(VolumeFileError):
    """A volume's grid differs from the grid of the run it belongs to."""


class PreprocessError(RtDecodeError, ValueError):
    """A volume cannot be motion-corrected or masked (non-finite voxels, wrong grid): it is skipped, not fixed."""


class MaskError(RtDecodeError, ValueError):
    """A mask or reference image does not fit (wrong grid, empty, not boolean)."""


class EventError(RtDecodeError, ValueError):
    """A stimulus event is invalid (bad column, unknown stimulus, onset outside the run)."""


class GlmError(RtDecodeError, ValueError):
    """The GLM cannot estimate what was asked (no such trial, a design with no data)."""


class ModelError(RtDecodeError, ValueError):
    """A model cannot be built or run as asked (bad config, unknown subject, wrong input shape)."""


class CheckpointError(ModelError):
    """A checkpoint or bundle on disk does not match what it claims (missing, extra or mis-shaped keys)."""


class EngineError(RtDecodeError, ValueError):
    """A compiled engine cannot be built, opened or run as asked (missing backend, wrong input, stale file)."""


class GenerateError(RtDecodeError, ValueError):
    """Image generation cannot run as asked (bad embedding shape, NaN input, bad setting)."""


class ComponentMissingError(GenerateError, FileNotFoundError):
    """A model component's folder or file is not where the config says; the message names the file
    expected and the command that makes it."""


class TrainDataError(RtDecodeError, ValueError):
    """Training data that cannot be used: a missing file, mismatched voxel counts, an empty split."""


class TrainError(RtDecodeError, ValueError):
    """A training config or run state that cannot be used (bad setting, checkpoint of another run)."""


class CalibrationError(RtDecodeError, ValueError):
    """A calibration session cannot become a subject bundle: missing or inconsistent events, missing stimulus
    images, too few trials, runs on different grids, too few reliable voxels. Raised before long computation."""


class ProtocolError(RtDecodeError, ValueError):
    """A message on the wire does not follow docs/protocol.md (frames, header fields, schema version)."""


class NewerSchemaError(ProtocolError):
    """A message in a newer schema version than this reader knows: every later one will be too (upgrade)."""


class SecurityError(RtDecodeError, ValueError):
    """Missing or unreadable CURVE keys, or an endpoint that needs keys opened without them."""


class ServeError(RtDecodeError, RuntimeError):
    """The daemon or a decode worker cannot start or go on (named part, reason, fix)."""


class ReportError(RtDecodeError, ValueError):
    """A report or plot cannot be drawn from the data given (say, histogram edges that do not fit the counts)."""
