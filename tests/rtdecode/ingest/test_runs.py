import dataclasses
from pathlib import Path

import numpy as np
import pytest

from rtdecode.errors import VolumeFileError, VolumeShapeError
from rtdecode.ingest.runs import RunTracker
from rtdecode.ingest.scanner_volume import ScannerVolume
from rtdecode.records import IngestEvent, Volume
from rtdecode.records import IngestEventKind as K

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def scanner_volume(number, series="uid-5", series_number=5, shape=(7, 8, 9), seed=None, tr_s=1.5):
    rng = np.random.default_rng(number if seed is None else seed)
    return ScannerVolume(
        data=rng.random(shape, dtype=np.float32),
        affine=AFFINE,
        tr_s=tr_s,
        acquisition_time_s=None,
        slice_times_s=None,
        series_key=series,
        series_number=series_number,
        volume_number=number,
        source=Path(f"/scan/{series_number}_{number}.dcm"),
    )


def feed(tracker, numbers, now_s=0.0, **kwargs):
    out = []
    for number in numbers:
        out += tracker.add(scanner_volume(number, **kwargs), {"seen": now_s}, now_s)
    return out


def volumes(out):
    return [(v.run_index, v.volume_index, v.late) for v in out if isinstance(v, Volume)]


def events(out, kind=None):
    return [e for e in out if isinstance(e, IngestEvent) and (kind is None or e.kind == kind)]


def test_in_order_run():
    out = feed(RunTracker(), [1, 2, 3])
    assert volumes(out) == [(1, 0, False), (1, 1, False), (1, 2, False)]
    [started] = events(out)
    assert started.kind == K.RUN_STARTED and started.run_index == 1 and started.series_number == 5


def test_reordered_pair_is_delivered_in_order():
    tracker = RunTracker(reorder_wait_s=0.5)
    out = feed(tracker, [1, 3, 2], now_s=0.1)
    assert volumes(out) == [(1, 0, False), (1, 1, False), (1, 2, False)]
    [reordered] = events(out, K.OUT_OF_ORDER)
    assert reordered.volume_indices == (1,)
    assert tracker.next_deadline_s() is None


def test_gap_is_declared_missing_after_the_wait_then_late_arrival():
    tracker = RunTracker(reorder_wait_s=0.5)
    out = feed(tracker, [1, 2, 5, 6], now_s=10.0)
    assert volumes(out) == [(1, 0, False), (1, 1, False)]
    assert tracker.next_deadline_s() == pytest.approx(10.5)
    assert tracker.poll(10.4) == []
    out = tracker.poll(10.5)
    [missing] = events(out, K.MISSING)
    assert missing.volume_indices == (2, 3)
    assert volumes(out) == [(1, 4, False), (1, 5, False)]
    out = feed(tracker, [3], now_s=11.0)
    assert volumes(out) == [(1, 2, True)]
    assert events(out, K.LATE)[0].volume_indices == (2,)
    assert tracker.runs["uid-5"].missing == {3}


def test_default_wait_is_half_a_tr():
    tracker = RunTracker(tr_s=2.0)
    feed(tracker, [1, 3], now_s=0.0)
    assert tracker.next_deadline_s() == pytest.approx(1.0)


def test_duplicates():
    tracker = RunTracker()
    feed(tracker, [1, 2])
    copy = dataclasses.replace(scanner_volume(2), source=Path("/scan/copy_of_2.dcm"))
    out = tracker.add(copy, {"seen": 0.0}, 0.0)
    [duplicate] = events(out, K.DUPLICATE)
    assert duplicate.volume_indices == (1,) and volumes(out) == []
    assert "same content as 5_2.dcm" in duplicate.reason
    assert feed(tracker, [2]) == []  # the same file read again (touched): nothing to report
    with pytest.raises(VolumeFileError, match="already has a different volume 1 .* first from /scan/5_2.dcm"):
        tracker.add(scanner_volume(2, seed=99), {"seen": 0.0}, 0.0)


def test_a_refused_first_volume_of_a_new_series_changes_nothing():
    tracker = RunTracker(reorder_wait_s=5.0)
    feed(tracker, [1, 3])  # 3 is held, waiting for 2
    with pytest.raises(VolumeFileError, match="gives no TR"):
        tracker.add(scanner_volume(1, series="uid-6", series_number=6, tr_s=None), {}, 0.0)
    assert not tracker.runs["uid-5"].ended and list(tracker.runs["uid-5"].held) == [2]
    assert volumes(feed(tracker, [2])) == [(1, 1, False), (1, 2, False)]


def test_new_series_starts_the_next_run_and_ends_the_last():
    tracker = RunTracker(reorder_wait_s=5.0)
    out = feed(tracker, [1, 2, 4])
    out = feed(tracker, [1, 2], series="uid-6", series_number=6)
    kinds = [e.kind for e in events(out)]
    assert kinds == [K.MISSING, K.RUN_ENDED, K.RUN_STARTED]
    assert events(out, K.MISSING)[0].volume_indices == (2,)
    assert "3 volumes delivered, missing: 2" in events(out, K.RUN_ENDED)[0].reason
    assert volumes(out) == [(1, 3, False), (2, 0, False), (2, 1, False)]
    out = feed(tracker, [5])  # a straggler of the first run: delivered late, gap reported
    assert volumes(out) == [(1, 4, True)]
    assert events(out, K.LATE)[0].reason == "arrived after its run ended"


def test_grid_changes_are_refused():
    tracker = RunTracker()
    feed(tracker, [1])
    with pytest.raises(VolumeShapeError, match=r"shape \(7, 8, 10\) differs from run 1's \(7, 8, 9\)"):
        tracker.add(scanner_volume(2, shape=(7, 8, 10)), {}, 0.0)
    moved = scanner_volume(2)
    moved = ScannerVolume(**{**moved.__dict__, "affine": AFFINE + np.eye(4) * 0.1})
    with pytest.raises(VolumeShapeError, match="grid moved"):
        tracker.add(moved, {}, 0.0)


def test_tr_comes_from_config_and_mismatch_is_reported():
    tracker = RunTracker(tr_s=2.0)
    out = feed(tracker, [1], tr_s=1.5)
    assert events(out, K.TR_MISMATCH)[0].reason == "file says TR 1.5 s, configured 2 s is used"
    assert [v.tr_s for v in out if isinstance(v, Volume)] == [2.0]
    with pytest.raises(VolumeFileError, match="gives no TR; set scanner.tr_s"):
        RunTracker().add(scanner_volume(1, tr_s=None), {}, 0.0)


def test_mid_run_start_applies_to_the_first_run_only():
    tracker = RunTracker(starts_mid_run=True, reorder_wait_s=0.1)
    out = feed(tracker, [37, 38])
    assert volumes(out) == [(1, 36, False), (1, 37, False)] and events(out, K.MISSING) == []
    out = feed(tracker, [2], series="uid-6", series_number=6)  # a later run whose first volume is lost
    assert volumes(out) == []
    assert events(tracker.poll(1.0), K.MISSING)[0].volume_indices == (0,)
    with pytest.raises(VolumeFileError, match="volume number 0 is not positive"):
        RunTracker().add(scanner_volume(0), {}, 0.0)


def test_close_ends_every_run():
    tracker = RunTracker(reorder_wait_s=5.0)
    feed(tracker, [1, 3])
    out = tracker.close()
    assert [e.kind for e in events(out)] == [K.MISSING, K.RUN_ENDED]
    assert volumes(out) == [(1, 2, False)]
    assert tracker.close() == []
