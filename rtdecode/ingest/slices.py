"""Classic DICOM with one file per slice: collect the slices of each volume, then stack them.

A volume is identified by (series, volume number). The volume number is ``TemporalPositionIdentifier``
or else ``AcquisitionNumber`` (Siemens numbers each volume's acquisition), else derived from
``InstanceNumber``. The number of slices per volume comes from ``ImagesInAcquisition`` (0020,1002)
or from the ``scanner.slices_per_volume`` setting. Slices of a volume that never completes are
handed back by :meth:`SliceAssembler.expire` so they can be quarantined.
"""

import dataclasses
import zlib
from pathlib import Path

import numpy as np
import pydicom

from rtdecode.errors import DuplicateFileError, VolumeFileError
from rtdecode.ingest import dicom
from rtdecode.ingest.scanner_volume import ScannerVolume
from rtdecode.ingest.stack import PositionedFrame, stack_frames


@dataclasses.dataclass
class _PartialVolume:
    n_expected: int
    started_s: float
    first: pydicom.Dataset
    frames: dict[tuple, PositionedFrame] = dataclasses.field(default_factory=dict)
    paths: dict[tuple, Path] = dataclasses.field(default_factory=dict)  # per position, like frames


@dataclasses.dataclass(frozen=True)
class StrandedVolume:
    """Slices of a volume that did not complete in time."""

    series_number: int
    volume_number: int
    n_found: int
    n_expected: int
    paths: tuple[Path, ...]


class SliceAssembler:
    """Collects single-slice files until each volume is complete.

    Slices of volumes already assembled are remembered (a digest per slice), so a slice file read
    again with the same content is ignored, and a second copy or a different slice for a finished
    volume is refused with a reason (to be quarantined) rather than starting a new, never-complete one.
    """

    def __init__(self, slices_per_volume: int | None = None) -> None:
        self.slices_per_volume = slices_per_volume
        self._partial: dict[tuple[str, int], _PartialVolume] = {}
        self._assembled: dict[tuple[str, int], dict[tuple, tuple[int, Path]]] = {}

    def add(self, ds: pydicom.Dataset, path: Path, now_s: float) -> ScannerVolume | None:
        """Add one slice file; return the volume once its last slice has arrived."""
        n_expected = self._n_expected(ds, path)
        series_key, _ = dicom.series_identity(ds)
        key = (series_key, _volume_number(ds, n_expected, path))
        frame = _frame(ds, path)  # checked before anything is kept
        position_key = tuple(np.round(frame.position, 3))
        if key in self._assembled:
            _check_reread(self._assembled[key], position_key, frame, path, key[1])
            return None
        partial = self._partial.get(key)
        if partial is not None:
            _check_same_plane(partial.first, ds, path)
            if position_key in partial.frames:  # the same file read again, or a second one there
                known = {position_key: (_digest(partial.frames[position_key]), partial.paths[position_key])}
                _check_reread(known, position_key, frame, path, key[1])
                return None
        else:
            partial = self._partial[key] = _PartialVolume(n_expected, now_s, ds)
        partial.frames[position_key] = frame
        partial.paths[position_key] = path
        if len(partial.frames) < partial.n_expected:
            return None
        del self._partial[key]
        self._assembled[key] = {p: (_digest(f), partial.paths[p]) for p, f in partial.frames.items()}
        return self._assemble(partial, key, path)

    def expire(self, now_s: float, timeout_s: float) -> list[StrandedVolume]:
        """Remove and return volumes whose first slice came more than ``timeout_s`` ago."""
        stranded = []
        for key, partial in list(self._partial.items()):
            if now_s - partial.started_s < timeout_s:
                continue
            del self._partial[key]
            stranded.append(
                StrandedVolume(
                    series_number=int(partial.first.get("SeriesNumber") or 0),
                    volume_number=key[1],
                    n_found=len(partial.frames),
                    n_expected=partial.n_expected,
                    paths=tuple(partial.paths.values()),
                )
            )
        return stranded

    def next_expiry_s(self, timeout_s: float) -> float | None:
        if not self._partial:
            return None
        return min(p.started_s for p in self._partial.values()) + timeout_s

    def _n_expected(self, ds: pydicom.Dataset, path: Path) -> int:
        n = ds.get("ImagesInAcquisition") or self.slices_per_volume
        if not n:
            raise VolumeFileError(
                f"{path}: single-slice DICOM without ImagesInAcquisition (0020,1002); "
                "set scanner.slices_per_volume to the number of slices per volume"
            )
        return int(n)

    def _assemble(self, partial: _PartialVolume, key: tuple[str, int], path: Path) -> ScannerVolume:
        first = partial.first
        row_cosine, column_cosine = dicom.orientation(first, path)
        spacing = dicom.pixel_spacing(first, path)
        data, affine, slice_times, start_s = stack_frames(
            list(partial.frames.values()), row_cosine, column_cosine, spacing, dicom.slice_spacing_mm(first), path
        )
        return ScannerVolume(
            data=data,
            affine=affine,
            tr_s=dicom.repetition_time_s(first),
            acquisition_time_s=start_s,
            slice_times_s=slice_times,
            series_key=key[0],
            series_number=int(first.get("SeriesNumber") or 0),
            volume_number=key[1],
            source=path,
            other_sources=tuple(p for p in partial.paths.values() if p != path),
        )


def _digest(frame: PositionedFrame) -> int:
    return zlib.crc32(np.ascontiguousarray(frame.pixels))


def _check_reread(slices: dict, position_key: tuple, frame: PositionedFrame, path: Path, volume_number: int) -> None:
    """A slice at a position already filled: silent if it is the same file with the same pixels."""
    known = slices.get(position_key)
    if known is None:
        raise VolumeFileError(f"{path}: slice at {position_key} for volume {volume_number}, which was already complete")
    digest, first_path = known
    if digest != _digest(frame):
        raise VolumeFileError(
            f"{path}: different pixels for a slice of volume {volume_number} (first from {first_path})"
        )
    if first_path != path:
        raise DuplicateFileError(f"{path}: same slice as {first_path.name} (volume {volume_number}); ignored")


def _volume_number(ds: pydicom.Dataset, n_expected: int, path: Path) -> int:
    for name in ("TemporalPositionIdentifier", "AcquisitionNumber"):
        value = ds.get(name)
        if value not in (None, ""):
            return int(value)
    instance = ds.get("InstanceNumber")
    if instance in (None, ""):
        raise VolumeFileError(f"{path}: no TemporalPositionIdentifier, AcquisitionNumber or InstanceNumber")
    return (int(instance) - 1) // n_expected + 1


def _frame(ds: pydicom.Dataset, path: Path) -> PositionedFrame:
    if "ImagePositionPatient" not in ds:
        raise VolumeFileError(f"{path}: ImagePositionPatient missing")
    pixels = dicom.pixel_frames(ds, 1, int(ds.Rows), int(ds.Columns), path)[0]
    return PositionedFrame(
        pixels=dicom.rescale(pixels, *dicom.rescale_of(ds)),
        position=np.asarray([float(v) for v in ds.ImagePositionPatient]),
        acquisition_time_s=dicom.seconds_of_day(ds.get("AcquisitionTime")),
    )


def _check_same_plane(first: pydicom.Dataset, ds: pydicom.Dataset, path: Path) -> None:
    for name in ("Rows", "Columns", "ImageOrientationPatient", "PixelSpacing"):
        if str(first.get(name)) != str(ds.get(name)):
            raise VolumeFileError(
                f"{path}: {name} {ds.get(name)} differs from the volume's first slice ({first.get(name)})"
            )
