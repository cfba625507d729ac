"""The subject's voxel mask (e.g. nsdgeneral): which voxels of the calibration grid the decoder reads.

Voxel order is C order of the mask grid: the order of ``np.argwhere(mask)``, which is the order of
``data[mask]`` for a boolean ``(n_x, n_y, n_z)`` array. It is the order NSD and MindEye2 use for their
voxel vectors (``betas[nsdgeneral > 0]``), and the order of :attr:`PreprocessedVolume.vector`.
"""

from pathlib import Path

import nibabel as nib
import numpy as np

from rtdecode.errors import MaskError

AFFINE_TOLERANCE_MM = 1e-3  # grids whose affines differ by less than this (any element) are the same grid


class Mask:
    """A boolean voxel mask on a grid.

    Parameters
    ----------
    data : (n_x, n_y, n_z) array
        Binary values (bool, or numbers that are all 0 or 1).
    affine : (4, 4) array
        Voxel index -> world mm (RAS+).
    source : str or Path, optional
        Where it came from, for messages (default ``"<array>"``).

    Raises
    ------
    MaskError
        Not 3D, values other than 0 and 1, no voxel set, or an affine that is not a finite invertible 4x4.
    """

    def __init__(self, data: np.ndarray, affine: np.ndarray, source: str | Path = "<array>") -> None:
        self.source = str(source)
        self.data = _binary(np.asarray(data), self.source)
        self.affine = _checked_affine(np.asarray(affine, dtype=np.float64), self.source)
        if not self.data.any():
            raise MaskError(f"mask {self.source}: empty (no voxel set in a {self.data.shape} grid)")
        self.voxel_indices = np.argwhere(self.data)  # (n_voxels, 3), C order of the grid

    @classmethod
    def from_nifti(cls, path: str | Path) -> "Mask":
        """Read a 3D NIfTI mask (nonzero = in the mask only if every value is 0 or 1)."""
        path = Path(path)
        try:
            image = nib.load(path)
            data = np.asanyarray(image.dataobj)
        except Exception as error:  # nibabel raises many types for unreadable files
            raise MaskError(f"mask {path}: cannot read as NIfTI ({error})") from error
        return cls(np.squeeze(data) if data.ndim == 4 and data.shape[3] == 1 else data, image.affine, source=path)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape)

    @property
    def n_voxels(self) -> int:
        return int(self.voxel_indices.shape[0])

    @property
    def world_mm(self) -> np.ndarray:
        """``(n_voxels, 3)`` world coordinates (mm) of the mask's voxels, in mask order."""
        return self.voxel_indices @ self.affine[:3, :3].T + self.affine[:3, 3]

    def check_fits(self, reference_shape, reference_affine: np.ndarray, reference: str = "the reference") -> None:
        """Raise :class:`MaskError` unless the mask lies on this grid (same shape, affines within 1e-3 mm).

        Parameters
        ----------
        reference_shape : (3,) ints
        reference_affine : (4, 4) array
        reference : str
            What the grid is, for the message (e.g. a file name).
        """
        shape = tuple(int(n) for n in reference_shape[:3])
        if shape != self.shape or len(reference_shape) != 3:
            raise MaskError(
                f"mask {self.source} does not fit {reference}: "
                f"grid shape {self.shape}, expected {tuple(reference_shape)}"
            )
        difference = np.abs(np.asarray(reference_affine, dtype=np.float64) - self.affine).max()
        if not difference <= AFFINE_TOLERANCE_MM:
            raise MaskError(
                f"mask {self.source} does not fit {reference}: affines differ by {difference:.4g} mm "
                f"(tolerance {AFFINE_TOLERANCE_MM:g}); mask affine {_rows(self.affine)}, "
                f"expected {_rows(reference_affine)}"
            )

    def apply(self, data: np.ndarray) -> np.ndarray:
        """``data[mask]``: a volume on the mask grid as a ``(n_voxels,)`` vector in mask order."""
        return np.asarray(data)[self.data]

    def unapply(self, vector: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """The inverse of :meth:`apply`: a vector in mask order back on the grid, ``fill`` elsewhere."""
        volume = np.full(self.shape, fill, dtype=np.asarray(vector).dtype)
        volume[self.data] = vector
        return volume


def _binary(data: np.ndarray, source: str) -> np.ndarray:
    if data.ndim != 3:
        raise MaskError(f"mask {source}: need a 3D array, got shape {data.shape}")
    if data.dtype == bool:
        return data
    values = np.unique(data)
    if not np.isin(values, (0, 1)).all():
        shown = ", ".join(f"{v:g}" for v in values[:6]) + (", ..." if values.size > 6 else "")
        raise MaskError(f"mask {source}: values must be 0 or 1 (a binary mask), found {values.size} values: {shown}")
    return data == 1


def _checked_affine(affine: np.ndarray, source: str) -> np.ndarray:
    if affine.shape != (4, 4) or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise MaskError(f"mask {source}: affine must be a finite, invertible 4x4 matrix, got {affine.tolist()}")
    return affine


def _rows(affine: np.ndarray) -> str:
    return np.array2string(np.asarray(affine)[:3], precision=4, suppress_small=True, separator=",").replace("\n", "")
