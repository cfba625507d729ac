"""What every training data source gives the trainer: subjects' betas, their trials, and one image store.

Three sources fill these records: the published MindEye2/NSD files (:mod:`trainer.data.nsd`), session
bundles written by calibration (:mod:`trainer.data.sessions`) and the synthetic world
(:mod:`trainer.data.synthetic`, which writes session bundles first). The loop never knows which.

Conventions (spec §3.2):

* Betas are z-scored per session and voxel, in the subject's mask order (C-order flattening).
* Train trials are single rows. A test image's trials are grouped: ``test_rows`` is (n_test_images, 3),
  each image's repetitions, padded cyclically to three as the public code does (2 trials -> a, b, a).
  Validation runs the model on each repetition and averages the outputs, not the betas.
* Images are float32 in [0, 1], (n, 3, H, W), indexed by a source-wide image index.
"""

import dataclasses
import logging
from typing import Protocol

import numpy as np

from rtdecode.errors import TrainDataError

TEST_REPS = 3

log = logging.getLogger(__name__)


class ImageStore(Protocol):
    """The stimulus images of a source, by index."""

    @property
    def n_images(self) -> int: ...

    @property
    def identity(self) -> str:
        """A string that changes when the images do (a target cache is keyed on it)."""
        ...

    def read(self, indices: np.ndarray) -> np.ndarray:
        """Images ``indices`` (any order, repeats allowed): float32 (len, 3, H, W) in [0, 1]."""
        ...


@dataclasses.dataclass(frozen=True)
class SubjectData:
    """One subject's betas and which image each trial showed.

    ``betas`` is (n_rows, n_voxels); ``train_rows``/``train_images`` are aligned int64 vectors;
    ``test_rows`` is (n_test_images, 3) rows of ``betas`` and ``test_images`` (n_test_images,).
    """

    name: str
    betas: np.ndarray
    train_rows: np.ndarray
    train_images: np.ndarray
    test_rows: np.ndarray
    test_images: np.ndarray
    origin: str  # where the data came from, for messages ("betas_all_subj01_fp32_renorm.hdf5")

    @property
    def n_voxels(self) -> int:
        return int(self.betas.shape[1])

    @property
    def n_train(self) -> int:
        return int(self.train_rows.size)

    @property
    def n_test_images(self) -> int:
        return int(self.test_images.size)


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Subjects (in ridge-layer order) and the image store their trials index."""

    subjects: tuple[SubjectData, ...]
    images: ImageStore
    description: str

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.subjects)

    @property
    def n_voxels(self) -> tuple[int, ...]:
        return tuple(s.n_voxels for s in self.subjects)


def group_test_trials(rows: np.ndarray, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group test trials by image: (n_images, 3) rows, padded cyclically, and the sorted unique images."""
    unique = np.unique(images)
    grouped = [np.resize(rows[images == image], TEST_REPS) for image in unique]
    if not grouped:
        return np.zeros((0, TEST_REPS), dtype=np.int64), unique.astype(np.int64)
    return np.stack(grouped).astype(np.int64), unique.astype(np.int64)


def without_test_images(subjects: tuple[SubjectData, ...]) -> tuple[SubjectData, ...]:
    """Drop train trials showing any subject's test image: the shared backbone and prior must not learn the
    target of an image another subject is validated on (NSD keeps shared1000 out of every train split)."""
    held_out = np.unique(np.concatenate([s.test_images for s in subjects])) if subjects else np.zeros(0, np.int64)
    kept = []
    for subject in subjects:
        keep = ~np.isin(subject.train_images, held_out)
        if not keep.all():
            log.info("%s: %d train trial(s) show a test image; left out of training", subject.name, (~keep).sum())
        kept.append(
            dataclasses.replace(subject, train_rows=subject.train_rows[keep], train_images=subject.train_images[keep])
        )
    return tuple(kept)


def checked_image_indices(
    indices: np.ndarray, n_images: int, where: str, shape_error: type[Exception] = TrainDataError
) -> np.ndarray:
    """``indices`` as int64, or an error naming ``where``: a 1-D integer array (else ``shape_error``) inside
    ``[0, n_images)`` (else TrainDataError). Shared by the image stores and the target caches."""
    indices = np.asarray(indices)
    if indices.ndim != 1 or not (indices.size == 0 or np.issubdtype(indices.dtype, np.integer)):
        raise shape_error(f"{where}: indices must be a 1-D integer array, got {indices.dtype} {indices.shape}")
    if indices.size and (indices.min() < 0 or indices.max() >= n_images):
        raise TrainDataError(
            f"{where}: image indices must lie in [0, {n_images}), got {indices.min()}..{indices.max()}"
        )
    return indices.astype(np.int64)


def check_dataset(dataset: Dataset, *, min_test_images: int = 2) -> None:
    """Refuse data that would fail later: empty splits, rows out of range, images out of range, bad betas.

    Called before training starts, so a bad file is reported in seconds, not after an epoch.
    """
    if not dataset.subjects:
        raise TrainDataError(f"{dataset.description}: no subjects")
    seen = set()
    for subject in dataset.subjects:
        if subject.name in seen:
            raise TrainDataError(f"{dataset.description}: subject {subject.name!r} appears twice")
        seen.add(subject.name)
        _check_subject(subject, dataset.images.n_images, min_test_images)


def _check_subject(subject: SubjectData, n_images: int, min_test_images: int) -> None:
    where = f"subject {subject.name!r} ({subject.origin})"
    if subject.betas.ndim != 2 or subject.betas.shape[1] < 1:
        raise TrainDataError(f"{where}: betas must be (n_trials, n_voxels), got {subject.betas.shape}")
    if subject.n_train == 0:
        raise TrainDataError(f"{where}: the train split is empty")
    if subject.n_test_images < min_test_images:
        raise TrainDataError(
            f"{where}: the test split has {subject.n_test_images} image(s); validation needs at least {min_test_images}"
        )
    if subject.train_rows.shape != subject.train_images.shape:
        raise TrainDataError(f"{where}: train_rows and train_images differ in length")
    if subject.test_rows.shape != (subject.n_test_images, TEST_REPS):
        raise TrainDataError(f"{where}: test_rows must be ({subject.n_test_images}, {TEST_REPS})")
    n_rows = subject.betas.shape[0]
    for name, rows in (("train", subject.train_rows), ("test", subject.test_rows)):
        if rows.size and (rows.min() < 0 or rows.max() >= n_rows):
            raise TrainDataError(
                f"{where}: {name} trial rows must lie in [0, {n_rows}), got {rows.min()}..{rows.max()}"
            )
    for name, images in (("train", subject.train_images), ("test", subject.test_images)):
        if images.size and (images.min() < 0 or images.max() >= n_images):
            raise TrainDataError(
                f"{where}: {name} image indices must lie in [0, {n_images}) (the image store), "
                f"got {images.min()}..{images.max()}"
            )
