"""NIfTI volumes: one 3D file per volume, or a 4D file that grows as volumes are appended.

Each file gets a :class:`NiftiFile`, which reads only bytes it has not read before (decompressing
``.nii.gz`` as a stream) and returns every volume whose bytes are all present. A volume is complete
when ``vox_offset + (i + 1) x volume bytes`` are there; the header (NIfTI-1 or NIfTI-2) says how many.

Identity, since NIfTI has no series or instance tags:

* the header's ``descrip`` field, read as ``key=value`` pairs separated by ``;``: ``series``,
  ``instance`` and ``Time`` (``HHMMSS.fff``; dcm2niix writes ``Time`` there too);
* else the file name: its last number is the volume number (3D files) and the number before it,
  if any, the series number.

A 4D file is one series; its volumes are numbered by position (1-based).
"""

import gzip
import io
import re
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from rtdecode.errors import VolumeFileError
from rtdecode.ingest.dicom import rescale_in_place, seconds_of_day
from rtdecode.ingest.scanner_volume import ScannerVolume

_NUMBERS = re.compile(r"\d+")
_TIME_UNIT_S = {8: 1.0, 16: 1e-3, 24: 1e-6}


def is_nifti(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def _descrip_fields(header) -> dict[str, str]:
    text = bytes(header["descrip"]).split(b"\x00")[0].decode("ascii", "replace")
    fields = {}
    for part in text.split(";"):
        key, sep, value = part.partition("=")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def _stem_numbers(path: Path) -> list[int]:
    stem = path.name[: -len(".nii.gz")] if path.name.lower().endswith(".nii.gz") else path.stem
    return [int(n) for n in _NUMBERS.findall(stem)]


class NiftiFile:
    """Incremental reader of one NIfTI file that may still be growing."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._gzip = self.path.name.lower().endswith(".gz")
        self._decompressor = zlib.decompressobj(wbits=31) if self._gzip else None
        self._raw_offset = 0
        self._buffer = bytearray()  # bytes after those consumed
        self._buffer_start = 0  # absolute (decompressed) offset of _buffer[0]
        self._header = None
        self.n_delivered = 0
        self.n_total: int | None = None

    @property
    def complete(self) -> bool:
        return self.n_total is not None and self.n_delivered >= self.n_total

    @property
    def is_4d(self) -> bool:
        return self.n_total is not None and self.n_total > 1

    def update(self) -> list[ScannerVolume]:
        """Read what was appended since the last call; return the volumes it completed."""
        self._read_new_bytes()
        if self._header is None:
            self._parse_header()
            if self._header is None:
                return []
        volumes = []
        while not self.complete and self._next_volume_present():
            volumes.append(self._take_volume())
        return volumes

    def incomplete_reason(self) -> str:
        have = self._buffer_start + len(self._buffer)
        if self._header is None:
            return f"{have} bytes, header not complete"
        need = self._vox_offset + (self.n_delivered + 1) * self._volume_bytes
        return f"volume {self.n_delivered + 1} of {self.n_total}: {have} of {need} bytes"

    def _read_new_bytes(self) -> None:
        with open(self.path, "rb") as handle:
            handle.seek(0, io.SEEK_END)
            size = handle.tell()
            if size < self._raw_offset:
                raise VolumeFileError(f"{self.path}: file shrank from {self._raw_offset} to {size} bytes")
            handle.seek(self._raw_offset)
            new = handle.read()
        self._raw_offset += len(new)
        if self._decompressor is None:
            self._buffer += new
            return
        try:
            while new:  # a .nii.gz may hold several gzip members, one after another
                self._buffer += self._decompressor.decompress(new)
                new = b""
                if self._decompressor.eof:
                    new = self._decompressor.unused_data
                    self._decompressor = zlib.decompressobj(wbits=31)
        except zlib.error as error:
            raise VolumeFileError(f"{self.path}: corrupt gzip stream ({error})") from error

    def _parse_header(self) -> None:
        if len(self._buffer) < 4:
            return
        size = int.from_bytes(self._buffer[:4], "little")
        if size not in (348, 540):
            size = int.from_bytes(self._buffer[:4], "big")
        header_class = {348: nib.Nifti1Header, 540: nib.Nifti2Header}.get(size)
        if header_class is None:
            raise VolumeFileError(f"{self.path}: not a NIfTI file (header size field {size})")
        if len(self._buffer) < size:
            return
        try:
            header = header_class.from_fileobj(io.BytesIO(bytes(self._buffer[:size])), check=True)
        except (nib.spatialimages.HeaderDataError, ValueError) as error:
            raise VolumeFileError(f"{self.path}: invalid NIfTI header ({error})") from error
        if header.get_data_shape() == () or len(header.get_data_shape()) < 3:
            raise VolumeFileError(f"{self.path}: NIfTI is not 3D or 4D (shape {header.get_data_shape()})")
        self._set_header(header)

    def _set_header(self, header) -> None:
        shape = header.get_data_shape()
        if len(shape) > 4 or (len(shape) == 4 and shape[3] < 1):
            raise VolumeFileError(f"{self.path}: NIfTI shape {shape} is not one or more 3D volumes")
        self._header = header
        self._shape = tuple(int(n) for n in shape[:3])
        self._dtype = header.get_data_dtype()
        self._volume_bytes = int(np.prod(self._shape)) * self._dtype.itemsize
        self._vox_offset = int(header["vox_offset"])
        self.n_total = int(shape[3]) if len(shape) == 4 else 1
        slope, intercept = header.get_slope_inter()
        self._slope = 1.0 if slope is None else float(slope)
        self._intercept = 0.0 if intercept is None else float(intercept)
        self._affine = header.get_best_affine()
        self._fields = _descrip_fields(header)
        self._tr_s = self._repetition_time_s(header)
        self._slice_times_s = self._slice_times(header)

    def _repetition_time_s(self, header) -> float | None:
        zooms = header["pixdim"]
        unit = _TIME_UNIT_S.get(int(header["xyzt_units"]) & 0x38, 1.0)
        tr = float(zooms[4]) * unit
        return tr if tr > 0 else None

    def _slice_times(self, header) -> tuple[float, ...] | None:
        try:
            times = header.get_slice_times()
        except (nib.spatialimages.HeaderDataError, nib.spatialimages.HeaderTypeError, AttributeError):
            return None
        if any(t is None for t in times):
            return None
        return tuple(float(t) for t in times)

    def _next_volume_present(self) -> bool:
        end = self._vox_offset + (self.n_delivered + 1) * self._volume_bytes
        return self._buffer_start + len(self._buffer) >= end

    def _take_volume(self) -> ScannerVolume:
        start = self._vox_offset + self.n_delivered * self._volume_bytes - self._buffer_start
        raw = np.frombuffer(self._buffer, dtype=self._dtype, count=int(np.prod(self._shape)), offset=start)
        data = np.array(raw.reshape(self._shape, order="F"), dtype=np.float32, order="F", copy=True)
        rescale_in_place(data, self._slope, self._intercept)
        consumed = start + self._volume_bytes
        del raw
        del self._buffer[:consumed]
        self._buffer_start += consumed
        self.n_delivered += 1
        return self._scanner_volume(data, self.n_delivered)

    def _scanner_volume(self, data: np.ndarray, position: int) -> ScannerVolume:
        series_number, volume_number = self._numbering(position)
        start_s = seconds_of_day(self._fields.get("Time"))
        if start_s is not None and self.is_4d and self._tr_s:
            start_s += (position - 1) * self._tr_s
        key = f"nifti-file:{self.path}" if self.is_4d else f"nifti-series:{self.path.parent}:{series_number}"
        return ScannerVolume(
            data=data,
            affine=self._affine,
            tr_s=self._tr_s,
            acquisition_time_s=start_s,
            slice_times_s=self._slice_times_s,
            series_key=key,
            series_number=series_number,
            volume_number=volume_number,
            source=self.path,
        )

    def _numbering(self, position: int) -> tuple[int, int]:
        series, instance = numbering(self.path, self._fields, self.is_4d)
        return series, (position if self.is_4d else instance)


def numbering(path: Path, fields: dict[str, str], is_4d: bool) -> tuple[int, int]:
    """(series, volume) of a NIfTI file from its descrip fields, else its name (see module docstring).

    A 4D file's volume is its position; 1 is returned for it here.
    """
    numbers = _stem_numbers(path)
    if is_4d:
        return _field_number(path, fields, "series", numbers[-1] if numbers else 0), 1
    series = _field_number(path, fields, "series", numbers[-2] if len(numbers) >= 2 else 0)
    instance = _field_number(path, fields, "instance", numbers[-1] if numbers else None)
    if instance is None:
        raise VolumeFileError(f"{path}: no volume number: descrip has no 'instance=' and the name has no digits")
    return series, instance


def _field_number(path: Path, fields: dict[str, str], name: str, default: int | None) -> int | None:
    text = fields.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise VolumeFileError(f"{path}: descrip field {name}={text!r} is not a whole number") from None


def peek_numbering(path: Path) -> tuple[int, int]:
    """(series, volume) from the header alone (for ordering files found at start)."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as handle:
        header = nib.Nifti1Header.from_fileobj(io.BytesIO(handle.read(348)), check=False)
    shape = header.get_data_shape()
    return numbering(path, _descrip_fields(header), len(shape) == 4 and shape[3] > 1)
