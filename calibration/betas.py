"""Every trial's beta, computed run by run by the live chain (rtdecode.betas), and cached per run.

Two passes over the raw folder through the live ingest code (:class:`rtdecode.ingest.pipeline.Ingestor`):

1. **Inventory** (reads every file, keeps only each run's grid and the reference volume): the runs are
   checked against the events files (count, grid, onsets inside the run) before anything slow runs.
2. **Betas**: each run is motion-corrected, masked and fitted with a fresh
   :class:`rtdecode.betas.SessionBetas` whose calibration reference is the session's reference volume, so
   every run is aligned directly to the reference, exactly as the daemon aligns the first run of any later
   session; a replayed run gives the same betas. Each run's result is written to ``runs/run-NN.npz`` with a
   key (reference, voxels, [glm] settings, the run's files); an interrupted calibration recomputes only the
   runs whose file is missing or whose key differs.
"""

import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from calibration.inputs import LoggedTrial, SessionInputs
from rtdecode.betas import SessionBetas
from rtdecode.config import Config
from rtdecode.errors import CalibrationError
from rtdecode.preprocess.mask import Mask
from rtdecode.preprocess.motion import MotionCorrector
from rtdecode.records import IngestEventKind, TrialEvent, Volume

log = logging.getLogger(__name__)

ZOOM_TOLERANCE_MM = 1e-3
_PROBLEM_KINDS = (IngestEventKind.QUARANTINED, IngestEventKind.MISSING, IngestEventKind.FAILED)


@dataclasses.dataclass(frozen=True)
class RunGrid:
    """What the inventory learnt about one run."""

    run: int
    n_volumes: int
    shape: tuple[int, int, int]
    affine: np.ndarray
    tr_s: float
    first_file: str

    @property
    def voxel_mm(self) -> np.ndarray:
        return np.linalg.norm(self.affine[:3, :3], axis=0)


@dataclasses.dataclass
class Inventory:
    """The session's runs, the reference volume (first volume of the reference run) and ingest problems."""

    runs: dict[int, RunGrid]
    reference: tuple[np.ndarray, np.ndarray]
    problems: list[str]


@dataclasses.dataclass
class RunBetas:
    """One run's betas over the candidate voxels, in the order of its logged trials (NaN rows: no beta)."""

    run: int
    trial_ids: list[str]
    online: np.ndarray  # (n_trials, n_voxels) float32
    final: np.ndarray  # (n_trials, n_voxels) float32
    motion_params: np.ndarray  # (n_volumes, 6)
    fd_mm: np.ndarray  # (n_volumes,)
    flagged: np.ndarray  # (n_volumes,) bool
    problems: list[str]

    def betas(self, kind: str) -> np.ndarray:
        return self.online if kind == "online" else self.final


def volumes(raw_dir: Path, config: Config, quarantine_dir: Path) -> Iterator[Volume | str]:
    """Every volume already in ``raw_dir``, in run order, through the live ingest code; problems as text."""
    from rtdecode.ingest.pipeline import END, Ingestor

    scanner = config.scanner.model_copy(update={"existing_files": "ingest"})
    ingestor = Ingestor(raw_dir, scanner, quarantine_dir).start()
    ingestor.stop()  # ingest what is there, then end
    try:
        while (item := ingestor.output.get()) is not END:
            if isinstance(item, Volume):
                yield item
            elif item.kind in _PROBLEM_KINDS:
                yield item.describe()
    finally:
        ingestor.join()


def take_inventory(inputs: SessionInputs, config: Config, quarantine_dir: Path) -> Inventory:
    """Read the session once: each run's grid and length, and the reference volume; then check them."""
    runs: dict[int, RunGrid] = {}
    reference, problems = None, []
    reference_run = config.calibrate.reference_run
    for item in tqdm(volumes(inputs.raw_dir, config, quarantine_dir), desc="inventory", unit="vol", disable=None):
        if isinstance(item, str):
            problems.append(item)
            continue
        if item.run_index not in runs:
            shape = tuple(int(n) for n in item.data.shape)
            runs[item.run_index] = RunGrid(
                item.run_index, 0, shape, np.asarray(item.affine), item.tr_s, str(item.source)
            )
            if item.run_index == reference_run:
                reference = (np.array(item.data, dtype=np.float32), np.asarray(item.affine, dtype=np.float64))
        grid = runs[item.run_index]
        runs[item.run_index] = dataclasses.replace(grid, n_volumes=max(grid.n_volumes, item.volume_index + 1))
    if not runs:
        raise CalibrationError(f"no volume could be read from {inputs.raw_dir} ({len(problems)} problem(s))")
    if reference is None:
        raise CalibrationError(
            f"calibrate.reference_run = {reference_run}, but the session has runs {sorted(runs)} only"
        )
    inventory = Inventory(runs, reference, problems)
    check_runs(inventory, inputs)
    return inventory


def check_runs(inventory: Inventory, inputs: SessionInputs) -> None:
    """Runs match events files one to one, share one grid (shape and voxel size), and hold their trials."""
    runs = inventory.runs
    if sorted(runs) != list(range(1, inputs.n_runs + 1)):
        raise CalibrationError(
            f"{len(runs)} run(s) in {inputs.raw_dir} but {inputs.n_runs} events file(s) "
            f"({', '.join(str(p) for p in inputs.events)}): the n-th events file belongs to the n-th run "
            "(an aborted series counts as a run: remove it, or give --events for every run)"
        )
    first = runs[1]
    for grid in runs.values():
        same_zooms = np.allclose(grid.voxel_mm, first.voxel_mm, atol=ZOOM_TOLERANCE_MM)
        if grid.shape != first.shape or not same_zooms:
            raise CalibrationError(
                f"run {grid.run} ({grid.first_file}) has grid {grid.shape} at {np.round(grid.voxel_mm, 3)} mm; "
                f"run 1 ({first.first_file}) has {first.shape} at {np.round(first.voxel_mm, 3)} mm: "
                "a session's runs must share one acquisition grid"
            )
    for run, grid in runs.items():
        duration_s = grid.n_volumes * grid.tr_s
        late = [t for t in inputs.run_trials(run) if t.onset_s >= duration_s]
        if late:
            raise CalibrationError(
                f"{inputs.events[run - 1]}: trial {late[0].trial_id!r} starts at {late[0].onset_s} s, after run "
                f"{run} ended ({grid.n_volumes} volumes x {grid.tr_s} s): is this the right run's events file?"
            )


def grid_digest(reference: tuple[np.ndarray, np.ndarray], voxels: Mask) -> str:
    """A checksum of the reference volume and the voxels every run's betas are computed on."""
    digest = hashlib.sha256()
    for array in (reference[0], reference[1], voxels.data, voxels.affine):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def run_key(run: int, grid: RunGrid, inputs_digest: str, config: Config, trials: list[LoggedTrial]) -> str:
    """What a cached run's betas depend on (reference and voxels by ``grid_digest``, settings, files, the run's
    logged trials) as one JSON string."""
    key = {
        "run": run,
        "n_volumes": grid.n_volumes,
        "first_file": grid.first_file,
        "inputs": inputs_digest,
        "glm": config.glm.model_dump(mode="json"),
        "fd_threshold_mm": config.preprocess.fd_threshold_mm,
        "trials": [[t.trial_id, t.onset_s, t.duration_s] for t in trials],
    }
    return json.dumps(key, sort_keys=True)


def session_betas(
    inputs: SessionInputs,
    inventory: Inventory,
    voxels: Mask,
    config: Config,
    cache_dir: Path,
    quarantine_dir: Path,
) -> dict[int, RunBetas]:
    """Every run's betas over ``voxels``, motion-corrected onto ``inventory.reference``: read from the cache where
    its key matches, else computed and cached as soon as the run is done (an interruption loses one run at most)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    digest = grid_digest(inventory.reference, voxels)
    keys = {run: run_key(run, grid, digest, config, inputs.run_trials(run)) for run, grid in inventory.runs.items()}
    done = {run: cached for run in keys if (cached := _read_cached(cache_dir, run, keys[run])) is not None}
    if done:
        log.info("betas: runs %s from the cache in %s", sorted(done), cache_dir)
    todo = [run for run in sorted(keys) if run not in done]
    for betas in _compute(inputs, inventory, voxels, config, todo, quarantine_dir):
        _write_cached(cache_dir, betas, keys[betas.run])
        done[betas.run] = betas
    missing = [run for run in todo if run not in done]
    if missing:
        raise CalibrationError(f"runs {missing} gave no volume on the second reading of {inputs.raw_dir}")
    return dict(sorted(done.items()))


def _compute(
    inputs: SessionInputs, inventory: Inventory, voxels: Mask, config: Config, todo: list[int], quarantine_dir: Path
) -> Iterator[RunBetas]:
    """Each run of ``todo`` as soon as its last volume has gone through the live chain."""
    if not todo:
        return
    chain: SessionBetas | None = None
    current = None
    total = sum(inventory.runs[run].n_volumes for run in todo)
    with tqdm(total=total, desc="motion + GLM", unit="vol", disable=None) as progress:
        for item in volumes(inputs.raw_dir, config, quarantine_dir):
            if isinstance(item, str) or item.run_index not in todo:
                continue
            if item.run_index != current:
                if chain is not None:
                    yield _finish(chain, current, inputs, inventory)
                current, chain = item.run_index, _new_chain(inputs, inventory, voxels, config, item.run_index)
            chain.add_volume(item)
            progress.update()
    if chain is not None:
        yield _finish(chain, current, inputs, inventory)


def _new_chain(inputs: SessionInputs, inventory: Inventory, voxels: Mask, config: Config, run: int) -> SessionBetas:
    """The live chain for one run: a fresh corrector aligned to the reference, the [glm] settings."""
    corrector = MotionCorrector(
        voxels,
        inventory.reference,
        fd_threshold_mm=config.preprocess.fd_threshold_mm,
        device=config.preprocess.device,
    )
    chain = SessionBetas(corrector, config.glm)
    events = [TrialEvent(t.trial_id, t.onset_s, t.duration_s, t.stimulus_id) for t in inputs.run_trials(run)]
    chain.add_events(run, events)
    return chain


def _finish(chain: SessionBetas, run: int, inputs: SessionInputs, inventory: Inventory) -> RunBetas:
    chain.end_run(run, inventory.runs[run].n_volumes)
    record = chain.runs[run]
    trial_ids = [t.trial_id for t in inputs.run_trials(run)]
    n_voxels = chain.corrector.mask.n_voxels
    finals = {beta.event.trial_id: beta.beta for beta in record.final}
    onlines = {trial_id: beta.beta for trial_id, beta in record.online.items()}
    motion = record.motion
    return RunBetas(
        run=run,
        trial_ids=trial_ids,
        online=_rows(onlines, trial_ids, n_voxels),
        final=_rows(finals, trial_ids, n_voxels),
        motion_params=np.array([v.motion_params for v in motion], dtype=np.float64).reshape(-1, 6),
        fd_mm=np.array([v.fd_mm for v in motion], dtype=np.float64),
        flagged=np.array([v.flagged for v in motion], dtype=bool),
        problems=list(chain.problems),
    )


def _rows(betas: dict[str, np.ndarray], trial_ids: list[str], n_voxels: int) -> np.ndarray:
    missing = np.full(n_voxels, np.nan, np.float32)
    return np.stack([betas.get(t, missing) for t in trial_ids]).astype(np.float32)


def _cache_path(cache_dir: Path, run: int) -> Path:
    return cache_dir / f"run-{run:02d}.npz"


def _write_cached(cache_dir: Path, betas: RunBetas, key: str) -> None:
    path = _cache_path(cache_dir, betas.run)
    partial = path.with_suffix(".partial.npz")
    np.savez(
        partial,
        key=np.array(key),
        trial_ids=np.array(betas.trial_ids, dtype=str),
        online=betas.online,
        final=betas.final,
        motion_params=betas.motion_params,
        fd_mm=betas.fd_mm,
        flagged=betas.flagged,
        problems=np.array(betas.problems, dtype=str),
    )
    partial.replace(path)  # whole or absent: an interrupted write is recomputed


def _read_cached(cache_dir: Path, run: int, key: str) -> RunBetas | None:
    path = _cache_path(cache_dir, run)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["key"]) != key:
                log.info("betas: %s was computed with other inputs, settings or events; recomputing run %d", path, run)
                return None
            return RunBetas(
                run=run,
                trial_ids=[str(t) for t in data["trial_ids"]],
                online=data["online"],
                final=data["final"],
                motion_params=data["motion_params"],
                fd_mm=data["fd_mm"],
                flagged=data["flagged"],
                problems=[str(p) for p in data["problems"]],
            )
    except (OSError, ValueError, KeyError) as error:
        log.warning("betas: %s unreadable (%s); recomputing run %d", path, error, run)
        return None
