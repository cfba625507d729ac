"""What a reader makes of a file, before the run tracker places it in a run."""

import dataclasses
from pathlib import Path

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class ScannerVolume:
    """One volume as the scanner numbered it.

    ``series_key`` identifies the series uniquely (DICOM SeriesInstanceUID, or a key built from the
    NIfTI file); ``volume_number`` is the scanner's 1-based number within the series. Array layout and
    affine follow :class:`rtdecode.records.Volume`. ``sources`` are every file the volume came from.
    """

    data: np.ndarray
    affine: np.ndarray
    tr_s: float | None
    acquisition_time_s: float | None
    slice_times_s: tuple[float, ...] | None
    series_key: str
    series_number: int
    volume_number: int
    source: Path  # the file that completed the volume
    other_sources: tuple[Path, ...] = ()  # the volume's other files (single-slice DICOM)

    @property
    def sources(self) -> tuple[Path, ...]:
        return (*self.other_sources, self.source)
