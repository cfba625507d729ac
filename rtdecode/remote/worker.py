"""The GPU side of the decode link: a decode worker takes jobs from a dispatcher and streams results back.

:func:`run_worker` connects a DEALER to the dispatcher's ROUTER, offers itself (``ready``), and runs each job
through a handler that yields result parts one by one (a quick retrieval part, later an image part). Each part is
sent the moment it is yielded, then a final part closes the job. The handler runs in its own thread so that
heartbeats keep flowing during a long generation; only the worker loop's thread touches the network socket (the
handler thread hands its parts over an in-process ZeroMQ pair).

When the dispatcher falls silent for ``dispatcher_timeout_s`` the worker drops its connection and opens a fresh
one; when a dispatcher (the same, or a restarted one with a new instance id) answers again, or tells it that it
does not know it, the worker announces itself again.
"""

import itertools
import logging
import os
import queue
import socket as _socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import zmq

from rtdecode.errors import ConfigError, ProtocolError
from rtdecode.remote import wire
from rtdecode.remote.wire import Job

log = logging.getLogger(__name__)

Handler = Callable[[Job], Iterator[tuple[dict, bytes]]]
STOP_CHECK_S = 0.1  # how often the loop looks at the stop event, at the latest
MAX_ERROR_CHARS = 500
PASS_ON_TIMEOUT_MS = 1000  # a handler thread whose worker loop has stopped gives up sending after this
_PAIR_NUMBERS = itertools.count()


def run_worker(
    endpoint: str,
    handler: Handler,
    *,
    stop: threading.Event,
    context: zmq.Context | None = None,
    curve_client: Any = None,
    heartbeat_s: float = 0.5,
    dispatcher_timeout_s: float = 3.0,
    name: str | None = None,
) -> int:
    """Serve jobs from the dispatcher at ``endpoint`` until ``stop`` is set; return how many jobs were finished.

    Parameters
    ----------
    endpoint : str
        The dispatcher's ROUTER, e.g. ``tcp://scanner-host:5560``.
    handler : callable
        ``handler(job)`` yields ``(header, payload)`` result parts; a handler exception becomes a final error
        part (``{"error": "ExcType: message"}``) and the worker goes on with the next job.
    stop : threading.Event
        Set it to leave: the worker says ``bye`` so the dispatcher gives its job (if any) to another worker.
    curve_client : object with ``apply(socket)``, optional
        Makes the DEALER a CURVE client (applied before connect).
    heartbeat_s, dispatcher_timeout_s : float
        Heartbeat interval, and the dispatcher silence after which the worker reconnects.
    name : str, optional
        Shown in the dispatcher's logs and status and in every part (default: host-pid-random).
    """
    if not heartbeat_s > 0:
        raise ConfigError(f"decode worker heartbeat_s must be > 0; got {heartbeat_s!r}")
    if not dispatcher_timeout_s > heartbeat_s:
        raise ConfigError(
            f"decode worker dispatcher_timeout_s must be longer than heartbeat_s={heartbeat_s}; "
            f"got {dispatcher_timeout_s!r}"
        )
    name = name or f"{_socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
    link = _DispatcherLink(endpoint, context or zmq.Context.instance(), curve_client, name)
    return _WorkerLoop(link, handler, stop, heartbeat_s, dispatcher_timeout_s).run()


class _DispatcherLink:
    """The DEALER to the dispatcher; :meth:`reconnect` replaces it with a fresh one (a new identity)."""

    def __init__(self, endpoint: str, context: zmq.Context, curve_client: Any, name: str) -> None:
        self.endpoint = endpoint
        self.name = name
        self.context = context
        self._curve_client = curve_client
        self.socket = self._connect()

    def send(self, frames: list[bytes]) -> None:
        try:
            self.socket.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            log.debug("decode worker %s dropped a %s message: no room to queue it", self.name, frames[0])

    def reconnect(self) -> None:
        self.socket.close(linger=0)
        self.socket = self._connect()

    def close(self, linger_ms: int) -> None:
        self.socket.close(linger=linger_ms)

    def _connect(self) -> zmq.Socket:
        socket = self.context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        if self._curve_client is not None:
            self._curve_client.apply(socket)
        socket.connect(self.endpoint)
        return socket


class _WorkerLoop:
    """One worker's state: the jobs it holds, its offers (``idle_seq``) and what it last heard."""

    def __init__(
        self, link: _DispatcherLink, handler: Handler, stop: threading.Event, heartbeat_s: float, timeout_s: float
    ) -> None:
        self.link = link
        self.handler = handler
        self.stop = stop
        self.heartbeat_s = heartbeat_s
        self.dispatcher_timeout_s = timeout_s
        self.held: list[Job] = []  # received, not finished; the first is running
        self.idle_seq = 0
        self.n_done = 0
        self.instance: str | None = None
        self.heard_s = time.monotonic()
        self.outage_logged = False
        self.jobs: queue.Queue[Job | None] = queue.Queue()

    def run(self) -> int:
        parts_in, parts_out = _inproc_pair(self.link.context)
        thread = threading.Thread(
            target=_serve_jobs, args=(self.handler, self.jobs, parts_out), name=f"decode-{self.link.name}", daemon=True
        )
        thread.start()
        log.info("decode worker %s connecting to %s", self.link.name, self.link.endpoint)
        self.link.send(wire.encode_ready(self.link.name, self.idle_seq))
        try:
            self._loop(parts_in)
        finally:
            self.link.send(wire.encode_bye(self.link.name))
            self.link.close(linger_ms=int(1000 * self.dispatcher_timeout_s))
            self.jobs.put(None)
            thread.join(self.heartbeat_s)  # a handler still running is left behind (a daemon thread)
            parts_in.close(linger=0)
            log.info("decode worker %s stopped after %d jobs", self.link.name, self.n_done)
        return self.n_done

    def _loop(self, parts_in: zmq.Socket) -> None:
        next_heartbeat_s = time.monotonic()
        while not self.stop.is_set():
            poller = zmq.Poller()
            poller.register(parts_in, zmq.POLLIN)
            poller.register(self.link.socket, zmq.POLLIN)
            timeout_s = min(STOP_CHECK_S, max(0.0, next_heartbeat_s - time.monotonic()))
            events = dict(poller.poll(timeout_s * 1000))
            if parts_in in events:
                self._forward_parts(parts_in)
            if self.link.socket in events:
                self._receive_all()
            if time.monotonic() >= next_heartbeat_s:
                self._heartbeat()
                next_heartbeat_s = time.monotonic() + self.heartbeat_s

    def _forward_parts(self, parts_in: zmq.Socket) -> None:
        while True:
            try:
                frames = parts_in.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.link.send(frames)
            if wire.decode(frames, sender="worker").header["final"]:
                self._finish_job()

    def _finish_job(self) -> None:
        job = self.held.pop(0)
        self.n_done += 1
        log.info("decode worker %s finished job %s (attempt %d)", self.link.name, job.job_id, job.attempt)
        if not self.held:
            self.idle_seq += 1
            self.link.send(wire.encode_ready(self.link.name, self.idle_seq))

    def _receive_all(self) -> None:
        while True:
            try:
                frames = self.link.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                message = wire.decode(frames, sender="dispatcher")
            except ProtocolError as error:
                log.warning("decode worker %s ignored a malformed message: %s", self.link.name, error)
                continue
            self._heard_from_dispatcher()
            if message.kind == "job":
                self._on_job(message)
            else:
                self._on_heartbeat(message.header["instance"], message.header["known"])

    def _heard_from_dispatcher(self) -> None:
        self.heard_s = time.monotonic()
        if self.outage_logged:
            log.info("decode worker %s hears the dispatcher at %s again", self.link.name, self.link.endpoint)
            self.outage_logged = False

    def _on_job(self, message: wire.Message) -> None:
        job = wire.job_from_message(message)
        self.instance = message.header["instance"]
        if self.held:
            log.warning("decode worker %s got job %s while busy; it waits its turn", self.link.name, job.job_id)
        log.info("decode worker %s received job %s (attempt %d)", self.link.name, job.job_id, job.attempt)
        self.held.append(job)
        self.jobs.put(job)

    def _on_heartbeat(self, instance: str, known: bool) -> None:
        if instance != self.instance:
            log.info("decode worker %s reached dispatcher instance %s", self.link.name, instance)
            self.instance = instance
            self._announce()
        elif not known:
            self._announce()

    def _announce(self) -> None:
        """Offer (again) to take a job; a busy worker offers itself when its job is done."""
        if not self.held:
            self.link.send(wire.encode_ready(self.link.name, self.idle_seq))

    def _heartbeat(self) -> None:
        silent_s = time.monotonic() - self.heard_s
        if silent_s > self.dispatcher_timeout_s:
            self._reconnect(silent_s)
        held = [(job.job_id, job.attempt) for job in self.held]
        self.link.send(wire.encode_worker_heartbeat(self.link.name, held))

    def _reconnect(self, silent_s: float) -> None:
        if not self.outage_logged:
            log.warning(
                "decode worker %s: dispatcher at %s silent for %.1f s (dispatcher_timeout_s=%.1f); reconnecting",
                self.link.name,
                self.link.endpoint,
                silent_s,
                self.dispatcher_timeout_s,
            )
            self.outage_logged = True
        self.link.reconnect()
        self.instance = None
        self.heard_s = time.monotonic()
        self._announce()


def _inproc_pair(context: zmq.Context) -> tuple[zmq.Socket, zmq.Socket]:
    """Two connected PAIR sockets: the loop reads from the first, the handler thread writes to the second."""
    address = f"inproc://rtdecode-worker-parts-{os.getpid()}-{next(_PAIR_NUMBERS)}-{uuid.uuid4().hex[:8]}"
    parts_in = context.socket(zmq.PAIR)
    parts_in.bind(address)
    parts_out = context.socket(zmq.PAIR)
    parts_out.connect(address)
    return parts_in, parts_out


def _serve_jobs(handler: Handler, jobs: "queue.Queue[Job | None]", parts_out: zmq.Socket) -> None:
    """The handler thread: run each job, pass its parts on as frames, until a None job (or the loop is gone)."""
    parts_out.setsockopt(zmq.SNDTIMEO, PASS_ON_TIMEOUT_MS)
    try:
        while (job := jobs.get()) is not None:
            for frames in _result_frames(handler, job):
                parts_out.send_multipart(frames)
    except zmq.Again:
        log.debug("decode worker loop gone; a handler that finished late stops here")
    finally:
        parts_out.close(linger=0)


def _result_frames(handler: Handler, job: Job) -> Iterator[list[bytes]]:
    """Every part ``handler(job)`` yields as it comes, then a final part (an error part if the handler raised)."""
    try:
        for result in handler(job):
            fields, payload = _checked_result(result)
            yield wire.encode_part(job.job_id, job.attempt, fields, payload, final=False)
    except Exception as error:
        log.exception("decode handler failed on job %s (attempt %d)", job.job_id, job.attempt)
        message = f"{type(error).__name__}: {error}"[:MAX_ERROR_CHARS]
        yield wire.encode_part(job.job_id, job.attempt, {"error": message}, b"", final=True)
        return
    yield wire.encode_part(job.job_id, job.attempt, {}, b"", final=True)


def _checked_result(result: Any) -> tuple[dict, bytes]:
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], dict)):
        raise TypeError(f"a decode handler must yield (header dict, payload bytes) pairs; got {result!r:.80}")
    if not isinstance(result[1], bytes | bytearray | memoryview):
        raise TypeError(f"a decode handler's payload must be bytes; got {type(result[1]).__name__}")
    return result
