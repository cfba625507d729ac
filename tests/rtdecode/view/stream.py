"""Shared by the view tests: a realistic daemon stream (docs/protocol.md) published on a real Publisher.

:class:`Stream` publishes what ``rtdecode serve`` publishes, with the daemon's header fields: status messages
(heartbeats with counts, ingest reports, skipped trials), volume and motion per volume, and per trial an online
beta, retrieval, preview, caption and image (real JPEG / PNG files in solid, distinctive colours). Stage stamps
are ``time.monotonic()`` values set back from the moment of publishing, so latencies are known to the test.
:func:`session` plays one run with a missing volume that arrives late, a quarantined file, a flagged volume, three
decoded trials and one skipped.

:func:`retrieval_only` plays the trials of a daemon that makes no pictures (``[serve] reconstruct = false`` and a
model without a preview: retrieval only), :func:`write_pool` a folder of the retrieval pool's pictures.

Also: :class:`RawPublisher` (a bare PUB socket that sends what the real Publisher refuses: unknown payload
encodings, a newer schema, broken frames), :class:`Clock` (a clock the test moves) and :func:`read_line` (a line
from a subprocess's pipe, with a timeout).
"""

import dataclasses
import io
import itertools
import json
import os
import select
import threading
import time

import numpy as np
import zmq
from PIL import Image

from rtdecode.publish import protocol
from rtdecode.publish.subscriber import Subscriber
from tests import helpers

SUBJECT = "new01"
SESSION = 2
TIMEOUT_S = 10.0  # generous: every wait ends as soon as the thing happens
FD_THRESHOLD_MM = 0.5
N_VOXELS = 64
# Solid colours of the trials' pictures: far from each other, from the page's colours and from the plot lines.
COLOURS = {
    "t0001": ((40, 200, 60), (20, 90, 30)),
    "t0002": ((230, 200, 20), (110, 100, 10)),
    "t0003": ((200, 30, 160), (60, 220, 230)),
}
CAPTIONS = {
    "t0001": "a green field under a pale sky",
    "t0002": "a yellow taxi on a city street",
    "t0003": "a magenta flower in a vase",
}
MATCHES = {
    "t0001": [{"id": "nsd-03050", "score": 0.412}, {"id": "nsd-10021", "score": 0.377}],
    "t0002": [{"id": "nsd-22417", "score": 0.508}, {"id": "nsd-00311", "score": 0.451}],
    "t0003": [
        {"id": "nsd-61883", "score": 0.634},
        {"id": "nsd-04209", "score": 0.598},
        {"id": "nsd-7112", "score": 0.2},
    ],
}
STIMULI = {"t0001": "nsd-03050", "t0002": "nsd-22418", "t0003": "nsd-61883", "t0004": "nsd-00007"}
N_VOLUMES = 12
MISSING_VOLUME = 5
FLAGGED_VOLUME = 7
QUARANTINED_FILE = "MR.0009.dcm"


def picture(colour: tuple[int, int, int], encoding: str = "jpeg", size: int = 96) -> bytes:
    """A solid-colour picture file made with PIL."""
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="JPEG" if encoding == "jpeg" else "PNG", quality=95)
    return buffer.getvalue()


def motion_params(volume: int) -> list[float]:
    """Small smooth head motion; volume FLAGGED_VOLUME jumps (its FD is over the threshold)."""
    jump = 0.8 if volume >= FLAGGED_VOLUME else 0.0
    return [
        round(0.05 * volume + jump, 6),
        round(-0.03 * volume, 6),
        round(0.02 * np.sin(volume), 6),
        round(0.001 * volume, 6),
        round(-0.0005 * volume, 6),
        round(0.0008 * np.cos(volume), 6),
    ]


@dataclasses.dataclass
class Counts:
    n_volumes: int = 0
    n_betas: int = 0
    n_decoded: int = 0
    n_skipped: int = 0
    backlog: int = 0
    backlog_peak: int = 0


class Stream:
    """Publishes a daemon's messages on ``publisher`` (see the module docstring); ``sent`` keeps every message
    as sent (with the publisher's ``published_s``)."""

    def __init__(self, publisher, run: int = 1) -> None:
        self.publisher = publisher
        self.run = run
        self.counts = Counts()
        self.state = "running"
        self.sent: list[protocol.Message] = []
        self._lock = threading.Lock()

    def publish(self, topic: str, header: dict, payload: bytes = b"") -> protocol.Message:
        with self._lock:
            message = self.publisher.publish(topic, header, payload)
            self.sent.append(message)
            return message

    def status(self, kind: str, **fields) -> protocol.Message:
        counts = self.counts
        header = {
            "kind": kind,
            "state": self.state,
            "subject": SUBJECT,
            "session": SESSION,
            "current_run": self.run,
            "n_volumes": counts.n_volumes,
            "n_betas": counts.n_betas,
            "n_trials_decoded": counts.n_decoded,
            "n_trials_skipped": counts.n_skipped,
            "n_trials_failed": 0,
            "n_problems": 2,
            "backlog": counts.backlog,
            "backlog_peak": counts.backlog_peak,
            "workers": 1,
            "in_flight": 1 if counts.backlog else 0,
            "last_volume_age_s": 0.4,
            **fields,
        }
        return self.publish("status", header)

    def ingest(self, event: str, volumes: list[int], reason: str, file: str | None = None) -> protocol.Message:
        fields = {"event": event, "run": self.run, "series": 10 + self.run, "volumes": volumes, "reason": reason}
        if file is not None:
            fields["file"] = file
        return self.status("ingest", **fields)

    def volume(self, volume: int, *, late: bool = False, seen_ago_s: float = 0.2) -> list[protocol.Message]:
        """``volume`` and ``motion`` of one volume, its file closed ``seen_ago_s`` before publishing."""
        self.counts.n_volumes += 1
        stamps = _stamps(seen_ago_s, ("seen", "read", "available", "preprocessed"))
        ids = {"subject": SUBJECT, "session": SESSION, "run": self.run, "volume": volume}
        header = {**ids, "series": 10 + self.run, "late": late, "shape": [64, 64, 40], "preprocessed": True}
        sent = [self.publish("volume", {**header, "timestamps": stamps})]
        params = motion_params(volume)
        previous = motion_params(volume - 1) if volume > 0 else params
        fd_mm = round(sum(abs(a - b) for a, b in zip(params[:3], previous[:3], strict=True)), 4)
        fd_mm = round(fd_mm + 50.0 * sum(abs(a - b) for a, b in zip(params[3:], previous[3:], strict=True)), 4)
        motion = {**ids, "params": params, "fd_mm": fd_mm, "flagged": fd_mm > FD_THRESHOLD_MM, "timestamps": stamps}
        sent.append(self.publish("motion", motion))
        return sent

    def beta(self, trial_id: str, *, seen_ago_s: float = 0.3, version: str = "online") -> protocol.Message:
        self.counts.n_betas += 1
        vector = np.linspace(-1.0, 1.0, N_VOXELS, dtype=np.float32)
        description, payload = protocol.array_payload(vector)
        header = {
            **self.trial_ids(trial_id),
            "stimulus_id": STIMULI.get(trial_id),
            "onset_s": 12.0,
            "version": version,
            "n_voxels": N_VOXELS,
            "n_frames": 9,
            "zscored": True,
            "decodable": True,
            "payload": description,
            "timestamps": _stamps(seen_ago_s, ("seen", "read", "available", "preprocessed", "estimated")),
            "repeat": False,
        }
        return self.publish("beta", header, payload)

    def decoded(
        self,
        trial_id: str,
        *,
        colours: tuple[tuple[int, int, int], tuple[int, int, int]],
        caption: str,
        matches: list[dict],
        seen_ago_s: float = 2.0,
        queued_ago_s: float = 1.5,
        preview_encoding: str = "png",
        with_image: bool = True,
    ) -> list[protocol.Message]:
        """retrieval, preview, caption and (``with_image``) image of a trial, as a decode worker's parts
        republished."""
        image_colour, preview_colour = colours
        ids = {**self.trial_ids(trial_id), "stimulus_id": STIMULI.get(trial_id), "worker": "gpu1", "attempt": 1}
        ids["repeat"] = False

        def stamps(extra_ago_s: float) -> dict:
            now_s = time.monotonic()
            return {
                "seen": now_s - seen_ago_s - extra_ago_s,
                "queued": now_s - queued_ago_s - extra_ago_s,
                "result_received": now_s - 0.01,
            }

        preview_timings = {"embed": 11.5, "retrieval": 2.25, "low_level": 31.0}
        image_timings = {"unclip": 812.5, "refine": 240.0, "caption": 95.0}
        sent = [
            self.publish(
                "retrieval", {**ids, "matches": matches, "timings_ms": preview_timings, "timestamps": stamps(0)}
            )
        ]
        description, data = protocol.image_payload(picture(preview_colour, preview_encoding), preview_encoding)
        preview = {**ids, "payload": description, "width": 96, "height": 96, "timings_ms": preview_timings}
        sent.append(self.publish("preview", {**preview, "timestamps": stamps(0)}, data))
        caption_header = {**ids, "caption": caption, "timings_ms": image_timings, "timestamps": stamps(0)}
        sent.append(self.publish("caption", caption_header))
        if with_image:
            sent.append(self.image(trial_id, image_colour, timestamps=stamps(0)))
        self.counts.n_decoded += 1
        return sent

    def image(self, trial_id: str, colour: tuple[int, int, int], *, timestamps: dict | None = None) -> protocol.Message:
        """The ``image`` part of a trial alone (JPEG)."""
        ids = {**self.trial_ids(trial_id), "stimulus_id": STIMULI.get(trial_id), "worker": "gpu1", "attempt": 1}
        description, data = protocol.image_payload(picture(colour), "jpeg", [96, 96, 3])
        header = {**ids, "repeat": False, "payload": description, "width": 96, "height": 96, "seed": 1234}
        header["timings_ms"] = {"unclip": 812.5, "refine": 240.0, "caption": 95.0}
        now_s = time.monotonic()
        header["timestamps"] = timestamps or {"seen": now_s - 2.0, "queued": now_s - 1.5, "result_received": now_s}
        return self.publish("image", header, data)

    def trial_ids(self, trial_id: str) -> dict:
        return {"subject": SUBJECT, "session": SESSION, "run": self.run, "trial_id": trial_id}

    def heartbeats(self, backlogs: list[int]) -> list[protocol.Message]:
        sent = []
        for backlog in backlogs:
            self.counts.backlog = backlog
            self.counts.backlog_peak = max(self.counts.backlog_peak, backlog)
            sent.append(self.status("heartbeat"))
        return sent


def session(stream: Stream) -> Stream:
    """One run, as a daemon publishes it (see the module docstring). Returns ``stream``."""
    stream.state = "starting"
    stream.status("started", message="serving new01 session 2")
    stream.state = "running"
    stream.status("run_started", run=stream.run, series=10 + stream.run)
    stream.ingest("run_started", [], "series 11 began")
    for volume in range(N_VOLUMES):
        if volume == MISSING_VOLUME:
            stream.ingest("missing", [volume], "volume 5 did not arrive within 2 TR")
            continue
        stream.volume(volume)
        if volume == 8:
            stream.ingest("quarantined", [], "truncated file: 1200 of 2400 pixel bytes", file=QUARANTINED_FILE)
            stream.volume(MISSING_VOLUME, late=True)
        if volume % 4 == 3:
            stream.heartbeats([stream.counts.backlog])
    for trial_id in ("t0001", "t0002", "t0003"):
        stream.beta(trial_id)
        stream.heartbeats([1])
        stream.decoded(trial_id, colours=COLOURS[trial_id], caption=CAPTIONS[trial_id], matches=MATCHES[trial_id])
    stream.beta("t0004")
    stream.counts.n_skipped += 1
    stream.status("trial_skipped", run=stream.run, trial_id="t0004", message="backlog policy latest_only")
    stream.heartbeats([0])
    return stream


POOL_COLOURS = {  # pictures of the retrieval pool (MATCHES' ids; nsd-7112 has none): far from the trials' colours
    "nsd-03050": (250, 120, 20),
    "nsd-10021": (20, 120, 250),
    "nsd-22417": (120, 250, 20),
    "nsd-00311": (250, 20, 120),
    "nsd-61883": (20, 250, 200),
    "nsd-04209": (120, 20, 250),
}
MISSING_POOL_ID = "nsd-7112"


def write_pool(folder) -> dict[str, bytes]:
    """The retrieval pool's pictures, ``<id>.png`` and ``<id>.jpg`` alternately, in ``folder``; id -> bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for i, (match_id, colour) in enumerate(POOL_COLOURS.items()):
        encoding = "png" if i % 2 == 0 else "jpeg"
        data = picture(colour, encoding, size=64)
        (folder / f"{match_id}.{'png' if encoding == 'png' else 'jpg'}").write_bytes(data)
        written[match_id] = data
    return written


def retrieval_only(stream: Stream) -> Stream:
    """Trials t0001-t0003 decoded without pictures (beta, retrieval), then t0004's beta (not decoded yet).
    Returns ``stream``."""
    stream.status("run_started", run=stream.run, series=10 + stream.run)
    for trial_id in ("t0001", "t0002", "t0003"):
        stream.beta(trial_id)
        ids = {**stream.trial_ids(trial_id), "stimulus_id": STIMULI[trial_id], "worker": "local", "attempt": 1}
        now_s = time.monotonic()
        stamps = {"seen": now_s - 0.5, "queued": now_s - 0.3, "result_received": now_s - 0.01}
        stream.publish("retrieval", {**ids, "repeat": False, "matches": MATCHES[trial_id], "timestamps": stamps})
        stream.counts.n_decoded += 1
    stream.beta("t0004")
    stream.heartbeats([1])
    return stream


class HeartbeatPump:
    """Publishes a heartbeat every ``period_s`` in a thread, like a live daemon between volumes."""

    def __init__(self, stream: Stream, period_s: float = 0.25) -> None:
        self.stream = stream
        self.period_s = period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "HeartbeatPump":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.stream.heartbeats([self.stream.counts.backlog])


def joined(publisher) -> Subscriber:
    """A subscriber that has caught up and whose live subscription is in place (the probes are not handed out)."""
    subscriber = Subscriber(publisher.publish_endpoint, publisher.snapshot_endpoint)
    subscriber.catch_up(TIMEOUT_S)
    wait_subscribed(publisher, lambda wait_s: subscriber.receive(wait_s) is not None)
    return subscriber


def wait_subscribed(publisher, received, timeout_s: float = TIMEOUT_S) -> None:
    """Publish status probes until ``received(wait_s)`` says one arrived: the subscription is in place, so nothing
    published from now on is lost (ZeroMQ sets a subscription up in the background, after the handshake)."""
    deadline = time.monotonic() + timeout_s
    while True:
        publisher.publish("status", {"kind": "probe"})
        if received(0.2):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"no probe came through in {timeout_s} s")


class Clock:
    """A monotonic clock that moves only when the test moves it (``now_s``): states and savers built with it
    see exactly the times the test sets."""

    def __init__(self, now_s: float = 1000.0) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


class RawPublisher:
    """A bare ZeroMQ PUB socket on a loopback port: messages framed by hand (:meth:`publish`, any header and
    schema) or raw frames (:meth:`send`), for what a real Publisher refuses to send."""

    def __init__(self) -> None:
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.PUB)
        self.socket.bind("tcp://127.0.0.1:*")
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.stream = protocol.new_stream_id()
        self._seq = {topic: itertools.count(1) for topic in protocol.TOPICS}

    def publish(self, topic: str, header: dict, payload: bytes = b"", *, schema: int = 1) -> None:
        """One message with the publisher's fields set (``schema`` as given), the rest of ``header`` as is."""
        now_s = time.monotonic()
        fields = {"schema": schema, "topic": topic, "seq": next(self._seq[topic]), "stream": self.stream}
        fields |= {"published_s": now_s, "published_unix_s": time.time()}
        self.send([topic.encode("ascii"), json.dumps({**header, **fields}).encode("utf-8"), payload])

    def send(self, frames: list[bytes]) -> None:
        self.socket.send_multipart(frames)

    def close(self) -> None:
        self.socket.close(linger=0)
        self.context.term()

    def __enter__(self) -> "RawPublisher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_line(pipe, timeout_s: float, what: str) -> str:
    """One line from ``pipe``, an unbuffered binary pipe of a subprocess (``Popen(..., bufsize=0)``); fails naming
    ``what`` when no whole line comes within ``timeout_s`` or the pipe closes first."""
    deadline_s = time.monotonic() + timeout_s
    line = bytearray()
    while not line.endswith(b"\n"):
        remaining_s = deadline_s - time.monotonic()
        if remaining_s <= 0 or not select.select([pipe], [], [], remaining_s)[0]:
            raise AssertionError(f"no line from {what} within {timeout_s} s (read so far: {bytes(line)!r})")
        byte = os.read(pipe.fileno(), 1)  # one byte: nothing is read past the line, so later reads miss nothing
        if not byte:
            raise AssertionError(f"{what} closed its output before a whole line (read so far: {bytes(line)!r})")
        line += byte
    return line.decode("utf-8", errors="replace")


def wait_until(predicate, what: str, timeout_s: float = TIMEOUT_S):
    """:func:`tests.helpers.wait_until` with this module's timeout."""
    return helpers.wait_until(predicate, what, timeout_s)


def _stamps(seen_ago_s: float, stages: tuple[str, ...]) -> dict[str, float]:
    """Stage stamps spread between ``seen_ago_s`` ago and now (the daemon's monotonic clock)."""
    now_s = time.monotonic()
    step_s = seen_ago_s / len(stages)
    return {stage: now_s - seen_ago_s + i * step_s for i, stage in enumerate(stages)}
