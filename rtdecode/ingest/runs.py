"""Place volumes in runs and in order, and report everything unusual.

Identity comes from the scanner's numbering, never from file names: a run is one series (keyed by
SeriesInstanceUID, or the NIfTI equivalent), and a volume's index is its 1-based scanner number
minus one. Runs are numbered 1, 2, ... in the order their series first appear, so a run restarted
at the console (new series number) becomes the next run with no operator action.

Outcomes, each reported with an :class:`~rtdecode.records.IngestEvent`:

* the expected next volume: delivered at once, then any held volumes that now follow it;
* a volume ahead of a gap: held up to ``reorder_wait_s``; if the gap fills in time the earlier
  volume is delivered first (OUT_OF_ORDER); if not, the gap's indices are declared MISSING and the
  held volumes are delivered;
* a volume declared missing that arrives after all: delivered with ``late=True`` (LATE);
* a second copy of a delivered or held volume: ignored when its content matches (DUPLICATE),
  refused with :class:`~rtdecode.errors.VolumeFileError` when it does not (to be quarantined);
* a volume whose grid differs from its run's first volume: :class:`~rtdecode.errors.VolumeShapeError`.
"""

import dataclasses
import zlib
from pathlib import Path

import numpy as np

from rtdecode.errors import VolumeFileError, VolumeShapeError
from rtdecode.ingest.scanner_volume import ScannerVolume
from rtdecode.records import IngestEvent, IngestEventKind, Volume

_TR_TOLERANCE_S = 1e-3
_AFFINE_TOLERANCE_MM = 1e-3


def content_digest(data: np.ndarray) -> int:
    """A checksum of a volume's every voxel (CRC-32 over its memory; about 0.4 ms for an NSD volume).

    Volumes from the readers share one memory order (Fortran), so equal volumes give equal digests.
    """
    return zlib.crc32(np.asfortranarray(data).ravel(order="F"), zlib.crc32(repr(data.shape).encode()))


@dataclasses.dataclass
class _Held:
    volume: ScannerVolume
    timestamps: dict[str, float]
    arrived_s: float


@dataclasses.dataclass
class RunState:
    """Bookkeeping of one run (one series)."""

    run_index: int
    series_key: str
    series_number: int
    shape: tuple[int, ...]
    affine: np.ndarray
    tr_s: float
    next_index: int
    held: dict[int, _Held] = dataclasses.field(default_factory=dict)
    delivered: dict[int, tuple[int, Path]] = dataclasses.field(default_factory=dict)  # digest, file
    missing: set[int] = dataclasses.field(default_factory=set)
    n_late: int = 0
    duplicate_files: set[Path] = dataclasses.field(default_factory=set)
    ended: bool = False

    def summary(self) -> str:
        missing = ",".join(str(i) for i in sorted(self.missing)) or "none"
        return (
            f"{len(self.delivered)} volumes delivered, missing: {missing}, "
            f"late: {self.n_late}, duplicates: {len(self.duplicate_files)}"
        )


Output = Volume | IngestEvent


class RunTracker:
    """Turns :class:`ScannerVolume` arrivals into ordered :class:`Volume` records and events.

    Parameters
    ----------
    tr_s : float or None
        The configured TR; overrides the files' own (a difference is reported once per run).
    reorder_wait_s : float or None
        How long a volume is held for an earlier one; default half a TR.
    starts_mid_run : bool
        The first run starts at its first volume seen (ingest started mid-run: the indices before it are
        not reported missing). Later runs always start at volume 0.
    """

    def __init__(self, tr_s: float | None = None, reorder_wait_s: float | None = None, starts_mid_run: bool = False):
        self.tr_s = tr_s
        self.reorder_wait_s = reorder_wait_s
        self.starts_mid_run = starts_mid_run
        self.runs: dict[str, RunState] = {}  # in the order the runs started

    def add(self, volume: ScannerVolume, timestamps: dict[str, float], now_s: float) -> list[Output]:
        """Take one volume; return what can be delivered or reported now."""
        if volume.volume_number < 1:
            raise VolumeFileError(f"{volume.source}: volume number {volume.volume_number} is not positive")
        out: list[Output] = []
        run = self.runs.get(volume.series_key) or self._start_run(volume, out)
        _check_grid(run, volume)
        index = volume.volume_number - 1
        if index in run.delivered or index in run.held:
            self._duplicate(run, index, volume, out)
        elif run.ended:
            self._deliver_after_end(run, index, volume, timestamps, out)
        elif index < run.next_index:
            run.missing.discard(index)
            run.n_late += 1
            out.append(self._deliver(run, index, volume, timestamps, late=True))
            out.append(_event(IngestEventKind.LATE, run, f"arrived after volume {run.next_index - 1}", volume, index))
        elif index == run.next_index:
            if run.held:
                out.append(_event(IngestEventKind.OUT_OF_ORDER, run, "arrived after later volumes", volume, index))
            out.append(self._deliver(run, index, volume, timestamps, late=False))
            out.extend(self._release_in_order(run))
        else:
            run.held[index] = _Held(volume, timestamps, now_s)
        return out

    def poll(self, now_s: float) -> list[Output]:
        """Declare gaps whose wait has expired; deliver what they held back."""
        out: list[Output] = []
        for run in self.runs.values():
            deadline = self._hold_deadline_s(run)
            if deadline is not None and now_s >= deadline:
                out.extend(self._skip_gap(run, "not received within the reorder wait"))
        return out

    def next_deadline_s(self) -> float | None:
        deadlines = [d for d in (self._hold_deadline_s(run) for run in self.runs.values()) if d is not None]
        return min(deadlines, default=None)

    def close(self) -> list[Output]:
        """End every run: held volumes are delivered, their gaps declared missing."""
        out: list[Output] = []
        for run in self.runs.values():
            out.extend(self._end_run(run, "ingest stopped"))
        return out

    def _start_run(self, volume: ScannerVolume, out: list[Output]) -> RunState:
        tr_s = self.tr_s if self.tr_s is not None else volume.tr_s
        if tr_s is None:  # checked before anything changes, so a refused volume leaves no trace
            raise VolumeFileError(f"{volume.source}: the file gives no TR; set scanner.tr_s")
        if self.runs:
            latest = next(reversed(self.runs.values()))
            out.extend(self._end_run(latest, f"series {volume.series_number} started"))
        run = RunState(
            run_index=len(self.runs) + 1,
            series_key=volume.series_key,
            series_number=volume.series_number,
            shape=volume.data.shape,
            affine=volume.affine,
            tr_s=tr_s,
            next_index=volume.volume_number - 1 if self.starts_mid_run and not self.runs else 0,
        )
        self.runs[volume.series_key] = run
        out.append(_event(IngestEventKind.RUN_STARTED, run, f"shape {run.shape}, TR {tr_s:g} s", volume))
        if self.tr_s is not None and volume.tr_s is not None and abs(volume.tr_s - self.tr_s) > _TR_TOLERANCE_S:
            reason = f"file says TR {volume.tr_s:g} s, configured {self.tr_s:g} s is used"
            out.append(_event(IngestEventKind.TR_MISMATCH, run, reason, volume))
        return run

    def _end_run(self, run: RunState, why: str) -> list[Output]:
        if run.ended:
            return []
        out: list[Output] = []
        while run.held:
            out.extend(self._skip_gap(run, f"not received before the run ended ({why})"))
        run.ended = True
        out.append(
            IngestEvent(IngestEventKind.RUN_ENDED, f"{why}; {run.summary()}", None, run.series_number, run.run_index)
        )
        return out

    def _deliver_after_end(
        self, run: RunState, index: int, volume: ScannerVolume, timestamps, out: list[Output]
    ) -> None:
        """A volume of a run that has ended (a later series started): delivered at once, late."""
        gap = tuple(range(run.next_index, index))
        if gap:
            run.missing.update(gap)
            out.append(
                IngestEvent(
                    IngestEventKind.MISSING,
                    "skipped before a volume that came after the run ended",
                    None,
                    run.series_number,
                    run.run_index,
                    gap,
                )
            )
        run.missing.discard(index)
        run.next_index = max(run.next_index, index + 1)
        run.n_late += 1
        out.append(self._deliver(run, index, volume, timestamps, late=True))
        out.append(_event(IngestEventKind.LATE, run, "arrived after its run ended", volume, index))

    def _hold_deadline_s(self, run: RunState) -> float | None:
        if not run.held:
            return None
        wait_s = self.reorder_wait_s if self.reorder_wait_s is not None else run.tr_s / 2
        return min(h.arrived_s for h in run.held.values()) + wait_s

    def _skip_gap(self, run: RunState, why: str) -> list[Output]:
        first_held = min(run.held)
        gap = tuple(range(run.next_index, first_held))
        run.missing.update(gap)
        run.next_index = first_held
        out: list[Output] = [IngestEvent(IngestEventKind.MISSING, why, None, run.series_number, run.run_index, gap)]
        out.extend(self._release_in_order(run))
        return out

    def _release_in_order(self, run: RunState) -> list[Output]:
        out: list[Output] = []
        while run.next_index in run.held:
            held = run.held.pop(run.next_index)
            out.append(self._deliver(run, run.next_index, held.volume, held.timestamps, late=False))
        return out

    def _deliver(
        self, run: RunState, index: int, volume: ScannerVolume, timestamps: dict[str, float], late: bool
    ) -> Volume:
        run.delivered[index] = (content_digest(volume.data), volume.source)
        if not late:
            run.next_index = max(run.next_index, index + 1)
        return Volume(
            data=volume.data,
            affine=volume.affine,
            tr_s=run.tr_s,
            acquisition_time_s=volume.acquisition_time_s,
            slice_times_s=volume.slice_times_s,
            series_number=run.series_number,
            run_index=run.run_index,
            volume_index=index,
            source=volume.source,
            late=late,
            timestamps=timestamps,
        )

    def _duplicate(self, run: RunState, index: int, volume: ScannerVolume, out: list[Output]) -> None:
        """A second arrival of a delivered or held volume.

        The same file read again with the same content (it was touched, or changed while it was being
        read) is nothing to report. The same volume in another file is a DUPLICATE, reported once per
        file however often that file is read. Different content is refused, to be quarantined.
        """
        held = run.held.get(index)
        digest, source = run.delivered.get(index) or (content_digest(held.volume.data), held.volume.source)
        if digest != content_digest(volume.data):
            raise VolumeFileError(
                f"{volume.source}: run {run.run_index} already has a different volume {index} "
                f"(series {run.series_number}, number {volume.volume_number}, first from {source})"
            )
        if source == volume.source or volume.source in run.duplicate_files:
            return
        run.duplicate_files.add(volume.source)
        reason = f"same content as {source.name}, already received; ignored"
        out.append(_event(IngestEventKind.DUPLICATE, run, reason, volume, index))


def _check_grid(run: RunState, volume: ScannerVolume) -> None:
    if volume.data.shape != run.shape:
        raise VolumeShapeError(
            f"{volume.source}: volume shape {volume.data.shape} differs from run {run.run_index}'s {run.shape}"
        )
    if not np.allclose(volume.affine, run.affine, atol=_AFFINE_TOLERANCE_MM):
        raise VolumeShapeError(f"{volume.source}: volume affine differs from run {run.run_index}'s (the grid moved)")


def _event(
    kind: IngestEventKind, run: RunState, reason: str, volume: ScannerVolume, index: int | None = None
) -> IngestEvent:
    indices = () if index is None else (index,)
    return IngestEvent(kind, reason, volume.source, run.series_number, run.run_index, indices)
