"""``rtdecode bench glm``: the cost of a trial's beta at the end of a long run, next to a nilearn refit.

The data are a synthetic 3T run (TR 1.5 s, 63 trials, 288 volumes) in a mask the size of NSD subj01's
nsdgeneral (15,724 voxels). For each noise model it times, on the same data:

* ours: every volume's update, then every trial's beta with all 288 volumes in (what the daemon pays
  for the last trials of a run);
* nilearn: ``FirstLevelModel`` refitted per trial (probe vs reference), as real-time MindEye does;

and prints the medians, p95s, the ratio and the largest relative difference between the two betas.
nilearn comes with the ``dev`` extra.
"""

import dataclasses
import time
import warnings

import numpy as np

from rtdecode.glm.online import GlmSettings, OnlineGLM
from rtdecode.sim.trials import SyntheticBold, realtime_3t_design, synthetic_bold


@dataclasses.dataclass
class GlmBenchResult:
    noise_model: str
    volume_ms: np.ndarray
    trial_ms: np.ndarray
    nilearn_ms: np.ndarray
    max_relative_difference: float


def time_online(bold: SyntheticBold, noise_model: str) -> tuple[OnlineGLM, np.ndarray, np.ndarray]:
    """Feed the run; return the GLM, per-volume update ms and per-trial beta ms at the run's end."""
    design = bold.design
    settings = GlmSettings(
        tr_s=design.tr_s, noise_model=noise_model, planned_n_frames=design.n_volumes, emit_delay_s=1e9
    )
    glm = OnlineGLM(settings, bold.data.shape[1])
    for event in design.events():
        glm.add_event(event)
    volume_ms = []
    for frame in range(design.n_volumes):
        start = time.perf_counter()
        glm.add_volume(frame, bold.data[frame], bold.motion[frame])
        volume_ms.append((time.perf_counter() - start) * 1e3)
    trial_ms = []
    for trial_id in design.trial_ids:
        start = time.perf_counter()
        glm.estimate(trial_id)
        trial_ms.append((time.perf_counter() - start) * 1e3)
    return glm, np.array(volume_ms), np.array(trial_ms)


def nilearn_refits(
    bold: SyntheticBold, noise_model: str, trials: list[int], grid: tuple[int, int, int] | None = None
) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """nilearn per-trial refits on the same data: (ms per refit, betas by trial position).

    The masked data sit in a 4D image on ``grid`` (None: the smallest cube that holds them, nilearn's
    best case; (81, 104, 83): the acquisition grid a real-time pipeline hands it).
    """
    import nibabel as nib
    import pandas as pd
    from nilearn.glm.first_level import FirstLevelModel

    design = bold.design
    n_voxels = bold.data.shape[1]
    side = int(np.ceil(n_voxels ** (1 / 3)))
    grid = grid or (side, side, side)
    mask = np.zeros(int(np.prod(grid)), bool)
    start = (mask.size - n_voxels) // 2
    mask[start : start + n_voxels] = True
    mask = mask.reshape(grid)
    data = np.zeros((*grid, design.n_volumes), np.float32)
    data[mask] = bold.data.T
    affine = np.diag([1.8, 1.8, 1.8, 1.0])
    image, mask_image = nib.Nifti1Image(data, affine), nib.Nifti1Image(mask.astype(np.uint8), affine)
    confounds = pd.DataFrame(bold.motion, columns=[f"motion_{i}" for i in range(6)])
    times_ms, betas = [], {}
    for k in trials:
        trial_type = ["reference"] * design.n_trials
        trial_type[k] = "probe"
        events = pd.DataFrame({"onset": design.onsets_s, "duration": design.durations_s, "trial_type": trial_type})
        start = time.perf_counter()
        model = FirstLevelModel(
            t_r=design.tr_s,
            hrf_model="glover",
            drift_model="cosine",
            high_pass=0.01,
            noise_model=noise_model,
            signal_scaling=False,
            mask_img=mask_image,
            minimize_memory=True,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(image, events=events, confounds=confounds)
            effect = model.compute_contrast("probe", output_type="effect_size")
        times_ms.append((time.perf_counter() - start) * 1e3)
        betas[k] = np.asarray(effect.get_fdata())[mask]
    return np.array(times_ms), betas


def bench_glm(
    n_voxels: int = 15724, noise_models=("ols", "ar1"), n_nilearn: int = 3, seed: int = 0, nilearn_grid=None
) -> list:
    bold = synthetic_bold(realtime_3t_design(seed=seed), n_voxels, seed=seed)
    results = []
    trials = list(np.linspace(0, bold.design.n_trials - 1, n_nilearn).astype(int))
    for noise_model in noise_models:
        glm, volume_ms, trial_ms = time_online(bold, noise_model)
        nilearn_ms, oracle = nilearn_refits(bold, noise_model, trials, nilearn_grid)
        difference = max(
            float(np.abs(glm.estimate(bold.design.trial_ids[k]) - beta).max() / np.abs(beta).max())
            for k, beta in oracle.items()
        )
        results.append(GlmBenchResult(noise_model, volume_ms, trial_ms, nilearn_ms, difference))
    return results


def format_results(
    results: list[GlmBenchResult],
    n_voxels: int,
    goal_ms: float = 10.0,
    goal_ratio: float = 100.0,
    nilearn_grid: tuple[int, int, int] | None = None,
) -> str:
    """The table, with the grid nilearn was given."""
    where = "the smallest cube holding the mask" if nilearn_grid is None else "x".join(map(str, nilearn_grid))
    return _table(results, n_voxels, goal_ms, goal_ratio) + f"\nnilearn's 4D image grid: {where}."


def _table(results: list[GlmBenchResult], n_voxels: int, goal_ms: float = 10.0, goal_ratio: float = 100.0) -> str:
    lines = [
        f"single-trial LSS beta, 288 volumes, 63 trials, {n_voxels} voxels (TR 1.5 s); "
        f"goal: p95 <= {goal_ms:g} ms and >= {goal_ratio:g}x faster than a nilearn refit",
        f"{'noise':<6}{'volume p50/p95 ms':>19}{'trial p50/p95 ms':>18}{'nilearn p50 ms':>16}"
        f"{'ratio':>8}{'max rel diff':>14}  verdict",
    ]
    for r in results:
        ratio = np.median(r.nilearn_ms) / np.percentile(r.trial_ms, 95)
        ok = np.percentile(r.trial_ms, 95) <= goal_ms and ratio >= goal_ratio
        lines.append(
            f"{r.noise_model:<6}"
            f"{np.median(r.volume_ms):>10.2f} /{np.percentile(r.volume_ms, 95):>6.2f}"
            f"{np.median(r.trial_ms):>10.2f} /{np.percentile(r.trial_ms, 95):>6.2f}"
            f"{np.median(r.nilearn_ms):>16.0f}{ratio:>7.0f}x{r.max_relative_difference:>14.1e}  "
            f"{'meets goal' if ok else 'MISSES goal'}"
        )
    lines.append("ratio = nilearn median / our p95; nilearn refits the whole run per trial.")
    return "\n".join(lines)
