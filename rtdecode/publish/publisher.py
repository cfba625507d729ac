"""The daemon's side of the display protocol: a PUB socket for live messages and a snapshot socket for late joiners.

Live messages go out on a PUB socket (a display that falls more than :data:`PUBLISH_SNDHWM` messages behind loses
the newest ones; per-topic ``seq`` lets it notice). The publisher keeps the last few messages of each topic
(:data:`DEFAULT_HISTORY`: the run's gallery and motion trace) and a background thread answers snapshot requests on
a ROUTER socket, so a display that joins late or reconnects catches up:

1. subscribe first;
2. send the single frame ``b"snapshot"`` (REQ or DEALER) and read the reply (history, oldest first, and the last
   ``seq`` of each topic at that moment);
3. drop live messages of the same ``stream`` whose ``seq`` is <= the snapshot's ``seq`` for their topic.

:class:`~rtdecode.publish.subscriber.Subscriber.catch_up` implements it for Python clients.
"""

import collections
import itertools
import json
import logging
import threading
from collections.abc import Iterable, Mapping
from types import MappingProxyType, TracebackType
from typing import Any

import zmq

from rtdecode.errors import ConfigError, ServeError
from rtdecode.publish import keys, protocol

log = logging.getLogger(__name__)

DEFAULT_HISTORY: Mapping[str, int] = MappingProxyType(
    {"status": 1, "volume": 1, "motion": 512, "beta": 1, "retrieval": 128, "preview": 128, "caption": 128, "image": 128}
)
PUBLISH_SNDHWM = 1000  # messages queued per display before the newest are dropped (about 130 MB of JPEGs)
PUBLISH_LINGER_MS = 1000  # at close, how long queued messages (the last status) may take to reach the displays
_POLL_MS = 100  # how often the snapshot thread looks for a stop request
_MAX_REASON_BYTES = 64


class Publisher:
    """Publishes protocol messages to displays and answers their snapshot requests.

    ``publish_endpoint`` and ``snapshot_endpoint`` are bound (``tcp://127.0.0.1:*`` picks a free port; the
    attributes of the same names hold the real endpoints afterwards). An endpoint that other hosts can reach needs
    ``curve`` (SecurityError otherwise) unless ``allow_insecure``. ``history`` overrides the number of messages kept
    per topic (:data:`DEFAULT_HISTORY`). :meth:`publish` may be called from several threads.
    """

    def __init__(
        self,
        publish_endpoint: str,
        snapshot_endpoint: str,
        *,
        context: zmq.Context | None = None,
        curve: keys.CurveServer | None = None,
        history: Mapping[str, int] | None = None,
        allow_insecure: bool = False,
    ) -> None:
        self.history_sizes = _history_sizes(history)
        keys.check_endpoint_security(
            "publish_endpoint", publish_endpoint, curve is not None, allow_insecure=allow_insecure
        )
        keys.check_endpoint_security(
            "snapshot_endpoint", snapshot_endpoint, curve is not None, allow_insecure=allow_insecure
        )
        self._owns_context = context is None
        self._context = zmq.Context() if context is None else context
        self._curve = curve
        self._lock = threading.Lock()
        self._sequencer = protocol.Sequencer()
        self._order = itertools.count()
        self._history = {topic: collections.deque(maxlen=n) for topic, n in self.history_sizes.items()}
        self._stop = threading.Event()
        self._closed = False
        self._sockets: list[zmq.Socket] = []
        try:
            self._pub = self._bind(zmq.PUB, publish_endpoint, "publish_endpoint")
            self._router = self._bind(zmq.ROUTER, snapshot_endpoint, "snapshot_endpoint")
        except BaseException:
            self._release()
            raise
        self.publish_endpoint = self._pub.get(zmq.LAST_ENDPOINT).decode()
        self.snapshot_endpoint = self._router.get(zmq.LAST_ENDPOINT).decode()
        self._thread = threading.Thread(target=self._serve_snapshots, name="rtdecode-snapshot", daemon=True)
        self._thread.start()
        log.info(
            "publishing on %s, snapshots on %s (stream %s)", self.publish_endpoint, self.snapshot_endpoint, self.stream
        )

    @property
    def stream(self) -> str:
        """This publisher instance's random stream id (in every header)."""
        return self._sequencer.stream

    def publish(self, topic: str, header: Mapping[str, Any], payload: bytes = b"") -> protocol.Message:
        """Stamp, send and keep (for snapshots) one message; returns the message as sent. Thread-safe.

        ``header`` holds the caller's fields for ``topic`` (docs/protocol.md); a non-empty ``payload`` needs its
        ``payload`` description. A ProtocolError (unknown topic, NaN, reserved field) sends nothing.
        """
        with self._lock:
            if self._closed:
                raise ServeError(f"publisher on {self.publish_endpoint} is closed; cannot publish {topic!r}")
            message = self._sequencer.make(topic, header, payload)
            frames = protocol.encode(message)
            self._pub.send_multipart(frames, copy=False)
            self._history[topic].append((next(self._order), frames))
        return message

    def clear_history(self, topics: Iterable[str] | None = None) -> None:
        """Forget the kept messages of ``topics`` (all if None), e.g. the gallery at a new run. ``seq`` goes on."""
        names = protocol.TOPICS if topics is None else [protocol.check_topic(topic) for topic in topics]
        with self._lock:
            for topic in names:
                self._history[topic].clear()

    def close(self) -> None:
        """Stop the snapshot thread, close the sockets (the PUB socket lingers :data:`PUBLISH_LINGER_MS` for what
        is still queued, the snapshot socket not at all) and the context if this publisher made it. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        self._thread.join()
        self._release()
        log.info("publisher on %s closed (stream %s)", self.publish_endpoint, self.stream)

    def __enter__(self) -> "Publisher":
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, traceback: TracebackType | None) -> None:
        self.close()

    def _bind(self, kind: int, endpoint: str, name: str) -> zmq.Socket:
        socket = self._context.socket(kind)
        self._sockets.append(socket)
        if kind == zmq.PUB:
            socket.set(zmq.SNDHWM, PUBLISH_SNDHWM)
        if self._curve is not None:
            self._curve.apply(socket)
        try:
            socket.bind(endpoint)
        except zmq.ZMQError as err:
            raise ServeError(f"cannot bind {name} {endpoint}: {err}") from None
        return socket

    def _release(self) -> None:
        for socket in self._sockets:
            socket.close(linger=PUBLISH_LINGER_MS if socket.type == zmq.PUB else 0)
        self._sockets.clear()
        if self._owns_context:  # a caller's context may have other CURVE sockets that need its ZAP handler
            if self._curve is not None:
                self._curve.release(self._context)
            self._context.term()

    def _serve_snapshots(self) -> None:
        while not self._stop.is_set():
            try:
                if self._router.poll(_POLL_MS):
                    self._answer(self._router.recv_multipart())
            except zmq.ZMQError as err:
                log.error("snapshot socket %s failed: %s", self.snapshot_endpoint, err)
                return
            except Exception:
                log.exception("snapshot request on %s could not be answered", self.snapshot_endpoint)

    def _answer(self, frames: list[bytes]) -> None:
        """Reply to one request; the envelope (client identity, and REQ's empty delimiter) is echoed back."""
        envelope, body = frames[:1], frames[1:]
        if len(body) > 1 and body[0] == b"":
            envelope, body = envelope + [b""], body[1:]
        if body == [protocol.SNAPSHOT_REQUEST]:
            reply = self._snapshot_frames()
        else:
            request = b"|".join(body)[:_MAX_REASON_BYTES]
            reply = protocol.error_reply(
                f"unknown request {request!r}; send the single frame {protocol.SNAPSHOT_REQUEST!r}"
            )
        self._router.send_multipart(envelope + reply, copy=False)

    def _snapshot_frames(self) -> list[bytes]:
        with self._lock:
            kept = sorted(itertools.chain.from_iterable(self._history.values()), key=lambda entry: entry[0])
            last_seq = self._sequencer.last_seq
        log.debug("snapshot: %d messages, seq %s", len(kept), json.dumps(last_seq))
        return protocol.snapshot_reply(self.stream, last_seq, [frames for _, frames in kept])


def _history_sizes(history: Mapping[str, int] | None) -> dict[str, int]:
    """:data:`DEFAULT_HISTORY` with the caller's overrides, checked."""
    sizes = dict(DEFAULT_HISTORY)
    for topic, n_messages in (history or {}).items():
        protocol.check_topic(topic)
        if not isinstance(n_messages, int) or isinstance(n_messages, bool) or n_messages < 0:
            raise ConfigError(f"history[{topic!r}] must be a count >= 0, got {n_messages!r}")
        sizes[topic] = n_messages
    return sizes
