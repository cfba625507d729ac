"""Volumes and stimulus events in, single-trial betas out: motion correction, masking, then the online GLM.

This is the scanner side of the data flow, in order, for one session. ``rtdecode preprocess`` runs it over
recorded runs, calibration runs it over the calibration session, and the daemon runs it live, so a beta
means the same thing everywhere. It never raises on bad input: a volume or an event it cannot use is
reported in :attr:`SessionBetas.problems` (and logged) and the run goes on.
"""

import dataclasses
import json
import logging
from collections.abc import Collection
from pathlib import Path

import numpy as np
from tqdm import tqdm

from rtdecode.config import GlmConfig, NormaliseConfig, ScannerConfig
from rtdecode.errors import EventError, GlmError, MaskError, PreprocessError
from rtdecode.glm.events import EventsTsv, UnknownStimulusError, check_event
from rtdecode.glm.normalise import ZScore
from rtdecode.glm.online import GlmSettings, OnlineGLM
from rtdecode.preprocess.motion import MotionCorrector
from rtdecode.records import (
    MOTION_PARAMETER_NAMES,
    IngestEventKind,
    PreprocessedVolume,
    TrialBeta,
    TrialEvent,
    Volume,
)

log = logging.getLogger(__name__)


def load_reference(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A calibration reference volume (3D NIfTI) as (data float32, affine); MaskError names a bad file."""
    import nibabel as nib

    try:
        image = nib.load(path)
        data = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as error:  # nibabel raises many types for unreadable files
        raise MaskError(f"reference {path}: cannot read as NIfTI ({error})") from error
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise MaskError(f"reference {path}: expected a 3D volume, got shape {data.shape}")
    return data, image.affine


def normaliser(config: NormaliseConfig, n_voxels: int) -> ZScore:
    """The session's z-scoring: fresh running statistics, or the calibration statistics file."""
    if config.method == "running":
        return ZScore.running(n_voxels, config.epsilon, config.warmup_betas)
    if config.statistics is None:
        raise GlmError("normalise.method is 'calibration' but normalise.statistics names no file")
    statistics = ZScore.load(config.statistics)
    if statistics.n_voxels != n_voxels:
        raise GlmError(
            f"{config.statistics} holds statistics for {statistics.n_voxels} voxels; the mask has {n_voxels}"
        )
    return statistics


def glm_settings(config: GlmConfig, tr_s: float) -> GlmSettings:
    """The GLM settings a run with this TR gets from the config."""
    return GlmSettings(
        tr_s=tr_s,
        mode=config.mode,
        noise_model=config.noise_model,
        high_pass_hz=config.high_pass_hz,
        slice_time_ref=config.slice_time_ref,
        motion_regressors=config.motion_regressors,
        emit_delay_s=config.emit_delay_s,
        planned_n_frames=config.planned_volumes,
    )


@dataclasses.dataclass
class RunRecord:
    """What one run produced: its GLM, every preprocessed volume's motion, and its final betas."""

    glm: OnlineGLM
    motion: list[PreprocessedVolume] = dataclasses.field(default_factory=list)
    online: dict[str, TrialBeta] = dataclasses.field(default_factory=dict)
    final: list[TrialBeta] = dataclasses.field(default_factory=list)


class SessionBetas:
    """The preprocess -> GLM chain for one session.

    Parameters
    ----------
    corrector : MotionCorrector
        Holds the mask and the session's references.
    glm_config : GlmConfig
    known_stimuli : collection of str, optional
        Events naming another stimulus stay in the design but are not decodable.
    zscore : ZScore, optional
        Normalises every beta: online betas are observed (running statistics) then z-scored as they
        come; final betas are z-scored with the statistics of that moment, without being observed.
    """

    def __init__(
        self,
        corrector: MotionCorrector,
        glm_config: GlmConfig,
        known_stimuli: Collection[str] | None = None,
        zscore: ZScore | None = None,
    ) -> None:
        self.corrector = corrector
        self.glm_config = glm_config
        self.zscore = zscore
        self.known_stimuli = None if known_stimuli is None else frozenset(known_stimuli)
        self.runs: dict[int, RunRecord] = {}
        self.problems: list[str] = []
        self._waiting_events: dict[int, list[TrialEvent]] = {}

    def add_volume(self, volume: Volume) -> list[TrialBeta]:
        """Motion-correct, mask and add one volume; return the online betas it made due."""
        try:
            prepared = self.corrector.process(volume)
        except PreprocessError as error:
            return self._problem(f"volume skipped: {error}")
        run = self._run(volume.run_index, volume.tr_s, self.corrector.mask.n_voxels)
        run.motion.append(prepared)
        if prepared.flagged:
            log.warning(
                "run %d volume %d: framewise displacement %.2f mm over %.2f mm (kept)",
                volume.run_index,
                volume.volume_index,
                prepared.fd_mm,
                self.corrector.fd_threshold_mm,
            )
        try:
            due = run.glm.add_volume(volume.volume_index, prepared.vector, prepared.motion_params, prepared.timestamps)
        except GlmError as error:
            return self._problem(f"volume not modelled: {error}")
        return self._online(due)

    def add_events(self, run_index: int, events: list[TrialEvent]) -> list[TrialBeta]:
        """Add a run's events (before or during the run); return the online betas they made due."""
        run = self.runs.get(run_index)
        if run is None:  # the run's first volume is not in yet: its TR is unknown
            self._waiting_events.setdefault(run_index, []).extend(events)
            return []
        due = []
        for event in events:
            due += self._add_event(run, event)
        return self._online(due)

    def end_run(self, run_index: int, n_frames: int | None = None) -> list[TrialBeta]:
        """Finish a run: every trial's final beta; trials after the run's end are reported."""
        run = self.runs.get(run_index)
        if run is None:
            self._problem(f"run {run_index} ended with no usable volume; its events were not modelled")
            return []
        try:
            run.final = self._normalised(run.glm.finish(n_frames), observe=False)
        except GlmError as error:
            return self._problem(f"no final betas: {error}")
        for event in run.glm.unestimable():
            self._problem(f"run {run_index} trial {event.trial_id!r}: onset {event.onset_s} s has no volume after it")
        return run.final

    def _online(self, betas: list[TrialBeta]) -> list[TrialBeta]:
        """Online betas as they come: normalised (their statistics observed first) and kept with their run."""
        betas = self._normalised(betas, observe=True)
        for beta in betas:
            self.runs[beta.run_index].online[beta.event.trial_id] = beta
        return betas

    def _normalised(self, betas: list[TrialBeta], observe: bool) -> list[TrialBeta]:
        """The betas with ``zscored`` set; unchanged without a normaliser or statistics to apply."""
        if self.zscore is None or (not observe and self.zscore.count == 0):
            return betas
        return [self.zscore.normalise(beta, observe=observe) for beta in betas]

    def _run(self, run_index: int, tr_s: float, n_voxels: int) -> RunRecord:
        if run_index not in self.runs:
            glm = OnlineGLM(glm_settings(self.glm_config, tr_s), n_voxels, run_index)
            self.runs[run_index] = RunRecord(glm)
            for event in self._waiting_events.pop(run_index, []):
                self._add_event(self.runs[run_index], event)
        return self.runs[run_index]

    def _add_event(self, run: RunRecord, event: TrialEvent) -> list[TrialBeta]:
        decodable = True
        try:
            check_event(event, self.known_stimuli, None)
        except UnknownStimulusError as error:
            self._problem(f"run {run.glm.run_index}: {error}")
            decodable = False
        except EventError as error:
            return self._problem(f"run {run.glm.run_index}: event ignored: {error}")
        try:
            return run.glm.add_event(event, decodable)
        except EventError as error:
            return self._problem(f"run {run.glm.run_index}: event ignored: {error}")

    def report(self, message: str) -> None:
        """Record a problem found outside the chain (e.g. by ingest) with the session's own."""
        self._problem(message)

    def _problem(self, message: str) -> list[TrialBeta]:
        log.warning(message)
        self.problems.append(message)
        return []


def stack_betas(betas: list[TrialBeta], n_voxels: int) -> np.ndarray:
    """(n_trials, n_voxels) float32 of the betas, in the given order."""
    if not betas:
        return np.zeros((0, n_voxels), np.float32)
    return np.stack([beta.beta for beta in betas]).astype(np.float32)


def write_session(session: SessionBetas, out_dir: Path, settings: dict) -> dict:
    """Write a session's betas, motion and problems to ``out_dir``; return the summary it wrote.

    Files:

    * ``betas.npz``: ``final``, ``online`` and, with a normaliser, ``final_zscored`` and
      ``online_zscored``, each (n_trials, n_voxels) float32 with NaN rows where a trial has no such beta;
      the trial table ``trial_ids``, ``run_index``, ``onset_s``, ``duration_s``, ``stimulus_ids``,
      ``decodable``, ``online_n_frames`` (-1: no online beta).
    * ``motion.tsv``: one row per volume (parameters, FD, flag).
    * ``zscore.npz``: per-voxel statistics of the decodable final betas (for the ``calibration`` method).
    * ``normalisation.npz``: the session normaliser's statistics at the end (running method: its state).
    * ``summary.json``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    n_voxels = session.corrector.mask.n_voxels
    finals = [beta for run in session.runs.values() for beta in run.final]
    online_rows = [session.runs[b.run_index].online.get(b.event.trial_id) for b in finals]
    np.savez(out_dir / "betas.npz", **_beta_arrays(finals, online_rows, n_voxels, session.zscore is not None))
    _write_motion(session, out_dir / "motion.tsv")
    decodable = stack_betas([b for b in finals if b.decodable], n_voxels)
    if len(decodable) >= 2:
        ZScore.from_betas(decodable).save(out_dir / "zscore.npz")
    if session.zscore is not None and session.zscore.count:
        session.zscore.save(out_dir / "normalisation.npz")
    summary = {
        "n_runs": len(session.runs),
        "n_volumes": sum(len(run.motion) for run in session.runs.values()),
        "n_trials": len(finals),
        "n_online": sum(b is not None for b in online_rows),
        "normalisation": None if session.zscore is None else session.zscore.method,
        "n_voxels": n_voxels,
        "n_flagged_volumes": sum(v.flagged for run in session.runs.values() for v in run.motion),
        "problems": session.problems,
        "settings": settings,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def _beta_arrays(
    finals: list[TrialBeta], online_rows: list[TrialBeta | None], n_voxels: int, zscored: bool
) -> dict[str, np.ndarray]:
    def rows(betas: list[TrialBeta | None], field: str) -> np.ndarray:
        missing = np.full(n_voxels, np.nan, np.float32)
        values = [missing if b is None or getattr(b, field) is None else getattr(b, field) for b in betas]
        return np.stack(values).astype(np.float32) if values else np.zeros((0, n_voxels), np.float32)

    arrays = {"final": rows(finals, "beta"), "online": rows(online_rows, "beta")}
    if zscored:
        arrays |= {"final_zscored": rows(finals, "zscored"), "online_zscored": rows(online_rows, "zscored")}
    return arrays | {
        "trial_ids": np.array([b.event.trial_id for b in finals], dtype=str),
        "run_index": np.array([b.run_index for b in finals], dtype=np.int64),
        "onset_s": np.array([b.event.onset_s for b in finals]),
        "duration_s": np.array([b.event.duration_s for b in finals]),
        "stimulus_ids": np.array([b.event.stimulus_id or "" for b in finals], dtype=str),
        "decodable": np.array([b.decodable for b in finals], dtype=bool),
        "online_n_frames": np.array([-1 if b is None else b.n_frames for b in online_rows], dtype=np.int64),
    }


def _write_motion(session: SessionBetas, path: Path) -> None:
    header = ["run", "volume", *MOTION_PARAMETER_NAMES, "fd_mm", "flagged"]
    lines = ["\t".join(header)]
    for run_index, run in sorted(session.runs.items()):
        for v in run.motion:
            params = "\t".join(f"{p:.6g}" for p in v.motion_params)
            lines.append(f"{run_index}\t{v.volume_index}\t{params}\t{v.fd_mm:.4f}\t{int(v.flagged)}")
    path.write_text("\n".join(lines) + "\n")


def read_events(paths: list[Path]) -> dict[int, list[TrialEvent]]:
    """Events of recorded runs: the n-th file is run n. Bad lines are logged and skipped."""
    by_run = {}
    for run_index, path in enumerate(paths, start=1):
        if not Path(path).is_file():
            raise EventError(f"events file not found: {path}")
        reader = EventsTsv(Path(path))
        events, errors = reader.poll()
        last_events, last_errors = reader.flush()
        events, errors = events + last_events, errors + last_errors
        for error in errors:
            log.warning("%s", error)
        by_run[run_index] = events
    return by_run


def preprocess_recorded(
    session: SessionBetas, raw_dir: Path, events: dict[int, list[TrialEvent]], scanner: ScannerConfig, quarantine: Path
) -> None:
    """Run ``session`` over every volume already in ``raw_dir`` through the live ingest code, then end the runs."""
    from rtdecode.ingest.pipeline import END, Ingestor

    for run_index, run_events in events.items():
        session.add_events(run_index, run_events)
    ingestor = Ingestor(raw_dir, scanner.model_copy(update={"existing_files": "ingest"}), quarantine).start()
    ingestor.stop()  # it ingests what is there first, then ends
    n_frames: dict[int, int] = {}
    with tqdm(desc="volumes", unit="vol", disable=None) as progress:
        while (item := ingestor.output.get()) is not END:
            if isinstance(item, Volume):
                session.add_volume(item)
                n_frames[item.run_index] = max(n_frames.get(item.run_index, 0), item.volume_index + 1)
                progress.update()
            elif item.kind in (IngestEventKind.QUARANTINED, IngestEventKind.MISSING, IngestEventKind.FAILED):
                session.report(item.describe())
    ingestor.join()
    if events and sorted(events) != sorted(n_frames):
        session.report(
            f"{len(events)} events file(s) for {len(n_frames)} run(s) ingested (runs {sorted(n_frames)}): "
            "the n-th file is run n, so events may belong to another run (an aborted or restarted series "
            "counts as a run)"
        )
    for run_index in sorted(set(n_frames) | set(events)):
        session.end_run(run_index, n_frames.get(run_index))
