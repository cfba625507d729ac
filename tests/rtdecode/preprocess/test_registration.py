"""6-DOF registration on the NSD grid: motion up to 3 mm / 3 degrees is recovered to a few hundredths."""

import numpy as np
import pytest

from rtdecode.errors import PreprocessError
from rtdecode.preprocess.registration import RegistrationTarget
from tests.rtdecode.preprocess.synthetic import random_params

NOISE_SD = 8.0  # 1% of grey-matter intensity, as SyntheticRun


@pytest.fixture(scope="module")
def target(phantom):
    return RegistrationTarget(phantom.data, phantom.affine, device="cpu")


def test_recovers_random_motion_within_five_hundredths(phantom, target):
    rng = np.random.default_rng(7)
    errors = []
    for _ in range(8):
        truth = random_params(rng)
        result = target.register(phantom.moved(truth, noise_sd=NOISE_SD, rng=rng), phantom.affine)
        errors.append(result.params - truth)
        assert result.n_out_of_fov == 0
    errors = np.array(errors)
    rms_mm = np.sqrt(np.mean(errors[:, :3] ** 2))
    rms_deg = np.rad2deg(np.sqrt(np.mean(errors[:, 3:] ** 2)))
    assert rms_mm < 0.05 and rms_deg < 0.05, (rms_mm, rms_deg)


def test_the_largest_motion_along_every_axis_at_once(phantom, target):
    truth = np.array([3.0, -3.0, 3.0, *np.deg2rad([-3.0, 3.0, -3.0])])
    result = target.register(phantom.moved(truth, noise_sd=NOISE_SD), phantom.affine)
    np.testing.assert_allclose(result.params[:3], truth[:3], atol=0.05)
    np.testing.assert_allclose(np.rad2deg(result.params[3:]), np.rad2deg(truth[3:]), atol=0.05)


def test_a_warm_start_reaches_the_same_answer_in_fewer_iterations(phantom, target):
    truth = np.array([1.0, 0.5, -0.8, *np.deg2rad([1.0, -0.5, 0.7])])
    moving = phantom.moved(truth, noise_sd=NOISE_SD)
    cold = target.register(moving, phantom.affine)
    warm = target.register(moving, phantom.affine, init=cold.matrix)
    np.testing.assert_allclose(warm.params, cold.params, atol=2e-3)
    assert warm.n_iterations < cold.n_iterations


def test_a_global_intensity_gain_does_not_bias_the_estimate(phantom, target):
    truth = np.array([-1.5, 2.0, 0.5, *np.deg2rad([2.0, 1.0, -1.5])])
    result = target.register(1.3 * phantom.moved(truth, noise_sd=NOISE_SD), phantom.affine)
    np.testing.assert_allclose(result.params[:3], truth[:3], atol=0.05)
    np.testing.assert_allclose(np.rad2deg(result.params[3:]), np.rad2deg(truth[3:]), atol=0.05)


def test_blank_moving_volume_and_blank_reference_are_refused(phantom, target):
    with pytest.raises(PreprocessError, match="moving volume is blank where the reference has tissue"):
        target.register(np.zeros(phantom.shape, dtype=np.float32), phantom.affine)
    with pytest.raises(PreprocessError, match="reference has no usable foreground"):
        RegistrationTarget(np.zeros(phantom.shape, dtype=np.float32), phantom.affine, device="cpu")
