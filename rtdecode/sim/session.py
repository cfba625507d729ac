"""One simulated calibration session of a synthetic-world subject, written to disk as a scanner and a stimulus
program would write it, with the truth beside it.

:func:`write_world_session` turns the runs of one session of a :class:`~rtdecode.sim.world.SyntheticWorld`
subject into::

    out_dir/
      raw/                     every run's volume files (SimulatedScanner names), run n = series n
      events/run-NN_events.tsv BIDS events per run: onset duration trial_id stimulus_id split
      stimuli/<stimulus_id>.png  every image shown in the session, RGB uint8
      truth/region_mask.nii.gz the voxels that carry the subject's BOLD (uint8, grid of the written volumes)
      truth/run-NN_motion.tsv  the rigid motion applied to each volume (phantom convention)
      truth/truth.json         world config, subject, session, runs, and per trial run, trial_id, stimulus_id,
                               image index, split

Each volume is a :class:`~rtdecode.sim.phantom.BrainPhantom` head whose region voxels hold the subject's BOLD
(``world.bold(subject, plan).data[i]``, assigned in ``np.flatnonzero(mask)`` order, i.e. the C order of the
mask array, which is also the order of ``volume[mask]``), the other voxels the phantom plus fresh Gaussian
noise, the whole moved rigidly by the run's motion (cubic B-spline), then rounded and clipped to a scanner's
12-bit range. So calibration can be run end to end and compared with what it should find: the mask, the
images, and (rebuilding the world from truth.json) the true betas.
"""

import dataclasses
import json
import zlib
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import scipy.ndimage
from PIL import Image
from scipy.spatial.transform import Rotation
from tqdm import tqdm

from rtdecode.errors import ConfigError
from rtdecode.sim import LAYOUTS
from rtdecode.sim.phantom import BrainPhantom
from rtdecode.sim.scanner import SimulatedScanner
from rtdecode.sim.world import RunPlan, SyntheticWorld, WorldConfig

SCANNER_MAX_VALUE = 4095  # a scanner's 12-bit magnitude range
ROTATION_RAD_PER_UNIT = 0.01  # world motion units -> radians: the world's random walk stays below ~0.5 degree
WRITE_SPEED = 1e6  # times faster than real time: no pacing, a session is written as fast as it encodes
MOTION_COLUMNS = ("trans_x_mm", "trans_y_mm", "trans_z_mm", "rot_x_rad", "rot_y_rad", "rot_z_rad")
EVENTS_COLUMNS = ("onset", "duration", "trial_id", "stimulus_id", "split")

_PHANTOM_KEY = 1  # seed stream slots, so the head and the noise never share a stream
_NOISE_KEY = 2


@dataclasses.dataclass(frozen=True)
class SessionLayout:
    """Where a written session's parts are.

    ``events[k]`` and ``series_numbers[k]`` belong to the k-th run written; a run's series number is its
    run number within the session (so with every run written, the n-th events file is run n).
    """

    raw_dir: Path
    events: tuple[Path, ...]
    images_dir: Path
    truth_dir: Path
    series_numbers: tuple[int, ...]

    @property
    def region_mask_path(self) -> Path:
        return self.truth_dir / "region_mask.nii.gz"

    @property
    def truth_path(self) -> Path:
        return self.truth_dir / "truth.json"

    def image_path(self, stimulus_id: str) -> Path:
        return self.images_dir / f"{stimulus_id}.png"


class WorldRunSource:
    """One run as scanner volumes: the scanner source protocol (``shape``, ``affine``, ``n_volumes``,
    ``volume(i)``). ``volume(i)`` is a pure function of its arguments and ``i``, so the scanner may ask for a
    volume twice (it reads volume 0 for the rescale) and get the same numbers.

    Parameters
    ----------
    phantom : BrainPhantom
        The head; its grid is the volumes' grid.
    region_mask : bool array of ``phantom.shape``
        The voxels that carry ``bold_data``, in the C order of the array.
    bold_data : (n_volumes, n_region_voxels) array
    motion_params : (n_volumes, 6) array
        Rigid motion per volume, mm and radians, in the convention of :mod:`rtdecode.sim.phantom`.
    noise_sd : float
        Gaussian noise added to the voxels outside the region, fresh per volume.
    noise_seed : sequence of int
        Seeds the noise; volume ``i`` draws from ``default_rng([*noise_seed, i])``.
    """

    def __init__(
        self,
        phantom: BrainPhantom,
        region_mask: np.ndarray,
        bold_data: np.ndarray,
        motion_params: np.ndarray,
        noise_sd: float,
        noise_seed: Sequence[int],
    ) -> None:
        n_region = int(region_mask.sum())
        if bold_data.ndim != 2 or bold_data.shape[1] != n_region:
            raise ConfigError(f"bold_data must be (n_volumes, {n_region} region voxels), got {bold_data.shape}")
        if motion_params.shape != (bold_data.shape[0], 6):
            raise ConfigError(f"motion_params must be ({bold_data.shape[0]}, 6), got {motion_params.shape}")
        self.phantom = phantom
        self.region_mask = region_mask
        self.bold_data = bold_data
        self.motion_params = motion_params
        self.noise_sd = noise_sd
        self.noise_seed = tuple(int(k) for k in noise_seed)
        self.shape = phantom.shape
        self.affine = np.asarray(phantom.affine, dtype=np.float64)
        self.n_volumes = bold_data.shape[0]

    def unmoved(self, index: int) -> np.ndarray:
        """Volume ``index`` before motion, float64: the phantom plus noise, the region holding the BOLD."""
        rng = np.random.default_rng([*self.noise_seed, index])
        image = self.phantom.data.astype(np.float64) + rng.normal(0.0, self.noise_sd, self.shape)
        image[self.region_mask] = self.bold_data[index]
        return image

    def volume(self, index: int) -> np.ndarray:
        """Volume ``index`` as the scanner stores it: moved, whole numbers in 0..4095, float32."""
        image = self.unmoved(index)
        params = self.motion_params[index]
        if np.any(params != 0):
            image = rigidly_moved(image, self.affine, self.phantom.centre_mm, params)
        stored = np.clip(np.rint(image), 0, SCANNER_MAX_VALUE)
        return np.asfortranarray(stored, dtype=np.float32)


def rigidly_moved(image: np.ndarray, affine: np.ndarray, centre_mm: np.ndarray, params: np.ndarray) -> np.ndarray:
    """``image`` moved by six rigid parameters on its own grid (cubic B-spline, edges extended).

    The convention of :meth:`BrainPhantom.moved`: the result at world position ``x_moved`` shows what
    ``image`` shows at ``x`` where ``x_moved = Rz @ Ry @ Rx @ (x - centre_mm) + centre_mm + t``.
    """
    params = np.asarray(params, dtype=np.float64)
    rotation = Rotation.from_euler("xyz", params[3:]).as_matrix()  # extrinsic x, y, z = Rz @ Ry @ Rx
    voxels = np.indices(image.shape, dtype=np.float64).reshape(3, -1)
    moved_mm = affine[:3, :3] @ voxels + affine[:3, 3:4]
    centre = np.asarray(centre_mm, dtype=np.float64)[:, None]
    source_mm = rotation.T @ (moved_mm - centre - params[:3, None]) + centre
    to_voxel = np.linalg.inv(affine)
    source_vox = to_voxel[:3, :3] @ source_mm + to_voxel[:3, 3:4]
    coefficients = scipy.ndimage.spline_filter(image, order=3, mode="nearest")  # as BrainPhantom's spline
    values = scipy.ndimage.map_coordinates(coefficients, source_vox, order=3, mode="nearest", prefilter=False)
    return values.reshape(image.shape)


def scaled_motion(world_motion: np.ndarray, motion_scale: float) -> np.ndarray:
    """The world's motion trace (n, 6) as rigid parameters: translations ``motion * scale`` mm, rotations
    ``motion * scale * 0.01`` rad (the world's trace is a random walk of sd ~0.1 unit per axis, so rotations
    stay well under half a degree)."""
    params = np.asarray(world_motion, dtype=np.float64) * motion_scale
    params[:, 3:] *= ROTATION_RAD_PER_UNIT
    return params


def phantom_affine(shape: Sequence[int], voxel_mm: float) -> np.ndarray:
    """An axial, oblique-free grid centred on world 0, x running right to left (LAS, as dcm2niix writes
    axial Siemens EPI): its slice axis runs along the DICOM normal, so a DICOM writer keeps the slice order
    and every layout writes the volumes on this very grid."""
    affine = np.diag([-voxel_mm, voxel_mm, voxel_mm, 1.0])
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape, dtype=np.float64) - 1.0) / 2.0)
    return affine


def write_world_session(
    world: SyntheticWorld,
    subject: str,
    session: int,
    out_dir: Path,
    *,
    layout: str = "mosaic",
    shape: tuple[int, int, int] = (32, 36, 28),
    voxel_mm: float = 3.0,
    runs: Sequence[int] | None = None,
    motion_scale: float = 1.0,
    noise_sd: float = 10.0,
    seed: int = 0,
    progress: bool = False,
) -> SessionLayout:
    """Write session ``session`` of ``subject`` into ``out_dir`` (absent or empty); return where its parts are.

    ``runs`` (1-based run numbers within the session) writes only those runs; ``motion_scale`` 0 writes no
    motion at all; ``noise_sd`` is the noise outside the region (the region's noise is the world's). The
    output's content (pixel data, events, images, truth) is a function of the world, subject, session, the
    arguments and ``seed``; DICOM UIDs and acquisition times are not.

    Raises
    ------
    ConfigError
        An unknown subject, a session or run the subject does not have, a bad layout, grid or noise, or a
        non-empty ``out_dir``.
    """
    check_arguments(layout, shape, voxel_mm, motion_scale, noise_sd, seed)
    plans = session_plans(world, subject, session, runs)
    out_dir = empty_dir(Path(out_dir))
    shape = tuple(int(n) for n in shape)
    phantom, mask, phantom_seed = world_phantom(world, subject, shape, voxel_mm, seed)
    layout_paths = SessionLayout(
        raw_dir=out_dir / "raw",
        events=tuple(out_dir / "events" / f"run-{plan.run:02d}_events.tsv" for plan in plans),
        images_dir=out_dir / "stimuli",
        truth_dir=out_dir / "truth",
        series_numbers=tuple(plan.run for plan in plans),
    )
    for directory in (layout_paths.raw_dir, out_dir / "events", layout_paths.images_dir, layout_paths.truth_dir):
        directory.mkdir()
    written_affine = phantom.affine
    for plan, events_path in tqdm(
        list(zip(plans, layout_paths.events, strict=True)), desc=f"{subject} session {session}", disable=not progress
    ):
        source = world_run_source(world, subject, plan, phantom, mask, motion_scale, noise_sd, seed)
        written_affine = _scan(source, layout_paths.raw_dir, layout, plan, seed)
        write_events_tsv(events_path, plan)
        write_motion_tsv(_motion_path(layout_paths, plan), source.motion_params)
    write_stimulus_images(world, plans, layout_paths.images_dir)
    write_region_mask(layout_paths.region_mask_path, mask, phantom.affine, written_affine)
    truth = _truth(world, subject, session, plans, layout_paths, out_dir, mask)
    truth["simulation"] = {
        "layout": layout,
        "shape": list(shape),
        "voxel_mm": voxel_mm,
        "motion_scale": motion_scale,
        "rotation_rad_per_unit": ROTATION_RAD_PER_UNIT,
        "noise_sd": noise_sd,
        "seed": seed,
        "phantom_seed": phantom_seed,
    }
    layout_paths.truth_path.write_text(json.dumps(truth, indent=1) + "\n")
    return layout_paths


def world_phantom(
    world: SyntheticWorld, subject: str, shape: Sequence[int], voxel_mm: float, seed: int
) -> tuple[BrainPhantom, np.ndarray, int]:
    """The subject's head on the grid: the phantom, its signal region (bool mask) and the phantom's seed."""
    shape = tuple(int(n) for n in shape)
    phantom_seed = _int_seed(seed, _PHANTOM_KEY, subject)
    phantom = BrainPhantom(shape, phantom_affine(shape, voxel_mm), seed=phantom_seed)
    return phantom, _region_mask(phantom, world.subject(subject).n_voxels), phantom_seed


def world_run_source(
    world: SyntheticWorld,
    subject: str,
    plan: RunPlan,
    phantom: BrainPhantom,
    mask: np.ndarray,
    motion_scale: float,
    noise_sd: float,
    seed: int,
) -> WorldRunSource:
    """One run of the subject as scanner volumes, seeded so the same arguments give the same pixels."""
    bold = world.bold(subject, plan)
    noise_seed = (seed, _NOISE_KEY, _name_key(subject), plan.session, plan.run)
    return WorldRunSource(phantom, mask, bold.data, scaled_motion(bold.motion, motion_scale), noise_sd, noise_seed)


def session_plans(world: SyntheticWorld, subject: str, session: int, runs: Sequence[int] | None) -> list[RunPlan]:
    """The subject's runs of ``session`` (only ``runs``, 1-based, if given), in run order."""
    schedule = world.runs(subject)  # raises ConfigError naming an unknown subject
    plans = [plan for plan in schedule if plan.session == session]
    if not plans:
        sessions = sorted({plan.session for plan in schedule})
        raise ConfigError(f"subject {subject!r} has no session {session} in this world; its sessions are {sessions}")
    if runs is None:
        return plans
    available = [plan.run for plan in plans]
    unknown = sorted(set(runs) - set(available))
    if unknown or not runs:
        raise ConfigError(
            f"runs={list(runs)}: subject {subject!r} session {session} has runs {available}; "
            f"{unknown or 'an empty list'} not among them"
        )
    return [plan for plan in plans if plan.run in set(runs)]


def world_from_truth(truth_path: Path) -> SyntheticWorld:
    """The world a written session came from, rebuilt from its truth.json (e.g. for the true betas:
    ``world.bold(subject, plan).betas``)."""
    truth = json.loads(Path(truth_path).read_text())
    fields = {name: tuple(value) if isinstance(value, list) else value for name, value in truth["world"].items()}
    return SyntheticWorld(WorldConfig(**fields))


def write_events_tsv(path: Path, plan: RunPlan) -> None:
    """The run's BIDS events.tsv, as the stimulus program logs it: one line per trial, onset and duration in
    seconds from the run's first volume, and the trial's split ("train" or "test")."""
    lines = ["\t".join(EVENTS_COLUMNS)]
    for event, split in zip(plan.design.events(), plan.splits, strict=True):
        lines.append(f"{event.onset_s:.3f}\t{event.duration_s:.3f}\t{event.trial_id}\t{event.stimulus_id}\t{split}")
    path.write_text("\n".join(lines) + "\n")


def write_motion_tsv(path: Path, motion_params: np.ndarray) -> None:
    """The rigid motion applied to each volume, one line per volume (header :data:`MOTION_COLUMNS`)."""
    lines = ["\t".join(MOTION_COLUMNS)]
    lines += ["\t".join(f"{value:.9g}" for value in row) for row in motion_params]
    path.write_text("\n".join(lines) + "\n")


def write_stimulus_images(world: SyntheticWorld, plans: Sequence[RunPlan], images_dir: Path) -> list[Path]:
    """Every image shown in ``plans`` as ``<stimulus_id>.png`` (RGB uint8), each once."""
    indices = np.unique(np.concatenate([plan.image_indices for plan in plans]))
    pixels = np.rint(np.clip(world.images(indices), 0.0, 1.0) * 255.0).astype(np.uint8)
    paths = []
    for index, image in zip(indices, pixels, strict=True):
        path = images_dir / f"{world.image_ids[int(index)]}.png"
        Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)), mode="RGB").save(path)
        paths.append(path)
    return paths


def _scan(source: WorldRunSource, raw_dir: Path, layout: str, plan: RunPlan, seed: int) -> np.ndarray:
    """Write the run's volumes as series ``plan.run``, unpaced; return the affine of the volumes as written."""
    scanner = SimulatedScanner(
        raw_dir,
        source,
        layout=layout,
        tr_s=plan.design.tr_s,
        speed=WRITE_SPEED,
        chunks=1,
        chunk_pause_s=0.0,
        first_series=plan.run,
        seed=seed,
    )
    scanner.run()
    return scanner.affine


def check_arguments(
    layout: str, shape: Sequence[int], voxel_mm: float, motion_scale: float, noise_sd: float, seed: int
) -> None:
    if layout not in LAYOUTS:
        raise ConfigError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    if len(shape) != 3 or any(int(n) < 4 for n in shape):
        raise ConfigError(f"shape must be three voxel counts of at least 4; got {tuple(shape)}")
    if not voxel_mm > 0:
        raise ConfigError(f"voxel_mm must be positive; got {voxel_mm}")
    if not (np.isfinite(motion_scale) and motion_scale >= 0):
        raise ConfigError(f"motion_scale must be finite and at least 0; got {motion_scale}")
    if not (np.isfinite(noise_sd) and noise_sd >= 0):
        raise ConfigError(f"noise_sd must be finite and at least 0; got {noise_sd}")
    if seed < 0:
        raise ConfigError(f"seed must be at least 0 (it seeds numpy's SeedSequence); got {seed}")


def empty_dir(out_dir: Path) -> Path:
    """``out_dir``, created; refused if it holds anything (another session's files would mix with these)."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"out_dir {out_dir} must be absent or an empty folder; it exists and is not empty")
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def _region_mask(phantom: BrainPhantom, n_voxels: int) -> np.ndarray:
    try:
        return phantom.region_mask(n_voxels)
    except ValueError as error:
        raise ConfigError(
            f"shape {phantom.shape}: the subject's {n_voxels} voxels do not fit the phantom's brain ({error}); "
            "use a larger shape"
        ) from None


def write_region_mask(path: Path, mask: np.ndarray, source_affine: np.ndarray, written_affine: np.ndarray) -> None:
    """The mask on the grid of the volumes as written: if the writer reversed the slices (a DICOM normal
    against the slice axis), so is the mask. :func:`phantom_affine` makes that never happen."""
    data = mask.astype(np.uint8)
    if not np.allclose(written_affine, source_affine, atol=1e-6):
        data = data[:, :, ::-1]
    image = nib.Nifti1Image(np.asfortranarray(data), written_affine)
    image.set_qform(written_affine, code=1)
    image.set_sform(written_affine, code=1)
    nib.save(image, path)


def _motion_path(layout: SessionLayout, plan: RunPlan) -> Path:
    return layout.truth_dir / f"run-{plan.run:02d}_motion.tsv"


def _truth(
    world: SyntheticWorld,
    subject: str,
    session: int,
    plans: Sequence[RunPlan],
    layout: SessionLayout,
    out_dir: Path,
    mask: np.ndarray,
) -> dict:
    """What the session holds: enough to rebuild the world (its config) and know every trial's image."""
    runs = [
        {
            "run": plan.run,
            "series_number": series,
            "n_volumes": plan.design.n_volumes,
            "tr_s": plan.design.tr_s,
            "n_trials": plan.design.n_trials,
            "events": str(events.relative_to(out_dir)),
            "motion": str(_motion_path(layout, plan).relative_to(out_dir)),
        }
        for plan, series, events in zip(plans, layout.series_numbers, layout.events, strict=True)
    ]
    trials = [
        {
            "run": plan.run,
            "trial_id": trial_id,
            "stimulus_id": stimulus_id,
            "image_index": int(index),
            "split": split,
            "onset_s": float(onset_s),
        }
        for plan in plans
        for trial_id, stimulus_id, index, split, onset_s in zip(
            plan.design.trial_ids,
            plan.design.stimulus_ids,
            plan.image_indices,
            plan.splits,
            plan.design.onsets_s,
            strict=True,
        )
    ]
    return {
        "world": dataclasses.asdict(world.config),
        "subject": subject,
        "session": session,
        "n_region_voxels": int(mask.sum()),
        "region_mask": str(layout.region_mask_path.relative_to(out_dir)),
        "voxel_order": "columns of world.bold(subject, plan).data = volume[region_mask], C order of the mask array",
        "runs": runs,
        "trials": trials,
    }


def _name_key(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))


def _int_seed(seed: int, key: int, subject: str) -> int:
    return int(np.random.SeedSequence(seed, spawn_key=(key, _name_key(subject))).generate_state(1)[0])
