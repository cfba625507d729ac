"""The motion parameter convention: matrices, their inverse, and framewise displacement."""

import numpy as np
import pytest

from rtdecode.preprocess import rigid


def test_params_matrix_round_trip(rng):
    centre = rng.uniform(-20, 20, 3)
    for _ in range(20):
        params = np.concatenate([rng.uniform(-10, 10, 3), rng.uniform(-0.5, 0.5, 3)])
        matrix = rigid.params_to_matrix(params, centre)
        np.testing.assert_allclose(rigid.matrix_to_params(matrix, centre), params, atol=1e-12)
        np.testing.assert_allclose(matrix[:3, :3] @ matrix[:3, :3].T, np.eye(3), atol=1e-12)


def test_convention_maps_reference_points_to_moving_points():
    centre = np.array([1.0, 2.0, 3.0])
    quarter_turn_about_z = [0.5, 0.0, 0.0, 0.0, 0.0, np.pi / 2]
    matrix = rigid.params_to_matrix(quarter_turn_about_z, centre)
    point = centre + [10.0, 0.0, 0.0, 1.0][:3]
    moved = matrix @ np.append(point, 1.0)
    np.testing.assert_allclose(moved[:3], centre + [0.5, 10.0, 0.0], atol=1e-12)  # x axis -> y axis, then +t
    np.testing.assert_allclose(matrix @ np.append(centre, 1.0), [*(centre + [0.5, 0, 0]), 1.0], atol=1e-12)


def test_rotation_order_is_z_after_y_after_x():
    angles = np.array([0.1, -0.2, 0.3])
    about = [rigid.rotation_matrix(np.eye(3)[axis] * angles[axis]) for axis in range(3)]
    np.testing.assert_allclose(rigid.rotation_matrix(angles), about[2] @ about[1] @ about[0], atol=1e-15)


def test_framewise_displacement_of_known_steps():
    start = np.zeros(6)
    assert rigid.fd_mm(start, [0.1, -0.2, 0.3, 0, 0, 0]) == pytest.approx(0.6)
    assert rigid.fd_mm(start, [0, 0, 0, 0.01, 0, -0.002]) == pytest.approx(50 * 0.012)
    assert rigid.fd_mm([1, 1, 1, 0.01, 0.01, 0.01], [1, 1, 1.5, 0.01, 0.01, 0.0]) == pytest.approx(0.5 + 0.5)
    assert rigid.fd_mm(start, [0, 0, 0, 0.02, 0, 0], radius_mm=80.0) == pytest.approx(1.6)


def test_grid_centre_is_the_world_position_of_the_centre_voxel():
    affine = np.array([[2.0, 0, 0, -10], [0, 0, 3.0, 5], [0, -2.5, 0, 7], [0, 0, 0, 1]])
    np.testing.assert_allclose(rigid.grid_centre_mm((11, 21, 5), affine), affine[:3, :3] @ [5, 10, 2] + affine[:3, 3])
