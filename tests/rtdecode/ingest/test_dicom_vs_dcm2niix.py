"""dcm2niix is the independent oracle for the DICOM readers.

Our volumes use dcm2niix's voxel order, so "after orientation handling" the comparison is direct:
the array and affine we read equal those of the NIfTI dcm2niix writes for the same files.
"""

import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from rtdecode.errors import IncompleteFileError, VolumeFileError
from rtdecode.ingest.reader import VolumeReader
from rtdecode.sim.scanner import SimulatedScanner
from rtdecode.sim.sources import SyntheticRun
from tests.helpers import NIBABEL_DICOM_DATA, run_dcm2niix

AFFINE_ATOL_MM = 1e-3


def read_all(folder, reader=None):
    reader = reader or VolumeReader()
    volumes = []
    for path in sorted(folder.iterdir()):
        found, finished = reader.read(path)
        assert finished
        volumes.extend(found)
    return volumes


def oracle(folder, tmp_path, one_file_at_a_time=False):
    """dcm2niix's conversion: (affine, sidecar, volumes), the volumes of all its outputs in order.

    dcm2niix stacks a mosaic or classic series into one 4D file. Enhanced multi-frame files are
    converted one at a time: given several at once, dcm2niix 1.0.20260724 decides the rescale
    "varies" and writes garbage float32 for the first file.
    """
    if one_file_at_a_time:
        outputs = []
        for number, path in enumerate(sorted(folder.iterdir())):
            single = tmp_path / f"single{number}"
            single.mkdir()
            shutil.copyfile(path, single / path.name)
            outputs += run_dcm2niix(single, tmp_path / f"dcm2niix{number}")
    else:
        outputs = run_dcm2niix(folder, tmp_path / "dcm2niix")
    images = [nib.load(path) for path in outputs]
    sidecar = json.loads(Path(images[0].get_filename()).with_suffix(".json").read_text())
    volumes = []
    for image in images:
        data = np.asarray(image.dataobj, dtype=np.float32)
        volumes.extend([data] if data.ndim == 3 else [data[..., k] for k in range(data.shape[3])])
        np.testing.assert_allclose(image.affine, images[0].affine, atol=AFFINE_ATOL_MM)
    return images[0].affine, sidecar, volumes


@pytest.mark.parametrize("layout", ["mosaic", "enhanced", "classic"])
@pytest.mark.parametrize("tilt_deg, flip_slices", [(8.0, False), (-20.0, True)])
def test_simulated_dicom_matches_dcm2niix(tmp_path, layout, tilt_deg, flip_slices):
    source = SyntheticRun(shape=(13, 11, 7), n_volumes=2, tilt_deg=tilt_deg, seed=5)
    if flip_slices:  # a source whose slice axis runs against the DICOM normal: written reversed
        source = _SliceFlipped(source)
    folder = tmp_path / "dicom"
    scanner = SimulatedScanner(folder, source, layout=layout, tr_s=1.5, speed=1000)
    scanner.run()
    ours = read_all(folder)
    affine, sidecar, theirs = oracle(folder, tmp_path, one_file_at_a_time=layout == "enhanced")
    assert [v.volume_number for v in ours] == [1, 2]
    assert len(theirs) == 2 and theirs[0].shape == (13, 11, 7)
    for k, volume in enumerate(ours):
        np.testing.assert_array_equal(volume.data, theirs[k])
        np.testing.assert_array_equal(volume.data, scanner.scanner_volume(k))
        np.testing.assert_allclose(volume.affine, affine, atol=AFFINE_ATOL_MM)
        assert volume.tr_s == pytest.approx(sidecar["RepetitionTime"])
    expected_times = np.asarray(ours[0].slice_times_s)
    assert sorted(expected_times) == pytest.approx(np.arange(7) * 1.5 / 7, abs=1e-6)
    if layout == "mosaic":  # dcm2niix reads the CSA MosaicRefAcqTimes
        np.testing.assert_allclose(sidecar["SliceTiming"], expected_times, atol=1e-4)
    if layout == "classic":  # dcm2niix estimates from AcquisitionTime, in steps of 1/64 s
        np.testing.assert_allclose(sidecar["SliceTiming"], expected_times, atol=1 / 64)


class _SliceFlipped:
    """A source with the same brain, its slice axis reversed (and the affine to match)."""

    def __init__(self, source):
        self.shape, self.n_volumes = source.shape, source.n_volumes
        self.affine = source.affine.copy()
        self.affine[:3, 3] += self.affine[:3, 2] * (self.shape[2] - 1)
        self.affine[:3, 2] *= -1
        self._source = source

    def volume(self, index):
        return self._source.volume(index)[:, :, ::-1]


@pytest.mark.parametrize("flip", [False, True])
def test_written_volume_is_the_source_in_world_space(tmp_path, flip):
    """Whichever way the source's slices run, each voxel we read sits where the source had it."""
    source = SyntheticRun(shape=(13, 11, 7), n_volumes=1)
    source = _SliceFlipped(source) if flip else source
    SimulatedScanner(tmp_path / "d", source, layout="mosaic", speed=1000).run()
    [volume] = read_all(tmp_path / "d")
    voxels = np.indices(volume.data.shape).reshape(3, -1)
    world = volume.affine @ np.vstack([voxels, np.ones(voxels.shape[1])])
    in_source = np.rint(np.linalg.inv(source.affine) @ world).astype(int)[:3]
    expected = source.volume(0)[tuple(in_source)]
    np.testing.assert_array_equal(volume.data[tuple(voxels)], expected)


@pytest.mark.parametrize("name", ["siemens_dwi_0.dcm.gz", "siemens_dwi_1000.dcm.gz"])
def test_real_siemens_mosaic_geometry_and_slice_timing(tmp_path, name):
    """nibabel's Siemens TrioTim mosaics: real headers (pixels zeroed)."""
    folder = tmp_path / "dicom"
    folder.mkdir()
    (folder / name.removesuffix(".gz")).write_bytes(gzip.decompress((NIBABEL_DICOM_DATA / name).read_bytes()))
    [volume] = read_all(folder)
    affine, sidecar, [theirs] = oracle(folder, tmp_path)
    assert volume.data.shape == theirs.shape == (128, 128, 48)
    np.testing.assert_array_equal(volume.data, theirs)
    np.testing.assert_allclose(volume.affine, affine, atol=AFFINE_ATOL_MM)
    np.testing.assert_allclose(volume.slice_times_s, sidecar["SliceTiming"], atol=1e-4)
    assert volume.tr_s == pytest.approx(sidecar["RepetitionTime"])
    assert volume.series_number == sidecar["SeriesNumber"]


def test_real_philips_enhanced_multiframe_geometry(tmp_path):
    """nibabel's Philips Achieva enhanced MR file (176 frames, pixels zeroed)."""
    folder = tmp_path / "dicom"
    folder.mkdir()
    (folder / "mprage.dcm").write_bytes(gzip.decompress((NIBABEL_DICOM_DATA / "philips_mprage.dcm.gz").read_bytes()))
    [volume] = read_all(folder)
    affine, _, [theirs] = oracle(folder, tmp_path)
    # dcm2niix turns this 3D sagittal volume towards RAS; compare both after the same reorientation
    ours = nib.as_closest_canonical(nib.Nifti1Image(volume.data, volume.affine))
    oracle_image = nib.as_closest_canonical(nib.Nifti1Image(theirs, affine))
    assert ours.shape == oracle_image.shape == (176, 256, 256)
    np.testing.assert_allclose(ours.affine, oracle_image.affine, atol=AFFINE_ATOL_MM)


def test_mosaic_with_undividable_grid_is_refused(tmp_path):
    """nibabel's 0.dcm: a real CSA header claiming 48 slices over a 256x256 synthetic ramp."""
    path = shutil.copyfile(NIBABEL_DICOM_DATA / "0.dcm", tmp_path / "0.dcm")
    with pytest.raises(VolumeFileError, match=r"256x256 mosaic cannot hold 48 slices in a 7x7 grid"):
        VolumeReader().read(path)


def test_header_only_dicom_reads_as_incomplete(tmp_path):
    """nibabel's csa_slice_norm.dcm: a real BOLD EPI header with no Pixel Data."""
    path = shutil.copyfile(NIBABEL_DICOM_DATA / "csa_slice_norm.dcm", tmp_path / "bold.dcm")
    with pytest.raises(IncompleteFileError, match="no Pixel Data element"):
        VolumeReader().read(path)
