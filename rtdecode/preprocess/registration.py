"""6-DOF rigid registration of a volume to a reference: inverse-compositional Gauss-Newton.

The cost is the sum of squared intensity differences between the reference and the moving volume sampled
(trilinear) at the transformed reference points, after a global intensity gain is taken out. Following
Baker & Matthews (2004), the derivatives are taken on the *reference*, so :class:`RegistrationTarget`
computes once per reference, for each pyramid level: the sample points (a seeded subset of the reference's
foreground), the reference values there, the steepest-descent images ``gradient . dW/dp`` and the inverse
6x6 Hessian. Each iteration then only samples the moving volume at the warped points, forms
``delta_p = H^-1 J^T e`` and composes ``T <- T o T(delta_p)^-1``.

Levels run coarse to fine (by default a 2x2x2 average-pooled level, then full resolution) and each stops
when an update moves the brain by less than ``tolerance_mm`` (framewise displacement of the update).
Transforms follow :mod:`rtdecode.preprocess.rigid`: the result maps reference world mm to moving world mm.
"""

import dataclasses

import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F

from rtdecode.errors import ConfigError, PreprocessError
from rtdecode.preprocess import resample, rigid

_MAX_TRANS_MM = 40.0  # a result beyond these bounds is a failed registration, not head motion
_MAX_ROT_RAD = np.deg2rad(30.0)


@dataclasses.dataclass(frozen=True)
class RegistrationSettings:
    """How a registration runs.

    Attributes
    ----------
    pool_factors : tuple of int
        Pyramid levels, coarse to fine: each level averages ``f x f x f`` voxel blocks (1 = full resolution).
    n_points : tuple of int
        At most this many sample points per level (a seeded random subset of the foreground).
    max_iterations : tuple of int
        Gauss-Newton iterations per level at most.
    tolerance_mm : float
        A level stops when an update's framewise displacement (50 mm sphere) is below this.
    foreground_fraction : float
        Foreground = voxels above this fraction of the reference's 99th percentile, dilated by one voxel.
    seed : int
        Seed of the sample-point subset.
    """

    pool_factors: tuple[int, ...] = (2, 1)
    n_points: tuple[int, ...] = (20_000, 40_000)
    max_iterations: tuple[int, ...] = (10, 6)
    tolerance_mm: float = 0.002
    foreground_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        lengths = {len(self.pool_factors), len(self.n_points), len(self.max_iterations)}
        numbers = (*self.pool_factors, *self.n_points, *self.max_iterations)
        if len(lengths) != 1 or not self.pool_factors or min(numbers) < 1:
            raise ConfigError(
                "registration settings: pool_factors, n_points and max_iterations need one positive integer per "
                f"level; got {self.pool_factors}, {self.n_points}, {self.max_iterations}"
            )
        if not (self.tolerance_mm > 0 and 0 < self.foreground_fraction < 1):
            raise ConfigError(
                "registration settings: tolerance_mm must be > 0 and foreground_fraction in (0, 1); "
                f"got {self.tolerance_mm}, {self.foreground_fraction}"
            )


@dataclasses.dataclass(frozen=True)
class Registration:
    """The result of one registration.

    Attributes
    ----------
    matrix : (4, 4) float64
        Reference world mm -> moving world mm.
    params : (6,) float64
        The same as motion parameters about the reference grid's centre (see :mod:`~rtdecode.preprocess.rigid`).
    n_iterations : int
        Gauss-Newton iterations over all levels.
    n_out_of_fov : int
        Sample points of the last level that fell outside the moving volume's field of view.
    """

    matrix: np.ndarray
    params: np.ndarray
    n_iterations: int
    n_out_of_fov: int


@dataclasses.dataclass(frozen=True)
class _Level:
    """What one pyramid level of a reference keeps for the iterations."""

    pool_factor: int
    points_h: torch.Tensor  # (n_points, 4) world mm, homogeneous
    ref_values: torch.Tensor  # (n_points,)
    ref_mean: float
    steepest_t: torch.Tensor  # (6, n_points): d(reference value)/d(params) at each point
    hessian_inv: np.ndarray  # (6, 6)
    max_iterations: int


def pooled(volume: torch.Tensor, affine: np.ndarray, pool_factor: int) -> tuple[torch.Tensor, np.ndarray]:
    """A ``(1, 1, n_z, n_y, n_x)`` volume averaged over ``f x f x f`` blocks, and the affine of the pooled grid."""
    if pool_factor == 1:
        return volume, affine
    voxel_map = np.diag([pool_factor, pool_factor, pool_factor, 1.0])
    voxel_map[:3, 3] = (pool_factor - 1) / 2.0  # pooled voxel p is the centre of original voxels f*p .. f*p+f-1
    return F.avg_pool3d(volume, pool_factor), affine @ voxel_map


def _grid_shape(volume: torch.Tensor) -> tuple[int, int, int]:
    return tuple(reversed(volume.shape[2:]))


class RegistrationTarget:
    """A reference volume prepared once for many registrations to it.

    Parameters
    ----------
    data : (n_x, n_y, n_z) array
        The reference intensities.
    affine : (4, 4) array
        Voxel index -> world mm.
    device : {"auto", "cpu", "cuda"}
    settings : RegistrationSettings, optional

    Raises
    ------
    PreprocessError
        The reference has no foreground, or is too small for the pyramid.
    """

    def __init__(self, data: np.ndarray, affine: np.ndarray, device: str = "auto", settings=None) -> None:
        self.settings = settings or RegistrationSettings()
        self.device = resample.resolve_device(device)
        self.shape = tuple(int(n) for n in data.shape)
        self.affine = np.asarray(affine, dtype=np.float64)
        self.centre_mm = rigid.grid_centre_mm(self.shape, self.affine)
        volume = resample.volume_tensor(data, self.device)
        rng = np.random.default_rng(self.settings.seed)
        self._levels = [
            self._prepare_level(volume, factor, n_points, n_iterations, rng)
            for factor, n_points, n_iterations in zip(
                self.settings.pool_factors, self.settings.n_points, self.settings.max_iterations, strict=True
            )
        ]

    def _prepare_level(self, volume: torch.Tensor, pool_factor: int, n_points: int, max_iterations: int, rng):
        level_volume, level_affine = pooled(volume, self.affine, pool_factor)
        ref = level_volume[0, 0].cpu().numpy().T.astype(np.float64)
        if min(ref.shape) < 4:
            raise PreprocessError(f"reference grid {self.shape} is too small for a {pool_factor}x pooled level")
        voxels = self._sample_voxels(ref, n_points, rng)
        points_mm = voxels @ level_affine[:3, :3].T + level_affine[:3, 3]
        gradient_mm = _world_gradient(ref, level_affine, voxels)
        steepest = np.concatenate([gradient_mm, np.cross(points_mm - self.centre_mm, gradient_mm)], axis=1)
        hessian = steepest.T @ steepest
        ref_values = ref[tuple(voxels.astype(np.intp).T)]
        return _Level(
            pool_factor=pool_factor,
            points_h=resample.points_tensor(points_mm, self.device),
            ref_values=torch.as_tensor(ref_values, dtype=torch.float32, device=self.device),
            ref_mean=float(ref_values.mean()),
            steepest_t=torch.as_tensor(steepest.T, dtype=torch.float32, device=self.device),
            hessian_inv=np.linalg.inv(hessian),
            max_iterations=max_iterations,
        )

    def _sample_voxels(self, ref: np.ndarray, n_points: int, rng) -> np.ndarray:
        """Voxel indices (sorted, for locality) of up to ``n_points`` foreground voxels away from the grid edge."""
        threshold = self.settings.foreground_fraction * np.percentile(ref, 99)
        foreground = scipy.ndimage.binary_dilation(ref > threshold, iterations=1)
        foreground[[0, -1], :, :] = foreground[:, [0, -1], :] = foreground[:, :, [0, -1]] = False
        candidates = np.flatnonzero(foreground)
        if threshold <= 0 or candidates.size < 100:
            raise PreprocessError(
                f"reference has no usable foreground: {candidates.size} voxels above "
                f"{self.settings.foreground_fraction:g} x its 99th percentile ({threshold:g})"
            )
        if candidates.size > n_points:
            candidates = np.sort(rng.choice(candidates, size=n_points, replace=False))
        return np.stack(np.unravel_index(candidates, ref.shape), axis=1).astype(np.float64)

    def register(self, data: np.ndarray, affine: np.ndarray, init: np.ndarray | None = None) -> Registration:
        """Register a moving volume to this reference.

        Parameters
        ----------
        data : (n_x, n_y, n_z) array
            The moving volume (any grid; usually the reference's).
        affine : (4, 4) array
            Its voxel index -> world mm.
        init : (4, 4) array, optional
            Starting transform (reference world -> moving world), e.g. the previous volume's; identity if omitted.

        Raises
        ------
        PreprocessError
            The moving volume is blank where the reference has tissue, or the estimate left the plausible
            range (|translation| > 40 mm or |rotation| > 30 degrees).
        """
        matrix = np.eye(4) if init is None else np.asarray(init, dtype=np.float64)
        volume = resample.volume_tensor(data, self.device)
        affine = np.asarray(affine, dtype=np.float64)
        n_iterations, n_out = 0, 0
        for level in self._levels:
            level_volume, level_affine = pooled(volume, affine, level.pool_factor)
            to_grid = resample.world_to_grid(_grid_shape(level_volume), level_affine)
            matrix, done, n_out = self._iterate(level, level_volume, to_grid, matrix)
            n_iterations += done
        params = rigid.matrix_to_params(matrix, self.centre_mm)
        _check_plausible(params)
        return Registration(matrix=matrix, params=params, n_iterations=n_iterations, n_out_of_fov=n_out)

    def _iterate(self, level: _Level, volume: torch.Tensor, to_grid: np.ndarray, matrix: np.ndarray):
        """Gauss-Newton iterations on one level -> (matrix, iterations done, points out of the FOV)."""
        n_done, converged = 0, False
        while n_done < level.max_iterations and not converged:
            grid = resample.map_points(level.points_h, to_grid @ matrix)
            values = resample.sample_grid(volume, grid)
            inside = resample.inside_fov(grid)
            gain = level.ref_mean / _positive_mean(values)
            error = (values * gain - level.ref_values) * inside
            delta = level.hessian_inv @ (level.steepest_t @ error).cpu().numpy().astype(np.float64)
            matrix = matrix @ np.linalg.inv(rigid.params_to_matrix(delta, self.centre_mm))
            n_done += 1
            converged = rigid.fd_mm(np.zeros(6), delta) < self.settings.tolerance_mm
        return matrix, n_done, int((~inside).sum())


def _world_gradient(ref: np.ndarray, affine: np.ndarray, voxels: np.ndarray) -> np.ndarray:
    """Central-difference intensity gradient in world mm at integer voxels -> ``(n_points, 3)``."""
    i, j, k = voxels.astype(np.intp).T
    gradient_vox = np.stack(
        [
            (ref[i + 1, j, k] - ref[i - 1, j, k]) / 2.0,
            (ref[i, j + 1, k] - ref[i, j - 1, k]) / 2.0,
            (ref[i, j, k + 1] - ref[i, j, k - 1]) / 2.0,
        ],
        axis=1,
    )
    return gradient_vox @ np.linalg.inv(affine[:3, :3])  # grad_world = A^-T grad_vox, one row per point


def _positive_mean(values: torch.Tensor) -> float:
    mean = float(values.mean())
    if not mean > 0:
        raise PreprocessError(f"moving volume is blank where the reference has tissue (mean there {mean:g})")
    return mean


def _check_plausible(params: np.ndarray) -> None:
    trans_mm, rot_rad = np.abs(params[:3]).max(), np.abs(params[3:]).max()
    if trans_mm > _MAX_TRANS_MM or rot_rad > _MAX_ROT_RAD:
        raise PreprocessError(
            f"registration diverged: |translation| {trans_mm:.1f} mm (limit {_MAX_TRANS_MM:g}), "
            f"|rotation| {np.rad2deg(rot_rad):.1f} deg (limit {np.rad2deg(_MAX_ROT_RAD):g})"
        )
