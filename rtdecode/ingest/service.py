"""Run the ingest stage on its own: log every volume with its latency, journal everything.

This is what ``rtdecode ingest --watch DIR`` runs; the daemon consumes the same
:class:`~rtdecode.ingest.pipeline.Ingestor` output itself.
"""

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable

import numpy as np

from rtdecode.errors import RtDecodeError
from rtdecode.ingest.pipeline import END, Ingestor
from rtdecode.records import IngestEvent, IngestEventKind, Volume
from rtdecode.store import Journal

log = logging.getLogger("rtdecode.ingest")


@dataclasses.dataclass
class IngestSummary:
    """What a stretch of ingest saw."""

    n_volumes: int = 0
    latencies_ms: list[float] = dataclasses.field(default_factory=list)
    events: dict[str, int] = dataclasses.field(default_factory=dict)

    def describe(self) -> str:
        lines = [f"volumes delivered: {self.n_volumes}"]
        if self.latencies_ms:
            median, p95 = np.percentile(self.latencies_ms, [50, 95])
            worst = max(self.latencies_ms)
            lines.append(f"latency seen->available: median {median:.1f} ms, p95 {p95:.1f} ms, max {worst:.1f} ms")
        if self.events:
            lines.append("events: " + ", ".join(f"{k} {v}" for k, v in sorted(self.events.items())))
        return "\n".join(lines)


def latency_ms(volume: Volume) -> float:
    """From the watcher's hint that led to the read (in inotify mode, the file's close) to available."""
    return (volume.timestamps["available"] - volume.timestamps["seen"]) * 1000


def volume_entry(volume: Volume) -> dict:
    return {
        "kind": "volume",
        "run": volume.run_index,
        "series": volume.series_number,
        "volume": volume.volume_index,
        "late": volume.late,
        "file": str(volume.source),
        "latency_ms": round(latency_ms(volume), 3),
    }


def event_entry(event: IngestEvent) -> dict:
    return {
        "kind": event.kind.value,
        "run": event.run_index,
        "series": event.series_number,
        "volumes": list(event.volume_indices),
        "file": str(event.path) if event.path else None,
        "reason": event.reason,
    }


def consume(
    ingestor: Ingestor,
    journal: Journal | None,
    stop: threading.Event,
    duration_s: float | None = None,
    max_volumes: int | None = None,
    on_item: Callable[[Volume | IngestEvent], None] | None = None,
) -> IngestSummary:
    """Drain the ingestor's output until ``stop`` is set, ``duration_s`` has passed or ``max_volumes``
    arrived; then stop the ingestor and drain what its shutdown reports (runs ended, files pending).

    Raises
    ------
    RtDecodeError
        After draining, if ingest itself failed (a FAILED event): the caller must not carry on as if
        the folder were still watched.
    """
    summary = IngestSummary()
    deadline_s = None if duration_s is None else time.monotonic() + duration_s
    stopping = False
    failures = []
    while True:
        try:
            item = ingestor.output.get(timeout=0.1)
        except queue.Empty:
            item = None
        if item is END:
            break
        if item is not None:
            _record(item, summary, journal)
            if isinstance(item, IngestEvent) and item.kind == IngestEventKind.FAILED:
                failures.append(item.reason)
            if on_item is not None:
                on_item(item)
        if (max_volumes is not None and summary.n_volumes >= max_volumes) or (
            deadline_s is not None and time.monotonic() >= deadline_s
        ):
            stop.set()
        if stop.is_set() and not stopping:
            stopping = True
            ingestor.stop()
    if failures:
        raise RtDecodeError("; ".join(failures))
    return summary


def _record(item: Volume | IngestEvent, summary: IngestSummary, journal: Journal | None) -> None:
    if isinstance(item, Volume):
        summary.n_volumes += 1
        summary.latencies_ms.append(latency_ms(item))
        entry = volume_entry(item)
        shape = "x".join(str(n) for n in item.shape)
        log.info(
            "volume run %d #%d (series %d)%s",
            item.run_index,
            item.volume_index,
            item.series_number,
            " LATE" if item.late else "",
            extra={"fields": {"latency_ms": f"{entry['latency_ms']:.2f}", "shape": shape, "file": item.source.name}},
        )
    else:
        summary.events[item.kind.value] = summary.events.get(item.kind.value, 0) + 1
        entry = event_entry(item)
    if journal is not None:
        journal.append(entry)
