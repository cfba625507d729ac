"""The scanner side of the decode link: hands jobs from a :class:`~rtdecode.backlog.Backlog` to decode workers.

The dispatcher binds a ZeroMQ ROUTER; decode workers connect DEALERs (:func:`rtdecode.remote.worker.run_worker`).
A worker offers itself with ``ready`` and gets exactly one job per offer, so work goes to whichever worker is free.
Every part a worker sends back is passed to ``on_part`` (the daemon publishes from it), in arrival order.

Failure handling, all in one background thread that alone touches the socket:

- A worker silent for longer than ``worker_timeout_s`` (killed, hung, unplugged) is declared dead; its job goes
  back to the *front* of the backlog with ``attempt + 1``. After ``max_attempts`` the job is not tried again:
  ``on_part`` gets a final error part for it instead.
- Parts from a worker for a job it no longer holds (it was declared dead, then spoke again) are ignored, so no
  job gets two final parts.
- A worker the dispatcher does not know (after a dispatcher restart, or after being declared dead) gets a
  heartbeat with ``known=False`` and announces itself again.
- A ``ready`` repeating an offer already answered is ignored (``idle_seq``), so a re-announcement racing with a
  job hand-out never gives one worker two jobs.
"""

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import zmq

from rtdecode.backlog import Backlog
from rtdecode.errors import ConfigError, ProtocolError, ServeError
from rtdecode.remote import wire
from rtdecode.remote.wire import Job, JobPart

log = logging.getLogger(__name__)

MAX_MESSAGES_PER_ROUND = 1000  # then heartbeats and hand-outs get their turn


@dataclass
class _Worker:
    """What the dispatcher knows about one connected decode worker."""

    identity: bytes
    name: str
    last_seen_s: float
    offer_seq: int | None = None  # an offer (ready) not answered yet: the worker is free
    offered_s: float = 0.0  # when that offer came (the longest-free worker gets the next job)
    answered_seq: int | None = None  # the last offer a job was sent for
    job: Job | None = None
    job_sent_s: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.name} ({self.identity.hex()[:8]})"


class Dispatcher:
    """Load-balance jobs from ``backlog`` over decode workers connected to ``endpoint``; see the module doc.

    Parameters
    ----------
    endpoint : str
        Where to bind the ROUTER, e.g. ``tcp://*:5560`` or ``tcp://127.0.0.1:*`` (a free port; read
        :attr:`endpoint` after :meth:`start`).
    backlog : Backlog
        Holds :class:`~rtdecode.remote.wire.Job` items; the dispatcher takes from it and gives jobs back.
    on_part : callable
        Called with every :class:`~rtdecode.remote.wire.JobPart`, from the dispatcher thread.
    curve_server : object with ``apply(socket)``, optional
        Makes the ROUTER a CURVE server (applied before bind).
    heartbeat_s, worker_timeout_s : float
        Heartbeat interval, and the silence after which a worker is declared dead.
    max_attempts : int
        How many times one job is handed out before it is given up with an error part.
    """

    def __init__(
        self,
        endpoint: str,
        backlog: Backlog,
        on_part: Callable[[JobPart], None],
        *,
        context: zmq.Context | None = None,
        curve_server: Any = None,
        heartbeat_s: float = 0.5,
        worker_timeout_s: float = 3.0,
        max_attempts: int = 3,
    ) -> None:
        _check_timing(heartbeat_s, worker_timeout_s)
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise ConfigError(f"dispatcher max_attempts must be an integer >= 1; got {max_attempts!r}")
        self.endpoint = endpoint
        self.instance = uuid.uuid4().hex[:12]
        self.heartbeat_s = heartbeat_s
        self.worker_timeout_s = worker_timeout_s
        self.max_attempts = max_attempts
        self._backlog = backlog
        self._on_part = on_part
        self._context = context or zmq.Context.instance()
        self._curve_server = curve_server
        self._socket: zmq.Socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._workers: dict[bytes, _Worker] = {}
        self._jobs_lock = threading.Lock()  # taking a job from the backlog and counting it in flight are one step
        self._n_in_flight = 0
        self._n_requeued = 0
        self._snapshot: list[tuple[str, str, str | None, float]] = []
        self._wake_lock = threading.Lock()
        self._wake_fds: tuple[int, int] | None = None

    def start(self) -> "Dispatcher":
        """Bind the ROUTER (errors raise here, as :class:`ServeError`) and start the dispatcher thread."""
        if self._thread is not None:
            raise ServeError(f"dispatcher on {self.endpoint} was already started; make a new one to restart")
        self._socket = self._bind()
        self._wake_fds = _nonblocking_pipe()
        self._backlog.add_listener(self._wake)
        self._thread = threading.Thread(target=self._run, name="rtdecode-dispatcher", daemon=True)
        self._thread.start()
        log.info("dispatcher listening on %s", self.endpoint, extra={"fields": {"instance": self.instance}})
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the thread and close the socket; jobs in flight go back to the front of the backlog. Idempotent."""
        if self._thread is None or not self._thread.is_alive():
            return
        self._stopping.set()
        self._wake()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.error("dispatcher thread did not stop within %.1f s (an on_part callback blocks?)", timeout_s)

    def status(self) -> dict:
        """Workers (id, name, busy_job, last_seen_s), jobs in flight, jobs requeued so far, running or not.

        The workers list is as of the end of the dispatcher thread's latest round (at most a heartbeat old).
        """
        now_s = time.monotonic()
        workers = [
            {"id": identity, "name": name, "busy_job": job_id, "last_seen_s": round(now_s - seen_s, 3)}
            for identity, name, job_id, seen_s in self._snapshot
        ]
        return {
            "endpoint": self.endpoint,
            "instance": self.instance,
            "running": self._thread is not None and self._thread.is_alive(),
            "n_workers": len(workers),
            "workers": workers,
            "in_flight": self._n_in_flight,
            "n_requeued": self._n_requeued,
            "backlog": len(self._backlog),
        }

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until the backlog is empty and no job is in flight; False if that did not happen in time."""
        deadline_s = time.monotonic() + timeout_s
        while True:
            with self._jobs_lock:
                if self._n_in_flight == 0 and len(self._backlog) == 0:
                    return True
            if time.monotonic() >= deadline_s:
                return False
            time.sleep(min(0.01, self.heartbeat_s))

    # --- the dispatcher thread -------------------------------------------------------------------------------

    def _bind(self) -> zmq.Socket:
        socket = self._context.socket(zmq.ROUTER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a vanished worker fails instead of vanishing
        if self._curve_server is not None:
            self._curve_server.apply(socket)
        try:
            socket.bind(self.endpoint)
        except zmq.ZMQError as error:
            socket.close(linger=0)
            raise ServeError(f"dispatcher cannot bind endpoint {self.endpoint!r}: {error}") from error
        self.endpoint = socket.getsockopt_string(zmq.LAST_ENDPOINT)
        return socket

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._wake_fds[0], zmq.POLLIN)
        next_heartbeat_s = time.monotonic()
        try:
            while not self._stopping.is_set():
                timeout_ms = max(0.0, next_heartbeat_s - time.monotonic()) * 1000
                events = dict(poller.poll(timeout_ms))
                if self._wake_fds[0] in events:
                    _drain(self._wake_fds[0])
                if self._socket in events:
                    self._receive_all()
                if time.monotonic() >= next_heartbeat_s:
                    self._heartbeat_round()
                    next_heartbeat_s = time.monotonic() + self.heartbeat_s
                self._hand_out_jobs()
                self._take_snapshot()
        except Exception:
            log.exception("dispatcher thread failed; no more jobs are handed out")
        finally:
            self._shut_down()

    def _receive_all(self) -> None:
        for _ in range(MAX_MESSAGES_PER_ROUND):
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._handle(frames[0], frames[1:])

    def _handle(self, identity: bytes, frames: list[bytes]) -> None:
        try:
            message = wire.decode(frames, sender="worker")
        except ProtocolError as error:
            log.warning("ignored a malformed message from peer %s: %s", identity.hex()[:8], error)
            return
        worker = self._workers.get(identity)
        if worker is not None:
            worker.last_seen_s = time.monotonic()
        if message.kind == "ready":
            self._on_ready(identity, message)
        elif worker is None:
            self._on_unknown(identity, message)
        elif message.kind == "heartbeat":
            self._check_held_job(worker, wire.held_jobs(message))
        elif message.kind == "part":
            self._on_part_message(worker, message)
        elif message.kind == "bye":
            log.info("decode worker %s left", worker.label)
            self._forget(worker, "its worker left")

    def _on_ready(self, identity: bytes, message: wire.Message) -> None:
        worker = self._workers.get(identity)
        if worker is None:
            worker = _Worker(identity, message.header["name"], time.monotonic())
            self._workers[identity] = worker
            log.info("decode worker %s joined", worker.label, extra={"fields": {"n_workers": len(self._workers)}})
        offer_seq = message.header["idle_seq"]
        if worker.answered_seq is not None and offer_seq <= worker.answered_seq:
            return  # a repeated announcement of an offer already answered with a job
        if worker.job is not None:  # free again, yet its final part never came: the job was lost on the way
            self._give_back(worker, "its worker is free again without having finished it")
        worker.offer_seq, worker.offered_s = offer_seq, time.monotonic()

    def _on_unknown(self, identity: bytes, message: wire.Message) -> None:
        if message.kind == "heartbeat":
            self._send(identity, wire.encode_dispatcher_heartbeat(self.instance, known=False))
        else:
            log.debug("ignored %s from unknown worker %s", message.kind, identity.hex()[:8])

    def _on_part_message(self, worker: _Worker, message: wire.Message) -> None:
        part = wire.part_from_message(message, worker.name)
        job = worker.job
        if job is None or (job.job_id, job.attempt) != (part.job_id, part.attempt):
            log.debug(
                "ignored a part of job %s attempt %d from %s: not its job", part.job_id, part.attempt, worker.label
            )
            return
        self._deliver(part)
        if part.final:  # after delivery, so that wait_idle() returns only once on_part has seen the last part
            self._clear_job(worker)

    def _check_held_job(self, worker: _Worker, held: set[tuple[str, int]]) -> None:
        """A job sent long ago that the worker says it does not hold was lost on the way (a dropped connection)."""
        job = worker.job
        if job is None or (job.job_id, job.attempt) in held:
            return
        if time.monotonic() - worker.job_sent_s > self.worker_timeout_s:
            log.warning(
                "decode worker %s does not hold job %s sent to it; forgetting the worker", worker.label, job.job_id
            )
            self._forget(worker, "its worker never received it")
            self._send(worker.identity, wire.encode_dispatcher_heartbeat(self.instance, known=False))  # re-announce

    def _heartbeat_round(self) -> None:
        now_s = time.monotonic()
        for worker in list(self._workers.values()):
            silent_s = now_s - worker.last_seen_s
            if silent_s > self.worker_timeout_s:
                log.warning(
                    "decode worker %s declared dead: silent for %.1f s (worker_timeout_s=%.1f)%s",
                    worker.label,
                    silent_s,
                    self.worker_timeout_s,
                    f"; it held job {worker.job.job_id}" if worker.job else "",
                )
                self._forget(worker, f"its worker was silent for {silent_s:.1f} s")
            else:
                self._send(worker.identity, wire.encode_dispatcher_heartbeat(self.instance, known=True))

    def _hand_out_jobs(self) -> None:
        free = sorted((w for w in self._workers.values() if w.offer_seq is not None), key=lambda w: w.offered_s)
        for worker in free:
            taken = self._take_job(worker)
            if taken is None:
                return
            job, frames = taken
            if not self._send(worker.identity, frames):
                self._clear_job(worker, put_back=True)
                log.warning("decode worker %s is unreachable; job %s put back", worker.label, job.job_id)
                self._forget(worker, "its worker was unreachable")

    def _take_job(self, worker: _Worker) -> tuple[Job, list[bytes]] | None:
        """The next job from the backlog and its frames, marked as held by ``worker`` (None: backlog empty)."""
        while True:
            with self._jobs_lock:
                item = self._backlog.get(timeout_s=0)
                if item is None:
                    return None
                frames, problem = _job_frames(item, self.instance)
                if frames is not None:
                    worker.job, worker.job_sent_s = item, time.monotonic()
                    worker.answered_seq, worker.offer_seq = worker.offer_seq, None
                    self._n_in_flight += 1
                    return item, frames
            log.error("backlog item %.80r cannot be sent to a decode worker (%s); dropped", item, problem)
            if isinstance(item, Job):
                self._deliver(_error_part(item, f"cannot be sent: {problem}", "dispatcher"))

    def _clear_job(self, worker: _Worker, put_back: bool = False) -> Job | None:
        with self._jobs_lock:
            job, worker.job = worker.job, None
            if job is not None:
                self._n_in_flight -= 1
                if put_back:
                    self._backlog.put_front(job)
        return job

    def _forget(self, worker: _Worker, reason: str) -> None:
        self._give_back(worker, reason)
        self._workers.pop(worker.identity, None)

    def _give_back(self, worker: _Worker, reason: str) -> None:
        """Requeue ``worker``'s job with attempt + 1, or give it up with an error part after max_attempts."""
        job = worker.job
        if job is None:
            return
        if job.attempt >= self.max_attempts:
            log.error("job %s given up after %d attempts: %s", job.job_id, job.attempt, reason)
            self._deliver(_error_part(job, f"{reason}; given up after {job.attempt} attempts", worker.name))
            self._clear_job(worker)
            return
        with self._jobs_lock:
            worker.job = None
            self._n_in_flight -= 1
            self._backlog.put_front(replace(job, attempt=job.attempt + 1))
            self._n_requeued += 1
        log.warning("job %s requeued as attempt %d: %s", job.job_id, job.attempt + 1, reason)

    def _send(self, identity: bytes, frames: list[bytes]) -> bool:
        try:
            self._socket.send_multipart([identity, *frames], zmq.NOBLOCK)
        except zmq.ZMQError as error:  # EHOSTUNREACH (not connected now) or EAGAIN (its queue is full)
            log.debug("send to worker %s failed: %s", identity.hex()[:8], error)
            return False
        return True

    def _deliver(self, part: JobPart) -> None:
        try:
            self._on_part(part)
        except Exception:
            log.exception("on_part failed for a part of job %s (ignored)", part.job_id)

    def _take_snapshot(self) -> None:
        self._snapshot = [
            (w.identity.hex(), w.name, w.job.job_id if w.job else None, w.last_seen_s) for w in self._workers.values()
        ]

    def _shut_down(self) -> None:
        """Put jobs in flight back (earliest sent first in line), close the socket and the wake-up pipe."""
        busy = sorted((w for w in self._workers.values() if w.job), key=lambda w: w.job_sent_s, reverse=True)
        for worker in busy:
            self._clear_job(worker, put_back=True)
        self._workers.clear()
        self._take_snapshot()
        self._backlog.remove_listener(self._wake)
        self._socket.close(linger=0)
        with self._wake_lock:
            for fd in self._wake_fds:
                os.close(fd)
            self._wake_fds = None
        log.info("dispatcher on %s stopped", self.endpoint, extra={"fields": {"n_put_back": len(busy)}})

    def _wake(self) -> None:
        """Wake the dispatcher thread (called from any thread: the backlog's producer, stop())."""
        with self._wake_lock:
            if self._wake_fds is None:
                return
            try:
                os.write(self._wake_fds[1], b"\0")
            except BlockingIOError:
                pass  # the pipe is full: a wake-up is pending anyway


def _check_timing(heartbeat_s: float, worker_timeout_s: float) -> None:
    if not heartbeat_s > 0:
        raise ConfigError(f"dispatcher heartbeat_s must be > 0; got {heartbeat_s!r}")
    if not worker_timeout_s > heartbeat_s:
        raise ConfigError(
            f"dispatcher worker_timeout_s must be longer than heartbeat_s={heartbeat_s}; got {worker_timeout_s!r}"
        )


def _job_frames(item: Any, instance: str) -> tuple[list[bytes] | None, str]:
    """The frames that send ``item`` to a worker, or None and why it cannot go (not a Job, header not JSON)."""
    if not isinstance(item, Job):
        return None, f"not a Job but {type(item).__name__}"
    try:
        return wire.encode_job(item, instance), ""
    except ProtocolError as error:
        return None, str(error)


def _error_part(job: Job, reason: str, worker: str) -> JobPart:
    return JobPart(
        job.job_id, {"error": f"job {job.job_id}: {reason}"}, b"", final=True, worker=worker, attempt=job.attempt
    )


def _nonblocking_pipe() -> tuple[int, int]:
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    return read_fd, write_fd


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass
