"""The stimulus program sends its events over ZeroMQ (with the run each belongs to) instead of writing events.tsv;
a malformed message is reported and the daemon goes on."""

import zmq

from rtdecode.glm.events import EventSender
from rtdecode.records import TrialEvent
from tests.rtdecode.serve.site import Listener, logged_trials, make_site, stop, trial_keys


def test_events_sent_over_zeromq_are_decoded(tmp_path, components):
    unused = tmp_path / "no-events-files"
    site = make_site(tmp_path, components, n_volumes=40, speed=10.0, runs=(1, 2), serve={"events_dir": str(unused)})
    listener = Listener(site)
    daemon = site.start()
    listener.wait_for(lambda: listener.of("status"), 120, "the daemon to start")
    context = zmq.Context()
    sender = EventSender(f"tcp://127.0.0.1:{site.ports['events']}", context)
    hostile = context.socket(zmq.PUSH)
    hostile.connect(f"tcp://127.0.0.1:{site.ports['events']}")
    try:
        hostile.send_multipart([b"event", b"[" * 100_000])  # deeply nested: must not crash the daemon
        hostile.send_multipart([b"event", b'{"trial_id": "x", "onset_s": 1, "duration_s": 1, "run": "two"}'])

        def send(run, logged):
            trial = logged.trial
            sender.send(TrialEvent(trial.trial_id, trial.onset_s, trial.duration_s, trial.stimulus_id), run=run)

        site.live.run(on_trial=send)
        expected = logged_trials(site)
        listener.wait_for(lambda: set(trial_keys(listener.of("image"))) >= expected, 120, "an image for every trial")
        assert stop(daemon) == 0, site.logs()[-3000:]
    finally:
        sender.close()
        hostile.close(linger=0)
        context.term()
    listener.close()
    images = trial_keys(listener.of("image"))
    assert set(images) == expected and max(images.values()) == 1
    errors = [m.header["message"] for m in listener.of("status", kind="error")]
    assert any("not JSON" in error for error in errors) and any("run must be a run number" in error for error in errors)
    journal = site.home / "subjects" / "syn08" / "sessions" / "ses-01" / "serve" / "run-02.jsonl"
    assert '"kind": "event"' in journal.read_text()  # a restart would replay them
