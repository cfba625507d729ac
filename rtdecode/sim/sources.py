"""Where the simulated scanner's volumes come from: a 4D NIfTI to replay, or a synthetic run.

Both give volumes one at a time (a whole NSD-sized run does not fit comfortably in memory) as float32
arrays in rtdecode's voxel order, with their affine.
"""

import dataclasses
import functools
from pathlib import Path

import nibabel as nib
import numpy as np


class NiftiRun:
    """Replays the volumes of a 4D NIfTI file (read lazily through nibabel's array proxy)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self._image = nib.load(self.path)
        except Exception as error:  # nibabel raises many types for unreadable files
            raise ValueError(f"--input {self.path}: cannot read as NIfTI ({error})") from error
        shape = self._image.shape
        if len(shape) != 4 or shape[3] < 1:
            raise ValueError(f"--input {self.path}: need a 4D NIfTI, got shape {shape}")
        self.shape = tuple(int(n) for n in shape[:3])
        self.n_volumes = int(shape[3])
        self.affine = self._image.affine
        zooms = self._image.header.get_zooms()
        self.tr_s = float(zooms[3]) if len(zooms) > 3 and zooms[3] > 0 else None

    def volume(self, index: int) -> np.ndarray:
        return np.asarray(self._image.dataobj[..., index], dtype=np.float32)


@dataclasses.dataclass(frozen=True)
class SyntheticRun:
    """An EPI-like phantom: an ellipsoid head with inner structures, slow drift, a slow
    oscillation in one region, and noise. Values are whole numbers in the 12-bit range, as a scanner
    writes them, so DICOM and NIfTI copies hold exactly the same numbers.

    Parameters
    ----------
    shape : (n_x, n_y, n_z)
    n_volumes : int
    voxel_mm : float
        Isotropic voxel size.
    tilt_deg : float
        Rotation of the grid about the x axis (an oblique prescription).
    seed : int
    """

    shape: tuple[int, int, int] = (81, 104, 83)
    n_volumes: int = 40
    voxel_mm: float = 1.8
    tilt_deg: float = 8.0
    seed: int = 0

    @property
    def affine(self) -> np.ndarray:
        tilt = np.deg2rad(self.tilt_deg)
        rotation = np.array([[1, 0, 0], [0, np.cos(tilt), -np.sin(tilt)], [0, np.sin(tilt), np.cos(tilt)]])
        affine = np.eye(4)
        affine[:3, :3] = rotation * self.voxel_mm
        centre = (np.asarray(self.shape) - 1) / 2
        affine[:3, 3] = -affine[:3, :3] @ centre
        return affine

    @functools.cached_property
    def _template(self) -> tuple[np.ndarray, np.ndarray]:
        grid = np.meshgrid(*(np.linspace(-1, 1, n) for n in self.shape), indexing="ij")
        radius = np.sqrt(sum((g / r) ** 2 for g, r in zip(grid, (0.8, 0.85, 0.8), strict=True)))
        template = np.where(radius < 1, 700.0, 40.0)
        template += np.where(radius < 0.75, 150.0, 0.0)  # "grey matter" shell vs "white matter" core
        ventricles = np.sqrt((grid[0] / 0.15) ** 2 + (grid[1] / 0.25) ** 2 + (grid[2] / 0.2) ** 2) < 1
        template[ventricles] = 1100.0
        region = np.sqrt((grid[0] - 0.3) ** 2 + (grid[1] + 0.4) ** 2 + grid[2] ** 2) < 0.2
        return template.astype(np.float32), region

    def volume(self, index: int) -> np.ndarray:
        template, region = self._template
        rng = np.random.default_rng([self.seed, index])
        drift = 1.0 + 0.0005 * index
        signal = template * drift
        signal[region] *= 1.0 + 0.02 * np.sin(2 * np.pi * index / 20)
        noisy = signal + rng.normal(0.0, 8.0, size=self.shape)
        return np.clip(np.rint(noisy), 0, 4095).astype(np.float32)


def to_uint16(volume: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """Stored values for ``volume`` under a DICOM/NIfTI rescale (``value = stored x slope + intercept``)."""
    stored = np.rint((volume - intercept) / slope)
    return np.clip(stored, 0, 65535).astype(np.uint16)


def rescale_for(first_volume: np.ndarray) -> tuple[float, float]:
    """(slope, intercept) that store a run like its first volume in uint16.

    Whole numbers in 0..65535 are stored as they are (slope 1, intercept 0), as scanners do; anything
    else is mapped linearly with headroom, and the rescale written to the headers.
    """
    low, high = float(first_volume.min()), float(first_volume.max())
    if low >= 0 and high <= 65535 and np.array_equal(first_volume, np.rint(first_volume)):
        return 1.0, 0.0
    span = max(high - low, 1e-6) * 2.0
    return span / 65535.0, low - span / 4
