"""The ingest stage: scanner folder -> ordered :class:`~rtdecode.records.Volume` records and events.

One worker thread owns all state. It takes hints from the :class:`FileWatcher`, reads files, and
decides per file:

* **complete** (content as long as its header says): its volumes go at once to the
  :class:`RunTracker`, which orders them and reports gaps, duplicates and restarts. Size stability is
  checked after the fact: a finished file whose size or mtime changes later is read again; the same
  content from the same file is nothing to report, the same volume from another file is a DUPLICATE,
  different content is quarantined;
* **incomplete** (still being written): looked at again on the next hint (a close, a scan) or after a
  short back-off, until ``incomplete_timeout_s`` passes with the file neither growing nor giving a
  volume; then it is quarantined;
* **invalid** (not DICOM/NIfTI, compressed, not MR, a grid that differs from its run's): quarantined
  at once if the writer has closed it or it has not changed for ``SETTLE_S``, else looked at again.

Results (volumes and :class:`~rtdecode.records.IngestEvent`) go to ``output``, a queue the caller
drains until :data:`END` (put there after :meth:`Ingestor.stop`, or after a FAILED event if ingest
itself breaks). Nothing is dropped silently: every file is
delivered, quarantined, ignored by name pattern, or reported missing.
"""

import dataclasses
import logging
import queue
import threading
import time
from pathlib import Path

from rtdecode.config import ScannerConfig
from rtdecode.errors import DuplicateFileError, IncompleteFileError, VolumeFileError
from rtdecode.ingest.quarantine import Quarantine
from rtdecode.ingest.reader import VolumeReader
from rtdecode.ingest.runs import RunTracker
from rtdecode.ingest.scanner_volume import ScannerVolume
from rtdecode.ingest.slices import StrandedVolume
from rtdecode.ingest.watcher import FileWatcher, choose_watch_mode
from rtdecode.records import IngestEvent, IngestEventKind, Volume, VolumeFile

log = logging.getLogger(__name__)

SETTLE_S = 0.5  # an unreadable file unchanged this long (and not known closed) is judged invalid
OPEN_FILE_WAIT_S = 0.1  # a file seen being modified is looked at after this, if no close event came first
FIRST_RETRY_S = 0.01  # an incomplete file is looked at again after this, doubling up to MAX_RETRY_S
MAX_RETRY_S = 0.25
_IMMEDIATE_TRIGGERS = ("close_write", "moved", "created", "scan")  # watchdog reports a file moved in as created
_STOP = object()
END = object()  # the last item ingest puts on its output queue


@dataclasses.dataclass
class _Pending:
    """A file that has been seen but is not finished with."""

    hint: VolumeFile
    progress_s: float  # when it last grew or gave a volume (or was first seen)
    next_check_s: float
    signature: tuple[int, int] | None = None
    changed_s: float = 0.0  # when its size or mtime last changed
    attempts: int = 0
    reason: str = ""


class Ingestor:
    """Watches ``watch_dir`` and puts ordered volumes and events on :attr:`output`.

    Parameters
    ----------
    watch_dir : Path
        The scanner's export folder (watched recursively).
    scanner : ScannerConfig
        Format, TR, watch mode, timeouts.
    quarantine_dir : Path
        Where rejected files are copied; excluded from watching if inside ``watch_dir``.
    output_size : int
        Bound of the output queue (the worker waits when the consumer falls this far behind).
    """

    def __init__(self, watch_dir: Path, scanner: ScannerConfig, quarantine_dir: Path, output_size: int = 1024):
        self.watch_dir = Path(watch_dir).resolve()
        if not self.watch_dir.is_dir():
            raise VolumeFileError(f"watch folder does not exist or is not a folder: {self.watch_dir}")
        self.scanner = scanner
        self.quarantine = Quarantine(Path(quarantine_dir).resolve())
        self.output: queue.Queue = queue.Queue(maxsize=output_size)
        self._hints: queue.Queue = queue.Queue()
        self._watcher = FileWatcher(
            self.watch_dir,
            choose_watch_mode(self.watch_dir, scanner.watch_mode),
            self._hints.put,
            self._ignored,
            scanner.poll_interval_s,
            scanner.rescan_interval_s,
        )
        self._tracker = RunTracker(
            scanner.tr_s, scanner.reorder_wait_s, starts_mid_run=scanner.existing_files == "ignore"
        )
        self._reader = VolumeReader(scanner.format, scanner.slices_per_volume)
        self._pending: dict[Path, _Pending] = {}
        self._done: dict[Path, tuple[int, int]] = {}
        self._duplicates: set[Path] = set()  # files already reported as a DUPLICATE
        self._thread: threading.Thread | None = None

    # -- public ---------------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        """``"inotify"`` or ``"poll"`` (inotify falls back to polling if it cannot start)."""
        return self._watcher.mode

    def start(self) -> "Ingestor":
        self._thread = threading.Thread(target=self._run, name="rtdecode-ingest", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Ask ingest to stop: it finishes what is pending, ends the runs, then puts :data:`END` on the
        output. Returns at once; keep draining the output until END (or :meth:`join`)."""
        if self._thread is None:
            self.output.put(END)
        else:
            self._hints.put(_STOP)

    def join(self, timeout_s: float | None = None) -> bool:
        """Wait for the worker to end; True if it has."""
        if self._thread is not None:
            self._thread.join(timeout_s)
        return self._thread is None or not self._thread.is_alive()

    # -- the worker -----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            existing = self._watcher.start()
            if self.scanner.existing_files == "ingest":
                self._ingest_existing(existing)
            else:
                self._done.update({f.path: _signature(f.path) for f in existing})
            self._loop()
        except Exception as error:  # ingest itself broke: say so, then end cleanly
            log.exception("ingest stopped on an error")
            self._emit(
                IngestEvent(IngestEventKind.FAILED, f"ingest stopped on an error: {type(error).__name__}: {error}")
            )
        finally:
            self._watcher.stop()
            try:
                self._shutdown()
            except Exception as error:
                log.exception("ingest could not finish cleanly")
                self._emit(IngestEvent(IngestEventKind.FAILED, f"ingest could not finish cleanly: {error}"))
            self.output.put(END)

    def _loop(self) -> None:
        while True:
            try:
                hint = self._hints.get(timeout=self._seconds_until_due())
            except queue.Empty:
                hint = None
            if hint is _STOP:
                return
            if hint is not None:
                self._on_hint(hint)
            self._run_due(time.monotonic())

    def _ingest_existing(self, existing: list[VolumeFile]) -> None:
        """Read files present at start in scanner order (from their headers), one at a time."""
        for found in sorted(existing, key=lambda f: self._reader.sort_key(f.path)):
            self._pending[found.path] = self._new_pending(found, time.monotonic())
            self._check(self._pending[found.path])

    def _seconds_until_due(self) -> float:
        times = [p.next_check_s for p in self._pending.values()]
        for deadline in (
            self._tracker.next_deadline_s(),
            self._reader.next_slice_expiry_s(self.scanner.incomplete_timeout_s),
        ):
            if deadline is not None:
                times.append(deadline)
        if not times:
            return 1.0
        return min(1.0, max(0.0, min(times) - time.monotonic()))

    def _on_hint(self, hint: VolumeFile) -> None:
        signature = _signature(hint.path)
        if signature is None or self._done.get(hint.path) == signature:
            return
        now = time.monotonic()
        pending = self._pending.get(hint.path)
        if pending is None:
            pending = self._pending[hint.path] = self._new_pending(hint, now)
        pending.hint = hint
        if hint.trigger in _IMMEDIATE_TRIGGERS or self._reader.progress(hint.path) is not None:
            self._check(pending)

    def _new_pending(self, hint: VolumeFile, now: float) -> _Pending:
        """A file just seen: checked now if it was closed, moved in or found by a scan; a file seen
        being created or modified is checked after ``OPEN_FILE_WAIT_S`` unless its close comes first."""
        seen = hint.timestamps.get("seen", now)
        wait_s = 0.0 if hint.trigger in _IMMEDIATE_TRIGGERS else OPEN_FILE_WAIT_S
        return _Pending(hint=hint, progress_s=seen, next_check_s=now + wait_s, changed_s=now)

    def _run_due(self, now: float) -> None:
        for pending in [p for p in self._pending.values() if p.next_check_s <= now]:
            self._check(pending)
        for item in self._tracker.poll(now):
            self._emit(item)
        timeout_s = self.scanner.incomplete_timeout_s
        self._quarantine_stranded(self._reader.stranded_slices(now, timeout_s), f"after {timeout_s:g} s")

    # -- one file -------------------------------------------------------------------------------

    def _check(self, pending: _Pending) -> None:
        path = pending.hint.path
        now = time.monotonic()
        signature = _signature(path)
        if signature is None:
            self._disappeared(path)
            return
        if signature != pending.signature:
            pending.signature, pending.changed_s, pending.progress_s = signature, now, now
        try:
            volumes, finished = self._reader.read(path)
        except IncompleteFileError as error:
            self._retry_or_give_up(pending, str(error), now)
            return
        except FileNotFoundError:
            self._disappeared(path)
            return
        except DuplicateFileError as error:
            self._finish(path, signature)
            self._report_duplicate(path, str(error))
            return
        except (VolumeFileError, OSError) as error:
            self._invalid(pending, str(error), now)
            return
        except Exception as error:  # a reader bug must not stop ingest; judged like an invalid file
            log.exception("unexpected error reading %s", path)
            self._invalid(pending, f"{path}: unexpected error while reading: {type(error).__name__}: {error}", now)
            return
        stamps = {"seen": pending.hint.timestamps.get("seen", now), "read": time.monotonic()}
        if finished:
            self._finish(path, signature)
        else:
            if volumes:
                pending.progress_s = now
            self._retry_or_give_up(pending, self._progress_reason(path), now)
        for volume in volumes:
            self._track(volume, stamps)

    def _finish(self, path: Path, signature: tuple[int, int]) -> None:
        """Done with ``path`` as it was before the read: any later change makes it read again."""
        self._done[path] = signature
        self._forget(path)

    def _report_duplicate(self, path: Path, reason: str) -> None:
        """Once per file: a copy read again (its size or mtime changed after the first read, as when
        the writer finishes or sets the time) is still the same duplicate."""
        if path not in self._duplicates:
            self._duplicates.add(path)
            self._emit(IngestEvent(IngestEventKind.DUPLICATE, reason, path))

    def _disappeared(self, path: Path) -> None:
        self._forget(path)
        log.info("file disappeared before it was read: %s", path.name)

    def _progress_reason(self, path: Path) -> str:
        return f"{path}: {self._reader.progress(path)}"

    def _retry_or_give_up(self, pending: _Pending, reason: str, now: float) -> None:
        pending.reason = reason
        if now - pending.progress_s >= self.scanner.incomplete_timeout_s:
            waited = now - pending.progress_s
            self._quarantine(pending.hint.path, f"incomplete, unchanged for {waited:.1f} s: {reason}")
            return
        pending.attempts += 1
        pending.next_check_s = now + min(FIRST_RETRY_S * 2**pending.attempts, MAX_RETRY_S)

    def _invalid(self, pending: _Pending, reason: str, now: float) -> None:
        closed = pending.hint.trigger in ("close_write", "moved")
        if closed or now - pending.changed_s >= SETTLE_S:
            self._quarantine(pending.hint.path, reason)
            return
        pending.reason = reason
        pending.next_check_s = now + min(SETTLE_S, MAX_RETRY_S)

    def _track(self, volume: ScannerVolume, stamps: dict[str, float]) -> None:
        try:
            outputs = self._tracker.add(volume, stamps, time.monotonic())
        except VolumeFileError as error:
            for path in volume.sources:  # every file of a refused volume (all its slices)
                self._quarantine(path, str(error))
            return
        for item in outputs:
            self._emit(item)

    def _quarantine(self, path: Path, reason: str) -> None:
        self._forget(path)
        self._done[path] = _signature(path) or (-1, -1)
        where = self.quarantine.put(path, reason)
        self._emit(IngestEvent(IngestEventKind.QUARANTINED, f"{reason} ({where})", path))

    def _forget(self, path: Path) -> None:
        self._pending.pop(path, None)
        self._reader.forget(path)

    def _emit(self, item: Volume | IngestEvent) -> None:
        if isinstance(item, Volume):
            item = item.stamped("available")
        else:
            level = {
                IngestEventKind.RUN_STARTED: logging.INFO,
                IngestEventKind.RUN_ENDED: logging.INFO,
                IngestEventKind.FAILED: logging.ERROR,
            }.get(item.kind, logging.WARNING)
            log.log(level, "%s", item.describe())
        self.output.put(item)

    def _shutdown(self) -> None:
        now = time.monotonic()
        for pending in list(self._pending.values()):
            self._check(pending)
        for pending in list(self._pending.values()):
            self._quarantine(pending.hint.path, f"still incomplete when ingest stopped: {pending.reason}")
        self._quarantine_stranded(self._reader.stranded_slices(now, timeout_s=0.0), "when ingest stopped")
        for item in self._tracker.close():
            self._emit(item)

    def _quarantine_stranded(self, stranded: list[StrandedVolume], when: str) -> None:
        for volume in stranded:
            reason = (
                f"a slice of volume {volume.volume_number} of series {volume.series_number}, incomplete {when}: "
                f"{volume.n_found} of {volume.n_expected} slices"
            )
            for path in volume.paths:
                self._quarantine(path, f"{path}: {reason}")

    def _ignored(self, path: Path) -> bool:
        """Under the quarantine folder, or any part of the path below the watched folder matches an
        ignore pattern (so files in a hidden staging folder are not volumes until moved out)."""
        try:
            path.relative_to(self.quarantine.directory)
            return True
        except ValueError:
            pass
        try:
            parts = path.relative_to(self.watch_dir).parts
        except ValueError:
            parts = (path.name,)
        return any(self.scanner.ignores(part) for part in parts)


def _signature(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns
