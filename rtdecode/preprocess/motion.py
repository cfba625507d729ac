"""Motion correction and masking, one volume at a time: Volume -> PreprocessedVolume.

Three rigid transforms are composed so that each volume is resampled once, and only at the mask's voxels:

* **per volume**: the volume registered to its run's reference (the run's first volume). These are the
  motion parameters and framewise displacement reported for the volume;
* **per run** (every run after the first): the run's reference registered to the session reference (the
  first run's reference);
* **per session**: the session reference registered to the calibration reference (the subject's image on
  whose grid the mask was drawn), when one is given. Without one, the first run's reference grid is the
  calibration grid and the mask must lie on it.

Each transform maps world mm of the fixed image to world mm of the moving one (see
:mod:`~rtdecode.preprocess.rigid`), so ``volume <- run reference <- session reference <- calibration`` is
their product, and the mask voxel at calibration world position ``x`` is read from the volume at
``T_volume @ T_run @ T_session @ x`` (trilinear; the nearest edge voxel's value outside the FOV).
"""

import dataclasses
import logging
import time

import numpy as np

from rtdecode.errors import ConfigError, PreprocessError
from rtdecode.preprocess import resample, rigid
from rtdecode.preprocess.mask import AFFINE_TOLERANCE_MM, Mask
from rtdecode.preprocess.registration import Registration, RegistrationSettings, RegistrationTarget
from rtdecode.records import PreprocessedVolume, Volume

logger = logging.getLogger(__name__)

ALIGNMENT_SETTINGS = RegistrationSettings(
    pool_factors=(4, 2, 1), n_points=(20_000, 40_000, 80_000), max_iterations=(30, 20, 10), tolerance_mm=0.0005
)
"""Settings for the once-per-run and once-per-session alignments: a coarser first level (larger head shifts
between runs and sessions), more points and iterations, since they run once."""


@dataclasses.dataclass
class _Run:
    """What the corrector keeps per run."""

    target: RegistrationTarget  # the run's reference, prepared
    source: str  # the reference's file, for messages
    session_to_run: np.ndarray  # session reference world -> run reference world
    prev_params: np.ndarray  # motion parameters of the last processed volume
    prev_matrix: np.ndarray  # its transform, the next registration's starting point


@dataclasses.dataclass(frozen=True)
class _Session:
    """The session reference (the first run's reference) and its alignment to the calibration grid."""

    data: np.ndarray
    affine: np.ndarray
    calibration_to_session: np.ndarray  # calibration world -> session reference world
    grid_shape: tuple[int, int, int]  # the calibration grid (the mask's)
    grid_affine: np.ndarray


class MotionCorrector:
    """Stateful rigid motion correction and masking for one session.

    Parameters
    ----------
    mask : Mask
        The subject's voxel mask, on the calibration grid.
    calibration_reference : (data, affine), optional
        The subject's calibration reference image; the mask must lie on its grid. When absent, the first
        run's reference defines the space and the mask must lie on that grid.
    fd_threshold_mm : float
        Volumes whose framewise displacement exceeds this are flagged (kept, never dropped).
    device : {"auto", "cpu", "cuda"}
    settings : RegistrationSettings, optional
        Per-volume registration settings (defaults: see :class:`RegistrationSettings`).

    Raises
    ------
    ConfigError
        ``fd_threshold_mm`` negative or ``device`` unknown.
    MaskError
        The mask does not fit the calibration reference.
    PreprocessError
        The calibration reference is not a finite 3D image with foreground.
    """

    def __init__(
        self,
        mask: Mask,
        calibration_reference: tuple[np.ndarray, np.ndarray] | None = None,
        fd_threshold_mm: float = 0.5,
        device: str = "auto",
        settings: RegistrationSettings | None = None,
    ) -> None:
        if not fd_threshold_mm >= 0:
            raise ConfigError(f"fd_threshold_mm must be >= 0; got {fd_threshold_mm}")
        self.mask = mask
        self.fd_threshold_mm = float(fd_threshold_mm)
        self.device = resample.resolve_device(device)
        self.settings = settings or RegistrationSettings()
        self._mask_points = resample.points_tensor(mask.world_mm, self.device)
        self._calibration = self._prepare_calibration(calibration_reference)
        self._session: _Session | None = None
        self._session_target: RegistrationTarget | None = None  # built when a second run starts
        self._runs: dict[int, _Run] = {}
        self.last_n_out_of_fov = 0
        """Mask voxels that fell outside the last processed volume's field of view."""

    def _prepare_calibration(self, reference) -> RegistrationTarget | None:
        if reference is None:
            return None
        data, affine = np.asarray(reference[0]), np.asarray(reference[1], dtype=np.float64)
        _check_finite_3d(data, "calibration reference")
        self.mask.check_fits(data.shape, affine, reference="the calibration reference")
        return RegistrationTarget(data, affine, device=str(self.device), settings=ALIGNMENT_SETTINGS)

    def process(self, volume: Volume) -> PreprocessedVolume:
        """Motion-correct and mask one volume.

        The first volume of a run becomes that run's reference (motion 0, FD 0). On any error the corrector's
        state is unchanged, so the run goes on with the next volume.

        Raises
        ------
        PreprocessError
            Non-finite voxels, a grid that differs from the run reference's, or a failed registration.
        MaskError
            (first volume, no calibration reference) the mask does not lie on the run reference's grid.
        """
        data = _check_finite_3d(volume.data, f"volume {volume.source}")
        run = self._runs.get(volume.run_index)
        if run is None:
            run, session = self._start_run(volume, data)
            registration = Registration(np.eye(4), np.zeros(6), 0, 0)
        else:
            session = self._session
            self._check_grid(volume, run)
            registration = self._register(run, volume, data)
        composed = registration.matrix @ run.session_to_run @ session.calibration_to_session
        vector, n_out = self._sample_mask(data, volume.affine, composed)
        fd = 0.0 if volume.run_index not in self._runs else rigid.fd_mm(run.prev_params, registration.params)
        self._commit(volume.run_index, run, session, registration)
        self.last_n_out_of_fov = n_out
        return self._record(volume, vector, registration.params, fd)

    def _start_run(self, volume: Volume, data: np.ndarray) -> tuple[_Run, _Session]:
        """A new run's state (and the session's, for the first run); nothing is stored yet."""
        affine = np.asarray(volume.affine, dtype=np.float64)
        session = self._session or self._start_session(volume, data, affine)
        target = self._target(data, affine, volume, self.settings)
        session_to_run = np.eye(4) if self._session is None else self._align_run(volume, data, affine)
        run = _Run(target, str(volume.source), session_to_run, np.zeros(6), np.eye(4))
        return run, session

    def _start_session(self, volume: Volume, data: np.ndarray, affine: np.ndarray) -> _Session:
        if self._calibration is None:
            self.mask.check_fits(data.shape, affine, reference=f"the first run's reference {volume.source}")
            return _Session(data.copy(order="F"), affine, np.eye(4), data.shape, affine)
        try:
            alignment = self._calibration.register(data, affine)
        except PreprocessError as error:
            raise PreprocessError(f"volume {volume.source}: aligning to the calibration reference: {error}") from error
        logger.info("session reference aligned to the calibration reference", extra={"fields": _fields(alignment)})
        calibration = self._calibration
        return _Session(data.copy(order="F"), affine, alignment.matrix, calibration.shape, calibration.affine)

    def _align_run(self, volume: Volume, data: np.ndarray, affine: np.ndarray) -> np.ndarray:
        if self._session_target is None:
            session = self._session
            self._session_target = RegistrationTarget(
                session.data, session.affine, device=str(self.device), settings=ALIGNMENT_SETTINGS
            )  # a cache of the session reference: building it changes no result
        try:
            alignment = self._session_target.register(data, affine)
        except PreprocessError as error:
            raise PreprocessError(f"volume {volume.source}: aligning run {volume.run_index}: {error}") from error
        logger.info(
            f"run {volume.run_index} reference aligned to the session reference", extra={"fields": _fields(alignment)}
        )
        return alignment.matrix

    def _target(self, data, affine, volume: Volume, settings) -> RegistrationTarget:
        try:
            return RegistrationTarget(data, affine, device=str(self.device), settings=settings)
        except PreprocessError as error:
            raise PreprocessError(f"volume {volume.source} cannot be a run reference: {error}") from error

    def _check_grid(self, volume: Volume, run: _Run) -> None:
        shape, affine = tuple(volume.data.shape), np.asarray(volume.affine, dtype=np.float64)
        reference = run.target
        if shape != reference.shape:
            raise PreprocessError(
                f"volume {volume.source}: grid shape {shape} differs from its run's reference "
                f"{run.source} (shape {reference.shape}, run {volume.run_index})"
            )
        difference = float(np.abs(affine - reference.affine).max())
        if not difference <= AFFINE_TOLERANCE_MM:
            raise PreprocessError(
                f"volume {volume.source}: affine differs from its run's reference {run.source} by {difference:.4g} mm "
                f"(tolerance {AFFINE_TOLERANCE_MM:g}, run {volume.run_index})"
            )

    def _register(self, run: _Run, volume: Volume, data: np.ndarray) -> Registration:
        try:
            return run.target.register(data, volume.affine, init=run.prev_matrix)
        except PreprocessError as error:
            raise PreprocessError(f"volume {volume.source}: {error}") from error

    def _sample_mask(self, data: np.ndarray, affine: np.ndarray, composed: np.ndarray) -> tuple[np.ndarray, int]:
        grid = resample.map_points(self._mask_points, resample.world_to_grid(data.shape, affine) @ composed)
        vector = resample.sample_grid(resample.volume_tensor(data, self.device), grid)
        return vector.cpu().numpy(), int((~resample.inside_fov(grid)).sum())

    def _commit(self, run_index: int, run: _Run, session: _Session, registration: Registration) -> None:
        self._session = session
        self._runs[run_index] = run
        run.prev_params, run.prev_matrix = registration.params, registration.matrix

    def _record(self, volume: Volume, vector: np.ndarray, params: np.ndarray, fd: float) -> PreprocessedVolume:
        timestamps = dict(volume.timestamps)
        timestamps["preprocessed"] = time.monotonic()
        return PreprocessedVolume(
            vector=vector,
            motion_params=params,
            fd_mm=fd,
            flagged=fd > self.fd_threshold_mm,
            series_number=volume.series_number,
            run_index=volume.run_index,
            volume_index=volume.volume_index,
            tr_s=volume.tr_s,
            acquisition_time_s=volume.acquisition_time_s,
            late=volume.late,
            timestamps=timestamps,
        )

    @property
    def calibration_grid(self) -> tuple[tuple[int, int, int], np.ndarray] | None:
        """``(shape, affine)`` of the grid the vectors live on (the mask's); None before it is known."""
        if self._calibration is not None:
            return self._calibration.shape, self._calibration.affine
        return None if self._session is None else (self._session.grid_shape, self._session.grid_affine)

    @property
    def calibration_to_session(self) -> np.ndarray | None:
        """4x4: calibration world mm -> session reference world mm (identity without a calibration reference);
        None before the first volume."""
        return None if self._session is None else self._session.calibration_to_session.copy()

    def session_to_run(self, run_index: int) -> np.ndarray:
        """4x4: session reference world mm -> the run's reference world mm (identity for the first run)."""
        return self._run(run_index).session_to_run.copy()

    def composed_transform(self, run_index: int, motion_params) -> np.ndarray:
        """4x4: calibration world mm -> world mm of a volume of the run with these motion parameters."""
        run = self._run(run_index)
        volume_matrix = rigid.params_to_matrix(motion_params, run.target.centre_mm)
        return volume_matrix @ run.session_to_run @ self._session.calibration_to_session

    def resample_to_calibration(self, volume: Volume, motion_params) -> tuple[np.ndarray, int]:
        """A whole volume, motion-corrected onto the calibration grid (for QA and tests).

        Parameters
        ----------
        volume : Volume
            A volume of a run this corrector has started.
        motion_params : (6,) array-like
            Its motion parameters (``PreprocessedVolume.motion_params``).

        Returns
        -------
        (n_x, n_y, n_z) float32 on the calibration grid, and the number of its voxels outside the volume's FOV.
        """
        transform = self.composed_transform(volume.run_index, motion_params)
        shape, affine = self.calibration_grid
        return resample.resample_volume(
            volume.data, volume.affine, shape, affine, transform=transform, device=str(self.device)
        )

    def _run(self, run_index: int) -> _Run:
        if run_index not in self._runs:
            raise PreprocessError(f"run {run_index} has no reference yet (runs started: {sorted(self._runs)})")
        return self._runs[run_index]


def _check_finite_3d(data: np.ndarray, what: str) -> np.ndarray:
    """``data`` if it is a finite 3D array; PreprocessError naming ``what`` and the count of bad voxels if not."""
    if data.ndim != 3:
        raise PreprocessError(f"{what}: need a 3D volume, got shape {data.shape}")
    if not np.isfinite(data.sum(dtype=np.float64)):
        n_nan, n_inf = int(np.isnan(data).sum()), int(np.isinf(data).sum())
        if n_nan or n_inf:
            raise PreprocessError(f"{what}: {n_nan} NaN and {n_inf} infinite voxels of {data.size}; volume skipped")
    return data


def _fields(alignment: Registration) -> dict:
    params = np.round(alignment.params * np.array([1, 1, 1, *[180 / np.pi] * 3]), 3)
    return {"trans_mm": params[:3].tolist(), "rot_deg": params[3:].tolist(), "iterations": alignment.n_iterations}
