import io
import json
import math
from types import MappingProxyType

import numpy as np
import pytest
from PIL import Image

from rtdecode.errors import ProtocolError
from rtdecode.publish import protocol
from rtdecode.publish.protocol import Message, Sequencer, decode, encode


def jpeg_bytes(width=40, height=30, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def stamped(topic="status", **fields):
    return Sequencer().make(topic, fields)


def test_topics_are_not_prefixes_of_each_other():
    # SUB subscriptions are prefixes: a topic that prefixed another would leak messages into its subscribers
    for topic in protocol.TOPICS:
        assert [other for other in protocol.TOPICS if other.startswith(topic)] == [topic]


@pytest.mark.parametrize("topic", protocol.TOPICS)
def test_round_trip_every_topic(topic):
    sequencer = Sequencer()
    header = {"run": 2, "trial_id": "t0007", "timestamps": {"seen": 1.5, "glm": 1.75}, "caption": "a dog é"}
    message = sequencer.make(topic, header)
    frames = encode(message)
    assert len(frames) == 3 and frames[0] == topic.encode() and frames[2] == b""
    back = decode(frames)
    assert back == message
    assert back.header["topic"] == topic and back.seq == 1 and back.stream == sequencer.stream
    assert back.header["schema"] == protocol.SCHEMA_VERSION
    assert back.encoding == "none"


def test_round_trip_jpeg_payload():
    data = jpeg_bytes()
    description, payload = protocol.image_payload(data, "jpeg", shape=[30, 40, 3])
    message = Sequencer().make("image", {"trial_id": "t1", "width": 40, "height": 30, "payload": description}, payload)
    back = decode(encode(message))
    assert back.payload == data and back.encoding == "jpeg"
    assert back.header["payload"] == {"encoding": "jpeg", "shape": [30, 40, 3]}
    assert Image.open(io.BytesIO(back.payload)).size == (40, 30)


def test_round_trip_float32_payload():
    values = np.random.default_rng(1).standard_normal((7, 8)).astype(np.float64)  # cast to float32 on the way
    description, payload = protocol.array_payload(values)
    assert description == {"encoding": "float32", "shape": [7, 8]} and len(payload) == 7 * 8 * 4
    back = decode(encode(Sequencer().make("beta", {"payload": description}, payload)))
    np.testing.assert_array_equal(back.array(), values.astype(np.float32))
    assert back.array().dtype == np.float32


def test_array_payload_is_little_endian_c_order():
    values = np.arange(6, dtype=">f4").reshape(2, 3).T  # big-endian, Fortran-ordered view
    description, payload = protocol.array_payload(values)
    assert description["shape"] == [3, 2]
    assert np.frombuffer(payload, dtype="<f4").tolist() == [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]


def test_json_payload_round_trip_and_wrong_encoding():
    description, payload = protocol.json_payload({"matches": [{"id": "s1", "score": 0.5}]})
    message = decode(encode(Sequencer().make("retrieval", {"payload": description}, payload)))
    assert message.json_payload() == {"matches": [{"id": "s1", "score": 0.5}]}
    with pytest.raises(ProtocolError, match="'json', not 'float32'"):
        message.array()
    with pytest.raises(ProtocolError, match="NaN|JSON payload"):
        protocol.json_payload({"score": math.nan})


def test_array_with_wrong_byte_count_is_refused():
    message = Sequencer().make("beta", {"payload": {"encoding": "float32", "shape": [3]}}, b"\x00" * 8)
    with pytest.raises(ProtocolError, match="needs 12 bytes, got 8"):
        decode(encode(message)).array()


def test_image_payload_checks_magic_bytes():
    with pytest.raises(ProtocolError, match="does not start like a PNG"):
        protocol.image_payload(jpeg_bytes(), "png")
    with pytest.raises(ProtocolError, match="'jpeg' or 'png'"):
        protocol.image_payload(jpeg_bytes(), "gif")


def test_seq_per_topic_and_stream_id():
    first, second = Sequencer(), Sequencer()
    seqs = [(m.topic, m.seq) for m in (first.make(t, {}) for t in ["status", "status", "image", "status", "image"])]
    assert seqs == [("status", 1), ("status", 2), ("image", 1), ("status", 3), ("image", 2)]
    assert first.last_seq == {"status": 3, "image": 2}
    assert second.make("status", {}).seq == 1  # a new publisher instance starts again ...
    assert first.stream != second.stream  # ... under a new stream id
    assert len(first.stream) == 16


def test_published_times_are_set():
    header = stamped().header
    assert isinstance(header["published_s"], float) and header["published_unix_s"] > 1.6e9


def test_record_timestamps_and_numpy_scalars_are_serialised():
    message = Sequencer().make("volume", {"timestamps": MappingProxyType({"seen": 1.0}), "fd_mm": np.float32(0.25)})
    assert decode(encode(message)).header["timestamps"] == {"seen": 1.0}
    assert decode(encode(message)).header["fd_mm"] == 0.25


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_in_header_is_refused_naming_the_topic(bad):
    sequencer = Sequencer()
    with pytest.raises(ProtocolError, match="motion: header holds NaN"):
        sequencer.make("motion", {"fd_mm": bad})
    with pytest.raises(ProtocolError, match="motion: header holds NaN"):
        encode(Message("motion", {"timestamps": {"glm": bad}}))
    assert sequencer.make("motion", {"fd_mm": 0.1}).seq == 1  # the refused message spent no seq


def test_non_json_header_is_refused():
    with pytest.raises(ProtocolError, match="caption: header is not JSON-serialisable"):
        Sequencer().make("caption", {"caption": object()})


def test_publisher_fields_cannot_be_set_by_the_caller():
    with pytest.raises(ProtocolError, match="seq are set by the publisher"):
        Sequencer().make("status", {"seq": 5})


def test_payload_needs_a_description():
    with pytest.raises(ProtocolError, match="needs header 'payload'"):
        Sequencer().make("image", {}, jpeg_bytes())
    with pytest.raises(ProtocolError, match="needs header 'payload'"):
        Sequencer().make("image", {"payload": {"encoding": "gif"}}, b"GIF89a")


def test_unknown_topic_is_refused_on_both_sides():
    with pytest.raises(ProtocolError, match="unknown topic 'decode'"):
        Sequencer().make("decode", {})
    frames = encode(stamped())
    with pytest.raises(ProtocolError, match="unknown topic 'decode'"):
        decode([b"decode", *frames[1:]])


@pytest.mark.parametrize("n_frames", [0, 2, 4])
def test_wrong_frame_count(n_frames):
    frames = (encode(stamped()) + [b"extra"])[:n_frames]
    with pytest.raises(ProtocolError, match=f"3 frames .*got {n_frames}"):
        decode(frames)


def test_topic_frame_not_ascii():
    with pytest.raises(ProtocolError, match="topic frame is not ASCII"):
        decode([b"im\xe4ge", b"{}", b""])


@pytest.mark.parametrize(
    "header, error",
    [
        (b"not json", "status header is not UTF-8 JSON"),
        (b"\xff\xfe", "status header is not UTF-8 JSON"),
        (b"[1, 2]", "status header must be a JSON object, got list"),
        (b'"text"', "status header must be a JSON object, got str"),
    ],
)
def test_header_not_a_json_object(header, error):
    with pytest.raises(ProtocolError, match=error):
        decode([b"status", header, b""])


@pytest.mark.parametrize("field", protocol.PUBLISHER_FIELDS)
def test_missing_required_header_field(field):
    header = dict(stamped().header)
    del header[field]
    with pytest.raises(ProtocolError, match=f"missing required field\\(s\\) {field}"):
        decode([b"status", json.dumps(header).encode(), b""])


@pytest.mark.parametrize(
    "change, error",
    [
        ({"schema": 2}, "schema version 2 is newer than this reader's version 1"),
        ({"schema": "1"}, "'schema' must be a positive integer"),
        ({"schema": 0}, "'schema' must be a positive integer"),
        ({"topic": "image"}, "header field 'topic' is 'image' but the topic frame is 'status'"),
        ({"seq": 0}, "'seq' must be an integer >= 1"),
        ({"seq": True}, "'seq' must be an integer >= 1"),
        ({"stream": ""}, "'stream' must be a non-empty string"),
    ],
)
def test_bad_publisher_fields(change, error):
    header = {**stamped().header, **change}
    with pytest.raises(ProtocolError, match=error):
        decode([b"status", json.dumps(header).encode(), b""])


def test_snapshot_reply_round_trip():
    sequencer = Sequencer()
    messages = [sequencer.make("status", {"kind": "heartbeat"}), sequencer.make("image", {"trial_id": "t1"})]
    frames = protocol.snapshot_reply(sequencer.stream, sequencer.last_seq, [encode(m) for m in messages])
    snapshot = protocol.decode_snapshot(frames)
    assert snapshot.stream == sequencer.stream and snapshot.seq == {"status": 1, "image": 1}
    assert list(snapshot.messages) == messages


@pytest.mark.parametrize(
    "frames, error",
    [
        ([], "empty snapshot reply"),
        (protocol.error_reply("no such thing"), "snapshot refused by the publisher: no such thing"),
        ([b"hello", b"{}"], "starts with b'snapshot'"),
        ([b"snapshot", b'{"schema": 1, "stream": "s", "seq": {}}'], "missing required field\\(s\\) n_messages"),
        ([b"snapshot", b'{"schema": 9, "stream": "s", "n_messages": 0, "seq": {}}'], "9 is newer than .* 1"),
        ([b"snapshot", b'{"schema": 1, "stream": "s", "n_messages": 1, "seq": {}}'], "says 1 messages but carries 0"),
        ([b"snapshot", b'{"schema": 1, "stream": "s", "n_messages": 0, "seq": []}'], "'seq' must map topics"),
    ],
)
def test_bad_snapshot_replies(frames, error):
    with pytest.raises(ProtocolError, match=error):
        protocol.decode_snapshot(frames)
