"""Session bundles: one scanning session's betas, trial table and stimulus images, as training data.

Calibration writes one per session (and the synthetic world writes them too); the trainer reads any
number of them, grouped by subject. A bundle is a folder::

    session.json    format, subject, session, n_voxels, n_trials, normalisation
    betas.npy       float32 (n_trials, n_voxels): final single-trial betas, z-scored per session and voxel
    trials.tsv      row, trial_id, run, stimulus_id, split ("train" or "test"), one line per betas row
    images/         one image file per stimulus id: <stimulus_id>.png (or .jpg/.jpeg)

``session.json`` is written last, so a folder without it is an unfinished bundle and is refused.
"""

import csv
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from rtdecode.errors import TrainDataError
from trainer.data.source import Dataset, SubjectData, check_dataset, group_test_trials, without_test_images

FORMAT = "rtdecode-session"
FORMAT_VERSION = 1
MANIFEST = "session.json"
BETAS = "betas.npy"
TRIALS = "trials.tsv"
IMAGES = "images"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
TRIAL_COLUMNS = ("row", "trial_id", "run", "stimulus_id", "split")
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Trial:
    """One betas row: which trial of which run showed which stimulus, and its split."""

    trial_id: str
    run: int
    stimulus_id: str
    split: str


def write_session(
    folder: Path,
    *,
    subject: str,
    session: int,
    betas: np.ndarray,
    trials: Sequence[Trial],
    images: Mapping[str, np.ndarray | Path],
    normalisation: str = "per-session z-score",
) -> Path:
    """Write a bundle. ``images`` maps every stimulus id to an (H, W, 3) uint8 array or an image file to copy."""
    folder = Path(folder)
    if (folder / MANIFEST).exists():
        raise TrainDataError(f"{folder} already holds a session bundle; remove it first")
    betas = np.asarray(betas, dtype=np.float32)
    if betas.ndim != 2 or betas.shape[0] != len(trials):
        raise TrainDataError(f"betas must be (n_trials={len(trials)}, n_voxels), got {betas.shape}")
    missing = sorted({t.stimulus_id for t in trials} - set(images))
    if missing:
        raise TrainDataError(f"no image given for stimulus id(s) {missing[:5]} (of {len(missing)})")
    (folder / IMAGES).mkdir(parents=True, exist_ok=True)
    np.save(folder / BETAS, betas)
    _write_trials(folder / TRIALS, trials)
    for stimulus_id in sorted({t.stimulus_id for t in trials}):
        _write_image(folder / IMAGES, stimulus_id, images[stimulus_id])
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "subject": subject,
        "session": int(session),
        "n_voxels": int(betas.shape[1]),
        "n_trials": int(betas.shape[0]),
        "normalisation": normalisation,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return folder


def find_sessions(root: Path) -> list[Path]:
    """Bundle folders under ``root`` (itself, its children or grandchildren), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise TrainDataError(f"session folder {root} does not exist")
    found = [p.parent for pattern in (MANIFEST, f"*/{MANIFEST}", f"*/*/{MANIFEST}") for p in root.glob(pattern)]
    if not found:
        raise TrainDataError(f"no session bundles ({MANIFEST}) under {root}")
    return sorted(found)


def load_sessions(
    folders: Iterable[Path], *, subjects: Sequence[str] | None = None, image_size_px: int = 224
) -> Dataset:
    """Read bundles into a :class:`Dataset`: a subject's sessions are concatenated, in session order.

    ``subjects`` fixes the subject (ridge-layer) order and which subjects are used; by default every
    subject found, sorted. Images are resized to ``image_size_px`` squares when read.
    """
    bundles = [_read_bundle(Path(f)) for f in folders]
    by_subject: dict[str, list[_Bundle]] = {}
    for bundle in sorted(bundles, key=lambda b: (b.subject, b.session, str(b.folder))):
        by_subject.setdefault(bundle.subject, []).append(bundle)
    names = tuple(subjects) if subjects is not None else tuple(sorted(by_subject))
    unknown = [name for name in names if name not in by_subject]
    if unknown:
        raise TrainDataError(f"no session bundle for subject(s) {unknown}; found {sorted(by_subject)}")
    images = FolderImages.from_bundles([b for name in names for b in by_subject[name]], image_size_px)
    data = without_test_images(tuple(_subject_data(name, by_subject[name], images) for name in names))
    description = f"{sum(len(by_subject[n]) for n in names)} session bundle(s) of {', '.join(names)}"
    dataset = Dataset(data, images, description)
    check_dataset(dataset)
    return dataset


class FolderImages:
    """Stimulus images from bundle folders, by stimulus id; read as float32 (3, size, size) in [0, 1]."""

    def __init__(self, stimulus_ids: Sequence[str], files: Sequence[Path], image_size_px: int) -> None:
        self.stimulus_ids = tuple(stimulus_ids)
        self.files = tuple(files)
        self.image_size_px = image_size_px
        self.index = {stimulus: i for i, stimulus in enumerate(self.stimulus_ids)}

    @classmethod
    def from_bundles(cls, bundles: Sequence["_Bundle"], image_size_px: int) -> "FolderImages":
        files: dict[str, Path] = {}
        for bundle in bundles:
            for trial in bundle.trials:
                if trial.stimulus_id not in files:
                    files[trial.stimulus_id] = _image_file(bundle.folder, trial.stimulus_id)
        ids = sorted(files)
        return cls(ids, [files[i] for i in ids], image_size_px)

    @property
    def n_images(self) -> int:
        return len(self.files)

    @property
    def identity(self) -> str:
        digest = hashlib.sha256(f"{self.image_size_px}".encode())
        for stimulus, path in zip(self.stimulus_ids, self.files, strict=True):
            stat = path.stat()
            digest.update(f"{stimulus}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        return f"session-images:{digest.hexdigest()}"

    def read(self, indices: np.ndarray) -> np.ndarray:
        out = np.empty((len(indices), 3, self.image_size_px, self.image_size_px), dtype=np.float32)
        for slot, index in enumerate(np.asarray(indices, dtype=np.int64)):
            out[slot] = self._read_one(self.files[index])
        return out

    def _read_one(self, path: Path) -> np.ndarray:
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
        except OSError as error:
            raise TrainDataError(f"stimulus image {path} cannot be read: {error}") from None
        size = (self.image_size_px, self.image_size_px)
        if rgb.size != size:
            rgb = rgb.resize(size, Image.Resampling.BICUBIC)
        return np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / 255.0


@dataclass(frozen=True)
class _Bundle:
    folder: Path
    subject: str
    session: int
    betas: np.ndarray
    trials: tuple[Trial, ...]


def _read_bundle(folder: Path) -> _Bundle:
    manifest = _read_manifest(folder)
    betas_path = folder / BETAS
    try:
        betas = np.load(betas_path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as error:
        raise TrainDataError(f"{betas_path} cannot be read as a .npy array: {error}") from None
    trials = _read_trials(folder / TRIALS)
    expected = (manifest["n_trials"], manifest["n_voxels"])
    if betas.ndim != 2 or tuple(betas.shape) != expected:
        raise TrainDataError(
            f"{betas_path}: shape {betas.shape} does not match {MANIFEST} (n_trials, n_voxels) = {expected}"
        )
    if len(trials) != betas.shape[0]:
        raise TrainDataError(f"{folder / TRIALS}: {len(trials)} trials for {betas.shape[0]} betas rows")
    return _Bundle(folder, str(manifest["subject"]), int(manifest["session"]), betas, trials)


def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise TrainDataError(f"{folder} is not a session bundle: {MANIFEST} is missing (unfinished write?)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise TrainDataError(f"{path} cannot be read: {error}") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise TrainDataError(
            f"{path}: format {manifest.get('format')!r} v{manifest.get('format_version')} is not {FORMAT} "
            f"v{FORMAT_VERSION}"
        )
    missing = [k for k in ("subject", "session", "n_voxels", "n_trials") if k not in manifest]
    if missing:
        raise TrainDataError(f"{path}: missing field(s) {missing}")
    return manifest


def _read_trials(path: Path) -> tuple[Trial, ...]:
    try:
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle, delimiter="\t")
            if tuple(reader.fieldnames or ()) != TRIAL_COLUMNS:
                raise TrainDataError(f"{path}: columns must be {TRIAL_COLUMNS}, got {reader.fieldnames}")
            return tuple(_trial(path, line_number, row) for line_number, row in enumerate(reader, start=2))
    except OSError as error:
        raise TrainDataError(f"{path} cannot be read: {error}") from None


def _trial(path: Path, line_number: int, row: dict) -> Trial:
    try:
        number, run = int(row["row"]), int(row["run"])
    except (TypeError, ValueError):
        raise TrainDataError(f"{path}:{line_number}: row and run must be integers, got {row}") from None
    if row["split"] not in SPLITS or number != line_number - 2:
        raise TrainDataError(
            f"{path}:{line_number}: split must be one of {SPLITS} and rows numbered from 0 in order, got {row}"
        )
    return Trial(row["trial_id"], run, row["stimulus_id"], row["split"])


def _write_trials(path: Path, trials: Sequence[Trial]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(TRIAL_COLUMNS)
        for row, trial in enumerate(trials):
            if trial.split not in SPLITS:
                raise TrainDataError(f"trial {trial.trial_id!r}: split must be one of {SPLITS}, got {trial.split!r}")
            writer.writerow((row, trial.trial_id, trial.run, trial.stimulus_id, trial.split))


def _write_image(folder: Path, stimulus_id: str, image: np.ndarray | Path) -> None:
    if isinstance(image, Path):
        suffix = image.suffix.lower()
        if suffix not in IMAGE_SUFFIXES:
            raise TrainDataError(f"stimulus file {image} must be one of {IMAGE_SUFFIXES}")
        (folder / f"{stimulus_id}{suffix}").write_bytes(image.read_bytes())
        return
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise TrainDataError(f"stimulus {stimulus_id!r}: image arrays must be uint8 (H, W, 3), got {array.shape}")
    Image.fromarray(array).save(folder / f"{stimulus_id}.png", compress_level=1)


def _image_file(folder: Path, stimulus_id: str) -> Path:
    for suffix in IMAGE_SUFFIXES:
        path = folder / IMAGES / f"{stimulus_id}{suffix}"
        if path.is_file():
            return path
    raise TrainDataError(f"{folder / IMAGES}: no image file for stimulus {stimulus_id!r} ({'/'.join(IMAGE_SUFFIXES)})")


def _subject_data(name: str, bundles: Sequence[_Bundle], images: FolderImages) -> SubjectData:
    counts = {b.betas.shape[1] for b in bundles}
    if len(counts) > 1:
        listing = ", ".join(f"{b.folder} ({b.betas.shape[1]})" for b in bundles)
        raise TrainDataError(f"subject {name!r}: sessions have different voxel counts (masks differ): {listing}")
    betas = np.concatenate([np.asarray(b.betas, dtype=np.float32) for b in bundles])
    trials = [t for b in bundles for t in b.trials]
    image_index = np.array([images.index[t.stimulus_id] for t in trials], dtype=np.int64)
    split = np.array([t.split for t in trials])
    rows = np.arange(len(trials), dtype=np.int64)
    test_rows, test_images = group_test_trials(rows[split == "test"], image_index[split == "test"])
    train = (split == "train") & ~np.isin(image_index, test_images)
    origin = ", ".join(str(b.folder) for b in bundles)
    return SubjectData(name, betas, rows[train], image_index[train], test_rows, test_images, origin)
