"""``rtdecode view --save DIR``: what arrives, written to a folder as it comes (headless use, a session's record).

Layout (each file flushed as it is written)::

    DIR/run-NN/<trial>.<jpg|png>          a trial's image
    DIR/run-NN/<trial>_preview.<jpg|png>  its low-level preview
    DIR/trials.jsonl   one line per decoded trial: ids, stimulus_id, caption, matches, image paths, worker,
                       latencies (file close -> published, ms on the daemon's clock) and the worker's timings
    DIR/motion.tsv     one row per volume: run, volume, the six motion parameters, fd_mm, flagged (0/1)
    DIR/status.jsonl   every status message except heartbeats, as published

A trial's parts come one by one (retrieval, preview, then caption and image); its line is written at the first
of: its image arrives; its run ends (a ``run_ended`` status or ingest report); another run starts; the daemon
says ``stopping`` or ``stopped``; :data:`PENDING_FLUSH_S` passed since its first part (checked as each message
arrives, heartbeats included); :data:`MAX_PENDING_TRIALS` newer trials are waiting; the saver closes. So a daemon
that makes no images (``[serve] reconstruct = false``) has its trials on disk within seconds.

A part that comes after its trial's line was written (an image slower than :data:`PENDING_FLUSH_S`) is not
dropped: the trial gets another line, the whole record again with the new part. **The last line of a trial is the
complete one**; readers keep the last line per ``(run, trial_id)``. A part the line already holds (a ``repeat``,
or the snapshot a restarted view catches up from) writes nothing: neither a line nor its picture again.

An existing folder is appended to: trials, volumes and statuses it already holds are not written again, so a view
restarted mid-run adds no duplicates. Trial ids become file names through :func:`safe_name`. Pictures in an
encoding other than jpeg or png (docs/protocol.md lets new ones appear) are not saved, silently (debug log); the
rest of the trial is. One thread writes (the receiver); :meth:`Saver.close` may come from another.
"""

import collections
import csv
import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

from rtdecode.errors import ConfigError
from rtdecode.file_integrity import write_atomically
from rtdecode.publish.protocol import Message
from rtdecode.view.state import DECODED_TOPICS, IMAGE_KINDS, MOTION_PARAMS, stage_latencies_ms, worker_timings_ms

log = logging.getLogger(__name__)

TRIALS_FILE = "trials.jsonl"
MOTION_FILE = "motion.tsv"
STATUS_FILE = "status.jsonl"
MOTION_COLUMNS = ("run", "volume", *MOTION_PARAMS, "fd_mm", "flagged")
EXTENSIONS = {"jpeg": "jpg", "png": "png"}
PREVIEW_SUFFIX = "_preview"
MAX_NAME_CHARS = 100
MAX_PENDING_TRIALS = 512
PENDING_FLUSH_S = 10.0  # a trial's line is written at the latest this long after its first part
RUN_END_EVENTS = ("run_ended",)  # status kinds / ingest events after which a run's trials are written
RUN_START_EVENTS = ("run_started",)  # ... after which the other runs' trials are written
STOP_KINDS = ("stopping", "stopped")  # status kinds after which every trial is written
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def safe_name(trial_id: str) -> str:
    """A file name for ``trial_id``: letters, digits, ``.``, ``_`` and ``-`` are kept, anything else becomes
    ``_``. When that changed the id (or it was empty, started with a dot, was too long, or ended like a preview's
    name), 8 hex digits of the id's SHA-1 are appended, so two ids never share a file."""
    name = _UNSAFE.sub("_", trial_id)[:MAX_NAME_CHARS].lstrip(".")
    if name != trial_id or not name or name.endswith(PREVIEW_SUFFIX):
        digest = hashlib.sha1(trial_id.encode("utf-8")).hexdigest()[:8]
        name = f"{name or 'trial'}-{digest}"
    return name


def image_path(run: int, trial_id: str, kind: str, encoding: str) -> Path:
    """Where a trial's ``image`` or ``preview`` goes, relative to the folder."""
    suffix = PREVIEW_SUFFIX if kind == "preview" else ""
    return Path(f"run-{run:02d}") / f"{safe_name(trial_id)}{suffix}.{EXTENSIONS[encoding]}"


class Saver:
    """Writes the messages given to :meth:`write` into ``folder`` (made if needed; see the module docstring).

    ``clock`` (monotonic seconds) and ``pending_flush_s`` time how long a trial's line may wait for its image.
    """

    def __init__(
        self,
        folder: Path,
        *,
        clock: Callable[[], float] = time.monotonic,
        pending_flush_s: float = PENDING_FLUSH_S,
    ) -> None:
        self.folder = Path(folder)
        self.pending_flush_s = pending_flush_s
        self._clock = clock
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"--save folder {self.folder} cannot be made: {err}") from None
        self._lock = threading.Lock()
        self._written_trials = read_saved_trials(self.folder)
        self._written_statuses = set(_read_records(self.folder / STATUS_FILE, lambda row: (row["stream"], row["seq"])))
        self._written_volumes = _read_motion_keys(self.folder / MOTION_FILE)
        self._pending: collections.OrderedDict[tuple[int, str], dict[str, Any]] = collections.OrderedDict()
        self._first_part_s: dict[tuple[int, str], float] = {}  # pending trials with a part: when it came
        self.n_images = 0
        self._closed = False
        self._trials_file = self._open(TRIALS_FILE)
        self._status_file = self._open(STATUS_FILE)
        new_motion = not (self.folder / MOTION_FILE).exists()
        self._motion_file = self._open(MOTION_FILE)
        self._motion = csv.writer(self._motion_file, delimiter="\t", lineterminator="\n")
        if new_motion:
            self._motion.writerow(MOTION_COLUMNS)
            self._motion_file.flush()

    def write(self, message: Message) -> None:
        """Write what ``message`` adds (images, a trial line, a motion row, a status line)."""
        with self._lock:
            if self._closed:
                return
            if message.topic == "status":
                self._status(message.header)
                self._flush_on_status(message.header)
            elif message.topic == "motion":
                self._motion_row(message.header)
            elif message.topic == "beta" or message.topic in DECODED_TOPICS:
                self._trial_part(message)
            due_s = self._clock() - self.pending_flush_s
            self._flush_where(lambda key: self._first_part_s[key] <= due_s)

    def close(self) -> None:
        """Write the trials still waiting for an image, and close the files. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            while self._pending:
                self._flush_trial(next(iter(self._pending)))
            for file in (self._trials_file, self._status_file, self._motion_file):
                file.close()

    def __enter__(self) -> "Saver":
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, traceback: TracebackType | None) -> None:
        self.close()

    def _open(self, name: str) -> TextIO:
        try:
            return open(self.folder / name, "a", encoding="utf-8", newline="")
        except OSError as err:
            raise ConfigError(f"--save: cannot write {self.folder / name}: {err}") from None

    def _status(self, header: dict[str, Any]) -> None:
        key = (header.get("stream"), header.get("seq"))
        if header.get("kind") == "heartbeat" or key in self._written_statuses:
            return
        self._written_statuses.add(key)
        _append_line(self._status_file, header)

    def _motion_row(self, header: dict[str, Any]) -> None:
        key = (int(header["run"]), int(header["volume"]))
        if key in self._written_volumes:
            return
        self._written_volumes.add(key)
        flagged = 1 if header.get("flagged") else 0
        self._motion.writerow(
            [*key, *(repr(float(p)) for p in header["params"]), repr(float(header["fd_mm"])), flagged]
        )
        self._motion_file.flush()

    def _flush_on_status(self, header: dict[str, Any]) -> None:
        """Write the trials a run's end, a new run or the daemon's stop leaves without more parts to wait for."""
        kind = header.get("kind")
        event = header.get("event") if kind == "ingest" else kind
        run = header.get("run")
        if event in RUN_END_EVENTS:
            self._flush_where(lambda key: run is None or key[0] == run)
        elif event in RUN_START_EVENTS:
            self._flush_where(lambda key: key[0] != run)
        elif kind in STOP_KINDS:
            self._flush_where(lambda key: True)

    def _trial_part(self, message: Message) -> None:
        header, topic = message.header, message.topic
        key = (int(header["run"]), str(header["trial_id"]))
        known = self._written_trials.get(key) or self._pending.get(key)
        if topic in IMAGE_KINDS and message.payload and not (known and topic in known["parts"]):
            self._save_image(key, message)  # a picture the trial already has (a repeat, a snapshot) is not rewritten
        if key in self._written_trials:
            self._late_part(key, message)
            return
        record = self._pending.get(key) or self._new_record(key, header)
        self._pending[key] = record
        self._merge(record, message)
        if topic in DECODED_TOPICS:
            self._first_part_s.setdefault(key, self._clock())
        if topic == "image":
            self._flush_trial(key)
        while len(self._pending) > MAX_PENDING_TRIALS:
            self._flush_trial(next(iter(self._pending)))

    def _late_part(self, key: tuple[int, str], message: Message) -> None:
        """A part of a trial whose line is written: a new line with it, unless the line already has it (or it is
        a beta: the final one comes at the end of the run)."""
        record = self._written_trials[key]
        if message.topic not in DECODED_TOPICS or message.topic in record["parts"]:
            return
        self._merge(record, message)
        _append_line(self._trials_file, record)

    def _new_record(self, key: tuple[int, str], header: dict[str, Any]) -> dict[str, Any]:
        return {
            "run": key[0],
            "trial_id": key[1],
            "subject": header.get("subject"),
            "session": header.get("session"),
            "stimulus_id": header.get("stimulus_id"),
            "caption": None,
            "matches": None,
            "image": None,
            "preview": None,
            "worker": None,
            "attempt": None,
            "parts": [],
            "latencies_ms": {},
            "timings_ms": {},
        }

    def _merge(self, record: dict[str, Any], message: Message) -> None:
        header, topic = message.header, message.topic
        record["latencies_ms"].update(stage_latencies_ms(message))
        if header.get("stimulus_id") is not None:
            record["stimulus_id"] = header["stimulus_id"]
        if topic == "beta":
            return
        if topic not in record["parts"]:
            record["parts"].append(topic)
        record["worker"], record["attempt"] = header.get("worker"), header.get("attempt")
        for stage, value_ms in worker_timings_ms(message).items():
            record["timings_ms"].setdefault(stage, value_ms)
        if topic == "retrieval":
            record["matches"] = header.get("matches")
        elif topic == "caption":
            record["caption"] = header.get("caption")
        elif message.payload and message.encoding in EXTENSIONS:
            record[topic] = image_path(record["run"], record["trial_id"], topic, message.encoding).as_posix()

    def _flush_trial(self, key: tuple[int, str]) -> None:
        """Write a pending trial's line if it got any decoded part (betas of trials never decoded are not trials
        here), and forget it as pending."""
        record = self._pending.pop(key)
        self._first_part_s.pop(key, None)
        if not record["parts"]:
            return
        self._written_trials[key] = record
        _append_line(self._trials_file, record)

    def _flush_where(self, chosen: Callable[[tuple[int, str]], bool]) -> None:
        """Write the pending trials that have a part and are ``chosen`` (oldest first); the others wait."""
        for key in [key for key in self._pending if key in self._first_part_s and chosen(key)]:
            self._flush_trial(key)

    def _save_image(self, key: tuple[int, str], message: Message) -> None:
        if message.encoding not in EXTENSIONS:
            log.debug("%s of trial %s: payload encoding %r not saved", message.topic, key, message.encoding)
            return
        path = self.folder / image_path(*key, message.topic, message.encoding)
        path.parent.mkdir(exist_ok=True)
        write_atomically(path, message.payload)  # a reader never sees half a picture
        self.n_images += 1


def _append_line(file: TextIO, value: dict[str, Any]) -> None:
    file.write(json.dumps(value, ensure_ascii=False, separators=(",", ":")) + "\n")
    file.flush()


def read_saved_trials(folder: Path) -> dict[tuple[int, str], dict[str, Any]]:
    """The trials a saver wrote into ``folder``, keyed by ``(run, trial_id)``: each trial's last line, the complete
    one (see the module docstring). Empty when there is no trials file yet."""
    return _read_records(Path(folder) / TRIALS_FILE, lambda row: (row["run"], row["trial_id"]))


def _read_records(path: Path, key_of: Callable[[dict[str, Any]], tuple]) -> dict[tuple, dict[str, Any]]:
    """The JSON lines already in ``path`` by their key, the last line of a key winning (a last line cut by a crash
    is skipped)."""
    if not path.exists():
        return {}
    records = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            record = json.loads(line)
            records[key_of(record)] = record
        except (ValueError, KeyError, TypeError):
            log.warning("%s line %d is not a complete record; ignored", path, number)
    return records


def _read_motion_keys(path: Path) -> set[tuple[int, int]]:
    if not path.exists():
        return set()
    keys = set()
    with open(path, encoding="utf-8", newline="") as file:
        for row in csv.DictReader(file, delimiter="\t"):
            try:
                keys.add((int(row["run"]), int(row["volume"])))
            except (ValueError, KeyError, TypeError):
                log.warning("%s: row %s is not a complete record; ignored", path, row)
    return keys
