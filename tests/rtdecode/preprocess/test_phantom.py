"""The phantom's moved copies follow the rigid convention (checked on exact one-voxel moves)."""

import numpy as np
import pytest

from rtdecode.sim.phantom import BrainPhantom

SHAPE = (21, 26, 23)


@pytest.fixture(scope="module")
def small_phantom():
    affine = np.eye(4)
    affine[:3, :3] = [[2.0, 0, 0], [0, 1.9, -0.6], [0, 0.6, 1.9]]
    return BrainPhantom(SHAPE, affine, seed=1)


def test_is_deterministic_and_brain_like(small_phantom):
    again = BrainPhantom(SHAPE, small_phantom.affine, seed=1)
    np.testing.assert_array_equal(small_phantom.data, again.data)
    data = small_phantom.data
    assert data.flags.f_contiguous and data.dtype == np.float32
    assert data[10, 13, 11] > 300 > data[0, 0, 0]  # tissue in the middle, background at the corner


def test_zero_motion_reproduces_the_phantom(small_phantom):
    np.testing.assert_allclose(small_phantom.moved(np.zeros(6)), small_phantom.data, atol=1e-3)


def test_translation_by_one_voxel_step_shifts_the_array(small_phantom):
    step_mm = small_phantom.affine[:3, 1]  # one voxel along array axis 1, in world mm
    moved = small_phantom.moved([*step_mm, 0, 0, 0])
    np.testing.assert_allclose(moved[:, 1:, :], small_phantom.data[:, :-1, :], atol=1e-3)


def test_half_turn_about_the_centre_flips_the_array():
    phantom = BrainPhantom(SHAPE, np.diag([2.0, 2.0, 2.0, 1.0]), seed=2)
    moved = phantom.moved([0, 0, 0, 0, 0, np.pi])  # about world z: x -> -x, y -> -y
    np.testing.assert_allclose(moved, phantom.data[::-1, ::-1, :], atol=1e-3)


def test_noise_has_the_asked_size(small_phantom):
    noisy = small_phantom.moved(np.zeros(6), noise_sd=5.0, rng=np.random.default_rng(0))
    assert np.std(noisy - small_phantom.data) == pytest.approx(5.0, rel=0.05)
