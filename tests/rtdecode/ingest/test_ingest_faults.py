"""The ingest stage against a real simulated scanner, real files and real inotify / polling.

Each injected fault must give its documented outcome (rtdecode/sim/faults.py, docs/ingest.md), every
delivered volume must equal what the scanner wrote (so no partial file ever became a volume), and
every file must be accounted for.
"""

import numpy as np
import pytest

from rtdecode.config import ScannerConfig
from rtdecode.ingest.pipeline import Ingestor
from rtdecode.records import IngestEvent, Volume
from rtdecode.records import IngestEventKind as K
from rtdecode.sim.faults import parse_fault
from rtdecode.sim.scanner import SimulatedScanner
from rtdecode.sim.sources import SyntheticRun
from tests.helpers import describe, drain, stop_and_drain

SHAPE = (13, 11, 7)
TR_S, SPEED = 1.0, 2.5  # a volume every 0.4 s
# the reorder wait leaves 0.26 s of slack for a reordered pair (written 0.04 s apart) and 0.1 s before
# the next volume is due; generous for a loaded 2-core CI machine
SETTINGS = dict(reorder_wait_s=0.3, incomplete_timeout_s=1.0, poll_interval_s=0.05)
TRUNCATED_REASON = {  # what the quarantine reason of the truncated volume's file says
    "mosaic": "Pixel Data has",
    "enhanced": "Pixel Data has",
    "classic": "incomplete, unchanged",  # the last slice file is the one cut short
    "nifti": "volume 1 of 1:",
    "nifti-gz": "volume 1 of 1:",
}
CORRUPT_REASON = {
    "mosaic": "incomplete, unchanged",  # unparseable DICOM cannot be told from a partial one
    "enhanced": "incomplete, unchanged",
    "classic": "incomplete, unchanged",
    "nifti": "not a NIfTI file",
    "nifti-gz": "corrupt gzip stream",
}


def expected_reason(layout: str, name: str) -> str:
    if layout == "classic" and not name.endswith("_006.dcm"):
        return "of 7 slices"  # the volume's other, intact slices: stranded
    return TRUNCATED_REASON[layout] if "_000003" in name else CORRUPT_REASON[layout]


ALL_FAULTS = ("truncate@2", "slow@4", "duplicate@5", "reorder@7", "drop@10", "late@12:3", "corrupt@16", "restart@18")


def run_scanner(tmp_path, layout, mode, faults, n_volumes, chunks=4, until=None):
    scan_dir = tmp_path / "scanner"
    scan_dir.mkdir()
    scanner = SimulatedScanner(
        scan_dir,
        SyntheticRun(shape=SHAPE, n_volumes=n_volumes, seed=3),
        layout=layout,
        tr_s=TR_S,
        speed=SPEED,
        faults=[parse_fault(f) for f in faults],
        chunks=chunks,
    )
    ingestor = Ingestor(scan_dir, ScannerConfig(watch_mode=mode, **SETTINGS), tmp_path / "quarantine").start()
    scanner.run()
    items = drain(ingestor, until) if until is not None else []
    items += stop_and_drain(ingestor)
    return scanner, ingestor, items


def by_kind(items, kind):
    return [i for i in items if isinstance(i, IngestEvent) and i.kind == kind]


def delivered(items):
    return [i for i in items if isinstance(i, Volume)]


def assert_volumes_are_what_was_written(scanner, volumes):
    for volume in volumes:
        np.testing.assert_array_equal(
            volume.data, scanner.scanner_volume(volume.volume_index), err_msg=describe(volume)
        )
        np.testing.assert_allclose(volume.affine, scanner.affine, atol=1e-4)


def quarantined_volume_numbers(items):
    return {int(e.path.name.split("_")[2][:6]) for e in by_kind(items, K.QUARANTINED)}


@pytest.mark.parametrize(
    "layout, mode",
    [
        ("mosaic", "inotify"),
        ("mosaic", "poll"),
        ("enhanced", "inotify"),
        ("classic", "inotify"),
        ("nifti", "inotify"),
        ("nifti-gz", "poll"),
    ],
)
def test_every_fault_gives_its_documented_outcome(tmp_path, layout, mode):
    def until(items):  # all good volumes in, both bad files quarantined (after the incomplete timeout)
        return len(delivered(items)) == 17 and quarantined_volume_numbers(items) == {3, 17}

    scanner, ingestor, items = run_scanner(tmp_path, layout, mode, ALL_FAULTS, 20, until=until)
    story = "\n".join(describe(i) for i in items)
    volumes = delivered(items)
    run1 = [(v.volume_index, v.late) for v in volumes if v.run_index == 1]
    run2 = [(v.volume_index, v.late) for v in volumes if v.run_index == 2]
    # in order, each once; truncated (2), dropped (10) and corrupt (16) never delivered
    assert [i for i, late in run1 if not late] == [0, 1, 3, 4, 5, 6, 7, 8, 9, 11, 13, 14, 15, 17], story
    # 12 was written 3 TRs late: delivered, flagged late, after the volume that followed it
    assert [i for i, late in run1 if late] == [12], story
    assert run1.index((12, True)) > run1.index((13, False)), story
    assert run2 == [(0, False), (1, False)], story  # the restart: a new run, numbered from 0
    missing = sorted(i for e in by_kind(items, K.MISSING) if e.run_index == 1 for i in e.volume_indices)
    assert missing == [2, 10, 12, 16], story
    assert [e.volume_indices for e in by_kind(items, K.LATE)] == [(12,)], story
    duplicates = by_kind(items, K.DUPLICATE)
    if layout == "classic":  # one report per slice file of the copy
        assert sorted(e.path.name for e in duplicates) == [f"001_000001_000006_copy1_{k:03d}.dcm" for k in range(7)]
    else:
        assert [e.volume_indices for e in duplicates] == [(5,)], story
    assert [e.volume_indices for e in by_kind(items, K.OUT_OF_ORDER)] == [(7,)], story
    assert [e.run_index for e in by_kind(items, K.RUN_STARTED)] == [1, 2], story
    assert [e.run_index for e in by_kind(items, K.RUN_ENDED)] == [1, 2], story
    assert quarantined_volume_numbers(items) == {3, 17}, story  # file numbers are 1-based
    for event in by_kind(items, K.QUARANTINED):
        reason = event.reason.rsplit(" (see ", 1)[0]
        assert expected_reason(layout, event.path.name) in reason, story
        assert str(event.path) in reason, story  # names the file
    notes = sorted((tmp_path / "quarantine").glob("*.reason.json"))
    assert len(notes) == len(by_kind(items, K.QUARANTINED))
    assert_volumes_are_what_was_written(scanner, volumes)
    assert by_kind(items, K.TR_MISMATCH) == []


@pytest.mark.parametrize("mode", ["inotify", "poll"])
@pytest.mark.parametrize("layout", ["mosaic", "nifti-gz"])
def test_chunked_and_slow_writes_never_yield_a_partial_volume(tmp_path, layout, mode):
    """Every file written slowly in 8 pieces, closed and reopened between pieces."""
    faults = [f"slow@{k}:0.6" for k in range(6)]
    scanner, _, items = run_scanner(tmp_path, layout, mode, faults, 6, chunks=8, until=lambda i: len(delivered(i)) == 6)
    volumes = delivered(items)
    assert [(v.volume_index, v.late) for v in volumes] == [(k, False) for k in range(6)]
    assert_volumes_are_what_was_written(scanner, volumes)
    assert [e.kind for e in items if isinstance(e, IngestEvent)] == [K.RUN_STARTED, K.RUN_ENDED]


@pytest.mark.parametrize("layout", ["nifti-4d", "nifti-4d-gz"])
def test_growing_4d_file_with_slow_writes_and_a_restart(tmp_path, layout):
    scanner, _, items = run_scanner(
        tmp_path, layout, "inotify", ["slow@2", "restart@5"], 8, until=lambda i: len(delivered(i)) == 8
    )
    volumes = delivered(items)
    assert [(v.run_index, v.volume_index) for v in volumes] == [(1, k) for k in range(5)] + [(2, k) for k in range(3)]
    assert_volumes_are_what_was_written(scanner, volumes)
    assert by_kind(items, K.MISSING) == [] and by_kind(items, K.QUARANTINED) == []


def test_existing_files_are_ingested_in_scanner_order(tmp_path):
    """Files already there at start (written out of order) come out in order, with no reorder reports."""
    scan_dir = tmp_path / "scanner"
    faults = [parse_fault("reorder@1"), parse_fault("reorder@3")]
    SimulatedScanner(scan_dir, SyntheticRun(shape=SHAPE, n_volumes=6), layout="mosaic", speed=1000, faults=faults).run()
    ingestor = Ingestor(scan_dir, ScannerConfig(**SETTINGS), tmp_path / "q").start()
    items = drain(ingestor, lambda i: len(delivered(i)) == 6) + stop_and_drain(ingestor)
    assert [v.volume_index for v in delivered(items)] == list(range(6))
    assert by_kind(items, K.OUT_OF_ORDER) == [] and by_kind(items, K.MISSING) == []


def test_existing_files_can_be_ignored(tmp_path):
    scan_dir = tmp_path / "scanner"
    SimulatedScanner(scan_dir, SyntheticRun(shape=SHAPE, n_volumes=3), layout="mosaic", speed=1000).run()
    ingestor = Ingestor(scan_dir, ScannerConfig(existing_files="ignore", **SETTINGS), tmp_path / "q").start()
    SimulatedScanner(
        scan_dir, SyntheticRun(shape=SHAPE, n_volumes=2), layout="mosaic", speed=1000, first_series=2
    ).run()
    items = drain(ingestor, lambda i: len(delivered(i)) == 2) + stop_and_drain(ingestor)
    assert [(v.series_number, v.volume_index) for v in delivered(items)] == [(2, 0), (2, 1)]
