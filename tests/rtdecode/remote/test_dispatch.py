"""The decode link over real ZeroMQ sockets on loopback: load balancing, dead workers, restarts, bad input."""

import json
import logging
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import zmq

from rtdecode.backlog import Backlog
from rtdecode.errors import ConfigError, ProtocolError, ServeError
from rtdecode.remote import wire
from rtdecode.remote.dispatcher import Dispatcher
from rtdecode.remote.wire import Job, JobPart
from rtdecode.remote.worker import run_worker
from tests.helpers import PYTHON, wait_until

REPO_ROOT = Path(__file__).resolve().parents[3]
WAIT_S = 15.0
DISPATCHER_FAST = {"heartbeat_s": 0.1, "worker_timeout_s": 1.0}
WORKER_FAST = {"heartbeat_s": 0.1, "dispatcher_timeout_s": 1.0}


class PartLog:
    """``on_part`` for the tests: records every part and lets the test wait for a condition on them."""

    def __init__(self) -> None:
        self.parts: list[JobPart] = []
        self._changed = threading.Condition()

    def __call__(self, part: JobPart) -> None:
        with self._changed:
            self.parts.append(part)
            self._changed.notify_all()

    def wait_for(self, predicate, what: str, timeout_s: float = WAIT_S) -> list[JobPart]:
        with self._changed:
            if not self._changed.wait_for(lambda: predicate(self.parts), timeout_s):
                raise AssertionError(f"timed out waiting for {what}; parts so far: {self.parts}")
            return list(self.parts)

    def wait_finals(self, n_finals: int) -> list[JobPart]:
        self.wait_for(lambda parts: sum(p.final for p in parts) >= n_finals, f"{n_finals} final parts")
        return self.finals()

    def finals(self) -> list[JobPart]:
        with self._changed:
            return [p for p in self.parts if p.final]

    def of_job(self, job_id: str) -> list[JobPart]:
        with self._changed:
            return [p for p in self.parts if p.job_id == job_id]


def echo(job: Job):
    yield {"echo": job.header}, job.payload


@pytest.fixture
def backlog() -> Backlog:
    return Backlog("keep_all", 100)


@pytest.fixture
def dispatchers():
    """Make dispatchers on random loopback ports; all are stopped at the end."""
    made: list[Dispatcher] = []

    def make(on_part, backlog: Backlog, endpoint: str = "tcp://127.0.0.1:*", **options) -> Dispatcher:
        dispatcher = Dispatcher(endpoint, backlog, on_part, **(DISPATCHER_FAST | options))
        made.append(dispatcher)
        return dispatcher.start()

    yield make
    for dispatcher in made:
        dispatcher.stop()


@pytest.fixture
def workers():
    """Start worker threads; each is stopped (and must return) at the end. Returns the stop event and a result."""
    started: list[tuple[threading.Thread, threading.Event]] = []

    def start(endpoint: str, handler, name: str) -> tuple[threading.Event, dict]:
        stop, result = threading.Event(), {}

        def target() -> None:
            result["n_done"] = run_worker(endpoint, handler, stop=stop, name=name, **WORKER_FAST)

        thread = threading.Thread(target=target, name=f"test-worker-{name}", daemon=True)
        thread.start()
        started.append((thread, stop))
        return stop, result

    yield start
    for _, stop in started:
        stop.set()
    for thread, _ in started:
        thread.join(WAIT_S)
        assert not thread.is_alive(), f"{thread.name} did not stop"


def assert_each_job_finished_once(finals: list[JobPart], job_ids: list[str]) -> None:
    assert Counter(p.job_id for p in finals) == Counter(job_ids)
    assert [p for p in finals if "error" in p.header] == []


def test_two_workers_share_the_jobs(backlog, dispatchers, workers):
    both_busy = threading.Barrier(2, timeout=WAIT_S)  # j0 and j1 can only pass if two workers hold them at once

    def handler(job: Job):
        if job.job_id in ("j0", "j1"):
            both_busy.wait()
        yield {"echo": job.header}, job.payload

    parts = PartLog()
    dispatcher = dispatchers(parts, backlog)
    workers(dispatcher.endpoint, handler, "w1")
    workers(dispatcher.endpoint, handler, "w2")
    wait_until(lambda: dispatcher.status()["n_workers"] == 2, "two workers to join")
    betas = {f"j{i}": np.arange(i, i + 8, dtype=np.float32) for i in range(20)}
    for job_id, beta in betas.items():
        assert backlog.put(Job(job_id, {"trial": job_id}, beta.tobytes())) == []

    finals = parts.wait_finals(20)
    assert_each_job_finished_once(finals, list(betas))
    assert {p.worker for p in finals} == {"w1", "w2"}
    for job_id, beta in betas.items():
        (echoed,) = [p for p in parts.of_job(job_id) if not p.final]
        assert echoed.header == {"echo": {"trial": job_id}}
        np.testing.assert_array_equal(np.frombuffer(echoed.payload, np.float32), beta)
    assert dispatcher.wait_idle(WAIT_S)
    assert dispatcher.status()["n_requeued"] == 0


def start_echo_subprocess(endpoint: str, name: str, block_job: str, marker: Path, gate: Path | None = None):
    """An echo worker in its own process that hangs on ``block_job`` (until ``gate`` exists, or forever)."""
    command = [PYTHON, "-m", "tests.rtdecode.remote.echo_worker", endpoint, "--name", name, "--block-job", block_job]
    command += ["--marker", str(marker), "--heartbeat-s", "0.1", "--dispatcher-timeout-s", "1.0"]
    command += ["--gate", str(gate)] if gate else []
    return subprocess.Popen(command, cwd=REPO_ROOT)


def test_a_worker_killed_mid_job_loses_nothing(tmp_path, backlog, dispatchers, workers):
    parts = PartLog()
    dispatcher = dispatchers(parts, backlog)
    for job_id in ("j1", "j2", "j3"):  # only the doomed worker exists yet: it gets all three, and hangs on j3
        backlog.put(Job(job_id, {"trial": job_id}))
    marker = tmp_path / "j3.started"
    doomed = start_echo_subprocess(dispatcher.endpoint, "doomed", "j3", marker)
    try:
        wait_until(marker.exists, "the worker subprocess to start j3")
        workers(dispatcher.endpoint, echo, "survivor")
        for job_id in ("j4", "j5", "j6"):
            backlog.put(Job(job_id, {"trial": job_id}))
        doomed.send_signal(signal.SIGKILL)
        assert doomed.wait(WAIT_S) == -signal.SIGKILL
        parts.wait_finals(6)
    finally:
        doomed.kill()
        doomed.wait(WAIT_S)

    assert dispatcher.wait_idle(WAIT_S)
    finals = parts.finals()
    assert_each_job_finished_once(finals, ["j1", "j2", "j3", "j4", "j5", "j6"])
    by_job = {p.job_id: p for p in finals}
    assert (by_job["j3"].worker, by_job["j3"].attempt) == ("survivor", 2)
    assert {by_job["j1"].worker, by_job["j2"].worker} == {"doomed"}
    assert [p.worker for p in parts.of_job("j3")] == ["survivor", "survivor"]
    status = dispatcher.status()
    assert status["n_requeued"] == 1
    assert [w["name"] for w in status["workers"]] == ["survivor"]


def test_a_frozen_worker_that_wakes_up_late_delivers_nothing_twice(tmp_path, backlog, dispatchers, workers):
    """SIGSTOP mid-job (a hung node): declared dead, job done elsewhere; after SIGCONT its late parts are ignored."""
    parts = PartLog()
    dispatcher = dispatchers(parts, backlog)
    backlog.put(Job("j1", {"trial": "j1"}))
    marker, gate = tmp_path / "j1.started", tmp_path / "j1.go"
    frozen = start_echo_subprocess(dispatcher.endpoint, "frozen", "j1", marker, gate)
    try:
        wait_until(marker.exists, "the worker subprocess to start j1")
        frozen.send_signal(signal.SIGSTOP)
        workers(dispatcher.endpoint, echo, "survivor")
        (final,) = parts.wait_finals(1)
        assert (final.job_id, final.worker, final.attempt) == ("j1", "survivor", 2)
        gate.write_text("go")
        frozen.send_signal(signal.SIGCONT)  # it finishes j1 attempt 1 and sends its parts, then announces itself
        wait_until(lambda: dispatcher.status()["n_workers"] == 2, "the woken worker to join again")
        backlog.put(Job("j2", {"trial": "j2"}))
        parts.wait_finals(2)
    finally:
        frozen.kill()
        frozen.wait(WAIT_S)
    assert dispatcher.wait_idle(WAIT_S)
    assert_each_job_finished_once(parts.finals(), ["j1", "j2"])
    assert {p.worker for p in parts.of_job("j1")} == {"survivor"}


def test_a_handler_exception_becomes_an_error_part_and_the_worker_goes_on(backlog, dispatchers, workers):
    def handler(job: Job):
        if job.header.get("explode"):
            raise ValueError("beta has shape (3,), expected (15724,)")
        yield {"ok": True}, b"fine"

    parts = PartLog()
    dispatcher = dispatchers(parts, backlog)
    _, result = workers(dispatcher.endpoint, handler, "w1")
    backlog.put(Job("bad", {"explode": True}))
    backlog.put(Job("good"))

    parts.wait_finals(2)
    (error,) = parts.of_job("bad")
    assert error.final and error.worker == "w1"
    assert "ValueError" in error.header["error"] and "(15724,)" in error.header["error"]
    good = parts.of_job("good")
    assert [(p.header, p.payload, p.final, p.worker) for p in good] == [
        ({"ok": True}, b"fine", False, "w1"),
        ({}, b"", True, "w1"),
    ]


def test_parts_stream_in_order_before_the_handler_finishes(backlog, dispatchers, workers):
    release = threading.Event()

    def handler(job: Job):
        yield {"topic": "retrieval", "step": 1}, b"quick"
        if not release.wait(WAIT_S):
            raise TimeoutError("the test never saw the first part")
        yield {"topic": "image", "step": 2}, b"jpeg"

    parts = PartLog()
    dispatcher = dispatchers(parts, backlog)
    workers(dispatcher.endpoint, handler, "w1")
    backlog.put(Job("t1"))

    first = parts.wait_for(lambda ps: ps, "the first part while the handler still runs")
    assert [(p.header["step"], p.final) for p in first] == [(1, False)]
    release.set()
    parts.wait_finals(1)
    assert [(p.header, p.payload, p.final) for p in parts.of_job("t1")] == [
        ({"topic": "retrieval", "step": 1}, b"quick", False),
        ({"topic": "image", "step": 2}, b"jpeg", False),
        ({}, b"", True),
    ]


def start_on_same_endpoint(endpoint: str, backlog: Backlog, on_part) -> Dispatcher:
    """A new dispatcher on ``endpoint``, retried while the previous one's listening socket finishes closing."""
    dispatcher = Dispatcher(endpoint, backlog, on_part, **DISPATCHER_FAST)
    deadline_s = time.monotonic() + WAIT_S
    while True:
        try:
            return dispatcher.start()
        except ServeError:
            if time.monotonic() > deadline_s:
                raise
            time.sleep(0.05)


def test_a_worker_serves_a_restarted_dispatcher(backlog, dispatchers, workers):
    gate = threading.Event()

    def handler(job: Job):
        if job.header.get("wait") and not gate.wait(WAIT_S):
            raise TimeoutError("gate never opened")
        yield {"served": job.job_id}, b""

    first_parts = PartLog()
    first = dispatchers(first_parts, backlog)
    workers(first.endpoint, handler, "w1")
    backlog.put(Job("before"))
    first_parts.wait_finals(1)
    backlog.put(Job("slow", {"wait": True}))
    wait_until(lambda: first.status()["in_flight"] == 1, "the slow job to be in flight")
    first.stop()
    first.stop()  # idempotent
    assert len(backlog) == 1  # the job in flight was put back for the next dispatcher

    second_parts = PartLog()  # restarted while the worker is busy: it offers itself once the job is done
    second = start_on_same_endpoint(first.endpoint, backlog, second_parts)
    try:
        gate.set()
        backlog.put(Job("after"))
        finals = second_parts.wait_finals(2)
        assert second.wait_idle(WAIT_S)
        assert second.endpoint == first.endpoint
        assert_each_job_finished_once(finals, ["slow", "after"])
        assert {p.worker for p in finals} == {"w1"}
        assert second.status()["n_workers"] == 1
        assert [p.job_id for p in first_parts.finals()] == ["before"]
    finally:
        second.stop()

    third_parts = PartLog()  # restarted while the worker is idle: it must announce itself again
    third = start_on_same_endpoint(first.endpoint, backlog, third_parts)
    try:
        backlog.put(Job("after-idle-restart"))
        assert_each_job_finished_once(third_parts.wait_finals(1), ["after-idle-restart"])
    finally:
        third.stop()


def test_a_worker_reconnects_after_the_dispatcher_was_gone_a_while(backlog, dispatchers, workers, caplog):
    caplog.set_level(logging.WARNING, logger="rtdecode.remote.worker")
    first = dispatchers(PartLog(), backlog)
    workers(first.endpoint, echo, "w1")
    wait_until(lambda: first.status()["n_workers"] == 1, "the worker to join")
    first.stop()
    wait_until(lambda: any("reconnecting" in r.getMessage() for r in caplog.records), "the worker to give up")

    parts = PartLog()
    second = start_on_same_endpoint(first.endpoint, backlog, parts)
    try:
        backlog.put(Job("after-outage"))
        assert_each_job_finished_once(parts.wait_finals(1), ["after-outage"])
    finally:
        second.stop()


class CurveKeys:
    """Real CURVE settings for both ends, duck-typed like rtdecode.publish.keys (``apply(socket)``)."""

    def __init__(self) -> None:
        self.server_public, self.server_secret = zmq.curve_keypair()
        self.client_public, self.client_secret = zmq.curve_keypair()

    def server(self):
        keys = self

        class Server:
            def apply(self, socket: zmq.Socket) -> None:
                socket.curve_secretkey = keys.server_secret
                socket.curve_server = True

        return Server()

    def client(self):
        keys = self

        class Client:
            def apply(self, socket: zmq.Socket) -> None:
                socket.curve_serverkey = keys.server_public
                socket.curve_publickey = keys.client_public
                socket.curve_secretkey = keys.client_secret

        return Client()


def test_jobs_flow_over_curve(backlog, dispatchers):
    keys = CurveKeys()
    parts = PartLog()
    dispatcher = dispatchers(parts, backlog, curve_server=keys.server())
    assert dispatcher.status()["endpoint"] == dispatcher.endpoint
    stop = threading.Event()
    options = {"stop": stop, "curve_client": keys.client(), "name": "secure", **WORKER_FAST}
    worker = threading.Thread(target=run_worker, args=(dispatcher.endpoint, echo), kwargs=options, daemon=True)
    worker.start()
    try:
        backlog.put(Job("encrypted", {"run": 1}, b"beta"))
        finals = parts.wait_finals(1)
    finally:
        stop.set()
        worker.join(WAIT_S)
    assert_each_job_finished_once(finals, ["encrypted"])
    (echoed,) = [p for p in parts.of_job("encrypted") if not p.final]
    assert (echoed.header, echoed.payload, echoed.worker) == ({"echo": {"run": 1}}, b"beta", "secure")


def test_malformed_messages_are_logged_and_ignored(backlog, dispatchers, workers, caplog):
    caplog.set_level(logging.WARNING, logger="rtdecode.remote.dispatcher")
    parts = PartLog()
    dispatcher = dispatchers(parts, backlog)
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(dispatcher.endpoint)
    garbage = [
        [b"garbage"],
        [b"ready", b"{not json", b""],
        [b"ready", json.dumps({"v": 99, "name": "x", "idle_seq": 0}).encode(), b""],
        [b"job", json.dumps({"v": 1, "job_id": "x", "attempt": 1, "instance": "i", "fields": {}}).encode(), b""],
        [b"part", json.dumps({"v": 1, "job_id": "x", "attempt": True, "final": True, "fields": {}}).encode(), b""],
        [b"\xff\xfe", b"{}", b""],
    ]
    try:
        for frames in garbage:
            raw.send_multipart(frames)
        wait_until(
            lambda: sum("malformed" in r.getMessage() for r in caplog.records) >= len(garbage),
            "every malformed message to be logged",
        )
    finally:
        raw.close(linger=0)

    workers(dispatcher.endpoint, echo, "w1")
    backlog.put(Job("after-garbage", {"n": 1}))
    finals = parts.wait_finals(1)
    assert_each_job_finished_once(finals, ["after-garbage"])
    status = dispatcher.status()
    assert status["running"] and status["n_workers"] == 1


def next_message(raw: zmq.Socket) -> wire.Message:
    if not raw.poll(WAIT_S * 1000):
        raise AssertionError("the dispatcher sent nothing")
    return wire.decode(raw.recv_multipart(), sender="dispatcher")


def next_job(raw: zmq.Socket) -> Job:
    while (message := next_message(raw)).kind != "job":
        pass
    return wire.job_from_message(message)


def test_offers_are_followed_and_parts_of_a_job_given_back_are_ignored(backlog, dispatchers):
    """Speaks the protocol by hand: a repeated offer gets no second job; a worker offering itself again without
    finishing loses its job (it comes back as attempt 2); a part for attempt 1 is then ignored."""
    parts = PartLog()
    dispatcher = dispatchers(parts, backlog, worker_timeout_s=WAIT_S)
    backlog.put(Job("j1"))
    backlog.put(Job("j2"))
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(dispatcher.endpoint)
    try:
        raw.send_multipart(wire.encode_ready("raw", 0))
        assert (next_job(raw).job_id, len(backlog)) == ("j1", 1)
        raw.send_multipart(wire.encode_ready("raw", 0))  # the same offer announced again (e.g. after known=False)
        kinds = [next_message(raw).kind for _ in range(2)]  # two heartbeat rounds later: still no second job
        assert (kinds, len(backlog)) == (["heartbeat", "heartbeat"], 1)
        raw.send_multipart(wire.encode_ready("raw", 1))  # free again, yet j1 never finished: j1 was lost
        again = next_job(raw)
        assert (again.job_id, again.attempt) == ("j1", 2)
        raw.send_multipart(wire.encode_part("j1", 1, {"stale": True}, b"", final=True))
        raw.send_multipart(wire.encode_part("j1", 2, {"fresh": True}, b"", final=True))
        (final,) = parts.wait_finals(1)
    finally:
        raw.close(linger=0)
    assert (final.header, final.attempt, final.worker) == ({"fresh": True}, 2, "raw")
    assert parts.parts == [final]
    assert dispatcher.status()["n_requeued"] == 1


def test_a_job_the_worker_never_received_is_given_back(backlog, dispatchers):
    """A worker that keeps heartbeating without holding its job (lost on a dropped connection) is forgotten."""
    dispatcher = dispatchers(PartLog(), backlog)
    backlog.put(Job("j1"))
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(dispatcher.endpoint)
    try:
        raw.send_multipart(wire.encode_ready("raw", 0))
        assert next_job(raw).job_id == "j1"
        deadline_s = time.monotonic() + WAIT_S
        forgotten = False
        while not forgotten:  # alive, but holding nothing, until the dispatcher asks "who are you?"
            assert time.monotonic() < deadline_s, "the dispatcher never gave j1 back"
            raw.send_multipart(wire.encode_worker_heartbeat("raw", []))
            message = next_message(raw)
            forgotten = message.kind == "heartbeat" and not message.header["known"]
    finally:
        raw.close(linger=0)
    requeued = backlog.get(timeout_s=0)
    assert (requeued.job_id, requeued.attempt) == ("j1", 2)
    wait_until(lambda: dispatcher.status()["n_workers"] == 0, "the status to show the worker gone")


def test_a_job_is_given_up_after_max_attempts(backlog, dispatchers, workers, caplog):
    """A worker that leaves (bye) mid-job gives its job back at once; with max_attempts=1 that is an error part."""
    release = threading.Event()

    def handler(job: Job):
        release.wait(WAIT_S)
        yield {"late": True}, b""

    parts = PartLog()
    dispatcher = dispatchers(parts, backlog, max_attempts=1, worker_timeout_s=WAIT_S)  # only bye can free it
    stop, result = workers(dispatcher.endpoint, handler, "leaver")
    backlog.put(Job("j1"))
    wait_until(lambda: dispatcher.status()["in_flight"] == 1, "j1 to be in flight")
    stop.set()
    (error,) = parts.wait_finals(1)
    release.set()
    assert (error.job_id, error.attempt, error.worker) == ("j1", 1, "leaver")
    assert "given up after 1 attempts" in error.header["error"]
    wait_until(lambda: "n_done" in result, "the worker to return")
    assert result["n_done"] == 0
    wait_until(lambda: dispatcher.status()["n_workers"] == 0, "the status to show the worker gone")
    assert len(backlog) == 0


def test_wire_round_trip_and_bad_frames():
    job = Job("t-07", {"run": 2, "shape": [15724]}, b"\x00\x01", attempt=2)
    message = wire.decode(wire.encode_job(job, "abc"), sender="dispatcher")
    assert wire.job_from_message(message) == job
    part_frames = wire.encode_part("t-07", 2, {"topic": "image"}, b"jpeg", final=True)
    part = wire.part_from_message(wire.decode(part_frames, sender="worker"), "w9")
    assert part == JobPart("t-07", {"topic": "image"}, b"jpeg", True, "w9", 2)
    heartbeat = wire.decode(wire.encode_worker_heartbeat("w9", [("t-07", 2)]), sender="worker")
    assert wire.held_jobs(heartbeat) == {("t-07", 2)}

    with pytest.raises(ProtocolError, match="3 frames"):
        wire.decode([b"ready", b"{}"], sender="worker")
    with pytest.raises(ProtocolError, match="kinds"):
        wire.decode(wire.encode_job(job, "abc"), sender="worker")  # a worker never sends jobs
    with pytest.raises(ProtocolError, match="finite"):
        wire.encode_part("t-07", 1, {"score": float("nan")}, b"", final=True)
    with pytest.raises(ProtocolError, match="'attempt'"):
        wire.decode([b"part", b'{"v":1,"job_id":"x","attempt":"1","final":true,"fields":{}}', b""], sender="worker")


def test_bad_settings_are_refused(backlog):
    with pytest.raises(ConfigError, match="worker_timeout_s"):
        Dispatcher("tcp://127.0.0.1:*", backlog, print, heartbeat_s=1.0, worker_timeout_s=0.5)
    with pytest.raises(ConfigError, match="max_attempts"):
        Dispatcher("tcp://127.0.0.1:*", backlog, print, max_attempts=0)
    with pytest.raises(ServeError, match="cannot bind"):
        Dispatcher("tcp://256.0.0.1:1", backlog, print).start()
    with pytest.raises(ConfigError, match="dispatcher_timeout_s"):
        run_worker("tcp://127.0.0.1:1", echo, stop=threading.Event(), heartbeat_s=1.0, dispatcher_timeout_s=1.0)
