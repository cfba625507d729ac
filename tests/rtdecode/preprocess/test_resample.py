"""Trilinear sampling against scipy.ndimage.map_coordinates(order=1), an independent oracle."""

import numpy as np
import pytest
import scipy.ndimage

from rtdecode.errors import ConfigError
from rtdecode.preprocess import resample, rigid

SHAPE = (13, 17, 11)  # no repeated sizes, so swapped axes cannot go unnoticed


@pytest.fixture
def oblique_affine():
    affine = np.eye(4)
    affine[:3, :3] = rigid.rotation_matrix([0.2, -0.1, 0.3]) @ np.diag([2.0, 1.5, 2.5])
    affine[:3, 3] = [-12.0, 4.0, 7.0]
    return affine


def to_world(affine, voxels):
    return voxels @ affine[:3, :3].T + affine[:3, 3]


def test_sample_world_matches_map_coordinates(rng, oblique_affine):
    data = np.asfortranarray(rng.normal(100, 20, SHAPE).astype(np.float32))
    voxels = rng.uniform(0, np.array(SHAPE) - 1, size=(500, 3))
    values, n_out = resample.sample_world(data, oblique_affine, to_world(oblique_affine, voxels))
    oracle = scipy.ndimage.map_coordinates(data.astype(np.float64), voxels.T, order=1)
    np.testing.assert_allclose(values, oracle, atol=1e-4 * np.abs(oracle).max())
    assert n_out == 0


def test_c_ordered_input_gives_the_same_values(rng, oblique_affine):
    data = rng.normal(100, 20, SHAPE).astype(np.float32)
    points = to_world(oblique_affine, rng.uniform(0, np.array(SHAPE) - 1, size=(50, 3)))
    c_values, _ = resample.sample_world(np.ascontiguousarray(data), oblique_affine, points)
    f_values, _ = resample.sample_world(np.asfortranarray(data), oblique_affine, points)
    np.testing.assert_array_equal(c_values, f_values)


def test_outside_the_fov_takes_the_nearest_edge_value_and_is_counted(rng, oblique_affine):
    data = rng.normal(100, 20, SHAPE).astype(np.float32)
    voxels = np.array([[-3.0, 5.0, 5.0], [5.0, 20.0, 4.0], [0.0, 0.0, 0.0], [12.0, 16.0, 10.0]])
    values, n_out = resample.sample_world(data, oblique_affine, to_world(oblique_affine, voxels))
    assert n_out == 2  # the last two sit exactly on edge voxel centres: inside
    np.testing.assert_allclose(values, [data[0, 5, 5], data[5, 16, 4], data[0, 0, 0], data[12, 16, 10]], rtol=1e-5)


def test_resample_volume_matches_map_coordinates(rng, oblique_affine):
    data = np.asfortranarray(rng.normal(100, 20, SHAPE).astype(np.float32))
    target_shape = (9, 12, 8)
    target_affine = oblique_affine.copy()
    target_affine[:3, 3] += [1.3, -0.7, 2.1]
    transform = rigid.params_to_matrix([0.5, -0.4, 0.3, 0.02, -0.03, 0.05], [0, 0, 0])
    resampled, n_out = resample.resample_volume(data, oblique_affine, target_shape, target_affine, transform)
    source_vox = (
        np.linalg.inv(oblique_affine)
        @ transform
        @ target_affine
        @ np.vstack([np.indices(target_shape).reshape(3, -1), np.ones((1, np.prod(target_shape)))])
    )
    oracle = scipy.ndimage.map_coordinates(data.astype(np.float64), source_vox[:3], order=1, mode="nearest")
    outside = ((source_vox[:3].T < -1e-4) | (source_vox[:3].T > np.array(SHAPE) - 1 + 1e-4)).any(axis=1)
    assert resampled.shape == target_shape
    assert n_out == int(outside.sum())
    np.testing.assert_allclose(resampled.ravel()[~outside], oracle[~outside], atol=1e-4 * np.abs(oracle).max())


def test_unknown_device_is_refused():
    with pytest.raises(ConfigError, match="device must be one of auto, cpu, cuda; got 'tpu'"):
        resample.resolve_device("tpu")
