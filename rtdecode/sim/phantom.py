"""A smooth, textured, brain-like phantom and copies of it moved by known rigid motion.

Ground truth for motion correction: :meth:`BrainPhantom.moved` samples the phantom's cubic B-spline
(``scipy.ndimage.map_coordinates``, order 3) at the moved positions, independently of
``rtdecode.preprocess`` (which this package may not import) but with the same convention: six parameters
``(trans_x_mm, trans_y_mm, trans_z_mm, rot_x_rad, rot_y_rad, rot_z_rad)`` describe the map from the phantom's
world mm to the moved volume's world mm, ``x_moved = Rz @ Ry @ Rx @ (x - c) + c + t``, with ``c`` the world
position of the phantom grid's centre voxel. So ``moved(params)`` at ``x_moved`` shows what the phantom
shows at ``x``.
"""

import dataclasses
import functools

import numpy as np
import scipy.ndimage

_BACKGROUND = 20.0
_GREY = 820.0
_WHITE = 640.0
_CSF = 1150.0


@dataclasses.dataclass(frozen=True, eq=False)
class BrainPhantom:
    """An EPI-like head on a grid: an ellipsoid brain with a smooth edge, a darker core ("white matter"),
    two bright ventricles, a few blobs and a smoothed random texture. Deterministic from ``seed``.

    Parameters
    ----------
    shape : (n_x, n_y, n_z)
    affine : (4, 4) array
        Voxel index -> world mm.
    seed : int
    """

    shape: tuple[int, int, int]
    affine: np.ndarray
    seed: int = 0

    @functools.cached_property
    def data(self) -> np.ndarray:
        """The phantom, float32 in Fortran order (as :class:`~rtdecode.records.Volume` holds voxels)."""
        rng = np.random.default_rng(self.seed)
        unit, brain = self._unit_grid, self._brain
        core = _smooth_inside(unit, (0.0, 0.05, 0.0), (0.5, 0.55, 0.5), edge=0.05)
        image = _BACKGROUND + brain * (_GREY + (_WHITE - _GREY) * core)
        for side in (-1.0, 1.0):
            ventricle = _smooth_inside(unit, (0.13 * side, 0.05, 0.1), (0.07, 0.22, 0.12), edge=0.03)
            image += ventricle * (_CSF - _WHITE)
        image += brain * _blobs(unit, rng)
        texture = scipy.ndimage.gaussian_filter(rng.normal(size=self.shape), sigma=2.0)
        image += brain * 90.0 * texture / texture.std()
        return np.asfortranarray(scipy.ndimage.gaussian_filter(image, sigma=0.7), dtype=np.float32)

    @functools.cached_property
    def _unit_grid(self) -> list[np.ndarray]:
        """Voxel positions scaled to [-1, 1] along each array axis."""
        return np.meshgrid(*(np.linspace(-1.0, 1.0, n) for n in self.shape), indexing="ij")

    @functools.cached_property
    def _brain(self) -> np.ndarray:
        return _smooth_inside(self._unit_grid, (0.0, 0.0, 0.0), (0.78, 0.82, 0.78), edge=0.03)

    def region_mask(self, n_voxels: int, centre=(0.0, -0.45, 0.05), semi_axes=(0.6, 0.35, 0.45)) -> np.ndarray:
        """A boolean mask of exactly ``n_voxels`` brain voxels: those nearest ``centre`` in the ellipsoidal
        distance of ``semi_axes`` (unit grid coordinates). The default is a posterior, nsdgeneral-like region.
        """
        distance = sum(((u - c) / a) ** 2 for u, c, a in zip(self._unit_grid, centre, semi_axes, strict=True))
        distance = np.where(self._brain > 0.5, distance, np.inf)
        n_brain = int(np.isfinite(distance).sum())
        if not 0 < n_voxels <= n_brain:
            raise ValueError(f"n_voxels must be in 1..{n_brain} (the phantom's brain voxels); got {n_voxels}")
        chosen = np.argsort(distance, axis=None, kind="stable")[:n_voxels]
        mask = np.zeros(self.shape, dtype=bool)
        mask.flat[chosen] = True
        return mask

    @property
    def centre_mm(self) -> np.ndarray:
        """World position of the grid's centre voxel (the centre of rotation of :meth:`moved`)."""
        centre_vox = (np.asarray(self.shape, dtype=np.float64) - 1.0) / 2.0
        return self.affine[:3, :3] @ centre_vox + self.affine[:3, 3]

    @functools.cached_property
    def _spline(self) -> np.ndarray:
        return scipy.ndimage.spline_filter(self.data.astype(np.float64), order=3, mode="nearest")

    def moved(self, params, noise_sd: float = 0.0, rng=None, shape=None, affine=None) -> np.ndarray:
        """The phantom moved by six rigid parameters, optionally with Gaussian noise.

        Parameters
        ----------
        params : (6,) array-like
            mm and radians, in the convention of the module docstring.
        noise_sd : float
            Standard deviation of added white noise (intensity units).
        rng : numpy Generator, optional
            Source of the noise (a fresh seeded one if omitted).
        shape, affine : optional
            Grid to produce (default: the phantom's own).

        Returns
        -------
        shape float32, Fortran order
        """
        shape = self.shape if shape is None else tuple(shape)
        affine = self.affine if affine is None else np.asarray(affine, dtype=np.float64)
        params = np.asarray(params, dtype=np.float64)
        rotation = _rotation(params[3:])
        voxels = np.indices(shape, dtype=np.float64).reshape(3, -1)
        moved_mm = affine[:3, :3] @ voxels + affine[:3, 3:4]
        source_mm = rotation.T @ (moved_mm - self.centre_mm[:, None] - params[:3, None]) + self.centre_mm[:, None]
        to_voxel = np.linalg.inv(self.affine)
        source_vox = to_voxel[:3, :3] @ source_mm + to_voxel[:3, 3:4]
        values = scipy.ndimage.map_coordinates(self._spline, source_vox, order=3, mode="nearest", prefilter=False)
        image = values.reshape(shape)
        if noise_sd > 0:
            rng = np.random.default_rng(self.seed + 1) if rng is None else rng
            image = image + rng.normal(0.0, noise_sd, size=shape)
        return np.asfortranarray(image, dtype=np.float32)


def _smooth_inside(unit, centre, semi_axes, edge: float) -> np.ndarray:
    """~1 inside an ellipsoid (in unit grid coordinates), ~0 outside, with a logistic edge of width ``edge``."""
    radius = np.sqrt(sum(((u - c) / s) ** 2 for u, c, s in zip(unit, centre, semi_axes, strict=True)))
    return 0.5 * (1.0 - np.tanh((radius - 1.0) / edge))


def _blobs(unit, rng, n_blobs: int = 6) -> np.ndarray:
    """A few Gaussian blobs of +-150 intensity inside the brain."""
    image = np.zeros(unit[0].shape)
    for _ in range(n_blobs):
        centre = rng.uniform(-0.45, 0.45, size=3)
        width = rng.uniform(0.05, 0.12)
        squared = sum((u - c) ** 2 for u, c in zip(unit, centre, strict=True))
        image += rng.choice([-150.0, 150.0]) * np.exp(-squared / (2 * width**2))
    return image


def _rotation(rot_rad: np.ndarray) -> np.ndarray:
    """``Rz @ Ry @ Rx`` (right-handed, radians about the world x, y, z axes)."""
    rx, ry, rz = rot_rad
    about_x = np.array([[1, 0, 0], [0, np.cos(rx), -np.sin(rx)], [0, np.sin(rx), np.cos(rx)]])
    about_y = np.array([[np.cos(ry), 0, np.sin(ry)], [0, 1, 0], [-np.sin(ry), 0, np.cos(ry)]])
    about_z = np.array([[np.cos(rz), -np.sin(rz), 0], [np.sin(rz), np.cos(rz), 0], [0, 0, 1]])
    return about_z @ about_y @ about_x
