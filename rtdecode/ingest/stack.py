"""Turn a set of positioned DICOM frames into one volume (enhanced multi-frame and classic slices).

Frames are sorted along the DICOM slice normal (row cosine x column cosine), as dcm2niix sorts
them, and must be equally spaced. Slice times are each frame's acquisition time minus the earliest.
"""

import dataclasses
from pathlib import Path

import numpy as np

from rtdecode.dicom_geometry import StackGeometry, frames_to_volume
from rtdecode.errors import VolumeFileError

_SPACING_TOLERANCE = 0.01  # relative


@dataclasses.dataclass(frozen=True)
class PositionedFrame:
    """One 2D frame with where and when it was acquired (times in seconds of day)."""

    pixels: np.ndarray  # (n_rows, n_columns) float32, rescaled
    position: np.ndarray  # (3,) LPS mm, ImagePositionPatient
    acquisition_time_s: float | None


def stack_frames(
    frames: list[PositionedFrame],
    row_cosine: np.ndarray,
    column_cosine: np.ndarray,
    pixel_spacing_mm: tuple[float, float],
    single_slice_spacing_mm: float,
    path: Path,
) -> tuple[np.ndarray, np.ndarray, tuple[float, ...] | None, float | None]:
    """Sort and stack frames.

    Returns
    -------
    data : (n_columns, n_rows, n_slices) float32
    affine : (4, 4)
    slice_times_s : per slice, or None when frames carry no times
    acquisition_time_s : the earliest frame's time, or None
    """
    normal = np.cross(row_cosine, column_cosine)
    order = np.argsort([float(f.position @ normal) for f in frames], kind="stable")
    ordered = [frames[i] for i in order]
    step = _slice_step(ordered, normal, single_slice_spacing_mm, path)
    n_rows, n_columns = ordered[0].pixels.shape
    geometry = StackGeometry(
        row_cosine=tuple(row_cosine),
        column_cosine=tuple(column_cosine),
        row_spacing_mm=pixel_spacing_mm[0],
        column_spacing_mm=pixel_spacing_mm[1],
        first_position=tuple(ordered[0].position),
        slice_step=tuple(step),
        n_rows=n_rows,
        n_columns=n_columns,
        n_slices=len(ordered),
    )
    data = frames_to_volume(np.stack([f.pixels for f in ordered]))
    times = [f.acquisition_time_s for f in ordered]
    if any(t is None for t in times):
        return data, geometry.affine(), None, None
    start = min(times)
    return data, geometry.affine(), tuple(t - start for t in times), start


def _slice_step(frames: list[PositionedFrame], normal: np.ndarray, spacing_mm: float, path: Path) -> np.ndarray:
    if len(frames) == 1:
        if spacing_mm <= 0:
            raise VolumeFileError(f"{path}: single-slice volume without a positive slice spacing")
        return normal * spacing_mm
    positions = np.stack([f.position for f in frames])
    steps = np.diff(positions, axis=0)
    lengths = np.linalg.norm(steps, axis=1)
    if lengths.min() <= 0:
        raise VolumeFileError(f"{path}: two frames share one position; not a single volume")
    if lengths.max() - lengths.min() > _SPACING_TOLERANCE * lengths.mean():
        raise VolumeFileError(f"{path}: slices are not equally spaced ({lengths.min():.3f} to {lengths.max():.3f} mm)")
    return (positions[-1] - positions[0]) / (len(frames) - 1)
