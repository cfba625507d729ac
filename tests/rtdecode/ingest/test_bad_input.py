"""Bad files: a clear error naming the file, the file quarantined (copied, never lost), ingest goes on."""

import json
import logging
from pathlib import Path

import numpy as np
import pydicom.data
import pytest

from rtdecode.config import ScannerConfig
from rtdecode.ingest.pipeline import Ingestor
from rtdecode.records import IngestEvent, Volume
from rtdecode.records import IngestEventKind as K
from rtdecode.sim.nifti_writer import encode_nifti_volume
from tests.helpers import NIBABEL_DICOM_DATA, describe, drain, stop_and_drain

AFFINE = np.diag([2.0, 2.0, 2.5, 1.0])


def nifti_bytes(shape, instance, seed=0):
    data = np.random.default_rng(seed).integers(0, 4000, size=shape).astype(np.uint16)
    return encode_nifti_volume(data, AFFINE, 1.5, 1, instance, 0.0, (1.0, 0.0), compress=False)


BAD_FILES = {
    # name: (bytes, what the reason must say)
    "corrupt.dcm": (b"\0" * 128 + b"DICM" + bytes(range(256)) * 4, "image size tags missing"),
    "ct.dcm": (Path(pydicom.data.get_testdata_file("CT_small.dcm")).read_bytes(), "not an MR image (Modality 'CT')"),
    "rle.dcm": (
        Path(pydicom.data.get_testdata_file("MR_small_RLE.dcm")).read_bytes(),
        "compressed pixel data (transfer syntax 1.2.840.10008.1.2.5) is not supported",
    ),
    "vol_001_000009.nii": (nifti_bytes((13, 11, 7), 9)[:900], "volume 1 of 1: 900 of 2354 bytes"),
    "empty.dcm": (b"", "0 bytes, too short for a DICOM header"),
    "notes.log": (b"scanner operator notes\n" * 20, "not a DICOM file (no 'DICM' marker at byte 128)"),
    "vol_001_000003.nii": (nifti_bytes((7, 8, 9), 3), "volume shape (7, 8, 9) differs from run 1's (13, 11, 7)"),
    "0.dcm": ((NIBABEL_DICOM_DATA / "0.dcm").read_bytes(), "256x256 mosaic cannot hold 48 slices in a 7x7 grid"),
}


@pytest.mark.parametrize("mode", ["inotify", "poll"])
def test_bad_files_are_quarantined_and_ingest_goes_on(tmp_path, caplog, mode):
    caplog.set_level(logging.WARNING, logger="rtdecode")
    scan_dir, quarantine = tmp_path / "scanner", tmp_path / "quarantine"
    scan_dir.mkdir()
    settings = ScannerConfig(watch_mode=mode, poll_interval_s=0.05, incomplete_timeout_s=0.5, reorder_wait_s=0.2)
    ingestor = Ingestor(scan_dir, settings, quarantine).start()
    for instance in (1, 2):
        (scan_dir / f"vol_001_{instance:06d}.nii").write_bytes(nifti_bytes((13, 11, 7), instance, seed=instance))
    items = drain(ingestor, lambda i: sum(isinstance(x, Volume) for x in i) == 2)
    for name, (data, _) in BAD_FILES.items():
        (scan_dir / name).write_bytes(data)
    (scan_dir / "vol_001_000004.nii").write_bytes(nifti_bytes((13, 11, 7), 4, seed=4))  # volume 3 (index 2) is bad

    def quarantined(found):
        return {e.path.name for e in found if isinstance(e, IngestEvent) and e.kind == K.QUARANTINED}

    items += drain(ingestor, lambda i: quarantined(items + i) >= set(BAD_FILES), timeout_s=20)
    items += stop_and_drain(ingestor)
    story = "\n".join(describe(i) for i in items)

    events = {e.path.name: e for e in items if isinstance(e, IngestEvent) and e.kind == K.QUARANTINED}
    assert set(events) == set(BAD_FILES), story
    for name, (data, rule) in BAD_FILES.items():
        reason, where = events[name].reason.rsplit(" (see ", 1)
        assert rule in reason, f"{name}: {reason}"
        assert str(scan_dir / name) in reason  # the error names the file
        note_path = Path(where.rstrip(")"))
        note = json.loads(note_path.read_text())
        assert note["source"] == str(scan_dir / name) and rule in note["reason"]
        assert Path(note["copy"]).read_bytes() == data  # nothing lost: the copy is the file as it was
        assert (scan_dir / name).read_bytes() == data  # and the scanner's file is untouched
        assert any(name in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING), name
    assert [(v.volume_index, v.late) for v in items if isinstance(v, Volume)] == [(0, False), (1, False), (3, False)]


def test_ignored_names_are_not_volumes(tmp_path):
    scan_dir = tmp_path / "scanner"
    scan_dir.mkdir()
    ingestor = Ingestor(scan_dir, ScannerConfig(incomplete_timeout_s=0.5), tmp_path / "q").start()
    (scan_dir / "vol_001_000001.json").write_text("{}")
    (scan_dir / ".hidden.dcm").write_bytes(b"x")
    (scan_dir / "vol_001_000001.nii").write_bytes(nifti_bytes((13, 11, 7), 1))
    items = drain(ingestor, lambda i: any(isinstance(x, Volume) for x in i)) + stop_and_drain(ingestor)
    assert [e.kind for e in items if isinstance(e, IngestEvent)] == [K.RUN_STARTED, K.RUN_ENDED]
    assert not (tmp_path / "q").exists()


def test_missing_watch_folder_is_a_clear_error(tmp_path):
    from rtdecode.errors import VolumeFileError

    with pytest.raises(VolumeFileError, match="watch folder does not exist.*nowhere"):
        Ingestor(tmp_path / "nowhere", ScannerConfig(), tmp_path / "q")


def test_unwritable_quarantine_is_reported_and_ingest_goes_on(tmp_path):
    scan_dir = tmp_path / "scanner"
    scan_dir.mkdir()
    (tmp_path / "not-a-folder").write_text("a file where the quarantine folder should be")
    ingestor = Ingestor(scan_dir, ScannerConfig(incomplete_timeout_s=0.5), tmp_path / "not-a-folder").start()
    (scan_dir / "notes.log").write_text("not an image\n" * 20)
    (scan_dir / "vol_001_000001.nii").write_bytes(nifti_bytes((13, 11, 7), 1))
    items = drain(ingestor, lambda i: any(isinstance(x, Volume) for x in i) and len(i) >= 3) + stop_and_drain(ingestor)
    [event] = [e for e in items if isinstance(e, IngestEvent) and e.kind == K.QUARANTINED]
    assert "not a DICOM file" in event.reason and "could not write to the quarantine folder" in event.reason
    assert "the file is left in place" in event.reason and (scan_dir / "notes.log").exists()
    assert not any(isinstance(e, IngestEvent) and e.kind == K.FAILED for e in items)


def test_stop_before_start_ends_the_output(tmp_path):
    from rtdecode.ingest.pipeline import END

    ingestor = Ingestor(tmp_path, ScannerConfig(), tmp_path / "q")
    ingestor.stop()
    assert ingestor.output.get(timeout=1) is END and ingestor.join(timeout_s=1)
