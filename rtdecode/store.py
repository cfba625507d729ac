"""The subject and session store on disk, under ``RTDECODE_HOME``.

Layout::

    $RTDECODE_HOME/
      config.toml                    optional default configuration
      quarantine/                    files quarantined when no subject is configured
      subjects/<subject>/
        subject.json                 id, creation time
        bundle/                      the subject bundle (rtdecode.subject_bundle), written by calibrate
        sessions/ses-<NN>/
          session.json               subject, session number, creation time
          raw/  events/  stimuli/    a recorded session's volumes, events.tsv per run, images (calibrate's inputs)
          calibration/               calibrate's work: reference, cached betas per run, training checkpoints
          quarantine/                files that never became valid volumes, each with .reason.json
          ingest.jsonl               append-only journal of ingest events

Later stages add their own files (subject bundles, calibration reports) under the same folders.
Ids are checked (letters, digits, ``_`` and ``-``) so they are safe as folder names.
"""

import datetime
import json
import os
import re
from pathlib import Path
from typing import Any

from rtdecode.config import ID_PATTERN
from rtdecode.errors import StoreError

_ID = re.compile(ID_PATTERN)


def _now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def check_subject_id(subject_id: str) -> str:
    if not isinstance(subject_id, str) or not _ID.fullmatch(subject_id):
        raise StoreError(
            f"subject id must be 1-64 letters, digits, '_' or '-' starting with a letter or digit; got {subject_id!r}"
        )
    return subject_id


def check_session(session: int) -> int:
    if isinstance(session, bool) or not isinstance(session, int) or not 1 <= session <= 999:
        raise StoreError(f"session must be an integer from 1 to 999; got {session!r}")
    return session


class Store:
    """Subjects and sessions under one root folder."""

    def __init__(self, home: Path) -> None:
        self.home = Path(home)

    def subject_dir(self, subject_id: str) -> Path:
        return self.home / "subjects" / check_subject_id(subject_id)

    def session_dir(self, subject_id: str, session: int) -> Path:
        return self.subject_dir(subject_id) / "sessions" / f"ses-{check_session(session):02d}"

    def bundle_dir(self, subject_id: str) -> Path:
        """Where the subject's bundle lives (rtdecode.subject_bundle)."""
        return self.subject_dir(subject_id) / "bundle"

    def create_session(self, subject_id: str, session: int) -> Path:
        """Create (or reuse) a session folder and its subject; return the session folder."""
        session_dir = self.session_dir(subject_id, session)
        session_dir.mkdir(parents=True, exist_ok=True)
        _write_json_once(self.subject_dir(subject_id) / "subject.json", {"id": subject_id})
        _write_json_once(session_dir / "session.json", {"subject": subject_id, "session": session})
        return session_dir

    def quarantine_dir(self, subject_id: str | None, session: int) -> Path:
        if subject_id is None:
            return self.home / "quarantine"
        return self.create_session(subject_id, session) / "quarantine"

    def subjects(self) -> list[str]:
        root = self.home / "subjects"
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if (p / "subject.json").is_file())

    def sessions(self, subject_id: str) -> list[int]:
        root = self.subject_dir(subject_id) / "sessions"
        if not root.is_dir():
            return []
        found = (re.fullmatch(r"ses-(\d+)", p.name) for p in root.iterdir() if p.is_dir())
        return sorted(int(m.group(1)) for m in found if m)


def _write_json_once(path: Path, content: dict[str, Any]) -> None:
    if path.exists():
        return
    path.write_text(json.dumps({**content, "created": _now_iso()}, indent=2) + "\n")


class Journal:
    """An append-only JSON-lines file; each line is flushed to disk before ``append`` returns."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, entry: dict[str, Any]) -> None:
        line = json.dumps({"time": _now_iso(), **entry}, default=str) + "\n"
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())

    def entries(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with open(self.path, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]
