"""The paper's feature-based metrics (spec §6, paper Appendix A.9): two-way identification and correlation distance.

Features are ``(N, ...)`` numpy arrays or torch tensors (any device), item ``i`` of the reconstructions paired
with item ``i`` of the images; each item is flattened to one vector. Correlations are Pearson, computed in float64.

- Two-way identification (AlexNet, Inception, CLIP): ``r[i, j]`` = correlation of image ``i``'s features with
  reconstruction ``j``'s. Reconstruction ``j`` scores the fraction of the other N - 1 images ``i`` with
  ``r[i, j] < r[j, j]`` (strictly lower: a tie counts as a failure). The metric is the mean over reconstructions,
  over all pairs (no sampling). Chance 0.5, ceiling 1.
- Correlation distance (EfficientNet-B1, SwAV): ``1 - Pearson`` between each reconstruction's features and its own
  image's, clipped to [0, 2] as ``scipy.spatial.distance.correlation`` does, averaged over pairs. Lower is better;
  unrelated features give about 1.

An item whose features are constant has no correlation: its correlations are NaN (as ``np.corrcoef`` gives), a NaN
never counts as lower, and a NaN distance makes the mean NaN.
"""

import numpy as np
from numpy.typing import ArrayLike

from rtdecode.errors import ConfigError


def two_way_per_recon(recon_features: ArrayLike, image_features: ArrayLike) -> np.ndarray:
    """Each reconstruction's two-way identification score: ``(N,)`` float64 fractions in [0, 1]."""
    recon_rows, image_rows = _paired_rows(recon_features, image_features, min_items=2, metric="two-way identification")
    correlations = _standardised(image_rows) @ _standardised(recon_rows).T  # [image i, recon j]
    own = np.diag(correlations)
    n_lower = (correlations < own[np.newaxis, :]).sum(axis=0)
    return n_lower / (len(own) - 1)


def two_way_identification(recon_features: ArrayLike, image_features: ArrayLike) -> float:
    """Two-way identification: the mean over reconstructions of :func:`two_way_per_recon`."""
    return float(two_way_per_recon(recon_features, image_features).mean())


def correlation_distances(recon_features: ArrayLike, image_features: ArrayLike) -> np.ndarray:
    """``1 - Pearson`` between each reconstruction's features and its image's, clipped to [0, 2]: ``(N,)`` float64."""
    recon_rows, image_rows = _paired_rows(recon_features, image_features, min_items=1, metric="correlation distance")
    correlations = (_standardised(recon_rows) * _standardised(image_rows)).sum(axis=1)
    return np.clip(1.0 - correlations, 0.0, 2.0)


def correlation_distance(recon_features: ArrayLike, image_features: ArrayLike) -> float:
    """Mean correlation distance over pairs (lower is better): the mean of :func:`correlation_distances`."""
    return float(correlation_distances(recon_features, image_features).mean())


def _as_rows(features: ArrayLike, name: str) -> np.ndarray:
    """An ``(N, ...)`` array or tensor (any device) as ``(N, D)`` float64, one flattened item per row."""
    if hasattr(features, "detach"):
        features = features.detach().cpu().double().numpy()
    rows = np.asarray(features, dtype=np.float64)
    if rows.ndim < 2:
        raise ConfigError(f"{name} must have shape (N, ...) with features per item, got shape {rows.shape}")
    return rows.reshape(rows.shape[0], int(np.prod(rows.shape[1:])))


def _paired_rows(
    recon_features: ArrayLike, image_features: ArrayLike, min_items: int, metric: str
) -> tuple[np.ndarray, np.ndarray]:
    """Both feature sets as rows, checked to pair up: same N >= ``min_items``, same length D >= 2 per item."""
    recon_rows = _as_rows(recon_features, "recon_features")
    image_rows = _as_rows(image_features, "image_features")
    if recon_rows.shape[0] != image_rows.shape[0]:
        raise ConfigError(
            f"{metric}: recon_features and image_features must hold the same number of items, got "
            f"{recon_rows.shape[0]} and {image_rows.shape[0]}"
        )
    if recon_rows.shape[0] < min_items:
        raise ConfigError(f"{metric} needs N >= {min_items} items, got N = {recon_rows.shape[0]}")
    if recon_rows.shape[1] != image_rows.shape[1] or recon_rows.shape[1] < 2:
        raise ConfigError(
            f"{metric}: every item needs the same number (>= 2) of features in both sets, got "
            f"{recon_rows.shape[1]} and {image_rows.shape[1]}"
        )
    return recon_rows, image_rows


def _standardised(rows: np.ndarray) -> np.ndarray:
    """Each row centred and scaled to unit norm, so a dot product of two rows is their Pearson correlation."""
    centred = rows - rows.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(centred, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return centred / norms
