"""The mask: voxel order is data[mask] (NSD/MindEye2), clear errors for masks that cannot be used."""

import nibabel as nib
import numpy as np
import pytest

from rtdecode.errors import MaskError
from rtdecode.preprocess.mask import Mask

SHAPE = (7, 8, 9)
AFFINE = np.array([[1.8, 0, 0, -6], [0, 1.7, -0.3, -7], [0, 0.3, 1.7, -8], [0, 0, 0, 1]])


@pytest.fixture
def mask_data(rng):
    return rng.random(SHAPE) < 0.3


def test_voxel_order_is_data_mask_order(rng, mask_data):
    volume = np.asfortranarray(rng.normal(size=SHAPE))
    mask = Mask(np.asfortranarray(mask_data), AFFINE)
    assert mask.n_voxels == int(mask_data.sum())
    np.testing.assert_array_equal(mask.apply(volume), volume[mask_data])
    np.testing.assert_array_equal(volume[tuple(mask.voxel_indices.T)], volume[mask_data])
    np.testing.assert_allclose(mask.world_mm, (AFFINE @ np.c_[np.argwhere(mask_data), np.ones(mask.n_voxels)].T)[:3].T)
    np.testing.assert_array_equal(mask.unapply(mask.apply(volume)), np.where(mask_data, volume, 0.0))


def test_from_nifti_reads_a_binary_mask(tmp_path, mask_data):
    path = tmp_path / "nsdgeneral.nii.gz"
    nib.save(nib.Nifti1Image(mask_data.astype(np.int16), AFFINE), path)
    mask = Mask.from_nifti(path)
    np.testing.assert_array_equal(mask.data, mask_data)
    np.testing.assert_allclose(mask.affine, AFFINE, atol=1e-6)
    mask.check_fits(SHAPE, AFFINE)


def test_mask_on_another_grid_names_file_and_both_grids(tmp_path, mask_data):
    path = tmp_path / "nsdgeneral.nii"
    nib.save(nib.Nifti1Image(mask_data.astype(np.uint8), AFFINE), path)
    mask = Mask.from_nifti(path)
    with pytest.raises(
        MaskError, match=rf"mask {path} does not fit run.nii: grid shape \(7, 8, 9\), expected \(7, 8, 10\)"
    ):
        mask.check_fits((7, 8, 10), AFFINE, reference="run.nii")
    shifted = AFFINE.copy()
    shifted[0, 3] += 0.01
    with pytest.raises(MaskError, match=r"affines differ by 0\.01 mm \(tolerance 0\.001\); mask affine .*expected"):
        mask.check_fits(SHAPE, shifted)
    shifted[0, 3] -= 0.01 - 5e-4  # within tolerance
    mask.check_fits(SHAPE, shifted)


def test_empty_mask_is_refused():
    with pytest.raises(MaskError, match=r"mask <array>: empty \(no voxel set in a \(7, 8, 9\) grid\)"):
        Mask(np.zeros(SHAPE, dtype=bool), AFFINE)


def test_non_binary_values_are_refused(tmp_path, mask_data):
    path = tmp_path / "probabilistic.nii"
    nib.save(nib.Nifti1Image(mask_data * 0.7, AFFINE), path)
    with pytest.raises(
        MaskError, match=rf"mask {path}: values must be 0 or 1 \(a binary mask\), found 2 values: 0, 0.7"
    ):
        Mask.from_nifti(path)
    with pytest.raises(MaskError, match="need a 3D array"):
        Mask(np.ones((3, 3)), AFFINE)


def test_unreadable_file_is_named(tmp_path):
    path = tmp_path / "mask.nii"
    path.write_bytes(b"not a nifti")
    with pytest.raises(MaskError, match=rf"mask {path}: cannot read as NIfTI"):
        Mask.from_nifti(path)
