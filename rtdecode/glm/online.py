"""Single-trial betas, updated volume by volume: least-squares-separate (LSS) or least-squares-all (LSA).

The model of a run is nilearn's ``FirstLevelModel`` with ``hrf_model="glover"``, ``drift_model="cosine"``,
the six motion parameters as confounds, an intercept, no signal scaling, and ``noise_model="ols"`` or
``"ar1"``. LSS fits, for each trial, a design with that trial (the probe), all other trials as one
reference regressor, and the nuisance columns; LSA fits every trial as its own column.

How it stays cheap
------------------
Nothing is refitted from the run's data. For every time-basis column ``c`` (intercept, motion, cosine
drift, each trial's regressor and the sum of all trials) the GLM keeps three moments with the data,
updated as each volume arrives::

    sum_i c[i] y[i],    sum_i c[i-1] y[i],    sum_i c[i] y[i-1]      (i over kept volumes, in order)

plus ``sum y^2`` and ``sum y[i] y[i-1]`` per voxel. A trial's design is a few of those columns, so its
normal equations, OLS residual sums, lag-one autocorrelation and AR(1)-whitened normal equations are
all small matrix algebra on (n_regressors x n_voxels) moments: a new volume costs
O(n_active_columns x n_voxels) and a trial O(n_regressors^2 x n_voxels), whatever the run's length.

AR(1) follows nilearn exactly: rho per voxel from the OLS residuals (Yule-Walker,
``rho = (sum r[i] r[i-1] / (n - 1)) / (sum r^2 / n)``), truncated to ``ar1_bins`` bins, and for each bin
the design whitened as ``w[0] = x[0]``, ``w[i] = x[i] - rho x[i-1]`` and solved with a pseudo-inverse.

The drift basis
---------------
nilearn's cosines depend on the run's length. Online, the cosines are those of a run of
``horizon`` frames (``planned_n_frames`` if given; it doubles when the run outgrows it) and their number
follows nilearn's rule for the frames acquired so far. :meth:`OnlineGLM.finish` sets the horizon to the
run's true length and re-estimates every trial, so final betas are exactly nilearn's.

Data are offset by the run's first kept volume before they enter the moments (the intercept absorbs
it), which keeps the sums of squares well away from cancellation.
"""

import dataclasses
import time
from collections.abc import Mapping
from typing import Literal

import numpy as np

from rtdecode.errors import EventError, GlmError
from rtdecode.glm.hrf import MIN_ONSET_S, cosine_drift, drift_order, event_regressors, frame_times_s
from rtdecode.records import TrialBeta, TrialEvent

N_MOMENTS = 3  # sum c[i] y[i], sum c[i-1] y[i], sum c[i] y[i-1]
DEFAULT_HORIZON_FRAMES = 256


@dataclasses.dataclass(frozen=True)
class GlmSettings:
    """How a run's betas are estimated. Calibration and the daemon must use equal settings.

    Attributes
    ----------
    tr_s : float
    mode : "lss" or "lsa"
    noise_model : "ols" or "ar1"
    high_pass_hz : float
        Cosine drift cutoff (nilearn's ``high_pass``).
    slice_time_ref : float
        Frame time within the TR, as a fraction (nilearn's ``slice_time_ref``; 0: the volume's start).
    oversampling : int
        HRF convolution grid: ``tr_s / oversampling`` seconds.
    motion_regressors : bool
        Whether the six motion parameters are confounds.
    emit_delay_s : float
        A trial's online beta is estimated once its ``onset_s + emit_delay_s`` has been acquired.
    ar1_bins : int
        AR(1) coefficients are truncated to multiples of ``1 / ar1_bins`` (nilearn's ``bins``).
    planned_n_frames : int or None
        Expected volumes in the run, if known: the online drift basis is built for that length.
    """

    tr_s: float
    mode: Literal["lss", "lsa"] = "lss"
    noise_model: Literal["ols", "ar1"] = "ar1"
    high_pass_hz: float = 0.01
    slice_time_ref: float = 0.0
    oversampling: int = 50
    motion_regressors: bool = True
    emit_delay_s: float = 6.0
    ar1_bins: int = 100
    planned_n_frames: int | None = None

    def __post_init__(self) -> None:
        checks = {
            "tr_s": self.tr_s > 0,
            "mode": self.mode in ("lss", "lsa"),
            "noise_model": self.noise_model in ("ols", "ar1"),
            "high_pass_hz": self.high_pass_hz >= 0,
            "slice_time_ref": 0 <= self.slice_time_ref <= 1,
            "oversampling": self.oversampling >= 1,
            "emit_delay_s": self.emit_delay_s >= 0,
            "ar1_bins": self.ar1_bins >= 1,
            "planned_n_frames": self.planned_n_frames is None or self.planned_n_frames >= 2,
        }
        for name, ok in checks.items():
            if not ok:
                raise GlmError(f"GLM setting {name}={getattr(self, name)!r} is invalid")

    @property
    def n_nuisance_fixed(self) -> int:
        """Intercept plus motion columns."""
        return 1 + (6 if self.motion_regressors else 0)


@dataclasses.dataclass
class _Trial:
    event: TrialEvent
    decodable: bool
    regressor: np.ndarray  # values at frames 0..horizon-1
    moments: np.ndarray  # (3, V)
    online: TrialBeta | None = None
    final: TrialBeta | None = None


class OnlineGLM:
    """Single-trial betas of one run, from volumes and events as they arrive.

    Parameters
    ----------
    settings : GlmSettings
    n_voxels : int
    run_index : int
        Copied onto the betas.

    Feed it with :meth:`add_volume` (one masked vector per frame, in any order; late ones are fine)
    and :meth:`add_event`; both return the online betas that became due. :meth:`finish` ends the run
    and returns every trial's final beta.
    """

    def __init__(self, settings: GlmSettings, n_voxels: int, run_index: int = 0) -> None:
        if n_voxels < 1:
            raise GlmError(f"n_voxels must be at least 1, got {n_voxels}")
        self.settings = settings
        self.n_voxels = n_voxels
        self.run_index = run_index
        self._horizon = max(settings.planned_n_frames or DEFAULT_HORIZON_FRAMES, 2)
        self._rows = np.zeros((self._horizon, n_voxels), np.float32)
        self._motion = np.zeros((self._horizon, 6))
        self._kept = np.zeros(self._horizon, bool)
        self._offset: np.ndarray | None = None
        self._drift = self._drift_basis()
        self._trials: dict[str, _Trial] = {}
        self._reset_moments()
        self._latest_stamps: Mapping[str, float] = {}
        self._finished_n_frames: int | None = None

    # ----- public API -------------------------------------------------------------------------------

    @property
    def n_frames(self) -> int:
        """Frames spanned so far: the latest kept frame index plus one (0 before any volume)."""
        kept = np.flatnonzero(self._kept)
        return int(kept[-1]) + 1 if kept.size else 0

    @property
    def n_kept(self) -> int:
        return int(self._kept.sum())

    def betas(self, version: str = "final") -> list[TrialBeta]:
        """The betas kept so far of one version (``"online"`` or ``"final"``), in onset order."""
        found = [getattr(trial, version) for trial in self._ordered_trials()]
        return [beta for beta in found if beta is not None]

    def add_volume(
        self,
        frame_index: int,
        vector: np.ndarray,
        motion_params: np.ndarray | None = None,
        timestamps: Mapping[str, float] | None = None,
    ) -> list[TrialBeta]:
        """Add frame ``frame_index`` (0-based in the run); return the online betas now due.

        Raises GlmError (the GLM is unchanged) for a vector of the wrong length or with non-finite
        values, a frame already added, missing motion parameters, or a finished run.
        """
        vector, motion = self._checked_volume(frame_index, vector, motion_params)
        if frame_index >= self._horizon:
            self._grow(max(2 * self._horizon, frame_index + 1))
        previous = self.n_frames - 1  # the latest kept frame, -1 before any
        self._rows[frame_index] = vector
        self._motion[frame_index] = motion
        self._kept[frame_index] = True
        if self._offset is None:
            self._offset = vector.astype(np.float64)
        if frame_index > previous:
            self._accumulate_latest(frame_index, previous if previous >= 0 else None)
        else:  # a late frame between kept ones: its neighbours' pairs change
            self._rebuild_moments()
        self._latest_stamps = dict(timestamps or {})
        return self._emit_due()

    def add_event(self, event: TrialEvent, decodable: bool = True) -> list[TrialBeta]:
        """Add a trial (at any time during the run); return the online betas now due.

        Raises EventError (the GLM is unchanged) for a trial id seen before, an onset earlier than 24 s
        before the run (nilearn ignores those), or a finished run.
        """
        self._check_event(event)
        trial = _Trial(event, decodable, self._regressors([event])[:, 0], np.zeros((N_MOMENTS, self.n_voxels)))
        self._trials[event.trial_id] = trial
        self._catch_up(trial)
        return self._emit_due()

    def estimate(self, trial_id: str) -> np.ndarray:
        """The trial's beta from the frames so far (float64, mask order)."""
        if trial_id not in self._trials:
            raise GlmError(f"no trial {trial_id!r} in run {self.run_index}")
        if self.n_kept < 2:
            raise GlmError(f"run {self.run_index} has {self.n_kept} volume(s); a beta needs at least 2")
        return self._estimate([trial_id])[0]

    def finish(self, n_frames: int | None = None) -> list[TrialBeta]:
        """End the run (``n_frames``: its true length, default the frames seen) and re-estimate every trial.

        Returns the final betas of every trial with data: its regressor is nonzero at some kept volume.
        The others (onsets after the last volume) are left out; see :meth:`unestimable`. Raises GlmError
        for a run with fewer than two volumes (nothing can be estimated) or ``n_frames`` below the frames
        seen.
        """
        where = f"run {self.run_index}"
        if self._finished_n_frames is not None:
            raise GlmError(f"{where} is already finished")
        n_frames = self.n_frames if n_frames is None else n_frames
        if n_frames < self.n_frames:
            raise GlmError(f"{where}: n_frames={n_frames} is fewer than the frames seen ({self.n_frames})")
        if self.n_kept < 2 or n_frames < 2:
            raise GlmError(f"{where} has {self.n_kept} volume(s) of {n_frames}; betas need at least 2")
        self._set_horizon(n_frames)
        self._finished_n_frames = n_frames
        inside = [t for t in self._ordered_trials() if self._has_data(t)]
        if not inside:
            return []
        estimates = self._estimate([t.event.trial_id for t in inside], n_frames)
        for trial, beta in zip(inside, estimates, strict=True):
            trial.final = self._record(trial, beta, "final", n_frames)
        return [trial.final for trial in inside]

    def unestimable(self) -> list[TrialEvent]:
        """Trials with no data yet: their regressor is zero at every kept volume (onset after the last)."""
        return [t.event for t in self._ordered_trials() if not self._has_data(t)]

    def _has_data(self, trial: _Trial) -> bool:
        return bool(np.any(trial.regressor[np.flatnonzero(self._kept)] != 0))

    # ----- input checks -----------------------------------------------------------------------------

    def _checked_volume(
        self, frame_index: int, vector: np.ndarray, motion_params: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        where = f"run {self.run_index} frame {frame_index}"
        if self._finished_n_frames is not None:
            raise GlmError(f"{where}: the run is finished")
        if frame_index < 0 or (frame_index < self._horizon and self._kept[frame_index]):
            raise GlmError(f"{where}: frame index is negative or already added")
        vector = np.asarray(vector)
        if vector.shape != (self.n_voxels,):
            raise GlmError(f"{where}: vector has shape {vector.shape}, expected ({self.n_voxels},)")
        n_bad = int(np.count_nonzero(~np.isfinite(vector)))
        if n_bad:
            raise GlmError(f"{where}: {n_bad} non-finite voxel value(s)")
        if not self.settings.motion_regressors:
            return vector, np.zeros(6)
        if motion_params is None or np.shape(motion_params) != (6,) or not np.all(np.isfinite(motion_params)):
            raise GlmError(f"{where}: motion_params must be 6 finite numbers, got {motion_params!r}")
        return vector, np.asarray(motion_params, np.float64)

    def _check_event(self, event: TrialEvent) -> None:
        where = f"run {self.run_index} trial {event.trial_id!r}"
        if self._finished_n_frames is not None:
            raise EventError(f"{where}: the run is finished")
        if event.trial_id in self._trials:
            raise EventError(
                f"{where}: trial id used twice (first onset {self._trials[event.trial_id].event.onset_s} s)"
            )
        if not np.isfinite(event.onset_s) or event.onset_s < MIN_ONSET_S + self._frame_times(1)[0]:
            raise EventError(f"{where}: onset {event.onset_s} s is before the run")
        if not np.isfinite(event.duration_s) or event.duration_s < 0:
            raise EventError(f"{where}: duration {event.duration_s} s must be finite and >= 0")

    # ----- time basis -------------------------------------------------------------------------------

    def _frame_times(self, n_frames: int) -> np.ndarray:
        return frame_times_s(max(n_frames, 2), self.settings.tr_s, self.settings.slice_time_ref)[:n_frames]

    def _acquired_until_s(self, n_frames: int) -> float:
        """Run time up to which data exist once ``n_frames`` volumes are in (the end of the last one)."""
        return n_frames * self.settings.tr_s

    def _regressors(self, events: list[TrialEvent]) -> np.ndarray:
        onsets = np.array([e.onset_s for e in events])
        durations = np.array([e.duration_s for e in events])
        s = self.settings
        return event_regressors(onsets, durations, self._frame_times(self._horizon), s.tr_s, s.oversampling)

    def _drift_basis(self) -> np.ndarray:
        s = self.settings
        return cosine_drift(self._horizon, s.tr_s, s.high_pass_hz)

    def _nuisance_values(self, frames: np.ndarray) -> np.ndarray:
        """Intercept, motion (if used) and every horizon cosine at ``frames``: (n, n_nuisance)."""
        columns = [np.ones((frames.size, 1))]
        if self.settings.motion_regressors:
            columns.append(self._motion[frames])
        columns.append(self._drift[frames])
        return np.concatenate(columns, axis=1)

    def _trial_values(self, frames: np.ndarray) -> np.ndarray:
        """Each trial's regressor at ``frames``, trials in insertion order: (n, n_trials)."""
        if not self._trials:
            return np.zeros((frames.size, 0))
        return np.stack([trial.regressor[frames] for trial in self._trials.values()], axis=1)

    def _grow(self, horizon: int) -> None:
        extra = horizon - self._horizon
        self._rows = np.concatenate([self._rows, np.zeros((extra, self.n_voxels), np.float32)])
        self._motion = np.concatenate([self._motion, np.zeros((extra, 6))])
        self._kept = np.concatenate([self._kept, np.zeros(extra, bool)])
        self._set_horizon(horizon)

    def _set_horizon(self, horizon: int) -> None:
        """Rebuild the drift basis (and its moments) and the trial regressors for a run of ``horizon`` frames."""
        if horizon > self._rows.shape[0]:
            self._grow(horizon)
            return
        self._horizon = horizon
        self._drift = self._drift_basis()
        events = [trial.event for trial in self._trials.values()]
        if events:
            for trial, regressor in zip(self._trials.values(), self._regressors(events).T, strict=True):
                trial.regressor = regressor
        self._rebuild_moments()

    # ----- moments ----------------------------------------------------------------------------------

    def _reset_moments(self) -> None:
        n_nuisance = self.settings.n_nuisance_fixed + self._drift.shape[1]
        # rows: [probe slot, sum of all trials, intercept, motion..., drift...]; the probe slot is filled per fit
        self._shared_moments = np.zeros((N_MOMENTS, 2 + n_nuisance, self.n_voxels))
        for trial in self._trials.values():
            trial.moments = np.zeros((N_MOMENTS, self.n_voxels))
        self._yy = np.zeros(self.n_voxels)
        self._yy_lag = np.zeros(self.n_voxels)

    def _centred(self, frames: np.ndarray) -> np.ndarray:
        return self._rows[frames].astype(np.float64) - self._offset

    def _accumulate_latest(self, frame: int, previous: int | None) -> None:
        """Add the moments of a new last frame (and its pair with the previous kept frame)."""
        frames = np.array([frame] if previous is None else [previous, frame])
        y = self._centred(frames)
        nuisance = self._nuisance_values(frames)
        trials = self._trial_values(frames)
        self._yy += y[-1] ** 2
        self._add_pair(self._shared_moments[:, 1:], np.concatenate([trials.sum(axis=1, keepdims=True), nuisance], 1), y)
        for trial, values in zip(self._trials.values(), trials.T, strict=True):
            if np.any(values != 0):
                self._add_pair(trial.moments[:, None], values[:, None], y)
        if previous is not None:
            self._yy_lag += y[0] * y[1]

    @staticmethod
    def _add_pair(moments: np.ndarray, values: np.ndarray, y: np.ndarray) -> None:
        """Moments update for the last row of (values, y), paired with the row before it if there is one."""
        moments[0] += values[-1][:, None] * y[-1]
        if len(y) == 2:
            moments[1] += values[0][:, None] * y[1]
            moments[2] += values[1][:, None] * y[0]

    @staticmethod
    def _moments(values: np.ndarray, y: np.ndarray) -> np.ndarray:
        """The three moments of basis ``values`` (n, q) with data ``y`` (n, V) over consecutive rows."""
        return np.stack([values.T @ y, values[:-1].T @ y[1:], values[1:].T @ y[:-1]])

    def _rebuild_moments(self) -> None:
        """Recompute every moment from the kept rows (after a late frame or a new drift basis)."""
        self._reset_moments()
        frames = np.flatnonzero(self._kept)
        if frames.size == 0:
            return
        y = self._centred(frames)
        trials = self._trial_values(frames)
        shared = np.concatenate([trials.sum(axis=1, keepdims=True), self._nuisance_values(frames)], axis=1)
        self._shared_moments[:, 1:] = self._moments(shared, y)
        for trial, values in zip(self._trials.values(), trials.T, strict=True):
            trial.moments = self._moments(values[:, None], y)[:, 0]
        self._yy = np.einsum("iv,iv->v", y, y)
        self._yy_lag = np.einsum("iv,iv->v", y[1:], y[:-1])

    def _catch_up(self, trial: _Trial) -> None:
        """Moments of a new trial's regressor with the frames already kept (none if its onset is ahead)."""
        frames = np.flatnonzero(self._kept)
        support = np.flatnonzero(trial.regressor[frames] != 0)
        if support.size == 0:
            return
        window = frames[max(support[0] - 1, 0) :]
        moments = self._moments(trial.regressor[window][:, None], self._centred(window))
        trial.moments = moments[:, 0]
        self._shared_moments[:, 1:2] += moments

    # ----- estimation -------------------------------------------------------------------------------

    def _estimate(self, trial_ids: list[str], n_frames: int | None = None) -> np.ndarray:
        """Betas (len(trial_ids), V) from the current moments."""
        n_frames = self.n_frames if n_frames is None else n_frames
        n_drift = min(drift_order(n_frames, self.settings.tr_s, self.settings.high_pass_hz), self._drift.shape[1])
        n_nuisance = self.settings.n_nuisance_fixed + n_drift
        frames = np.flatnonzero(self._kept)
        nuisance_values = self._nuisance_values(frames)[:, :n_nuisance]
        trial_values = self._trial_values(frames)
        trials = list(self._trials.values())
        positions = {trial.event.trial_id: i for i, trial in enumerate(trials)}
        if self.settings.mode == "lsa":
            values = np.concatenate([trial_values, nuisance_values], axis=1)
            trial_moments = np.stack([t.moments for t in trials], axis=1)
            moments = np.concatenate([trial_moments, self._shared_moments[:, 2 : 2 + n_nuisance]], axis=1)
            return self._solve(values, moments, np.eye(values.shape[1])[[positions[t] for t in trial_ids]])
        # LSS in the parametrisation [probe, all trials, nuisance]: it spans the same space as nilearn's
        # [probe, reference = all - probe, nuisance], and the probe's beta there is coef(probe) + coef(all).
        moments = self._shared_moments[:, : 2 + n_nuisance]
        contrast = np.zeros((1, 2 + n_nuisance))
        contrast[0, :2] = 1.0
        betas = np.empty((len(trial_ids), self.n_voxels))
        for row, trial_id in enumerate(trial_ids):
            k = positions[trial_id]
            values = np.concatenate(
                [trial_values[:, k : k + 1], trial_values.sum(axis=1, keepdims=True), nuisance_values], 1
            )
            moments[:, 0] = trials[k].moments
            betas[row] = self._solve(values, moments, contrast)[0]
        return betas

    def _solve(self, values: np.ndarray, moments: np.ndarray, contrasts: np.ndarray) -> np.ndarray:
        """``contrasts`` (r, p) of the coefficients of design ``values`` (n, p) fitted to data moments (3, p, V)."""
        gram_pinv = np.linalg.pinv(values.T @ values)
        if self.settings.noise_model == "ols":
            return (contrasts @ gram_pinv) @ moments[0]
        coefficients = gram_pinv @ moments[0]
        lag_moments = moments[1] + moments[2]  # sum x[i-1] y[i] + sum x[i] y[i-1]
        rho_bins = self._ar1(values, moments[0], lag_moments, coefficients)
        return self._solve_ar1(values, moments[0], lag_moments, rho_bins, contrasts)

    def _ar1(
        self, values: np.ndarray, moments: np.ndarray, lag_moments: np.ndarray, coefficients: np.ndarray
    ) -> np.ndarray:
        """Per-voxel AR(1) coefficient of the OLS residuals, as nilearn's bin index (``trunc(rho * bins)``)."""
        n = values.shape[0]
        lag_gram = values[1:].T @ values[:-1]  # sum_i x[i] x[i-1]^T
        rss = self._yy - np.einsum("pv,pv->v", coefficients, moments)
        lagged = self._yy_lag + np.einsum("pv,pv->v", coefficients, lag_gram @ coefficients - lag_moments)
        with np.errstate(divide="ignore", invalid="ignore"):
            rho = np.where(rss > 0, (lagged / (n - 1)) / (rss / n), 0.0)
        return np.trunc(rho * self.settings.ar1_bins).astype(np.int64)

    def _solve_ar1(
        self,
        values: np.ndarray,
        moments: np.ndarray,
        lag_moments: np.ndarray,
        rho_bins: np.ndarray,
        contrasts: np.ndarray,
    ) -> np.ndarray:
        """AR(1)-whitened fit per bin of rho, from the moments (nilearn's ``w[0] = x[0]`` whitening)."""
        labels, voxel_label = _labels(rho_bins)
        rho_per_label = labels * 1.0 / self.settings.ar1_bins
        gram = values.T @ values
        lag_gram = values[1:].T @ values[:-1]
        last = values[-1]
        whitened_grams = (
            (1 + rho_per_label**2)[:, None, None] * gram
            - rho_per_label[:, None, None] * (lag_gram + lag_gram.T)
            - (rho_per_label**2)[:, None, None] * np.outer(last, last)
        )
        weights = contrasts @ np.linalg.pinv(whitened_grams)  # (n_labels, r, p)
        rho = rho_per_label[voxel_label]
        y_last = self._centred(np.flatnonzero(self._kept)[-1:])[0]
        if contrasts.shape[0] == 1:  # one weight vector per voxel: three dot products each
            per_voxel = np.ascontiguousarray(weights[:, 0].T)[:, voxel_label]  # (p, V)
            return (
                (1 + rho**2) * np.einsum("pv,pv->v", per_voxel, moments)
                - rho * np.einsum("pv,pv->v", per_voxel, lag_moments)
                - rho**2 * (last @ per_voxel) * y_last
            )[None]
        whitened_moments = (1 + rho**2) * moments - rho * lag_moments - (rho**2) * np.outer(last, y_last)
        betas = np.empty((contrasts.shape[0], self.n_voxels))
        by_label = np.argsort(voxel_label, kind="stable")
        starts = np.searchsorted(voxel_label[by_label], np.arange(labels.size + 1))
        for label in range(labels.size):
            voxels = by_label[starts[label] : starts[label + 1]]
            betas[:, voxels] = weights[label] @ whitened_moments[:, voxels]
        return betas

    # ----- emission ---------------------------------------------------------------------------------

    def _ordered_trials(self) -> list[_Trial]:
        return sorted(self._trials.values(), key=lambda t: (t.event.onset_s, t.event.trial_id))

    def _emit_due(self) -> list[TrialBeta]:
        if self.n_kept < 2:
            return []
        acquired_s = self._acquired_until_s(self.n_frames)
        due = [
            trial
            for trial in self._ordered_trials()
            if trial.online is None
            and trial.event.onset_s + self.settings.emit_delay_s <= acquired_s
            and self._has_data(trial)
        ]
        if not due:
            return []
        estimates = self._estimate([trial.event.trial_id for trial in due])
        for trial, beta in zip(due, estimates, strict=True):
            trial.online = self._record(trial, beta, "online", self.n_frames)
        return [trial.online for trial in due]

    def _record(self, trial: _Trial, beta: np.ndarray, version: str, n_frames: int) -> TrialBeta:
        stamps = dict(self._latest_stamps)
        stamps["estimated"] = time.monotonic()
        return TrialBeta(
            event=trial.event,
            run_index=self.run_index,
            beta=beta.astype(np.float32),
            version=version,
            n_frames=n_frames,
            decodable=trial.decodable,
            timestamps=stamps,
        )


def _labels(rho_bins: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct bin indices, sorted, and each voxel's position among them (``np.unique`` without a sort)."""
    offset = int(rho_bins.min())
    present = np.bincount(rho_bins - offset) > 0
    position = np.cumsum(present) - 1
    return np.flatnonzero(present) + offset, position[rho_bins - offset]
