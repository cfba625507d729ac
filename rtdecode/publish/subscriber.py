"""The Python client of the display protocol (tests, the operator display, the benchmark).

A :class:`Subscriber` receives live messages of chosen topics. After :meth:`Subscriber.catch_up` (the late-join
recipe of docs/protocol.md) it also keeps the stream whole: duplicates of the snapshot are dropped, a restarted
daemon (new ``stream``) is followed, and a jump in a topic's ``seq`` (messages lost while the subscription was
being set up, or dropped because the client fell behind) triggers a fresh snapshot that fills the hole when the
publisher still keeps the missing messages.

One Subscriber belongs to one thread (ZeroMQ sockets are not thread-safe).
"""

import collections
import logging
import time
from collections.abc import Iterable
from types import TracebackType

import zmq
from zmq.utils.monitor import recv_monitor_message

from rtdecode.errors import ConfigError, ProtocolError, SecurityError
from rtdecode.publish import keys, protocol

log = logging.getLogger(__name__)

RESYNC_TIMEOUT_S = 2.0  # how long a gap-filling snapshot may take before the gap is accepted
_HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


class Subscriber:
    """Subscribes to ``topics`` (all if None) of the publisher at ``publish_endpoint``.

    ``snapshot_endpoint`` is needed for :meth:`snapshot` and :meth:`catch_up`; ``curve`` makes both connections
    CURVE clients. Without :meth:`catch_up`, :meth:`receive` returns every live message of the topics as it comes.
    """

    def __init__(
        self,
        publish_endpoint: str,
        snapshot_endpoint: str | None = None,
        *,
        topics: Iterable[str] | None = None,
        context: zmq.Context | None = None,
        curve: keys.CurveClient | None = None,
    ) -> None:
        self.publish_endpoint = publish_endpoint
        self.snapshot_endpoint = snapshot_endpoint
        self.topics = protocol.TOPICS if topics is None else tuple(protocol.check_topic(t) for t in topics)
        self.resyncs = 0  # fresh snapshots taken to fill a gap in seq
        self.n_lost = 0  # messages known lost: seq gaps no snapshot could fill
        self._curve = curve
        self._owns_context = context is None
        self._context = zmq.Context() if context is None else context
        self._tracking = False
        self._stream: str | None = None
        self._marks: dict[str, int] = {}
        self._pending: collections.deque[protocol.Message] = collections.deque()
        self._handshake_done = False
        self._closed = False
        self._sub = self._context.socket(zmq.SUB)
        self._monitor = self._sub.get_monitor_socket(events=_HANDSHAKE_EVENTS)
        try:
            self._connect(self._sub, publish_endpoint, "publish_endpoint")
        except BaseException:
            self.close()
            raise
        for topic in self.topics:
            self._sub.subscribe(topic.encode("ascii"))

    def receive(self, timeout_s: float) -> protocol.Message | None:
        """The next message of the subscribed topics, or None when none comes within ``timeout_s``.

        A message that breaks the protocol (e.g. a newer schema) raises ProtocolError.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            if self._pending:
                return self._pending.popleft()
            remaining_ms = max(0.0, deadline - time.monotonic()) * 1000.0
            if not self._sub.poll(remaining_ms):
                return None
            message = protocol.decode(self._sub.recv_multipart())
            if self._accept(message):
                return message

    def snapshot(self, timeout_s: float) -> list[protocol.Message]:
        """The publisher's kept history of the subscribed topics, oldest first (does not change what
        :meth:`receive` returns). TimeoutError naming the endpoint when no reply comes in ``timeout_s``."""
        return [message for message in self._request_snapshot(timeout_s).messages if message.topic in self.topics]

    def catch_up(self, timeout_s: float) -> list[protocol.Message]:
        """Join late: wait for the live connection, take a snapshot, return its messages of the subscribed topics,
        and from now on let :meth:`receive` drop live duplicates of them (and refill gaps).

        SecurityError when the publisher refuses this client's key; TimeoutError when nothing answers in time.
        """
        deadline = time.monotonic() + timeout_s
        self._wait_handshake(deadline)
        snapshot = self._request_snapshot(max(0.0, deadline - time.monotonic()))
        self._tracking = True
        self._stream = None
        self._pending.clear()
        self._apply(snapshot, count_lost=False)
        caught_up = list(self._pending)
        self._pending.clear()
        return caught_up

    def close(self) -> None:
        """Close the sockets (linger 0), and the context if this subscriber made it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._sub.disable_monitor()
        self._monitor.close(linger=0)
        self._sub.close(linger=0)
        if self._owns_context:
            self._context.term()

    def __enter__(self) -> "Subscriber":
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, traceback: TracebackType | None) -> None:
        self.close()

    def _connect(self, socket: zmq.Socket, endpoint: str, name: str) -> None:
        if self._curve is not None:
            self._curve.apply(socket)
        try:
            socket.connect(endpoint)
        except zmq.ZMQError as err:
            raise ConfigError(f"cannot connect to {name} {endpoint!r}: {err}") from None

    def _accept(self, message: protocol.Message, *, resync: bool = True) -> bool:
        """Whether to hand ``message`` out now; may queue a refill from a fresh snapshot instead."""
        if message.topic not in self.topics:
            return False
        if not self._tracking:
            return True
        if message.stream != self._stream:
            log.info("publisher stream changed from %s to %s (daemon restarted)", self._stream, message.stream)
            self._stream, self._marks = message.stream, {}
        mark = self._marks.get(message.topic, 0)
        if message.seq <= mark:
            return False
        if message.seq > mark + 1 and resync and self.snapshot_endpoint is not None:
            self._resync()
            if self._accept(message, resync=False):
                self._pending.append(message)
            return False
        if message.seq > mark + 1:
            self.n_lost += message.seq - mark - 1
            log.warning("lost %d %s message(s) before seq %d", message.seq - mark - 1, message.topic, message.seq)
        self._marks[message.topic] = message.seq
        return True

    def _resync(self) -> None:
        self.resyncs += 1
        try:
            snapshot = self._request_snapshot(RESYNC_TIMEOUT_S)
        except (TimeoutError, ProtocolError) as err:
            log.warning("cannot refill a gap in the stream from %s: %s", self.snapshot_endpoint, err)
            return
        self._apply(snapshot, count_lost=True)

    def _apply(self, snapshot: protocol.Snapshot, *, count_lost: bool) -> None:
        """Queue the snapshot's messages not yet handed out and mark the snapshot's seqs as seen; with
        ``count_lost``, count the messages between the last one handed out and the snapshot's oldest as lost."""
        if snapshot.stream != self._stream:
            self._stream, self._marks = snapshot.stream, {}
        if count_lost:
            self.n_lost += _n_missing(snapshot, self._marks, self.topics)
        for message in snapshot.messages:
            if message.topic in self.topics and message.seq > self._marks.get(message.topic, 0):
                self._pending.append(message)
        for topic in self.topics:
            if topic in snapshot.seq:
                self._marks[topic] = max(self._marks.get(topic, 0), snapshot.seq[topic])

    def _request_snapshot(self, timeout_s: float) -> protocol.Snapshot:
        if self.snapshot_endpoint is None:
            raise ConfigError("this Subscriber was made without a snapshot_endpoint; give one to ask for snapshots")
        socket = self._context.socket(zmq.DEALER)
        try:
            self._connect(socket, self.snapshot_endpoint, "snapshot_endpoint")
            socket.send(protocol.SNAPSHOT_REQUEST)
            if not socket.poll(timeout_s * 1000.0):
                raise TimeoutError(
                    f"no snapshot from {self.snapshot_endpoint} within {timeout_s:g} s "
                    "(publisher not running, wrong endpoint, or CURVE keys refused)"
                )
            return protocol.decode_snapshot(socket.recv_multipart())
        finally:
            socket.close(linger=0)

    def _wait_handshake(self, deadline: float) -> None:
        """Wait until the live connection is up, so the subscription reaches the publisher before the snapshot."""
        last_failure = ""
        while not self._handshake_done:
            remaining_ms = max(0.0, deadline - time.monotonic()) * 1000.0
            if not self._monitor.poll(remaining_ms):
                raise TimeoutError(f"no connection to {self.publish_endpoint} in time{last_failure}")
            event = recv_monitor_message(self._monitor)
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._handshake_done = True
            else:
                _raise_security_failure(self.publish_endpoint, event["event"], event["value"])
                last_failure = f" (last handshake failed: {zmq.Event(event['event']).name}, value {event['value']})"


def _n_missing(snapshot: protocol.Snapshot, marks: dict[str, int], topics: tuple[str, ...]) -> int:
    """Messages of ``topics`` after ``marks`` that the snapshot no longer keeps (published, then dropped)."""
    n_missing = 0
    for topic in topics:
        if topic not in snapshot.seq:
            continue
        mark = marks.get(topic, 0)
        kept = [message.seq for message in snapshot.messages if message.topic == topic and message.seq > mark]
        first_kept = kept[0] if kept else snapshot.seq[topic] + 1
        n_missing += max(0, first_kept - mark - 1)
    return n_missing


def _raise_security_failure(endpoint: str, event: int, value: int) -> None:
    """A SecurityError for handshake failures that retrying cannot cure: a refused key, CURVE on one side only."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        raise SecurityError(
            f"{endpoint} refused this client's CURVE key (ZAP status {value}): "
            "its public key is not in the publisher's authorised folder"
        )
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
        raise SecurityError(
            f"{endpoint} uses another security mechanism than this client (CURVE on one side only): "
            "give the client CURVE keys, or connect to a loopback publisher without them"
        )
