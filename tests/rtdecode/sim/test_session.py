"""A simulated calibration session on disk: files, what the ingest reader makes of them, events, truth."""

import csv
import json

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from rtdecode.dicom_geometry import stacks_along_normal
from rtdecode.errors import ConfigError
from rtdecode.glm.events import EventsTsv
from rtdecode.ingest.reader import VolumeReader
from rtdecode.sim.phantom import BrainPhantom
from rtdecode.sim.session import (
    MOTION_COLUMNS,
    phantom_affine,
    rigidly_moved,
    scaled_motion,
    world_from_truth,
    write_world_session,
)
from rtdecode.sim.world import SyntheticWorld, WorldConfig

SHAPE = (12, 14, 10)
SUBJECT = "syn01"


@pytest.fixture(scope="module")
def world():
    config = WorldConfig(
        subjects=("syn01", "syn02"),
        n_voxels=(40, 50),
        n_test_images=4,
        n_train_images=10,
        trials_per_run=13,
        n_runs_per_session=None,
    )
    return SyntheticWorld(config)


@pytest.fixture(scope="module")
def still_session(world, tmp_path_factory):
    """Run 1 of session 1 as mosaic DICOM, without motion."""
    out_dir = tmp_path_factory.mktemp("still") / "session"
    return write_world_session(world, SUBJECT, 1, out_dir, shape=SHAPE, runs=[1], motion_scale=0.0, seed=3)


@pytest.fixture(scope="module")
def moving_session(world, tmp_path_factory):
    """Every run of session 1 as 3D NIfTI files, with motion."""
    out_dir = tmp_path_factory.mktemp("moving") / "session"
    return write_world_session(world, SUBJECT, 1, out_dir, layout="nifti", shape=SHAPE, motion_scale=1.0, seed=3)


def read_volumes(paths):
    reader = VolumeReader()
    volumes = []
    for path in sorted(paths, key=reader.sort_key):
        found, finished = reader.read(path)
        assert finished
        volumes.extend(found)
    return volumes


def first_plan(world):
    return world.runs(SUBJECT)[0]


def test_files_exist_and_counts_match(world, still_session):
    plan = first_plan(world)
    assert len(list(still_session.raw_dir.glob("*.dcm"))) == plan.design.n_volumes == 188
    assert [p.name for p in still_session.events] == ["run-01_events.tsv"]
    assert still_session.series_numbers == (1,)
    pngs = sorted(p.stem for p in still_session.images_dir.glob("*.png"))
    assert pngs == sorted(set(plan.design.stimulus_ids))
    assert still_session.region_mask_path.is_file()
    truth = json.loads(still_session.truth_path.read_text())
    assert (truth["subject"], truth["session"], truth["n_region_voxels"]) == (SUBJECT, 1, 40)
    assert [run["run"] for run in truth["runs"]] == [1]
    assert len(truth["trials"]) == plan.design.n_trials
    first = truth["trials"][0]
    assert first["stimulus_id"] == world.image_ids[first["image_index"]]
    assert first["split"] == plan.splits[0]
    rebuilt = world_from_truth(still_session.truth_path)
    assert rebuilt.config == world.config
    np.testing.assert_array_equal(
        rebuilt.bold(SUBJECT, rebuilt.runs(SUBJECT)[0]).betas, world.bold(SUBJECT, plan).betas
    )


def test_stimulus_images_are_the_worlds(world, still_session):
    plan = first_plan(world)
    index = int(plan.image_indices[0])
    with Image.open(still_session.image_path(world.image_ids[index])) as image:
        written = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    expected = world.images(np.array([index]))[0].transpose(1, 2, 0)
    assert written.shape == (world.config.image_size_px, world.config.image_size_px, 3)
    assert np.abs(written - expected).max() <= 0.5 / 255.0 + 1e-6


def test_ingested_dicom_carries_the_bold_on_the_masks_grid(world, still_session):
    plan = first_plan(world)
    bold = world.bold(SUBJECT, plan)
    volumes = read_volumes(still_session.raw_dir.glob("*.dcm"))
    assert [v.volume_number for v in volumes] == list(range(1, 189))
    assert {v.series_number for v in volumes} == {1}
    mask_image = nib.load(still_session.region_mask_path)
    mask = np.asarray(mask_image.dataobj) > 0
    assert mask.sum() == 40
    assert mask.shape == volumes[0].data.shape == SHAPE
    np.testing.assert_allclose(mask_image.affine, volumes[0].affine, atol=1e-4)
    region = np.stack([v.data[mask] for v in volumes])
    assert np.abs(region - np.rint(bold.data)).max() <= 1.0
    np.testing.assert_array_equal(region, np.rint(bold.data))  # no motion: exactly the world's numbers


def test_voxels_outside_the_region_are_the_phantom_plus_noise(world, still_session):
    [volume] = read_volumes(sorted(still_session.raw_dir.glob("*.dcm"))[:1])
    mask = np.asarray(nib.load(still_session.region_mask_path).dataobj) > 0
    truth = json.loads(still_session.truth_path.read_text())
    phantom = BrainPhantom(SHAPE, phantom_affine(SHAPE, 3.0), seed=truth["simulation"]["phantom_seed"])
    brain = (phantom.data > 300) & ~mask  # away from the background, where clipping at 0 bites
    residual = volume.data[brain] - phantom.data[brain]
    assert truth["simulation"]["noise_sd"] == 10.0
    assert 8.0 < residual.std() < 12.0  # fresh noise of sd 10 on the phantom's head
    assert abs(residual.mean()) < 2.0


def test_events_parse_to_the_design(world, still_session):
    plan = first_plan(world)
    events, errors = EventsTsv(still_session.events[0]).flush()
    assert errors == []
    np.testing.assert_allclose([e.onset_s for e in events], plan.design.onsets_s, atol=1e-3)
    np.testing.assert_allclose([e.duration_s for e in events], plan.design.durations_s, atol=1e-3)
    assert tuple(e.stimulus_id for e in events) == plan.design.stimulus_ids
    assert tuple(e.trial_id for e in events) == plan.design.trial_ids
    with open(still_session.events[0], newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert tuple(row["split"] for row in rows) == plan.splits
    assert {"train", "test"} <= set(plan.splits)


def test_same_seed_same_pixels_other_seed_other_noise(world, still_session, tmp_path):
    again = write_world_session(world, SUBJECT, 1, tmp_path / "a", shape=SHAPE, runs=[1], motion_scale=0.0, seed=3)
    other = write_world_session(world, SUBJECT, 1, tmp_path / "b", shape=SHAPE, runs=[1], motion_scale=0.0, seed=4)
    name = "001_000001_000005.dcm"
    pixels = [pydicom.dcmread(layout.raw_dir / name).PixelData for layout in (still_session, again, other)]
    assert pixels[0] == pixels[1]
    assert pixels[0] != pixels[2]
    for layout in (again, other):
        assert (layout.events[0]).read_bytes() == still_session.events[0].read_bytes()
    mask = np.asarray(nib.load(still_session.region_mask_path).dataobj) > 0
    first, changed = (read_volumes([layout.raw_dir / name])[0].data for layout in (still_session, other))
    np.testing.assert_array_equal(first[mask], changed[mask])  # the subject's BOLD is the world's, not the seed's
    assert np.mean(first[~mask] != changed[~mask]) > 0.9


def test_a_whole_moving_session(world, moving_session):
    plans = [p for p in world.runs(SUBJECT) if p.session == 1]
    assert len(plans) == 3
    assert [p.name for p in moving_session.events] == ["run-01_events.tsv", "run-02_events.tsv", "run-03_events.tsv"]
    volumes = read_volumes(moving_session.raw_dir.iterdir())
    assert [v.series_number for v in volumes] == [1] * 188 + [2] * 188 + [3] * 188
    shown = {s for p in plans for s in p.design.stimulus_ids}
    assert {p.stem for p in moving_session.images_dir.glob("*.png")} == shown
    truth = json.loads(moving_session.truth_path.read_text())
    assert len(truth["trials"]) == sum(p.design.n_trials for p in plans)
    for plan, run in zip(plans, truth["runs"], strict=True):
        bold = world.bold(SUBJECT, plan)
        with open(moving_session.raw_dir.parent / run["motion"], newline="") as handle:
            rows = list(csv.reader(handle, delimiter="\t"))
        assert tuple(rows[0]) == MOTION_COLUMNS
        applied = np.array(rows[1:], dtype=np.float64)
        np.testing.assert_allclose(applied, scaled_motion(bold.motion, 1.0), atol=1e-8)
        assert np.abs(applied[:, :3]).max() > 0.05  # some motion in mm
        assert np.degrees(np.abs(applied[:, 3:])).max() < 0.5
    mask = np.asarray(nib.load(moving_session.region_mask_path).dataobj) > 0
    last = volumes[187]
    bold = world.bold(SUBJECT, plans[0])
    assert np.abs(last.data[mask] - np.rint(bold.data[187])).max() > 1.0  # moved: the region is resampled


def test_motion_follows_the_phantoms_convention():
    affine = phantom_affine(SHAPE, 3.0)
    phantom = BrainPhantom(SHAPE, affine, seed=2)
    params = np.array([0.8, -0.5, 0.3, 0.004, -0.003, 0.005])
    ours = rigidly_moved(phantom.data.astype(np.float64), affine, phantom.centre_mm, params)
    np.testing.assert_allclose(ours, phantom.moved(params), atol=1e-2)
    assert np.abs(ours - phantom.data).max() > 20.0


def test_phantom_grid_is_written_by_dicom_as_it_is():
    assert stacks_along_normal(phantom_affine(SHAPE, 3.0))
    assert np.allclose(phantom_affine(SHAPE, 3.0) @ [*((np.array(SHAPE) - 1) / 2), 1], [0, 0, 0, 1])


def test_bad_subject_session_or_runs_are_refused(world, tmp_path):
    with pytest.raises(ConfigError, match="nobody"):
        write_world_session(world, "nobody", 1, tmp_path / "a", shape=SHAPE)
    with pytest.raises(ConfigError, match=r"syn01.*no session 7.*\[1\]"):
        write_world_session(world, SUBJECT, 7, tmp_path / "b", shape=SHAPE)
    with pytest.raises(ConfigError, match=r"runs=\[9\].*\[1, 2, 3\]"):
        write_world_session(world, SUBJECT, 1, tmp_path / "c", shape=SHAPE, runs=[9])
    with pytest.raises(ConfigError, match="layout"):
        write_world_session(world, SUBJECT, 1, tmp_path / "d", shape=SHAPE, layout="jpeg")
    with pytest.raises(ConfigError, match="larger shape"):
        write_world_session(world, SUBJECT, 1, tmp_path / "e", shape=(4, 4, 4))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "other.dcm").write_bytes(b"x")
    with pytest.raises(ConfigError, match="not empty"):
        write_world_session(world, SUBJECT, 1, tmp_path / "full", shape=SHAPE)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
