"""Read a scanner file into volumes, whatever its format: the one entry point of the readers.

NIfTI is recognised by extension (``.nii``, ``.nii.gz``); anything else is read as DICOM and
dispatched by layout (mosaic, enhanced multi-frame, classic single slice). The reader keeps the
state that spans files: mosaic layouts per series, slices waiting for the rest of their volume,
and NIfTI files that are still growing.
"""

import math
import time
from pathlib import Path

import pydicom

from rtdecode.errors import IncompleteFileError, VolumeFileError
from rtdecode.ingest import dicom
from rtdecode.ingest.enhanced import read_enhanced
from rtdecode.ingest.mosaic import MosaicReader
from rtdecode.ingest.nifti import NiftiFile, is_nifti, peek_numbering
from rtdecode.ingest.scanner_volume import ScannerVolume
from rtdecode.ingest.slices import SliceAssembler, StrandedVolume


class VolumeReader:
    """Reads files of one scanner export.

    Parameters
    ----------
    file_format : {"auto", "dicom", "nifti"}
    slices_per_volume : int or None
        For classic single-slice DICOM whose headers do not say.
    """

    def __init__(self, file_format: str = "auto", slices_per_volume: int | None = None) -> None:
        self.file_format = file_format
        self._mosaics = MosaicReader()
        self._slices = SliceAssembler(slices_per_volume)
        self._nifti: dict[Path, NiftiFile] = {}

    def read(self, path: Path) -> tuple[list[ScannerVolume], bool]:
        """The volumes ``path`` completes now, and whether the file is finished with.

        Raises
        ------
        IncompleteFileError
            Nothing new is complete yet (the file is still being written).
        VolumeFileError
            The file is not a readable MR volume.
        """
        if is_nifti(path) and self.file_format in ("auto", "nifti"):
            return self._read_nifti(path)
        if self.file_format == "nifti":
            raise VolumeFileError(f"{path}: not a .nii or .nii.gz file, and scanner.format is 'nifti'")
        ds = dicom.read_dicom(path, path.read_bytes())
        layout = dicom.layout_of(ds)
        if layout == "mosaic":
            return [self._mosaics.read(ds, path)], True
        if layout == "enhanced":
            return read_enhanced(ds, path), True
        volume = self._slices.add(ds, path, time.monotonic())
        return ([volume] if volume is not None else []), True

    def _read_nifti(self, path: Path) -> tuple[list[ScannerVolume], bool]:
        nifti = self._nifti.get(path)
        if nifti is None:
            nifti = self._nifti[path] = NiftiFile(path)
        try:
            volumes = nifti.update()
        except VolumeFileError:
            del self._nifti[path]  # it has consumed the bad bytes: the next look starts afresh
            raise
        if not volumes and not nifti.complete:
            raise IncompleteFileError(f"{path}: {nifti.incomplete_reason()}")
        if nifti.complete:
            del self._nifti[path]
        return volumes, nifti.complete

    def sort_key(self, path: Path) -> tuple:
        """(series, volume, slice instance, name) from the header alone, to read files found at start
        in scanner order; files whose header cannot be read sort last (reading them reports why)."""
        try:
            if is_nifti(path) and self.file_format in ("auto", "nifti"):
                return (*peek_numbering(path), 0, path.name)
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            volume = ds.get("TemporalPositionIdentifier") or ds.get("AcquisitionNumber") or ds.get("InstanceNumber")
            return (int(ds.get("SeriesNumber") or 0), int(volume or 0), int(ds.get("InstanceNumber") or 0), path.name)
        except Exception:  # any unreadable header: read later, and reported then
            return (math.inf, math.inf, math.inf, path.name)

    def progress(self, path: Path) -> str | None:
        """What is still missing from a partly read (growing) file, or None."""
        nifti = self._nifti.get(path)
        return nifti.incomplete_reason() if nifti is not None else None

    def forget(self, path: Path) -> None:
        """Drop the state kept for ``path`` (it was quarantined or disappeared)."""
        self._nifti.pop(path, None)

    def stranded_slices(self, now_s: float, timeout_s: float) -> list[StrandedVolume]:
        """Volumes of single-slice files still incomplete ``timeout_s`` after their first slice."""
        return self._slices.expire(now_s, timeout_s)

    def next_slice_expiry_s(self, timeout_s: float) -> float | None:
        return self._slices.next_expiry_s(timeout_s)
