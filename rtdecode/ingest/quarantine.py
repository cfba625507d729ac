"""Quarantine: copy a file that never became a valid volume aside, with the reason.

The original stays where the scanner wrote it (ingest never deletes or moves scanner files); the copy
and a ``<copy>.reason.json`` go to the quarantine folder, so nothing is lost and nothing is silent.
A quarantine folder that cannot be written does not stop ingest: :meth:`Quarantine.put` says so in
what it returns, and the event and log carry it.
"""

import datetime
import itertools
import json
import shutil
from pathlib import Path


class Quarantine:
    """Copies files into ``directory``, each next to a JSON note saying why."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._counter = itertools.count(1)

    def put(self, path: Path, reason: str) -> str:
        """Copy ``path`` (if it still exists) and write its reason; return where to look, or what failed."""
        stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
        target = self.directory / f"{stamp}_{next(self._counter):04d}_{path.name}"
        note = {"source": str(path), "reason": reason, "quarantined": datetime.datetime.now().isoformat()}
        reason_file = target.with_name(target.name + ".reason.json")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copy2(path, target)
                note["copy"] = str(target)
                note["size_bytes"] = target.stat().st_size
            except OSError as error:  # gone, or unreadable: the note still says why
                note["copy_error"] = str(error)
            reason_file.write_text(json.dumps(note, indent=2) + "\n")
        except OSError as error:
            return f"could not write to the quarantine folder {self.directory}: {error}; the file is left in place"
        copied = "" if "copy" in note else f"; the file could not be copied: {note['copy_error']}"
        return f"see {reason_file}{copied}"
