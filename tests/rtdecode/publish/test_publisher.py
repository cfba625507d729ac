import json
import re
import threading
import time

import numpy as np
import pytest
import zmq

from rtdecode.errors import ConfigError, ProtocolError, SecurityError, ServeError
from rtdecode.publish import keys, protocol
from rtdecode.publish.publisher import DEFAULT_HISTORY, Publisher
from rtdecode.publish.subscriber import Subscriber

LOOPBACK = "tcp://127.0.0.1:*"
TIMEOUT_S = 10.0  # generous: a wait that ends as soon as the thing happens


@pytest.fixture
def publisher():
    with Publisher(LOOPBACK, LOOPBACK) as publisher:
        yield publisher


def wait_live(publisher, *subscribers, timeout_s=TIMEOUT_S):
    """Publish status probes until every subscriber has received one (its subscription is live)."""
    waiting = list(subscribers)
    deadline = time.monotonic() + timeout_s
    while waiting:
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(waiting)} subscriber(s) received nothing in {timeout_s} s")
        publisher.publish("status", {"kind": "probe"})
        waiting = [sub for sub in waiting if sub.receive(0.05) is None]


def receive_until(subscriber, done, timeout_s=TIMEOUT_S):
    """Messages received until ``done(message)`` is true for one (included)."""
    received = []
    deadline = time.monotonic() + timeout_s
    while not received or not done(received[-1]):
        message = subscriber.receive(max(0.0, deadline - time.monotonic()))
        if message is None:
            raise AssertionError(f"timed out after {[(m.topic, m.seq) for m in received][-5:]}")
        received.append(message)
    return received


def raw_request(context, endpoint, kind, frames, timeout_s=TIMEOUT_S):
    socket = context.socket(kind)
    socket.connect(endpoint)
    socket.send_multipart(frames)
    assert socket.poll(timeout_s * 1000), f"no reply from {endpoint}"
    reply = socket.recv_multipart()
    socket.close()
    return reply


def test_endpoints_are_the_bound_ones(publisher):
    for endpoint in (publisher.publish_endpoint, publisher.snapshot_endpoint):
        assert re.fullmatch(r"tcp://127\.0\.0\.1:\d+", endpoint)
    assert publisher.publish_endpoint != publisher.snapshot_endpoint


def test_messages_arrive_in_order_with_seqs_from_two_threads(publisher):
    n_per_thread = 300
    with Subscriber(publisher.publish_endpoint, topics=["status", "motion"]) as sub:
        wait_live(publisher, sub)
        start = threading.Barrier(2)

        def publish_motion(thread_name):
            start.wait()
            for i in range(n_per_thread):
                publisher.publish("motion", {"thread": thread_name, "i": i, "fd_mm": 0.1})

        threads = [threading.Thread(target=publish_motion, args=(name,)) for name in ("volumes", "decoder")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        motion = [m for m in receive_until(sub, lambda m: m.topic == "motion" and m.seq == 2 * n_per_thread)]
    motion = [m for m in motion if m.topic == "motion"]
    assert [m.seq for m in motion] == list(range(1, 2 * n_per_thread + 1))
    for name in ("volumes", "decoder"):
        assert [m.header["i"] for m in motion if m.header["thread"] == name] == list(range(n_per_thread))
    assert {m.stream for m in motion} == {publisher.stream}


def test_publish_returns_the_sent_message_with_payload(publisher):
    description, payload = protocol.array_payload(np.arange(12, dtype=np.float32).reshape(3, 4))
    with Subscriber(publisher.publish_endpoint, topics=["status", "beta"]) as sub:
        wait_live(publisher, sub)
        sent = publisher.publish("beta", {"trial_id": "t1", "version": "online", "payload": description}, payload)
        received = receive_until(sub, lambda m: m.topic == "beta")[-1]
    assert received == sent
    np.testing.assert_array_equal(received.array(), np.arange(12).reshape(3, 4))


@pytest.mark.parametrize("kind", [zmq.REQ, zmq.DEALER])  # REQ adds an empty delimiter frame, DEALER does not
def test_snapshot_from_req_and_dealer(publisher, context, kind):
    sent = [
        publisher.publish("status", {"kind": "run_started"}),
        publisher.publish("image", {"trial_id": "t1"}),
        publisher.publish("motion", {"volume": 0}),
        publisher.publish("image", {"trial_id": "t2"}),
    ]
    reply = raw_request(context, publisher.snapshot_endpoint, kind, [b"snapshot"])
    assert reply[0] == b"snapshot"
    info = json.loads(reply[1])
    assert info == {
        "schema": 1,
        "stream": publisher.stream,
        "n_messages": 4,
        "seq": {"status": 1, "image": 2, "motion": 1},
    }
    assert [protocol.decode(reply[i : i + 3]) for i in range(2, len(reply), 3)] == sent


@pytest.mark.parametrize("frames", [[b"gallery"], [b"snapshot", b"please"], [b""]])
def test_unknown_request_gets_an_error_and_the_service_goes_on(publisher, context, frames):
    reply = raw_request(context, publisher.snapshot_endpoint, zmq.DEALER, frames)
    assert reply[0] == b"error" and len(reply) == 2
    assert "send the single frame b'snapshot'" in json.loads(reply[1])["reason"]
    assert raw_request(context, publisher.snapshot_endpoint, zmq.REQ, [b"snapshot"])[0] == b"snapshot"


def test_snapshot_of_the_subscribed_topics(publisher):
    publisher.publish("image", {"trial_id": "t1"})
    publisher.publish("caption", {"trial_id": "t1", "caption": "a cat"})
    publisher.publish("image", {"trial_id": "t2"})
    with Subscriber(publisher.publish_endpoint, publisher.snapshot_endpoint, topics=["image"]) as sub:
        assert [m.header["trial_id"] for m in sub.snapshot(TIMEOUT_S)] == ["t1", "t2"]


def test_late_joiner_gets_history_then_live_without_duplicates(publisher):
    for i in range(3):
        publisher.publish("image", {"trial_id": f"t{i}"})
    publisher.publish("motion", {"volume": 0})
    with Subscriber(publisher.publish_endpoint, publisher.snapshot_endpoint, topics=["image", "status"]) as sub:
        wait_live(publisher, sub)
        for i in range(3, 5):  # live in the SUB queue and in the history: the snapshot must win once
            publisher.publish("image", {"trial_id": f"t{i}"})
        caught_up = sub.catch_up(TIMEOUT_S)
        last_probe = publisher._sequencer.last_seq["status"]
        assert [(m.topic, m.seq) for m in caught_up] == [
            ("image", 1),
            ("image", 2),
            ("image", 3),
            ("status", last_probe),
            ("image", 4),
            ("image", 5),
        ]
        after = publisher.publish("image", {"trial_id": "t5"})
        assert receive_until(sub, lambda m: m.topic == "image") == [after]
        assert sub.resyncs == 0 and sub.n_lost == 0


def test_catch_up_before_anything_was_published(publisher):
    with Subscriber(publisher.publish_endpoint, publisher.snapshot_endpoint) as sub:
        assert sub.catch_up(TIMEOUT_S) == []
        sent = publisher.publish("status", {"kind": "run_started"})
        assert sub.receive(TIMEOUT_S) == sent


def test_a_gap_is_refilled_from_a_fresh_snapshot(publisher):
    """A display that falls far behind loses messages at the high-water marks; the seq jump brings a snapshot."""
    n_burst, n_kept = 6000, 200
    with Publisher(LOOPBACK, LOOPBACK, history={"beta": n_kept}) as pub:
        with Subscriber(pub.publish_endpoint, pub.snapshot_endpoint, topics=["beta"]) as sub:
            sub.catch_up(TIMEOUT_S)
            description, payload = protocol.array_payload(np.zeros(2048, dtype=np.float32))  # 8 kB
            for _ in range(n_burst):  # far beyond both high-water marks and the TCP buffers: the tail is dropped
                pub.publish("beta", {"payload": description}, payload)
            received = []
            deadline = time.monotonic() + 30.0
            while not received or received[-1].seq != pub._sequencer.last_seq["beta"]:
                assert time.monotonic() < deadline
                pub.publish("beta", {"payload": description}, payload)  # reveals the gap once the queue drained
                while (message := sub.receive(0.01)) is not None:
                    received.append(message)
            n_published = pub._sequencer.last_seq["beta"]
    seqs = [m.seq for m in received]
    assert seqs == sorted(set(seqs))
    assert sub.resyncs >= 1 and sub.n_lost > 0
    assert len(seqs) + sub.n_lost == n_published
    assert seqs[-n_kept:] == list(range(n_published - n_kept + 1, n_published + 1))


def test_a_restarted_publisher_is_followed(context):
    first = Publisher(LOOPBACK, LOOPBACK)
    endpoints = (first.publish_endpoint, first.snapshot_endpoint)
    with Subscriber(*endpoints) as sub:
        sub.catch_up(TIMEOUT_S)
        for i in range(5):
            first.publish("image", {"trial_id": f"t{i}"})
        assert [m.seq for m in receive_until(sub, lambda m: m.seq == 5)] == [1, 2, 3, 4, 5]
        first.close()
        with Publisher(*endpoints) as second:  # same ports: the daemon came back
            wait_live(second, sub)
            sent = second.publish("image", {"trial_id": "t0"})
            received = receive_until(sub, lambda m: m.topic == "image")
    assert second.stream != first.stream
    assert received[-1] == sent and received[-1].seq == 1  # not taken for a duplicate of the old stream's image 1


def test_history_limits(context):
    with Publisher(LOOPBACK, LOOPBACK, history={"image": 3, "motion": 0}) as pub:
        for i in range(5):
            pub.publish("image", {"trial_id": f"t{i}"})
            pub.publish("motion", {"volume": i})
            pub.publish("status", {"kind": "heartbeat", "n_volumes": i})
        reply = raw_request(context, pub.snapshot_endpoint, zmq.REQ, [b"snapshot"])
    info = json.loads(reply[1])
    kept = [protocol.decode(reply[i : i + 3]) for i in range(2, len(reply), 3)]
    assert [(m.topic, m.seq) for m in kept] == [("image", 3), ("image", 4), ("image", 5), ("status", 5)]
    assert info["seq"] == {"image": 5, "motion": 5, "status": 5}


def test_default_history():
    assert DEFAULT_HISTORY == {
        "status": 1,
        "volume": 1,
        "motion": 512,
        "beta": 1,
        "retrieval": 128,
        "preview": 128,
        "caption": 128,
        "image": 128,
    }
    with Publisher(LOOPBACK, LOOPBACK, history={"image": 2}) as pub:
        assert pub.history_sizes == {**DEFAULT_HISTORY, "image": 2}


@pytest.mark.parametrize(
    "history, error, match",
    [
        ({"gallery": 5}, ProtocolError, "unknown topic 'gallery'"),
        ({"image": -1}, ConfigError, "history\\['image'\\] must be a count >= 0, got -1"),
        ({"image": 2.5}, ConfigError, "got 2.5"),
    ],
)
def test_bad_history(history, error, match):
    with pytest.raises(error, match=match):
        Publisher(LOOPBACK, LOOPBACK, history=history)


def test_clear_history(publisher):
    publisher.publish("image", {"trial_id": "t1"})
    publisher.publish("status", {"kind": "run_ended"})
    publisher.clear_history(["image"])
    with Subscriber(publisher.publish_endpoint, publisher.snapshot_endpoint) as sub:
        assert [m.topic for m in sub.snapshot(TIMEOUT_S)] == ["status"]
        publisher.clear_history()
        assert sub.snapshot(TIMEOUT_S) == []
        caught_up = sub.catch_up(TIMEOUT_S)  # seq goes on after a clear: the next image is 2
        sent = publisher.publish("image", {"trial_id": "t2"})
        assert caught_up == [] and sent.seq == 2
        assert receive_until(sub, lambda m: m.topic == "image") == [sent]
    with pytest.raises(ProtocolError, match="unknown topic 'gallery'"):
        publisher.clear_history(["gallery"])


def test_publish_refuses_bad_messages_and_keeps_seq(publisher):
    with pytest.raises(ProtocolError, match="unknown topic"):
        publisher.publish("decode", {})
    with pytest.raises(ProtocolError, match="motion: header holds NaN"):
        publisher.publish("motion", {"fd_mm": float("nan")})
    assert publisher.publish("motion", {"fd_mm": 0.2}).seq == 1


def test_close_is_idempotent_and_final():
    publisher = Publisher(LOOPBACK, LOOPBACK)
    endpoint = publisher.publish_endpoint
    publisher.close()
    publisher.close()
    with pytest.raises(ServeError, match=f"publisher on {re.escape(endpoint)} is closed"):
        publisher.publish("status", {})
    with Publisher(endpoint, LOOPBACK) as again:  # the port is free again
        assert again.publish_endpoint == endpoint


def test_taken_port_is_a_serve_error(publisher):
    with pytest.raises(ServeError, match=f"cannot bind publish_endpoint {re.escape(publisher.publish_endpoint)}"):
        Publisher(publisher.publish_endpoint, LOOPBACK)


def test_shared_context_is_left_open(context):
    with Publisher(LOOPBACK, LOOPBACK, context=context) as pub:
        pub.publish("status", {})
    socket = context.socket(zmq.PUB)  # still usable: the caller owns it
    socket.close()


def test_subscriber_without_snapshot_endpoint(publisher):
    with Subscriber(publisher.publish_endpoint) as sub:
        with pytest.raises(ConfigError, match="without a snapshot_endpoint"):
            sub.snapshot(1.0)


def test_snapshot_timeout_names_the_endpoint(context):
    silent = context.socket(zmq.ROUTER)  # bound, never answers
    silent.bind(LOOPBACK)
    endpoint = silent.get(zmq.LAST_ENDPOINT).decode()
    with Subscriber("tcp://127.0.0.1:9", endpoint) as sub:
        with pytest.raises(TimeoutError, match=f"no snapshot from {re.escape(endpoint)} within 0.5 s"):
            sub.snapshot(0.5)


def test_unknown_subscriber_topic():
    with pytest.raises(ProtocolError, match="unknown topic 'images'"):
        Subscriber("tcp://127.0.0.1:9", topics=["images"])


# --- CURVE -------------------------------------------------------------------------------------------------------


@pytest.fixture
def curve_keys(pairs):
    return {
        "server": keys.CurveServer(pairs["server_secret"], pairs["authorised"]),
        "good": keys.CurveClient(pairs["client_secret"], pairs["server_public"]),
        "bad": keys.CurveClient(pairs["stranger_secret"], pairs["server_public"]),
    }


@pytest.fixture
def curve_publisher(curve_keys):
    with curve_keys["server"], Publisher(LOOPBACK, LOOPBACK, curve=curve_keys["server"]) as publisher:
        yield publisher


def test_curve_only_authorised_clients_receive(curve_publisher, curve_keys):
    endpoints = (curve_publisher.publish_endpoint, curve_publisher.snapshot_endpoint)
    with (
        Subscriber(*endpoints, curve=curve_keys["good"]) as good,
        Subscriber(*endpoints, curve=curve_keys["bad"]) as stranger,
        Subscriber(*endpoints) as plain,
    ):
        wait_live(curve_publisher, good)
        sent = curve_publisher.publish("image", {"trial_id": "t1"})
        assert receive_until(good, lambda m: m.topic == "image")[-1] == sent
        assert stranger.receive(1.0) is None
        assert plain.receive(1.0) is None


def test_curve_protects_the_snapshot_socket(curve_publisher, curve_keys, context):
    sent = curve_publisher.publish("image", {"trial_id": "t1"})
    endpoints = (curve_publisher.publish_endpoint, curve_publisher.snapshot_endpoint)
    with Subscriber(*endpoints, curve=curve_keys["good"]) as good:
        assert good.snapshot(TIMEOUT_S) == [sent]
    with Subscriber(*endpoints, curve=curve_keys["bad"]) as stranger:
        with pytest.raises(TimeoutError, match="no snapshot"):
            stranger.snapshot(1.0)
    plain = context.socket(zmq.REQ)
    plain.connect(curve_publisher.snapshot_endpoint)
    plain.send(b"snapshot")
    assert plain.poll(1000) == 0


def test_catch_up_names_the_refused_key(curve_publisher, curve_keys):
    endpoints = (curve_publisher.publish_endpoint, curve_publisher.snapshot_endpoint)
    with Subscriber(*endpoints, curve=curve_keys["bad"]) as stranger:
        with pytest.raises(SecurityError, match="refused this client's CURVE key"):
            stranger.catch_up(TIMEOUT_S)
    with Subscriber(*endpoints) as plain:
        with pytest.raises(SecurityError, match="another security mechanism"):
            plain.catch_up(TIMEOUT_S)
    with Subscriber(*endpoints, curve=curve_keys["good"]) as good:
        assert good.catch_up(TIMEOUT_S) == []


def test_network_endpoint_needs_curve():
    with pytest.raises(SecurityError, match="publish_endpoint tcp://\\*:5555 is not loopback"):
        Publisher("tcp://*:5555", LOOPBACK)
    with pytest.raises(SecurityError, match="snapshot_endpoint tcp://192.0.2.1:5556 is not loopback"):
        Publisher(LOOPBACK, "tcp://192.0.2.1:5556")
