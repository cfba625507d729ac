"""The ingest stage: scanner folder -> ordered :class:`~rtdecode.records.Volume` records and events.

One worker thread owns all state. It takes hints from the :class:`FileWatcher`, reads files, and
decides per file:

* **complete** (content as long as its header says): its volumes go at once to the
  :class:`RunTracker`, which orders them and reports gaps, duplicates and restarts. Size stability is
  checked after the fact: a finished file whose size or mtime changes later is read again, and the
  tracker reports it (a DUPLICATE if it still holds the same volume, quarantined if not);
* **incomplete** (still being written): looked at again on the next hint (a close, a scan) or after a
  short back-off, until ``incomplete_timeout_s`` passes without progress; then it is quarantined;
* **invalid** (not DICOM/NIfTI, not MR, corrupt, a grid that differs from its run's): quarantined at
  once if the writer has closed it or it has not changed for ``SETTLE_S``, else looked at again.

Results (volumes and :class:`~rtdecode.records.IngestEvent`) go to ``output``, a queue the caller
drains until :data:`END` (put there after :meth:`Ingestor.stop`). Nothing is dropped silently: every file is
delivered, quarantined, ignored by name pattern, or reported missing.
"""

import dataclasses
import logging
import queue
import threading
import time
from pathlib import Path

from rtdecode.config import ScannerConfig
from rtdecode.errors import IncompleteFileError, VolumeFileError
from rtdecode.ingest.quarantine import Quarantine
from rtdecode.ingest.reader import VolumeReader
from rtdecode.ingest.runs import RunTracker
from rtdecode.ingest.scanner_volume import ScannerVolume
from rtdecode.ingest.watcher import FileWatcher, choose_watch_mode
from rtdecode.records import IngestEvent, IngestEventKind, Volume, VolumeFile

log = logging.getLogger(__name__)

SETTLE_S = 0.5  # an unreadable file unchanged this long (and not known closed) is judged invalid
OPEN_FILE_WAIT_S = 0.1  # a file seen being written is looked at after this, if no close event came first
FIRST_RETRY_S = 0.01  # an incomplete file is looked at again after this, doubling up to MAX_RETRY_S
MAX_RETRY_S = 0.25
_IMMEDIATE_TRIGGERS = ("close_write", "moved", "scan")
_STOP = object()
END = object()  # the last item ingest puts on its output queue


@dataclasses.dataclass
class _Pending:
    """A file that has been seen but is not finished with."""

    hint: VolumeFile
    progress_s: float  # when it last gave a volume (or was first seen)
    next_check_s: float
    signature: tuple[int, int] | None = None
    changed_s: float = 0.0
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
        self.mode = choose_watch_mode(self.watch_dir, scanner.watch_mode)
        scan_interval_s = scanner.poll_interval_s if self.mode == "poll" else scanner.rescan_interval_s
        self._hints: queue.Queue = queue.Queue()
        self._watcher = FileWatcher(self.watch_dir, self.mode, scan_interval_s, self._hints.put, self._ignored)
        self._tracker = RunTracker(
            scanner.tr_s, scanner.reorder_wait_s, starts_mid_run=scanner.existing_files == "ignore"
        )
        self._reader = VolumeReader(scanner.format, scanner.slices_per_volume)
        self._pending: dict[Path, _Pending] = {}
        self._done: dict[Path, tuple[int, int]] = {}
        self._thread: threading.Thread | None = None

    # -- public ---------------------------------------------------------------------------------

    def start(self) -> "Ingestor":
        self._thread = threading.Thread(target=self._run, name="rtdecode-ingest", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching, finish what is pending, end the runs, then put :data:`END` on the output."""
        self._hints.put(_STOP)
        if self._thread is not None:
            while self._thread.is_alive():
                self._thread.join(timeout=0.1)

    # -- the worker -----------------------------------------------------------------------------

    def _run(self) -> None:
        existing = self._watcher.start()
        try:
            if self.scanner.existing_files == "ingest":
                self._ingest_existing(existing)
            else:
                self._done.update({f.path: _signature(f.path) for f in existing})
            self._loop()
        finally:
            self._watcher.stop()
            self._shutdown()

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
        """Read files present at start as one batch, in scanner order, so they are not 'out of order'."""
        batch: list[tuple[ScannerVolume, dict[str, float]]] = []
        for found in existing:
            pending = self._new_pending(found, time.monotonic())
            self._pending[found.path] = pending
            batch.extend(self._check(pending, deliver=False))
        batch.sort(key=lambda item: (item[0].series_number, item[0].volume_number))
        for volume, stamps in batch:
            self._track(volume, stamps)

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
        for stranded in self._reader.stranded_slices(now, self.scanner.incomplete_timeout_s):
            reason = (
                f"volume {stranded.volume_number} of series {stranded.series_number} incomplete: "
                f"{stranded.n_found} of {stranded.n_expected} slices after {self.scanner.incomplete_timeout_s:g} s"
            )
            for path in stranded.paths:
                self._quarantine(path, reason)

    # -- one file -------------------------------------------------------------------------------

    def _check(self, pending: _Pending, deliver: bool = True) -> list[tuple[ScannerVolume, dict[str, float]]]:
        path = pending.hint.path
        now = time.monotonic()
        signature = _signature(path)
        if signature is None:
            self._forget(path)
            log.info("file disappeared before it was read: %s", path)
            return []
        if signature != pending.signature:
            pending.signature, pending.changed_s = signature, now
        try:
            volumes, finished = self._reader.read(path)
        except IncompleteFileError as error:
            self._retry_or_give_up(pending, str(error), now)
            return []
        except VolumeFileError as error:
            self._invalid(pending, str(error), now)
            return []
        except Exception as error:  # a reader bug must not stop ingest
            log.exception("unexpected error reading %s", path)
            self._quarantine(path, f"unexpected error while reading: {type(error).__name__}: {error}")
            return []
        stamps = {"seen": pending.hint.timestamps.get("seen", now), "read": time.monotonic()}
        if volumes:
            pending.progress_s = now
        if finished:  # remember the file as it is now: if it changes again it is read again
            self._done[path] = _signature(path) or signature
            self._forget(path)
        else:
            self._retry_or_give_up(pending, self._progress_reason(path), now)
        read = [(volume, stamps) for volume in volumes]
        if deliver:
            for volume, volume_stamps in read:
                self._track(volume, volume_stamps)
        return read

    def _progress_reason(self, path: Path) -> str:
        return f"{path}: {self._reader.progress(path)}"

    def _retry_or_give_up(self, pending: _Pending, reason: str, now: float) -> None:
        pending.reason = reason
        if now - pending.progress_s >= self.scanner.incomplete_timeout_s:
            waited = now - pending.progress_s
            self._quarantine(pending.hint.path, f"incomplete after {waited:.1f} s: {reason}")
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
            self._quarantine(volume.source, str(error))
            return
        for item in outputs:
            self._emit(item)

    def _quarantine(self, path: Path, reason: str) -> None:
        self._forget(path)
        self._done[path] = _signature(path) or (-1, -1)
        note = self.quarantine.put(path, reason)
        self._emit(IngestEvent(IngestEventKind.QUARANTINED, f"{reason} (see {note})", path))

    def _forget(self, path: Path) -> None:
        self._pending.pop(path, None)
        self._reader.forget(path)

    def _emit(self, item: Volume | IngestEvent) -> None:
        if isinstance(item, Volume):
            item = item.stamped("available")
        else:
            level = (
                logging.INFO
                if item.kind in (IngestEventKind.RUN_STARTED, IngestEventKind.RUN_ENDED)
                else logging.WARNING
            )
            log.log(level, "%s", item.describe())
        self.output.put(item)

    def _shutdown(self) -> None:
        now = time.monotonic()
        for pending in list(self._pending.values()):
            self._check(pending)
        for pending in list(self._pending.values()):
            self._quarantine(pending.hint.path, f"still incomplete when ingest stopped: {pending.reason}")
        for stranded in self._reader.stranded_slices(now, timeout_s=0.0):
            reason = (
                f"volume {stranded.volume_number} incomplete when ingest stopped: "
                f"{stranded.n_found} of {stranded.n_expected} slices"
            )
            for path in stranded.paths:
                self._quarantine(path, reason)
        for item in self._tracker.close():
            self._emit(item)
        self.output.put(END)

    def _ignored(self, path: Path) -> bool:
        if self.scanner.ignores(path.name):
            return True
        try:
            path.relative_to(self.quarantine.directory)
            return True
        except ValueError:
            return False


def _signature(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns
