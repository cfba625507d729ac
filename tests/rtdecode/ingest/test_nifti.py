import gzip

import nibabel as nib
import numpy as np
import pytest

from rtdecode.errors import IncompleteFileError, VolumeFileError
from rtdecode.ingest.nifti import NiftiFile
from rtdecode.ingest.reader import VolumeReader
from rtdecode.sim.nifti_writer import GrowingNifti, encode_nifti_volume

SHAPE = (7, 8, 9)


@pytest.fixture
def affine():
    a = np.diag([2.0, 2.0, 2.5, 1.0])
    a[:3, 3] = [-7, -8, -10]
    return a


def stored(rng):
    return rng.integers(0, 4000, size=SHAPE).astype(np.uint16)


@pytest.mark.parametrize("compress", [False, True])
def test_3d_file_equals_nibabel(tmp_path, rng, affine, compress):
    data = stored(rng)
    path = tmp_path / f"vol_004_000012.nii{'.gz' if compress else ''}"
    path.write_bytes(encode_nifti_volume(data, affine, 1.5, 4, 12, 36000.25, (2.0, 10.0), compress))
    [volume], finished = VolumeReader().read(path)
    assert finished
    np.testing.assert_array_equal(volume.data, nib.load(path).get_fdata(dtype=np.float32))
    np.testing.assert_array_equal(volume.data, data * 2.0 + 10.0)
    np.testing.assert_allclose(volume.affine, affine)
    assert (volume.series_number, volume.volume_number, volume.tr_s) == (4, 12, 1.5)
    assert volume.acquisition_time_s == pytest.approx(36000.25)
    assert volume.data.dtype == np.float32 and volume.data.flags.f_contiguous


def test_identity_falls_back_to_the_file_name(tmp_path, rng, affine):
    image = nib.Nifti1Image(stored(rng), affine)
    image.header["pixdim"][4] = 2.0
    image.header.set_xyzt_units("mm", "msec")
    path = tmp_path / "run7_vol0031.nii"
    nib.save(image, path)
    [volume], _ = VolumeReader().read(path)
    assert (volume.series_number, volume.volume_number) == (7, 31)
    assert volume.tr_s == pytest.approx(0.002)  # pixdim in milliseconds
    nameless = tmp_path / "volume.nii"
    nib.save(image, nameless)
    with pytest.raises(VolumeFileError, match="no volume number"):
        VolumeReader().read(nameless)


@pytest.mark.parametrize("compress", [False, True])
def test_growing_4d_file_yields_only_complete_volumes(tmp_path, rng, affine, compress):
    volumes = [stored(rng) for _ in range(3)]
    writer = GrowingNifti(compress)
    chunks = [writer.start(affine, SHAPE, 3, 1.5, 9, 100.0, (1.0, 0.0))]
    chunks += [writer.append(v, last=i == 2) for i, v in enumerate(volumes)]
    stream = b"".join(chunks)
    path = tmp_path / f"run_009.nii{'.gz' if compress else ''}"
    nifti = NiftiFile(path)
    delivered = []
    for cut in np.linspace(1, len(stream), 23).astype(int):  # the file grows in 23 uneven steps
        path.write_bytes(stream[:cut])
        delivered += nifti.update()
        assert len(delivered) <= 3
    assert nifti.complete and len(delivered) == 3
    for k, volume in enumerate(delivered):
        np.testing.assert_array_equal(volume.data, volumes[k])
        assert (volume.series_number, volume.volume_number) == (9, k + 1)
        assert volume.acquisition_time_s == pytest.approx(100.0 + 1.5 * k)
    np.testing.assert_array_equal(nib.load(path).get_fdata()[..., 2], volumes[2])


def test_truncated_file_is_incomplete_with_a_reason(tmp_path, rng, affine):
    raw = encode_nifti_volume(stored(rng), affine, 1.5, 1, 1, 0.0, (1.0, 0.0), compress=False)
    path = tmp_path / "vol_001_000001.nii"
    path.write_bytes(raw[:700])
    with pytest.raises(IncompleteFileError, match=r"volume 1 of 1: 700 of 1360 bytes"):
        VolumeReader().read(path)
    path.write_bytes(gzip.compress(raw)[:300])
    gz = path.with_name(path.name + ".gz")
    path.rename(gz)
    with pytest.raises(IncompleteFileError, match="vol_001_000001.nii.gz"):
        VolumeReader().read(gz)


def test_not_nifti_and_wrong_dimensions(tmp_path, rng, affine):
    junk = tmp_path / "vol_001_000001.nii"
    junk.write_bytes(b"\x07" * 400)
    with pytest.raises(VolumeFileError, match="not a NIfTI file"):
        VolumeReader().read(junk)
    flat = tmp_path / "vol_001_000002.nii"
    nib.save(nib.Nifti1Image(np.zeros((7, 8), np.int16), affine), flat)
    with pytest.raises(VolumeFileError, match="not 3D or 4D"):
        VolumeReader().read(flat)


def test_nifti2_is_read(tmp_path, rng, affine):
    data = stored(rng)
    path = tmp_path / "vol_002_000003.nii"
    nib.save(nib.Nifti2Image(data, affine), path)
    [volume], _ = VolumeReader().read(path)
    np.testing.assert_array_equal(volume.data, data)


def test_multi_member_gzip_is_read_whole(tmp_path, rng, affine):
    """A .nii.gz made of several gzip members (as appending with gzip.open(..., "ab") writes) is valid."""
    data = stored(rng)
    raw = encode_nifti_volume(data, affine, 1.5, 1, 1, 0.0, (1.0, 0.0), compress=False)
    path = tmp_path / "vol_001_000001.nii.gz"
    path.write_bytes(gzip.compress(raw[:500]) + gzip.compress(raw[500:]))
    [volume], finished = VolumeReader().read(path)
    assert finished
    np.testing.assert_array_equal(volume.data, data)
    np.testing.assert_array_equal(volume.data, nib.load(path).get_fdata())


def test_non_numeric_identity_names_the_field(tmp_path, rng, affine):
    image = nib.Nifti1Image(stored(rng), affine)
    image.header["descrip"] = b"series=five;instance=3"
    path = tmp_path / "vol.nii"
    nib.save(image, path)
    with pytest.raises(VolumeFileError, match=r"vol.nii: descrip field series='five' is not a whole number"):
        VolumeReader().read(path)
