"""What the operator display shows, kept up to date from the daemon's messages (docs/protocol.md).

:class:`DisplayState` consumes protocol messages in whatever order a real stream gives them (a late joiner's
snapshot first, then live messages; a restarted daemon comes back with a new ``stream``) and keeps:

* the current run, the latest decoded trial and the trials of the run (image and preview bytes in memory, for the
  newest :data:`MAX_TRIALS` trials);
* the motion trace per run (6 parameters, framewise displacement, the daemon's ``flagged`` verdict);
* per-stage latency on the daemon's clock (``timestamps`` against ``published_s``) and the decode workers'
  ``timings_ms``: recent values, median and 95th percentile;
* problems: ingest reports (missing, quarantined, late, duplicate volumes...), skipped and failed trials, errors;
* health: the last status's counts and state, plus what only a client can see: silence (no message for
  :data:`SILENT_AFTER_HEARTBEATS` heartbeat periods, the period estimated from the heartbeats), a growing backlog,
  no decode worker while trials need one, a refused connection.

Pictures are kept in the encodings a browser shows (:data:`CONTENT_TYPES`: jpeg, png); docs/protocol.md lets new
payload encodings appear within a schema version, so a picture in any other encoding is skipped (logged at debug
level), the rest of its message is used.

:meth:`DisplayState.to_json` is what the page draws (images by URL, never bytes). One thread writes (the ZeroMQ
receiver), many read (the HTTP server): every method takes the state's lock, and :meth:`DisplayState.wait_changed`
lets a reader sleep until the ``version`` counter moves. Times given as ``received_s`` / ``now_s`` are the
receiving host's ``time.monotonic()`` (tests pass them explicitly).
"""

import collections
import dataclasses
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import quote

import numpy as np

from rtdecode.publish.protocol import Message

log = logging.getLogger(__name__)

MAX_TRIALS = 200  # trials kept (with their image bytes); older ones leave the gallery
MAX_IMAGE_BYTES = 256 * 1024 * 1024  # image and preview bytes kept at most (PNG at 768 px is ~1 MB a picture)
MAX_LATENCY_SAMPLES = 200  # per stage: median and p95 are over these
N_RECENT_LATENCIES = 60  # per stage: values sent to the page for its sparkline
MAX_PROBLEMS = 200
MAX_LOG_LINES = 50
MAX_RUNS_KEPT = 16  # runs whose motion trace is kept
N_HEARTBEAT_GAPS = 10  # heartbeat gaps the period estimate is the median of
DEFAULT_HEARTBEAT_S = 1.0
SILENT_AFTER_HEARTBEATS = 3.0  # no message for this many heartbeat periods: the daemon or the link is down
MIN_SILENT_S = 1.0  # ... and for at least this long (a very fast heartbeat would make network jitter look silent)
ERROR_HOLD_S = 30.0  # an error status keeps the health red this long (then it stays in the problems list)
BACKLOG_WINDOW = 10  # heartbeats over which the backlog is watched
BACKLOG_GROWTH = 2  # the backlog rose by this many trials within the window: growing
IMAGE_KINDS = ("image", "preview")
CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png"}
DECODED_TOPICS = ("retrieval", "preview", "caption", "image")
CLOSE_TO_PUBLISHED = ("volume", "beta", "retrieval", "preview", "caption", "image")
PROBLEM_EVENTS = ("missing", "late", "out_of_order", "duplicate", "quarantined", "tr_mismatch", "failed")
HEALTH_FIELDS = (
    "state",
    "current_run",
    "subject",
    "session",
    "n_volumes",
    "n_betas",
    "n_trials_decoded",
    "n_trials_skipped",
    "n_trials_failed",
    "n_problems",
    "backlog",
    "backlog_peak",
    "workers",
    "in_flight",
    "last_volume_age_s",
)
STAGE_LABELS = {
    "volume": "file close \u2192 volume",
    "beta": "file close \u2192 beta",
    "retrieval": "file close \u2192 retrieval",
    "preview": "file close \u2192 preview",
    "caption": "file close \u2192 caption",
    "image": "file close \u2192 image",
    "decode": "queued \u2192 image received",
}
WORKER_PREFIX = "worker "
MOTION_PARAMS = ("trans_x_mm", "trans_y_mm", "trans_z_mm", "rot_x_rad", "rot_y_rad", "rot_z_rad")


def stage_latencies_ms(message: Message) -> dict[str, float]:
    """Where the time went for one message, in milliseconds on the daemon's clock.

    ``<topic>``: file close (the ``seen`` stamp of the volume that completed it) -> published, for volumes, online
    betas and decoded parts (final betas are re-estimated at the end of the run, off the real-time path: none);
    ``decode``: ``queued`` -> ``result_received`` for an image (the backlog wait plus decoding on a worker).
    """
    header = message.header
    stamps, published_s = header.get("timestamps"), header.get("published_s")
    if not isinstance(stamps, Mapping) or not _is_number(published_s):
        return {}
    if message.topic == "beta" and header.get("version") != "online":
        return {}
    latencies = {}
    if message.topic in CLOSE_TO_PUBLISHED and _is_number(stamps.get("seen")):
        latencies[message.topic] = round((published_s - stamps["seen"]) * 1000.0, 3)
    queued_s, received_s = stamps.get("queued"), stamps.get("result_received")
    if message.topic == "image" and _is_number(queued_s) and _is_number(received_s):
        latencies["decode"] = round((received_s - queued_s) * 1000.0, 3)
    return latencies


def worker_timings_ms(message: Message) -> dict[str, float]:
    """The decode worker's own ``timings_ms`` (stage -> ms, the worker's clock) of a decoded part."""
    timings = message.header.get("timings_ms")
    if not isinstance(timings, Mapping):
        return {}
    return {str(stage): float(ms) for stage, ms in timings.items() if _is_number(ms)}


def image_tag(version: int, instance: str) -> str:
    """The ``v`` of a picture's URL: the state ``version`` it arrived at, after the state's ``instance`` id (so a
    URL names the same bytes for ever, and the server may let the browser cache it for good)."""
    return f"{instance}-{version}"


def image_url(run: int, trial_id: str, kind: str, version: int, instance: str) -> str:
    """The page's URL of one trial's picture (``kind`` image or preview); ``version`` changes when it is replaced,
    ``instance`` (:attr:`DisplayState.instance`) from one display process to the next."""
    return f"/image/{run}/{quote(trial_id, safe='')}/{kind}?v={image_tag(version, instance)}"


@dataclasses.dataclass(frozen=True)
class StoredImage:
    """One picture as published: its bytes, encoding (jpeg/png) and the state version it arrived at."""

    payload: bytes
    encoding: str
    version: int
    width: int | None = None
    height: int | None = None

    @property
    def content_type(self) -> str:
        """The HTTP Content-Type of the payload."""
        return CONTENT_TYPES[self.encoding]


@dataclasses.dataclass
class TrialView:
    """What the display knows about one trial: its beta's ids and whatever decoded parts came."""

    run: int
    trial_id: str
    order: int
    stimulus_id: str | None = None
    decodable: bool = True
    caption: str | None = None
    matches: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    images: dict[str, StoredImage] = dataclasses.field(default_factory=dict)
    latencies_ms: dict[str, float] = dataclasses.field(default_factory=dict)
    timings_ms: dict[str, float] = dataclasses.field(default_factory=dict)
    parts: list[str] = dataclasses.field(default_factory=list)
    worker: str | None = None
    attempt: int | None = None
    outcome: str | None = None  # "skipped" or "failed"
    outcome_text: str | None = None

    @property
    def image_bytes(self) -> int:
        """Bytes of the pictures kept for this trial."""
        return sum(len(image.payload) for image in self.images.values())

    def to_json(self, instance: str) -> dict[str, Any]:
        """What the page shows of this trial; pictures as URLs (``instance``: :attr:`DisplayState.instance`)."""
        urls = {
            f"{kind}_url": image_url(self.run, self.trial_id, kind, self.images[kind].version, instance)
            if kind in self.images
            else None
            for kind in IMAGE_KINDS
        }
        return {
            "run": self.run,
            "trial_id": self.trial_id,
            "stimulus_id": self.stimulus_id,
            "caption": self.caption,
            "matches": list(self.matches),
            **urls,
            "parts": list(self.parts),
            "worker": self.worker,
            "attempt": self.attempt,
            "outcome": self.outcome,
            "outcome_text": self.outcome_text,
            "latencies_ms": dict(self.latencies_ms),
        }


class LatencySeries:
    """The recent values of one stage's latency and their median / 95th percentile."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.n_values = 0
        self.values: collections.deque[float] = collections.deque(maxlen=MAX_LATENCY_SAMPLES)

    def add(self, value_ms: float) -> None:
        self.values.append(value_ms)
        self.n_values += 1

    def to_json(self, key: str) -> dict[str, Any]:
        """``key``, label, count, median, p95, last and recent values (ms)."""
        values = list(self.values)
        median_ms, p95_ms = np.percentile(values, [50, 95]).tolist()
        return {
            "key": key,
            "label": self.label,
            "n": self.n_values,
            "median_ms": round(median_ms, 3),
            "p95_ms": round(p95_ms, 3),
            "last_ms": values[-1],
            "recent_ms": values[-N_RECENT_LATENCIES:],
        }


@dataclasses.dataclass(frozen=True)
class MotionPoint:
    """One volume of the motion trace: the six parameters, framewise displacement, the daemon's flag."""

    params: tuple[float, ...]
    fd_mm: float
    flagged: bool


class DisplayState:
    """The operator display's model of the session, fed with protocol messages (see the module docstring).

    ``fd_threshold_mm`` (the ``[preprocess]`` setting; messages carry only the ``flagged`` verdict) is drawn on
    the FD plot when given. ``clock`` gives the receiving host's monotonic seconds. :attr:`instance` is a random id
    of this state, part of its picture URLs.
    """

    def __init__(
        self,
        *,
        fd_threshold_mm: float | None = None,
        max_trials: int = MAX_TRIALS,
        max_image_bytes: int = MAX_IMAGE_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.fd_threshold_mm = fd_threshold_mm
        self.max_trials = max_trials
        self.max_image_bytes = max_image_bytes
        self._clock = clock
        self.instance = secrets.token_hex(4)
        self._changed = threading.Condition()
        self._version = 0
        self._created_s = clock()
        self._last_received_s: float | None = None
        self._stream: str | None = None
        self._n_restarts = 0
        self._n_messages = 0
        self._run: int | None = None
        self._status: dict[str, Any] = {}
        self._last_kind: str | None = None
        self._heartbeat_gaps_s: collections.deque[float] = collections.deque(maxlen=N_HEARTBEAT_GAPS)
        self._last_heartbeat_s: float | None = None
        self._backlogs: collections.deque[int] = collections.deque(maxlen=BACKLOG_WINDOW)
        self._last_error: tuple[float, str] | None = None
        self._trials: collections.OrderedDict[tuple[int, str], TrialView] = collections.OrderedDict()
        self._n_trials_made = 0
        self._image_bytes = 0
        self._latest: tuple[int, str] | None = None
        self._motion: dict[int, dict[int, MotionPoint]] = {}
        self._latency: dict[str, LatencySeries] = {}
        self._problems: collections.deque[dict[str, Any]] = collections.deque(maxlen=MAX_PROBLEMS)
        self._counts: collections.Counter[str] = collections.Counter()
        self._log: collections.deque[dict[str, Any]] = collections.deque(maxlen=MAX_LOG_LINES)
        self._link: dict[str, Any] = {"state": "connecting", "text": "not connected yet", "n_lost": 0}
        self._health_key: tuple = ()

    # -- writers ----------------------------------------------------------------------------------------------

    def apply(self, message: Message, received_s: float | None = None) -> None:
        """Take one message into the state (``received_s``: when it arrived, default now)."""
        received_s = self._clock() if received_s is None else received_s
        with self._changed:
            self._last_received_s = received_s
            self._n_messages += 1
            self._follow_stream(message)
            try:
                self._APPLY[message.topic](self, message, received_s)
            except (KeyError, TypeError, ValueError) as err:
                log.warning("%s seq %s not understood: %r", message.topic, message.header.get("seq"), err)
                self._problem("protocol", f"{message.topic} message not understood: {err!r}", message.header)
            self._health_key = self._health_signature(received_s)
            self._bump()

    def apply_all(self, messages: Iterable[Message], received_s: float | None = None) -> None:
        """:meth:`apply` each message, in order."""
        for message in messages:
            self.apply(message, received_s)

    def note_link(self, link_state: str, text: str, *, n_lost: int = 0) -> None:
        """The receiver's view of the connection: ``connecting``, ``connected`` or ``failed`` (a refused key, a
        newer protocol: health goes red), with a line for the operator and the messages known lost."""
        link = {"state": link_state, "text": text, "n_lost": n_lost}
        with self._changed:
            if link != self._link:
                if n_lost > self._link["n_lost"]:
                    self._counts["messages_lost"] = n_lost
                self._link = link
                self._bump()

    def note_problem(self, kind: str, text: str) -> None:
        """A problem seen by the receiver itself (e.g. a message that broke the protocol)."""
        with self._changed:
            self._problem(kind, text, {})
            self._bump()

    def tick(self, now_s: float | None = None) -> bool:
        """Re-evaluate what depends on time alone (silence, how long an error keeps the health red); moves the
        version when the health changed, so readers redraw. Returns whether it changed."""
        now_s = self._clock() if now_s is None else now_s
        with self._changed:
            key = self._health_signature(now_s)
            if key == self._health_key:
                return False
            self._health_key = key
            self._bump()
            return True

    # -- readers ----------------------------------------------------------------------------------------------

    @property
    def version(self) -> int:
        """A counter that moves whenever what :meth:`to_json` returns changed."""
        with self._changed:
            return self._version

    def wait_changed(self, version: int, timeout_s: float) -> int:
        """Wait until :attr:`version` differs from ``version`` (or ``timeout_s`` passed); returns the version."""
        with self._changed:
            self._changed.wait_for(lambda: self._version != version, timeout=timeout_s)
            return self._version

    def image(self, run: int, trial_id: str, kind: str) -> StoredImage | None:
        """A kept picture of a trial (``kind`` image or preview), or None."""
        with self._changed:
            trial = self._trials.get((run, trial_id))
            return None if trial is None else trial.images.get(kind)

    def silent(self, now_s: float | None = None) -> bool:
        """Whether no message came for :data:`SILENT_AFTER_HEARTBEATS` heartbeat periods (and at least
        :data:`MIN_SILENT_S`; counted from the state's creation while nothing came yet)."""
        now_s = self._clock() if now_s is None else now_s
        with self._changed:
            return self._silent(now_s)

    def heartbeat_s(self) -> float:
        """The daemon's heartbeat period: the median gap between its last heartbeats, else 1 s."""
        with self._changed:
            return self._heartbeat_period_s()

    def to_json(self, now_s: float | None = None) -> dict[str, Any]:
        """Everything the page draws, as JSON-ready values (no image bytes: URLs)."""
        now_s = self._clock() if now_s is None else now_s
        with self._changed:
            latest = self._trials.get(self._latest) if self._latest is not None else None
            return {
                "version": self._version,
                "stream": self._stream,
                "n_restarts": self._n_restarts,
                "n_messages": self._n_messages,
                "run": self._shown_run(),
                "health": self._health_json(now_s),
                "latest": None if latest is None else latest.to_json(self.instance),
                "gallery": self._gallery_json(),
                "runs": self._runs_json(),
                "motion": self._motion_json(),
                "latency": self._latency_json(),
                "problems": {"counts": dict(self._counts), "items": list(reversed(self._problems))},
                "log": list(reversed(self._log)),
            }

    # -- messages ---------------------------------------------------------------------------------------------

    def _follow_stream(self, message: Message) -> None:
        stream = message.header.get("stream")
        if stream == self._stream:
            return
        if self._stream is not None:
            self._n_restarts += 1
            self._heartbeat_gaps_s.clear()
            self._last_heartbeat_s = None
            self._backlogs.clear()
            self._add_log(message.header, "stream", f"new daemon stream {stream} (the daemon restarted)")
        self._stream = stream

    def _on_status(self, message: Message, received_s: float) -> None:
        header = message.header
        kind = str(header.get("kind"))
        self._last_kind = kind
        self._status.update({name: header[name] for name in HEALTH_FIELDS if name in header})
        if header.get("current_run") is not None:
            self._run = int(header["current_run"])
        if kind == "heartbeat":
            self._on_heartbeat(header)
            return
        if kind == "run_started" and header.get("run") is not None:
            self._run = int(header["run"])
        self._add_log(header, kind, _status_text(header))
        if kind == "ingest" and header.get("event") in PROBLEM_EVENTS:
            self._on_ingest_problem(header)
        elif kind == "trial_skipped":
            self._on_trial_outcome(header, "skipped")
        elif kind == "error":
            self._last_error = (received_s, str(header.get("message") or "error"))
            if header.get("trial_id") is not None and header.get("run") is not None:
                self._on_trial_outcome(header, "failed")
            else:
                self._counts["errors"] += 1
                self._problem("error", str(header.get("message") or "error"), header)

    def _on_heartbeat(self, header: Mapping[str, Any]) -> None:
        published_s = header.get("published_s")
        if _is_number(published_s) and self._last_heartbeat_s is not None:
            gap_s = published_s - self._last_heartbeat_s
            if 0.0 < gap_s <= 60.0:
                self._heartbeat_gaps_s.append(gap_s)
        if _is_number(published_s):
            self._last_heartbeat_s = published_s
        if isinstance(header.get("backlog"), int):
            self._backlogs.append(header["backlog"])

    def _on_ingest_problem(self, header: Mapping[str, Any]) -> None:
        event = header["event"]
        volumes = [int(v) for v in header.get("volumes") or []]
        self._counts[event] += len(volumes) if volumes and event != "quarantined" else 1
        self._problem(event, _status_text(header), header)

    def _on_trial_outcome(self, header: Mapping[str, Any], outcome: str) -> None:
        text = str(header.get("message") or outcome)
        self._counts[f"trials_{outcome}"] += 1
        trial = self._trial(int(header["run"]), str(header["trial_id"]))
        trial.outcome, trial.outcome_text = outcome, text
        self._problem(f"trial_{outcome}", f"trial {header['trial_id']} {outcome}: {text}", header)

    def _on_volume(self, message: Message, received_s: float) -> None:
        header = message.header
        self._run = int(header["run"])
        self._add_latencies(stage_latencies_ms(message))
        if header.get("late"):
            self._add_log(header, "late", f"run {header['run']} volume {header['volume']} arrived late")
        if header.get("preprocessed") is False:
            self._counts["not_preprocessed"] += 1
            text = f"run {header['run']} volume {header['volume']}: motion correction refused it (not used)"
            self._problem("not_preprocessed", text, header)

    def _on_motion(self, message: Message, received_s: float) -> None:
        header = message.header
        run, volume = int(header["run"]), int(header["volume"])
        params = tuple(float(p) for p in header["params"])
        if len(params) != len(MOTION_PARAMS):
            raise ValueError(f"motion params must be {len(MOTION_PARAMS)} numbers, got {len(params)}")
        self._run = run
        self._motion.setdefault(run, {})[volume] = MotionPoint(params, float(header["fd_mm"]), bool(header["flagged"]))
        for old_run in sorted(self._motion)[:-MAX_RUNS_KEPT]:
            del self._motion[old_run]

    def _on_beta(self, message: Message, received_s: float) -> None:
        header = message.header
        trial = self._trial(int(header["run"]), str(header["trial_id"]))
        trial.stimulus_id = header.get("stimulus_id", trial.stimulus_id)
        trial.decodable = bool(header.get("decodable", True))
        latencies = stage_latencies_ms(message)
        trial.latencies_ms.update(latencies)
        self._add_latencies(latencies)

    def _on_part(self, message: Message, received_s: float) -> None:
        header, topic = message.header, message.topic
        key = (int(header["run"]), str(header["trial_id"]))
        trial = self._trial(*key)
        if header.get("stimulus_id") is not None:
            trial.stimulus_id = header["stimulus_id"]
        trial.worker, trial.attempt = header.get("worker", trial.worker), header.get("attempt", trial.attempt)
        if topic not in trial.parts:
            trial.parts.append(topic)
        if topic == "retrieval":
            trial.matches = _matches(header.get("matches"))
        elif topic == "caption":
            trial.caption = str(header.get("caption", ""))
        elif message.payload:
            self._store_image(trial, topic, message)
        latencies = stage_latencies_ms(message)
        trial.latencies_ms.update(latencies)
        self._add_latencies(latencies)
        self._add_worker_timings(trial, worker_timings_ms(message))
        self._latest = key
        self._evict(keep=key)

    _APPLY = {
        "status": _on_status,
        "volume": _on_volume,
        "motion": _on_motion,
        "beta": _on_beta,
        "retrieval": _on_part,
        "preview": _on_part,
        "caption": _on_part,
        "image": _on_part,
    }

    # -- helpers (called with the lock held) ------------------------------------------------------------------

    def _bump(self) -> None:
        self._version += 1
        self._changed.notify_all()

    def _trial(self, run: int, trial_id: str) -> TrialView:
        key = (run, trial_id)
        if key not in self._trials:
            self._n_trials_made += 1
            self._trials[key] = TrialView(run=run, trial_id=trial_id, order=self._n_trials_made)
            self._evict(keep=key)
        return self._trials[key]

    def _store_image(self, trial: TrialView, kind: str, message: Message) -> None:
        """Keep a picture in a known encoding; skip any other (new encodings may appear: docs/protocol.md)."""
        encoding = message.encoding
        if encoding not in CONTENT_TYPES:
            log.debug("%s of trial %s: payload encoding %r not shown", kind, trial.trial_id, encoding)
            return
        old = trial.images.get(kind)
        self._image_bytes -= 0 if old is None else len(old.payload)
        width, height = message.header.get("width"), message.header.get("height")
        trial.images[kind] = StoredImage(message.payload, encoding, self._version + 1, width, height)
        self._image_bytes += len(message.payload)

    def _evict(self, keep: tuple[int, str]) -> None:
        """Forget the oldest trials beyond the count or byte budget; never ``keep``, the one being filled (when it
        is the oldest, e.g. its image came late, the next oldest go)."""
        while len(self._trials) > self.max_trials or self._image_bytes > self.max_image_bytes:
            oldest = next((key for key in self._trials if key != keep), None)
            if oldest is None:
                return
            self._image_bytes -= self._trials.pop(oldest).image_bytes

    def _add_latencies(self, latencies: Mapping[str, float]) -> None:
        for stage, value_ms in latencies.items():
            self._series(stage, STAGE_LABELS.get(stage, stage)).add(value_ms)

    def _add_worker_timings(self, trial: TrialView, timings: Mapping[str, float]) -> None:
        """Each worker stage once per trial (the parts of one decoding pass share their timings)."""
        for stage, value_ms in timings.items():
            if stage in trial.timings_ms:
                continue
            trial.timings_ms[stage] = value_ms
            self._series(WORKER_PREFIX + stage, f"worker: {stage}").add(value_ms)

    def _series(self, key: str, label: str) -> LatencySeries:
        if key not in self._latency:
            self._latency[key] = LatencySeries(label)
        return self._latency[key]

    def _problem(self, kind: str, text: str, header: Mapping[str, Any]) -> None:
        item = {"kind": kind, "text": text, "time_unix_s": header.get("published_unix_s", time.time())}
        for name in ("run", "volumes", "trial_id", "file", "reason", "event"):
            if header.get(name) is not None:
                item[name] = header[name]
        self._problems.append(item)

    def _add_log(self, header: Mapping[str, Any], kind: str, text: str) -> None:
        self._log.append({"kind": kind, "text": text, "time_unix_s": header.get("published_unix_s", time.time())})

    def _shown_run(self) -> int | None:
        if self._run is not None:
            return self._run
        runs = [key[0] for key in self._trials] + list(self._motion)
        return max(runs) if runs else None

    def _heartbeat_period_s(self) -> float:
        if not self._heartbeat_gaps_s:
            return DEFAULT_HEARTBEAT_S
        return float(np.median(list(self._heartbeat_gaps_s)))

    def _silent(self, now_s: float) -> bool:
        since_s = self._created_s if self._last_received_s is None else self._last_received_s
        return now_s - since_s > max(MIN_SILENT_S, SILENT_AFTER_HEARTBEATS * self._heartbeat_period_s())

    def _backlog_growth(self) -> int:
        if not self._backlogs:
            return 0
        return self._backlogs[-1] - min(self._backlogs)

    def _health_reasons(self, now_s: float) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
        """``(red, amber)`` reasons, each ``{"code", "text"}``."""
        red, amber = [], []
        if self._link["state"] == "failed":
            red.append({"code": "link", "text": self._link["text"]})
        if self._silent(now_s):
            if self._last_received_s is None:
                red.append({"code": "silent", "text": "nothing received from the daemon yet"})
            else:
                age_s = now_s - self._last_received_s
                text = f"no message for {age_s:.1f} s (heartbeat every {self._heartbeat_period_s():.1f} s)"
                red.append({"code": "silent", "text": text})
        state = self._status.get("state")
        if state == "stopped":
            red.append({"code": "stopped", "text": "the daemon stopped"})
        if self._last_error is not None and now_s - self._last_error[0] <= ERROR_HOLD_S:
            red.append({"code": "error", "text": f"error: {self._last_error[1]}"})
        workers = self._workers_reason()
        if workers is not None:
            (red if workers[0] == "red" else amber).append(workers[1])
        if state == "stalled":
            age_s = self._status.get("last_volume_age_s")
            amber.append({"code": "stalled", "text": f"stalled: no volume for {age_s} s"})
        if self._backlog_growth() >= BACKLOG_GROWTH:
            text = f"backlog growing: {min(self._backlogs)} \u2192 {self._backlogs[-1]} trials waiting"
            amber.append({"code": "backlog", "text": text})
        if state in ("starting", "stopping"):
            amber.append({"code": state, "text": f"the daemon is {state}"})
        if self._last_received_s is None and not red:
            amber.append({"code": "connecting", "text": self._link["text"]})
        return red, amber

    def _workers_reason(self) -> tuple[str, dict[str, str]] | None:
        """No decode worker connected (the last status's ``workers`` is 0): red while trials need one (a run is
        open, or trials wait in the backlog), amber between runs; ``(level, reason)`` or None."""
        state, backlog = self._status.get("state"), self._status.get("backlog")
        if self._status.get("workers") != 0 or state in (None, "stopped"):
            return None
        backlog = backlog if _is_number(backlog) else 0
        if state in ("running", "stalled") or backlog > 0:
            waiting = f"{backlog} trial{'' if backlog == 1 else 's'} waiting"
            return "red", {"code": "workers", "text": f"no decode worker connected: {waiting}"}
        if state == "waiting":
            return "amber", {"code": "workers", "text": "no decode worker connected (needed when a run starts)"}
        return None

    def _health_signature(self, now_s: float) -> tuple:
        red, amber = self._health_reasons(now_s)
        return tuple(r["code"] for r in red), tuple(r["code"] for r in amber)

    def _health_json(self, now_s: float) -> dict[str, Any]:
        red, amber = self._health_reasons(now_s)
        level = "red" if red else "amber" if amber else "green"
        age_s = None if self._last_received_s is None else round(now_s - self._last_received_s, 3)
        return {
            "level": level,
            "reasons": red + amber,
            "silent": self._silent(now_s),
            "last_message_age_s": age_s,
            "heartbeat_s": round(self._heartbeat_period_s(), 3),
            "backlog_growing": self._backlog_growth() >= BACKLOG_GROWTH,
            "last_kind": self._last_kind,
            "link": dict(self._link),
            **{name: self._status.get(name) for name in HEALTH_FIELDS},
        }

    def _gallery_json(self) -> list[dict[str, Any]]:
        run = self._shown_run()
        trials = [trial for trial in self._trials.values() if trial.run == run and (trial.decodable or trial.parts)]
        return [trial.to_json(self.instance) for trial in sorted(trials, key=lambda trial: trial.order, reverse=True)]

    def _runs_json(self) -> list[dict[str, Any]]:
        counts = collections.Counter(run for run, _ in self._trials)
        runs = sorted(set(counts) | set(self._motion))
        return [
            {"run": run, "n_trials": counts.get(run, 0), "n_volumes": len(self._motion.get(run, {}))} for run in runs
        ]

    def _motion_json(self) -> dict[str, Any]:
        run = self._shown_run()
        points = sorted(self._motion.get(run, {}).items())
        return {
            "run": run,
            "volumes": [volume for volume, _ in points],
            "params": {name: [p.params[i] for _, p in points] for i, name in enumerate(MOTION_PARAMS)},
            "fd_mm": [p.fd_mm for _, p in points],
            "flagged": [volume for volume, p in points if p.flagged],
            "fd_threshold_mm": self.fd_threshold_mm,
        }

    def _latency_json(self) -> list[dict[str, Any]]:
        pipeline = [key for key in STAGE_LABELS if key in self._latency]
        workers = sorted(key for key in self._latency if key not in STAGE_LABELS)
        return [self._latency[key].to_json(key) for key in pipeline + workers]


def _matches(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise ValueError(f"retrieval 'matches' must be a list, got {type(value).__name__}")
    return [{"id": str(match["id"]), "score": float(match["score"])} for match in value]


def _status_text(header: Mapping[str, Any]) -> str:
    """One line for the operator from a status message."""
    kind = header.get("kind")
    if kind == "ingest":
        volumes = header.get("volumes") or []
        text = str(header.get("event")) + (f": run {header['run']}" if header.get("run") is not None else "")
        text += f" volume(s) {', '.join(str(v) for v in volumes)}" if volumes else ""
        text += f" \u2014 {header['reason']}" if header.get("reason") else ""
        text += f" ({header['file']})" if header.get("file") else ""
        return text
    if header.get("message"):
        return str(header["message"])
    if kind in ("run_started", "run_ended"):
        return f"run {header.get('run')} {'started' if kind == 'run_started' else 'ended'}"
    return str(kind)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
