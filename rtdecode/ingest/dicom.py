"""Open a DICOM file, decide whether it is complete, and read the tags every layout shares.

Completeness is decided from content: the file must parse, and its Pixel Data must be as long as
``Rows x Columns x SamplesPerPixel x BitsAllocated / 8 x NumberOfFrames``. pydicom returns a
shortened Pixel Data element for a file cut in the middle of its pixels, so the length check is what
catches a file that is still being written.
"""

from pathlib import Path

import numpy as np
import pydicom

from rtdecode.errors import IncompleteFileError, VolumeFileError

DICOM_MAGIC_OFFSET = 128
_UNCOMPRESSED = {
    "1.2.840.10008.1.2",  # implicit VR little endian
    "1.2.840.10008.1.2.1",  # explicit VR little endian
    "1.2.840.10008.1.2.2",  # explicit VR big endian (retired)
}
_ENHANCED_MR = {"1.2.840.10008.5.1.4.1.1.4.1", "1.2.840.10008.5.1.4.1.1.4.4"}  # enhanced, legacy-converted


def read_dicom(path: Path, data: bytes) -> pydicom.Dataset:
    """Parse ``data`` (the bytes of ``path``) and check it is a complete, uncompressed MR image.

    Raises
    ------
    IncompleteFileError
        Shorter than its header says, or too short (or too cut) to parse: it may still be written.
    VolumeFileError
        Not DICOM, compressed pixels this reader cannot decode, or not MR.
    """
    if len(data) < DICOM_MAGIC_OFFSET + 4:
        raise IncompleteFileError(f"{path}: {len(data)} bytes, too short for a DICOM header")
    if data[DICOM_MAGIC_OFFSET : DICOM_MAGIC_OFFSET + 4] != b"DICM":
        raise VolumeFileError(f"{path}: not a DICOM file (no 'DICM' marker at byte 128)")
    try:
        ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
    except Exception as error:  # pydicom raises many types on a file cut anywhere in its header
        raise IncompleteFileError(f"{path}: DICOM header cannot be parsed ({type(error).__name__}: {error})") from None
    _check_transfer_syntax(path, ds)  # the file meta comes first: safe to judge on a partial file
    _check_pixel_length(path, ds)  # before Modality: a partial file must read as incomplete
    _check_mr(path, ds)
    return ds


def _check_transfer_syntax(path: Path, ds: pydicom.Dataset) -> None:
    syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
    if syntax and syntax not in _UNCOMPRESSED:
        raise VolumeFileError(
            f"{path}: compressed pixel data (transfer syntax {syntax}) is not supported; "
            "set the scanner's real-time export to uncompressed"
        )


def _check_mr(path: Path, ds: pydicom.Dataset) -> None:
    modality = ds.get("Modality")
    if modality != "MR":
        raise VolumeFileError(f"{path}: not an MR image (Modality {modality!r})")


def _check_pixel_length(path: Path, ds: pydicom.Dataset) -> None:
    rows, columns = ds.get("Rows"), ds.get("Columns")
    if not rows or not columns or "BitsAllocated" not in ds:
        raise IncompleteFileError(f"{path}: image size tags missing (file may be cut short)")
    if "PixelData" not in ds:
        raise IncompleteFileError(f"{path}: no Pixel Data element (file may be cut short)")
    frames = int(ds.get("NumberOfFrames") or 1)
    expected = rows * columns * int(ds.get("SamplesPerPixel", 1)) * int(ds.BitsAllocated) // 8 * frames
    found = len(ds.PixelData)
    if found < expected:
        raise IncompleteFileError(f"{path}: Pixel Data has {found} of {expected} bytes")


def layout_of(ds: pydicom.Dataset) -> str:
    """``"enhanced"``, ``"mosaic"`` or ``"classic"``."""
    if str(ds.get("SOPClassUID", "")) in _ENHANCED_MR or int(ds.get("NumberOfFrames") or 1) > 1:
        return "enhanced"
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if "MOSAIC" in image_type:
        return "mosaic"
    return "classic"


def pixel_frames(ds: pydicom.Dataset, n_frames: int, n_rows: int, n_columns: int, path: Path) -> np.ndarray:
    """Pixel Data as a (n_frames, n_rows, n_columns) array, without copying."""
    bits = int(ds.BitsAllocated)
    if bits not in (8, 16, 32) or int(ds.get("SamplesPerPixel", 1)) != 1:
        raise VolumeFileError(
            f"{path}: unsupported pixel format: {bits} bits allocated, {ds.get('SamplesPerPixel')} samples per pixel"
        )
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    big_endian = str(ds.file_meta.get("TransferSyntaxUID", "")) == "1.2.840.10008.1.2.2"
    dtype = np.dtype(f"{'>' if big_endian else '<'}{'i' if signed else 'u'}{bits // 8}")
    count = n_frames * n_rows * n_columns
    return np.frombuffer(ds.PixelData, dtype=dtype, count=count).reshape(n_frames, n_rows, n_columns)


def rescale_of(item: pydicom.Dataset, fallback: tuple[float, float] = (1.0, 0.0)) -> tuple[float, float]:
    """(RescaleSlope, RescaleIntercept) of a dataset or functional-group item, else ``fallback``."""
    slope, intercept = item.get("RescaleSlope"), item.get("RescaleIntercept")
    return (
        float(slope) if slope not in (None, "") else fallback[0],
        float(intercept) if intercept not in (None, "") else fallback[1],
    )


def slice_spacing_mm(item: pydicom.Dataset) -> float:
    """SpacingBetweenSlices, else SliceThickness, else 0 (of a dataset or a Pixel Measures item)."""
    return float(item.get("SpacingBetweenSlices") or item.get("SliceThickness") or 0)


def rescale(frames: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """Apply a DICOM rescale; always returns a new float32 array."""
    out = frames.astype(np.float32)
    rescale_in_place(out, slope, intercept)
    return out


def rescale_in_place(data: np.ndarray, slope: float, intercept: float) -> None:
    """``data = data x slope + intercept`` for a float32 array, skipping the identity."""
    if slope != 1.0:
        data *= np.float32(slope)
    if intercept != 0.0:
        data += np.float32(intercept)


def seconds_of_day(tm: str | None) -> float | None:
    """DICOM TM (``HHMMSS.ffffff``, or a DT's time part, a ``+HHMM`` offset ignored) -> seconds since midnight."""
    if not tm:
        return None
    text = str(tm).strip()
    for sign in "+-":
        if sign in text[1:]:
            text = text[: text.index(sign, 1)]
    try:
        hours = int(text[0:2])
        minutes = int(text[2:4]) if len(text) >= 4 else 0
        seconds = float(text[4:]) if len(text) > 4 else 0.0
    except ValueError:
        return None
    return hours * 3600 + minutes * 60 + seconds


def series_identity(ds: pydicom.Dataset) -> tuple[str, int]:
    """(SeriesInstanceUID, SeriesNumber); the number defaults to 0 where the scanner leaves it out."""
    number = int(ds.get("SeriesNumber") or 0)
    key = str(ds.get("SeriesInstanceUID") or f"series-number-{number}")
    return key, number


def orientation(ds: pydicom.Dataset, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(row cosine, column cosine) from ImageOrientationPatient."""
    values = ds.get("ImageOrientationPatient")
    if values is None or len(values) != 6:
        raise VolumeFileError(f"{path}: ImageOrientationPatient missing or malformed ({values!r})")
    cosines = np.asarray([float(v) for v in values])
    return cosines[:3], cosines[3:]


def pixel_spacing(ds: pydicom.Dataset, path: Path) -> tuple[float, float]:
    """(between rows, between columns) in mm."""
    values = ds.get("PixelSpacing")
    if values is None or len(values) != 2:
        raise VolumeFileError(f"{path}: PixelSpacing missing or malformed ({values!r})")
    return float(values[0]), float(values[1])


def repetition_time_s(ds: pydicom.Dataset) -> float | None:
    value = ds.get("RepetitionTime")
    return float(value) / 1000.0 if value not in (None, "") else None
