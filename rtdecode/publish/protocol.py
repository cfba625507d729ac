"""The wire format between the daemon and display clients (``docs/protocol.md`` is the contract).

A message is three ZeroMQ frames: ``[topic (ASCII), header (UTF-8 JSON object), payload (bytes, may be empty)]``.
The header carries the publisher's fields (:data:`PUBLISHER_FIELDS`: schema, topic, per-topic ``seq``, the
publisher's ``stream`` id, publish times) plus what the caller adds per topic (ids, stage timestamps, the payload
description ``{"encoding": ..., "shape": [...]}``). JSON only (no NaN, no pickle), so any language can read it.

The snapshot a late joiner asks for is one multipart reply ``[b"snapshot", JSON {"schema", "stream", "n_messages",
"seq"}, then the three frames of each message]``; a refused request is ``[b"error", JSON {"reason"}]``.
"""

import dataclasses
import json
import math
import secrets
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rtdecode.errors import NewerSchemaError, ProtocolError

SCHEMA_VERSION = 1
TOPICS = ("status", "volume", "motion", "beta", "retrieval", "preview", "caption", "image")
ENCODINGS = ("jpeg", "png", "float32", "json", "none")
PUBLISHER_FIELDS = ("schema", "topic", "seq", "stream", "published_s", "published_unix_s")
N_FRAMES = 3
FLOAT32_DTYPE = "<f4"  # little-endian float32, C order
SNAPSHOT_REQUEST = b"snapshot"
SNAPSHOT_REPLY = b"snapshot"
ERROR_REPLY = b"error"
_IMAGE_MAGIC = {"jpeg": b"\xff\xd8\xff", "png": b"\x89PNG\r\n\x1a\n"}
_SNAPSHOT_FIELDS = ("schema", "stream", "n_messages", "seq")


@dataclasses.dataclass(frozen=True)
class Message:
    """One published message: its topic, its JSON header and its payload bytes."""

    topic: str
    header: dict[str, Any]
    payload: bytes = b""

    @property
    def seq(self) -> int:
        """Per-topic sequence number: 1 for the first message of a topic from one publisher, +1 each."""
        return self.header["seq"]

    @property
    def stream(self) -> str:
        """Random id of the publisher instance: a new one after a daemon restart (``seq`` starts again)."""
        return self.header["stream"]

    @property
    def encoding(self) -> str:
        """The payload encoding from the header's payload description; ``"none"`` when it has none."""
        description = self.header.get("payload") or {}
        return description.get("encoding", "none") if isinstance(description, dict) else "none"

    def json_payload(self) -> Any:
        """The payload decoded as JSON (payload encoding ``"json"``)."""
        self._require_encoding("json")
        try:
            return json.loads(self.payload)
        except ValueError as err:
            raise ProtocolError(f"{self.topic} seq {self.seq}: payload is not valid JSON: {err}") from None

    def array(self) -> np.ndarray:
        """The payload as a float32 array of the described ``shape`` (payload encoding ``"float32"``); read-only."""
        self._require_encoding("float32")
        shape = self.header["payload"].get("shape")
        if not isinstance(shape, list) or not all(_is_int(n) and n >= 0 for n in shape):
            raise ProtocolError(f"{self.topic} seq {self.seq}: payload 'shape' must be a list of counts, got {shape!r}")
        n_values = math.prod(shape)
        if len(self.payload) != 4 * n_values:
            raise ProtocolError(
                f"{self.topic} seq {self.seq}: float32 payload of shape {shape} needs {4 * n_values} bytes, "
                f"got {len(self.payload)}"
            )
        return np.frombuffer(self.payload, dtype=FLOAT32_DTYPE).reshape(shape)

    def _require_encoding(self, expected: str) -> None:
        if self.encoding != expected:
            raise ProtocolError(f"{self.topic} seq {self.seq}: payload encoding is {self.encoding!r}, not {expected!r}")


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """A decoded snapshot reply: the publisher's stream id, the last ``seq`` of each topic it has published (at the
    moment of the snapshot) and the kept history, oldest first."""

    stream: str
    seq: dict[str, int]
    messages: tuple[Message, ...]


def check_topic(topic: str) -> str:
    """``topic`` if it is one of :data:`TOPICS`, else a ProtocolError."""
    if topic not in TOPICS:
        raise ProtocolError(f"unknown topic {topic!r}; topics are {', '.join(TOPICS)}")
    return topic


def encode(message: Message) -> list[bytes]:
    """The three frames of ``message``. NaN/inf or non-JSON values in the header are a ProtocolError."""
    check_topic(message.topic)
    if not isinstance(message.payload, bytes | bytearray | memoryview):
        raise ProtocolError(f"{message.topic}: payload must be bytes, got {type(message.payload).__name__}")
    return [message.topic.encode("ascii"), _dump_header(message.topic, message.header), bytes(message.payload)]


def decode(frames: Sequence[bytes]) -> Message:
    """The message in ``frames``; a ProtocolError that says what is wrong when they do not follow the protocol."""
    if len(frames) != N_FRAMES:
        raise ProtocolError(f"a message has {N_FRAMES} frames [topic, header, payload], got {len(frames)}")
    topic = _decode_topic(bytes(frames[0]))
    header = _load_object(bytes(frames[1]), f"{topic} header")
    _check_publisher_fields(topic, header)
    return Message(topic=topic, header=header, payload=bytes(frames[2]))


def new_stream_id() -> str:
    """A random publisher-instance id (16 hex digits)."""
    return secrets.token_hex(8)


class Sequencer:
    """Stamps messages with the publisher's fields: schema, topic, per-topic ``seq`` and this instance's ``stream``.

    Not thread-safe on its own: the :class:`~rtdecode.publish.publisher.Publisher` calls it under its lock, so the
    order of ``seq`` is the order of sending.
    """

    def __init__(self, stream: str | None = None) -> None:
        self.stream = stream or new_stream_id()
        self._last_seq: dict[str, int] = {}

    @property
    def last_seq(self) -> dict[str, int]:
        """The last ``seq`` given per topic (topics never stamped are absent)."""
        return dict(self._last_seq)

    def make(self, topic: str, header: Mapping[str, Any], payload: bytes = b"") -> Message:
        """A message of ``topic`` with the caller's ``header`` fields plus the publisher's fields.

        The caller may not set the publisher's fields; a non-empty payload needs a ``payload`` description with a
        known encoding (see :func:`array_payload`, :func:`json_payload`, :func:`image_payload`). The header is
        checked as JSON before a ``seq`` is spent, so a refused message leaves no gap.
        """
        check_topic(topic)
        _check_caller_header(topic, header, payload)
        _dump_header(topic, header)
        seq = self._last_seq.get(topic, 0) + 1
        stamped = {
            "schema": SCHEMA_VERSION,
            "topic": topic,
            "seq": seq,
            "stream": self.stream,
            "published_s": time.monotonic(),
            "published_unix_s": time.time(),
            **header,
        }
        self._last_seq[topic] = seq
        return Message(topic=topic, header=stamped, payload=bytes(payload))


def array_payload(values: np.ndarray) -> tuple[dict[str, Any], bytes]:
    """A payload description and the bytes of ``values`` as little-endian float32 in C order (cast if needed)."""
    array = np.ascontiguousarray(values, dtype=FLOAT32_DTYPE)
    return {"encoding": "float32", "shape": list(array.shape)}, array.tobytes()


def json_payload(value: Any) -> tuple[dict[str, Any], bytes]:
    """A payload description and ``value`` as UTF-8 JSON bytes (NaN/inf refused: not every client parses them)."""
    try:
        data = json.dumps(value, allow_nan=False, separators=(",", ":"), default=_json_default).encode("utf-8")
    except (TypeError, ValueError) as err:
        raise ProtocolError(f"JSON payload cannot be encoded: {err}") from None
    return {"encoding": "json"}, data


def image_payload(data: bytes, encoding: str, shape: Sequence[int] | None = None) -> tuple[dict[str, Any], bytes]:
    """A payload description for an already encoded ``"jpeg"`` or ``"png"`` image (checked by its magic bytes);
    ``shape`` ([height, width, channels]) is optional, the image topics also carry ``width`` and ``height``."""
    magic = _IMAGE_MAGIC.get(encoding)
    if magic is None:
        raise ProtocolError(f"image encoding must be 'jpeg' or 'png', got {encoding!r}")
    if not bytes(data[: len(magic)]) == magic:
        raise ProtocolError(f"image payload does not start like a {encoding.upper()} file: {bytes(data[:8])!r}")
    description: dict[str, Any] = {"encoding": encoding}
    if shape is not None:
        description["shape"] = [int(n) for n in shape]
    return description, bytes(data)


def snapshot_reply(stream: str, last_seq: Mapping[str, int], message_frames: Sequence[Sequence[bytes]]) -> list[bytes]:
    """The frames of a snapshot reply holding the already encoded ``message_frames`` (oldest first)."""
    info = {"schema": SCHEMA_VERSION, "stream": stream, "n_messages": len(message_frames), "seq": dict(last_seq)}
    frames = [SNAPSHOT_REPLY, json.dumps(info, separators=(",", ":")).encode("utf-8")]
    for one in message_frames:
        frames.extend(one)
    return frames


def error_reply(reason: str) -> list[bytes]:
    """The frames of a refused request."""
    return [ERROR_REPLY, json.dumps({"reason": reason}).encode("utf-8")]


def decode_snapshot(frames: Sequence[bytes]) -> Snapshot:
    """The snapshot in a reply's ``frames``; a ProtocolError for an error reply or a malformed one."""
    if not frames:
        raise ProtocolError("empty snapshot reply")
    kind = bytes(frames[0])
    if kind == ERROR_REPLY and len(frames) == 2:
        reason = _load_object(bytes(frames[1]), "error reply").get("reason")
        raise ProtocolError(f"snapshot refused by the publisher: {reason}")
    if kind != SNAPSHOT_REPLY or len(frames) < 2:
        raise ProtocolError(f"a snapshot reply starts with {SNAPSHOT_REPLY!r} and a header, got {kind[:32]!r}")
    info = _load_object(bytes(frames[1]), "snapshot header")
    _check_snapshot_info(info, len(frames) - 2)
    messages = tuple(decode(frames[i : i + N_FRAMES]) for i in range(2, len(frames), N_FRAMES))
    return Snapshot(stream=info["stream"], seq=dict(info["seq"]), messages=messages)


def _decode_topic(frame: bytes) -> str:
    try:
        topic = frame.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError(f"topic frame is not ASCII: {frame[:32]!r}") from None
    return check_topic(topic)


def _dump_header(topic: str, header: Mapping[str, Any]) -> bytes:
    if not isinstance(header, Mapping):
        raise ProtocolError(f"{topic}: header must be a mapping, got {type(header).__name__}")
    try:
        text = json.dumps(
            dict(header), allow_nan=False, ensure_ascii=False, separators=(",", ":"), default=_json_default
        )
    except ValueError as err:
        raise ProtocolError(f"{topic}: header holds NaN or infinity, which JSON clients cannot parse ({err})") from None
    except TypeError as err:
        raise ProtocolError(f"{topic}: header is not JSON-serialisable: {err}") from None
    return text.encode("utf-8")


def _json_default(value: Any) -> Any:
    """Read-only mappings (record timestamps) and numpy scalars become plain JSON values; anything else is refused."""
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


class _NonFinite(str):
    """What a NaN, Infinity or overflowing number in received JSON is parsed into, so :func:`_load_object` can name
    where it was before refusing the object."""


def _load_object(frame: bytes, what: str) -> dict[str, Any]:
    """A received JSON object; a ProtocolError when it is not one, or holds NaN or Infinity (Python's parser
    accepts them, a browser's ``JSON.parse`` does not, and docs/protocol.md forbids them)."""
    non_finite: list[str] = []

    def constant(text: str) -> _NonFinite:  # NaN, Infinity, -Infinity
        non_finite.append(text)
        return _NonFinite(text)

    def number(text: str) -> float | _NonFinite:  # a number that overflows to infinity (1e999) is refused too
        value = float(text)
        return value if math.isfinite(value) else constant(text)

    try:
        value = json.loads(frame.decode("utf-8"), parse_constant=constant, parse_float=number)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ProtocolError(f"{what} is not UTF-8 JSON: {err}") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} must be a JSON object, got {type(value).__name__}")
    if non_finite:
        try:
            field = _non_finite_field(value)
        except RecursionError:
            field = None
        where = f"field {field!r}" if field else "a field"
        raise ProtocolError(f"{what}: {where} is {non_finite[0]}; the protocol allows no NaN or Infinity")
    return value


def _non_finite_field(value: Any, path: str = "") -> str | None:
    """Where the first non-finite number of a parsed JSON value is (``matches[0].score``), or None."""
    if isinstance(value, _NonFinite):
        return path or "(the whole value)"
    if isinstance(value, dict):
        items = [(f"{path}.{key}" if path else str(key), item) for key, item in value.items()]
    elif isinstance(value, list):
        items = [(f"{path}[{i}]", item) for i, item in enumerate(value)]
    else:
        return None
    for item_path, item in items:
        found = _non_finite_field(item, item_path)
        if found is not None:
            return found
    return None


def _check_schema(schema: Any, what: str) -> None:
    if not _is_int(schema) or schema < 1:
        raise ProtocolError(f"{what}: 'schema' must be a positive integer, got {schema!r}")
    if schema > SCHEMA_VERSION:
        raise NewerSchemaError(
            f"{what}: schema version {schema} is newer than this reader's version {SCHEMA_VERSION}; update the client"
        )


def _check_publisher_fields(topic: str, header: dict[str, Any]) -> None:
    missing = [name for name in PUBLISHER_FIELDS if name not in header]
    if missing:
        raise ProtocolError(f"{topic} header is missing required field(s) {', '.join(missing)}")
    _check_schema(header["schema"], f"{topic} header")
    if header["topic"] != topic:
        raise ProtocolError(f"header field 'topic' is {header['topic']!r} but the topic frame is {topic!r}")
    if not _is_int(header["seq"]) or header["seq"] < 1:
        raise ProtocolError(f"{topic} header: 'seq' must be an integer >= 1, got {header['seq']!r}")
    if not isinstance(header["stream"], str) or not header["stream"]:
        raise ProtocolError(f"{topic} header: 'stream' must be a non-empty string, got {header['stream']!r}")


def _check_caller_header(topic: str, header: Mapping[str, Any], payload: bytes) -> None:
    reserved = [name for name in PUBLISHER_FIELDS if name in header]
    if reserved:
        raise ProtocolError(f"{topic}: header field(s) {', '.join(reserved)} are set by the publisher, not the caller")
    description = header.get("payload")
    if description is None and not payload:
        return
    if not isinstance(description, Mapping) or description.get("encoding") not in ENCODINGS:
        raise ProtocolError(
            f"{topic}: a payload needs header 'payload' = {{'encoding': one of {', '.join(ENCODINGS)}, ...}}, "
            f"got {description!r}"
        )


def _check_snapshot_info(info: dict[str, Any], n_frames: int) -> None:
    missing = [name for name in _SNAPSHOT_FIELDS if name not in info]
    if missing:
        raise ProtocolError(f"snapshot header is missing required field(s) {', '.join(missing)}")
    _check_schema(info["schema"], "snapshot header")
    n_messages = info["n_messages"]
    if not _is_int(n_messages) or n_frames != N_FRAMES * n_messages:
        raise ProtocolError(f"snapshot says {n_messages!r} messages but carries {n_frames} message frames")
    if not isinstance(info["seq"], dict) or not all(_is_int(seq) for seq in info["seq"].values()):
        raise ProtocolError(f"snapshot header: 'seq' must map topics to integers, got {info['seq']!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
