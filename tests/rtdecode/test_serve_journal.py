"""The daemon's crash journal: what it restores, a torn last line, a run set aside; and the events folder."""

import json

import pytest

from rtdecode.daemon import without_folders
from rtdecode.errors import StoreError
from rtdecode.glm.events import EventsFolder
from rtdecode.records import TrialEvent
from rtdecode.serve_journal import ServeJournal


def test_the_journal_restores_what_was_written(tmp_path):
    journal = ServeJournal(tmp_path)
    event = TrialEvent("t1", 8.0, 3.0, "img-1")
    journal.run_started(1, 7)
    journal.volume(1, 0)
    journal.volume(1, 1)
    journal.event(1, event)
    journal.sending(1, "t1", "beta:online")
    journal.sent(1, "t1", "beta:online")
    journal.sending(1, "t1", "image")
    journal.run_ended(1)
    journal.close()
    state = ServeJournal(tmp_path).restore(unconfirmed_s=0.0)[1]
    assert state.series == 7 and state.volumes == {0, 1} and state.events == [event] and state.ended
    assert state.sent == {("t1", "beta:online")} and ("t1", "image") in state.sending - state.sent


def test_a_line_cut_by_a_crash_is_dropped_and_later_entries_stay_whole(tmp_path):
    journal = ServeJournal(tmp_path)
    journal.volume(1, 0)
    journal.close()
    with open(journal.path(1), "a") as handle:
        handle.write('{"t": 1, "kind": "sent", "trial_id": "t1", "ke')  # killed mid-write
    restarted = ServeJournal(tmp_path)
    assert restarted.restore()[1].volumes == {0}
    restarted.sent(1, "t2", "image")
    restarted.close()
    state = ServeJournal(tmp_path).restore(unconfirmed_s=0.0)[1]
    assert state.sent == {("t2", "image")}


def test_messages_sent_just_before_the_crash_count_as_sending(tmp_path):
    """ZeroMQ writes a message out a moment after publish returns: a kill -9 then loses it though the journal says
    sent. The last second before the last entry of all runs is published again after a restart, flagged."""
    lines = {
        1: [(50.0, "sent", "a"), (99.5, "sent", "b")],  # b: run 1's last, but 10 s before run 2's
        2: [(100.0, "sent", "c"), (109.2, "sent", "d"), (109.8, "sent", "e"), (110.0, "volume", None)],
    }
    for run, entries in lines.items():
        with open(ServeJournal(tmp_path).path(run), "w") as handle:
            for t, kind, trial_id in entries:
                entry = (
                    {"t": t, "kind": kind, "trial_id": trial_id, "key": "image"}
                    if trial_id
                    else {"t": t, "kind": kind, "volume": 3}
                )
                handle.write(json.dumps(entry) + "\n")
    runs = ServeJournal(tmp_path).restore()
    assert runs[1].sent == {("a", "image"), ("b", "image")} and not runs[1].sending
    assert runs[2].sent == {("c", "image")} and runs[2].sending == {("d", "image"), ("e", "image")}


def test_a_broken_line_inside_the_journal_is_named(tmp_path):
    journal = ServeJournal(tmp_path)
    journal.volume(1, 0)
    journal.close()
    with open(journal.path(1), "a") as handle:
        handle.write('{"kind": "volume", "volume": "x"}\n{"kind": "volume", "volume": 2}\n')
    with pytest.raises(StoreError, match=r"run-01.jsonl line 2: not a journal entry"):
        ServeJournal(tmp_path).restore()


def test_a_run_set_aside_starts_afresh(tmp_path):
    journal = ServeJournal(tmp_path)
    journal.run_started(2, 5)
    aside = journal.set_aside(2)
    journal.run_started(2, 6)
    journal.close()
    assert aside.exists() and "set-aside" in aside.name
    assert ServeJournal(tmp_path).restore()[2].series == 6


def test_the_events_folder_reads_each_run_file_as_it_grows(tmp_path):
    folder = EventsFolder(tmp_path)
    assert folder.poll() == ([], [])
    (tmp_path / "sub-01_task-x_run-2_events.tsv").write_text("onset\tduration\ttrial_id\n4.0\t3.0\ta\n8.0\t3.0\tb")
    (tmp_path / "notes.tsv").write_text("onset\tduration\n1\t1\n")
    found, errors = folder.poll()
    assert [(run, event.trial_id) for run, event in found] == [(2, "a")] and errors == []
    events, _ = folder.flush(2)
    assert [event.onset_s for event in events] == [8.0]


def test_paths_lose_their_folders():
    assert without_folders("/data/DOE^JANE/001_000001.dcm: truncated") == "001_000001.dcm: truncated"
    assert without_folders("same content as a.dcm; 0.5 s / TR") == "same content as a.dcm; 0.5 s / TR"
