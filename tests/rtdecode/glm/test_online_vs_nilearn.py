"""Online betas at run end equal nilearn FirstLevelModel betas fitted with the same design.

nilearn is the independent oracle: it gets a 4D NIfTI, a mask image, a BIDS-style events table and the
motion confounds, and builds its own design matrix. LSS is nilearn's per-trial refit with the trial as
"probe" and every other trial as "reference" (as real-time MindEye fits it).
"""

import warnings

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from nilearn.glm.first_level import FirstLevelModel

from rtdecode.glm.online import GlmSettings, OnlineGLM
from rtdecode.records import TrialEvent
from rtdecode.sim.trials import nsd_design, realtime_3t_design, synthetic_bold

GRID = (5, 6, 7)
RELATIVE_TOLERANCE = 1e-4


def _mask(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(GRID) < 0.7


def _nilearn_betas(bold, mask, noise_model, trial_type, kept=None, slice_time_ref=0.0) -> dict[str, np.ndarray]:
    """Effect sizes per condition name from one nilearn fit."""
    design = bold.design
    data = np.zeros((*GRID, design.n_volumes), np.float32)
    data[mask] = bold.data.T
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    model = FirstLevelModel(
        t_r=design.tr_s,
        slice_time_ref=slice_time_ref,
        hrf_model="glover",
        drift_model="cosine",
        high_pass=0.01,
        noise_model=noise_model,
        signal_scaling=False,
        mask_img=nib.Nifti1Image(mask.astype(np.uint8), affine),
        minimize_memory=True,
    )
    events = pd.DataFrame({"onset": design.onsets_s, "duration": design.durations_s, "trial_type": trial_type})
    confounds = pd.DataFrame(bold.motion, columns=[f"motion_{i}" for i in range(6)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(
            nib.Nifti1Image(data, affine),
            events=events,
            confounds=confounds,
            sample_masks=None if kept is None else [np.flatnonzero(kept)],
        )
        return {
            name: np.asarray(model.compute_contrast(name, output_type="effect_size").get_fdata())[mask]
            for name in sorted(set(trial_type))
        }


def _run_online(bold, settings, order=None, events_after=None, kept=None) -> OnlineGLM:
    glm = OnlineGLM(settings, bold.data.shape[1], run_index=1)
    events = bold.design.events()
    frames = order if order is not None else range(bold.design.n_volumes)
    held = []
    for event in events:
        if events_after is not None and event.onset_s > events_after:
            held.append(event)
        else:
            glm.add_event(event)
    for frame in frames:
        if kept is None or kept[frame]:
            glm.add_volume(frame, bold.data[frame], bold.motion[frame])
        if held and frame == bold.design.n_volumes // 2:
            for event in held:  # the log arrives late: regressors catch up on frames already in
                glm.add_event(event)
            held = []
    glm.finish(bold.design.n_volumes)
    return glm


def _relative_error(mine: np.ndarray, oracle: np.ndarray) -> float:
    return float(np.abs(mine - oracle).max() / np.abs(oracle).max())


DESIGNS = {"nsd": nsd_design, "3t": realtime_3t_design}


@pytest.mark.parametrize("design_name", DESIGNS)
@pytest.mark.parametrize("noise_model", ["ols", "ar1"])
def test_lss_final_betas_equal_nilearn(design_name, noise_model):
    design = DESIGNS[design_name](seed=1)
    mask = _mask(2)
    bold = synthetic_bold(design, int(mask.sum()), seed=3)
    glm = _run_online(bold, GlmSettings(tr_s=design.tr_s, noise_model=noise_model))
    final = {beta.event.trial_id: beta.beta for beta in glm.betas("final")}
    assert len(final) == design.n_trials
    for k in (0, design.n_trials // 2, design.n_trials - 1):
        trial_type = ["reference"] * design.n_trials
        trial_type[k] = "probe"
        oracle = _nilearn_betas(bold, mask, noise_model, trial_type)["probe"]
        assert _relative_error(final[design.trial_ids[k]], oracle) < RELATIVE_TOLERANCE


@pytest.mark.parametrize("noise_model", ["ols", "ar1"])
def test_lsa_final_betas_equal_nilearn(noise_model):
    design = realtime_3t_design(seed=4)
    mask = _mask(5)
    bold = synthetic_bold(design, int(mask.sum()), seed=6)
    glm = _run_online(bold, GlmSettings(tr_s=design.tr_s, noise_model=noise_model, mode="lsa"))
    oracle = _nilearn_betas(bold, mask, noise_model, [f"t{k:03d}" for k in range(design.n_trials)])
    for k, beta in enumerate(glm.betas("final")):
        assert beta.event.trial_id == design.trial_ids[k]
        assert _relative_error(beta.beta, oracle[f"t{k:03d}"]) < RELATIVE_TOLERANCE


def test_late_volume_missing_volume_and_late_events_still_equal_nilearn():
    """Volumes out of order, one never arriving (censored, nilearn's sample_masks), events logged late."""
    design = nsd_design(seed=7)
    mask = _mask(8)
    bold = synthetic_bold(design, int(mask.sum()), seed=9)
    order = list(range(design.n_volumes))
    order[40], order[41] = order[41], order[40]  # 41 arrives before 40
    kept = np.ones(design.n_volumes, bool)
    kept[100] = False  # never arrives
    glm = _run_online(bold, GlmSettings(tr_s=design.tr_s, noise_model="ar1"), order, events_after=60.0, kept=kept)
    final = {beta.event.trial_id: beta.beta for beta in glm.betas("final")}
    k = 20
    trial_type = ["reference"] * design.n_trials
    trial_type[k] = "probe"
    oracle = _nilearn_betas(bold, mask, "ar1", trial_type, kept=kept)["probe"]
    assert _relative_error(final[design.trial_ids[k]], oracle) < RELATIVE_TOLERANCE


def test_online_betas_come_after_the_delay_and_track_the_truth():
    design = realtime_3t_design(seed=10)
    bold = synthetic_bold(design, 400, seed=11)
    settings = GlmSettings(tr_s=design.tr_s, emit_delay_s=7.5, planned_n_frames=design.n_volumes)
    glm = OnlineGLM(settings, 400)
    for event in design.events():
        glm.add_event(event)
    emitted_at = {}
    for frame in range(design.n_volumes):
        for beta in glm.add_volume(frame, bold.data[frame], bold.motion[frame]):
            emitted_at[beta.event.trial_id] = frame
            assert beta.version == "online" and beta.n_frames == frame + 1
    glm.finish()
    for k, trial_id in enumerate(design.trial_ids):
        # emitted with the first volume whose end passes onset + delay, not before
        frame = emitted_at[trial_id]
        assert (frame + 1) * design.tr_s >= design.onsets_s[k] + 7.5 > frame * design.tr_s
    online = np.stack([b.beta for b in glm.betas("online")])
    final = np.stack([b.beta for b in glm.betas("final")])
    online_r = np.median([np.corrcoef(online[k], bold.betas[k])[0, 1] for k in range(design.n_trials)])
    final_r = np.median([np.corrcoef(final[k], bold.betas[k])[0, 1] for k in range(design.n_trials)])
    assert 0.5 < online_r < final_r  # the run-end estimate has seen each trial's whole response


def test_slice_time_ref_and_a_missing_last_volume_equal_nilearn():
    design = nsd_design(seed=12)
    mask = _mask(13)
    bold = synthetic_bold(design, int(mask.sum()), seed=14)
    kept = np.ones(design.n_volumes, bool)
    kept[-1] = False  # the run's last volume never arrives; finish() is told the run's true length
    settings = GlmSettings(tr_s=design.tr_s, noise_model="ar1", slice_time_ref=0.5)
    glm = _run_online(bold, settings, kept=kept)
    final = {beta.event.trial_id: beta.beta for beta in glm.betas("final")}
    k = design.n_trials - 2
    trial_type = ["reference"] * design.n_trials
    trial_type[k] = "probe"
    oracle = _nilearn_betas(bold, mask, "ar1", trial_type, kept=kept, slice_time_ref=0.5)["probe"]
    assert _relative_error(final[design.trial_ids[k]], oracle) < RELATIVE_TOLERANCE


def test_a_trial_with_no_volume_after_its_onset_gets_no_beta(rng):
    """Its regressor is zero at every volume: reported as unestimable, never given the pooled beta."""
    glm = OnlineGLM(GlmSettings(tr_s=2.0, noise_model="ols", emit_delay_s=0.0, motion_regressors=False), 3)
    for trial_id, onset_s in [("a", 10.0), ("b", 30.0), ("late", 79.0)]:
        glm.add_event(TrialEvent(trial_id, onset_s, 2.0))
    online = []
    for frame in range(40):  # the last volume starts at 78 s
        online += glm.add_volume(frame, rng.normal(size=3))
    final = glm.finish()
    assert [b.event.trial_id for b in final] == ["a", "b"]
    assert "late" not in [b.event.trial_id for b in online]
    assert [e.trial_id for e in glm.unestimable()] == ["late"]
