"""DICOM plane geometry <-> NIfTI-style affine, in dcm2niix's voxel order.

DICOM describes a stack of 2D frames: ``ImageOrientationPatient`` holds the row cosine (the
direction in which the column index grows) and the column cosine (the direction in which the row
index grows), ``ImagePositionPatient`` the centre of the first pixel, ``PixelSpacing`` the spacing
between rows then between columns, all in LPS patient millimetres.

rtdecode's volumes use the voxel order dcm2niix writes, so that a volume read live and the NIfTI
made of the same file by dcm2niix have equal arrays and affines:

* axis 0: the column index (along the row cosine);
* axis 1: the row index reversed (the bottom row of the frame first);
* axis 2: the stack, in the order of ``slice_step``.

and the affine maps to RAS+ (NIfTI) millimetres. The reader (``rtdecode.ingest``) goes from DICOM
to this form; the simulator (``rtdecode.sim``) goes back.
"""

import dataclasses

import numpy as np

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclasses.dataclass(frozen=True)
class StackGeometry:
    """A stack of equally spaced, parallel DICOM frames.

    Attributes
    ----------
    row_cosine, column_cosine : (3,) float
        ``ImageOrientationPatient[:3]`` and ``[3:]``.
    row_spacing_mm, column_spacing_mm : float
        ``PixelSpacing[0]`` (between rows) and ``PixelSpacing[1]`` (between columns).
    first_position : (3,) float
        ``ImagePositionPatient`` of the first frame of the stack (LPS mm).
    slice_step : (3,) float
        LPS vector from one frame's position to the next one's.
    n_rows, n_columns, n_slices : int
        Frame size and stack length.
    """

    row_cosine: tuple[float, float, float]
    column_cosine: tuple[float, float, float]
    row_spacing_mm: float
    column_spacing_mm: float
    first_position: tuple[float, float, float]
    slice_step: tuple[float, float, float]
    n_rows: int
    n_columns: int
    n_slices: int

    @property
    def shape(self) -> tuple[int, int, int]:
        """The volume shape in rtdecode's voxel order."""
        return (self.n_columns, self.n_rows, self.n_slices)

    def affine(self) -> np.ndarray:
        """(4, 4) voxel index (dcm2niix order) to RAS+ mm."""
        row = np.asarray(self.row_cosine, float)
        col = np.asarray(self.column_cosine, float)
        lps = np.eye(4)
        lps[:3, 0] = row * self.column_spacing_mm
        lps[:3, 1] = -col * self.row_spacing_mm  # rows are stored bottom first
        lps[:3, 2] = np.asarray(self.slice_step, float)
        lps[:3, 3] = np.asarray(self.first_position, float) + col * self.row_spacing_mm * (self.n_rows - 1)
        ras = np.eye(4)
        ras[:3] = _LPS_TO_RAS @ lps[:3]
        return ras


def geometry_from_affine(affine: np.ndarray, shape: tuple[int, int, int]) -> StackGeometry:
    """The DICOM stack that :meth:`StackGeometry.affine` maps back to ``affine``.

    Parameters
    ----------
    affine : (4, 4)
        Voxel to RAS+ mm; its first two columns must be orthogonal (no shear within a frame).
    shape : (n_x, n_y, n_z)
        The volume shape in rtdecode's voxel order.
    """
    affine = np.asarray(affine, float)
    lps = _LPS_TO_RAS @ affine[:3]
    x_axis, y_axis, z_axis, origin = lps[:, 0], lps[:, 1], lps[:, 2], lps[:, 3]
    column_spacing, row_spacing = float(np.linalg.norm(x_axis)), float(np.linalg.norm(y_axis))
    row = x_axis / column_spacing
    col = -y_axis / row_spacing
    if abs(float(row @ col)) > 1e-4:
        raise ValueError(f"affine has sheared in-plane axes (cosine {row @ col:.2g}); cannot be DICOM")
    n_columns, n_rows, n_slices = (int(n) for n in shape)
    first = origin - col * row_spacing * (n_rows - 1)
    return StackGeometry(
        row_cosine=tuple(row),
        column_cosine=tuple(col),
        row_spacing_mm=row_spacing,
        column_spacing_mm=column_spacing,
        first_position=tuple(first),
        slice_step=tuple(z_axis),
        n_rows=n_rows,
        n_columns=n_columns,
        n_slices=n_slices,
    )


def stacks_along_normal(affine: np.ndarray) -> bool:
    """Whether the slice axis of ``affine`` runs along the DICOM normal (row cosine x column cosine).

    Scanners stack slices that way, and dcm2niix sorts classic and enhanced stacks that way; a volume
    whose slice axis runs the other way must have axis 2 reversed before it is written as DICOM.
    """
    geometry = geometry_from_affine(affine, (2, 2, 2))
    normal = np.cross(geometry.row_cosine, geometry.column_cosine)
    return float(normal @ np.asarray(geometry.slice_step)) > 0


def frames_to_volume(frames: np.ndarray) -> np.ndarray:
    """(n_slices, n_rows, n_columns) stack of DICOM frames -> (n_columns, n_rows, n_slices) float32 volume.

    The result is Fortran-ordered (axis 0 fastest), the order of the frames' own pixels and of NIfTI
    on disk, so this is one sequential pass that also casts to float32.
    """
    return np.array(frames.transpose(2, 1, 0)[:, ::-1, :], dtype=np.float32, order="F")


def volume_to_frames(volume: np.ndarray) -> np.ndarray:
    """Inverse of :func:`frames_to_volume` (keeps the dtype)."""
    return np.ascontiguousarray(volume[:, ::-1, :].transpose(2, 1, 0))


def mosaic_to_volume(mosaic: np.ndarray, n_rows: int, n_columns: int, n_slices: int) -> np.ndarray:
    """A Siemens mosaic frame (tiles x tiles grid of slices, row by row) -> float32 volume.

    Same layout as :func:`frames_to_volume` of the slices, in one pass over the pixels.
    """
    tiles = mosaic.shape[0] // n_rows
    grid = mosaic.reshape(tiles, n_rows, tiles, n_columns)  # (tile row, row, tile column, column)
    volume = np.empty((n_columns, n_rows, tiles * tiles), dtype=np.float32, order="F")
    # slice k = tile_row * tiles + tile_column; in Fortran order that axis splits as (tile column, tile row)
    volume.reshape((n_columns, n_rows, tiles, tiles), order="F")[...] = grid[:, ::-1, :, :].transpose(3, 1, 2, 0)
    return volume[:, :, :n_slices]


def mosaic_position(geometry: StackGeometry, n_mosaic_rows: int, n_mosaic_columns: int) -> np.ndarray:
    """``ImagePositionPatient`` a Siemens mosaic carries for the stack's first slice.

    A mosaic frame is as large as the whole tile grid, and its position is that of the grid's top-left
    pixel with the first tile centred on the slice: the slice position moved back by half the extra size.
    """
    row = np.asarray(geometry.row_cosine)
    col = np.asarray(geometry.column_cosine)
    extra_columns = n_mosaic_columns - geometry.n_columns
    extra_rows = n_mosaic_rows - geometry.n_rows
    return (
        np.asarray(geometry.first_position)
        - row * geometry.column_spacing_mm * extra_columns / 2
        - col * geometry.row_spacing_mm * extra_rows / 2
    )


def slice_position_from_mosaic(
    mosaic_ipp: np.ndarray,
    row_cosine: np.ndarray,
    column_cosine: np.ndarray,
    row_spacing_mm: float,
    column_spacing_mm: float,
    extra_rows: int,
    extra_columns: int,
) -> np.ndarray:
    """Inverse of :func:`mosaic_position`: the first slice's position from the mosaic's."""
    return (
        np.asarray(mosaic_ipp, float)
        + np.asarray(row_cosine) * column_spacing_mm * extra_columns / 2
        + np.asarray(column_cosine) * row_spacing_mm * extra_rows / 2
    )
