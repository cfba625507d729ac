"""Rigid (6-DOF) transforms in world space: the motion parameter convention and framewise displacement.

Convention
----------
Six parameters in the order of :data:`rtdecode.records.MOTION_PARAMETER_NAMES`:
``(trans_x_mm, trans_y_mm, trans_z_mm, rot_x_rad, rot_y_rad, rot_z_rad)``. Translations are in mm along the
world RAS+ axes; rotations are in radians about the world RAS+ x, y and z axes, right-handed, through a
centre point ``c`` (the world position of the reference grid's centre voxel, :func:`grid_centre_mm`).

The transform maps a point of the *reference* (world mm) to where the same tissue is in the *moving* volume::

    x_mov = R @ (x_ref - c) + c + t,    R = Rz(rot_z) @ Ry(rot_y) @ Rx(rot_x)

so the moving volume sampled at ``x_mov`` reproduces the reference at ``x_ref``. As a 4x4 matrix acting on
homogeneous world coordinates it is ``[[R, c + t - R @ c], [0, 0, 0, 1]]``.
"""

import numpy as np

FD_RADIUS_MM = 50.0  # Power et al. 2012: rotations become arc lengths on a 50 mm sphere


def rotation_matrix(rot_rad) -> np.ndarray:
    """``Rz @ Ry @ Rx`` for rotations ``(rot_x, rot_y, rot_z)`` in radians about the world axes.

    Parameters
    ----------
    rot_rad : (3,) array-like

    Returns
    -------
    (3, 3) float64
    """
    rx, ry, rz = np.asarray(rot_rad, dtype=np.float64)
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    about_x = np.array([[1.0, 0.0, 0.0], [0.0, cx, -sx], [0.0, sx, cx]])
    about_y = np.array([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]])
    about_z = np.array([[cz, -sz, 0.0], [sz, cz, 0.0], [0.0, 0.0, 1.0]])
    return about_z @ about_y @ about_x


def rotation_angles(rotation: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rotation_matrix`: ``(rot_x, rot_y, rot_z)`` in radians, with ``|rot_y| <= pi/2``."""
    rot_y = np.arcsin(np.clip(-rotation[2, 0], -1.0, 1.0))
    rot_x = np.arctan2(rotation[2, 1], rotation[2, 2])
    rot_z = np.arctan2(rotation[1, 0], rotation[0, 0])
    return np.array([rot_x, rot_y, rot_z])


def params_to_matrix(params, centre_mm) -> np.ndarray:
    """The 4x4 world-to-world matrix of six rigid parameters (reference world -> moving world).

    Parameters
    ----------
    params : (6,) array-like
        In the order of ``MOTION_PARAMETER_NAMES`` (mm, radians).
    centre_mm : (3,) array-like
        Centre of rotation, world mm.

    Returns
    -------
    (4, 4) float64
    """
    params = np.asarray(params, dtype=np.float64)
    centre = np.asarray(centre_mm, dtype=np.float64)
    rotation = rotation_matrix(params[3:])
    matrix = np.eye(4)
    matrix[:3, :3] = rotation
    matrix[:3, 3] = centre + params[:3] - rotation @ centre
    return matrix


def matrix_to_params(matrix: np.ndarray, centre_mm) -> np.ndarray:
    """Inverse of :func:`params_to_matrix` for a rigid 4x4 matrix.

    Returns
    -------
    (6,) float64
        Translations (mm) then rotations (radians, ``|rot_y| <= pi/2``).
    """
    centre = np.asarray(centre_mm, dtype=np.float64)
    rotation = np.asarray(matrix, dtype=np.float64)[:3, :3]
    trans_mm = matrix[:3, 3] - centre + rotation @ centre
    return np.concatenate([trans_mm, rotation_angles(rotation)])


def grid_centre_mm(shape, affine: np.ndarray) -> np.ndarray:
    """World position (mm) of a grid's centre voxel, index ``(n - 1) / 2`` on each axis."""
    centre_vox = (np.asarray(shape[:3], dtype=np.float64) - 1.0) / 2.0
    return affine[:3, :3] @ centre_vox + affine[:3, 3]


def fd_mm(prev_params, params, radius_mm: float = FD_RADIUS_MM) -> float:
    """Framewise displacement (Power et al. 2012) between two sets of motion parameters.

    ``sum |delta translation| + radius_mm * sum |delta rotation|``.

    Parameters
    ----------
    prev_params, params : (6,) array-like
        Motion parameters of consecutive volumes (mm, radians).
    radius_mm : float
        Radius of the sphere on which rotations become displacements.
    """
    delta = np.abs(np.asarray(params, dtype=np.float64) - np.asarray(prev_params, dtype=np.float64))
    return float(delta[:3].sum() + radius_mm * delta[3:].sum())
