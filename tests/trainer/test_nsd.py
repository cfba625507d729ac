"""The reader of the published MindEye2/NSD files, on tiny real HDF5 and tar files with a known ground truth."""

import logging
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from rtdecode.errors import TrainDataError, TrainError
from tests.trainer.nsd_layout import (
    N_LEAKED_TRAIN_TRIALS,
    behav_table,
    npy_bytes,
    write_behav_tar,
    write_nsd_layout,
    write_tar,
)
from trainer.data.nsd import NSD_SUBJECTS, CocoImages, load_nsd

SUBJECTS = {"subj01": 7, "subj02": 5}


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, dict]:
    root = tmp_path / "mindeyev2"
    return root, write_nsd_layout(root, SUBJECTS)


def expected_train(truth, split: str, n_sessions: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Train trials of the first tars, minus those showing one of the split's test images."""
    behav = np.concatenate(truth.train_behav[:n_sessions])
    keep = ~np.isin(behav[:, 0], truth.grouped_images[split])
    return behav[keep, 5].astype(np.int64), behav[keep, 0].astype(np.int64)


def test_round_trip_equals_the_ground_truth(layout):
    root, written = layout
    dataset = load_nsd(root, ["subj02", "subj01"])
    assert dataset.names == ("subj02", "subj01")
    assert dataset.n_voxels == (5, 7)
    assert dataset.description == f"NSD published files in {root} (subj02, subj01)"
    for subject in dataset.subjects:
        truth = written["subjects"][subject.name]
        assert subject.origin == f"betas_all_{subject.name}_fp32_renorm.hdf5"
        assert subject.betas.dtype == np.float16
        np.testing.assert_array_equal(subject.betas, truth.betas.astype(np.float16))
        rows, images = expected_train(truth, "new_test")
        np.testing.assert_array_equal(subject.train_rows, rows)
        np.testing.assert_array_equal(subject.train_images, images)
        assert subject.train_rows.dtype == subject.train_images.dtype == np.int64
        np.testing.assert_array_equal(subject.test_images, truth.grouped_images["new_test"])
        np.testing.assert_array_equal(subject.test_rows, truth.grouped_rows["new_test"])


def test_test_grouping_pads_two_trials_as_a_b_a(layout):
    root, written = layout
    subject = load_nsd(root, ["subj01"]).subjects[0]
    behav = written["subjects"]["subj01"].test_behav["new_test"]
    first_image = written["test_images"][0]
    a, b = behav[behav[:, 0] == first_image, 5].astype(np.int64)  # two trials, in tar order
    assert subject.test_images[0] == first_image
    assert subject.test_rows[0].tolist() == [a, b, a]
    assert subject.test_rows.shape == (4, 3)


def test_train_trials_of_test_images_are_dropped_and_logged(layout, caplog):
    root, written = layout
    truth = written["subjects"]["subj01"]
    all_train_images = np.concatenate(truth.train_behav)[:, 0]
    assert np.isin(all_train_images, written["test_images"]).sum() == N_LEAKED_TRAIN_TRIALS
    with caplog.at_level(logging.INFO, logger="trainer.data.nsd"):
        subject = load_nsd(root, ["subj01"]).subjects[0]
    assert subject.n_train == all_train_images.size - N_LEAKED_TRAIN_TRIALS
    assert not np.isin(subject.train_images, subject.test_images).any()
    assert any(f"dropped {N_LEAKED_TRAIN_TRIALS} train trials" in record.getMessage() for record in caplog.records)


def test_images_are_float32_in_the_requested_order_with_repeats(layout):
    root, written = layout
    images = load_nsd(root, ["subj01"]).images
    indices = np.array([5, 2, 5, 0, 39])
    read = images.read(indices)
    assert read.dtype == np.float32
    assert read.shape == (5, 3, 8, 8)
    assert 0.0 <= read.min() and read.max() <= 1.0
    np.testing.assert_array_equal(read, written["images"][indices].astype(np.float32))
    assert images.read(np.array([], dtype=np.int64)).shape == (0, 3, 8, 8)
    assert images.n_images == 40


def test_image_store_identity_follows_the_file(layout):
    root, _ = layout
    path = root / "coco_images_224_float16.hdf5"
    before = CocoImages(path).identity
    assert CocoImages(path).identity == before
    with h5py.File(path, "w") as file:
        file.create_dataset("images", data=np.zeros((41, 3, 8, 8), dtype=np.float16))
    assert CocoImages(path).identity != before


def test_image_index_outside_the_store_is_refused(layout):
    root, _ = layout
    images = CocoImages(root / "coco_images_224_float16.hdf5")
    with pytest.raises(TrainDataError, match="coco_images_224_float16.hdf5.*40"):
        images.read(np.array([3, 40]))


def test_n_sessions_uses_the_first_tars(tmp_path):
    written = write_nsd_layout(tmp_path, {"subj03": 4}, n_sessions=3)
    truth = written["subjects"]["subj03"]
    for n_sessions in (1, 2, None):
        subject = load_nsd(tmp_path, ["subj03"], n_sessions=n_sessions).subjects[0]
        rows, images = expected_train(truth, "new_test", n_sessions)
        np.testing.assert_array_equal(subject.train_rows, rows)
        np.testing.assert_array_equal(subject.train_images, images)
    assert np.all(load_nsd(tmp_path, ["subj03"], n_sessions=1).subjects[0].train_rows < 20)


def test_train_tars_are_taken_in_numeric_order(tmp_path):
    written = write_nsd_layout(tmp_path, {"subj04": 3}, n_sessions=11, trials_per_session=6)
    subject = load_nsd(tmp_path, ["subj04"]).subjects[0]
    rows, _ = expected_train(written["subjects"]["subj04"], "new_test")
    np.testing.assert_array_equal(subject.train_rows, rows)  # 0, 1, ..., 9, 10: not 0, 1, 10, 2, ...
    sessions = subject.train_rows // 6
    assert np.all(np.diff(sessions) >= 0) and sessions[-1] == 10


def test_old_test_split_is_selectable(layout):
    root, written = layout
    truth = written["subjects"]["subj01"]
    subject = load_nsd(root, ["subj01"], test_split="test").subjects[0]
    np.testing.assert_array_equal(subject.test_images, truth.grouped_images["test"])
    np.testing.assert_array_equal(subject.test_rows, truth.grouped_rows["test"])
    assert subject.n_test_images == 3
    rows, images = expected_train(truth, "test")
    np.testing.assert_array_equal(subject.train_rows, rows)
    np.testing.assert_array_equal(subject.train_images, images)


def refused(root: Path, *names_in_message: str, subjects=("subj01", "subj02"), **options) -> str:
    """Load and expect TrainDataError whose message names every one of ``names_in_message``."""
    with pytest.raises(TrainDataError) as error:
        load_nsd(root, list(subjects), **options)
    message = str(error.value)
    for name in names_in_message:
        assert name in message, f"{name!r} not in {message!r}"
    return message


def rewrite_train_tar(root: Path, truth, subject: str, session: int, column: int, value: float) -> Path:
    """Rewrite ``train/{session}.tar`` with one behav value changed; returns the tar's path."""
    behav = truth.train_behav[session].copy()
    behav[0, column] = value
    path = root / "wds" / subject / "train" / f"{session}.tar"
    write_behav_tar(path, behav, np.random.default_rng(1))
    return path


def test_missing_root(tmp_path):
    refused(tmp_path / "absent", str(tmp_path / "absent"), "pscotti/mindeyev2")


def test_missing_betas_file_names_it_and_where_it_comes_from(layout):
    root, _ = layout
    (root / "betas_all_subj02_fp32_renorm.hdf5").unlink()
    message = refused(root, str(root / "betas_all_subj02_fp32_renorm.hdf5"), "pscotti/mindeyev2", "Hugging Face")
    assert "nothing is downloaded" in message


def test_missing_images_file(layout):
    root, _ = layout
    (root / "coco_images_224_float16.hdf5").unlink()
    refused(root, str(root / "coco_images_224_float16.hdf5"), "pscotti/mindeyev2")


def test_no_train_tars(layout):
    root, _ = layout
    shutil.rmtree(root / "wds" / "subj02" / "train")
    refused(root, str(root / "wds" / "subj02" / "train"), "no train tars")


def test_fewer_tars_than_sessions_asked(layout):
    root, _ = layout
    message = refused(root, str(root / "wds" / "subj01" / "train"), n_sessions=3)
    assert "3 session(s) asked" in message and "2 train tar(s)" in message


def test_a_gap_in_the_train_tars_is_a_missing_file(layout):
    root, _ = layout
    (root / "wds" / "subj01" / "train" / "0.tar").unlink()
    refused(root, str(root / "wds" / "subj01" / "train" / "0.tar"), "missing")


def test_missing_test_split(layout):
    root, _ = layout
    (root / "wds" / "subj01" / "new_test" / "0.tar").unlink()
    refused(root, str(root / "wds" / "subj01" / "new_test" / "0.tar"))
    load_nsd(root, ["subj01"], test_split="test")  # the other split is still there


@pytest.mark.parametrize("name", ["subj09", "sub01", "subj1"])
def test_unknown_subject(layout, name):
    root, _ = layout
    refused(root, repr(name), "subj08", subjects=("subj01", name))


def test_repeated_subject(layout):
    root, _ = layout
    refused(root, "subj01", "more than once", subjects=("subj01", "subj02", "subj01"))


def test_behav_row_outside_the_betas_names_the_tar_and_the_row(layout):
    root, written = layout
    path = rewrite_train_tar(root, written["subjects"]["subj02"], "subj02", 1, column=5, value=40)
    refused(root, str(path), "row 40", "betas_all_subj02_fp32_renorm.hdf5", "40 rows")


def test_test_row_outside_the_betas(layout):
    root, written = layout
    behav = written["subjects"]["subj01"].test_behav["new_test"].copy()
    behav[3, 5] = 1000
    path = root / "wds" / "subj01" / "new_test" / "0.tar"
    write_behav_tar(path, behav, np.random.default_rng(1))
    refused(root, str(path), "row 1000")


def test_behav_nan_row_is_refused(layout):
    root, written = layout
    path = rewrite_train_tar(root, written["subjects"]["subj01"], "subj01", 0, column=5, value=-1)
    refused(root, str(path), "whole numbers >= 0")


def test_image_index_outside_the_images_file(layout):
    root, written = layout
    path = rewrite_train_tar(root, written["subjects"]["subj01"], "subj01", 0, column=0, value=40)
    refused(root, str(path), "image 40", "coco_images_224_float16.hdf5", "40 images")


def test_betas_that_are_not_two_dimensional(layout):
    root, _ = layout
    path = root / "betas_all_subj01_fp32_renorm.hdf5"
    with h5py.File(path, "w") as file:
        file.create_dataset("betas", data=np.zeros((40, 7, 2), dtype=np.float32))
    refused(root, str(path), "2-D", "(40, 7, 2)")


def test_betas_file_that_is_not_hdf5(layout):
    root, _ = layout
    path = root / "betas_all_subj01_fp32_renorm.hdf5"
    path.write_bytes(b"partial download")
    refused(root, str(path), "HDF5")


def test_a_file_that_is_not_a_tar(layout):
    root, _ = layout
    path = root / "wds" / "subj02" / "train" / "1.tar"
    path.write_bytes(b"<html>rate limited</html>" * 40)
    refused(root, str(path), "not a readable tar")


def test_a_truncated_tar(layout):
    root, _ = layout
    path = root / "wds" / "subj02" / "train" / "1.tar"
    path.write_bytes(path.read_bytes()[:5000])
    refused(root, str(path))


def test_an_unreadable_behav_member(layout):
    root, _ = layout
    path = root / "wds" / "subj01" / "train" / "1.tar"
    write_tar(path, {"sample000000021.behav.npy": b"not npy", "sample000000021.past_behav.npy": b"x"})
    refused(root, str(path), "sample000000021.behav.npy", "not a readable .npy")


def test_a_behav_member_of_the_wrong_shape(layout):
    root, _ = layout
    path = root / "wds" / "subj01" / "train" / "1.tar"
    write_tar(path, {"sample000000021.behav.npy": npy_bytes(np.zeros((1, 5)))})
    refused(root, str(path), "(1, 5)")


@pytest.mark.parametrize("members", [{}, {"sample000000003.past_behav.npy": npy_bytes(np.zeros((15, 17)))}])
def test_an_empty_test_split(layout, members):
    root, _ = layout
    path = root / "wds" / "subj02" / "new_test" / "0.tar"
    write_tar(path, members)
    refused(root, str(path), "no samples")


def test_a_test_split_with_one_image_is_refused_by_check_dataset(layout):
    root, _ = layout
    rng = np.random.default_rng(2)
    path = root / "wds" / "subj01" / "new_test" / "0.tar"
    write_behav_tar(path, behav_table(1, np.array([3, 4]), np.array([7, 7]), 20, np.array([7]), rng), rng)
    refused(root, "subj01", "test split has 1 image")


@pytest.mark.parametrize(
    ("options", "message"),
    [({"n_sessions": 0}, "n_sessions"), ({"test_split": "val"}, "test_split"), ({"test_split": "train"}, "test_split")],
)
def test_bad_settings(layout, options, message):
    root, _ = layout
    with pytest.raises(TrainError, match=message):
        load_nsd(root, ["subj01"], **options)


def test_nsd_subject_names():
    assert NSD_SUBJECTS == ("subj01", "subj02", "subj03", "subj04", "subj05", "subj06", "subj07", "subj08")
