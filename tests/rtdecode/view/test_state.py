"""DisplayState fed by a real Publisher through a real Subscriber: late join, live problems, restarts, silence,
latency statistics, the trial cap, decode workers, unknown payload encodings.

Every state here runs on a :class:`Clock` the test moves: what depends on time (silence, how long an error stays
red) sees exactly the times the test gives, however slowly the machine runs.
"""

import dataclasses
import logging
import re

import numpy as np
import pytest

from rtdecode.publish import protocol
from rtdecode.publish.publisher import Publisher
from rtdecode.publish.subscriber import Subscriber
from rtdecode.view.state import ERROR_HOLD_S, DisplayState
from tests.rtdecode.view.stream import (
    CAPTIONS,
    COLOURS,
    FD_THRESHOLD_MM,
    FLAGGED_VOLUME,
    MATCHES,
    MISSING_VOLUME,
    N_VOLUMES,
    QUARANTINED_FILE,
    TIMEOUT_S,
    Clock,
    RawPublisher,
    Stream,
    joined,
    picture,
    session,
    wait_subscribed,
    wait_until,
)


def feed_until(subscriber, state, done, what):
    """Receive into ``state`` until ``done(state)``."""

    def step():
        message = subscriber.receive(0.1)
        if message is not None:
            state.apply(message)
        return done(state)

    wait_until(step, what)


def test_a_late_join_gets_the_gallery_and_the_motion_trace_from_the_snapshot(publisher):
    stream = session(Stream(publisher))
    state = DisplayState(fd_threshold_mm=FD_THRESHOLD_MM, clock=Clock())
    with Subscriber(publisher.publish_endpoint, publisher.snapshot_endpoint) as subscriber:
        state.apply_all(subscriber.catch_up(TIMEOUT_S))
    view = state.to_json()

    assert view["run"] == 1 and view["stream"] == publisher.stream
    assert [trial["trial_id"] for trial in view["gallery"]] == ["t0004", "t0003", "t0002", "t0001"]
    latest = view["latest"]
    assert (latest["trial_id"], latest["caption"], latest["matches"]) == ("t0003", CAPTIONS["t0003"], MATCHES["t0003"])
    assert latest["stimulus_id"] == "nsd-61883" and latest["parts"] == ["retrieval", "preview", "caption", "image"]
    for message in stream.sent:
        if message.topic in ("image", "preview"):
            kept = state.image(1, message.header["trial_id"], message.topic)
            assert kept.payload == message.payload
            assert kept.content_type == {"jpeg": "image/jpeg", "png": "image/png"}[message.encoding]
    assert re.fullmatch(rf"/image/1/t0003/image\?v={state.instance}-\d+", latest["image_url"])

    motion = view["motion"]
    assert motion["volumes"] == list(range(N_VOLUMES))  # the late volume fills its place
    assert motion["flagged"] == [FLAGGED_VOLUME] and motion["fd_threshold_mm"] == FD_THRESHOLD_MM
    sent_motion = {m.header["volume"]: m.header for m in stream.sent if m.topic == "motion"}
    assert motion["params"]["trans_x_mm"] == [sent_motion[v]["params"][0] for v in range(N_VOLUMES)]
    assert motion["fd_mm"] == [sent_motion[v]["fd_mm"] for v in range(N_VOLUMES)]
    health = view["health"]
    assert (health["n_volumes"], health["n_trials_decoded"], health["n_trials_skipped"]) == (N_VOLUMES, 3, 1)
    assert health["level"] == "green" and health["state"] == "running"


def test_live_ingest_reports_and_skipped_trials_are_listed_as_problems(publisher):
    state = DisplayState(clock=Clock())
    with joined(publisher) as subscriber:
        stream = session(Stream(publisher))
        feed_until(subscriber, state, lambda s: s.to_json()["n_messages"] == len(stream.sent), "the whole session")
    view = state.to_json()

    problems = view["problems"]
    assert problems["counts"] == {"missing": 1, "quarantined": 1, "trials_skipped": 1}
    kinds = {item["kind"]: item for item in problems["items"]}
    assert kinds["missing"]["volumes"] == [MISSING_VOLUME] and kinds["missing"]["run"] == 1
    assert kinds["quarantined"]["file"] == QUARANTINED_FILE and "truncated" in kinds["quarantined"]["text"]
    assert kinds["trial_skipped"]["trial_id"] == "t0004"
    assert [item["kind"] for item in problems["items"]] == ["trial_skipped", "quarantined", "missing"]  # newest first
    skipped = next(trial for trial in view["gallery"] if trial["trial_id"] == "t0004")
    assert skipped["outcome"] == "skipped" and skipped["image_url"] is None
    log_kinds = [line["kind"] for line in view["log"]]
    assert {"started", "run_started", "late", "ingest", "trial_skipped"} <= set(log_kinds)
    assert "heartbeat" not in log_kinds


def test_a_restarted_daemon_is_followed(publisher):
    state = DisplayState(clock=Clock())
    endpoints = (publisher.publish_endpoint, publisher.snapshot_endpoint)
    with joined(publisher) as subscriber:
        first = session(Stream(publisher))
        feed_until(subscriber, state, lambda s: s.to_json()["n_messages"] == len(first.sent), "the first daemon")
        first_stream = publisher.stream
        publisher.close()
        with Publisher(*endpoints) as restarted:  # the same ports, a new stream
            second = Stream(restarted, run=2)

            def probe(s):
                second.heartbeats([0])
                return s.to_json()["stream"] == restarted.stream

            feed_until(subscriber, state, probe, "a message of the restarted daemon")
            second.status("run_started", run=2, series=12)
            second.volume(0)
            second.beta("t0101")
            second.decoded("t0101", colours=COLOURS["t0001"], caption="after the restart", matches=MATCHES["t0001"])
            feed_until(subscriber, state, lambda s: state.image(2, "t0101", "image"), "run 2's image")
    view = state.to_json()

    assert view["stream"] == second.publisher.stream != first_stream and view["n_restarts"] == 1
    assert view["run"] == 2 and [trial["trial_id"] for trial in view["gallery"]] == ["t0101"]
    assert view["latest"]["caption"] == "after the restart"
    assert view["motion"]["run"] == 2 and view["motion"]["volumes"] == [0]
    assert [run["run"] for run in view["runs"]] == [1, 2]  # run 1's trials stay until the cap
    assert state.image(1, "t0003", "image") is not None
    assert any(line["kind"] == "stream" for line in view["log"])


def test_silence_is_three_heartbeat_periods_without_a_message(publisher):
    state = DisplayState(clock=Clock(1000.0))
    assert not state.silent(1002.9) and state.silent(1003.1)  # nothing yet: the default 1 s period

    with joined(publisher) as subscriber:
        stream = Stream(publisher)
        stream.heartbeats([0, 0, 0])
        received = [subscriber.receive(TIMEOUT_S) for _ in range(3)]
    # The daemon's clock: heartbeats 2 s apart (set here rather than waited for).
    heartbeats = [
        dataclasses.replace(message, header={**message.header, "published_s": 500.0 + 2.0 * i})
        for i, message in enumerate(received)
    ]
    for i, message in enumerate(heartbeats):
        state.apply(message, received_s=2000.0 + 2.0 * i)
    last_s = 2004.0

    assert state.heartbeat_s() == pytest.approx(2.0)
    assert not state.silent(last_s + 5.9) and not state.tick(last_s + 5.9)
    assert state.to_json(last_s + 5.9)["health"]["level"] == "green"
    version = state.version
    assert state.silent(last_s + 6.1) and state.tick(last_s + 6.1) and state.version == version + 1
    health = state.to_json(last_s + 6.1)["health"]
    assert health["silent"] and health["level"] == "red" and health["reasons"][0]["code"] == "silent"
    assert "no message for 6.1 s (heartbeat every 2.0 s)" in health["reasons"][0]["text"]
    assert not state.tick(last_s + 7.0)  # still silent: nothing new to draw
    state.apply(heartbeats[-1], received_s=last_s + 7.0)  # a message: the version moves, the health is green
    assert not state.silent(last_s + 7.1) and state.to_json(last_s + 7.1)["health"]["level"] == "green"


def test_latency_statistics_are_the_median_and_95th_percentile_of_the_published_stamps(publisher):
    state = DisplayState(clock=Clock())
    with joined(publisher) as subscriber:
        stream = Stream(publisher)
        for i, seen_ago_s in enumerate([0.12, 0.5, 0.25, 0.9, 0.31, 0.18, 0.77]):
            stream.beta(f"t{i:04d}", seen_ago_s=seen_ago_s)
            stream.decoded(f"t{i:04d}", colours=COLOURS["t0001"], caption="c", matches=[], seen_ago_s=3 * seen_ago_s)
        stream.beta("t0100", version="final")  # re-estimated at the end of the run: not a real-time latency
        feed_until(subscriber, state, lambda s: s.to_json()["n_messages"] == len(stream.sent), "every trial")
    stages = {stage["key"]: stage for stage in state.to_json()["latency"]}

    def expected(topic, values_of):
        values = [values_of(m) for m in stream.sent if m.topic == topic and m.header.get("version") != "final"]
        return np.median(values), np.percentile(values, 95), values

    for topic in ("beta", "image"):
        median, p95, values = expected(
            topic, lambda m: (m.header["published_s"] - m.header["timestamps"]["seen"]) * 1e3
        )
        assert stages[topic]["n"] == 7
        assert stages[topic]["median_ms"] == pytest.approx(median, abs=2e-3)
        assert stages[topic]["p95_ms"] == pytest.approx(p95, abs=2e-3)
        assert stages[topic]["recent_ms"] == pytest.approx(values, abs=1e-3)
    stamps = [m.header["timestamps"] for m in stream.sent if m.topic == "image"]
    decode = [(s["result_received"] - s["queued"]) * 1e3 for s in stamps]
    assert stages["decode"]["median_ms"] == pytest.approx(np.median(decode), abs=2e-3)
    assert stages["worker unclip"]["median_ms"] == 812.5 and stages["worker unclip"]["n"] == 7  # once per trial
    assert stages["worker embed"]["p95_ms"] == 11.5
    assert stages["beta"]["label"] == "file close \u2192 beta"


def test_a_growing_backlog_is_amber_and_an_error_is_red_for_a_while(publisher):
    clock = Clock()
    state = DisplayState(clock=clock)
    with joined(publisher) as subscriber:
        stream = Stream(publisher)
        stream.heartbeats([0, 1, 1, 2, 3])
        feed_until(subscriber, state, lambda s: s.to_json()["n_messages"] == 5, "the heartbeats")
        health = state.to_json()["health"]
        assert health["backlog_growing"] and health["level"] == "amber"
        assert health["reasons"] == [{"code": "backlog", "text": "backlog growing: 0 \u2192 3 trials waiting"}]

        clock.now_s += 0.5
        stream.status("error", message="the decoder link stopped (see the log): trials wait; restart serve")
        stream.heartbeats([1])
        feed_until(subscriber, state, lambda s: s.to_json()["n_messages"] == 7, "the error")
    received_s = clock.now_s
    health = state.to_json(received_s)["health"]
    assert health["level"] == "red" and health["reasons"][0]["code"] == "error"
    assert "decoder link stopped" in health["reasons"][0]["text"]
    assert state.to_json(received_s)["problems"]["counts"] == {"errors": 1}
    later = state.to_json(received_s + ERROR_HOLD_S + 1.0)["health"]  # silent by then, but no longer "error"
    assert "error" not in [reason["code"] for reason in later["reasons"]]


def test_only_the_newest_trials_are_kept(publisher):
    state = DisplayState(max_trials=3, clock=Clock())
    with joined(publisher) as subscriber:
        stream = Stream(publisher)
        for i in range(1, 6):
            stream.decoded(f"t{i:04d}", colours=COLOURS["t0002"], caption=f"trial {i}", matches=[])
        feed_until(subscriber, state, lambda s: s.to_json()["n_messages"] == len(stream.sent), "every trial")
    view = state.to_json()
    assert [trial["trial_id"] for trial in view["gallery"]] == ["t0005", "t0004", "t0003"]
    assert state.image(1, "t0001", "image") is None and state.image(1, "t0005", "image") is not None
    assert view["latest"]["caption"] == "trial 5"


def test_the_byte_budget_holds_when_the_trial_being_filled_is_the_oldest(publisher):
    """t0001's image comes after t0002 and t0003 were decoded: t0001 is the oldest trial and the one being filled,
    so the next oldest (t0002) leaves to keep the pictures within the budget."""
    with joined(publisher) as subscriber:
        stream = Stream(publisher)
        stream.publish("retrieval", {**stream.trial_ids("t0001"), "matches": MATCHES["t0001"]})
        for trial_id in ("t0002", "t0003"):
            stream.decoded(trial_id, colours=COLOURS[trial_id], caption=CAPTIONS[trial_id], matches=[])
        late = stream.image("t0001", COLOURS["t0001"][0])
        sizes = {trial_id: 0 for trial_id in ("t0001", "t0002", "t0003")}
        for message in stream.sent:
            sizes[message.header["trial_id"]] += len(message.payload) if message.topic in ("image", "preview") else 0
        budget = sum(sizes.values()) - 1  # one byte short of keeping them all
        assert budget >= sizes["t0002"] + sizes["t0003"]  # enough while t0001 had no picture
        state = DisplayState(max_image_bytes=budget, clock=Clock())
        feed_until(subscriber, state, lambda s: s.to_json()["n_messages"] == len(stream.sent), "every part")
    assert [trial["trial_id"] for trial in state.to_json()["gallery"]] == ["t0003", "t0001"]
    kept = [state.image(1, trial_id, kind) for trial_id in ("t0001", "t0003") for kind in ("image", "preview")]
    assert state.image(1, "t0001", "image").payload == late.payload and state.image(1, "t0002", "image") is None
    assert sum(len(image.payload) for image in kept if image is not None) <= budget


def test_a_message_the_state_cannot_read_is_a_problem_not_a_crash(publisher):
    state = DisplayState(clock=Clock())
    with joined(publisher) as subscriber:
        Stream(publisher).publish("retrieval", {"run": 1, "trial_id": "t0001", "matches": "not a list"})
        feed_until(subscriber, state, lambda s: s.to_json()["n_messages"] == 1, "the message")
    problems = state.to_json()["problems"]["items"]
    assert problems[0]["kind"] == "protocol" and "matches" in problems[0]["text"]


def reasons(state: DisplayState) -> tuple[str, list[tuple[str, str]]]:
    health = state.to_json()["health"]
    return health["level"], [(reason["code"], reason["text"]) for reason in health["reasons"]]


def test_no_decode_worker_is_red_while_trials_need_one_and_amber_between_runs(publisher):
    state = DisplayState(clock=Clock())
    with joined(publisher) as subscriber:
        stream = Stream(publisher)

        def heartbeat(state_name: str, workers: int, backlog: int) -> tuple[str, list[tuple[str, str]]]:
            stream.state, stream.counts.backlog = state_name, backlog
            stream.counts.n_volumes += 1  # marks this heartbeat
            stream.status("heartbeat", workers=workers)
            n_volumes = stream.counts.n_volumes
            feed_until(subscriber, state, lambda s: s.to_json()["health"]["n_volumes"] == n_volumes, "the heartbeat")
            return reasons(state)

        # (backlogs of 0 and 1 only: a backlog rising by 2 would add the "backlog growing" reason)
        assert heartbeat("running", 1, 0) == ("green", [])
        assert heartbeat("running", 0, 1) == ("red", [("workers", "no decode worker connected: 1 trial waiting")])
        assert heartbeat("running", 0, 0) == ("red", [("workers", "no decode worker connected: 0 trials waiting")])
        level, found = heartbeat("stalled", 0, 0)
        assert level == "red" and ("workers", "no decode worker connected: 0 trials waiting") in found
        assert heartbeat("waiting", 0, 0) == (
            "amber",
            [("workers", "no decode worker connected (needed when a run starts)")],
        )
        assert heartbeat("waiting", 0, 1) == ("red", [("workers", "no decode worker connected: 1 trial waiting")])
        assert heartbeat("waiting", 2, 1) == ("green", [])
        level, found = heartbeat("stopped", 0, 0)
        assert level == "red" and [code for code, _ in found] == ["stopped"]  # no worker is expected then


def test_a_picture_in_an_unknown_encoding_is_skipped_quietly(caplog):
    """docs/protocol.md lets new payload encodings appear: the state keeps jpeg and png, skips the others without
    a problem, and uses the rest of the message."""
    state = DisplayState(clock=Clock())
    ids = {"subject": "new01", "session": 2, "run": 1, "trial_id": "t0001", "repeat": False, "worker": "gpu1"}
    caplog.set_level(logging.DEBUG, logger="rtdecode.view")
    with RawPublisher() as raw, Subscriber(raw.endpoint) as subscriber:
        wait_subscribed(raw, lambda wait_s: subscriber.receive(wait_s) is not None)
        png, png_bytes = protocol.image_payload(picture(COLOURS["t0001"][1], "png"), "png")
        raw.publish("preview", {**ids, "payload": png, "width": 96, "height": 96}, png_bytes)
        webp = {"encoding": "webp", "shape": [96, 96, 3]}
        raw.publish("image", {**ids, "payload": webp, "width": 96, "height": 96, "seed": 7}, b"RIFF\x00\x00WEBPVP8 ")
        raw.publish("caption", {**ids, "caption": "a new format"})
        feed_until(subscriber, state, lambda s: (s.to_json()["latest"] or {}).get("caption"), "the caption, last")
    view = state.to_json()

    assert view["problems"] == {"counts": {}, "items": []} and view["health"]["level"] == "green"
    assert state.image(1, "t0001", "image") is None and state.image(1, "t0001", "preview").payload == png_bytes
    latest = view["latest"]
    assert latest["image_url"] is None and latest["preview_url"] is not None
    assert latest["caption"] == "a new format" and latest["parts"] == ["preview", "image", "caption"]
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert any("'webp'" in record.getMessage() for record in caplog.records if record.levelno == logging.DEBUG)
