"""The metrics of MindEye2's Table 1: their names, direction, chance level and the paper's figures to compare with.

``PAPER_40_SESSIONS`` and ``PAPER_1_HOUR`` are Table 1's "MindEye2" and "MindEye2 (1 hour)" rows (averaged over NSD
subjects 1, 2, 5 and 7; retrieval in percent there, fractions here). "image" retrieval is brain -> image (forward),
"brain" retrieval image -> brain (backward), both 300-way (chance 1/300).
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    """One column of Table 1."""

    name: str
    label: str
    group: str  # "low-level", "high-level", "retrieval"
    higher_is_better: bool
    chance: float | None  # the value unrelated pairs give (None: it depends on the images; for the correlation
    # distances unrelated pairs score well below 1, since pooled ReLU features correlate across any two pictures)
    network: str | None = None  # the feature network it needs (rtdecode.evaluate.features), if any


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("pixcorr", "PixCorr", "low-level", True, 0.0),
    MetricSpec("ssim", "SSIM", "low-level", True, None),
    MetricSpec("alexnet2", "Alex(2)", "high-level", True, 0.5, "alexnet"),
    MetricSpec("alexnet5", "Alex(5)", "high-level", True, 0.5, "alexnet"),
    MetricSpec("inception", "Incep", "high-level", True, 0.5, "inception_v3"),
    MetricSpec("clip", "CLIP", "high-level", True, 0.5, "clip_vit_l14"),
    MetricSpec("effnet", "Eff", "high-level", False, None, "efficientnet_b1"),
    MetricSpec("swav", "SwAV", "high-level", False, None, "swav_resnet50"),
    MetricSpec("image_retrieval", "Image", "retrieval", True, 1 / 300),
    MetricSpec("brain_retrieval", "Brain", "retrieval", True, 1 / 300),
)
METRICS_BY_NAME = {spec.name: spec for spec in METRICS}
IMAGE_METRICS = tuple(spec.name for spec in METRICS if spec.group != "retrieval")
TWO_WAY_METRICS = ("alexnet2", "alexnet5", "inception", "clip")  # compare each pair with the others: N >= 2

PAPER_40_SESSIONS = {
    "pixcorr": 0.322, "ssim": 0.431, "alexnet2": 0.961, "alexnet5": 0.986, "inception": 0.954, "clip": 0.930,
    "effnet": 0.619, "swav": 0.344, "image_retrieval": 0.988, "brain_retrieval": 0.983,
}  # fmt: skip
PAPER_1_HOUR = {
    "pixcorr": 0.195, "ssim": 0.419, "alexnet2": 0.842, "alexnet5": 0.906, "inception": 0.812, "clip": 0.792,
    "effnet": 0.810, "swav": 0.468, "image_retrieval": 0.790, "brain_retrieval": 0.574,
}  # fmt: skip
