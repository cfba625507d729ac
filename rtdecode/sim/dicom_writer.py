"""Encode volumes as the DICOM a scanner exports in real time.

Three layouts, each readable by dcm2niix:

* ``mosaic``: Siemens classic MR Image Storage, one file per volume, slices tiled in a square grid,
  with the CSA image header (``NumberOfImagesInMosaic``, ``SliceNormalVector``,
  ``MosaicRefAcqTimes``) Siemens software writes.
* ``enhanced``: Enhanced MR Image Storage, one multi-frame file per volume (Siemens XA style), with
  per-frame positions and acquisition times.
* ``classic``: MR Image Storage, one file per slice.

No real patient data is written: patient name and id are fixed placeholders.
"""

import dataclasses
import datetime
import io
import math

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from rtdecode.dicom_geometry import StackGeometry, mosaic_position, volume_to_frames
from rtdecode.sim.csa import encode_csa2

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
SIMULATED_PATIENT = "SIMULATED"  # PatientName and PatientID unless a test asks for others


@dataclasses.dataclass(frozen=True)
class SeriesHeader:
    """What every file of one simulated series shares."""

    series_number: int
    geometry: StackGeometry
    tr_s: float
    slice_times_s: tuple[float, ...]
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    date: datetime.date
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    echo_time_ms: float = 30.0
    patient_name: str = SIMULATED_PATIENT
    patient_id: str = SIMULATED_PATIENT


def new_series_header(
    series_number: int,
    geometry: StackGeometry,
    tr_s: float,
    slice_times_s: tuple[float, ...],
    study_uid: str,
    rescale: tuple[float, float] = (1.0, 0.0),
    patient: tuple[str, str] = (SIMULATED_PATIENT, SIMULATED_PATIENT),
) -> SeriesHeader:
    return SeriesHeader(
        patient_name=patient[0],
        patient_id=patient[1],
        series_number=series_number,
        geometry=geometry,
        tr_s=tr_s,
        slice_times_s=tuple(slice_times_s),
        study_uid=study_uid,
        series_uid=generate_uid(),
        frame_of_reference_uid=generate_uid(),
        date=datetime.date.today(),
        rescale_slope=rescale[0],
        rescale_intercept=rescale[1],
    )


def dicom_time(seconds_of_day: float) -> str:
    """Seconds since midnight -> DICOM TM ``HHMMSS.ffffff`` (a run that crosses midnight wraps, as a scanner's
    clock does)."""
    micro = int(round(seconds_of_day * 1e6)) % (24 * 3600 * 10**6)
    hours, rest = divmod(micro, 3600 * 10**6)
    minutes, rest = divmod(rest, 60 * 10**6)
    seconds, micro = divmod(rest, 10**6)
    return f"{hours:02d}{minutes:02d}{seconds:02d}.{micro:06d}"


def _decimal(value: float) -> str:
    """A DS value (at most 16 characters)."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return text if len(text) <= 16 else f"{value:.8g}"


def _base_dataset(header: SeriesHeader, sop_class: str, instance_number: int, acquisition_time_s: float) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.Manufacturer = "SIEMENS"
    ds.ManufacturerModelName = "rtdecode simulator"
    ds.PatientName = header.patient_name
    ds.PatientID = header.patient_id
    ds.StudyInstanceUID = header.study_uid
    ds.SeriesInstanceUID = header.series_uid
    ds.FrameOfReferenceUID = header.frame_of_reference_uid
    ds.SeriesNumber = header.series_number
    ds.InstanceNumber = instance_number
    ds.AcquisitionNumber = instance_number
    ds.SeriesDescription = "rtdecode_sim_bold"
    ds.ProtocolName = "rtdecode_sim_bold"
    date = header.date.strftime("%Y%m%d")
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
    ds.AcquisitionTime = ds.ContentTime = dicom_time(acquisition_time_s)
    ds.MagneticFieldStrength = 3
    ds.RepetitionTime = _decimal(header.tr_s * 1000)
    ds.EchoTime = _decimal(header.echo_time_ms)
    ds.FlipAngle = 52
    ds.ScanningSequence = "EP"
    ds.SequenceVariant = "SK"
    ds.MRAcquisitionType = "2D"
    ds.PatientPosition = "HFS"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope = _decimal(header.rescale_slope)
    ds.RescaleIntercept = _decimal(header.rescale_intercept)
    return ds


def _plane_tags(ds: Dataset, geometry: StackGeometry) -> None:
    ds.ImageOrientationPatient = [_decimal(v) for v in (*geometry.row_cosine, *geometry.column_cosine)]
    ds.PixelSpacing = [_decimal(geometry.row_spacing_mm), _decimal(geometry.column_spacing_mm)]
    step_mm = float(np.linalg.norm(geometry.slice_step))
    ds.SliceThickness = _decimal(step_mm)
    ds.SpacingBetweenSlices = _decimal(step_mm)


def _to_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _slice_normal(geometry: StackGeometry) -> np.ndarray:
    step = np.asarray(geometry.slice_step, float)
    return step / np.linalg.norm(step)


def encode_mosaic(volume: np.ndarray, header: SeriesHeader, instance_number: int, acquisition_time_s: float) -> bytes:
    """One volume (uint16, rtdecode voxel order) as a Siemens mosaic file."""
    geometry = header.geometry
    frames = volume_to_frames(volume)  # (n_slices, n_rows, n_columns)
    n_slices, n_rows, n_columns = frames.shape
    tiles = math.ceil(math.sqrt(n_slices))
    grid = np.zeros((tiles * tiles, n_rows, n_columns), dtype=np.uint16)
    grid[:n_slices] = frames
    mosaic = (
        grid.reshape(tiles, tiles, n_rows, n_columns).transpose(0, 2, 1, 3).reshape(tiles * n_rows, tiles * n_columns)
    )

    ds = _base_dataset(header, MR_IMAGE_STORAGE, instance_number, acquisition_time_s)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"]
    _plane_tags(ds, geometry)
    ds.ImagePositionPatient = [_decimal(v) for v in mosaic_position(geometry, *mosaic.shape)]
    ds.Rows, ds.Columns = mosaic.shape
    ds.AcquisitionMatrix = [n_columns, 0, 0, n_rows]
    times_ms = [t * 1000 for t in header.slice_times_s]
    normal = _slice_normal(geometry)
    siemens_mr = ds.private_block(0x0019, "SIEMENS MR HEADER", create=True)
    siemens_mr.add_new(0x0A, "US", n_slices)
    siemens_mr.add_new(0x29, "FD", times_ms)
    csa = ds.private_block(0x0029, "SIEMENS CSA HEADER", create=True)
    csa_image = encode_csa2(
        {
            "NumberOfImagesInMosaic": ("US", [n_slices]),
            "SliceNormalVector": ("FD", [float(v) for v in normal]),
            "MosaicRefAcqTimes": ("FD", [float(t) for t in times_ms]),
            "AcquisitionMatrixText": ("SH", [f"{n_rows}p*{n_columns}"]),
        }
    )
    csa.add_new(0x08, "CS", "IMAGE NUM 4")
    csa.add_new(0x10, "OB", csa_image)
    ds.PixelData = mosaic.astype("<u2").tobytes()
    return _to_bytes(ds)


def _frame_datetime(header: SeriesHeader, seconds_of_day: float) -> str:
    return header.date.strftime("%Y%m%d") + dicom_time(seconds_of_day)


def encode_enhanced(volume: np.ndarray, header: SeriesHeader, instance_number: int, acquisition_time_s: float) -> bytes:
    """One volume (uint16, rtdecode voxel order) as an Enhanced MR multi-frame file (Siemens XA style)."""
    geometry = header.geometry
    frames = volume_to_frames(volume)
    n_slices, n_rows, n_columns = frames.shape
    ds = _base_dataset(header, ENHANCED_MR_IMAGE_STORAGE, instance_number, acquisition_time_s)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.AcquisitionDateTime = _frame_datetime(header, acquisition_time_s)
    ds.NumberOfFrames = n_slices
    ds.Rows, ds.Columns = n_rows, n_columns
    for name in ("RepetitionTime", "EchoTime", "FlipAngle", "RescaleSlope", "RescaleIntercept"):
        delattr(ds, name)  # enhanced objects keep these in functional groups

    shared = Dataset()
    measures = Dataset()
    _plane_tags(measures, geometry)
    shared.PixelMeasuresSequence = Sequence([_only(measures, "PixelSpacing", "SliceThickness", "SpacingBetweenSlices")])
    orientation = Dataset()
    orientation.ImageOrientationPatient = measures.ImageOrientationPatient
    shared.PlaneOrientationSequence = Sequence([orientation])
    timing = Dataset()
    timing.RepetitionTime = header.tr_s * 1000
    timing.FlipAngle = 52
    shared.MRTimingAndRelatedParametersSequence = Sequence([timing])
    echo = Dataset()
    echo.EffectiveEchoTime = header.echo_time_ms
    shared.MREchoSequence = Sequence([echo])
    transform = Dataset()
    transform.RescaleSlope = _decimal(header.rescale_slope)
    transform.RescaleIntercept = _decimal(header.rescale_intercept)
    transform.RescaleType = "US"
    shared.PixelValueTransformationSequence = Sequence([transform])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])

    first = np.asarray(geometry.first_position)
    step = np.asarray(geometry.slice_step)
    per_frame = []
    for k in range(n_slices):
        frame = Dataset()
        content = Dataset()
        content.FrameAcquisitionDateTime = _frame_datetime(header, acquisition_time_s + header.slice_times_s[k])
        content.FrameReferenceDateTime = content.FrameAcquisitionDateTime
        content.StackID = "1"
        content.InStackPositionNumber = k + 1
        content.TemporalPositionIndex = 1
        content.DimensionIndexValues = [1, k + 1]
        frame.FrameContentSequence = Sequence([content])
        position = Dataset()
        position.ImagePositionPatient = [_decimal(v) for v in first + k * step]
        frame.PlanePositionSequence = Sequence([position])
        per_frame.append(frame)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.DimensionOrganizationSequence = Sequence([_dimension_organization()])
    ds.DimensionIndexSequence = Sequence(
        [_dimension_index(0x00209056, 0x00209111), _dimension_index(0x00209057, 0x00209111)]
    )
    ds.PixelData = frames.astype("<u2").tobytes()
    return _to_bytes(ds)


def _only(ds: Dataset, *names: str) -> Dataset:
    kept = Dataset()
    for name in names:
        setattr(kept, name, getattr(ds, name))
    return kept


def _dimension_organization() -> Dataset:
    organization = Dataset()
    organization.DimensionOrganizationUID = "1.2.826.0.1.3680043.8.498.1"
    return organization


def _dimension_index(pointer: int, group_pointer: int) -> Dataset:
    index = Dataset()
    index.DimensionOrganizationUID = "1.2.826.0.1.3680043.8.498.1"
    index.DimensionIndexPointer = pointer
    index.FunctionalGroupPointer = group_pointer
    return index


def encode_classic(
    volume: np.ndarray, header: SeriesHeader, volume_number: int, acquisition_time_s: float
) -> list[bytes]:
    """One volume (uint16, rtdecode voxel order) as one MR Image Storage file per slice."""
    geometry = header.geometry
    frames = volume_to_frames(volume)
    n_slices, n_rows, n_columns = frames.shape
    first = np.asarray(geometry.first_position)
    step = np.asarray(geometry.slice_step)
    normal = _slice_normal(geometry)
    files = []
    for k in range(n_slices):
        instance = (volume_number - 1) * n_slices + k + 1
        ds = _base_dataset(header, MR_IMAGE_STORAGE, instance, acquisition_time_s + header.slice_times_s[k])
        ds.AcquisitionNumber = volume_number
        ds.TemporalPositionIdentifier = volume_number
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        _plane_tags(ds, geometry)
        position = first + k * step
        ds.ImagePositionPatient = [_decimal(v) for v in position]
        ds.SliceLocation = _decimal(float(position @ normal))
        ds.ImagesInAcquisition = n_slices
        ds.Rows, ds.Columns = n_rows, n_columns
        ds.PixelData = frames[k].astype("<u2").tobytes()
        files.append(_to_bytes(ds))
    return files
