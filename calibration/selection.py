"""Voxel selection for a new subject: which voxels of one calibration session carry a repeatable image signal.

Real-time MindEye chose its voxels by repeat reliability: for every voxel, how well the betas of the second showing
of an image predict those of the first (mindeye2-spec §8, the reliability "union mask"). A new subject here has one
session, so the selection is the single-session version of that rule, inside a search mask (a brain mask made from
the EPI reference by :func:`brain_mask`, or a posterior mask the operator supplies).

The steps, each a pure numpy function so that calibration and tests share them:

- :func:`brain_mask`: candidate voxels of the reference volume (intensity threshold, largest component, holes filled);
- :func:`repeat_reliability`: per-voxel correlation across images of repeat ``a`` vs repeat ``b``, averaged over pairs;
- :func:`reliability_threshold`: the ``r`` that pure noise exceeds with probability ``p`` (Fisher z null);
- :func:`fdr_threshold`: the threshold that keeps the false discovery rate near ``fdr`` (Benjamini-Hochberg);
- :func:`select_voxels`: the voxels above the threshold, capped at ``max_voxels``, with a JSON summary for the report.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np
import scipy.ndimage
import scipy.stats

from rtdecode.errors import CalibrationError

BRAIN_PERCENTILE = 98.0  # robust "bright tissue" level: ignores the few hottest voxels (vessels, artefacts)
MIN_REPEATED_IMAGES = 4  # the Fisher z null of the threshold needs more than 3 images
HISTOGRAM_BINS = 40  # reliability histogram bins over [-1, 1] for the report
QUANTILES = {"min": 0.0, "p05": 0.05, "p25": 0.25, "median": 0.5, "p75": 0.75, "p95": 0.95, "max": 1.0}


@dataclass(frozen=True)
class Reliability:
    """Per-voxel repeat reliability of one session.

    ``values`` (n_voxels,) float64 in [-1, 1], 0 where a voxel has no variance or non-finite betas;
    ``n_images`` the number of images shown at least twice; ``n_pairs`` the repeat pairs (a, b) averaged.
    """

    values: np.ndarray
    n_images: int
    n_pairs: int


@dataclass(frozen=True)
class VoxelSelection:
    """The voxels kept: ``indices`` (sorted int64) index the candidate voxels (the columns of the betas)."""

    indices: np.ndarray
    threshold: float
    n_candidates: int
    reliability: Reliability

    def summary(self) -> dict:
        """JSON-ready numbers for the calibration report (the ``selection`` section, less method/source)."""
        values = self.reliability.values
        counts, edges = np.histogram(np.clip(values, -1.0, 1.0), bins=HISTOGRAM_BINS, range=(-1.0, 1.0))
        return {
            "n_candidates": int(self.n_candidates),
            "n_selected": int(self.indices.size),
            "threshold": float(self.threshold),
            "n_repeated_images": int(self.reliability.n_images),
            "n_repeat_pairs": int(self.reliability.n_pairs),
            "quantiles": {name: float(np.quantile(values, q)) for name, q in QUANTILES.items()},
            "histogram": {"counts": [int(c) for c in counts], "edges": [float(e) for e in edges]},
        }


def brain_mask(reference: np.ndarray, fraction: float = 0.5) -> np.ndarray:
    """Boolean mask of the brain in a 3D EPI reference volume.

    Voxels brighter than ``fraction`` x the 98th intensity percentile, reduced to the largest connected component
    (drops bright specks outside the head) with enclosed holes filled (dark structures inside the brain stay in).
    """
    volume = np.asarray(reference)
    if volume.ndim != 3 or not np.issubdtype(volume.dtype, np.number):
        raise CalibrationError(
            f"brain_mask: reference must be a numeric 3D volume; got shape {volume.shape}, dtype {volume.dtype} "
            "(pass one EPI volume, e.g. the mean or first volume of the session, not a 4D run)"
        )
    if not np.isfinite(volume).all():
        raise CalibrationError(
            f"brain_mask: reference has {int((~np.isfinite(volume)).sum())} non-finite voxels; the reference "
            "volume must be finite (replace NaN/inf with 0 before making the mask)"
        )
    if not 0.0 < fraction < 1.0:
        raise CalibrationError(f"brain_mask: fraction must be in (0, 1); got {fraction}")
    level = float(np.percentile(volume, BRAIN_PERCENTILE))
    above = volume > fraction * level
    if level <= 0.0 or not above.any():
        raise CalibrationError(
            f"brain_mask: no voxel is above {fraction} x the {BRAIN_PERCENTILE:g}th percentile ({level:g}) of the "
            "reference volume; the reference looks empty (check the run, or supply a mask with --mask)"
        )
    return scipy.ndimage.binary_fill_holes(_largest_component(above))


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest face-connected component of a boolean volume."""
    labels, n_components = scipy.ndimage.label(mask)
    if n_components <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0  # background
    return labels == int(np.argmax(sizes))


def repeat_reliability(betas: np.ndarray, stimulus_ids: Sequence[str]) -> Reliability:
    """Per-voxel repeat reliability: correlation across images of the betas of two showings of the same images.

    For each pair of repetitions (a, b), a < b, the images shown at least b + 1 times contribute their a-th and b-th
    showing (in row order); the per-voxel Pearson correlation across those images is one estimate. Reliability is the
    mean over pairs weighted by the number of images in each pair (pairs with fewer than 3 images are skipped).
    """
    matrix = _checked_betas(betas, stimulus_ids)
    rows_by_image = _repeat_rows(stimulus_ids)
    if len(rows_by_image) < MIN_REPEATED_IMAGES:
        raise CalibrationError(
            f"repeat_reliability: {len(rows_by_image)} images were shown at least twice, need at least "
            f"{MIN_REPEATED_IMAGES}; voxel selection by reliability needs a session with images shown at least twice "
            "(repeats in the events files), or a supplied mask (--mask)"
        )
    total = np.zeros(matrix.shape[1])
    n_weights = 0
    n_pairs = 0
    max_reps = max(len(rows) for rows in rows_by_image)
    for rep_a, rep_b in combinations(range(max_reps), 2):
        usable = [rows for rows in rows_by_image if len(rows) > rep_b]
        if len(usable) < MIN_REPEATED_IMAGES:
            continue
        first = matrix[[rows[rep_a] for rows in usable]]
        second = matrix[[rows[rep_b] for rows in usable]]
        total += len(usable) * _columnwise_correlation(first, second)
        n_weights += len(usable)
        n_pairs += 1
    return Reliability(values=total / n_weights, n_images=len(rows_by_image), n_pairs=n_pairs)


def _checked_betas(betas: np.ndarray, stimulus_ids: Sequence[str]) -> np.ndarray:
    """``betas`` as a float64 (n_trials, n_voxels) matrix with one stimulus id per row."""
    matrix = np.asarray(betas, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[1] == 0:
        raise CalibrationError(
            f"repeat_reliability: betas must be (n_trials, n_voxels) with n_voxels >= 1; got shape {matrix.shape}"
        )
    if len(stimulus_ids) != matrix.shape[0]:
        raise CalibrationError(
            f"repeat_reliability: stimulus_ids has {len(stimulus_ids)} entries but betas has {matrix.shape[0]} rows; "
            "give one stimulus id per beta row"
        )
    return matrix


def _repeat_rows(stimulus_ids: Sequence[str]) -> list[list[int]]:
    """Row indices of each image shown at least twice, in row order, images in order of first showing."""
    rows_by_image: dict[str, list[int]] = {}
    for row, stimulus_id in enumerate(stimulus_ids):
        rows_by_image.setdefault(str(stimulus_id), []).append(row)
    return [rows for rows in rows_by_image.values() if len(rows) >= 2]


def _columnwise_correlation(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Pearson r of each column of ``first`` with the same column of ``second``; 0 where undefined."""
    centred_a = first - first.mean(axis=0)
    centred_b = second - second.mean(axis=0)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        r = (centred_a * centred_b).sum(axis=0) / np.sqrt((centred_a**2).sum(axis=0) * (centred_b**2).sum(axis=0))
    return np.where(np.isfinite(r), np.clip(r, -1.0, 1.0), 0.0)


def reliability_threshold(n_images: int, p_value: float = 0.01) -> float:
    """The reliability a voxel with no repeatable signal exceeds with probability ``p_value`` (one-sided).

    Assumes the null of independent Gaussian betas across images, under which Fisher's z = atanh(r) of a correlation
    across ``n_images`` pairs is about N(0, 1 / (n_images - 3)). The threshold is ``tanh(z_{1-p} / sqrt(n - 3))``.
    It is exact (to Fisher's approximation) for one repeat pair; averaging more pairs narrows the null, so with
    images shown three or more times the threshold is conservative (fewer than ``p_value`` of null voxels pass).
    """
    if not 0.0 < p_value < 1.0:
        raise CalibrationError(f"reliability_threshold: p_value must be in (0, 1); got {p_value}")
    if n_images <= 3:
        raise CalibrationError(
            f"reliability_threshold: the Fisher z null needs n_images > 3; got {n_images} repeated images "
            "(give an explicit threshold, e.g. calibrate.reliability_threshold, or supply a mask with --mask)"
        )
    z_critical = float(scipy.stats.norm.isf(p_value))
    return float(np.tanh(z_critical / np.sqrt(n_images - 3)))


def fdr_threshold(reliability: Reliability, fdr: float = 0.05) -> float:
    """The reliability above which voxels are kept with a false discovery rate of about ``fdr``.

    Benjamini-Hochberg over the candidates, with each voxel's one-sided p value from the Fisher z null of
    :func:`reliability_threshold`. A per-voxel p threshold would keep p x (thousands of brain voxels) noise voxels;
    this keeps about ``fdr`` of the selection as noise. When no voxel passes, the Bonferroni threshold is returned
    (which none passes either).
    """
    if not 0.0 < fdr < 1.0:
        raise CalibrationError(f"fdr_threshold: fdr must be in (0, 1); got {fdr} (calibrate.reliability_fdr)")
    n_images, values = reliability.n_images, reliability.values
    reliability_threshold(n_images)  # the null's own checks (enough repeated images)
    z = np.arctanh(np.clip(values, -0.999999, 0.999999)) * np.sqrt(n_images - 3)
    p_sorted = np.sort(scipy.stats.norm.sf(z))
    n_voxels = values.size
    passing = np.flatnonzero(p_sorted <= fdr * np.arange(1, n_voxels + 1) / n_voxels)
    n_kept = int(passing[-1]) + 1 if passing.size else 1
    return reliability_threshold(n_images, min(fdr * n_kept / n_voxels, 0.5))


def select_voxels(
    reliability: Reliability,
    *,
    threshold: float | None = None,
    fdr: float = 0.05,
    max_voxels: int | None = None,
    min_voxels: int = 10,
) -> VoxelSelection:
    """Voxels with reliability above ``threshold`` (default: :func:`fdr_threshold` at ``fdr``), at most
    ``max_voxels`` of them (the most reliable); fewer than ``min_voxels`` is an error, because a model cannot be
    fitted on them."""
    _check_counts(max_voxels, min_voxels)
    cut = fdr_threshold(reliability, fdr) if threshold is None else float(threshold)
    if not -1.0 <= cut < 1.0:
        raise CalibrationError(f"select_voxels: threshold must be in [-1, 1); got {cut}")
    values = reliability.values
    passing = np.flatnonzero(values > cut)
    if passing.size < min_voxels:
        raise CalibrationError(
            f"select_voxels: {passing.size} of {values.size} voxels have reliability above {cut:.4f} "
            f"({reliability.n_images} repeated images), need at least {min_voxels}; lower "
            "calibrate.reliability_threshold (or raise calibrate.reliability_fdr), or supply a mask with --mask"
        )
    if max_voxels is not None and passing.size > max_voxels:
        order = np.argsort(-values[passing], kind="stable")
        passing = passing[order[:max_voxels]]
    return VoxelSelection(
        indices=np.sort(passing).astype(np.int64),
        threshold=cut,
        n_candidates=int(values.size),
        reliability=reliability,
    )


def _check_counts(max_voxels: int | None, min_voxels: int) -> None:
    """``min_voxels`` >= 1 and ``max_voxels`` (when given) >= ``min_voxels``."""
    if min_voxels < 1:
        raise CalibrationError(f"select_voxels: min_voxels must be >= 1; got {min_voxels}")
    if max_voxels is not None and max_voxels < min_voxels:
        raise CalibrationError(
            f"select_voxels: max_voxels ({max_voxels}) must be >= min_voxels ({min_voxels}); raise max_voxels"
        )
