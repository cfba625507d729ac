"""A live session: volumes at pace into a watched folder, events lines only once their onset is acquired."""

import json
import threading

import nibabel as nib
import numpy as np
import pytest

from rtdecode.errors import ConfigError
from rtdecode.glm.events import EventsTsv
from rtdecode.ingest.reader import VolumeReader
from rtdecode.sim.live import TRIAL_RESPONSE_S, LiveSession
from rtdecode.sim.session import world_from_truth, write_world_session
from rtdecode.sim.world import SyntheticWorld, WorldConfig

SHAPE = (28, 32, 24)  # the smallest grid the daemon's motion correction takes
SUBJECT = "syn01"
N_VOLUMES = 30
SPEED = 40.0
TR_S = 1.6


@pytest.fixture(scope="module")
def world():
    config = WorldConfig(
        subjects=("syn01", "syn02"), n_voxels=(40, 50), n_test_images=4, n_train_images=10, trials_per_run=13
    )
    return SyntheticWorld(config)


def complete_lines(path):
    """The events file's data lines that end in a newline (what a reader may take), as trial ids."""
    if not path.exists():
        return []
    lines = path.read_text().split("\n")[:-1]
    return [line.split("\t")[2] for line in lines[1:]]


def covering_index(onset_s, n_volumes):
    """The volume whose acquisition slot [i * TR, (i + 1) * TR) holds the onset (the scanner's arithmetic)."""
    return sum(1 for index in range(n_volumes) if index * TR_S <= onset_s) - 1


def read_one(path):
    [volume], finished = VolumeReader().read(path)
    assert finished
    return volume


@pytest.fixture(scope="module")
def played(world, tmp_path_factory):
    """Runs 1 and 2, cut to 30 volumes, at 40x speed, run 2 with volume 5 dropped; at every write, the trial
    lines of that run's events file then readable."""
    session = LiveSession(
        world,
        SUBJECT,
        1,
        tmp_path_factory.mktemp("live") / "session",
        runs=[1, 2],
        shape=SHAPE,
        seed=3,
        speed=SPEED,
        faults={2: ["drop@5"]},
        n_volumes=N_VOLUMES,
    )
    layout = session.prepare()
    snapshots = []

    def seen(run, record):
        snapshots.append((run, record, complete_lines(layout.events_path(run))))

    results = session.run(on_write=seen)
    return session, layout, results, snapshots


def test_files_appear_per_run_with_the_runs_faults(played):
    session, layout, results, _ = played
    names = sorted(p.name for p in layout.watch_dir.iterdir())
    run_1 = [f"001_000001_{k:06d}.dcm" for k in range(1, N_VOLUMES + 1)]
    run_2 = [f"001_000002_{k:06d}.dcm" for k in range(1, N_VOLUMES + 1) if k != 6]  # drop@5: volume 6 never written
    assert names == run_1 + run_2
    assert [(r.run, r.series_numbers, len(r.writes), r.completed) for r in results] == [
        (1, (1,), 30, True),
        (2, (2,), 29, True),
    ]
    volume = read_one(layout.watch_dir / "001_000002_000007.dcm")
    assert (volume.series_number, volume.volume_number) == (2, 7)
    assert [truth.series_numbers for truth in session.truth] == [(1,), (2,)]


def test_each_line_appears_only_after_the_volume_covering_its_onset(played):
    session, layout, _, snapshots = played
    onsets = {(t.run, t.trial_id): t.onset_s for truth in session.truth for t in truth.trials}
    for run, record, visible in snapshots:
        acquired_index = round(record.write.acquired_s / TR_S)
        for trial_id in visible:
            assert covering_index(onsets[run, trial_id], N_VOLUMES) <= acquired_index, (run, trial_id, acquired_index)
    for run in (1, 2):
        run_snapshots = [visible for r, _, visible in snapshots if r == run]
        assert run_snapshots[0] == []  # nothing up front: the first trial starts at 4 s at the earliest
        assert len({len(visible) for visible in run_snapshots}) >= 3  # lines came one by one as the run went
        assert complete_lines(layout.events_path(run)) == list(session.truth[run - 1].trial_ids)


def test_logged_trials_report_when_and_after_what(played):
    session, _, results, _ = played
    for result, truth in zip(results, session.truth, strict=True):
        assert tuple(logged.trial for logged in result.logged) == truth.trials
        write_times_s = [record.closed_s for record in result.writes]
        for logged in result.logged:
            assert logged.scanner_s >= logged.trial.onset_s
            covering = covering_index(logged.trial.onset_s, N_VOLUMES)
            closed_before = [
                r.closed_s for r in result.writes if round(r.write.acquired_s / TR_S) == covering and not r.write.copy
            ]
            assert closed_before or (result.run, covering) == (2, 5)  # only the dropped volume is never written
            assert all(closed_s <= logged.logged_s for closed_s in closed_before)
            assert sum(closed_s <= logged.logged_s for closed_s in write_times_s) >= logged.n_writes_before


def test_events_parse_to_the_truth_and_stop_where_the_run_is_cut(world, played):
    session, layout, _, _ = played
    plans = [plan for plan in world.runs(SUBJECT) if plan.session == 1][:2]
    for plan, truth in zip(plans, session.truth, strict=True):
        events, errors = EventsTsv(layout.events_path(plan.run)).flush()
        assert errors == []
        assert tuple(e.trial_id for e in events) == truth.trial_ids
        assert tuple(e.stimulus_id for e in events) == truth.stimulus_ids
        n_logged = len(events)
        assert 2 <= n_logged < plan.design.n_trials
        assert truth.trial_ids == plan.design.trial_ids[:n_logged]
        np.testing.assert_allclose([e.onset_s for e in events], plan.design.onsets_s[:n_logged], atol=1e-3)
        run_s = N_VOLUMES * TR_S
        assert plan.design.onsets_s[n_logged - 1] + TRIAL_RESPONSE_S <= run_s
        assert plan.design.onsets_s[n_logged] + TRIAL_RESPONSE_S > run_s
        assert truth.stimulus_ids == tuple(world.image_ids[k] for k in truth.image_indices)
        np.testing.assert_array_equal(truth.image_indices, plan.image_indices[:n_logged])


def test_truth_images_and_world_are_on_disk(world, played):
    session, layout, _, _ = played
    truth = json.loads(layout.truth_path.read_text())
    logged = [t for run in session.truth for t in run.trials]
    assert [(t["run"], t["trial_id"], t["stimulus_id"]) for t in truth["trials"]] == [
        (t.run, t.trial_id, t.stimulus_id) for t in logged
    ]
    assert [(r["run"], r["series_numbers"], r["n_volumes"], r["faults"]) for r in truth["runs"]] == [
        (1, [1], 30, []),
        (2, [2], 30, ["drop@5"]),
    ]
    assert world_from_truth(layout.truth_path).config == world.config
    assert {p.stem for p in layout.images_dir.glob("*.png")} == {t.stimulus_id for t in logged}


def test_mask_and_reference_lie_on_the_grid_ingest_reads(world, played):
    session, layout, _, _ = played
    volume = read_one(layout.watch_dir / "001_000001_000001.dcm")
    mask_image = nib.load(layout.region_mask_path)
    reference_image = nib.load(layout.reference_path)
    for image in (mask_image, reference_image):
        assert image.shape == volume.data.shape == SHAPE
        np.testing.assert_allclose(image.affine, volume.affine, atol=1e-4)
    mask = np.asarray(mask_image.dataobj) > 0
    assert mask.sum() == 40
    np.testing.assert_array_equal(mask, session.region_mask)
    reference = np.asarray(reference_image.dataobj)
    bold = world.bold(SUBJECT, world.runs(SUBJECT)[0])
    np.testing.assert_array_equal(reference[mask], np.rint(bold.data[0]))  # run 1's first volume, unmoved
    brain = reference > 300
    assert np.corrcoef(reference[brain], volume.data[brain])[0, 1] > 0.9  # the written one, but moved


def test_without_motion_the_reference_is_the_first_volume_as_read(world, tmp_path):
    session = LiveSession(
        world,
        SUBJECT,
        1,
        tmp_path / "s",
        runs=[2],
        layout="nifti-gz",
        shape=SHAPE,
        motion_scale=0.0,
        speed=1e6,
        n_volumes=2,
    )
    layout = session.prepare()
    session.run()
    volume = read_one(layout.watch_dir / "vol_002_000001.nii.gz")
    reference = nib.load(layout.reference_path)
    np.testing.assert_array_equal(np.asarray(reference.dataobj), volume.data)
    np.testing.assert_allclose(reference.affine, volume.affine, atol=1e-4)


def test_pixels_are_those_of_the_written_session(world, tmp_path):
    arguments = dict(layout="nifti", shape=SHAPE, seed=5, motion_scale=1.0)
    written = write_world_session(world, SUBJECT, 1, tmp_path / "written", runs=[1], **arguments)
    live = LiveSession(world, SUBJECT, 1, tmp_path / "live", runs=[1], speed=1e6, n_volumes=3, **arguments)
    live.run()  # prepares first
    for number in (1, 2, 3):
        name = f"vol_001_{number:06d}.nii"
        np.testing.assert_array_equal(
            read_one(tmp_path / "live" / "watch" / name).data, read_one(written.raw_dir / name).data
        )
    mask = nib.load(written.region_mask_path)
    np.testing.assert_array_equal(np.asarray(mask.dataobj) > 0, live.region_mask)


def test_stop_ends_the_session_early(world, tmp_path):
    session = LiveSession(world, SUBJECT, 1, tmp_path / "s", runs=[1, 2], shape=SHAPE, speed=SPEED, n_volumes=20)
    layout = session.prepare()
    stop = threading.Event()

    def stop_after_six(run, record):
        if round(record.write.acquired_s / TR_S) == 5:
            stop.set()

    results = session.run(stop=stop, on_write=stop_after_six)
    assert [(r.run, len(r.writes), r.completed) for r in results] == [(1, 6, False)]
    assert len(list(layout.watch_dir.iterdir())) == 6
    onsets = {t.trial_id: t.onset_s for t in session.truth[0].trials}
    assert all(covering_index(onsets[t], 20) <= 5 for t in complete_lines(layout.events_path(1)))
    assert len(complete_lines(layout.events_path(1))) < len(onsets)
    assert not layout.events_path(2).exists()


def test_a_restart_moves_later_runs_to_new_series(world, tmp_path):
    session = LiveSession(
        world,
        SUBJECT,
        1,
        tmp_path / "s",
        runs=[1, 2],
        layout="nifti",
        shape=SHAPE,
        speed=1e6,
        n_volumes=6,
        faults={1: ["restart@3"]},
    )
    assert [truth.series_numbers for truth in session.truth] == [(1, 2), (3,)]
    layout = session.prepare()
    results = session.run()
    assert [r.series_numbers for r in results] == [(1, 2), (3,)]
    names = sorted(p.name for p in layout.watch_dir.iterdir())
    expected = [f"vol_001_{k:06d}.nii" for k in (1, 2, 3)] + [f"vol_002_{k:06d}.nii" for k in (1, 2, 3)]
    assert names == expected + [f"vol_003_{k:06d}.nii" for k in range(1, 7)]
    with pytest.raises(ConfigError, match="a session plays once"):
        session.run()


def test_an_error_in_a_callback_ends_the_session(world, tmp_path):
    session = LiveSession(world, SUBJECT, 1, tmp_path / "s", runs=[1, 2], shape=SHAPE, speed=1e3, n_volumes=20)

    def refuse(run, logged):
        raise RuntimeError(f"display gone at {logged.trial.trial_id}")

    with pytest.raises(RuntimeError, match="display gone at trial-001"):
        session.run(on_trial=refuse)
    assert not session.prepare().events_path(2).exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(faults={3: ["drop@1"]}), "run 3 is not among the runs written"),
        (dict(faults={1: ["drop@30"]}), "faults of run 1: .*only 30 volumes"),
        (dict(faults={1: ["vanish@2"]}), "faults of run 1: .*KIND@INDEX"),
        (dict(faults={1: ["drop@2"]}, layout="nifti-4d"), "only slow, restart apply"),
        (dict(n_volumes=0), "n_volumes must lie in 1..188"),
        (dict(n_volumes=189), "n_volumes must lie in 1..188"),
        (dict(speed=0.0), "speed must be a finite positive factor"),
        (dict(run_gap_s=-1.0), "run_gap_s must be finite and at least 0"),
        (dict(runs=[9]), "runs=\\[9\\]"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_written(world, tmp_path, overrides, message):
    arguments = dict(runs=[1, 2], shape=SHAPE, n_volumes=30) | overrides
    with pytest.raises(ConfigError, match=message):
        LiveSession(world, SUBJECT, 1, tmp_path / "s", **arguments)
    assert not (tmp_path / "s").exists()
