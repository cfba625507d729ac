"""Files whose content must be whole and known: atomic replacement, and content hashes.

``write_atomically`` writes a temporary file beside the target and renames it over the target, so a reader (or a
restart after a crash) sees the old file or the whole new one, never half of it. ``file_sha256`` hashes a file in
chunks, for provenance records and the engines' weight identities.
"""

import hashlib
import os
from pathlib import Path

HASH_CHUNK_BYTES = 1 << 22


def write_atomically(path: Path, content: str | bytes | memoryview) -> Path:
    """Replace ``path`` with ``content`` (text is written as UTF-8; bytes or any buffer as is)."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    if isinstance(content, str):
        temporary.write_text(content, encoding="utf-8")
    else:
        temporary.write_bytes(memoryview(content))
    os.replace(temporary, path)
    return path


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's content, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
