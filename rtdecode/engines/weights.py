"""The identity of the weights an engine was built from: SHA-256 over the files a stage loads.

Hashing tens of gigabytes at every daemon start would cost many seconds, so each file's hash is kept in a small
cache beside the engines, keyed by the file's resolved path, size, inode and modification and change times (as
``git``'s index does): an untouched file is not read again; a rewritten or replaced one is (copies cannot keep the
change time).
"""

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from rtdecode.file_integrity import file_sha256, write_atomically

CACHE_FILE = "weights-sha256.json"


class WeightHasher:
    """Per-file hashes with a stat-keyed cache in ``cache_dir`` (None: no cache)."""

    def __init__(self, cache_dir: Path | None = None) -> None:
        self.cache_path = None if cache_dir is None else Path(cache_dir) / CACHE_FILE
        self._cache = self._read_cache()
        self._dirty = False

    def files_sha256(self, files: Iterable[Path]) -> str:
        """One hash for a set of files: their contents, independent of where the folder lies."""
        hashes = sorted(self._file(Path(path)) for path in files)
        return hashlib.sha256("\n".join(hashes).encode()).hexdigest()

    def save(self) -> None:
        """Write the cache back (atomically) when it changed."""
        if self.cache_path is None or not self._dirty:
            return
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.cache_path, json.dumps(self._cache, indent=1, sort_keys=True) + "\n")
        self._dirty = False

    def _file(self, path: Path) -> str:
        resolved = path.resolve()
        stat = resolved.stat()
        key = str(resolved)
        identity = {
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "ctime_ns": stat.st_ctime_ns,
            "inode": stat.st_ino,
        }
        known = self._cache.get(key)
        if known and all(known.get(field) == value for field, value in identity.items()):
            return str(known["sha256"])
        sha256 = file_sha256(resolved)
        self._cache[key] = {**identity, "sha256": sha256}
        self._dirty = True
        return sha256

    def _read_cache(self) -> dict:
        if self.cache_path is None or not self.cache_path.is_file():
            return {}
        try:
            value = json.loads(self.cache_path.read_text())
        except (OSError, ValueError):
            return {}  # a damaged cache only costs a re-hash
        return value if isinstance(value, dict) else {}
