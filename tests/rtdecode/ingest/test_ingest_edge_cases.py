"""Edge cases of the ingest stage, each once a way to lose or misreport a file."""

import dataclasses
import os
import time

import numpy as np
import pytest
from pydicom.uid import generate_uid

from rtdecode.config import ScannerConfig
from rtdecode.dicom_geometry import geometry_from_affine
from rtdecode.ingest.pipeline import Ingestor
from rtdecode.records import IngestEvent, Volume
from rtdecode.records import IngestEventKind as K
from rtdecode.sim.dicom_writer import encode_classic, new_series_header
from rtdecode.sim.faults import parse_fault
from rtdecode.sim.scanner import SimulatedScanner
from rtdecode.sim.sources import SyntheticRun
from tests.helpers import describe, drain, stop_and_drain

SHAPE = (13, 11, 7)


def volumes(items):
    return [i for i in items if isinstance(i, Volume)]


def events(items, kind):
    return [i for i in items if isinstance(i, IngestEvent) and i.kind == kind]


def start(tmp_path, **settings):
    scan_dir = tmp_path / "scanner"
    scan_dir.mkdir(exist_ok=True)
    return scan_dir, Ingestor(scan_dir, ScannerConfig(**settings), tmp_path / "quarantine").start()


def test_a_file_still_growing_past_the_timeout_is_not_quarantined(tmp_path):
    """Written over 1.2 s in 8 pieces, with a 0.5 s incomplete timeout: it keeps changing, so it waits."""
    scan_dir, ingestor = start(tmp_path, incomplete_timeout_s=0.5)
    source = SyntheticRun(shape=SHAPE, n_volumes=1)
    scanner = SimulatedScanner(
        scan_dir, source, layout="mosaic", tr_s=1.0, faults=[parse_fault("slow@0:1.2")], chunks=8
    )
    scanner.run()
    items = drain(ingestor, lambda i: len(volumes(i)) == 1) + stop_and_drain(ingestor)
    assert events(items, K.QUARANTINED) == [], [describe(i) for i in items]
    np.testing.assert_array_equal(volumes(items)[0].data, scanner.scanner_volume(0))


def test_every_slice_of_a_refused_classic_volume_is_quarantined(tmp_path):
    scan_dir, ingestor = start(tmp_path, incomplete_timeout_s=0.5)
    source = SyntheticRun(shape=SHAPE, n_volumes=2)
    header = new_series_header(1, geometry_from_affine(source.affine, SHAPE), 1.0, (0.0,) * 7, generate_uid())
    stored = source.volume(0).astype(np.uint16)  # its own grid: no need for the scanner's slice order
    for number, data in enumerate(encode_classic(stored, header, 1, 100.0)):
        (scan_dir / f"a_{number}.dcm").write_bytes(data)
    bigger = (13, 12, 7)  # same series, one more row: the run's grid does not allow it
    other = dataclasses.replace(header, geometry=geometry_from_affine(source.affine, bigger))
    for number, data in enumerate(encode_classic(np.zeros(bigger, np.uint16), other, 2, 101.0)):
        (scan_dir / f"b_{number}.dcm").write_bytes(data)
    items = drain(ingestor, lambda i: len(events(i, K.QUARANTINED)) == 7) + stop_and_drain(ingestor)
    assert [v.volume_index for v in volumes(items)] == [0]
    quarantined = sorted(e.path.name for e in events(items, K.QUARANTINED))
    assert quarantined == [f"b_{n}.dcm" for n in range(7)]
    assert all("differs from run 1's (13, 11, 7)" in e.reason for e in events(items, K.QUARANTINED))


def test_files_read_again_unchanged_are_not_reported(tmp_path):
    """A finished file touched (mtime changes) is read again: same file, same content, nothing to say."""
    scan_dir, ingestor = start(tmp_path, rescan_interval_s=0.1)
    for layout in ("mosaic", "classic"):
        SimulatedScanner(scan_dir / layout, SyntheticRun(shape=SHAPE, n_volumes=2), layout=layout, speed=1000).run()
    items = drain(ingestor, lambda i: len(volumes(i)) == 4)
    time.sleep(0.05)
    for path in (scan_dir / "mosaic").iterdir():
        os.utime(path)
    for path in (scan_dir / "classic").iterdir():
        os.utime(path)
    time.sleep(0.5)  # several rescans: each touched file is seen again and read again
    items += stop_and_drain(ingestor)
    assert len(volumes(items)) == 4
    reported = {K.DUPLICATE, K.QUARANTINED, K.MISSING, K.LATE, K.OUT_OF_ORDER}
    assert [e for e in items if isinstance(e, IngestEvent) and e.kind in reported] == []


@pytest.mark.parametrize("layout", ["mosaic", "classic"])  # whole volumes, then single slices
def test_a_duplicate_copy_read_again_is_reported_once(tmp_path, layout):
    """Copies whose mtime changes after they were judged duplicates (the writer closing late, or setting
    the time) are read again; each is still the same duplicate, not a second one."""
    scan_dir, ingestor = start(tmp_path, rescan_interval_s=0.1)
    SimulatedScanner(scan_dir, SyntheticRun(shape=SHAPE, n_volumes=1), layout=layout, speed=1000).run()
    items = drain(ingestor, lambda i: len(volumes(i)) == 1)
    copies = [scan_dir / f"copy1_{path.name}" for path in sorted(scan_dir.iterdir())]
    for copy in copies:
        copy.write_bytes((scan_dir / copy.name.removeprefix("copy1_")).read_bytes())
    items += drain(ingestor, lambda i: len(events(i, K.DUPLICATE)) == len(copies))
    for copy in copies:
        os.utime(copy, (time.time() + 5, time.time() + 5))
    time.sleep(0.5)  # several rescans: each touched copy is seen again and read again
    items += stop_and_drain(ingestor)
    reported = sorted(e.path.name for e in events(items, K.DUPLICATE))
    assert reported == [c.name for c in copies], [describe(i) for i in items]


def test_files_in_a_hidden_staging_folder_wait_until_moved_out(tmp_path):
    scan_dir, ingestor = start(tmp_path)
    staging = scan_dir / ".incoming"
    SimulatedScanner(staging, SyntheticRun(shape=SHAPE, n_volumes=1), layout="mosaic", speed=1000).run()
    time.sleep(0.3)
    assert ingestor.output.qsize() == 0  # seen by inotify, ignored by name
    for path in staging.iterdir():
        os.replace(path, scan_dir / path.name)
    items = drain(ingestor, lambda i: len(volumes(i)) == 1) + stop_and_drain(ingestor)
    assert [v.source.parent for v in volumes(items)] == [scan_dir]
    assert events(items, K.DUPLICATE) == [] and events(items, K.QUARANTINED) == []
