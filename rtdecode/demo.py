"""``rtdecode demo``: the embedded default run, with no scanner and no downloaded weights.

What exists today: a simulated scanner writes a synthetic NSD-sized run as Siemens mosaic DICOM,
faster than real time and with faults injected, and the ingest stage turns it into volumes, printing
each one and each event, then a summary. Later stages (preprocessing, GLM, decoding, display) join
this command as they are built.
"""

import datetime
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

from rtdecode.config import Config
from rtdecode.ingest.pipeline import Ingestor
from rtdecode.ingest.service import IngestSummary, consume, latency_ms
from rtdecode.records import IngestEvent, Volume
from rtdecode.sim.faults import GROWING_FILE_FAULTS, Fault, parse_fault
from rtdecode.sim.scanner import SimulatedScanner
from rtdecode.sim.sources import SyntheticRun
from rtdecode.store import Journal

DEMO_FAULTS = ("slow@3", "duplicate@6", "reorder@9", "drop@12", "late@14:2", "truncate@17", "restart@20")
DEMO_SHAPE = (81, 104, 83)


def demo_workdir(config: Config) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return config.home / "demo" / stamp


def run_demo(
    config: Config,
    workdir: Path,
    n_volumes: int = 26,
    speed: float = 8.0,
    layout: str = "mosaic",
    keep_scanner_files: bool = False,
    say: Callable[[str], None] = print,
) -> IngestSummary:
    """Simulate, ingest, print; return the ingest summary."""
    tr_s = config.scanner.tr_s or 1.6
    faults = [fault for fault in map(parse_fault, DEMO_FAULTS) if _applies(fault, n_volumes, layout)]
    scanner_dir = workdir / "scanner"
    scanner_dir.mkdir(parents=True, exist_ok=True)
    settings = config.scanner.model_copy(
        update={"tr_s": tr_s, "reorder_wait_s": tr_s / speed / 2, "incomplete_timeout_s": 2.0}
    )
    source = SyntheticRun(shape=DEMO_SHAPE, n_volumes=n_volumes)
    scanner = SimulatedScanner(scanner_dir, source, layout=layout, tr_s=tr_s, speed=speed, faults=faults)
    ingestor = Ingestor(scanner_dir, settings, workdir / "quarantine")
    journal = Journal(workdir / "ingest.jsonl")
    say(
        f"rtdecode demo: a simulated scanner writes {n_volumes} {layout} volumes "
        f"({'x'.join(map(str, DEMO_SHAPE))}, TR {tr_s:g} s, {speed:g}x real time) into {scanner_dir}\n"
        f"  injected faults: {', '.join(map(str, faults)) or 'none'}\n"
        f"  ingest: {ingestor.mode} watcher, reorder wait {settings.reorder_wait_s * 1000:.0f} ms, "
        f"incomplete files quarantined after {settings.incomplete_timeout_s:g} s\n"
    )
    stop = threading.Event()
    ingestor.start()
    writer = threading.Thread(
        target=_write_then_settle, args=(scanner, stop, settings.incomplete_timeout_s + 0.5), daemon=True
    )
    writer.start()
    summary = consume(ingestor, journal, stop, on_item=lambda item: say(_describe(item)))
    writer.join()
    if not keep_scanner_files:
        shutil.rmtree(scanner_dir, ignore_errors=True)
    say("\nsummary\n" + summary.describe())
    say("(latency counts a volume's wait while an earlier one was missing: up to the reorder wait)")
    say(f"journal: {journal.path}\nquarantine: {ingestor.quarantine.directory}")
    return summary


def _applies(fault: Fault, n_volumes: int, layout: str) -> bool:
    growing = layout.startswith("nifti-4d")
    return fault.index < n_volumes and (not growing or fault.kind in GROWING_FILE_FAULTS)


def _write_then_settle(scanner: SimulatedScanner, stop: threading.Event, settle_s: float) -> None:
    """Write the run, give ingest time to time out incomplete files, then ask it to stop."""
    scanner.run(stop)
    stop.wait(settle_s)
    stop.set()


def _describe(item: Volume | IngestEvent) -> str:
    if isinstance(item, Volume):
        late = "  (late)" if item.late else ""
        return (
            f"  volume  run {item.run_index}  #{item.volume_index:<3d} series {item.series_number}  "
            f"{latency_ms(item):6.1f} ms{late}"
        )
    return f"  {item.kind.value:<12s}{item.describe()[len(item.kind.value) :]}"
