"""``--save DIR``: a real Publisher's session through a real Subscriber into the Saver; the files and their
contents; when a trial without an image is written; pictures in an unknown encoding."""

import csv
import json
import logging

import pytest
from PIL import Image

from rtdecode.publish import protocol
from rtdecode.publish.subscriber import Subscriber
from rtdecode.view.save import PENDING_FLUSH_S, Saver, safe_name
from tests.rtdecode.view.stream import (
    CAPTIONS,
    COLOURS,
    FLAGGED_VOLUME,
    MATCHES,
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


def record(subscriber, saver, n_messages):
    """Receive ``n_messages`` into ``saver``."""
    received = []

    def step():
        message = subscriber.receive(0.1)
        if message is not None:
            saver.write(message)
            received.append(message)
        return len(received) == n_messages

    wait_until(step, f"{n_messages} messages")


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_a_session_is_written_as_it_arrives(publisher, tmp_path):
    folder = tmp_path / "record"
    with Subscriber(publisher.publish_endpoint, publisher.snapshot_endpoint) as subscriber, Saver(folder) as saver:
        subscriber.catch_up(TIMEOUT_S)
        wait_subscribed(publisher, lambda wait_s: subscriber.receive(wait_s) is not None)
        stream = session(Stream(publisher))
        record(subscriber, saver, len(stream.sent))
        trials = read_jsonl(folder / "trials.jsonl")  # flushed before close
        assert [trial["trial_id"] for trial in trials] == ["t0001", "t0002", "t0003"]

    for message in stream.sent:
        if message.topic in ("image", "preview"):
            trial_id = message.header["trial_id"]
            name = f"{trial_id}.jpg" if message.topic == "image" else f"{trial_id}_preview.png"
            assert (folder / "run-01" / name).read_bytes() == message.payload
    with Image.open(folder / "run-01" / "t0003.jpg") as image:
        assert max(abs(a - b) for a, b in zip(image.getpixel((40, 40)), COLOURS["t0003"][0], strict=True)) < 8
    assert sorted(path.name for path in (folder / "run-01").iterdir()) == sorted(
        [f"t000{i}.jpg" for i in (1, 2, 3)] + [f"t000{i}_preview.png" for i in (1, 2, 3)]
    )

    third = trials[2]
    assert (third["run"], third["subject"], third["session"], third["stimulus_id"]) == (1, "new01", 2, "nsd-61883")
    assert third["caption"] == CAPTIONS["t0003"] and third["matches"] == MATCHES["t0003"]
    assert (third["image"], third["preview"]) == ("run-01/t0003.jpg", "run-01/t0003_preview.png")
    assert third["parts"] == ["retrieval", "preview", "caption", "image"] and third["worker"] == "gpu1"
    sent = {(m.topic, m.header.get("trial_id")): m.header for m in stream.sent}
    beta, image = sent[("beta", "t0003")], sent[("image", "t0003")]
    assert third["latencies_ms"]["beta"] == pytest.approx(
        (beta["published_s"] - beta["timestamps"]["seen"]) * 1e3, abs=1e-3
    )
    assert third["latencies_ms"]["image"] == pytest.approx(
        (image["published_s"] - image["timestamps"]["seen"]) * 1e3, abs=1e-3
    )
    assert third["timings_ms"]["unclip"] == 812.5 and third["timings_ms"]["embed"] == 11.5

    with open(folder / "motion.tsv", encoding="utf-8", newline="") as file:
        rows = list(csv.DictReader(file, delimiter="\t"))
    assert len(rows) == N_VOLUMES and [row["flagged"] for row in rows].count("1") == 1
    by_volume = {int(row["volume"]): row for row in rows}
    motion = {m.header["volume"]: m.header for m in stream.sent if m.topic == "motion"}
    assert by_volume[FLAGGED_VOLUME]["flagged"] == "1"
    assert float(by_volume[3]["trans_x_mm"]) == motion[3]["params"][0]
    assert float(by_volume[3]["fd_mm"]) == motion[3]["fd_mm"]

    statuses = read_jsonl(folder / "status.jsonl")
    assert "heartbeat" not in [status["kind"] for status in statuses]
    ingest = [status for status in statuses if status["kind"] == "ingest"]
    assert [status["event"] for status in ingest] == ["run_started", "missing", "quarantined"]
    assert ingest[2]["file"] == QUARANTINED_FILE
    assert statuses[-1]["kind"] == "trial_skipped" and statuses[-1]["trial_id"] == "t0004"


def test_a_restarted_recorder_adds_no_duplicates(publisher, tmp_path):
    folder = tmp_path / "record"
    session(Stream(publisher)).status("run_ended", run=1)  # the status the snapshot keeps
    n_images, pictures = [], []
    for _ in range(2):  # the second time: the same snapshot again, into the same folder
        with Subscriber(publisher.publish_endpoint, publisher.snapshot_endpoint) as subscriber, Saver(folder) as saver:
            for message in subscriber.catch_up(TIMEOUT_S):
                saver.write(message)
        n_images.append(saver.n_images)
        pictures.append({path.name: path.stat().st_ino for path in (folder / "run-01").iterdir()})
    assert n_images == [6, 0] and len(pictures[0]) == 6
    assert pictures[1] == pictures[0]  # the same files: a rewrite would replace each with a new one
    assert [trial["trial_id"] for trial in read_jsonl(folder / "trials.jsonl")] == ["t0001", "t0002", "t0003"]
    motion_lines = (folder / "motion.tsv").read_text(encoding="utf-8").splitlines()
    assert motion_lines[0].startswith("run\tvolume\ttrans_x_mm") and len(motion_lines) == 1 + N_VOLUMES
    assert [status["kind"] for status in read_jsonl(folder / "status.jsonl")] == ["run_ended"]


def test_trial_ids_become_safe_file_names_and_imageless_trials_are_written_at_close(publisher, tmp_path):
    folder = tmp_path / "record"
    odd_ids = ["../../etc/passwd", "run 1/trial 7", ".hidden", "t0001_preview"]
    with Subscriber(publisher.publish_endpoint, publisher.snapshot_endpoint) as subscriber:
        subscriber.catch_up(TIMEOUT_S)
        wait_subscribed(publisher, lambda wait_s: subscriber.receive(wait_s) is not None)
        stream = Stream(publisher)
        saver = Saver(folder, clock=Clock())
        for trial_id in odd_ids:
            stream.decoded(trial_id, colours=COLOURS["t0002"], caption=trial_id, matches=[])
        stream.publish("retrieval", {**stream.trial_ids("no-image"), "matches": MATCHES["t0001"]})
        record(subscriber, saver, len(stream.sent))
        assert len(read_jsonl(folder / "trials.jsonl")) == len(odd_ids)  # "no-image" waits for its image
        saver.close()

    files = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    names = [safe_name(trial_id) for trial_id in odd_ids]
    assert len(set(names)) == len(names)
    for name in names:
        assert "/" not in name and not name.startswith(".") and f"run-01/{name}.jpg" in files
    assert not (tmp_path / "etc").exists() and all(not f.startswith("..") for f in files)
    assert safe_name("t0001") == "t0001" and safe_name("t0001_preview") != "t0001_preview"
    lines = read_jsonl(folder / "trials.jsonl")
    assert [line["trial_id"] for line in lines] == [*odd_ids, "no-image"]
    assert lines[-1]["image"] is None and lines[-1]["matches"] == MATCHES["t0001"]
    assert lines[0]["image"] == f"run-01/{names[0]}.jpg"


def test_trials_without_images_are_written_when_their_run_ends_or_after_a_while(publisher, tmp_path):
    """A daemon with ``reconstruct = false``: retrieval, preview and caption only. Each trial's line comes at the
    first of: its run ends, another run starts, PENDING_FLUSH_S after its first part; a late image adds a line."""
    folder, clock = tmp_path / "record", Clock()
    trials_file = folder / "trials.jsonl"
    with joined(publisher) as subscriber, Saver(folder, clock=clock) as saver:
        stream = Stream(publisher)

        def deliver(publish) -> list[dict]:
            """Publish, record what was published, return the trial lines so far."""
            n_sent = len(stream.sent)
            publish()
            record(subscriber, saver, len(stream.sent) - n_sent)
            return read_jsonl(trials_file)

        def decoded(trial_id):
            stream.beta(trial_id)
            stream.decoded(
                trial_id, colours=COLOURS["t0001"], caption=f"{trial_id} caption", matches=[], with_image=False
            )

        assert deliver(lambda: decoded("t0001")) == []  # its image may still come
        clock.now_s += PENDING_FLUSH_S - 0.5
        assert deliver(lambda: stream.heartbeats([0])) == []
        clock.now_s += 0.5
        lines = deliver(lambda: stream.heartbeats([0]))  # PENDING_FLUSH_S after its first part: written
        assert [(line["trial_id"], line["parts"], line["image"]) for line in lines] == [
            ("t0001", ["retrieval", "preview", "caption"], None)
        ]
        assert lines[0]["preview"] == "run-01/t0001_preview.png" and lines[0]["caption"] == "t0001 caption"

        assert len(deliver(lambda: decoded("t0002"))) == 1
        lines = deliver(lambda: stream.status("run_ended", run=1))  # its run ended: written at once
        assert [line["trial_id"] for line in lines] == ["t0001", "t0002"]

        stream.run = 2
        assert len(deliver(lambda: decoded("t0201"))) == 2
        lines = deliver(lambda: stream.status("run_started", run=3))  # the next run started
        assert [line["trial_id"] for line in lines] == ["t0001", "t0002", "t0201"]

        stream.run = 1
        lines = deliver(lambda: stream.image("t0001", COLOURS["t0001"][0]))  # a late image: a second, whole line
        assert [line["trial_id"] for line in lines] == ["t0001", "t0002", "t0201", "t0001"]
        assert lines[-1]["image"] == "run-01/t0001.jpg" and lines[-1]["parts"][-1] == "image"
        assert lines[-1]["caption"] == "t0001 caption" and lines[-1]["preview"] == "run-01/t0001_preview.png"
        assert (folder / "run-01" / "t0001.jpg").read_bytes() == stream.sent[-1].payload

        repeat = next(m for m in stream.sent if m.topic == "retrieval" and m.header["trial_id"] == "t0002")
        assert len(deliver(lambda: stream.publish("retrieval", {**_caller_fields(repeat), "repeat": True}))) == 4
    assert len(read_jsonl(trials_file)) == 4  # nothing was left to write at close


def _caller_fields(message) -> dict:
    return {name: value for name, value in message.header.items() if name not in protocol.PUBLISHER_FIELDS}


def test_a_picture_in_an_unknown_encoding_is_not_saved_and_the_trial_is(tmp_path, caplog):
    folder = tmp_path / "record"
    ids = {"subject": "new01", "session": 2, "run": 1, "trial_id": "t0001", "repeat": False, "worker": "gpu1"}
    caplog.set_level(logging.DEBUG, logger="rtdecode.view")
    with RawPublisher() as raw, Subscriber(raw.endpoint) as subscriber, Saver(folder, clock=Clock()) as saver:
        wait_subscribed(raw, lambda wait_s: subscriber.receive(wait_s) is not None)
        jpeg, jpeg_bytes = protocol.image_payload(picture(COLOURS["t0001"][1]), "jpeg")
        raw.publish("preview", {**ids, "payload": jpeg, "width": 96, "height": 96}, jpeg_bytes)
        webp = {"encoding": "webp", "shape": [96, 96, 3]}
        raw.publish("image", {**ids, "payload": webp, "width": 96, "height": 96, "seed": 7}, b"RIFF\x00\x00WEBPVP8 ")

        def step():
            message = subscriber.receive(0.1)
            if message is not None and message.topic != "status":  # probes still in flight
                saver.write(message)
            return (folder / "trials.jsonl").read_text(encoding="utf-8")

        wait_until(step, "the trial's line (its image part came)")
    lines = read_jsonl(folder / "trials.jsonl")
    assert [(line["trial_id"], line["parts"], line["image"]) for line in lines] == [
        ("t0001", ["preview", "image"], None)
    ]
    assert lines[0]["preview"] == "run-01/t0001_preview.jpg"
    assert sorted(path.name for path in (folder / "run-01").iterdir()) == ["t0001_preview.jpg"]
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]
