"""Synthetic trial designs and masked BOLD time series with known single-trial betas.

Two designs from the brief: NSD's (7T, TR 1.6 s, 3 s image then 1 s gap, some blank slots, 188 volumes)
and a 3T real-time design (TR 1.5 s, 63 trials, 288 volumes, jittered gaps). The data are
``baseline + sum_k beta_k * hrf(t - onset_k) + drift + motion artefact + AR(1) noise`` with an SPM-style
canonical HRF of the simulator's own (not the GLM's), so an estimator is tested against data it did not
generate.
"""

import dataclasses
from collections.abc import Sequence

import numpy as np
from scipy import stats

from rtdecode.records import TrialEvent


@dataclasses.dataclass(frozen=True)
class TrialDesign:
    """When each trial happened in a run."""

    tr_s: float
    n_volumes: int
    onsets_s: np.ndarray
    durations_s: np.ndarray
    stimulus_ids: tuple[str, ...]

    @property
    def n_trials(self) -> int:
        return self.onsets_s.size

    @property
    def trial_ids(self) -> tuple[str, ...]:
        return tuple(f"trial-{k + 1:03d}" for k in range(self.n_trials))

    def events(self) -> list[TrialEvent]:
        """The design as the stimulus program would log it."""
        return [
            TrialEvent(trial_id, float(onset), float(duration), stimulus)
            for trial_id, onset, duration, stimulus in zip(
                self.trial_ids, self.onsets_s, self.durations_s, self.stimulus_ids, strict=True
            )
        ]


def nsd_design(
    seed: int = 0, n_trials: int = 62, n_blank: int = 10, stimulus_ids: Sequence[str] | None = None
) -> TrialDesign:
    """NSD timing: 4 s slots (3 s image, 1 s gap) after a 4 s lead-in, ``n_blank`` random slots empty.

    ``stimulus_ids`` (``n_trials`` of them, in trial order) name what each trial shows; without them random
    NSD-style ids are drawn. The slots are drawn first either way, so the timing does not depend on them.
    """
    if stimulus_ids is not None and len(stimulus_ids) != n_trials:
        raise ValueError(f"stimulus_ids must hold n_trials={n_trials} ids, got {len(stimulus_ids)}")
    rng = np.random.default_rng(seed)
    slots = np.sort(rng.choice(n_trials + n_blank, size=n_trials, replace=False))
    onsets = 4.0 + 4.0 * slots
    stimuli = _stimuli(rng, n_trials) if stimulus_ids is None else tuple(stimulus_ids)
    return TrialDesign(1.6, 188, onsets, np.full(n_trials, 3.0), stimuli)


def realtime_3t_design(seed: int = 0, n_trials: int = 63, n_volumes: int = 288, tr_s: float = 1.5) -> TrialDesign:
    """A 3T run: 3 s images with gaps jittered between 2 and 5 s, spread to end 16 s before the run does."""
    rng = np.random.default_rng(seed)
    gaps = rng.uniform(2.0, 5.0, n_trials)
    starts = 6.0 + np.concatenate([[0.0], np.cumsum(3.0 + gaps[:-1])])
    last_onset_s = n_volumes * tr_s - 16.0 - 3.0
    onsets = 6.0 + (starts - 6.0) * min(1.0, (last_onset_s - 6.0) / (starts[-1] - 6.0))
    return TrialDesign(tr_s, n_volumes, onsets, np.full(n_trials, 3.0), _stimuli(rng, n_trials))


def _stimuli(rng: np.random.Generator, n_trials: int) -> tuple[str, ...]:
    return tuple(f"stim-{i:05d}" for i in rng.choice(73000, size=n_trials, replace=False))


def canonical_hrf(times_s: np.ndarray) -> np.ndarray:
    """SPM-style double gamma (peak 6 s, undershoot 16 s, ratio 1/6), peak-normalised; 0 before 0."""
    response = stats.gamma.pdf(times_s, 6.0) - stats.gamma.pdf(times_s, 16.0) / 6.0
    return np.where(times_s > 0, response, 0.0) / stats.gamma.pdf(5.0, 6.0)


def trial_responses(design: TrialDesign, dt_s: float = 0.05) -> np.ndarray:
    """Each trial's response at the volume starts: (n_volumes, n_trials), a boxcar convolved with the HRF."""
    fine_s = np.arange(0.0, design.n_volumes * design.tr_s + 40.0, dt_s)
    kernel = canonical_hrf(np.arange(0.0, 32.0, dt_s)) * dt_s
    frames = np.rint(np.arange(design.n_volumes) * design.tr_s / dt_s).astype(int)
    columns = []
    for onset_s, duration_s in zip(design.onsets_s, design.durations_s, strict=True):
        boxcar = ((fine_s >= onset_s) & (fine_s < onset_s + duration_s)).astype(float)
        columns.append(np.convolve(boxcar, kernel)[: fine_s.size][frames])
    return np.stack(columns, axis=1)


@dataclasses.dataclass(frozen=True)
class SyntheticBold:
    """A masked run: ``data`` (n_volumes, n_voxels) float32, ``motion`` (n_volumes, 6), ``betas`` (n_trials,
    n_voxels)."""

    design: TrialDesign
    data: np.ndarray
    motion: np.ndarray
    betas: np.ndarray


def synthetic_bold(
    design: TrialDesign,
    n_voxels: int,
    seed: int = 0,
    baseline: float = 1000.0,
    beta_sd: float = 15.0,
    noise_sd: float = 10.0,
    ar1: float = 0.3,
    betas: np.ndarray | None = None,
) -> SyntheticBold:
    """Masked BOLD with known betas, slow drift, a small motion artefact and AR(1) noise.

    Without ``betas`` they are drawn (mean and sd ``beta_sd``); given ones, (n_trials, n_voxels), are used as
    they are (the synthetic world passes its subjects' responses) and ``beta_sd`` is ignored.
    """
    rng = np.random.default_rng(seed)
    n = design.n_volumes
    if betas is None:
        betas = rng.normal(0.0, beta_sd, (design.n_trials, n_voxels)) + beta_sd
    elif np.shape(betas) != (design.n_trials, n_voxels):
        raise ValueError(f"betas must be (n_trials, n_voxels) = ({design.n_trials}, {n_voxels}), got {np.shape(betas)}")
    else:
        betas = np.asarray(betas, dtype=np.float64)
    motion = np.cumsum(rng.normal(0.0, 0.01, (n, 6)), axis=0)
    innovations = rng.normal(0.0, noise_sd * np.sqrt(1 - ar1**2), (n, n_voxels))
    noise = np.empty_like(innovations)
    noise[0] = innovations[0] / np.sqrt(1 - ar1**2)
    for t in range(1, n):
        noise[t] = ar1 * noise[t - 1] + innovations[t]
    ramp = np.linspace(-1.0, 1.0, n)
    drift = np.outer(ramp, rng.normal(0.0, 20.0, n_voxels)) + np.outer(ramp**2, rng.normal(0.0, 10.0, n_voxels))
    artefact = motion @ rng.normal(0.0, 5.0, (6, n_voxels))
    level = baseline * rng.uniform(0.5, 1.5, n_voxels)
    data = level + trial_responses(design) @ betas + drift + artefact + noise
    return SyntheticBold(design, data.astype(np.float32), motion, betas)
