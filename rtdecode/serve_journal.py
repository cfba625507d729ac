"""The daemon's crash journal: per run, the volumes it processed, the live events it received and what it published.

One append-only JSON-lines file per run, ``<session>/serve/run-NN.jsonl``. Every line is written and flushed to
the operating system before the daemon goes on, so a killed daemon (``kill -9``) loses nothing that was
journaled; the files are synced to disk every few seconds and when a run ends. Entries (``kind``):

* ``run``: the run's series number, when the run is first seen;
* ``volume``: a volume was processed (its index); ``event``: a stimulus event that came over ZeroMQ (events read
  from files are read again from the files after a restart);
* ``sending`` then ``sent``: a message of a trial (its ``key``, e.g. ``image`` or ``beta:online``) is about to be
  published, and was published. After a restart, a ``sent`` key is not published again; a ``sending`` key
  without its ``sent`` (the daemon died between the two) is published again with ``repeat: true``, so a display
  that did receive it knows it is the same trial. ``sent`` means handed to ZeroMQ, whose I/O thread writes it
  out a moment later: a key journaled as sent within :data:`UNCONFIRMED_S` of the journal's last entry counts as
  ``sending`` after a restart (published again, flagged), since a ``kill -9`` in that moment loses the message;
* ``run_ended``.

On restart the daemon reads the files back (:meth:`ServeJournal.restore`), ingests the run's files again from the
start to rebuild the motion, GLM and normalisation state (the chain is deterministic), and publishes only what
was not published before.
"""

import dataclasses
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, TextIO

from rtdecode.errors import StoreError
from rtdecode.records import TrialEvent

log = logging.getLogger(__name__)

_RUN_FILE = re.compile(r"run-(\d+)\.jsonl")
SYNC_INTERVAL_S = 5.0
UNCONFIRMED_S = 1.0  # a message journaled as sent this long before a crash may not have left ZeroMQ's queue


@dataclasses.dataclass
class RunState:
    """What the journal says about one run."""

    series: int | None = None
    volumes: set[int] = dataclasses.field(default_factory=set)
    events: list[TrialEvent] = dataclasses.field(default_factory=list)
    sending: set[tuple[str, str]] = dataclasses.field(default_factory=set)  # (trial_id, key)
    sent: set[tuple[str, str]] = dataclasses.field(default_factory=set)
    publishing: set[tuple[str, str]] = dataclasses.field(default_factory=set)  # live only: being sent right now
    ended: bool = False
    sent_at_s: dict[tuple[str, str], float] = dataclasses.field(default_factory=dict)  # restored: journal time
    last_entry_s: float | None = None  # restored: the time of the file's last entry

    def doubt_sent_after(self, since_s: float) -> None:
        """Count the messages journaled as sent after ``since_s`` (wall clock) as ``sending`` again: they are
        published once more, flagged ``repeat``."""
        doubtful = {key for key, sent_s in self.sent_at_s.items() if sent_s > since_s}
        self.sent -= doubtful
        self.sending |= doubtful


class ServeJournal:
    """The journal files of one session's serve folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._files: dict[int, TextIO] = {}
        self._last_sync_s = time.monotonic()

    def path(self, run: int) -> Path:
        return self.folder / f"run-{run:02d}.jsonl"

    def restore(self, unconfirmed_s: float = UNCONFIRMED_S) -> dict[int, RunState]:
        """Every run's state as journaled (empty for a new session). StoreError names an unreadable file.

        A last line cut by a crash is removed from the file (it never happened), so new entries start on a line
        of their own. Messages journaled as sent less than ``unconfirmed_s`` before the last entry of all runs
        (about when the daemon died) count as ``sending``."""
        runs = {}
        for path in sorted(self.folder.glob("run-*.jsonl")):
            match = _RUN_FILE.fullmatch(path.name)
            if match:
                _drop_torn_line(path)
                runs[int(match.group(1))] = _read_run(path)
        last_entry_s = max(
            (state.last_entry_s for state in runs.values() if state.last_entry_s is not None), default=None
        )
        if last_entry_s is not None:
            for state in runs.values():
                state.doubt_sent_after(last_entry_s - unconfirmed_s)
        return runs

    def set_aside(self, run: int) -> Path:
        """Rename ``run``'s journal (it belongs to another series than the files now say); return its new path."""
        handle = self._files.pop(run, None)
        if handle is not None:
            handle.close()
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = self.path(run).with_name(f"run-{run:02d}.set-aside-{stamp}.jsonl")
        self.path(run).rename(aside)
        return aside

    def run_started(self, run: int, series: int) -> None:
        self._append(run, {"kind": "run", "series": series})

    def volume(self, run: int, volume: int) -> None:
        self._append(run, {"kind": "volume", "volume": volume})

    def event(self, run: int, event: TrialEvent) -> None:
        self._append(run, {"kind": "event", **dataclasses.asdict(event)})

    def sending(self, run: int, trial_id: str, key: str) -> None:
        self._append(run, {"kind": "sending", "trial_id": trial_id, "key": key})

    def sent(self, run: int, trial_id: str, key: str) -> None:
        self._append(run, {"kind": "sent", "trial_id": trial_id, "key": key})

    def run_ended(self, run: int) -> None:
        self._append(run, {"kind": "run_ended"})
        self._sync(run)

    def close(self) -> None:
        for run in list(self._files):
            self._sync(run)
            self._files.pop(run).close()

    def _append(self, run: int, entry: dict[str, Any]) -> None:
        handle = self._files.get(run)
        if handle is None:
            handle = self._files[run] = open(self.path(run), "a", encoding="utf-8")  # noqa: SIM115 (kept open)
        handle.write(json.dumps({"t": round(time.time(), 3), **entry}) + "\n")
        handle.flush()  # in the OS's hands: survives the process being killed
        if time.monotonic() - self._last_sync_s > SYNC_INTERVAL_S:
            for open_run in self._files:
                self._sync(open_run)

    def _sync(self, run: int) -> None:
        handle = self._files.get(run)
        if handle is not None:
            handle.flush()
            os.fsync(handle.fileno())
        self._last_sync_s = time.monotonic()


def _drop_torn_line(path: Path) -> None:
    """Cut the file back to its last newline (a crash can leave half a line)."""
    content = path.read_bytes()
    if content and not content.endswith(b"\n"):
        kept = content[: content.rfind(b"\n") + 1]
        log.warning("%s: last line incomplete (a crash while writing it); removed", path)
        with open(path, "r+b") as handle:
            handle.truncate(len(kept))


def _read_run(path: Path) -> RunState:
    state = RunState()
    with open(path, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            _apply(state, json.loads(line))
        except (ValueError, KeyError, TypeError) as error:
            raise StoreError(f"{path} line {number}: not a journal entry ({error}); move the file aside") from None
    return state


def _apply(state: RunState, entry: dict[str, Any]) -> None:
    kind = entry["kind"]
    if "t" in entry:
        state.last_entry_s = float(entry["t"])
    if kind == "run":
        state.series = int(entry["series"])
    elif kind == "volume":
        state.volumes.add(int(entry["volume"]))
    elif kind == "event":
        fields = {name: entry[name] for name in ("trial_id", "onset_s", "duration_s", "stimulus_id")}
        state.events.append(TrialEvent(**fields))
    elif kind == "sending":
        state.sending.add((entry["trial_id"], entry["key"]))
    elif kind == "sent":
        state.sent.add((entry["trial_id"], entry["key"]))
        if state.last_entry_s is not None:
            state.sent_at_s[(entry["trial_id"], entry["key"])] = state.last_entry_s
    elif kind == "run_ended":
        state.ended = True
