"""Stimulus events: a BIDS ``events.tsv`` the stimulus program appends to, or live messages over ZeroMQ.

Both sources give :class:`~rtdecode.records.TrialEvent` records and report bad input as
:class:`~rtdecode.errors.EventError` values (returned, not raised, so one bad line does not stop a run).

``events.tsv`` (BIDS): tab-separated, a header line, then one line per trial. Columns ``onset`` and
``duration`` (seconds from the run's first volume) are required; ``trial_id`` is optional (default: the
1-based data line number); the stimulus comes from ``stim_file`` (BIDS) or ``stimulus_id``. ``n/a`` is
BIDS's empty value. Lines are read once they end in a newline, so a line being written is never half read
(:meth:`EventsTsv.flush` takes an unterminated last line once the file is known to be complete). The
program should only append; a file rewritten from scratch is read again from its start, rows identical to
ones already read are skipped, and a changed row comes back as a new event (which the GLM refuses as a
trial id used twice).

ZeroMQ: the stimulus program connects a PUSH socket to the GLM's PULL endpoint and sends two frames,
``[b"event", JSON]``, the JSON an object with ``trial_id``, ``onset_s``, ``duration_s`` and optionally
``stimulus_id`` and ``run`` (the run it belongs to, 1-based in the order of the session's runs: without it, the
daemon files the event under the run being acquired, which is wrong for an event sent before its run's first
volume arrived). :class:`EventSender` does exactly that.
"""

import json
import math
import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import zmq

from rtdecode.errors import EventError
from rtdecode.records import TrialEvent

EVENT_TOPIC = b"event"
STIMULUS_COLUMNS = ("stim_file", "stimulus_id")
MISSING = "n/a"


class UnknownStimulusError(EventError):
    """The event names a stimulus the session does not know: kept in the design, never decoded."""


def make_event(fields: Mapping[str, object], default_trial_id: str, where: str) -> TrialEvent:
    """A TrialEvent from named values (``onset``/``onset_s``, ``duration``/``duration_s``, ...).

    Raises EventError naming ``where`` and the field for a missing, non-numeric or non-finite onset, or
    a negative duration.
    """
    onset_s = _number(fields, ("onset_s", "onset"), where)
    duration_s = _number(fields, ("duration_s", "duration"), where)
    if duration_s < 0:
        raise EventError(f"{where}: duration {duration_s} s is negative")
    trial_id = fields.get("trial_id")
    trial_id = default_trial_id if trial_id in (None, "", MISSING) else str(trial_id)
    stimulus = next((fields[c] for c in STIMULUS_COLUMNS if fields.get(c) not in (None, "", MISSING)), None)
    return TrialEvent(trial_id, onset_s, duration_s, None if stimulus is None else str(stimulus))


def _number(fields: Mapping[str, object], names: tuple[str, ...], where: str) -> float:
    name = next((n for n in names if n in fields), names[-1])
    value = fields.get(name)
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise EventError(f"{where}: {name} must be a number of seconds, got {value!r}") from None
    if not math.isfinite(number):
        raise EventError(f"{where}: {name} must be finite, got {value!r}")
    return number


def check_event(event: TrialEvent, known_stimuli: Collection[str] | None, run_duration_s: float | None) -> None:
    """Raise for an event the session cannot decode: an unknown stimulus, or an onset outside the run.

    ``known_stimuli`` None accepts any stimulus; ``run_duration_s`` None skips the end check.
    """
    if event.onset_s < 0:
        raise EventError(f"trial {event.trial_id!r}: onset {event.onset_s} s is before the run started")
    if run_duration_s is not None and event.onset_s >= run_duration_s:
        raise EventError(
            f"trial {event.trial_id!r}: onset {event.onset_s} s is after the run's end ({run_duration_s} s)"
        )
    if known_stimuli is not None and event.stimulus_id not in known_stimuli:
        raise UnknownStimulusError(
            f"trial {event.trial_id!r}: stimulus {event.stimulus_id!r} is not among the session's "
            f"{len(known_stimuli)} known stimuli; the trial stays in the design but is not decoded"
        )


class EventsTsv:
    """Reads the lines appended to a BIDS ``events.tsv`` since the last :meth:`poll`.

    Parameters
    ----------
    path : Path
        May not exist yet; it is read once it does.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._consumed = b""  # every byte read so far, to notice a file rewritten from scratch
        self._pending = b""
        self._columns: list[str] | None = None
        self._line_number = 0
        self._seen: dict[str, TrialEvent] = {}

    def poll(self) -> tuple[list[TrialEvent], list[EventError]]:
        """New complete lines: (events, errors). A line seen before with the same content is skipped."""
        chunk = self._read_new()
        if not chunk:
            return [], []
        lines = (self._pending + chunk).split(b"\n")
        self._pending = lines.pop()
        return self._parse_lines(lines)

    def flush(self) -> tuple[list[TrialEvent], list[EventError]]:
        """Parse an unterminated last line, for a file that is complete (offline, or at run end)."""
        events, errors = self.poll()
        pending, self._pending = self._pending, b""
        more_events, more_errors = self._parse_lines([pending]) if pending.strip() else ([], [])
        return events + more_events, errors + more_errors

    def _parse_lines(self, lines: list[bytes]) -> tuple[list[TrialEvent], list[EventError]]:
        events, errors = [], []
        for raw in lines:
            self._line_number += 1
            try:
                event = self._parse(raw.decode("utf-8").rstrip("\r"))
            except (EventError, UnicodeDecodeError) as error:
                errors.append(error if isinstance(error, EventError) else EventError(f"{self._where()}: {error}"))
                continue
            if event is not None:
                events.append(event)
        return events, errors

    def _read_new(self) -> bytes:
        try:
            content = self.path.read_bytes()  # a few kB: reading it whole lets a rewrite be noticed
        except FileNotFoundError:
            return b""
        except OSError as error:  # a share hiccup, a permission: try again at the next poll
            raise EventError(f"{self.path}: cannot read ({error}); will try again") from None
        if not content.startswith(self._consumed):  # rewritten from scratch: start again
            self._consumed, self._pending, self._columns, self._line_number = b"", b"", None, 0
        chunk = content[len(self._consumed) :]
        self._consumed = content
        return chunk

    def _where(self) -> str:
        return f"{self.path}:{self._line_number}"

    def _parse(self, line: str) -> TrialEvent | None:
        if not line.strip():
            return None
        cells = line.split("\t")
        if self._columns is None:
            self._columns = [c.strip() for c in cells]
            missing = [c for c in ("onset", "duration") if c not in self._columns]
            if missing:
                self._columns = None
                raise EventError(f"{self._where()}: header lacks required column(s) {missing}; got {cells}")
            return None
        if len(cells) != len(self._columns):
            raise EventError(f"{self._where()}: {len(cells)} cells for {len(self._columns)} columns")
        event = make_event(dict(zip(self._columns, cells, strict=True)), str(self._line_number - 1), self._where())
        if self._seen.get(event.trial_id) == event:
            return None
        self._seen[event.trial_id] = event
        return event


RUN_IN_NAME = re.compile(r"run-(\d+)")


class EventsFolder:
    """The stimulus program's events files of a session, one per run, read as lines are appended.

    A file belongs to the run its name gives (``run-NN``, e.g. ``run-03_events.tsv`` or BIDS
    ``sub-01_task-x_run-3_events.tsv``); other files are ignored. Files may appear at any time.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._readers: dict[Path, tuple[int, EventsTsv]] = {}

    def poll(self) -> tuple[list[tuple[int, TrialEvent]], list[EventError]]:
        """New complete lines of every run's file: ([(run, event)], errors)."""
        self._discover()
        found, errors = [], []
        for run, reader in self._readers.values():
            events, run_errors = reader.poll()
            found += [(run, event) for event in events]
            errors += run_errors
        return found, errors

    def flush(self, run: int) -> tuple[list[TrialEvent], list[EventError]]:
        """Everything left in ``run``'s file, an unterminated last line included (the run has ended)."""
        self._discover()
        events, errors = [], []
        for reader_run, reader in self._readers.values():
            if reader_run == run:
                more_events, more_errors = reader.flush()
                events, errors = events + more_events, errors + more_errors
        return events, errors

    def _discover(self) -> None:
        if not self.folder.is_dir():
            return
        for path in self.folder.glob("*.tsv"):
            match = RUN_IN_NAME.search(path.name)
            if match and path not in self._readers:
                self._readers[path] = (int(match.group(1)), EventsTsv(path))


class EventReceiver:
    """A PULL socket the stimulus program sends events to.

    Parameters
    ----------
    endpoint : str
        e.g. ``tcp://127.0.0.1:5558``; bound by default (the stimulus program connects).
    context : zmq.Context, optional
    bind : bool
    curve : optional
        Makes the socket a CURVE server (``apply(socket)``); needed when the endpoint is beyond loopback.
    """

    def __init__(self, endpoint: str, context: zmq.Context | None = None, bind: bool = True, curve: Any = None) -> None:
        self._context = context or zmq.Context.instance()
        self._socket = self._context.socket(zmq.PULL)
        self._socket.setsockopt(zmq.LINGER, 0)
        if curve is not None:  # an object with apply(socket), e.g. rtdecode.publish.keys.CurveServer
            curve.apply(self._socket)
        (self._socket.bind if bind else self._socket.connect)(endpoint)
        self.endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._count = 0

    def poll(self, timeout_ms: int = 0) -> tuple[list[TrialEvent], list[EventError]]:
        """Every message waiting (waiting up to ``timeout_ms`` for the first): (events, errors)."""
        found, errors = self.poll_runs(timeout_ms)
        return [event for _, event in found], errors

    def poll_runs(self, timeout_ms: int = 0) -> tuple[list[tuple[int | None, TrialEvent]], list[EventError]]:
        """As :meth:`poll`, each event with the run its message names (None when it names none)."""
        found, errors = [], []
        while self._socket.poll(timeout_ms if not found and not errors else 0):
            frames = self._socket.recv_multipart()
            self._count += 1
            try:
                found.append(self._parse(frames))
            except EventError as error:
                errors.append(error)
        return found, errors

    def _parse(self, frames: list[bytes]) -> tuple[int | None, TrialEvent]:
        where = f"event message {self._count} on {self.endpoint}"
        if len(frames) != 2 or frames[0] != EVENT_TOPIC:
            raise EventError(f"{where}: expected frames [b'event', JSON], got {len(frames)} frame(s)")
        try:
            fields = json.loads(frames[1])
        except (UnicodeDecodeError, ValueError, RecursionError) as error:  # RecursionError: absurd nesting
            raise EventError(f"{where}: not JSON ({type(error).__name__}: {str(error)[:80]})") from None
        if not isinstance(fields, dict) or "trial_id" not in fields:
            raise EventError(f"{where}: expected a JSON object with trial_id, onset_s, duration_s")
        run = fields.get("run")
        if run is not None and (isinstance(run, bool) or not isinstance(run, int) or run < 1):
            raise EventError(f"{where}: run must be a run number from 1, got {run!r}")
        return run, make_event(fields, "", where)

    def close(self) -> None:
        self._socket.close(linger=0)


class EventSender:
    """The stimulus program's side: sends :class:`TrialEvent` records to an :class:`EventReceiver`."""

    def __init__(self, endpoint: str, context: zmq.Context | None = None) -> None:
        self._socket = (context or zmq.Context.instance()).socket(zmq.PUSH)
        self._socket.setsockopt(zmq.LINGER, 1000)
        self._socket.connect(endpoint)

    def send(self, event: TrialEvent, run: int | None = None) -> None:
        """Send one event; ``run`` (1-based, the order of the session's runs) says which run it belongs to."""
        fields = {
            "trial_id": event.trial_id,
            "onset_s": event.onset_s,
            "duration_s": event.duration_s,
            "stimulus_id": event.stimulus_id,
        }
        if run is not None:
            fields["run"] = run
        self._socket.send_multipart([EVENT_TOPIC, json.dumps(fields).encode()])

    def close(self) -> None:
        self._socket.close()
