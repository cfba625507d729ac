"""The motion corrector: per-volume correction, cross-run and cross-session composition, bad input."""

import numpy as np
import pytest

from rtdecode.errors import ConfigError, MaskError, PreprocessError
from rtdecode.preprocess import resample, rigid
from rtdecode.preprocess.mask import Mask
from rtdecode.preprocess.motion import MotionCorrector
from rtdecode.sim.sources import SyntheticRun
from tests.rtdecode.preprocess.synthetic import make_volume, random_params

NOISE_SD = 8.0


@pytest.fixture(scope="module")
def mask(phantom):
    return Mask(phantom.region_mask(4000), phantom.affine)


def corrector_for(mask, **kwargs):
    return MotionCorrector(mask, device="cpu", **kwargs)


def assert_params_close(params, truth, atol_mm=0.05, atol_deg=0.05):
    np.testing.assert_allclose(params[:3], truth[:3], atol=atol_mm)
    np.testing.assert_allclose(np.rad2deg(params[3:]), np.rad2deg(truth[3:]), atol=atol_deg)


def relative_rms(values, truth):
    return float(np.sqrt(np.mean((values - truth) ** 2)) / np.mean(np.abs(truth)))


def test_a_run_is_corrected_back_onto_its_reference(phantom, mask):
    rng = np.random.default_rng(11)
    truths = [np.zeros(6)] + [random_params(rng) for _ in range(3)]
    corrector = corrector_for(mask, fd_threshold_mm=0.5)
    results = []
    for index, truth in enumerate(truths):
        volume = make_volume(phantom.moved(truth, noise_sd=NOISE_SD, rng=rng), phantom.affine, volume_index=index)
        results.append((volume, corrector.process(volume)))
    first = results[0][1]
    np.testing.assert_array_equal(first.motion_params, np.zeros(6))
    assert (first.fd_mm, first.flagged) == (0.0, False)
    for (volume, result), truth, prev in zip(results[1:], truths[1:], truths, strict=False):
        assert_params_close(result.motion_params, truth)
        assert result.fd_mm == pytest.approx(rigid.fd_mm(prev, truth), abs=0.05)
        assert result.flagged == (result.fd_mm > 0.5)
        assert result.vector.dtype == np.float32 and result.vector.shape == (mask.n_voxels,)
        assert set(result.timestamps) == {"available", "preprocessed"}
        assert (result.run_index, result.volume_index, result.tr_s) == (1, volume.volume_index, 1.6)
        assert relative_rms(result.vector, mask.apply(phantom.data)) < 0.02


def test_the_resampled_volume_matches_the_unmoved_truth_to_interpolation_error(phantom, mask):
    corrector = corrector_for(mask)
    corrector.process(make_volume(phantom.data, phantom.affine))
    truth = np.array([2.0, -1.0, 1.5, *np.deg2rad([-2.0, 1.0, 2.5])])
    volume = make_volume(phantom.moved(truth), phantom.affine, volume_index=1)
    result = corrector.process(volume)
    corrected, n_out = corrector.resample_to_calibration(volume, result.motion_params)
    ideal, _ = resample.resample_volume(  # the same trilinear resampling with the true motion
        volume.data, volume.affine, phantom.shape, phantom.affine, rigid.params_to_matrix(truth, phantom.centre_mm)
    )
    brain = phantom.data > 300
    error = np.sqrt(np.mean((corrected - phantom.data)[brain] ** 2))
    interpolation_error = np.sqrt(np.mean((ideal - phantom.data)[brain] ** 2))
    uncorrected_error = np.sqrt(np.mean((volume.data - phantom.data)[brain] ** 2))
    assert error < 1.1 * interpolation_error < 0.2 * uncorrected_error
    assert n_out > 0  # edge voxels of the grid moved out of the FOV; counted, border-filled
    np.testing.assert_allclose(corrected[mask.data], result.vector, atol=1e-2)


def test_runs_and_sessions_compose_onto_the_calibration_grid(phantom):
    """Calibration on another grid and head position with another gain; two runs at other positions."""
    calibration_affine = SyntheticRun(shape=(80, 100, 84), tilt_deg=0.0).affine
    calibration_affine[:3, 3] += [1.0, -2.0, 0.5]
    calibration_truth = np.array([1.5, -2.0, 1.0, *np.deg2rad([2.0, -1.5, 1.0])])
    calibration = phantom.moved(calibration_truth, shape=(80, 100, 84), affine=calibration_affine)
    region = Mask(calibration > 700, calibration_affine)
    corrector = corrector_for(region, calibration_reference=(1.25 * calibration, calibration_affine))
    run_truths = {1: np.array([-1.0, 1.0, 2.0, *np.deg2rad([-1.0, 2.0, 0.5])]), 2: np.array([2.0, 0.5, -1.5, 0, 0, 0])}
    rng = np.random.default_rng(5)
    for run_index, run_truth in run_truths.items():
        run_matrix = rigid.params_to_matrix(run_truth, phantom.centre_mm)
        for index in range(3):
            motion = random_params(rng, 1.5, 1.5) if index else np.zeros(6)
            world = rigid.params_to_matrix(motion, phantom.centre_mm) @ run_matrix  # phantom -> this volume
            params = rigid.matrix_to_params(world, phantom.centre_mm)
            volume = make_volume(phantom.moved(params, noise_sd=NOISE_SD, rng=rng), phantom.affine, run_index, index)
            result = corrector.process(volume)
            assert relative_rms(result.vector, region.apply(calibration)) < 0.02
            assert_params_close(result.motion_params, motion)
    calibration_matrix = rigid.params_to_matrix(calibration_truth, phantom.centre_mm)
    session_matrix = rigid.params_to_matrix(run_truths[1], phantom.centre_mm)
    run2_matrix = rigid.params_to_matrix(run_truths[2], phantom.centre_mm)
    assert_same_motion(corrector.calibration_to_session, session_matrix @ np.linalg.inv(calibration_matrix))
    assert_same_motion(corrector.session_to_run(2), run2_matrix @ np.linalg.inv(session_matrix))
    np.testing.assert_array_equal(corrector.session_to_run(1), np.eye(4))
    assert corrector.calibration_grid[0] == (80, 100, 84)


def assert_same_motion(matrix, truth, radius_mm=60.0, atol_mm=0.1):
    """Two rigid matrices move points of a head-sized box alike (within atol_mm)."""
    corners = np.array([[x, y, z, 1.0] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)]) * [*[radius_mm] * 3, 1]
    np.testing.assert_allclose((matrix @ corners.T)[:3], (truth @ corners.T)[:3], atol=atol_mm)


def test_bad_volumes_are_refused_and_the_run_goes_on(phantom, mask):
    good = [make_volume(phantom.moved([0.2 * i, 0, 0, 0, 0, 0]), phantom.affine, volume_index=i) for i in range(3)]
    nan = phantom.data.copy()
    nan[10:12, 20, 30] = np.nan
    nan[40, 40, 40] = np.inf
    wrong_shape = phantom.data[:, :, :-1]
    wrong_affine = phantom.affine.copy()
    wrong_affine[2, 3] += 0.5

    corrector = corrector_for(mask)
    with pytest.raises(PreprocessError, match=r"vol_0009\.nii: 2 NaN and 1 infinite voxels of 699192"):
        corrector.process(make_volume(nan, phantom.affine, volume_index=9))  # before any reference
    first = corrector.process(good[0])
    assert first.volume_index == 0 and first.fd_mm == 0.0  # the bad volume did not become the reference
    with pytest.raises(PreprocessError, match=r"vol_0007\.nii: grid shape \(81, 104, 82\) differs from its run's"):
        corrector.process(make_volume(wrong_shape, phantom.affine, volume_index=7))
    with pytest.raises(PreprocessError, match=r"vol_0008\.nii: affine differs from its run's reference .* by 0\.5 mm"):
        corrector.process(make_volume(phantom.data, wrong_affine, volume_index=8))
    with pytest.raises(PreprocessError, match=r"vol_0006\.nii: moving volume is blank"):
        corrector.process(make_volume(np.zeros(phantom.shape), phantom.affine, volume_index=6))
    after_errors = [corrector.process(volume) for volume in good[1:]]

    clean = corrector_for(mask)
    undisturbed = [clean.process(volume) for volume in good][1:]
    for got, expected in zip(after_errors, undisturbed, strict=True):
        np.testing.assert_array_equal(got.vector, expected.vector)
        np.testing.assert_array_equal(got.motion_params, expected.motion_params)
        assert got.fd_mm == expected.fd_mm == pytest.approx(0.2, abs=0.02)


def test_a_mask_that_does_not_fit_is_named(phantom):
    offset = phantom.affine.copy()
    offset[0, 3] += 1.8
    corrector = corrector_for(Mask(phantom.region_mask(500), offset, source="nsdgeneral.nii.gz"))
    volume = make_volume(phantom.data, phantom.affine)
    for _ in range(2):  # the state stays as it was: the same error again
        with pytest.raises(
            MaskError, match=r"mask nsdgeneral.nii.gz does not fit the first run's reference .*vol_0000"
        ):
            corrector.process(volume)
    other_grid = Mask(np.ones((4, 5, 6), dtype=bool), np.eye(4), source="small.nii")
    with pytest.raises(MaskError, match=r"mask small.nii does not fit the calibration reference: grid shape"):
        MotionCorrector(other_grid, calibration_reference=(phantom.data, phantom.affine), device="cpu")


def test_settings_are_checked(mask):
    with pytest.raises(ConfigError, match="fd_threshold_mm must be >= 0; got -1"):
        MotionCorrector(mask, fd_threshold_mm=-1)
    with pytest.raises(ConfigError, match="device must be one of"):
        MotionCorrector(mask, device="gpu")


@pytest.mark.gpu
def test_cuda_gives_the_cpu_result(phantom, mask):
    rng = np.random.default_rng(2)
    volumes = [
        make_volume(phantom.moved(random_params(rng) * i, noise_sd=NOISE_SD, rng=rng), phantom.affine, 1, i)
        for i in range(3)
    ]
    on_cpu, on_cuda = MotionCorrector(mask, device="cpu"), MotionCorrector(mask, device="cuda")
    for volume in volumes:
        cpu, cuda = on_cpu.process(volume), on_cuda.process(volume)
        assert_params_close(cuda.motion_params, cpu.motion_params, atol_mm=0.005, atol_deg=0.005)
        np.testing.assert_allclose(cuda.vector, cpu.vector, rtol=1e-3, atol=1.0)
