"""Session bundles written and read back as real files, and the shared data checks (trainer/data/source.py)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rtdecode.errors import TrainDataError
from trainer.data.sessions import FolderImages, Trial, find_sessions, load_sessions, write_session
from trainer.data.source import TEST_REPS, Dataset, SubjectData, check_dataset, group_test_trials

SIZE_PX = 8
STIMULI = ("img_a", "img_b", "img_c", "img_d", "img_e", "t1", "t2", "t3")
INDEX = {stimulus: i for i, stimulus in enumerate(sorted(STIMULI))}  # source-wide image index: sorted ids

# subject s1, session 2 (rows 0-6) then session 10 (rows 7-11); subject s2, session 1
S1_SESSION_2 = [("img_a", "train"), ("t1", "test"), ("img_b", "train"), ("t2", "test"), ("img_c", "train"),
                ("t1", "test"), ("t3", "test")]  # fmt: skip
S1_SESSION_10 = [("img_d", "train"), ("t1", "test"), ("img_a", "train"), ("t2", "train"), ("t2", "test")]
S2_SESSION_1 = [("img_e", "train"), ("t1", "test"), ("img_a", "train"), ("t2", "test"), ("t1", "test")]


def _pixels(seed: int, height: int = SIZE_PX, width: int = SIZE_PX) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _trials(plan: list[tuple[str, str]], run: int = 1) -> list[Trial]:
    return [Trial(f"run-{run}_{i}", run, stimulus, split) for i, (stimulus, split) in enumerate(plan)]


def _write(folder: Path, subject: str, session: int, plan, n_voxels: int, images: dict, seed: int) -> np.ndarray:
    betas = np.random.default_rng(seed).standard_normal((len(plan), n_voxels))
    needed = {stimulus for stimulus, _ in plan}
    write_session(
        folder,
        subject=subject,
        session=session,
        betas=betas,
        trials=_trials(plan),
        images={k: v for k, v in images.items() if k in needed},
    )
    return betas.astype(np.float32)


@pytest.fixture
def pixels() -> dict[str, np.ndarray]:
    return {stimulus: _pixels(seed) for seed, stimulus in enumerate(STIMULI)}


@pytest.fixture
def bundles(tmp_path: Path, pixels) -> dict:
    """Two sessions of s1 (folder names sort opposite to session numbers) and one of s2 (img_e from a PNG file)."""
    root = tmp_path / "sessions"
    photo = tmp_path / "source" / "photo.png"
    photo.parent.mkdir()
    Image.fromarray(pixels["img_e"]).save(photo)
    images = {**pixels, "img_e": photo}
    betas = {
        "s1-10": _write(root / "s1" / "ses-10", "s1", 10, S1_SESSION_10, 5, images, seed=10),
        "s1-2": _write(root / "s1" / "ses-2", "s1", 2, S1_SESSION_2, 5, images, seed=2),
        "s2-1": _write(root / "s2-ses-1", "s2", 1, S2_SESSION_1, 4, images, seed=1),
    }
    return {"root": root, "betas": betas}


def _idx(*stimuli: str) -> list[int]:
    return [INDEX[s] for s in stimuli]


# ------------------------------------------------------------------------------------------------ round trip


def test_round_trip(bundles, pixels):
    root = bundles["root"]
    folders = find_sessions(root)
    assert folders == sorted([root / "s1" / "ses-10", root / "s1" / "ses-2", root / "s2-ses-1"])
    dataset = load_sessions(folders, image_size_px=SIZE_PX)
    assert dataset.names == ("s1", "s2")
    assert dataset.n_voxels == (5, 4)
    assert "3 session bundle(s)" in dataset.description
    s1, s2 = dataset.subjects

    # s1: session 2's rows first, then session 10's (session order, not folder-name order)
    np.testing.assert_array_equal(s1.betas, np.concatenate([bundles["betas"]["s1-2"], bundles["betas"]["s1-10"]]))
    assert s1.betas.dtype == np.float32
    # row 10 shows t2 in the train split but t2 is a test image: excluded from train
    np.testing.assert_array_equal(s1.train_rows, [0, 2, 4, 7, 9])
    np.testing.assert_array_equal(s1.train_images, _idx("img_a", "img_b", "img_c", "img_d", "img_a"))
    np.testing.assert_array_equal(s1.test_images, _idx("t1", "t2", "t3"))
    np.testing.assert_array_equal(s1.test_rows, [[1, 5, 8], [3, 11, 3], [6, 6, 6]])  # 3 reps; a,b,a; a,a,a

    np.testing.assert_array_equal(s2.betas, bundles["betas"]["s2-1"])
    np.testing.assert_array_equal(s2.train_rows, [0, 2])
    np.testing.assert_array_equal(s2.train_images, _idx("img_e", "img_a"))
    np.testing.assert_array_equal(s2.test_images, _idx("t1", "t2"))
    np.testing.assert_array_equal(s2.test_rows, [[1, 4, 1], [3, 3, 3]])

    # images: every stimulus once, float32 in [0, 1], equal to the written pixels (PNG is lossless)
    assert dataset.images.n_images == len(STIMULI)
    order = np.array([INDEX[s] for s in STIMULI])
    read = dataset.images.read(order)
    assert read.dtype == np.float32 and read.shape == (len(STIMULI), 3, SIZE_PX, SIZE_PX)
    assert read.min() >= 0.0 and read.max() <= 1.0
    for slot, stimulus in enumerate(STIMULI):
        np.testing.assert_array_equal(np.round(read[slot] * 255).astype(np.uint8), pixels[stimulus].transpose(2, 0, 1))
        np.testing.assert_allclose(read[slot], pixels[stimulus].transpose(2, 0, 1) / 255.0, atol=1e-6)
    # any order, repeats allowed
    again = dataset.images.read(np.array([INDEX["t2"], INDEX["img_a"], INDEX["t2"]]))
    np.testing.assert_array_equal(again[0], again[2])
    np.testing.assert_array_equal(again[1], read[0])


def test_subjects_choose_order_and_which_images(bundles, pixels):
    folders = find_sessions(bundles["root"])
    swapped = load_sessions(folders, subjects=["s2", "s1"], image_size_px=SIZE_PX)
    assert swapped.names == ("s2", "s1")
    only_s2 = load_sessions(folders, subjects=["s2"], image_size_px=SIZE_PX)
    assert only_s2.names == ("s2",)
    assert only_s2.images.n_images == 4  # img_a, img_e, t1, t2
    local = {stimulus: i for i, stimulus in enumerate(sorted(["img_a", "img_e", "t1", "t2"]))}
    subject = only_s2.subjects[0]
    np.testing.assert_array_equal(subject.train_images, [local["img_e"], local["img_a"]])
    np.testing.assert_array_equal(subject.test_images, [local["t1"], local["t2"]])
    read = only_s2.images.read(subject.train_images)
    np.testing.assert_allclose(read[0], pixels["img_e"].transpose(2, 0, 1) / 255.0, atol=1e-6)


def test_images_are_resized_to_image_size_px(tmp_path):
    colour = np.array([200, 30, 90], dtype=np.uint8)
    flat = np.broadcast_to(colour, (12, 20, 3)).copy()  # not square, not the training size
    images = {"flat": flat, "noise": _pixels(3, 16, 16), "t1": _pixels(4), "t2": _pixels(5)}
    plan = [("flat", "train"), ("noise", "train"), ("t1", "test"), ("t2", "test")]
    _write(tmp_path / "b", "s1", 1, plan, 3, images, seed=0)
    for size_px in (6, 24):
        dataset = load_sessions(find_sessions(tmp_path), image_size_px=size_px)
        read = dataset.images.read(np.arange(dataset.images.n_images))
        assert read.shape == (4, 3, size_px, size_px) and read.dtype == np.float32
        assert read.min() >= 0.0 and read.max() <= 1.0
        flat_read = read[sorted(images).index("flat")]
        np.testing.assert_allclose(
            flat_read, np.broadcast_to(colour[:, None, None] / 255.0, flat_read.shape), atol=1e-6
        )
    small = load_sessions([tmp_path / "b"], image_size_px=6).images
    large = load_sessions([tmp_path / "b"], image_size_px=24).images
    assert small.identity != large.identity
    assert small.identity == load_sessions([tmp_path / "b"], image_size_px=6).images.identity


def test_jpeg_file_stimuli_are_copied_and_read(tmp_path):
    colour = np.array([10, 120, 240], dtype=np.uint8)
    jpeg = tmp_path / "in" / "photo.JPG"
    jpeg.parent.mkdir()
    Image.fromarray(np.broadcast_to(colour, (SIZE_PX, SIZE_PX, 3)).copy()).save(jpeg, format="JPEG", quality=95)
    images = {"photo": jpeg, "t1": _pixels(1), "t2": _pixels(2)}
    _write(tmp_path / "b", "s1", 1, [("photo", "train"), ("t1", "test"), ("t2", "test")], 3, images, seed=0)
    assert (tmp_path / "b" / "images" / "photo.jpg").read_bytes() == jpeg.read_bytes()
    dataset = load_sessions([tmp_path / "b"], image_size_px=SIZE_PX)
    read = dataset.images.read(dataset.subjects[0].train_images)[0]
    np.testing.assert_allclose(read, np.broadcast_to(colour[:, None, None] / 255.0, read.shape), atol=0.02)


def test_written_files_follow_the_format(bundles):
    folder = bundles["root"] / "s2-ses-1"
    manifest = json.loads((folder / "session.json").read_text())
    assert manifest["format"] == "rtdecode-session" and manifest["format_version"] == 1
    assert (manifest["subject"], manifest["session"], manifest["n_voxels"], manifest["n_trials"]) == ("s2", 1, 4, 5)
    lines = (folder / "trials.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["row", "trial_id", "run", "stimulus_id", "split"]
    assert lines[1].split("\t") == ["0", "run-1_0", "1", "img_e", "train"]
    assert len(lines) == 6
    assert sorted(p.name for p in (folder / "images").iterdir()) == ["img_a.png", "img_e.png", "t1.png", "t2.png"]
    betas = np.load(folder / "betas.npy")
    assert betas.dtype == np.float32 and betas.shape == (5, 4)


# ------------------------------------------------------------------------------------------------ refused data


def _raises(match_parts: list[str], call, *args, **kwargs) -> TrainDataError:
    with pytest.raises(TrainDataError) as caught:
        call(*args, **kwargs)
    for part in match_parts:
        assert part in str(caught.value), (part, str(caught.value))
    return caught.value


def test_unfinished_bundle_is_refused(bundles):
    folder = bundles["root"] / "s1" / "ses-2"
    (folder / "session.json").unlink()
    _raises([str(folder), "session.json"], load_sessions, [folder], image_size_px=SIZE_PX)
    assert folder not in find_sessions(bundles["root"])  # never offered as a bundle


def test_wrong_format_version_is_refused(bundles):
    manifest_path = bundles["root"] / "s2-ses-1" / "session.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["format_version"] = 2
    manifest_path.write_text(json.dumps(manifest))
    _raises([str(manifest_path), "v2"], load_sessions, find_sessions(bundles["root"]), image_size_px=SIZE_PX)


def test_betas_shape_must_match_the_manifest(bundles):
    betas_path = bundles["root"] / "s1" / "ses-10" / "betas.npy"
    np.save(betas_path, np.zeros((5, 6), dtype=np.float32))
    _raises([str(betas_path), "(5, 6)", "(5, 5)"], load_sessions, find_sessions(bundles["root"]))


def test_trials_with_bad_columns_are_refused(bundles):
    trials_path = bundles["root"] / "s2-ses-1" / "trials.tsv"
    lines = trials_path.read_text().splitlines()
    lines[0] = "row\ttrial_id\trun\tstimulus\tsplit"
    trials_path.write_text("\n".join(lines) + "\n")
    _raises([str(trials_path), "columns"], load_sessions, find_sessions(bundles["root"]))


def test_trials_with_a_bad_split_are_refused(bundles):
    trials_path = bundles["root"] / "s2-ses-1" / "trials.tsv"
    lines = trials_path.read_text().splitlines()
    lines[3] = lines[3].replace("train", "val")
    trials_path.write_text("\n".join(lines) + "\n")
    _raises([f"{trials_path}:4", "split"], load_sessions, find_sessions(bundles["root"]))


@pytest.mark.parametrize("column", [0, 2])  # row, run
def test_trials_with_a_non_integer_row_or_run_name_the_file(bundles, column):
    """A typo in an integer column is reported as TrainDataError naming the file and line, like a bad split."""
    trials_path = bundles["root"] / "s2-ses-1" / "trials.tsv"
    lines = trials_path.read_text().splitlines()
    fields = lines[2].split("\t")
    fields[column] = "first"
    lines[2] = "\t".join(fields)
    trials_path.write_text("\n".join(lines) + "\n")
    _raises([f"{trials_path}:3"], load_sessions, find_sessions(bundles["root"]))


def test_sessions_of_one_subject_with_different_voxel_counts_are_refused(tmp_path, pixels):
    first = _write(tmp_path / "a", "s1", 1, S1_SESSION_2, 5, pixels, seed=0)
    second = _write(tmp_path / "b", "s1", 2, S1_SESSION_10, 6, pixels, seed=1)
    assert first.shape[1] != second.shape[1]
    _raises(["'s1'", "voxel counts", str(tmp_path / "a"), str(tmp_path / "b")], load_sessions, find_sessions(tmp_path))


def test_a_missing_image_file_is_refused(bundles):
    folder = bundles["root"] / "s1" / "ses-2"
    (folder / "images" / "img_b.png").unlink()
    _raises([str(folder / "images"), "img_b"], load_sessions, find_sessions(bundles["root"]))


def test_an_unreadable_image_names_the_file(bundles):
    broken = bundles["root"] / "s1" / "ses-2" / "images" / "img_c.png"
    broken.write_bytes(b"not a png")
    dataset = load_sessions(find_sessions(bundles["root"]), image_size_px=SIZE_PX)
    _raises([str(broken)], dataset.images.read, np.array([INDEX["img_c"]]))


def test_no_bundles_under_root(tmp_path):
    (tmp_path / "empty" / "nested").mkdir(parents=True)
    _raises([str(tmp_path / "empty"), "no session bundles"], find_sessions, tmp_path / "empty")
    _raises([str(tmp_path / "missing")], find_sessions, tmp_path / "missing")


def test_unknown_subject_is_refused(bundles):
    _raises(["s9", "'s1'", "'s2'"], load_sessions, find_sessions(bundles["root"]), subjects=["s1", "s9"])


def test_an_empty_test_split_is_refused(tmp_path, pixels):
    _write(tmp_path / "b", "s1", 1, [("img_a", "train"), ("img_b", "train")], 3, pixels, seed=0)
    _raises(["'s1'", str(tmp_path / "b"), "test split has 0 image(s)"], load_sessions, find_sessions(tmp_path))


def test_write_session_refuses_to_overwrite(bundles, pixels):
    folder = bundles["root"] / "s2-ses-1"
    before = {p.name: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    with pytest.raises(TrainDataError, match="already holds a session bundle") as caught:
        _write(folder, "s2", 1, S2_SESSION_1, 4, pixels, seed=99)
    assert str(folder) in str(caught.value)
    assert {p.name: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


def test_write_session_checks_its_inputs(tmp_path, pixels):
    trials = _trials([("img_a", "train"), ("t1", "test")])
    kwargs = {"subject": "s1", "session": 1, "trials": trials}
    _raises(["n_trials=2", "(3, 4)"], write_session, tmp_path / "rows", betas=np.zeros((3, 4)), images=pixels, **kwargs)
    _raises(
        ["t1"], write_session, tmp_path / "img", betas=np.zeros((2, 4)), images={"img_a": pixels["img_a"]}, **kwargs
    )
    bad = {**pixels, "t1": pixels["t1"].astype(np.float32)}
    _raises(["'t1'", "uint8"], write_session, tmp_path / "dtype", betas=np.zeros((2, 4)), images=bad, **kwargs)
    bmp = tmp_path / "photo.bmp"
    Image.fromarray(pixels["t1"]).save(bmp)
    _raises([str(bmp)], write_session, tmp_path / "bmp", betas=np.zeros((2, 4)), images={**pixels, "t1": bmp}, **kwargs)
    bad_split = _trials([("img_a", "train"), ("t1", "validation")])
    with pytest.raises(TrainDataError, match="split"):
        write_session(
            tmp_path / "split", subject="s1", session=1, trials=bad_split, betas=np.zeros((2, 4)), images=pixels
        )
    for folder in ("rows", "img", "dtype", "bmp", "split"):
        assert not (tmp_path / folder / "session.json").exists()  # nothing half-written passes as a bundle


def test_a_copied_bundle_folder_reads_the_same(bundles):
    """Bundles are plain folders: copying one elsewhere keeps it readable (no absolute paths inside)."""
    copy = bundles["root"].parent / "copy"
    shutil.copytree(bundles["root"], copy)
    a = load_sessions(find_sessions(bundles["root"]), image_size_px=SIZE_PX)
    b = load_sessions(find_sessions(copy), image_size_px=SIZE_PX)
    for x, y in zip(a.subjects, b.subjects, strict=True):
        np.testing.assert_array_equal(x.betas, y.betas)
        np.testing.assert_array_equal(x.test_rows, y.test_rows)
    np.testing.assert_array_equal(a.images.read(np.arange(8)), b.images.read(np.arange(8)))


# ------------------------------------------------------------------------------------------------ source.py


def test_group_test_trials_pads_cyclically_to_three():
    rows = np.array([10, 11, 12, 13, 14, 15, 16, 17])
    images = np.array([5, 2, 5, 9, 2, 5, 7, 7])
    grouped, unique = group_test_trials(rows, images)
    assert TEST_REPS == 3
    np.testing.assert_array_equal(unique, [2, 5, 7, 9])
    np.testing.assert_array_equal(grouped, [[11, 14, 11], [10, 12, 15], [16, 17, 16], [13, 13, 13]])
    assert grouped.dtype == np.int64 and unique.dtype == np.int64
    empty_rows, empty_images = group_test_trials(np.array([], dtype=np.int64), np.array([], dtype=np.int64))
    assert empty_rows.shape == (0, 3) and empty_images.shape == (0,)


def _subject(**changes) -> SubjectData:
    fields = {
        "name": "s1",
        "betas": np.zeros((6, 3), dtype=np.float32),
        "train_rows": np.array([0, 1]),
        "train_images": np.array([0, 1]),
        "test_rows": np.array([[2, 3, 2], [4, 5, 4]]),
        "test_images": np.array([2, 3]),
        "origin": "made.h5",
    }
    return SubjectData(**{**fields, **changes})


class _Images:
    n_images = 4
    identity = "four"

    def read(self, indices: np.ndarray) -> np.ndarray:
        return np.zeros((len(indices), 3, 2, 2), dtype=np.float32)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"train_rows": np.array([], dtype=np.int64), "train_images": np.array([], dtype=np.int64)}, "train split"),
        ({"test_rows": np.zeros((0, 3), dtype=np.int64), "test_images": np.array([], dtype=np.int64)}, "0 image(s)"),
        ({"test_rows": np.array([[2, 3, 2]]), "test_images": np.array([2])}, "1 image(s)"),
        ({"train_rows": np.array([0, 6])}, "[0, 6)"),
        ({"test_rows": np.array([[2, 3, -1], [4, 5, 4]])}, "test trial rows"),
        ({"train_images": np.array([0, 4])}, "[0, 4)"),
        ({"train_images": np.array([0])}, "differ in length"),
        ({"test_rows": np.array([[2, 3], [4, 5]])}, "(2, 3)"),
        ({"betas": np.zeros(6, dtype=np.float32)}, "(n_trials, n_voxels)"),
    ],
)
def test_check_dataset_refuses_bad_subjects(changes, message):
    check_dataset(Dataset((_subject(),), _Images(), "made"))  # the unchanged subject passes
    error = _raises([message, "'s1'", "made.h5"], check_dataset, Dataset((_subject(**changes),), _Images(), "made"))
    assert isinstance(error, ValueError)


def test_check_dataset_refuses_no_subjects_and_a_repeated_subject():
    _raises(["made", "no subjects"], check_dataset, Dataset((), _Images(), "made"))
    _raises(["'s1'", "twice"], check_dataset, Dataset((_subject(), _subject()), _Images(), "made"))


def test_folder_images_is_an_image_store(bundles):
    store = load_sessions(find_sessions(bundles["root"]), image_size_px=SIZE_PX).images
    assert isinstance(store, FolderImages)
    assert store.stimulus_ids == tuple(sorted(STIMULI))
    assert store.identity.startswith("session-images:")


def test_train_trials_of_another_subjects_test_image_are_left_out(tmp_path):
    """Each subject trains on an image the other is validated on: the shared model must not learn its target."""
    values = {"a": 10, "b": 90, "c": 160, "d": 230}
    pixels = {name: np.full((4, 4, 3), value, dtype=np.uint8) for name, value in values.items()}
    plan = {"s1": {"test": "ab", "train": "cd"}, "s2": {"test": "bd", "train": "ac"}}
    for name, splits in plan.items():
        trials = [Trial(f"{split}-{image}", 1, image, split) for split, images in splits.items() for image in images]
        betas = np.zeros((len(trials), 3), dtype=np.float32)
        write_session(tmp_path / name, subject=name, session=1, betas=betas, trials=trials, images=pixels)
    dataset = load_sessions(find_sessions(tmp_path), image_size_px=4)
    index = dataset.images.index
    for subject in dataset.subjects:
        assert subject.train_images.tolist() == [index["c"]], subject.name  # a (s1 test), d (s2 test) left out
