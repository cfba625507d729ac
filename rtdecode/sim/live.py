"""A synthetic-world session written live, for the daemon to watch: the scanner's files at TR pace (with faults)
and the stimulus program's events.tsv lines as the trials happen.

:func:`~rtdecode.sim.session.write_world_session` writes a whole session at once, for calibration.
:class:`LiveSession` writes the same content (same world, same seeds: the same pixels) the way a daemon meets
it during a scan::

    out_dir/
      watch/                    the scanner's export folder: run n's volumes appear at TR / speed pace
      events/run-NN_events.tsv  the stimulus log of run NN: a header when the run starts, then one line per
                                trial, written and flushed once the scanner has acquired the trial's onset
      stimuli/<stimulus_id>.png every image the logged trials show
      truth/region_mask.nii.gz  the voxels that carry the subject's BOLD, on the written grid (a subject's mask)
      truth/reference.nii.gz    run 1's first volume without motion, on the written grid (a calibration reference)
      truth/run-NN_motion.tsv   the rigid motion applied to each volume written
      truth/truth.json          as session.py's, the trials being those logged

:meth:`LiveSession.prepare` writes what is known before the scan (stimuli, mask, reference, truth);
:meth:`LiveSession.run` then plays the scan. The daemon must never see the future: a trial's line is written
only when scanner time (``(monotonic - run start) * speed``) has reached its onset *and* every volume the
scanner planned to write by then (the one whose acquisition covers the onset included) is written and closed.
A dropped volume is not waited for, nor a late one (the stimulus program does not know about them).

A run's series number is its run number within the session, shifted up by one for each ``restart`` fault of
an earlier run (a restart opens a new series), so series numbers and file names never collide. A restart does
not restart the stimulus log: its onsets stay relative to the run's first volume.
"""

import bisect
import dataclasses
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from rtdecode.errors import ConfigError
from rtdecode.sim.dicom_writer import SIMULATED_PATIENT
from rtdecode.sim.faults import GROWING_FILE_FAULTS, Fault, parse_fault, plan_writes
from rtdecode.sim.scanner import SimulatedScanner, WriteRecord
from rtdecode.sim.session import (
    EVENTS_COLUMNS,
    ROTATION_RAD_PER_UNIT,
    WorldRunSource,
    check_arguments,
    empty_dir,
    session_plans,
    world_phantom,
    world_run_source,
    write_motion_tsv,
    write_region_mask,
    write_stimulus_images,
)
from rtdecode.sim.world import RunPlan, SyntheticWorld

log = logging.getLogger(__name__)

TRIAL_RESPONSE_S = 10.0  # a trial is logged only if its onset + this fits in the (truncated) run: its response does
_POLL_S = 0.05  # how often the events log looks at the stop event while it waits


@dataclasses.dataclass(frozen=True)
class LiveLayout:
    """Where a live session's parts are (see the module docstring)."""

    watch_dir: Path
    events_dir: Path
    images_dir: Path
    truth_dir: Path
    region_mask_path: Path
    reference_path: Path
    truth_path: Path

    def events_path(self, run: int) -> Path:
        """Run ``run``'s events.tsv (``run-NN_events.tsv``, NN the run number within the session)."""
        return self.events_dir / f"run-{run:02d}_events.tsv"

    def motion_path(self, run: int) -> Path:
        return self.truth_dir / f"run-{run:02d}_motion.tsv"

    def image_path(self, stimulus_id: str) -> Path:
        return self.images_dir / f"{stimulus_id}.png"


@dataclasses.dataclass(frozen=True)
class LiveTrial:
    """One trial as the stimulus program logs it, with the world's image index behind its stimulus id."""

    run: int
    trial_id: str
    onset_s: float
    duration_s: float
    stimulus_id: str  # the world's image id, also the stimulus PNG's stem
    image_index: int
    split: str  # "train" or "test"

    def line(self) -> str:
        """The events.tsv line (columns :data:`~rtdecode.sim.session.EVENTS_COLUMNS`), with its newline."""
        return f"{self.onset_s:.3f}\t{self.duration_s:.3f}\t{self.trial_id}\t{self.stimulus_id}\t{self.split}\n"


@dataclasses.dataclass(frozen=True)
class LiveRunTruth:
    """What one run holds, known before it is played: its series, volumes and logged trials."""

    run: int
    series_numbers: tuple[int, ...]  # more than one when a restart fault opens a new series
    n_volumes: int
    tr_s: float
    trials: tuple[LiveTrial, ...]

    @property
    def trial_ids(self) -> tuple[str, ...]:
        return tuple(trial.trial_id for trial in self.trials)

    @property
    def stimulus_ids(self) -> tuple[str, ...]:
        return tuple(trial.stimulus_id for trial in self.trials)

    @property
    def image_indices(self) -> np.ndarray:
        return np.array([trial.image_index for trial in self.trials], dtype=np.int64)


@dataclasses.dataclass(frozen=True)
class LoggedTrial:
    """A trial line as written: when it was flushed (monotonic s), the scanner time then, and how many of the
    run's writes were done by then."""

    trial: LiveTrial
    logged_s: float
    scanner_s: float
    n_writes_before: int


@dataclasses.dataclass(frozen=True)
class LiveRunResult:
    """What :meth:`LiveSession.run` wrote for one run; ``completed`` is False when ``stop`` cut it short."""

    run: int
    series_numbers: tuple[int, ...]
    writes: tuple[WriteRecord, ...]
    logged: tuple[LoggedTrial, ...]
    completed: bool


class LiveSession:
    """Session ``session`` of ``subject`` in ``world``, written live into ``out_dir`` (absent or empty).

    Parameters
    ----------
    runs : sequence of int, optional
        1-based run numbers within the session; default every run.
    layout, shape, voxel_mm, motion_scale, noise_sd, seed
        As :func:`~rtdecode.sim.session.write_world_session`: the pixels are a function of these, the world,
        subject and session (equal to that function's for the same arguments).
    speed : float
        How much faster than real time the scan plays (volumes ``tr_s / speed`` apart).
    faults : mapping of run number to faults
        :class:`~rtdecode.sim.faults.Fault` values or their text (``"drop@5"``); indices count the run's
        volumes from 0.
    n_volumes : int, optional
        Write only the first ``n_volumes`` of each run (quick tests); trials of a cut run are logged only if
        ``onset + TRIAL_RESPONSE_S`` fits in what is written (a whole run logs every trial).
    run_gap_s : float
        Scanner seconds between the end of a run and the start of the next (divided by ``speed``).
    patient : (name, id)
        The DICOM PatientName and PatientID written (the serve tests check none of it is ever published).

    Raises
    ------
    ConfigError
        An unknown subject, session or run, a bad grid, layout, speed, volume count or fault.
    """

    def __init__(
        self,
        world: SyntheticWorld,
        subject: str,
        session: int,
        out_dir: Path,
        *,
        runs: Sequence[int] | None = None,
        layout: str = "mosaic",
        shape: tuple[int, int, int] = (32, 36, 28),
        voxel_mm: float = 3.0,
        motion_scale: float = 1.0,
        noise_sd: float = 10.0,
        seed: int = 0,
        speed: float = 1.0,
        faults: Mapping[int, Sequence[Fault | str]] | None = None,
        n_volumes: int | None = None,
        run_gap_s: float = 0.0,
        patient: tuple[str, str] = (SIMULATED_PATIENT, SIMULATED_PATIENT),
    ) -> None:
        check_arguments(layout, shape, voxel_mm, motion_scale, noise_sd, seed)
        _check_pace(speed, run_gap_s)
        self.world, self.subject, self.session = world, subject, session
        self.out_dir = Path(out_dir)
        self.layout, self.shape = layout, tuple(int(n) for n in shape)
        self.voxel_mm, self.motion_scale, self.noise_sd, self.seed = voxel_mm, motion_scale, noise_sd, seed
        self.patient = patient
        self.speed, self.run_gap_s = speed, run_gap_s
        self._plans = session_plans(world, subject, session, runs)
        self._n_volumes = {plan.run: _checked_n_volumes(n_volumes, plan) for plan in self._plans}
        self._faults = _checked_faults(faults or {}, self._plans, self._n_volumes, layout)
        self._phantom, self._mask, self._phantom_seed = world_phantom(world, subject, self.shape, voxel_mm, seed)
        self._truth = _runs_truth(self._plans, self._n_volumes, self._faults)
        self._sources: dict[int, WorldRunSource] = {}
        self._layout: LiveLayout | None = None
        self._played = False

    @property
    def truth(self) -> tuple[LiveRunTruth, ...]:
        """Per run, in run order: series numbers, volumes written, and the trials logged (trial ids, stimulus
        ids = the world's image ids, image indices, splits, onsets)."""
        return tuple(self._truth.values())

    @property
    def region_mask(self) -> np.ndarray:
        """The region mask (bool, source grid; equal to the written grid for every layout here)."""
        return self._mask.copy()

    def prepare(self) -> LiveLayout:
        """Write what is known before the scan (stimuli, truth, region mask, reference, motion) and create the
        empty watch and events folders; return the layout. Done once: a second call returns the same layout."""
        if self._layout is not None:
            return self._layout
        out_dir = empty_dir(self.out_dir)
        truth_dir = out_dir / "truth"
        layout = LiveLayout(
            watch_dir=out_dir / "watch",
            events_dir=out_dir / "events",
            images_dir=out_dir / "stimuli",
            truth_dir=truth_dir,
            region_mask_path=truth_dir / "region_mask.nii.gz",
            reference_path=truth_dir / "reference.nii.gz",
            truth_path=truth_dir / "truth.json",
        )
        for directory in (layout.watch_dir, layout.events_dir, layout.images_dir, layout.truth_dir):
            directory.mkdir()
        write_stimulus_images(self.world, self._logged_plans(), layout.images_dir)
        reference, written_affine = self._reference()
        write_region_mask(layout.region_mask_path, self._mask, self._phantom.affine, written_affine)
        _write_volume(layout.reference_path, reference, written_affine)
        for plan in self._plans:
            source = self._source(plan)
            write_motion_tsv(layout.motion_path(plan.run), source.motion_params[: self._n_volumes[plan.run]])
        layout.truth_path.write_text(json.dumps(self._truth_json(layout), indent=1) + "\n")
        self._layout = layout
        return layout

    def run(
        self,
        stop: threading.Event | None = None,
        on_write: Callable[[int, WriteRecord], None] | None = None,
        on_trial: Callable[[int, LoggedTrial], None] | None = None,
    ) -> list[LiveRunResult]:
        """Play the session: each run's volumes into ``watch_dir`` at pace, its trials into its events.tsv as
        they happen; :meth:`prepare` first if not done. Return what was written, per run played.

        ``stop`` ends it early (between writes, lines or runs). ``on_write(run, record)`` is called in this
        thread after each file is closed; ``on_trial(run, logged)`` in the events thread after each line is
        flushed. An exception in either ends the session and is raised here. A session plays once.
        """
        if self._played:
            raise ConfigError(f"LiveSession in {self.out_dir} has been played; a session plays once (make a new one)")
        self._played = True
        layout = self.prepare()
        stop = stop or threading.Event()
        results: list[LiveRunResult] = []
        for number, plan in enumerate(self._plans):
            if stop.wait(self.run_gap_s / self.speed if number else 0.0):
                break
            result = self._play(plan, layout, stop, on_write, on_trial)
            results.append(result)
            if not result.completed:
                break
        return results

    # -- one run --------------------------------------------------------------------------------

    def _play(
        self,
        plan: RunPlan,
        layout: LiveLayout,
        stop: threading.Event,
        on_write: Callable[[int, WriteRecord], None] | None,
        on_trial: Callable[[int, LoggedTrial], None] | None,
    ) -> LiveRunResult:
        truth = self._truth[plan.run]
        scanner = self._scanner(plan, layout.watch_dir)
        progress = _WriteProgress(stop)
        events = _EventsLog(
            layout.events_path(plan.run), truth.trials, _writes_due(scanner, truth.trials), self.speed, progress
        )
        writes: list[WriteRecord] = []

        def written(record: WriteRecord) -> None:
            writes.append(record)
            progress.add()
            if on_write is not None:
                on_write(plan.run, record)
            events.raise_failure()  # the stimulus log failed: end the scan with its error

        log.info(
            "live run %d (series %s): %d writes, %d trials",
            plan.run,
            truth.series_numbers,
            len(scanner.plan),
            len(truth.trials),
        )
        events.start(lambda logged: on_trial(plan.run, logged) if on_trial is not None else None)
        try:
            scanner.run(stop, written)
        finally:
            if stop.is_set() or len(writes) < len(scanner.plan):
                progress.halt()
            events.join()
        completed = len(writes) == len(scanner.plan) and len(events.logged) == len(truth.trials)
        return LiveRunResult(plan.run, truth.series_numbers, tuple(writes), tuple(events.logged), completed)

    def _scanner(self, plan: RunPlan, watch_dir: Path) -> SimulatedScanner:
        """The run's scanner, made when the run starts (its headers take their clock time from then)."""
        try:
            return SimulatedScanner(
                watch_dir,
                self._source(plan),
                layout=self.layout,
                tr_s=plan.design.tr_s,
                speed=self.speed,
                faults=self._faults.get(plan.run, []),
                first_series=self._truth[plan.run].series_numbers[0],
                n_volumes=self._n_volumes[plan.run],
                seed=self.seed,
                patient=self.patient,
            )
        except ValueError as error:  # faults were checked at construction: a scanner rule this module missed
            raise ConfigError(f"run {plan.run}: the simulated scanner refuses the run ({error})") from None

    def _source(self, plan: RunPlan, motion: bool = True) -> WorldRunSource:
        """The run as scanner volumes, seeded as session.py seeds it (so the pixels are the same)."""
        if motion and plan.run in self._sources:
            return self._sources[plan.run]
        motion_scale = self.motion_scale if motion else 0.0
        source = world_run_source(
            self.world, self.subject, plan, self._phantom, self._mask, motion_scale, self.noise_sd, self.seed
        )
        if motion:
            self._sources[plan.run] = source
        return source

    # -- what is known in advance ---------------------------------------------------------------

    def _reference(self) -> tuple[np.ndarray, np.ndarray]:
        """Run 1's first volume without motion, as the scanner would write it, and the written affine."""
        first = self._plans[0]
        source = self._source(first, motion=False)
        scanner = SimulatedScanner(self.out_dir, source, layout=self.layout, tr_s=first.design.tr_s, n_volumes=1)
        return scanner.scanner_volume(0), scanner.affine

    def _logged_plans(self) -> list[RunPlan]:
        """The plans cut down to their logged trials (for the stimulus images)."""
        return [dataclasses.replace(plan, image_indices=self._truth[plan.run].image_indices) for plan in self._plans]

    def _truth_json(self, layout: LiveLayout) -> dict:
        """truth.json as session.py writes it (world, subject, runs, trials, simulation), plus the live part."""
        runs = [
            {
                "run": truth.run,
                "series_number": truth.series_numbers[0],
                "series_numbers": list(truth.series_numbers),
                "n_volumes": truth.n_volumes,
                "tr_s": truth.tr_s,
                "n_trials": len(truth.trials),
                "events": str(layout.events_path(truth.run).relative_to(self.out_dir)),
                "motion": str(layout.motion_path(truth.run).relative_to(self.out_dir)),
                "faults": [str(fault) for fault in self._faults.get(truth.run, [])],
            }
            for truth in self.truth
        ]
        trials = [dataclasses.asdict(trial) for truth in self.truth for trial in truth.trials]
        return {
            "world": dataclasses.asdict(self.world.config),
            "subject": self.subject,
            "session": self.session,
            "n_region_voxels": int(self._mask.sum()),
            "region_mask": str(layout.region_mask_path.relative_to(self.out_dir)),
            "reference": str(layout.reference_path.relative_to(self.out_dir)),
            "voxel_order": "columns of world.bold(subject, plan).data = volume[region_mask], C order of the mask array",
            "runs": runs,
            "trials": trials,
            "simulation": {
                "layout": self.layout,
                "shape": list(self.shape),
                "voxel_mm": self.voxel_mm,
                "motion_scale": self.motion_scale,
                "rotation_rad_per_unit": ROTATION_RAD_PER_UNIT,
                "noise_sd": self.noise_sd,
                "seed": self.seed,
                "phantom_seed": self._phantom_seed,
                "speed": self.speed,
                "run_gap_s": self.run_gap_s,
                "trial_response_s": TRIAL_RESPONSE_S,
            },
        }


class _WriteProgress:
    """How many of a run's planned writes are closed; the events log waits on it (and on the clock)."""

    def __init__(self, stop: threading.Event) -> None:
        self._stop = stop
        self._condition = threading.Condition()
        self._n_written = 0
        self._halted = False

    def add(self) -> None:
        with self._condition:
            self._n_written += 1
            self._condition.notify_all()

    def halt(self) -> None:
        """No more writes will come (the scanner stopped or failed): waiting ends."""
        with self._condition:
            self._halted = True
            self._condition.notify_all()

    def wait_until(self, due_s: float, n_writes: int) -> int | None:
        """Wait until monotonic time ``due_s`` and ``n_writes`` writes; return the writes done then, or None
        if halted or stopped first."""
        with self._condition:
            while not (self._halted or self._stop.is_set()):
                remaining_s = due_s - time.monotonic()
                if remaining_s <= 0 and self._n_written >= n_writes:
                    return self._n_written
                self._condition.wait(timeout=min(remaining_s, _POLL_S) if remaining_s > 0 else _POLL_S)
            return None


class _EventsLog:
    """The stimulus program of one run: a thread appending each trial's line when its time has come."""

    def __init__(
        self,
        path: Path,
        trials: Sequence[LiveTrial],
        writes_due: Sequence[int],
        speed: float,
        progress: _WriteProgress,
    ) -> None:
        self.path = path
        self.trials = trials
        self.writes_due = writes_due
        self.speed = speed
        self.progress = progress
        self.logged: list[LoggedTrial] = []
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self, on_trial: Callable[[LoggedTrial], None]) -> None:
        """Write the header now (the run starts), then the trials from a thread on the run's clock."""
        self.path.write_text("\t".join(EVENTS_COLUMNS) + "\n")
        start_s = time.monotonic()
        self._thread = threading.Thread(
            target=self._guarded, args=(start_s, on_trial), name=f"events-{self.path.stem}", daemon=True
        )
        self._thread.start()

    def join(self) -> None:
        """Wait for the thread; raise what it raised."""
        if self._thread is not None:
            self._thread.join()
        self.raise_failure()

    def raise_failure(self) -> None:
        """Raise what the thread raised, if it has failed."""
        if self._error is not None:
            raise self._error

    def _guarded(self, start_s: float, on_trial: Callable[[LoggedTrial], None]) -> None:
        try:
            self._write(start_s, on_trial)
        except BaseException as error:  # handed to the run's thread, which raises it
            self._error = error
            self.progress.halt()

    def _write(self, start_s: float, on_trial: Callable[[LoggedTrial], None]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            for trial, n_writes in zip(self.trials, self.writes_due, strict=True):
                n_done = self.progress.wait_until(start_s + trial.onset_s / self.speed, n_writes)
                if n_done is None:
                    return
                handle.write(trial.line())
                handle.flush()
                now_s = time.monotonic()
                logged = LoggedTrial(trial, now_s, (now_s - start_s) * self.speed, n_done)
                self.logged.append(logged)
                on_trial(logged)


def _writes_due(scanner: SimulatedScanner, trials: Sequence[LiveTrial]) -> list[int]:
    """Per trial, how many of the scanner's writes are planned at or before its onset (the plan is in time
    order): the line waits for them, so it never comes before the volume that covers its onset."""
    write_times_s = [write.at_s for write in scanner.plan]
    return [bisect.bisect_right(write_times_s, trial.onset_s) for trial in trials]


def _runs_truth(
    plans: Sequence[RunPlan], n_volumes: Mapping[int, int], faults: Mapping[int, Sequence[Fault]]
) -> dict[int, LiveRunTruth]:
    """Each run's series numbers (shifted by earlier restarts) and the trials whose response fits the run."""
    truth, series_shift = {}, 0
    for plan in plans:
        n_restarts = len({fault.index for fault in faults.get(plan.run, []) if fault.kind == "restart" and fault.index})
        first_series = plan.run + series_shift
        series_shift += n_restarts
        run_s = n_volumes[plan.run] * plan.design.tr_s
        truncated = n_volumes[plan.run] < plan.design.n_volumes  # a whole run logs every trial, as a real one does
        trials = tuple(
            LiveTrial(plan.run, event.trial_id, event.onset_s, event.duration_s, event.stimulus_id, int(index), split)
            for event, index, split in zip(plan.design.events(), plan.image_indices, plan.splits, strict=True)
            if not truncated or event.onset_s + TRIAL_RESPONSE_S <= run_s
        )
        series = tuple(range(first_series, first_series + 1 + n_restarts))
        truth[plan.run] = LiveRunTruth(plan.run, series, n_volumes[plan.run], plan.design.tr_s, trials)
    return truth


def _check_pace(speed: float, run_gap_s: float) -> None:
    if not (math.isfinite(speed) and speed > 0):
        raise ConfigError(f"speed must be a finite positive factor; got {speed}")
    if not (math.isfinite(run_gap_s) and run_gap_s >= 0):
        raise ConfigError(f"run_gap_s must be finite and at least 0; got {run_gap_s}")


def _checked_n_volumes(n_volumes: int | None, plan: RunPlan) -> int:
    if n_volumes is None:
        return plan.design.n_volumes
    if not 1 <= n_volumes <= plan.design.n_volumes:
        raise ConfigError(
            f"n_volumes must lie in 1..{plan.design.n_volumes} (run {plan.run}'s length); got {n_volumes}"
        )
    return int(n_volumes)


def _checked_faults(
    faults: Mapping[int, Sequence[Fault | str]], plans: Sequence[RunPlan], n_volumes: Mapping[int, int], layout: str
) -> dict[int, list[Fault]]:
    """The faults per run, parsed and checked against the runs written, their lengths and the layout."""
    runs = [plan.run for plan in plans]
    checked = {}
    for run, run_faults in faults.items():
        if run not in runs:
            raise ConfigError(f"faults: run {run} is not among the runs written {runs}")
        try:
            parsed = [fault if isinstance(fault, Fault) else parse_fault(fault) for fault in run_faults]
            plan_writes(n_volumes[run], 1.0, parsed)  # raises for an index past the run's end
        except ValueError as error:
            raise ConfigError(f"faults of run {run}: {error}") from None
        growing_unsupported = [str(f) for f in parsed if f.kind not in GROWING_FILE_FAULTS]
        if layout.startswith("nifti-4d") and growing_unsupported:
            raise ConfigError(
                f"faults of run {run}: layout {layout} grows one file per run, where only "
                f"{', '.join(GROWING_FILE_FAULTS)} apply; got {growing_unsupported}"
            )
        checked[run] = parsed
    return checked


def _write_volume(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    """A 3D float32 NIfTI with qform and sform set to ``affine`` (as the region mask is written)."""
    image = nib.Nifti1Image(np.asfortranarray(data, dtype=np.float32), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, path)
