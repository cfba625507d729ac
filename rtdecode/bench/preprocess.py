"""``rtdecode bench preprocess``: time per volume of rigid motion correction + masking, and its accuracy.

A synthetic brain (:class:`~rtdecode.sim.phantom.BrainPhantom` on SyntheticRun's oblique 1.8 mm grid) moves
along a known, seeded trajectory: a slow random walk within 3 mm / 3 degrees with a few sudden jumps, plus
scanner-like noise. Each volume goes through :meth:`MotionCorrector.process` exactly as in the daemon, and the
figure timed is that call: input checks, 6-DOF registration to the run's reference, one trilinear read of the
volume at the mask's voxels. The run's first volume (the reference, whose preparation is a once-per-run cost)
and a few warm-up volumes are timed apart and left out of the statistics. Volumes are generated between
calls, outside the timed span.
"""

import dataclasses
import os
import time
from pathlib import Path

import numpy as np
import torch

from rtdecode.preprocess.mask import Mask
from rtdecode.preprocess.motion import MotionCorrector
from rtdecode.records import Volume
from rtdecode.sim.phantom import BrainPhantom
from rtdecode.sim.sources import SyntheticRun

NSD_SHAPE = (81, 104, 83)
NSDGENERAL_SUBJ01_VOXELS = 15_724
_NOISE_SD = 8.0  # as SyntheticRun: ~1% of tissue intensity
_N_WARMUP = 5
_MAX_TRANS_MM = 3.0
_MAX_ROT_RAD = np.deg2rad(3.0)


@dataclasses.dataclass(frozen=True)
class PreprocessBenchResult:
    """Timings (ms) and accuracy of motion correction + masking on one synthetic run."""

    shape: tuple[int, int, int]
    n_mask_voxels: int
    device: str
    n_threads: int
    reference_ms: float  # the run's first volume: reference preparation
    process_ms: np.ndarray  # (n_volumes,) per timed volume
    trans_error_mm: np.ndarray  # (n_volumes, 3) estimate - truth
    rot_error_deg: np.ndarray  # (n_volumes, 3)
    n_flagged: int
    n_true_jumps: int  # volumes whose true FD exceeds the threshold


def motion_trajectory(n_volumes: int, rng: np.random.Generator) -> np.ndarray:
    """``(n_volumes, 6)`` motion parameters: a random walk kept within 3 mm / 3 degrees, a few jumps, volume 0 still."""
    steps = rng.normal(0.0, 1.0, size=(n_volumes, 6)) * [0.04, 0.04, 0.04, *[np.deg2rad(0.04)] * 3]
    for jump in rng.choice(np.arange(1, n_volumes), size=max(1, n_volumes // 25), replace=False):
        steps[jump] += rng.choice([-1.0, 1.0], size=6) * [0.6, 0.6, 0.6, *[np.deg2rad(0.5)] * 3]
    steps[0] = 0.0
    limits = np.array([*[_MAX_TRANS_MM] * 3, *[_MAX_ROT_RAD] * 3])
    return np.clip(np.cumsum(steps, axis=0), -limits, limits)


def bench_preprocess(
    n_volumes: int = 100,
    shape=NSD_SHAPE,
    n_mask_voxels: int = NSDGENERAL_SUBJ01_VOXELS,
    device: str = "auto",
    seed: int = 0,
    fd_threshold_mm: float = 0.5,
) -> PreprocessBenchResult:
    """Run one synthetic run of ``_N_WARMUP + n_volumes`` volumes through a fresh MotionCorrector."""
    shape = tuple(int(n) for n in shape)
    affine = SyntheticRun(shape=shape).affine
    phantom = BrainPhantom(shape, affine, seed=seed)
    mask = Mask(phantom.region_mask(n_mask_voxels), affine, source="synthetic nsdgeneral-like region")
    corrector = MotionCorrector(mask, fd_threshold_mm=fd_threshold_mm, device=device)
    rng = np.random.default_rng(seed)
    truths = motion_trajectory(_N_WARMUP + n_volumes, rng)
    times_ms, estimates, flagged = [], [], []
    for index, truth in enumerate(truths):
        volume = _volume(phantom.moved(truth, noise_sd=_NOISE_SD, rng=rng), affine, index)
        start = time.perf_counter()
        result = corrector.process(volume)
        times_ms.append((time.perf_counter() - start) * 1000)
        estimates.append(result.motion_params)
        flagged.append(result.flagged)
    timed = slice(_N_WARMUP, None)
    errors = (np.array(estimates) - truths)[timed]
    true_fd = np.abs(np.diff(truths, axis=0)) @ [1, 1, 1, 50, 50, 50]
    return PreprocessBenchResult(
        shape=shape,
        n_mask_voxels=mask.n_voxels,
        device=str(corrector.device),
        n_threads=torch.get_num_threads(),
        reference_ms=times_ms[0],
        process_ms=np.array(times_ms[timed]),
        trans_error_mm=errors[:, :3],
        rot_error_deg=np.rad2deg(errors[:, 3:]),
        n_flagged=int(np.sum(flagged[timed])),
        n_true_jumps=int(np.sum(true_fd[_N_WARMUP - 1 :] > fd_threshold_mm)),
    )


def _volume(data: np.ndarray, affine: np.ndarray, index: int) -> Volume:
    return Volume(
        data=data,
        affine=affine,
        tr_s=1.6,
        acquisition_time_s=None,
        slice_times_s=None,
        series_number=1,
        run_index=1,
        volume_index=index,
        source=Path(f"synthetic/vol_{index:04d}"),
    )


def format_results(results: PreprocessBenchResult, goal_p95_ms: float = 50.0) -> str:
    r = results
    times = r.process_ms
    p95 = float(np.percentile(times, 95))
    rms_mm = float(np.sqrt(np.mean(r.trans_error_mm**2)))
    rms_deg = float(np.sqrt(np.mean(r.rot_error_deg**2)))
    lines = [
        f"rtdecode bench preprocess: {times.size} volumes (after {_N_WARMUP} warm-up), "
        f"{'x'.join(map(str, r.shape))} voxels, mask {r.n_mask_voxels} voxels, device {r.device}, "
        f"torch threads {r.n_threads}, {os.cpu_count()} CPUs",
        "motion correction + masking per volume (MotionCorrector.process), ms",
        f"{'median':>9}{'p95':>9}{'max':>9}   run reference (once per run)",
        f"{np.median(times):>9.2f}{p95:>9.2f}{times.max():>9.2f}   {r.reference_ms:.1f}",
        f"accuracy vs truth: translation RMS {rms_mm:.4f} mm (max {np.abs(r.trans_error_mm).max():.4f}), "
        f"rotation RMS {rms_deg:.4f} deg (max {np.abs(r.rot_error_deg).max():.4f})",
        f"flagged (FD > threshold): {r.n_flagged} volumes; true jumps over the threshold: {r.n_true_jumps}",
        f"goal: p95 <= {goal_p95_ms:g} ms: {'meets' if p95 <= goal_p95_ms else 'MISSES'}",
    ]
    return "\n".join(lines)
