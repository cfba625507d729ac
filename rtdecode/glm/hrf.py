"""The Glover haemodynamic response and event regressors, on nilearn's oversampled time grid.

Regressors are computed the way nilearn's ``compute_regressor`` computes them (the property the GLM's
oracle tests rely on): a boxcar on a high-resolution grid starting ``min_onset_s`` before the first
frame, with spacing ``tr_s / oversampling``; onset and offset snapped up to the next grid point;
convolved with the Glover HRF sampled on the same grid and normalised to unit sum; then linearly
interpolated at the frame times. When ``24 * oversampling / tr_s`` is a whole number and
``slice_time_ref`` is 0 (TR 1.5, 1.6, 2 s...), the grid's spacing and start do not depend on the run's
length, so a regressor computed for a longer planned run has the same values at the frames acquired so
far; otherwise they differ slightly until :meth:`OnlineGLM.finish` recomputes them for the true length.
"""

import numpy as np
from scipy import stats

HRF_LENGTH_S = 32.0
MIN_ONSET_S = -24.0


def glover_hrf(tr_s: float, oversampling: int = 50, length_s: float = HRF_LENGTH_S) -> np.ndarray:
    """The Glover (1999) HRF on a grid of spacing ``tr_s / oversampling``, summing to 1.

    A difference of gamma densities: peak shape 6/0.9, undershoot shape 12/0.9, scale 0.9, ratio 0.48,
    both shifted by one grid step, as nilearn's ``glover_hrf``.
    """
    dt_s = tr_s / oversampling
    times_s = np.linspace(0.0, length_s, int(np.rint(length_s / dt_s)))
    peak = stats.gamma.pdf(times_s, 6.0 / 0.9, loc=dt_s, scale=0.9)
    undershoot = stats.gamma.pdf(times_s, 12.0 / 0.9, loc=dt_s, scale=0.9)
    hrf = peak - 0.48 * undershoot
    return hrf / hrf.sum()


def frame_times_s(n_frames: int, tr_s: float, slice_time_ref: float = 0.0) -> np.ndarray:
    """Acquisition time of each frame relative to the run's start (``slice_time_ref`` in units of TR)."""
    start_s = slice_time_ref * tr_s
    return np.linspace(start_s, start_s + (n_frames - 1) * tr_s, n_frames)


def high_res_grid_s(frame_times: np.ndarray, oversampling: int, min_onset_s: float = MIN_ONSET_S) -> np.ndarray:
    """nilearn's oversampled grid: from ``min_onset_s`` before the first frame to one TR after the last."""
    n_frames = frame_times.size
    first_s, last_s = float(frame_times.min()), float(frame_times.max())
    n_high_res = (n_frames - 1) / (last_s - first_s) * (last_s * (1 + 1.0 / (n_frames - 1)) - first_s - min_onset_s)
    return np.linspace(
        first_s + min_onset_s, last_s * (1 + 1.0 / (n_frames - 1)), int(np.rint(n_high_res * oversampling + 1))
    )


def event_regressors(
    onsets_s: np.ndarray,
    durations_s: np.ndarray,
    frame_times: np.ndarray,
    tr_s: float,
    oversampling: int = 50,
) -> np.ndarray:
    """One HRF-convolved regressor per event, sampled at ``frame_times``: shape (n_frames, n_events).

    Equal to nilearn's ``compute_regressor`` for each event on its own (to rounding), but computed in
    O(n_frames) per event: a boxcar convolved with the kernel is a difference of the kernel's cumulative
    sums, so only the grid points next to each frame are evaluated. ``frame_times`` needs at least two
    frames. Events starting more than 24 s before the first frame are the caller's to reject.
    """
    grid_s = high_res_grid_s(frame_times, oversampling)
    n_grid = grid_s.size
    onsets_s = np.atleast_1d(np.asarray(onsets_s, dtype=np.float64))
    durations_s = np.atleast_1d(np.asarray(durations_s, dtype=np.float64))
    start = np.minimum(np.searchsorted(grid_s, onsets_s), n_grid - 1)
    stop = np.minimum(np.searchsorted(grid_s, onsets_s + durations_s), n_grid - 1)
    stop = np.where((stop < n_grid - 1) & (stop == start), stop + 1, stop)  # zero duration: one grid step
    kernel = glover_hrf(tr_s, oversampling)
    cumulative = np.concatenate([[0.0], np.cumsum(kernel)])
    left = np.clip(np.searchsorted(grid_s, frame_times, side="right") - 1, 0, n_grid - 2)
    weight = ((frame_times - grid_s[left]) / (grid_s[left + 1] - grid_s[left]))[:, None]
    return (1 - weight) * _boxcar_response(left, start, stop, cumulative) + weight * _boxcar_response(
        left + 1, start, stop, cumulative
    )


def _boxcar_response(grid_index: np.ndarray, start: np.ndarray, stop: np.ndarray, cumulative: np.ndarray) -> np.ndarray:
    """The kernel convolved with boxcars on [start, stop), at grid points: shape (n_points, n_events)."""
    n_kernel = cumulative.size - 1
    offset = grid_index[:, None] + 1
    return cumulative[np.clip(offset - start, 0, n_kernel)] - cumulative[np.clip(offset - stop, 0, n_kernel)]


def cosine_drift(n_frames: int, tr_s: float, high_pass_hz: float, n_basis_frames: int | None = None) -> np.ndarray:
    """nilearn's discrete-cosine drift basis without its constant column: shape (n_frames, order).

    ``order = floor(2 * n_frames * high_pass_hz * tr_s)`` (at most ``n_frames - 1``). With
    ``n_basis_frames`` the cosines are those of a run of that many frames, evaluated at the first
    ``n_frames`` (the online design's drift before the run is complete); the order still follows
    ``n_frames``.
    """
    n_basis = n_frames if n_basis_frames is None else n_basis_frames
    order = drift_order(n_frames, tr_s, high_pass_hz)
    times = np.arange(n_frames) + 0.5
    k = np.arange(1, order + 1)
    return np.sqrt(2.0 / n_basis) * np.cos(np.pi / n_basis * np.outer(times, k))


def drift_order(n_frames: int, tr_s: float, high_pass_hz: float) -> int:
    """How many cosines a run of ``n_frames`` gets for a given high-pass cutoff (nilearn's rule).

    The frame spacing is recomputed from the frame times as nilearn does, so the order agrees with it
    even where ``2 * n_frames * high_pass_hz * tr_s`` lands on a whole number.
    """
    if n_frames < 2:
        return 0
    times = frame_times_s(n_frames, tr_s)
    dt_s = (times[-1] - times[0]) / (n_frames - 1)
    return int(min(n_frames - 1, np.floor(2 * n_frames * high_pass_hz * dt_s)))
