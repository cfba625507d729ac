"""A calibration session's inputs: where they are, the trial log, the stimulus images, and which trials are
held out. Everything here is checked before any volume is motion-corrected, so a bad log or a missing image
stops calibration in seconds with the file named.

Defaults come from the session's folder in the store (``raw/``, ``events/*.tsv`` in run order, ``stimuli/``);
``[calibrate]`` keys and command flags override them. The events files are the BIDS ``events.tsv`` the live
daemon reads (:mod:`rtdecode.glm.events`), one per run (the n-th file is run n), plus an optional ``split``
column (``train``/``test``) that marks trials to hold out.
"""

import csv
import dataclasses
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rtdecode.config import Config
from rtdecode.errors import CalibrationError
from rtdecode.glm.events import EventsTsv
from rtdecode.store import Store

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SPLIT_COLUMN = "split"
SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class LoggedTrial:
    """One trial of the stimulus log. ``marked`` is the events file's split (None without the column)."""

    run: int
    trial_id: str
    onset_s: float
    duration_s: float
    stimulus_id: str
    marked: str | None = None


@dataclasses.dataclass(frozen=True)
class SessionInputs:
    """Where the session is, what was shown, and the image file of every stimulus."""

    subject: str
    session: int
    raw_dir: Path
    events: tuple[Path, ...]
    images_dir: Path
    trials: tuple[LoggedTrial, ...]
    images: dict[str, Path]

    @property
    def n_runs(self) -> int:
        return len(self.events)

    def run_trials(self, run: int) -> list[LoggedTrial]:
        return [t for t in self.trials if t.run == run]


def gather_inputs(config: Config, subject: str, session: int) -> SessionInputs:
    """Resolve, read and check the session's inputs (CalibrationError naming the file on any problem)."""
    settings = config.calibrate
    session_dir = Store(config.home).session_dir(subject, session)
    raw_dir = Path(settings.raw_dir or session_dir / "raw")
    images_dir = Path(settings.images_dir or session_dir / "stimuli")
    events = tuple(Path(p) for p in settings.events) or _events_in(session_dir / "events")
    if not raw_dir.is_dir():
        raise CalibrationError(f"raw folder {raw_dir} does not exist: give --raw DIR or set calibrate.raw_dir")
    if not events:
        raise CalibrationError(
            f"no events files: give --events FILE per run, set calibrate.events, or put run-NN_events.tsv files "
            f"in {session_dir / 'events'}"
        )
    trials = read_trials(events)
    images = find_images(images_dir, sorted({t.stimulus_id for t in trials}))
    return SessionInputs(subject, session, raw_dir, events, images_dir, tuple(trials), images)


def _events_in(folder: Path) -> tuple[Path, ...]:
    return tuple(sorted(folder.glob("*.tsv"))) if folder.is_dir() else ()


def read_trials(paths: Sequence[Path]) -> list[LoggedTrial]:
    """Every trial of every run's events file; the n-th file is run n. Any bad line stops calibration."""
    trials = []
    for run, path in enumerate(paths, start=1):
        trials += _read_run(Path(path), run)
    return trials


def _read_run(path: Path, run: int) -> list[LoggedTrial]:
    if not path.is_file():
        raise CalibrationError(f"events file of run {run} not found: {path}")
    reader = EventsTsv(path)
    events, errors = reader.poll()
    more, more_errors = reader.flush()
    errors += more_errors
    if errors:
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise CalibrationError(f"events file of run {run}: {errors[0]}{more}")
    events += more
    if not events:
        raise CalibrationError(f"events file of run {run}, {path}: no trials")
    marks = _split_column(path, len(events))
    trials = []
    for event, mark in zip(events, marks, strict=True):
        if event.stimulus_id is None:
            raise CalibrationError(
                f"{path}: trial {event.trial_id!r} names no stimulus (its stimulus_id / stim_file is empty or absent)"
            )
        trials.append(LoggedTrial(run, event.trial_id, event.onset_s, event.duration_s, event.stimulus_id, mark))
    _check_run(path, trials)
    return trials


def _split_column(path: Path, n_trials: int) -> list[str | None]:
    """The ``split`` value of each data line (None for every line when the column is absent)."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    if not rows or SPLIT_COLUMN not in rows[0]:
        return [None] * n_trials
    marks = [(row.get(SPLIT_COLUMN) or "").strip() for row in rows if any((v or "").strip() for v in row.values())]
    for line, mark in enumerate(marks, start=2):
        if mark not in SPLITS:
            raise CalibrationError(f"{path} line {line}: split must be 'train' or 'test', got {mark!r}")
    if len(marks) != n_trials:
        raise CalibrationError(f"{path}: {len(marks)} split values for {n_trials} trials")
    return marks


def _check_run(path: Path, trials: list[LoggedTrial]) -> None:
    repeated = [(trial_id, count) for trial_id, count in Counter(t.trial_id for t in trials).items() if count > 1]
    if repeated:
        trial_id, count = repeated[0]
        raise CalibrationError(f"{path}: trial id {trial_id!r} is used more than once ({count} times)")
    onsets = np.array([t.onset_s for t in trials])
    if np.any(onsets < 0):
        raise CalibrationError(f"{path}: onset {onsets.min()} s is before the run's first volume")
    if np.any(np.diff(onsets) < 0):
        raise CalibrationError(f"{path}: onsets are not in time order (a run's log must be appended in order)")


def find_images(folder: Path, stimulus_ids: Sequence[str]) -> dict[str, Path]:
    """The image file of every stimulus id: the id itself when it is a file name (BIDS ``stim_file``), else
    ``<id>.png`` (or .jpg/.jpeg); CalibrationError listing the missing."""
    if not folder.is_dir():
        raise CalibrationError(f"stimulus image folder {folder} does not exist: give --images DIR")
    found, missing = {}, []
    for stimulus_id in stimulus_ids:
        if "/" in stimulus_id or "\\" in stimulus_id or stimulus_id.startswith("."):
            raise CalibrationError(
                f"stimulus id {stimulus_id!r} is a path: ids must be file names in {folder} (no folders, no leading .)"
            )
        names = [stimulus_id] if stimulus_id.lower().endswith(IMAGE_SUFFIXES) else []
        names += [f"{stimulus_id}{suffix}" for suffix in IMAGE_SUFFIXES]
        path = next((folder / name for name in names if (folder / name).is_file()), None)
        if path is None:
            missing.append(stimulus_id)
        else:
            found[stimulus_id] = path
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise CalibrationError(f"{len(missing)} stimulus image(s) missing in {folder}: {shown} (<id>.png or .jpg)")
    return found


def heldout_mask(trials: Sequence[LoggedTrial], rule: str) -> tuple[np.ndarray, str]:
    """Which trials are held out for evaluation, and the rule used ("marked" or "repeated").

    marked: the events' split says test. repeated: every trial of an image shown more than once in the session
    (as NSD's shared images). auto: marked when any trial is marked, else repeated.
    """
    any_marked = any(t.marked is not None for t in trials)
    if rule == "auto":
        rule = "marked" if any_marked else "repeated"
    if rule == "marked":
        if not any_marked:
            raise CalibrationError("calibrate.heldout is 'marked' but no events file has a 'split' column")
        return np.array([t.marked == "test" for t in trials]), rule
    counts = Counter(t.stimulus_id for t in trials)
    return np.array([counts[t.stimulus_id] > 1 for t in trials]), rule


def check_split(trials: Sequence[LoggedTrial], heldout: np.ndarray, min_train_trials: int, rule: str) -> None:
    """Enough train trials to fine-tune (not counting those showing a held-out image: the trainer drops them) and
    at least 2 held-out images to evaluate on."""
    heldout_images = {t.stimulus_id for t, h in zip(trials, heldout, strict=True) if h}
    n_train = sum(not h and t.stimulus_id not in heldout_images for t, h in zip(trials, heldout, strict=True))
    n_images = len(heldout_images)
    if n_train < min_train_trials:
        raise CalibrationError(
            f"{n_train} train trials (held out by rule {rule!r}: {int(heldout.sum())}); calibration needs at least "
            f"calibrate.min_train_trials = {min_train_trials}"
        )
    if n_images < 2:
        raise CalibrationError(
            f"{n_images} held-out image(s) by rule {rule!r}: evaluation needs at least 2 (mark trials with "
            "split = test in the events files, or show some images more than once)"
        )


def check_repeats(trials: Sequence[LoggedTrial], min_images: int) -> None:
    """Voxels chosen by repeat reliability need at least ``min_images`` images shown twice or more."""
    counts = Counter(t.stimulus_id for t in trials)
    n_repeated = sum(count > 1 for count in counts.values())
    if n_repeated < min_images:
        raise CalibrationError(
            f"{n_repeated} image(s) shown more than once: choosing voxels by repeat reliability needs at least "
            f"{min_images}; supply a region mask (--mask) instead"
        )
