"""Siemens mosaic DICOM: one file per volume, slices tiled in a square grid.

The number of slices, the slice normal and the slice acquisition times come from the CSA image
header (private tag (0029,1010), read with nibabel's CSA reader), falling back to the Siemens MR
header tags (0019,100A) and (0019,1029). The mosaic's ImagePositionPatient is that of the grid's
top-left pixel; the first slice's position is moved from it by half the extra grid size.

The geometry is the same for every volume of a series, so it is computed once per distinct
(series, orientation, position, size) and cached; per volume only the pixels are unpacked.
"""

import dataclasses
import math
import warnings
from pathlib import Path

import numpy as np
import pydicom

with warnings.catch_warnings():  # nibabel warns that its DICOM *wrappers* are experimental; we use only the CSA parser
    warnings.simplefilter("ignore", UserWarning)
    from nibabel.nicom import csareader

from rtdecode.dicom_geometry import StackGeometry, mosaic_to_volume, slice_position_from_mosaic
from rtdecode.errors import VolumeFileError
from rtdecode.ingest import dicom
from rtdecode.ingest.scanner_volume import ScannerVolume

_CSA_IMAGE_TAG = (0x0029, 0x1010)
_MAX_CACHED_SERIES = 64


@dataclasses.dataclass(frozen=True)
class MosaicLayout:
    """What the header says about one series' mosaics."""

    geometry: StackGeometry
    affine: np.ndarray
    slice_times_s: tuple[float, ...] | None


class MosaicReader:
    """Reads mosaic datasets into volumes, caching each series' layout."""

    def __init__(self) -> None:
        self._layouts: dict[tuple, MosaicLayout] = {}

    def read(self, ds: pydicom.Dataset, path: Path) -> ScannerVolume:
        layout = self._layout(ds, path)
        geometry = layout.geometry
        mosaic = dicom.pixel_frames(ds, 1, int(ds.Rows), int(ds.Columns), path)[0]
        data = mosaic_to_volume(mosaic, geometry.n_rows, geometry.n_columns, geometry.n_slices)
        dicom.rescale_in_place(data, *dicom.rescale_of(ds))
        series_key, series_number = dicom.series_identity(ds)
        return ScannerVolume(
            data=data,
            affine=layout.affine,
            tr_s=dicom.repetition_time_s(ds),
            acquisition_time_s=dicom.seconds_of_day(ds.get("AcquisitionTime")),
            slice_times_s=layout.slice_times_s,
            series_key=series_key,
            series_number=series_number,
            volume_number=_volume_number(ds, path),
            source=path,
        )

    def _layout(self, ds: pydicom.Dataset, path: Path) -> MosaicLayout:
        key = (
            str(ds.get("SeriesInstanceUID")),
            str(ds.get("ImageOrientationPatient")),
            str(ds.get("ImagePositionPatient")),
            int(ds.Rows),
            int(ds.Columns),
            str(ds.get("PixelSpacing")),
        )
        layout = self._layouts.get(key)
        if layout is None:
            if len(self._layouts) >= _MAX_CACHED_SERIES:
                self._layouts.clear()
            layout = self._layouts[key] = mosaic_layout(ds, path)
        return layout


def _volume_number(ds: pydicom.Dataset, path: Path) -> int:
    number = ds.get("InstanceNumber") or ds.get("AcquisitionNumber")
    if number is None:
        raise VolumeFileError(f"{path}: mosaic has neither InstanceNumber nor AcquisitionNumber")
    return int(number)


def mosaic_layout(ds: pydicom.Dataset, path: Path) -> MosaicLayout:
    """Geometry and slice timing of a mosaic, from its header alone."""
    csa = _csa_image_header(ds, path)
    n_slices = _n_slices(ds, csa, path)
    tiles = math.ceil(math.sqrt(n_slices))
    rows, columns = int(ds.Rows), int(ds.Columns)
    if rows % tiles or columns % tiles:
        raise VolumeFileError(
            f"{path}: a {rows}x{columns} mosaic cannot hold {n_slices} slices in a {tiles}x{tiles} grid"
        )
    n_rows, n_columns = rows // tiles, columns // tiles
    row_cosine, column_cosine = dicom.orientation(ds, path)
    row_spacing, column_spacing = dicom.pixel_spacing(ds, path)
    if "ImagePositionPatient" not in ds:
        raise VolumeFileError(f"{path}: ImagePositionPatient missing")
    first = slice_position_from_mosaic(
        [float(v) for v in ds.ImagePositionPatient],
        row_cosine,
        column_cosine,
        row_spacing,
        column_spacing,
        extra_rows=rows - n_rows,
        extra_columns=columns - n_columns,
    )
    normal = _slice_normal(csa, row_cosine, column_cosine)
    spacing = dicom.slice_spacing_mm(ds)
    if spacing <= 0:
        raise VolumeFileError(f"{path}: neither SpacingBetweenSlices nor SliceThickness is positive")
    geometry = StackGeometry(
        row_cosine=tuple(row_cosine),
        column_cosine=tuple(column_cosine),
        row_spacing_mm=row_spacing,
        column_spacing_mm=column_spacing,
        first_position=tuple(first),
        slice_step=tuple(normal * spacing),
        n_rows=n_rows,
        n_columns=n_columns,
        n_slices=n_slices,
    )
    return MosaicLayout(
        geometry=geometry,
        affine=geometry.affine(),
        slice_times_s=_slice_times(ds, csa, n_slices),
    )


def _csa_image_header(ds: pydicom.Dataset, path: Path) -> dict | None:
    if _CSA_IMAGE_TAG not in ds:
        return None
    try:
        return csareader.read(ds[_CSA_IMAGE_TAG].value)
    except csareader.CSAError as error:
        raise VolumeFileError(f"{path}: Siemens CSA image header is corrupt ({error})") from error


def _n_slices(ds: pydicom.Dataset, csa: dict | None, path: Path) -> int:
    n_slices = csareader.get_n_mosaic(csa) if csa is not None else None
    if n_slices is None:
        block = _siemens_mr_block(ds)
        n_slices = block[0x0A].value if block is not None and 0x0A in block else None
    if not n_slices:
        raise VolumeFileError(f"{path}: mosaic without NumberOfImagesInMosaic (CSA or (0019,100A))")
    return int(n_slices)


def _slice_normal(csa: dict | None, row_cosine: np.ndarray, column_cosine: np.ndarray) -> np.ndarray:
    normal = csareader.get_slice_normal(csa) if csa is not None else None
    if normal is None:
        normal = np.cross(row_cosine, column_cosine)
    normal = np.asarray(normal, float)
    return normal / np.linalg.norm(normal)


def _slice_times(ds: pydicom.Dataset, csa: dict | None, n_slices: int) -> tuple[float, ...] | None:
    times_ms = None
    if csa is not None and "MosaicRefAcqTimes" in csa["tags"]:
        times_ms = csa["tags"]["MosaicRefAcqTimes"]["items"]
    if not times_ms:
        block = _siemens_mr_block(ds)
        if block is not None and 0x29 in block:
            times_ms = list(block[0x29].value)
    if not times_ms or len(times_ms) < n_slices:
        return None
    return tuple(float(t) / 1000.0 for t in times_ms[:n_slices])


def _siemens_mr_block(ds: pydicom.Dataset):
    try:
        return ds.private_block(0x0019, "SIEMENS MR HEADER")
    except KeyError:
        return None
