"""Watch a directory tree for scanner files.

Two sources feed one callback with :class:`~rtdecode.records.VolumeFile` hints:

* inotify (through watchdog) where it works: a file closed after writing, moved in, created or
  modified;
* a periodic scan of the tree that reports files that are new or whose size or mtime changed, oldest
  mtime first (the order they were written in, where directory order is arbitrary: a volume written
  before the one ahead of it is then seen out of order even when both land in one scan). In
  polling mode it is the only source (``poll_interval_s``); in inotify mode it is a safety net
  (``rescan_interval_s``) for events inotify can miss (a folder created and filled before its watch
  was added, a queue overflow).

inotify never sees writes made by another machine to a network filesystem, so ``auto`` mode polls
on NFS, SMB/CIFS, FUSE and similar mounts, found from ``/proc/self/mountinfo``. A hint only says
"look at this file"; whether it holds a complete volume is decided by the ingest pipeline.
"""

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from watchdog.events import FileSystemEventHandler

from rtdecode.records import VolumeFile

log = logging.getLogger(__name__)

NETWORK_FILESYSTEMS = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "9p",
        "afs",
        "ceph",
        "glusterfs",
        "lustre",
        "gpfs",
        "beegfs",
        "vboxsf",
        "vmhgfs",
        "virtiofs",
        "davfs",
        "sshfs",
    }
)


def _unescape_mount_path(text: str) -> str:
    return text.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def filesystem_type(path: Path, mountinfo: str | None = None) -> str | None:
    """The filesystem type of the mount holding ``path`` (from ``/proc/self/mountinfo``), or None."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return None
    target = os.path.realpath(path)
    best_point, best_type = "", None
    for line in mountinfo.splitlines():
        fields, sep, rest = line.partition(" - ")
        parts = fields.split()
        if not sep or len(parts) < 5 or not rest:
            continue
        point = _unescape_mount_path(parts[4])
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best_point):
            best_point, best_type = point, rest.split()[0]
    return best_type


def choose_watch_mode(path: Path, requested: str, mountinfo: str | None = None) -> str:
    """``"inotify"`` or ``"poll"`` for ``path``; ``requested`` is ``auto``, ``inotify`` or ``poll``."""
    if requested != "auto":
        return requested
    fs_type = filesystem_type(path, mountinfo)
    if fs_type is None:
        return "poll"
    if fs_type in NETWORK_FILESYSTEMS or fs_type.startswith("fuse"):
        return "poll"
    return "inotify"


class FileWatcher:
    """Reports files under ``root`` to ``on_file``, from inotify and/or periodic scans.

    ``on_file`` is called from the watcher's threads; it must be quick and thread-safe
    (``queue.Queue.put`` is). If inotify cannot start (the system's watch limit is reached, say), the
    watcher logs it and polls instead.
    """

    def __init__(
        self,
        root: Path,
        mode: str,
        on_file: Callable[[VolumeFile], None],
        is_ignored: Callable[[Path], bool],
        poll_interval_s: float = 0.1,
        rescan_interval_s: float = 1.0,
    ) -> None:
        if mode not in ("inotify", "poll"):
            raise ValueError(f"watch mode must be 'inotify' or 'poll', got {mode!r}")
        self.root = Path(root)
        self.mode = mode
        self.poll_interval_s = poll_interval_s
        self.rescan_interval_s = rescan_interval_s
        self._on_file = on_file
        self._is_ignored = is_ignored
        self._snapshot: dict[Path, tuple[int, int]] = {}
        self._stop = threading.Event()
        self._scan_thread: threading.Thread | None = None
        self._observer = None

    @property
    def scan_interval_s(self) -> float:
        return self.poll_interval_s if self.mode == "poll" else self.rescan_interval_s

    def start(self) -> list[VolumeFile]:
        """Start watching; return the files already present.

        inotify starts first, so a file written during the initial scan is reported by one or the
        other (or both: the ingest pipeline ignores a file it has already finished with). Files in
        the initial scan are remembered, so later scans report them again only if they change.
        """
        if self.mode == "inotify":
            try:
                self._start_inotify()
            except OSError as error:
                log.warning(
                    "inotify cannot watch %s (%s); polling every %g s instead", self.root, error, self.poll_interval_s
                )
                self.mode = "poll"
        existing = self._scan()
        self._scan_thread = threading.Thread(target=self._scan_loop, name="rtdecode-scan", daemon=True)
        self._scan_thread.start()
        return existing

    def stop(self) -> None:
        self._stop.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
        if self._scan_thread is not None:
            self._scan_thread.join(timeout=5)

    def _start_inotify(self) -> None:
        from watchdog.observers.inotify import InotifyObserver  # Linux only

        self._observer = InotifyObserver()
        self._observer.schedule(_InotifyHandler(self._report), str(self.root), recursive=True)
        self._observer.start()

    def _report(self, path: Path, trigger: str) -> None:
        if not self._is_ignored(path):
            self._on_file(VolumeFile(path, trigger, {"seen": time.monotonic()}))

    def _scan_loop(self) -> None:
        while not self._stop.wait(self.scan_interval_s):
            for found in self._scan():
                self._on_file(found)

    def _scan(self) -> list[VolumeFile]:
        found = []  # (mtime_ns, path, hint)
        for directory, subdirs, names in os.walk(self.root):
            subdirs[:] = [d for d in subdirs if not self._is_ignored(Path(directory) / d)]
            for name in names:
                path = Path(directory) / name
                if self._is_ignored(path):
                    continue
                try:
                    stat = path.stat()
                except OSError:
                    continue
                signature = (stat.st_size, stat.st_mtime_ns)
                if self._snapshot.get(path) != signature:
                    self._snapshot[path] = signature
                    found.append((stat.st_mtime_ns, str(path), VolumeFile(path, "scan", {"seen": time.monotonic()})))
        return [hint for _, _, hint in sorted(found, key=lambda entry: entry[:2])]


class _InotifyHandler(FileSystemEventHandler):
    """Turns watchdog's inotify events into hints; directories are skipped."""

    def __init__(self, report: Callable[[Path, str], None]) -> None:
        self._report = report

    def _emit(self, event, path, trigger: str) -> None:
        if not event.is_directory:
            self._report(Path(os.fsdecode(path)), trigger)

    def on_closed(self, event) -> None:
        self._emit(event, event.src_path, "close_write")

    def on_moved(self, event) -> None:
        self._emit(event, event.dest_path, "moved")

    def on_created(self, event) -> None:
        self._emit(event, event.src_path, "created")

    def on_modified(self, event) -> None:
        self._emit(event, event.src_path, "modified")
