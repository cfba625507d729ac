"""Frames between the dispatcher (scanner side, ROUTER) and the decode workers (GPU nodes, DEALERs).

Every message is three frames, ``[kind, JSON header, payload]`` (the ROUTER adds the worker's identity in front):

==========  ==========  =================================================================================
sender      kind        header fields (besides ``"v"``, the protocol version)
==========  ==========  =================================================================================
worker      ready       ``name``, ``idle_seq``: "I am free (for the idle_seq-th time): send me one job"
worker      heartbeat   ``name``, ``jobs``: the ``[job_id, attempt]`` pairs it holds
worker      part        ``job_id``, ``attempt``, ``final``, ``fields`` (the result header, e.g. a topic)
worker      bye         ``name``: the worker leaves; forget it now
dispatcher  heartbeat   ``instance`` (changes on restart), ``known`` (false: "announce yourself again")
dispatcher  job         ``job_id``, ``attempt``, ``instance``, ``fields`` (the job header)
==========  ==========  =================================================================================

The payload is raw bytes (float32 beta bytes, JPEG bytes, or empty). JSON and bytes only: no pickle, so a peer
can never make the other side run code. Header floats must be finite (displays parse strict JSON).
"""

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from rtdecode.errors import ProtocolError

PROTOCOL_VERSION = 1
Sender = Literal["worker", "dispatcher"]

_LIST = (list,)
_FIELDS: dict[tuple[str, str], dict[str, tuple[type, ...]]] = {
    ("worker", "ready"): {"name": (str,), "idle_seq": (int,)},
    ("worker", "heartbeat"): {"name": (str,), "jobs": _LIST},
    ("worker", "part"): {"job_id": (str,), "attempt": (int,), "final": (bool,), "fields": (dict,)},
    ("worker", "bye"): {"name": (str,)},
    ("dispatcher", "heartbeat"): {"instance": (str,), "known": (bool,)},
    ("dispatcher", "job"): {"job_id": (str,), "attempt": (int,), "instance": (str,), "fields": (dict,)},
}


@dataclass(frozen=True)
class Job:
    """One unit of decode work (e.g. one trial's beta): ``header`` is JSON, ``payload`` raw bytes.

    ``attempt`` counts how many times the job has been handed out (a job whose worker died comes back with
    ``attempt + 1``).
    """

    job_id: str
    header: dict = field(default_factory=dict)
    payload: bytes = b""
    attempt: int = 1


@dataclass(frozen=True)
class JobPart:
    """One result of a job, as a worker yielded it (e.g. a quick retrieval part, later an image part).

    ``final`` marks the job's last part. An error part has ``header == {"error": "..."}`` and ``final=True``; a
    final part with an empty header and payload only says "the job is done".
    """

    job_id: str
    header: dict
    payload: bytes
    final: bool
    worker: str
    attempt: int


@dataclass(frozen=True)
class Message:
    """A decoded message: its kind, its header (version included) and its payload."""

    kind: str
    header: dict
    payload: bytes


def encode_ready(name: str, idle_seq: int) -> list[bytes]:
    """A worker's offer to take one job (also its announcement)."""
    return _encode("worker", "ready", {"name": name, "idle_seq": idle_seq})


def encode_worker_heartbeat(name: str, jobs: list[tuple[str, int]]) -> list[bytes]:
    """A worker's heartbeat, naming the ``(job_id, attempt)`` pairs it holds."""
    return _encode("worker", "heartbeat", {"name": name, "jobs": [[job_id, attempt] for job_id, attempt in jobs]})


def encode_part(job_id: str, attempt: int, fields: dict, payload: bytes, final: bool) -> list[bytes]:
    """One result part of a job."""
    header = {"job_id": job_id, "attempt": attempt, "final": final, "fields": fields}
    return _encode("worker", "part", header, payload)


def encode_bye(name: str) -> list[bytes]:
    """A worker leaving on purpose."""
    return _encode("worker", "bye", {"name": name})


def encode_dispatcher_heartbeat(instance: str, known: bool) -> list[bytes]:
    """The dispatcher's heartbeat; ``known=False`` asks an unknown worker to announce itself."""
    return _encode("dispatcher", "heartbeat", {"instance": instance, "known": known})


def encode_job(job: Job, instance: str) -> list[bytes]:
    """A job handed to a worker by dispatcher ``instance``."""
    header = {"job_id": job.job_id, "attempt": job.attempt, "instance": instance, "fields": job.header}
    return _encode("dispatcher", "job", header, job.payload)


def decode(frames: list[bytes], sender: Sender) -> Message:
    """Check and decode ``[kind, header, payload]`` sent by ``sender``; :class:`ProtocolError` if malformed."""
    if len(frames) != 3:
        raise ProtocolError(f"a remote message must have 3 frames [kind, header, payload]; got {len(frames)}")
    kind = _decode_kind(frames[0], sender)
    header = _decode_header(frames[1], kind)
    _check_header(sender, kind, header)
    return Message(kind, header, bytes(frames[2]))


def job_from_message(message: Message) -> Job:
    """The :class:`Job` a ``job`` message carries."""
    header = message.header
    return Job(header["job_id"], header["fields"], message.payload, header["attempt"])


def part_from_message(message: Message, worker: str) -> JobPart:
    """The :class:`JobPart` a ``part`` message from ``worker`` carries."""
    header = message.header
    return JobPart(header["job_id"], header["fields"], message.payload, header["final"], worker, header["attempt"])


def held_jobs(message: Message) -> set[tuple[str, int]]:
    """The ``(job_id, attempt)`` pairs a worker heartbeat says the worker holds."""
    return {(job_id, attempt) for job_id, attempt in message.header["jobs"]}


def _encode(sender: Sender, kind: str, header: dict, payload: bytes = b"") -> list[bytes]:
    full_header = {"v": PROTOCOL_VERSION, **header}
    _check_header(sender, kind, full_header)
    try:
        header_bytes = json.dumps(full_header, allow_nan=False, separators=(",", ":")).encode()
    except (TypeError, ValueError) as error:
        raise ProtocolError(f"{kind} header must be JSON with finite numbers: {error}; got {header!r:.200}") from error
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise ProtocolError(f"{kind} payload must be bytes; got {type(payload).__name__}")
    return [kind.encode(), header_bytes, bytes(payload)]


def _decode_kind(frame: bytes, sender: Sender) -> str:
    try:
        kind = bytes(frame).decode("ascii")
    except UnicodeDecodeError as error:
        raise ProtocolError(f"message kind must be ASCII; got {bytes(frame)[:40]!r}") from error
    kinds = sorted(k for s, k in _FIELDS if s == sender)
    if kind not in kinds:
        raise ProtocolError(f"a {sender} sends kinds {kinds}; got {kind!r:.40}")
    return kind


def _decode_header(frame: bytes, kind: str) -> dict:
    try:
        header = json.loads(bytes(frame))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:  # RecursionError: absurdly nested JSON
        raise ProtocolError(f"{kind} header must be JSON: {type(error).__name__}") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"{kind} header must be a JSON object; got {type(header).__name__}")
    return header


def _check_header(sender: Sender, kind: str, header: dict) -> None:
    if header.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(
            f"{kind} header field v must be protocol version {PROTOCOL_VERSION}; got {header.get('v')!r}"
        )
    for name, types in _FIELDS[(sender, kind)].items():
        if name not in header:
            raise ProtocolError(f"{sender} {kind} header lacks field {name!r}")
        if not _is_instance(header[name], types):
            wanted = "/".join(t.__name__ for t in types)
            raise ProtocolError(f"{sender} {kind} header field {name!r} must be {wanted}; got {header[name]!r:.80}")
    if kind == "heartbeat" and sender == "worker":
        _check_job_pairs(header["jobs"])


def _check_job_pairs(jobs: list) -> None:
    for pair in jobs:
        if not (isinstance(pair, list) and len(pair) == 2 and _is_instance(pair[0], (str,))):
            raise ProtocolError(f"worker heartbeat field 'jobs' must hold [job_id, attempt] pairs; got {pair!r:.80}")
        if not _is_instance(pair[1], (int,)):
            raise ProtocolError(f"worker heartbeat field 'jobs' attempt must be an integer; got {pair!r:.80}")


def _is_instance(value: Any, types: tuple[type, ...]) -> bool:
    """isinstance, except that a bool is not an int (JSON true is not an attempt number)."""
    if isinstance(value, bool) and bool not in types:
        return False
    return isinstance(value, types)
