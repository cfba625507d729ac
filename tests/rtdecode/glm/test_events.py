"""Stimulus events: a growing BIDS events.tsv and live ZeroMQ messages, with bad input reported."""

import json

import pytest
import zmq

from rtdecode.errors import EventError
from rtdecode.glm.events import EventReceiver, EventSender, EventsTsv, UnknownStimulusError, check_event
from rtdecode.records import TrialEvent


def test_lines_are_read_as_they_are_appended_and_half_lines_wait(tmp_path):
    path = tmp_path / "events.tsv"
    tsv = EventsTsv(path)
    assert tsv.poll() == ([], [])  # not written yet
    path.write_text("onset\tduration\tstim_file\n4.0\t3.0\tcoco/0001.png\n8.0\t3")
    events, errors = tsv.poll()
    assert events == [TrialEvent("1", 4.0, 3.0, "coco/0001.png")] and errors == []
    with open(path, "a") as handle:
        handle.write(".0\tn/a\n")
    events, _ = tsv.poll()
    assert events == [TrialEvent("2", 8.0, 3.0, None)]


def test_trial_id_and_stimulus_id_columns_are_used_when_present(tmp_path):
    path = tmp_path / "events.tsv"
    path.write_text("trial_id\tonset\tduration\tstimulus_id\nA7\t1.5\t3\tnsd-123\n")
    assert EventsTsv(path).poll()[0] == [TrialEvent("A7", 1.5, 3.0, "nsd-123")]


def test_bad_lines_are_reported_with_file_and_line_and_the_rest_is_read(tmp_path):
    path = tmp_path / "events.tsv"
    path.write_text("onset\tduration\n4.0\t3.0\nn/a\t3.0\n8.0\n12.0\t-1\n16.0\t3.0\n")
    events, errors = EventsTsv(path).poll()
    assert [e.onset_s for e in events] == [4.0, 16.0]
    assert [str(e).split(": ", 1)[0] for e in errors] == [f"{path}:{n}" for n in (3, 4, 5)]
    assert "onset must be a number of seconds, got 'n/a'" in str(errors[0])
    assert "1 cells for 2 columns" in str(errors[1])
    assert "duration -1.0 s is negative" in str(errors[2])


def test_a_header_without_onset_is_reported(tmp_path):
    path = tmp_path / "events.tsv"
    path.write_text("time\tduration\n4.0\t3.0\n")
    _, errors = EventsTsv(path).poll()
    assert "header lacks required column(s) ['onset']" in str(errors[0])


def test_a_rewritten_file_is_read_again_without_repeating_events(tmp_path):
    path = tmp_path / "events.tsv"
    path.write_text("onset\tduration\n4.0\t3.0\n8.0\t3.0\n")
    tsv = EventsTsv(path)
    assert len(tsv.poll()[0]) == 2
    path.write_text("onset\tduration\n4.0\t3.0\n")  # shorter: the program started the file again
    assert tsv.poll() == ([], [])
    with open(path, "a") as handle:
        handle.write("12.0\t3.0\n")
    assert [e.onset_s for e in tsv.poll()[0]] == [12.0]


def test_check_event_names_the_problem():
    with pytest.raises(UnknownStimulusError, match="stimulus 'x' is not among the session's 2 known stimuli"):
        check_event(TrialEvent("1", 5.0, 3.0, "x"), {"a", "b"}, None)
    with pytest.raises(EventError, match="before the run started"):
        check_event(TrialEvent("1", -1.0, 3.0, "a"), None, None)
    with pytest.raises(EventError, match=r"after the run's end \(432.0 s\)"):
        check_event(TrialEvent("1", 440.0, 3.0, "a"), None, 432.0)
    check_event(TrialEvent("1", 5.0, 3.0, "a"), {"a"}, 432.0)


def test_events_arrive_over_zeromq_and_bad_messages_are_reported():
    context = zmq.Context()
    receiver = EventReceiver("tcp://127.0.0.1:*", context)
    sender = EventSender(receiver.endpoint, context)
    raw = context.socket(zmq.PUSH)
    raw.connect(receiver.endpoint)
    try:
        sent = [TrialEvent("t1", 4.0, 3.0, "nsd-1"), TrialEvent("t2", 8.0, 3.0, None)]
        for event in sent:
            sender.send(event)
        raw.send_multipart([b"event", b"{not json"])
        raw.send_multipart([b"event", json.dumps({"trial_id": "t3", "onset_s": "soon", "duration_s": 3}).encode()])
        raw.send_multipart([b"image", b"{}"])
        events, errors = [], []
        while len(events) + len(errors) < 5:
            new_events, new_errors = receiver.poll(timeout_ms=2000)
            assert new_events or new_errors, "nothing arrived"
            events += new_events
            errors += new_errors
        assert events == sent
        assert "not JSON" in str(errors[0])
        assert "onset_s must be a number of seconds, got 'soon'" in str(errors[1])
        assert "expected frames [b'event', JSON]" in str(errors[2])
    finally:
        sender.close()
        raw.close(linger=0)
        receiver.close()
        context.term()


def test_an_unterminated_last_line_is_read_by_flush(tmp_path):
    path = tmp_path / "events.tsv"
    path.write_text("onset\tduration\n1.0\t1\n5.0\t1")
    tsv = EventsTsv(path)
    assert [e.onset_s for e in tsv.poll()[0]] == [1.0]
    assert [e.onset_s for e in tsv.flush()[0]] == [5.0]


def test_a_file_rewritten_at_the_same_size_is_read_again(tmp_path):
    path = tmp_path / "events.tsv"
    path.write_text("onset\tduration\n4.0\tn/a\n")
    tsv = EventsTsv(path)
    assert len(tsv.poll()[1]) == 1  # duration not known yet: reported
    path.write_text("onset\tduration\n4.0\t3.0\n")  # same length, row completed
    events, errors = tsv.poll()
    assert events == [TrialEvent("1", 4.0, 3.0)] and errors == []
