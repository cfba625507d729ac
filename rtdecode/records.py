"""The nouns of the data flow: small frozen records passed between stages.

Every record carries its ids and a mapping of per-stage timestamps (``time.monotonic()`` seconds,
a clock shared by all processes on one host), so any message can say where its time went.
Records never carry patient identifiers: the readers copy only geometry, timing and numbering.
"""

import dataclasses
import enum
import time
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import numpy as np


def _frozen_mapping(values: Mapping[str, float] | None) -> Mapping[str, float]:
    return MappingProxyType(dict(values or {}))


@dataclasses.dataclass(frozen=True)
class VolumeFile:
    """A file in the scanner's export folder that may hold one or more volumes.

    Attributes
    ----------
    path : Path
        Where the file is.
    trigger : str
        What made the watcher look: ``"close_write"``, ``"moved"``, ``"created"``, ``"modified"``,
        ``"scan"`` (the periodic rescan, or the poll in polling mode).
    timestamps : Mapping[str, float]
        ``"seen"``: when the watcher saw it.
    """

    path: Path
    trigger: str
    timestamps: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "timestamps", _frozen_mapping(self.timestamps))


@dataclasses.dataclass(frozen=True, eq=False)
class Volume:
    """One 3D fMRI volume, as the scanner acquired it.

    Voxel order is the one dcm2niix writes for the same DICOM: axis 0 runs along the image columns
    (DICOM row direction), axis 1 along the image rows in reverse (bottom row first), axis 2 along
    the slices in acquisition-stack order. ``affine`` maps voxel indices to RAS+ millimetres, so a
    volume read here and the NIfTI dcm2niix makes of the same file have equal arrays and affines.

    Attributes
    ----------
    data : (n_x, n_y, n_z) float32
        Intensities with the DICOM/NIfTI rescale slope and intercept applied. Stored in Fortran order
        (axis 0 fastest), as DICOM frames and NIfTI files store voxels, which lets readers build it in
        one pass; index it logically (``data[mask]``, ``data.ravel()`` are in C order as usual).
    affine : (4, 4) float64
        Voxel index to RAS+ mm.
    tr_s : float
        Repetition time in seconds.
    acquisition_time_s : float or None
        Scanner clock at the start of the volume, seconds since midnight (DICOM AcquisitionTime).
    slice_times_s : tuple of float, or None
        Per slice (axis 2 index), onset relative to the volume's start, seconds.
    series_number : int
        The scanner's series number (a restarted run gets a new one).
    run_index : int
        1-based run within this ingest session: runs are numbered in the order their series appear.
    volume_index : int
        0-based position in the run, from the scanner's numbering (not the file name).
    source : Path
        The file it came from (scanner side only; never published).
    late : bool
        True when it arrived after later volumes of its run were already delivered.
    timestamps : Mapping[str, float]
        ``"seen"``, ``"read"``, ``"available"`` and any later stage's.
    """

    data: np.ndarray
    affine: np.ndarray
    tr_s: float
    acquisition_time_s: float | None
    slice_times_s: tuple[float, ...] | None
    series_number: int
    run_index: int
    volume_index: int
    source: Path
    late: bool = False
    timestamps: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "timestamps", _frozen_mapping(self.timestamps))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape)

    def stamped(self, stage: str, at_s: float | None = None) -> "Volume":
        """A copy with ``timestamps[stage]`` set (default: now)."""
        stamps = dict(self.timestamps)
        stamps[stage] = time.monotonic() if at_s is None else at_s
        return dataclasses.replace(self, timestamps=stamps)


class IngestEventKind(enum.Enum):
    """What the ingest stage reports besides volumes. Nothing seen goes unreported."""

    FAILED = "failed"  # ingest itself stopped on an error (the reason says which); it must be restarted
    RUN_STARTED = "run_started"  # a new series appeared (first run, or a restart at the console)
    RUN_ENDED = "run_ended"  # its series was superseded, or ingest stopped
    MISSING = "missing"  # a volume index was skipped and did not arrive in time
    LATE = "late"  # a volume declared missing arrived after all; delivered with late=True
    OUT_OF_ORDER = "out_of_order"  # arrived after a later volume, in time to be delivered in order
    DUPLICATE = "duplicate"  # same series and index as a delivered volume, same pixels: ignored
    QUARANTINED = "quarantined"  # copied aside with a reason; never delivered
    TR_MISMATCH = "tr_mismatch"  # the file's TR differs from the configured one


@dataclasses.dataclass(frozen=True)
class IngestEvent:
    """A report from the ingest stage.

    ``volume_indices`` is set for MISSING (every skipped index); ``reason`` says why in words.
    """

    kind: IngestEventKind
    reason: str
    path: Path | None = None
    series_number: int | None = None
    run_index: int | None = None
    volume_indices: tuple[int, ...] = ()
    at_s: float = dataclasses.field(default_factory=time.monotonic)

    def describe(self) -> str:
        """One line for logs."""
        parts = [self.kind.value]
        if self.run_index is not None:
            parts.append(f"run={self.run_index}")
        if self.series_number is not None:
            parts.append(f"series={self.series_number}")
        if self.volume_indices:
            parts.append("volumes=" + ",".join(str(i) for i in self.volume_indices))
        if self.path is not None:
            parts.append(f"file={self.path.name}")  # the name only: a scanner's folders can name the patient
        parts.append(self.reason)
        return " ".join(parts)


MOTION_PARAMETER_NAMES = ("trans_x_mm", "trans_y_mm", "trans_z_mm", "rot_x_rad", "rot_y_rad", "rot_z_rad")


@dataclasses.dataclass(frozen=True, eq=False)
class PreprocessedVolume:
    """One volume after motion correction and masking: a vector in the subject's mask.

    Attributes
    ----------
    vector : (n_voxels,) float32
        The volume resampled once onto the calibration grid and taken at the mask's voxels, in C order
        of the mask grid (``data[mask]`` with ``mask`` a boolean (n_x, n_y, n_z) array), as NSD/MindEye2.
    motion_params : (6,) float64
        Rigid motion of this volume relative to its run's reference, in the order of
        :data:`MOTION_PARAMETER_NAMES` (mm, radians).
    fd_mm : float
        Framewise displacement from the previous volume of the run (Power et al. 2012, 50 mm sphere); 0 for
        the first.
    flagged : bool
        ``fd_mm`` is over the configured threshold. Flagged volumes are kept, never dropped.
    series_number, run_index, volume_index, tr_s, acquisition_time_s, late
        As on the :class:`Volume` it came from.
    timestamps : Mapping[str, float]
        The volume's stamps plus ``"preprocessed"``.
    """

    vector: np.ndarray
    motion_params: np.ndarray
    fd_mm: float
    flagged: bool
    series_number: int
    run_index: int
    volume_index: int
    tr_s: float
    acquisition_time_s: float | None = None
    late: bool = False
    timestamps: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "timestamps", _frozen_mapping(self.timestamps))


@dataclasses.dataclass(frozen=True)
class TrialEvent:
    """One stimulus presentation, as the stimulus program logs it (BIDS ``events.tsv`` or live ZeroMQ).

    Attributes
    ----------
    trial_id : str
        Unique within the run.
    onset_s : float
        Seconds from the start of the run's first volume (BIDS convention).
    duration_s : float
    stimulus_id : str or None
        Which image was shown (e.g. an NSD/COCO id or a file name); None when the log has no such column.
    """

    trial_id: str
    onset_s: float
    duration_s: float
    stimulus_id: str | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class TrialBeta:
    """One trial's single-trial GLM estimate in the subject's mask.

    Attributes
    ----------
    event : TrialEvent
    run_index : int
    beta : (n_voxels,) float32
        The trial's effect size per voxel (mask order), before normalisation.
    version : str
        ``"online"``: estimated from the volumes acquired by ``onset_s + emit_delay_s``;
        ``"final"``: re-estimated when the run ended. Both are kept.
    n_frames : int
        Volumes of the run the estimate used.
    zscored : (n_voxels,) float32 or None
        ``beta`` normalised per voxel (set by :mod:`rtdecode.glm.normalise`).
    decodable : bool
        False for a trial kept in the design only (its stimulus is unknown, or it was flagged).
    timestamps : Mapping[str, float]
        ``"estimated"`` and, after normalisation, ``"normalised"``; the run's latest volume stamps.
    """

    event: TrialEvent
    run_index: int
    beta: np.ndarray
    version: str
    n_frames: int
    zscored: np.ndarray | None = None
    decodable: bool = True
    timestamps: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "timestamps", _frozen_mapping(self.timestamps))
