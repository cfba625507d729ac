import json

import pytest

from rtdecode.errors import StoreError
from rtdecode.store import Journal, Store


def test_sessions_are_created_and_listed(tmp_path):
    store = Store(tmp_path)
    session_dir = store.create_session("new01", 1)
    store.create_session("new01", 3)
    store.create_session("sub-02", 2)
    assert session_dir == tmp_path / "subjects" / "new01" / "sessions" / "ses-01"
    assert json.loads((session_dir / "session.json").read_text())["session"] == 1
    assert store.subjects() == ["new01", "sub-02"]
    assert store.sessions("new01") == [1, 3]
    assert store.sessions("nobody") == []


def test_creating_twice_keeps_the_first_record(tmp_path):
    store = Store(tmp_path)
    first = (store.create_session("new01", 1) / "session.json").read_text()
    second = (store.create_session("new01", 1) / "session.json").read_text()
    assert first == second


@pytest.mark.parametrize("subject", ["", "../evil", "a b", "-x", "x" * 65, "new01\n"])
def test_bad_subject_ids_are_refused(tmp_path, subject):
    with pytest.raises(StoreError, match="subject id must be"):
        Store(tmp_path).session_dir(subject, 1)


@pytest.mark.parametrize("session", [0, 1000, "1", True])
def test_bad_session_numbers_are_refused(tmp_path, session):
    with pytest.raises(StoreError, match="session must be an integer from 1 to 999"):
        Store(tmp_path).session_dir("new01", session)


def test_quarantine_folder(tmp_path):
    store = Store(tmp_path)
    assert store.quarantine_dir(None, 1) == tmp_path / "quarantine"
    assert store.quarantine_dir("new01", 2) == tmp_path / "subjects" / "new01" / "sessions" / "ses-02" / "quarantine"


def test_journal_appends_lines(tmp_path):
    journal = Journal(tmp_path / "deep" / "ingest.jsonl")
    journal.append({"kind": "volume", "volume": 0})
    journal.append({"kind": "missing", "volumes": [1, 2]})
    entries = journal.entries()
    assert [e["kind"] for e in entries] == ["volume", "missing"]
    assert entries[1]["volumes"] == [1, 2] and "time" in entries[0]
    assert len((tmp_path / "deep" / "ingest.jsonl").read_text().splitlines()) == 2
