"""End to end: a live simulated session with every ingest fault, served by the real daemon, which is killed with
SIGKILL mid-run and started again. Every logged trial is published once (beta and image), no volume twice,
nothing from the DICOM patient fields anywhere."""

import json
import signal
import time

import pytest

from tests.rtdecode.serve.site import (
    PATIENT,
    Listener,
    logged_trials,
    make_site,
    play,
    stop,
    trial_keys,
    trials_shown,
)

FAULTS = {
    1: ["slow@3", "duplicate@6", "reorder@9", "drop@12", "late@14:2", "truncate@17", "corrupt@20"],
    2: ["drop@4", "slow@8"],
}
N_VOLUMES = 48


@pytest.fixture(scope="module")
def replay(tmp_path_factory, components):
    """Run the session: kill the daemon once some images of run 1 are out, restart it, stop it at the end."""
    site = make_site(tmp_path_factory.mktemp("site"), components, n_volumes=N_VOLUMES, speed=8.0, runs=(1, 2),
                     faults=FAULTS)  # fmt: skip
    listener = Listener(site)
    daemon = site.start(log_name="serve-1")
    listener.wait_for(lambda: listener.of("status"), 120, "the daemon to start")
    scanner = play(site)
    # once run 1's faults have played out (so their reports come from the first lifetime), with images out
    listener.wait_for(lambda: len(listener.of("volume", run=1)) >= 26, 120, "26 volumes of run 1")
    listener.wait_for(lambda: len(listener.of("image", run=1)) >= 3, 120, "three images of run 1")
    daemon.send_signal(signal.SIGKILL)
    daemon.wait(timeout=30)
    killed_at = {"images": len(listener.of("image")), "volumes": len(listener.of("volume"))}
    time.sleep(1.0)  # the scanner goes on writing while the daemon is down
    daemon = site.start(log_name="serve-2")
    scanner.join(timeout=180)
    expected = logged_trials(site)
    listener.wait_for(lambda: set(trial_keys(listener.of("image"))) >= expected, 180, "an image for every trial")
    exit_code = stop(daemon)
    listener.wait_for(lambda: listener.of("status", kind="stopped"), 30, "the stopped status")
    listener.close()
    return site, listener, expected, killed_at, exit_code


def test_the_daemon_was_killed_mid_run_and_stopped_cleanly_after(replay):
    site, listener, expected, killed_at, exit_code = replay
    assert exit_code == 0, site.logs()[-3000:]
    assert 3 <= killed_at["images"] < len(expected)  # the kill happened mid-session
    streams = {m.stream for m in listener.messages}
    assert len(streams) == 2  # two daemon lifetimes


def test_every_trial_is_published_once(replay):
    _, listener, expected, _, _ = replay
    for topic, fields in [("beta", {"version": "online"}), ("beta", {"version": "final"})] + [
        (topic, {}) for topic in ("retrieval", "preview", "caption", "image")
    ]:
        messages = listener.of(topic, **fields)
        assert trials_shown(messages) == expected, (topic, fields)  # a final beta at each run's end
        assert max(trial_keys(messages).values()) == 1, (topic, fields)  # never twice unflagged


def test_every_volume_written_is_accounted_for_once(replay):
    site, listener, _, _, _ = replay
    published = [(m.header["run"], m.header["volume"]) for m in listener.of("volume")]
    assert len(published) == len(set(published))
    lost = {(1, 12), (1, 17), (1, 20), (2, 4)}  # dropped, truncated, corrupt, dropped
    assert set(published) == {(run, v) for run in (1, 2) for v in range(N_VOLUMES)} - lost
    ingest = {m.header["event"] for m in listener.of("status", kind="ingest")}
    assert {"missing", "late", "duplicate", "out_of_order", "quarantined"} <= ingest


def test_messages_carry_ids_sequence_numbers_and_stage_timestamps(replay):
    _, listener, _, _, _ = replay
    image = listener.of("image")[-1]
    assert image.header["subject"] == "syn08" and image.header["session"] == 1
    stamps = image.header["timestamps"]
    ordered = ["seen", "read", "available", "preprocessed", "estimated", "normalised", "queued", "result_received"]
    assert [stamps[name] for name in ordered] == sorted(stamps[name] for name in ordered)
    assert stamps["result_received"] <= image.header["published_s"]
    assert image.payload[:2] == b"\xff\xd8"  # JPEG
    for stream in {m.stream for m in listener.messages}:
        seqs = [m.seq for m in listener.messages if m.stream == stream and m.topic == "volume"]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    motion = listener.of("motion")[-1].header
    assert len(motion["params"]) == 6 and motion["fd_mm"] >= 0


def test_no_patient_identifier_leaves_the_scanner_side(replay):
    site, listener, _, _, _ = replay
    dicom = next((site.folder / "session" / "watch").iterdir()).read_bytes()
    assert PATIENT[1].encode() in dicom  # the files do carry them
    secrets = [part for name in PATIENT for part in (name, *name.split("^"))] + ["ZX4711"]
    texts = [json.dumps(m.header) for m in listener.messages] + [site.logs()]
    texts += [path.read_text() for path in (site.home / "subjects").rglob("*.jsonl")]
    for text in texts:
        for secret in secrets:
            assert secret not in text, text[max(0, text.find(secret) - 200) : text.find(secret) + 100]
    for message in listener.messages:
        assert PATIENT[1].encode() not in message.payload
        assert str(site.folder) not in json.dumps(message.header)  # file names travel without their folders


def test_the_journal_records_both_runs(replay):
    site, _, _, _, _ = replay
    folder = site.home / "subjects" / "syn08" / "sessions" / "ses-01" / "serve"
    assert sorted(path.name for path in folder.iterdir()) == ["run-01.jsonl", "run-02.jsonl"]
    kinds = {json.loads(line)["kind"] for line in (folder / "run-01.jsonl").read_text().splitlines()}
    assert {"run", "volume", "sending", "sent", "run_ended"} <= kinds
