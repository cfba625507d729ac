"""Per-voxel z-scoring of betas: fixed statistics from calibration, or running statistics in the session.

MindEye2 was trained on betas z-scored per voxel over a session (NSD, StandardScaler: population
standard deviation). Two ways to do the same online:

* ``"calibration"``: the mean and standard deviation saved with the subject bundle
  (:meth:`ZScore.from_betas` over the calibration session's betas). A voxel with zero spread is
  divided by 1, as StandardScaler does.
* ``"running"``: the mean and standard deviation of every beta observed so far in the session,
  this one included (Welford's update), plus ``epsilon`` in the denominator, as real-time MindEye
  did. ``warmup`` betas are observed before any is considered normalised.

Statistics are saved as ``.npz`` (no pickle) and load back into the same state, so a restarted
session continues its running statistics.
"""

import dataclasses
import time
from pathlib import Path

import numpy as np

from rtdecode.errors import GlmError
from rtdecode.records import TrialBeta

METHODS = ("calibration", "running")


@dataclasses.dataclass
class ZScore:
    """Per-voxel statistics and how they evolve.

    Attributes
    ----------
    method : "calibration" or "running"
    count : int
        Betas observed.
    mean : (n_voxels,) float64
    m2 : (n_voxels,) float64
        Sum of squared deviations from the mean (Welford).
    epsilon : float
        Added to the running standard deviation.
    warmup : int
        Running method: betas to observe before :attr:`ready` is true.
    """

    method: str
    count: int
    mean: np.ndarray
    m2: np.ndarray
    epsilon: float = 1e-6
    warmup: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise GlmError(f"normalisation method must be one of {METHODS}, got {self.method!r}")
        if self.mean.shape != self.m2.shape or self.mean.ndim != 1:
            raise GlmError(f"normalisation statistics have shapes {self.mean.shape} and {self.m2.shape}")

    @classmethod
    def running(cls, n_voxels: int, epsilon: float = 1e-6, warmup: int = 0) -> "ZScore":
        return cls("running", 0, np.zeros(n_voxels), np.zeros(n_voxels), epsilon, warmup)

    @classmethod
    def from_betas(cls, betas: np.ndarray) -> "ZScore":
        """Fixed statistics of a (n_trials, n_voxels) matrix (calibration)."""
        betas = np.asarray(betas, np.float64)
        if betas.ndim != 2 or betas.shape[0] < 2:
            raise GlmError(f"calibration statistics need a (n_trials >= 2, n_voxels) matrix, got {betas.shape}")
        mean = betas.mean(axis=0)
        return cls("calibration", betas.shape[0], mean, ((betas - mean) ** 2).sum(axis=0), epsilon=0.0)

    @property
    def n_voxels(self) -> int:
        return self.mean.size

    @property
    def ready(self) -> bool:
        return self.count > 0 and (self.method == "calibration" or self.count >= self.warmup)

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation (0 before two betas)."""
        return np.sqrt(self.m2 / self.count) if self.count else np.zeros_like(self.mean)

    def observe(self, beta: np.ndarray) -> None:
        """Fold one beta into running statistics (calibration statistics never change)."""
        if self.method != "running":
            return
        beta = self._checked(beta)
        self.count += 1
        delta = beta - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (beta - self.mean)

    def apply(self, beta: np.ndarray) -> np.ndarray:
        """``beta`` z-scored with the current statistics (float32)."""
        beta = self._checked(beta)
        if self.count == 0:
            raise GlmError("no betas observed yet: running statistics cannot normalise")
        if self.method == "calibration":
            std = np.where(self.std > 0, self.std, 1.0)
            return ((beta - self.mean) / std).astype(np.float32)
        return ((beta - self.mean) / (self.std + self.epsilon)).astype(np.float32)

    def normalise(self, trial: TrialBeta, observe: bool = True) -> TrialBeta:
        """The trial with ``zscored`` set; running statistics first observe it when ``observe``."""
        if observe:
            self.observe(trial.beta)
        stamps = dict(trial.timestamps)
        stamps["normalised"] = time.monotonic()
        return dataclasses.replace(trial, zscored=self.apply(trial.beta), timestamps=stamps)

    def _checked(self, beta: np.ndarray) -> np.ndarray:
        beta = np.asarray(beta, np.float64)
        if beta.shape != self.mean.shape:
            raise GlmError(f"beta has shape {beta.shape}; the normalisation statistics are for {self.mean.shape}")
        return beta

    def save(self, path: Path) -> None:
        """Write the statistics to ``path`` (.npz)."""
        np.savez(
            path,
            method=np.array(self.method),
            count=np.array(self.count),
            mean=self.mean,
            m2=self.m2,
            epsilon=np.array(self.epsilon),
            warmup=np.array(self.warmup),
        )

    @classmethod
    def load(cls, path: Path) -> "ZScore":
        """Statistics written by :meth:`save`; a missing or foreign file is a GlmError naming it."""
        try:
            with np.load(path, allow_pickle=False) as saved:
                return cls(
                    str(saved["method"]),
                    int(saved["count"]),
                    saved["mean"].astype(np.float64),
                    saved["m2"].astype(np.float64),
                    float(saved["epsilon"]),
                    int(saved["warmup"]),
                )
        except (OSError, KeyError, ValueError) as error:
            raise GlmError(f"cannot read normalisation statistics from {path}: {error}") from None
