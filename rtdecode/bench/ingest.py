"""``rtdecode bench ingest``: latency from a scanner file being closed to its Volume being available.

A separate writer process (the simulated scanner, so it does not share this process's interpreter
lock) writes NSD-sized volumes (81x104x83 on the 1.8 mm grid) at a fixed interval; this process runs
the ingest stage exactly as ``rtdecode ingest`` does and takes, per volume,

* close -> available: the writer's monotonic time right after ``close()`` to the moment the volume
  is put on ingest's output queue (the figure the goal is set on: p95 <= 10 ms on 2 cores);
* and its parts: close -> seen (the watcher's event), seen -> read (read and decode),
  read -> available (ordering and checks).

CLOCK_MONOTONIC is shared by all processes of one host, so the two sides' times are comparable.
"""

import dataclasses
import multiprocessing
import os
import queue
import tempfile
import time
from pathlib import Path

import numpy as np

from rtdecode.config import ScannerConfig
from rtdecode.ingest.pipeline import END, Ingestor
from rtdecode.records import Volume
from rtdecode.sim.scanner import SimulatedScanner
from rtdecode.sim.sources import SyntheticRun

NSD_SHAPE = (81, 104, 83)
_BENCH_TR_S = 1.6


@dataclasses.dataclass(frozen=True)
class LayoutResult:
    layout: str
    file_mb: float
    n_volumes: int
    n_received: int
    close_to_available_ms: np.ndarray
    close_to_seen_ms: np.ndarray
    seen_to_read_ms: np.ndarray
    read_to_available_ms: np.ndarray


def _write_run(out_dir: str, layout: str, shape, n_volumes: int, interval_s: float, start, closes) -> None:
    """In the writer process: wait for ``start``, write the run, send back (volume number, closed_s)."""
    source = SyntheticRun(shape=tuple(shape), n_volumes=n_volumes)
    scanner = SimulatedScanner(
        Path(out_dir), source, layout=layout, tr_s=_BENCH_TR_S, speed=_BENCH_TR_S / interval_s, chunk_pause_s=0.0
    )
    start.wait()
    records = scanner.run()
    sizes = [p.stat().st_size for r in records for p in r.paths]
    closes.put(([(r.write.volume_number, r.closed_s) for r in records], float(np.mean(sizes))))


def bench_layout(layout: str, n_volumes: int, shape, interval_s: float, watch_mode: str) -> LayoutResult:
    """Run one layout; files go to a temporary folder that is removed afterwards."""
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="rtdecode-bench-") as workdir:
        watch = Path(workdir) / "scanner"
        watch.mkdir()
        start, closes = context.Event(), context.Queue()
        writer = context.Process(
            target=_write_run,
            args=(str(watch), layout, tuple(shape), n_volumes, interval_s, start, closes),
            daemon=True,
        )
        writer.start()
        scanner = ScannerConfig(watch_mode=watch_mode, tr_s=_BENCH_TR_S, reorder_wait_s=interval_s / 2)
        ingestor = Ingestor(watch, scanner, Path(workdir) / "quarantine").start()
        start.set()
        stamps = _collect(ingestor, n_volumes, timeout_s=n_volumes * interval_s + 60)
        close_times, mean_size = closes.get(timeout=60)
        writer.join(timeout=10)
        ingestor.stop()
        _drain_to_end(ingestor)
    return _result(layout, mean_size, n_volumes, stamps, dict(close_times))


def _collect(ingestor: Ingestor, n_volumes: int, timeout_s: float) -> list[tuple[int, dict[str, float]]]:
    """(volume index, timestamps) per volume. Volumes are dropped at once, as a real consumer (masking)
    drops them: holding hundreds of them would make every new array land on fresh pages."""
    stamps: list[tuple[int, dict[str, float]]] = []
    deadline = time.monotonic() + timeout_s
    while len(stamps) < n_volumes and time.monotonic() < deadline:
        try:
            item = ingestor.output.get(timeout=0.5)
        except queue.Empty:
            continue
        if isinstance(item, Volume):
            stamps.append((item.volume_index, dict(item.timestamps)))
    return stamps


def _drain_to_end(ingestor: Ingestor) -> None:
    while ingestor.output.get(timeout=30) is not END:
        pass


def _result(layout: str, mean_size: float, n_volumes: int, stamps, closed_s: dict[int, float]) -> LayoutResult:
    rows = [(closed_s[index + 1], times) for index, times in stamps if index + 1 in closed_s]

    def span_ms(start: str, end: str) -> np.ndarray:
        return np.array(
            [(times[end] - (closed if start == "closed" else times[start])) * 1000 for closed, times in rows]
        )

    return LayoutResult(
        layout=layout,
        file_mb=mean_size / 1e6,
        n_volumes=n_volumes,
        n_received=len(stamps),
        close_to_available_ms=span_ms("closed", "available"),
        close_to_seen_ms=span_ms("closed", "seen"),
        seen_to_read_ms=span_ms("seen", "read"),
        read_to_available_ms=span_ms("read", "available"),
    )


def format_results(results: list[LayoutResult], shape, interval_s: float, watch_mode: str, goal_p95_ms: float) -> str:
    lines = [
        f"rtdecode bench ingest: {results[0].n_volumes} volumes per layout, {'x'.join(map(str, shape))} voxels, "
        f"one every {interval_s * 1000:.0f} ms, watch mode {watch_mode}, {os.cpu_count()} CPUs",
        "latency from the writer's close() to the Volume on ingest's output queue, ms",
        f"{'layout':<10}{'file MB':>8}{'received':>10}{'median':>9}{'p95':>8}{'max':>8}   "
        f"{'p95 parts: close>seen  seen>read  read>avail':>44}",
    ]
    for r in results:
        total = r.close_to_available_ms
        if total.size == 0:
            lines.append(f"{r.layout:<10}{r.file_mb:>8.2f}{r.n_received:>5}/{r.n_volumes:<4} no volumes received")
            continue
        parts = [np.percentile(a, 95) for a in (r.close_to_seen_ms, r.seen_to_read_ms, r.read_to_available_ms)]
        lines.append(
            f"{r.layout:<10}{r.file_mb:>8.2f}{r.n_received:>5}/{r.n_volumes:<4}{np.median(total):>9.2f}"
            f"{np.percentile(total, 95):>8.2f}{total.max():>8.2f}   {parts[0]:>22.2f}{parts[1]:>11.2f}{parts[2]:>11.2f}"
        )
    verdicts = [f"{r.layout} {'meets' if _meets(r, goal_p95_ms) else 'MISSES'}" for r in results]
    lines.append(f"goal: p95 <= {goal_p95_ms:g} ms: " + ", ".join(verdicts))
    return "\n".join(lines)


def _meets(result: LayoutResult, goal_p95_ms: float) -> bool:
    latencies = result.close_to_available_ms
    return latencies.size > 0 and result.n_received == result.n_volumes and np.percentile(latencies, 95) <= goal_p95_ms
