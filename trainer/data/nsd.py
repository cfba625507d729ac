"""The published MindEye2/NSD files (HF dataset ``pscotti/mindeyev2``) as a training :class:`Dataset`.

Layout under one local folder (spec §2.2); nothing is downloaded here:

* ``betas_all_subj0{N}_fp32_renorm.hdf5``: dataset ``betas``, (n_sessions * 750, n_voxels) float32, z-scored
  per session and voxel.
* ``coco_images_224_float16.hdf5``: dataset ``images``, (73000, 3, 224, 224) float16 in [0, 1].
* ``wds/subj0{N}/train/{0..n_sessions-1}.tar``, ``wds/subj0{N}/new_test/0.tar`` (default test split) and
  ``wds/subj0{N}/test/0.tar`` (the old split): webdataset tars. Each sample is a group of members sharing a
  key; only ``<key>.behav.npy`` (1, 17) is read: column 0 is the COCO-73k image index, column 5 the row of
  the betas file, -1 means NaN (spec §3.2).

Every problem is reported as :class:`TrainDataError` before any training, naming the file and the fix; the
tars are read before the (large) betas so that a broken download fails in seconds.
"""

import dataclasses
import io
import logging
import re
import tarfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import h5py
import numpy as np

from rtdecode.errors import TrainDataError, TrainError
from trainer.data.source import (
    Dataset,
    SubjectData,
    check_dataset,
    checked_image_indices,
    group_test_trials,
    without_test_images,
)

log = logging.getLogger(__name__)

NSD_SUBJECTS = tuple(f"subj0{number}" for number in range(1, 9))
HF_DATASET = "pscotti/mindeyev2"
BETAS_KEY = "betas"
IMAGES_KEY = "images"
IMAGES_FILE = "coco_images_224_float16.hdf5"
TEST_SPLITS = ("new_test", "test")
BEHAV_EXTENSION = "behav.npy"
BEHAV_N_COLUMNS = 17
BEHAV_IMAGE_COLUMN = 0
BEHAV_ROW_COLUMN = 5
BETAS_READ_BLOCK_ROWS = 750  # one session per read: bounds the float32 staging buffer (about 47 MB for subj01)
_TAR_NAME = re.compile(r"^(\d+)\.tar$")


def betas_file_name(subject: str) -> str:
    """The published betas file of ``subject`` (spec §2.2)."""
    return f"betas_all_{subject}_fp32_renorm.hdf5"


class CocoImages:
    """The COCO-73k stimulus images of ``coco_images_224_float16.hdf5``, read on demand as float32.

    The file is opened per :meth:`read` rather than held open: no handle survives a fork into data-loader
    workers, and the cost (well under a millisecond) is small next to reading the images.
    """

    def __init__(self, path: Path) -> None:
        self._path = Path(path)
        if not self._path.is_file():
            raise TrainDataError(
                f"images file {self._path} does not exist: download {IMAGES_FILE} from the Hugging Face dataset "
                f"{HF_DATASET} into that folder (nothing is downloaded automatically)"
            )
        with _open_hdf5(self._path, "images") as file:
            dataset = _hdf5_dataset(file, IMAGES_KEY, self._path)
            self._shape = tuple(int(n) for n in dataset.shape)
        if len(self._shape) != 4 or self._shape[1] != 3:
            raise TrainDataError(
                f"images file {self._path}: dataset {IMAGES_KEY!r} must be (n_images, 3, H, W), got {self._shape}"
            )
        stat = self._path.stat()
        self._identity = f"{self._path.resolve()}|shape={self._shape}|bytes={stat.st_size}|mtime_ns={stat.st_mtime_ns}"

    @property
    def path(self) -> Path:
        return self._path

    @property
    def n_images(self) -> int:
        return self._shape[0]

    @property
    def size_px(self) -> tuple[int, int]:
        """(H, W) of every image."""
        return self._shape[2], self._shape[3]

    @property
    def identity(self) -> str:
        """Path, shape, size and modification time: changes when the file is replaced or rewritten."""
        return self._identity

    def read(self, indices: np.ndarray) -> np.ndarray:
        """Images ``indices`` (any order, repeats allowed) as float32 (len, 3, H, W) in [0, 1].

        h5py fancy indexing needs strictly increasing indices (the public code skips batches with repeated
        COCO ids for this reason, spec §3.2); here the sorted unique images are read and then expanded
        back to the requested order.
        """
        indices = self._checked_indices(indices)
        if indices.size == 0:
            return np.zeros((0, *self._shape[1:]), dtype=np.float32)
        unique, inverse = np.unique(indices, return_inverse=True)
        with _open_hdf5(self._path, "images") as file:
            images = _hdf5_dataset(file, IMAGES_KEY, self._path)[unique]
        return images[inverse.reshape(-1)].astype(np.float32)

    def _checked_indices(self, indices: np.ndarray) -> np.ndarray:
        return checked_image_indices(indices, self.n_images, f"images file {self._path}")


@dataclasses.dataclass(frozen=True)
class _SubjectFiles:
    """Where one subject's files are, and the betas shape (read from the header only)."""

    name: str
    betas_path: Path
    train_tars: tuple[Path, ...]
    test_tar: Path
    n_rows: int
    n_voxels: int


@dataclasses.dataclass(frozen=True)
class _Trials:
    """One subject's trials: train trials minus those of test images, and the grouped test trials."""

    train_rows: np.ndarray
    train_images: np.ndarray
    test_rows: np.ndarray
    test_images: np.ndarray


def load_nsd(
    root: Path, subjects: Sequence[str], *, n_sessions: int | None = None, test_split: str = "new_test"
) -> Dataset:
    """The published files of ``subjects`` (in this order: the ridge-layer order) under ``root``.

    ``n_sessions`` uses the first n train tars of each subject (None: all of them); ``test_split`` is
    ``"new_test"`` (the MindEye2 default) or ``"test"`` (the old split). Train trials that show one of the
    subject's test images are dropped here, and then those of any subject's test split, so no test image is
    trained on. Betas are held in memory as float16,
    as the public code does (spec §3.2).
    """
    root = Path(root)
    _check_settings(root, subjects, n_sessions, test_split)
    images = CocoImages(root / IMAGES_FILE)
    files = [_locate_subject(root, name, n_sessions, test_split) for name in subjects]
    trials = [_read_trials(subject_files, images) for subject_files in files]
    subject_data = tuple(
        SubjectData(
            name=subject_files.name,
            betas=_read_betas(subject_files.betas_path, subject_files.n_rows, subject_files.n_voxels),
            train_rows=subject_trials.train_rows,
            train_images=subject_trials.train_images,
            test_rows=subject_trials.test_rows,
            test_images=subject_trials.test_images,
            origin=subject_files.betas_path.name,
        )
        for subject_files, subject_trials in zip(files, trials, strict=True)
    )
    dataset = Dataset(
        subjects=without_test_images(subject_data),
        images=images,
        description=f"NSD published files in {root} ({', '.join(subjects)})",
    )
    check_dataset(dataset)
    return dataset


def _check_settings(root: Path, subjects: Sequence[str], n_sessions: int | None, test_split: str) -> None:
    if test_split not in TEST_SPLITS:
        raise TrainError(f"test_split must be one of {TEST_SPLITS}, got {test_split!r}")
    if n_sessions is not None and n_sessions < 1:
        raise TrainError(f"n_sessions must be at least 1 (or None for all sessions), got {n_sessions}")
    if not root.is_dir():
        raise TrainDataError(
            f"NSD folder {root} does not exist: download the published files of the Hugging Face dataset "
            f"{HF_DATASET} there (nothing is downloaded automatically)"
        )
    if isinstance(subjects, str) or not subjects:
        raise TrainDataError(f"NSD subjects must be a non-empty list of names from {NSD_SUBJECTS}, got {subjects!r}")
    for name in subjects:
        if name not in NSD_SUBJECTS:
            raise TrainDataError(f"unknown NSD subject {name!r}: the published subjects are {', '.join(NSD_SUBJECTS)}")
    repeated = sorted({name for name in subjects if list(subjects).count(name) > 1})
    if repeated:
        raise TrainDataError(f"NSD subjects must be distinct, {', '.join(repeated)} appear(s) more than once")


def _locate_subject(root: Path, name: str, n_sessions: int | None, test_split: str) -> _SubjectFiles:
    """Find a subject's files and read the betas shape, without reading any data."""
    betas_path = root / betas_file_name(name)
    if not betas_path.is_file():
        raise TrainDataError(
            f"subject {name!r}: betas file {betas_path} does not exist: download {betas_path.name} from the "
            f"Hugging Face dataset {HF_DATASET} into {root} (nothing is downloaded automatically)"
        )
    with _open_hdf5(betas_path, "betas") as file:
        shape = tuple(int(n) for n in _hdf5_dataset(file, BETAS_KEY, betas_path).shape)
    if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
        raise TrainDataError(
            f"betas file {betas_path}: dataset {BETAS_KEY!r} must be 2-D (n_trials, n_voxels), got shape {shape}: "
            f"replace it with {betas_path.name} from {HF_DATASET}"
        )
    test_tar = root / "wds" / name / test_split / "0.tar"
    if not test_tar.is_file():
        raise TrainDataError(
            f"subject {name!r}: test split {test_tar} does not exist: download wds/{name}/{test_split}/0.tar "
            f"from {HF_DATASET}"
        )
    train_tars = _train_tars(root / "wds" / name / "train", name, n_sessions)
    return _SubjectFiles(name, betas_path, train_tars, test_tar, n_rows=shape[0], n_voxels=shape[1])


def _train_tars(folder: Path, name: str, n_sessions: int | None) -> tuple[Path, ...]:
    """The first ``n_sessions`` train tars ``0.tar, 1.tar, ...`` (numeric order); a gap is a missing file."""
    numbered = sorted(
        (int(match.group(1)), path)
        for path in (folder.iterdir() if folder.is_dir() else ())
        if (match := _TAR_NAME.match(path.name)) and path.is_file()
    )
    fix = f"download wds/{name}/train/*.tar from {HF_DATASET}"
    if not numbered:
        raise TrainDataError(f"subject {name!r}: no train tars (0.tar, 1.tar, ...) in {folder}: {fix}")
    if n_sessions is not None and len(numbered) < n_sessions:
        raise TrainDataError(
            f"subject {name!r}: {n_sessions} session(s) asked but {folder} has {len(numbered)} train tar(s): "
            f"ask for at most {len(numbered)} or {fix}"
        )
    chosen = numbered[: len(numbered) if n_sessions is None else n_sessions]
    for expected, (number, _) in enumerate(chosen):
        if number != expected:
            raise TrainDataError(
                f"subject {name!r}: train tar {folder / f'{expected}.tar'} is missing (found "
                f"{', '.join(f'{n}.tar' for n, _ in chosen)}): {fix}"
            )
    return tuple(path for _, path in chosen)


def _read_trials(files: _SubjectFiles, images: CocoImages) -> _Trials:
    """Train and test trials of one subject, checked against the betas rows and the images file."""
    train = [_checked_tar_trials(path, files, images) for path in files.train_tars]
    train_rows = np.concatenate([rows for rows, _ in train])
    train_images = np.concatenate([image_indices for _, image_indices in train])
    test_rows, test_image_trials = _checked_tar_trials(files.test_tar, files, images)
    if test_rows.size == 0:
        raise TrainDataError(
            f"subject {files.name!r}: test split {files.test_tar} has no samples: re-download it from {HF_DATASET}"
        )
    grouped_rows, test_images = group_test_trials(test_rows, test_image_trials)
    keep = ~np.isin(train_images, test_images)
    n_dropped = int(keep.size - keep.sum())
    log.info(
        "%s: %d train trials from %d tar(s), %d test images (%d trials); dropped %d train trials of test images",
        files.name,
        int(keep.sum()),
        len(files.train_tars),
        test_images.size,
        test_rows.size,
        n_dropped,
    )
    return _Trials(train_rows[keep], train_images[keep], grouped_rows, test_images)


def _checked_tar_trials(path: Path, files: _SubjectFiles, images: CocoImages) -> tuple[np.ndarray, np.ndarray]:
    """(rows, images) of one tar, each checked to lie inside the betas file and the images file."""
    keys, rows, image_indices = _read_behav_tar(path)
    outside_rows = np.flatnonzero(rows >= files.n_rows)
    if outside_rows.size:
        index = outside_rows[0]
        raise TrainDataError(
            f"{path}: sample {keys[index]!r} has betas row {rows[index]} (behav column {BEHAV_ROW_COLUMN}) but "
            f"{files.betas_path.name} has {files.n_rows} rows ({outside_rows.size} sample(s) outside): the tar and "
            f"the betas file do not belong together (mismatched rows/voxel counts); re-download both from {HF_DATASET}"
        )
    outside_images = np.flatnonzero(image_indices >= images.n_images)
    if outside_images.size:
        index = outside_images[0]
        raise TrainDataError(
            f"{path}: sample {keys[index]!r} shows image {image_indices[index]} (behav column {BEHAV_IMAGE_COLUMN}) "
            f"but {images.path} has {images.n_images} images: use the full {IMAGES_FILE} from {HF_DATASET}"
        )
    return rows, image_indices


def _read_behav_tar(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Sample keys, betas rows and image indices of every ``behav.npy`` member, in tar order.

    Members are streamed; the other members of a sample (past_behav, future_behav, olds_behav) are skipped
    without being read. The key is the member's name up to the first dot of its base name (webdataset's rule).
    """
    keys: list[str] = []
    columns: list[np.ndarray] = []
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                key, _, extension = PurePosixPath(member.name).name.partition(".")
                if member.isfile() and extension == BEHAV_EXTENSION:
                    keys.append(key)
                    columns.append(_behav_columns(tar, member, path))
    except (tarfile.TarError, OSError, EOFError) as error:
        raise TrainDataError(f"{path}: not a readable tar file ({error}): re-download it from {HF_DATASET}") from error
    values = np.stack(columns) if columns else np.zeros((0, 2))
    _check_behav_indices(path, keys, values)
    return keys, values[:, 1].astype(np.int64), values[:, 0].astype(np.int64)


def _behav_columns(tar: tarfile.TarFile, member: tarfile.TarInfo, path: Path) -> np.ndarray:
    """(image index, betas row) of one behav member, as floats (checked by :func:`_check_behav_indices`)."""
    stream = tar.extractfile(member)
    try:
        behav = np.load(io.BytesIO(stream.read()), allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise TrainDataError(
            f"{path}: member {member.name!r} is not a readable .npy array ({error}): re-download the tar from "
            f"{HF_DATASET}"
        ) from error
    if behav.size != BEHAV_N_COLUMNS or not np.issubdtype(behav.dtype, np.number):
        raise TrainDataError(
            f"{path}: member {member.name!r} must hold {BEHAV_N_COLUMNS} numbers (1, {BEHAV_N_COLUMNS}), "
            f"got {behav.dtype} {behav.shape}: re-download the tar from {HF_DATASET}"
        )
    return behav.reshape(-1)[[BEHAV_IMAGE_COLUMN, BEHAV_ROW_COLUMN]].astype(np.float64)


def _check_behav_indices(path: Path, keys: list[str], values: np.ndarray) -> None:
    """Image index and betas row must be whole numbers >= 0 (-1 is the published NaN, spec §3.2)."""
    bad = np.flatnonzero(~np.all(np.isfinite(values) & (values >= 0) & (values == np.round(values)), axis=1))
    if bad.size:
        index = bad[0]
        raise TrainDataError(
            f"{path}: sample {keys[index]!r} has image index {values[index, 0]} and betas row {values[index, 1]} "
            f"(behav columns {BEHAV_IMAGE_COLUMN}, {BEHAV_ROW_COLUMN}); both must be whole numbers >= 0 "
            f"({bad.size} such sample(s)): re-download the tar from {HF_DATASET}"
        )


def _read_betas(path: Path, n_rows: int, n_voxels: int) -> np.ndarray:
    """The whole betas file as float16, read a session at a time so float32 never exists in full."""
    betas = np.empty((n_rows, n_voxels), dtype=np.float16)
    with _open_hdf5(path, "betas") as file:
        dataset = _hdf5_dataset(file, BETAS_KEY, path)
        for start in range(0, n_rows, BETAS_READ_BLOCK_ROWS):
            stop = min(start + BETAS_READ_BLOCK_ROWS, n_rows)
            betas[start:stop] = dataset[start:stop]
    log.info("%s: betas %d x %d read as float16", path.name, n_rows, n_voxels)
    return betas


def _open_hdf5(path: Path, what: str) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError as error:
        raise TrainDataError(
            f"{what} file {path}: not a readable HDF5 file ({error}): re-download {path.name} from {HF_DATASET}"
        ) from error


def _hdf5_dataset(file: h5py.File, key: str, path: Path) -> h5py.Dataset:
    dataset = file.get(key)
    if not isinstance(dataset, h5py.Dataset):
        raise TrainDataError(
            f"{path}: has no dataset {key!r} (found {sorted(file.keys())}): re-download {path.name} from {HF_DATASET}"
        )
    return dataset
