"""Tiny files in the published MindEye2/NSD layout (spec §2.2, §3.2), with the ground truth they hold.

Real HDF5 files (h5py) and real tar files (tarfile) are written, so the reader is tested on the same kind of
bytes it meets in a download. Each subject's train tars hold one sample per train trial of that session; each
sample carries ``behav``, ``past_behav``, ``future_behav`` and ``olds_behav`` like the published ones. The test
images are shared by all subjects (like shared1000); the first test image has only two trials (so grouping
pads it a, b, a), the others three; a few train trials show a test image (the reader must drop them).
The old ``test`` split holds the same trials as ``new_test`` minus those of the last test image.
"""

import dataclasses
import io
import tarfile
from pathlib import Path

import h5py
import numpy as np

BEHAV_N_COLUMNS = 17
CONTEXT_N_TRIALS = {"past_behav": 15, "future_behav": 15, "olds_behav": 3}
N_LEAKED_TRAIN_TRIALS = 2  # train trials showing a test image, per subject


@dataclasses.dataclass
class SubjectTruth:
    """What one subject's files hold.

    ``train_behav[k]`` is the behav (n, 17) of ``train/{k}.tar`` in tar order; ``test_behav[split]`` that of
    ``{split}/0.tar``; ``grouped_rows[split]`` (n_test_images, 3) and ``grouped_images[split]`` the expected
    grouping, built here by hand (sorted images, each image's rows in tar order, padded cyclically).
    """

    betas: np.ndarray
    train_behav: list[np.ndarray]
    test_behav: dict[str, np.ndarray]
    grouped_rows: dict[str, np.ndarray]
    grouped_images: dict[str, np.ndarray]


def write_nsd_layout(
    root: Path,
    subjects: dict[str, int],
    *,
    n_sessions: int = 2,
    trials_per_session: int = 20,
    n_images: int = 40,
    image_size_px: int = 8,
    n_test_images: int = 4,
    seed: int = 0,
) -> dict:
    """Write the layout under ``root`` for ``subjects`` (name -> n_voxels).

    Returns ``{"images": (n_images, 3, S, S) float16, "test_images": sorted new_test images,
    "subjects": {name: SubjectTruth}}``.
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    images = rng.random((n_images, 3, image_size_px, image_size_px)).astype(np.float16)
    with h5py.File(root / "coco_images_224_float16.hdf5", "w") as file:
        file.create_dataset("images", data=images)
    test_images = np.sort(rng.choice(n_images, n_test_images, replace=False))
    truths = {
        name: _write_subject(root, name, number, n_voxels, n_sessions, trials_per_session, test_images, n_images, rng)
        for number, (name, n_voxels) in enumerate(subjects.items(), start=1)
    }
    return {"images": images, "test_images": test_images, "subjects": truths}


def _write_subject(
    root: Path,
    name: str,
    number: int,
    n_voxels: int,
    n_sessions: int,
    trials_per_session: int,
    test_images: np.ndarray,
    n_images: int,
    rng: np.random.Generator,
) -> SubjectTruth:
    n_rows = n_sessions * trials_per_session
    betas = rng.standard_normal((n_rows, n_voxels)).astype(np.float32)
    with h5py.File(root / f"betas_all_{name}_fp32_renorm.hdf5", "w") as file:
        file.create_dataset("betas", data=betas)
    test_trial_images = np.concatenate([test_images[:1], test_images[:1], np.repeat(test_images[1:], 3)])
    # Rows 0, trials_per_session, ... stay train trials, so every session's tar has at least one sample.
    candidates = np.setdiff1d(np.arange(n_rows), np.arange(0, n_rows, trials_per_session))
    if test_trial_images.size + N_LEAKED_TRAIN_TRIALS > candidates.size:
        raise ValueError("too few trials for the test images: raise trials_per_session")
    test_trial_rows = rng.choice(candidates, test_trial_images.size, replace=False)
    order = rng.permutation(test_trial_images.size)
    test_rows, test_trial_images = test_trial_rows[order], test_trial_images[order]
    train_rows = np.setdiff1d(np.arange(n_rows), test_rows)
    train_images = rng.choice(np.setdiff1d(np.arange(n_images), test_images), train_rows.size)
    leaked = rng.choice(train_rows.size, N_LEAKED_TRAIN_TRIALS, replace=False)
    train_images[leaked] = rng.choice(test_images, N_LEAKED_TRAIN_TRIALS)
    train_behav = []
    for session in range(n_sessions):
        in_session = (train_rows // trials_per_session) == session
        session_order = rng.permutation(int(in_session.sum()))  # tars need not be in row order
        rows, image_indices = train_rows[in_session][session_order], train_images[in_session][session_order]
        behav = behav_table(number, rows, image_indices, trials_per_session, test_images, rng)
        write_behav_tar(root / "wds" / name / "train" / f"{session}.tar", behav, rng)
        train_behav.append(behav)
    truth = SubjectTruth(betas, train_behav, {}, {}, {})
    old = ~np.isin(test_trial_images, test_images[-1:])
    for split, keep in (("new_test", np.ones_like(old)), ("test", old)):
        behav = behav_table(number, test_rows[keep], test_trial_images[keep], trials_per_session, test_images, rng)
        write_behav_tar(root / "wds" / name / split / "0.tar", behav, rng)
        truth.test_behav[split] = behav
        truth.grouped_images[split], truth.grouped_rows[split] = _grouped(test_rows[keep], test_trial_images[keep])
    return truth


def _grouped(rows: np.ndarray, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Expected grouping, spelt out: 3 trials -> a, b, c; 2 -> a, b, a; 1 -> a, a, a."""
    unique = np.sort(np.unique(images))
    grouped = []
    for image in unique:
        own = [int(row) for row, shown in zip(rows, images, strict=True) if shown == image]
        grouped.append({1: own * 3, 2: [own[0], own[1], own[0]], 3: own}[len(own)])
    return unique.astype(np.int64), np.array(grouped, dtype=np.int64)


def behav_table(
    subject_number: int,
    rows: np.ndarray,
    images: np.ndarray,
    trials_per_session: int,
    test_images: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """(n, 17) behav rows (spec §3.2 columns) for trials ``rows`` showing ``images``; -1 stands for NaN."""
    behav = np.full((rows.size, BEHAV_N_COLUMNS), -1.0)
    behav[:, 0] = images
    behav[:, 1] = subject_number
    behav[:, 2] = rows // trials_per_session + 1
    behav[:, 3] = (rows % trials_per_session) // 10 + 1
    behav[:, 4] = rows % trials_per_session + 1
    behav[:, 5] = rows
    behav[:, 6] = rng.random(rows.size) * 300.0
    behav[:, 7:9] = rng.integers(0, 2, (rows.size, 2))
    behav[:, 9] = np.where(rng.random(rows.size) < 0.3, -1.0, rng.random(rows.size))  # RT, sometimes missing
    behav[:, 16] = np.isin(images, test_images)
    return behav


def write_behav_tar(path: Path, behav: np.ndarray, rng: np.random.Generator) -> None:
    """A webdataset tar: per sample ``<key>.past_behav.npy``, ``.behav.npy``, ``.future_behav.npy``,
    ``.olds_behav.npy`` (behav (1, 17); context arrays from neighbouring samples, -1 padded)."""
    members = {}
    for index, sample in enumerate(behav):
        key = f"sample{int(sample[5]):09d}"
        members[f"{key}.past_behav.npy"] = npy_bytes(_context(behav, index, -1, CONTEXT_N_TRIALS["past_behav"]))
        members[f"{key}.behav.npy"] = npy_bytes(sample.reshape(1, BEHAV_N_COLUMNS))
        members[f"{key}.future_behav.npy"] = npy_bytes(_context(behav, index, 1, CONTEXT_N_TRIALS["future_behav"]))
        olds = np.full((CONTEXT_N_TRIALS["olds_behav"], BEHAV_N_COLUMNS), -1.0)
        olds[0] = behav[rng.integers(behav.shape[0])]
        members[f"{key}.olds_behav.npy"] = npy_bytes(olds)
    write_tar(path, members)


def _context(behav: np.ndarray, index: int, step: int, n_trials: int) -> np.ndarray:
    context = np.full((n_trials, BEHAV_N_COLUMNS), -1.0)
    neighbours = [index + step * k for k in range(1, n_trials + 1) if 0 <= index + step * k < behav.shape[0]]
    context[: len(neighbours)] = behav[neighbours]
    return context


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def write_tar(path: Path, members: dict[str, bytes]) -> None:
    """A plain (uncompressed) tar with ``members`` (name -> content), in the given order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, mode="w") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
