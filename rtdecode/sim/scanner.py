"""A simulated scanner: writes a run into a folder the way a scanner's real-time export does.

Files appear at TR pace (or ``speed`` times faster), each written in chunks through one open file
handle, so a reader can see a partial file; faults from :mod:`rtdecode.sim.faults` are injected as
planned. Layouts:

* ``mosaic``, ``enhanced``, ``classic``: DICOM (see :mod:`rtdecode.sim.dicom_writer`), named like a
  Siemens real-time export, ``001_<series:06>_<volume:06>.dcm`` (classic adds ``_<slice:03>``);
* ``nifti``, ``nifti-gz``: one 3D file per volume, ``vol_<series:03>_<volume:06>.nii[.gz]``;
* ``nifti-4d``, ``nifti-4d-gz``: one 4D file per run that grows, ``run_<series:03>.nii[.gz]``.

For DICOM, slices are stacked along the DICOM normal (row x column cosine) as a scanner stacks
them, so a source whose slice axis runs the other way is written with its slices reversed.
"""

import dataclasses
import datetime
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

from rtdecode.dicom_geometry import geometry_from_affine, stacks_along_normal
from rtdecode.sim import LAYOUTS, dicom_writer, nifti_writer
from rtdecode.sim.faults import GROWING_FILE_FAULTS, Fault, PlannedWrite, plan_writes
from rtdecode.sim.sources import rescale_for, to_uint16

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class WriteRecord:
    """What was written: the plan entry, the files, and when the last one was closed (monotonic s)."""

    write: PlannedWrite
    paths: tuple[Path, ...]
    closed_s: float


def interleaved_slice_times(n_slices: int, tr_s: float) -> tuple[float, ...]:
    """Interleaved acquisition: even slices first, then odd ones, spread evenly over the TR."""
    order = list(range(0, n_slices, 2)) + list(range(1, n_slices, 2))
    times = [0.0] * n_slices
    for rank, index in enumerate(order):
        times[index] = rank * tr_s / n_slices
    return tuple(times)


class SimulatedScanner:
    """Writes ``source`` into ``out_dir``.

    Parameters
    ----------
    source : NiftiRun or SyntheticRun
        Gives ``shape``, ``affine``, ``n_volumes`` and ``volume(i)``.
    layout : str
        One of :data:`LAYOUTS`.
    tr_s : float
        Repetition time written to the headers; writes are ``tr_s / speed`` apart.
    speed : float
        How much faster than real time to write.
    faults : list of Fault
    jitter_s : float
        Random shift of each write, scanner seconds.
    chunks : int
        Pieces each file is written in.
    chunk_pause_s : float
        Pause between pieces of a normal write (a slow write spreads its pieces over its duration).
    patient : (name, id)
        DICOM PatientName and PatientID to write (tests check that none of it leaves the scanner side).
    """

    def __init__(
        self,
        out_dir: Path,
        source,
        layout: str = "mosaic",
        tr_s: float = 1.6,
        speed: float = 1.0,
        faults: list[Fault] = (),
        jitter_s: float = 0.0,
        chunks: int = 4,
        chunk_pause_s: float = 0.001,
        first_series: int = 1,
        n_volumes: int | None = None,
        seed: int = 0,
        patient: tuple[str, str] = (dicom_writer.SIMULATED_PATIENT, dicom_writer.SIMULATED_PATIENT),
    ) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
        if not tr_s > 0 or not speed > 0 or chunks < 1:
            raise ValueError(f"tr_s and speed must be positive and chunks >= 1; got {tr_s}, {speed}, {chunks}")
        self.out_dir = Path(out_dir)
        self.source = source
        self.layout = layout
        self.tr_s = tr_s
        self.speed = speed
        self.chunks = chunks
        self.chunk_pause_s = chunk_pause_s
        self.patient = patient
        n_volumes = source.n_volumes if n_volumes is None else n_volumes
        if layout.startswith("nifti-4d"):
            unsupported = [f for f in faults if f.kind not in GROWING_FILE_FAULTS]
            if unsupported:
                raise ValueError(
                    f"layout {layout}: only {', '.join(GROWING_FILE_FAULTS)} faults apply to a growing file; "
                    f"got {unsupported[0].kind}"
                )
        self.plan = plan_writes(n_volumes, tr_s, list(faults), first_series, jitter_s, seed)
        self._n_per_series = {}
        for write in self.plan:
            self._n_per_series[write.series_number] = max(
                self._n_per_series.get(write.series_number, 0), write.volume_number
            )
        self._flip_slices = layout in ("mosaic", "enhanced", "classic") and not stacks_along_normal(source.affine)
        self._affine = self._scanner_affine(source.affine, source.shape)
        self._rescale = rescale_for(source.volume(0))
        self._study_uid = generate_uid()
        self._series: dict[int, dicom_writer.SeriesHeader] = {}
        self._growing: dict[int, nifti_writer.GrowingNifti] = {}
        now = datetime.datetime.now()
        self._day_start_s = now.hour * 3600 + now.minute * 60 + now.second + now.microsecond / 1e6
        self._rng = np.random.default_rng(seed)

    def _scanner_affine(self, affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
        if not self._flip_slices:
            return np.asarray(affine, float)
        flipped = np.asarray(affine, float).copy()
        flipped[:3, 3] += flipped[:3, 2] * (shape[2] - 1)
        flipped[:3, 2] *= -1
        return flipped

    def scanner_volume(self, source_index: int) -> np.ndarray:
        """The source volume as the scanner writes it (slices reversed if needed), float32."""
        volume = self.source.volume(source_index)
        return volume[:, :, ::-1] if self._flip_slices else volume

    @property
    def affine(self) -> np.ndarray:
        """The affine of the volumes as written (equal to the source's unless slices were reversed)."""
        return self._affine

    def run(
        self,
        stop: threading.Event | None = None,
        on_write: Callable[[WriteRecord], None] | None = None,
    ) -> list[WriteRecord]:
        """Write the whole plan at pace; return what was written. ``stop`` ends it early."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stop = stop or threading.Event()
        start_s = time.monotonic()
        records = []
        for write in self.plan:
            payloads = self._encode(write)
            due_s = start_s + max(write.at_s, 0.0) / self.speed
            if stop.wait(max(0.0, due_s - time.monotonic())):
                break
            record = self._write(write, payloads)
            records.append(record)
            if on_write is not None:
                on_write(record)
        return records

    # -- encoding -------------------------------------------------------------------------------

    def _series_header(self, series_number: int) -> dicom_writer.SeriesHeader:
        if series_number not in self._series:
            shape = self.source.shape
            self._series[series_number] = dicom_writer.new_series_header(
                series_number,
                geometry_from_affine(self._affine, shape),
                self.tr_s,
                interleaved_slice_times(shape[2], self.tr_s),
                self._study_uid,
                self._rescale,
                self.patient,
            )
        return self._series[series_number]

    def _encode(self, write: PlannedWrite) -> list[tuple[Path, bytes]]:
        acquired = self._day_start_s + write.acquired_s
        stored = to_uint16(self.scanner_volume(write.source_index), *self._rescale)
        suffix = f"_copy{write.copy}" if write.copy else ""
        name = f"001_{write.series_number:06d}_{write.volume_number:06d}{suffix}"
        if self.layout == "mosaic":
            header = self._series_header(write.series_number)
            return [
                (
                    self.out_dir / f"{name}.dcm",
                    dicom_writer.encode_mosaic(stored, header, write.volume_number, acquired),
                )
            ]
        if self.layout == "enhanced":
            header = self._series_header(write.series_number)
            return [
                (
                    self.out_dir / f"{name}.dcm",
                    dicom_writer.encode_enhanced(stored, header, write.volume_number, acquired),
                )
            ]
        if self.layout == "classic":
            header = self._series_header(write.series_number)
            files = dicom_writer.encode_classic(stored, header, write.volume_number, acquired)
            return [(self.out_dir / f"{name}_{k:03d}.dcm", data) for k, data in enumerate(files)]
        if self.layout in ("nifti", "nifti-gz"):
            extension = ".nii.gz" if self.layout == "nifti-gz" else ".nii"
            data = nifti_writer.encode_nifti_volume(
                stored,
                self._affine,
                self.tr_s,
                write.series_number,
                write.volume_number,
                acquired,
                self._rescale,
                compress=self.layout == "nifti-gz",
            )
            return [
                (self.out_dir / f"vol_{write.series_number:03d}_{write.volume_number:06d}{suffix}{extension}", data)
            ]
        return [self._encode_growing(write, stored, acquired)]

    def _encode_growing(self, write: PlannedWrite, stored: np.ndarray, acquired_s: float) -> tuple[Path, bytes]:
        compress = self.layout == "nifti-4d-gz"
        path = self.out_dir / f"run_{write.series_number:03d}.nii{'.gz' if compress else ''}"
        n_volumes = self._n_per_series[write.series_number]
        data = b""
        if write.series_number not in self._growing:
            self._growing[write.series_number] = nifti_writer.GrowingNifti(compress)
            data = self._growing[write.series_number].start(
                self._affine, self.source.shape, n_volumes, self.tr_s, write.series_number, acquired_s, self._rescale
            )
        data += self._growing[write.series_number].append(stored, last=write.volume_number == n_volumes)
        return path, data

    # -- writing --------------------------------------------------------------------------------

    def _write(self, write: PlannedWrite, payloads: list[tuple[Path, bytes]]) -> WriteRecord:
        appending = self.layout.startswith("nifti-4d")
        for number, (path, data) in enumerate(payloads):
            last = number == len(payloads) - 1
            mode = write.mode if last else "normal"
            if mode == "corrupt":
                data = self._corrupt(path, data)
            if mode == "truncate":
                data = data[: int(len(data) * write.amount)]
            if mode == "slow":
                self._write_slowly(path, data, write.amount * self.tr_s / self.speed, appending)
            else:
                self._write_chunks(path, data, appending)
        log.debug("wrote %s (%s)", payloads[-1][0].name, write.mode)
        return WriteRecord(write, tuple(p for p, _ in payloads), time.monotonic())

    def _pieces(self, data: bytes) -> list[bytes]:
        size = -(-len(data) // self.chunks)
        return [data[i : i + size] for i in range(0, len(data), size)] or [b""]

    def _write_chunks(self, path: Path, data: bytes, appending: bool) -> None:
        with open(path, "ab" if appending else "wb") as handle:
            for number, piece in enumerate(self._pieces(data)):
                if number and self.chunk_pause_s:
                    handle.flush()
                    time.sleep(self.chunk_pause_s)
                handle.write(piece)

    def _write_slowly(self, path: Path, data: bytes, duration_s: float, appending: bool) -> None:
        """Each piece in its own open/close, so a close-write event fires on every partial state."""
        pieces = self._pieces(data)
        for number, piece in enumerate(pieces):
            with open(path, "ab" if appending or number else "wb") as handle:
                handle.write(piece)
            if number < len(pieces) - 1:
                time.sleep(duration_s / len(pieces))

    def _corrupt(self, path: Path, data: bytes) -> bytes:
        noise = self._rng.integers(0, 256, size=len(data), dtype=np.uint8).tobytes()
        if path.suffix == ".dcm":
            return data[:132] + noise[132:]  # keeps the DICM marker: looks like DICOM, is not
        return noise
