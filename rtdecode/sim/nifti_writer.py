"""Encode volumes as NIfTI the way real-time exporters write them.

* one 3D file per volume (``.nii`` or ``.nii.gz``), its identity in the header's ``descrip`` field
  as ``series=N;instance=K;Time=HHMMSS.ffffff`` (``Time`` as dcm2niix writes it);
* one 4D file per run that grows: the header (with the planned number of volumes) first, then each
  volume appended as it is acquired. A growing ``.nii.gz`` is one gzip stream, flushed after every
  volume so a reader can decompress what has arrived.
"""

import gzip
import zlib

import nibabel as nib
import numpy as np

from rtdecode.sim.dicom_writer import dicom_time


def _header(affine: np.ndarray, shape: tuple[int, ...], tr_s: float, descrip: str, rescale: tuple[float, float]):
    header = nib.Nifti1Header()
    header.set_data_dtype(np.uint16)
    header.set_data_shape(shape)
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    header.set_xyzt_units("mm", "sec")
    header["pixdim"][4] = tr_s
    header["descrip"] = descrip.encode("ascii")[:79]
    header.set_slope_inter(*rescale)
    return header


def _identity(series_number: int, instance: int | None, acquisition_time_s: float) -> str:
    parts = [f"series={series_number}"]
    if instance is not None:
        parts.append(f"instance={instance}")
    parts.append(f"Time={dicom_time(acquisition_time_s)}")
    return ";".join(parts)


def encode_nifti_volume(
    stored: np.ndarray,
    affine: np.ndarray,
    tr_s: float,
    series_number: int,
    instance: int,
    acquisition_time_s: float,
    rescale: tuple[float, float],
    compress: bool,
) -> bytes:
    """One 3D volume file. ``stored`` is uint16, scaled by ``rescale`` = (slope, intercept)."""
    header = _header(affine, stored.shape, tr_s, _identity(series_number, instance, acquisition_time_s), rescale)
    image = nib.Nifti1Image(stored, affine, header)
    image.header.set_slope_inter(*rescale)
    raw = image.to_bytes()
    return gzip.compress(raw, compresslevel=1, mtime=0) if compress else raw


class GrowingNifti:
    """Bytes of a 4D NIfTI written volume by volume: :meth:`start`, then :meth:`append` per volume."""

    def __init__(self, compress: bool) -> None:
        self._compressor = zlib.compressobj(1, zlib.DEFLATED, 31) if compress else None

    def _encode(self, raw: bytes, finish: bool = False) -> bytes:
        if self._compressor is None:
            return raw
        data = self._compressor.compress(raw)
        data += self._compressor.flush(zlib.Z_FINISH if finish else zlib.Z_SYNC_FLUSH)
        return data

    def start(
        self,
        affine: np.ndarray,
        shape: tuple[int, int, int],
        n_volumes: int,
        tr_s: float,
        series_number: int,
        acquisition_time_s: float,
        rescale: tuple[float, float],
    ) -> bytes:
        """Header and padding up to the first voxel."""
        header = _header(affine, (*shape, n_volumes), tr_s, _identity(series_number, None, acquisition_time_s), rescale)
        header["vox_offset"] = 352
        raw = header.binaryblock + b"\x00" * (352 - len(header.binaryblock))
        return self._encode(raw)

    def append(self, stored: np.ndarray, last: bool) -> bytes:
        """One volume's voxels (Fortran order, as NIfTI stores them)."""
        return self._encode(np.asarray(stored, dtype="<u2").tobytes(order="F"), finish=last)
