"""One evaluation: the Table 1 metrics of paired reconstructions and seen images, and retrieval from embeddings.

:func:`evaluate_images` computes the image metrics asked for (low-level ones need nothing; each high-level one needs
its feature network's weight file, all checked before any work starts), :func:`evaluate_retrieval` the 300-way
retrieval from brain and image embeddings; :class:`Evaluation` holds both and is what the report draws and the
JSON keeps.
"""

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from rtdecode.errors import ConfigError
from rtdecode.evaluate import features
from rtdecode.evaluate.metrics import IMAGE_METRICS, METRICS_BY_NAME, TWO_WAY_METRICS
from rtdecode.evaluate.retrieval import RetrievalScores

LOW_LEVEL = ("pixcorr", "ssim")


@dataclasses.dataclass(frozen=True)
class MetricResult:
    """One metric over all pairs: the mean (Table 1's number) and each pair's value. A pair where the metric is
    undefined (PixCorr of a constant picture, say) is NaN in ``per_item``, left out of the mean and counted in
    ``n_undefined``; ``value`` is None when no pair has one."""

    name: str
    value: float | None
    per_item: tuple[float, ...] = ()
    n_undefined: int = 0

    @property
    def label(self) -> str:
        return METRICS_BY_NAME[self.name].label


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Everything one ``rtdecode evaluate`` computed."""

    ids: tuple[str, ...]
    metrics: tuple[MetricResult, ...]
    retrieval: RetrievalScores | None = None
    not_computed: dict[str, str] = dataclasses.field(default_factory=dict)  # metric -> why
    captions: dict[str, dict] = dataclasses.field(default_factory=dict)  # caption metric -> mean and per caption

    def value(self, name: str) -> float | None:
        """A metric's mean, retrieval included; None when it was not computed."""
        if self.retrieval is not None and name in ("image_retrieval", "brain_retrieval"):
            return self.retrieval.forward if name == "image_retrieval" else self.retrieval.backward
        return next((metric.value for metric in self.metrics if metric.name == name), None)

    def to_json(self) -> dict:
        return {
            "n_images": len(self.ids),
            "ids": list(self.ids),
            "metrics": {metric.name: metric.value for metric in self.metrics},
            "per_item": {metric.name: _finite_or_none(metric.per_item) for metric in self.metrics if metric.per_item},
            "undefined": {metric.name: metric.n_undefined for metric in self.metrics if metric.n_undefined},
            "retrieval": None if self.retrieval is None else dataclasses.asdict(self.retrieval),
            "not_computed": dict(self.not_computed),
            "captions": dict(self.captions),
        }


def _finite_or_none(values: Sequence[float]) -> list[float | None]:
    """JSON has no NaN: an undefined value is null."""
    return [float(value) if np.isfinite(value) else None for value in values]


def parse_metrics(text: str) -> tuple[str, ...]:
    """``--metrics``: "all", "low-level", or names separated by commas (checked)."""
    if text == "all":
        return IMAGE_METRICS
    if text == "low-level":
        return LOW_LEVEL
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in IMAGE_METRICS]
    if unknown or not names:
        raise ConfigError(
            f"--metrics {text!r}: unknown {unknown}; choose from all, low-level, {', '.join(IMAGE_METRICS)}"
        )
    return names


def evaluate_images(
    recons,
    images,
    metrics: Sequence[str],
    *,
    weights_dir: Path | None,
    device: str = "cpu",
    batch_size: int = 16,
    say: Callable[[str], None] = lambda text: None,
) -> list[MetricResult]:
    """The image metrics ``metrics`` of paired (N, 3, 256, 256) tensors in [0, 1]. The weight files of every
    high-level metric asked for are checked first: one error names each missing file and the metrics needing it."""
    networks = features.networks_needed(metrics)
    _check_pairs(recons, images, min_pairs=2 if set(metrics) & set(TWO_WAY_METRICS) else 1)
    features.check_weights(weights_dir, metrics)
    results = [_low_level(name, recons, images) for name in metrics if name in LOW_LEVEL]
    for network, names in networks.items():
        say(f"evaluate: {network} features of {len(recons)} pairs")
        module = features.load_network(network, weights_dir, device)
        results += _high_level(network, module, names, recons, images, batch_size)
    order = {name: index for index, name in enumerate(metrics)}
    return sorted(results, key=lambda result: order[result.name])


def _low_level(name: str, recons, images) -> MetricResult:
    from rtdecode.evaluate import lowlevel

    values = (lowlevel.pixcorr if name == "pixcorr" else lowlevel.ssim)(recons, images)
    return _result(name, values)


def _high_level(network: str, module, names: list[str], recons, images, batch_size: int) -> list[MetricResult]:
    from rtdecode.evaluate import identification

    results = []
    for name in names:
        node = features.FEATURE_NETWORKS[network].node_for(name)
        recon_features = features.extract(network, module, recons, batch_size=batch_size, node=node)
        image_features = features.extract(network, module, images, batch_size=batch_size, node=node)
        if METRICS_BY_NAME[name].higher_is_better:
            per_item = identification.two_way_per_recon(recon_features, image_features)
        else:
            per_item = identification.correlation_distances(recon_features, image_features)
        results.append(_result(name, per_item))
    return results


def _result(name: str, per_item) -> MetricResult:
    values = np.asarray(per_item.cpu() if hasattr(per_item, "cpu") else per_item, dtype=np.float64)
    defined = values[np.isfinite(values)]
    mean = float(defined.mean()) if defined.size else None
    return MetricResult(name, mean, tuple(float(value) for value in values), int(values.size - defined.size))


def _check_pairs(recons, images, min_pairs: int) -> None:
    if tuple(recons.shape) != tuple(images.shape) or recons.ndim != 4 or recons.shape[1] != 3:
        raise ConfigError(
            f"evaluate: reconstructions and images must be paired (N, 3, H, W) tensors of one shape, got "
            f"{tuple(recons.shape)} and {tuple(images.shape)}"
        )
    if recons.shape[0] < min_pairs:
        raise ConfigError(
            f"evaluate: two-way identification needs at least 2 pairs (it compares them), got {recons.shape[0]}"
        )


def evaluate_captions(
    ids: Sequence[str], predictions: dict, references: dict, *, sentence_model_dir: Path | None, device: str = "cpu"
) -> tuple[dict[str, dict], dict[str, str]]:
    """Caption metrics of the predicted captions of ``ids`` against their references (METEOR, ROUGE-1/L, sentence
    similarity); ``(computed, not computed with the reason)``. Every id needs a prediction and references."""
    from rtdecode.evaluate import captions

    missing = [image_id for image_id in ids if image_id not in predictions or image_id not in references]
    if missing:
        raise ConfigError(
            f"captions: no prediction or reference for {len(missing)} pictures ({', '.join(missing[:8])})"
        )
    results = captions.caption_metrics(
        [predictions[image_id] for image_id in ids],
        [references[image_id] for image_id in ids],
        sentence_model_dir=sentence_model_dir,
        device=device,
    )
    computed = {
        name: {"mean": value.mean, "per_caption": list(value.per_caption)}
        for name, value in results.items()
        if isinstance(value, captions.MetricValue)
    }
    reasons = {name: value.reason for name, value in results.items() if isinstance(value, captions.Unavailable)}
    return computed, reasons
