"""Enhanced MR multi-frame DICOM (Siemens XA and others).

Geometry, timing and rescale live in functional groups: per frame, or shared by all frames. A file
usually holds one volume (Siemens XA real-time export); a file with several temporal positions
gives one volume per position, numbered by ``TemporalPositionIndex``. Frames without a temporal
index are grouped by how often their position has already occurred.
"""

from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom

from rtdecode.errors import VolumeFileError
from rtdecode.ingest import dicom
from rtdecode.ingest.scanner_volume import ScannerVolume
from rtdecode.ingest.stack import PositionedFrame, stack_frames


def _group_item(frame: pydicom.Dataset, shared: pydicom.Dataset, sequence: str) -> pydicom.Dataset | None:
    for source in (frame, shared):
        items = source.get(sequence)
        if items:
            return items[0]
    return None


def _group_value(frame, shared, sequence: str, name: str, default=None):
    item = _group_item(frame, shared, sequence)
    value = item.get(name) if item is not None else None
    return default if value in (None, "") else value


def read_enhanced(ds: pydicom.Dataset, path: Path) -> list[ScannerVolume]:
    """All volumes in one enhanced multi-frame file, in temporal order."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    n_frames = int(ds.get("NumberOfFrames") or 1)
    if not per_frame or len(per_frame) != n_frames:
        raise VolumeFileError(f"{path}: PerFrameFunctionalGroupsSequence missing or not one item per frame")
    shared_items = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_items[0] if shared_items else pydicom.Dataset()
    row_cosine, column_cosine, pixel_spacing, slice_spacing = _plane(per_frame[0], shared, path)
    pixels = dicom.pixel_frames(ds, n_frames, int(ds.Rows), int(ds.Columns), path)
    groups = _frames_by_time_point(ds, per_frame, shared, pixels, path)
    tr_ms = _group_value(per_frame[0], shared, "MRTimingAndRelatedParametersSequence", "RepetitionTime")
    tr_s = float(tr_ms) / 1000 if tr_ms is not None else dicom.repetition_time_s(ds)
    series_key, series_number = dicom.series_identity(ds)
    volumes = []
    for time_point, frames in sorted(groups.items()):
        data, affine, slice_times, start_s = stack_frames(
            frames, row_cosine, column_cosine, pixel_spacing, slice_spacing, path
        )
        volumes.append(
            ScannerVolume(
                data=data,
                affine=affine,
                tr_s=tr_s,
                acquisition_time_s=start_s if start_s is not None else dicom.seconds_of_day(ds.get("AcquisitionTime")),
                slice_times_s=slice_times,
                series_key=series_key,
                series_number=series_number,
                volume_number=int(ds.get("InstanceNumber") or time_point) if len(groups) == 1 else time_point,
                source=path,
            )
        )
    return volumes


def _plane(first: pydicom.Dataset, shared: pydicom.Dataset, path: Path):
    """(row cosine, column cosine, pixel spacing, slice spacing) from the functional groups."""
    orientation = _group_value(first, shared, "PlaneOrientationSequence", "ImageOrientationPatient")
    measures = _group_item(first, shared, "PixelMeasuresSequence")
    spacing = measures.get("PixelSpacing") if measures is not None else None
    if orientation is None or spacing is None or len(orientation) != 6 or len(spacing) != 2:
        raise VolumeFileError(f"{path}: plane orientation or pixel spacing missing from functional groups")
    cosines = np.asarray([float(v) for v in orientation])
    return cosines[:3], cosines[3:], (float(spacing[0]), float(spacing[1])), dicom.slice_spacing_mm(measures)


def _frames_by_time_point(ds, per_frame, shared, pixels: np.ndarray, path: Path) -> dict[int, list[PositionedFrame]]:
    groups: dict[int, list[PositionedFrame]] = defaultdict(list)
    seen_positions: dict[tuple, int] = defaultdict(int)
    file_rescale = dicom.rescale_of(ds)
    for index, frame in enumerate(per_frame):
        position = _group_value(frame, shared, "PlanePositionSequence", "ImagePositionPatient")
        if position is None or len(position) != 3:
            raise VolumeFileError(f"{path}: frame {index + 1} has no ImagePositionPatient")
        position = np.asarray([float(v) for v in position])
        content = _group_item(frame, shared, "FrameContentSequence")
        time_point = content.get("TemporalPositionIndex") if content is not None else None
        if time_point is None:
            key = tuple(np.round(position, 3))
            seen_positions[key] += 1
            time_point = seen_positions[key]
        stamp = content.get("FrameAcquisitionDateTime") if content is not None else None
        transform = _group_item(frame, shared, "PixelValueTransformationSequence")
        slope, intercept = dicom.rescale_of(transform, file_rescale) if transform is not None else file_rescale
        groups[int(time_point)].append(
            PositionedFrame(
                pixels=dicom.rescale(pixels[index], slope, intercept),
                position=position,
                acquisition_time_s=dicom.seconds_of_day(str(stamp)[8:]) if stamp else None,
            )
        )
    return groups
