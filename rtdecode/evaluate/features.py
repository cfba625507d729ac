"""The feature networks of the paper's high-level metrics (spec §6), loaded from local weight files only.

Each network turns images into features at one node; the metrics then compare reconstructions with seen images
through those features (two-way identification or correlation distance, :mod:`rtdecode.evaluate.identification`).
Nothing downloads: every network reads one file from a weights folder, and :func:`check_weights` names each missing
file and the metrics that need it before any work starts.

Expected files in the weights folder (fetch them once on a machine with internet, then copy the folder):

- ``alexnet.pth``: metrics alexnet2 (node ``features.4``) and alexnet5 (``features.11``). torchvision
  ``AlexNet_Weights.IMAGENET1K_V1``, i.e. the ``alexnet-owt-7be5be79.pth`` torchvision downloads, renamed.
- ``inception_v3.pth``: metric inception (``avgpool``). torchvision ``Inception_V3_Weights.IMAGENET1K_V1``
  (DEFAULT): ``inception_v3_google-0cc3c7bd.pth``.
- ``efficientnet_b1.pth``: metric effnet (``avgpool``). torchvision ``EfficientNet_B1_Weights.IMAGENET1K_V2``
  (DEFAULT): ``efficientnet_b1-c27df63c.pth``.
- ``swav_resnet50.pth``: metric swav (``avgpool``). The checkpoint SwAV's ``torch.hub`` entry
  (facebookresearch/swav:main, resnet50) loads: ``swav_800ep_pretrain.pth.tar`` from
  dl.fbaipublicfiles.com/deepcluster/.
- ``clip_vit_l14.pt``: metric clip (``encode_image``). OpenAI CLIP ViT-L/14: OpenAI's TorchScript ``ViT-L-14.pt``
  (what ``clip.load("ViT-L/14")`` caches), or the state dict of ``open_clip.create_model("ViT-L-14",
  pretrained="openai", force_quick_gelu=True)`` saved with ``torch.save``.

A torchvision file can also be written as ``torch.save(torchvision.models.alexnet(weights="IMAGENET1K_V1")
.state_dict(), "alexnet.pth")``. State dicts load with ``weights_only=True``; a ``module.`` prefix (SwAV's
DataParallel checkpoint) and a ``{"state_dict": ...}`` wrapper are accepted. SwAV's file holds no ``fc`` (it stays
randomly initialised, as in SwAV's hub entry; ``avgpool`` comes before it) and extra projection-head and prototype
weights, which are ignored. OpenAI's CLIP uses QuickGELU, so the default CLIP architecture is open_clip's
``ViT-L-14-quickgelu`` (``ViT-L-14`` with ``quick_gelu=True``).

Preprocessing (spec §6): images (N, 3, H, W) in [0, 1] are resized so the shorter side is the network's
``size_px`` (bilinear, antialiased as torchvision's ``Resize`` does by default on tensors; no crop), then
normalised with the network's mean and std. InceptionV3 keeps torchvision's ``transform_input=True``, as
``inception_v3(weights=...)`` builds it.
"""

import dataclasses
import pickle
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

from rtdecode.errors import CheckpointError, ConfigError
from rtdecode.evaluate.metrics import METRICS_BY_NAME

if TYPE_CHECKING:
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_NODE = "encode_image"  # CLIP's features are its projected image embedding, not a submodule's output
CLIP_ARCHITECTURE = "ViT-L-14-quickgelu"  # open_clip's ViT-L-14 with QuickGELU, the activation OpenAI's model uses
TORCHSCRIPT_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")  # not model state


@dataclasses.dataclass(frozen=True)
class FeatureNetwork:
    """One feature network: the metrics it serves, its file in the weights folder, the node whose output is the
    features (``node``; ``metric_nodes`` where a metric reads another one), and its preprocessing (shorter side
    resized to ``size_px``, then ``(x - mean) / std`` per channel). ``source`` says where the weights come from."""

    name: str
    metric_names: tuple[str, ...]
    weights_file: str
    node: str
    size_px: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    metric_nodes: tuple[tuple[str, str], ...] = ()
    source: str = ""

    def node_for(self, metric: str) -> str:
        """The node whose output is ``metric``'s features (AlexNet serves two metrics from two nodes)."""
        if metric not in self.metric_names:
            raise ConfigError(f"metric {metric!r} is not served by feature network {self.name!r} ({self.metric_names})")
        return dict(self.metric_nodes).get(metric, self.node)


FEATURE_NETWORKS: Mapping[str, FeatureNetwork] = MappingProxyType(
    {
        network.name: network
        for network in (
            FeatureNetwork(
                "alexnet", ("alexnet2", "alexnet5"), "alexnet.pth", "features.4", 256, IMAGENET_MEAN, IMAGENET_STD,
                metric_nodes=(("alexnet2", "features.4"), ("alexnet5", "features.11")),
                source="torchvision AlexNet_Weights.IMAGENET1K_V1 (alexnet-owt-7be5be79.pth)",
            ),
            FeatureNetwork(
                "inception_v3", ("inception",), "inception_v3.pth", "avgpool", 342, IMAGENET_MEAN, IMAGENET_STD,
                source="torchvision Inception_V3_Weights.IMAGENET1K_V1 (inception_v3_google-0cc3c7bd.pth)",
            ),
            FeatureNetwork(
                "clip_vit_l14", ("clip",), "clip_vit_l14.pt", CLIP_NODE, 224, CLIP_MEAN, CLIP_STD,
                source="OpenAI CLIP ViT-L/14 (OpenAI's ViT-L-14.pt, or open_clip ViT-L-14 'openai' state dict)",
            ),
            FeatureNetwork(
                "efficientnet_b1", ("effnet",), "efficientnet_b1.pth", "avgpool", 255, IMAGENET_MEAN, IMAGENET_STD,
                source="torchvision EfficientNet_B1_Weights.IMAGENET1K_V2 (efficientnet_b1-c27df63c.pth)",
            ),
            FeatureNetwork(
                "swav_resnet50", ("swav",), "swav_resnet50.pth", "avgpool", 224, IMAGENET_MEAN, IMAGENET_STD,
                source="SwAV torch.hub facebookresearch/swav:main resnet50 (swav_800ep_pretrain.pth.tar)",
            ),
        )
    }
)  # fmt: skip


def check_weights(weights_dir: Path | None, metrics: Iterable[str]) -> dict[str, Path]:
    """The weight file of each feature network the ``metrics`` need, keyed by network name (low-level metrics need
    none). One :class:`ConfigError` lists every missing file with the metrics that need it and where to get it."""
    needed = networks_needed(metrics)
    if not needed:
        return {}
    if weights_dir is None:
        asked = [metric for metrics_of_network in needed.values() for metric in metrics_of_network]
        raise ConfigError(f"metrics {asked} need feature-network weights, but no weights folder was given")
    weights_dir = Path(weights_dir)
    paths = {name: weights_dir / FEATURE_NETWORKS[name].weights_file for name in needed}
    missing = [name for name, path in paths.items() if not path.is_file()]
    if missing:
        raise ConfigError(_missing_message(weights_dir, missing, needed))
    return paths


def load_network(
    name: str, weights_dir: Path | None, device: "str | torch.device" = "cpu", *, clip_config: dict | None = None
) -> "torch.nn.Module":
    """Feature network ``name`` with its weights from ``weights_dir``, float32, in eval mode, without gradients, on
    ``device``. ``clip_config`` (CLIP only) replaces the ``ViT-L-14-quickgelu`` open_clip model config, e.g. a tiny
    one in tests; the weights still load from the file."""
    network = _network(name)
    if clip_config is not None and name != "clip_vit_l14":
        raise ConfigError(f"clip_config applies to clip_vit_l14 only, got it for {name!r}")
    path = check_weights(weights_dir, network.metric_names)[name]
    state = _read_state_dict(path)
    if name == "clip_vit_l14":
        module = _clip(state, path, clip_config)
    else:
        module = _BUILDERS[name](state, path)
    return module.float().eval().requires_grad_(False).to(device)


def extract(
    network_name: str,
    module: "torch.nn.Module",
    images: "torch.Tensor",
    batch_size: int = 16,
    *,
    node: str | None = None,
) -> "torch.Tensor":
    """Features of ``images`` ((N, 3, H, W) float in [0, 1], any device) from ``module`` (as :func:`load_network`
    gives): preprocess, forward in batches of ``batch_size`` without gradients, and keep the output of ``node``
    (default: the network's node; CLIP: its ``encode_image`` embedding). Returns (N, ...) float32 on the CPU."""
    import torch

    network = _network(network_name)
    _check_images(images)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    node = network.node if node is None else node
    if (node == CLIP_NODE) != (network.name == "clip_vit_l14"):
        raise ConfigError(f"node {node!r} does not fit network {network.name!r} (CLIP reads {CLIP_NODE!r} only)")
    device = next(module.parameters()).device
    batches = [
        _batch_features(network, module, node, images[start : start + batch_size].to(device, torch.float32))
        for start in range(0, images.shape[0], batch_size)
    ]
    return torch.cat(batches)


def _network(name: str) -> FeatureNetwork:
    if name not in FEATURE_NETWORKS:
        raise ConfigError(f"feature network {name!r} is unknown; choose from {', '.join(FEATURE_NETWORKS)}")
    return FEATURE_NETWORKS[name]


def networks_needed(metrics: Iterable[str]) -> dict[str, list[str]]:
    """Network name -> the metrics asked that need it, in the order asked; unknown metric names are an error."""
    network_of = {metric: network.name for network in FEATURE_NETWORKS.values() for metric in network.metric_names}
    needed: dict[str, list[str]] = {}
    for metric in metrics:
        if metric in network_of:
            needed.setdefault(network_of[metric], []).append(metric)
        elif metric not in METRICS_BY_NAME:
            raise ConfigError(f"metric {metric!r} is unknown; choose from {', '.join(METRICS_BY_NAME)}")
    return needed


def _missing_message(weights_dir: Path, missing: list[str], needed: dict[str, list[str]]) -> str:
    where = str(weights_dir) if weights_dir.is_dir() else f"{weights_dir} (no such folder)"
    files = "; ".join(
        f"{FEATURE_NETWORKS[name].weights_file} (needed by {', '.join(needed[name])}; "
        f"from {FEATURE_NETWORKS[name].source})"
        for name in missing
    )
    return (
        f"feature-network weights missing in {where}: {files}. Put the files there (see rtdecode.evaluate.features) "
        f"or leave those metrics out"
    )


def _read_state_dict(path: Path) -> dict:
    """A checkpoint file as a flat state dict: a plain or ``{"state_dict": ...}`` pickle (read with
    ``weights_only=True``) or a TorchScript archive (OpenAI's CLIP file); any ``module.`` prefix removed."""
    import torch

    try:
        if _is_torchscript(path):
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as error:
        raise CheckpointError(f"weights file {path} cannot be read as a state dict: {error}") from error
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(torch.is_tensor(value) for value in state.values()):
        raise CheckpointError(f"weights file {path} must hold a state dict (names -> tensors), got {type(state)}")
    return {key.removeprefix("module."): value for key, value in state.items()}


def _is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive (a zip holding ``constants.pkl``) rather than a pickled dict."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(entry.endswith("/constants.pkl") for entry in archive.namelist())


def _load_strict(model, state: Mapping, path: Path):
    """Load ``state`` into ``model``: every key present, none extra, every shape equal; else a CheckpointError."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"weights file {path} does not fit {type(model).__name__}: {error}") from error
    return model


def _alexnet(state: Mapping, path: Path):
    from torchvision.models import alexnet

    return _load_strict(alexnet(weights=None), state, path)


def _inception_v3(state: Mapping, path: Path):
    """InceptionV3 as torchvision builds it for its ImageNet weights (``transform_input=True``); the auxiliary
    classifier is built when the file has its weights (torchvision's file does)."""
    from torchvision.models import inception_v3

    has_aux = any(key.startswith("AuxLogits.") for key in state)
    model = inception_v3(weights=None, aux_logits=has_aux, init_weights=False, transform_input=True)
    return _load_strict(model, state, path)


def _efficientnet_b1(state: Mapping, path: Path):
    from torchvision.models import efficientnet_b1

    return _load_strict(efficientnet_b1(weights=None), state, path)


def _swav_resnet50(state: Mapping, path: Path):
    """ResNet-50 with SwAV's trunk: every key but ``fc`` must be in the file; keys the ResNet lacks (SwAV's
    projection head and prototypes) are ignored; ``fc`` keeps its random init when absent (it follows avgpool)."""
    from torchvision.models import resnet50

    model = resnet50(weights=None)
    expected = model.state_dict()
    missing = [key for key in expected if key not in state and not key.startswith("fc.")]
    if missing:
        raise CheckpointError(
            f"weights file {path} lacks {len(missing)} ResNet-50 weights SwAV needs (first: {missing[:3]})"
        )
    kept = {key: value for key, value in state.items() if key in expected}
    try:
        model.load_state_dict(kept, strict=False)
    except RuntimeError as error:
        raise CheckpointError(f"weights file {path} does not fit a ResNet-50: {error}") from error
    return model


def _clip(state: Mapping, path: Path, clip_config: dict | None):
    """open_clip's CLIP with OpenAI's ViT-L/14 architecture, or ``clip_config``, loaded from ``state``."""
    import copy

    import open_clip

    config = open_clip.get_model_config(CLIP_ARCHITECTURE) if clip_config is None else copy.deepcopy(dict(clip_config))
    if config is None:
        raise ConfigError(f"open_clip {open_clip.__version__} has no model config {CLIP_ARCHITECTURE!r}")
    try:
        model = open_clip.CLIP(**config)
    except (TypeError, ValueError, KeyError) as error:
        raise ConfigError(f"clip_config cannot build an open_clip CLIP model: {error}") from error
    state = {key: value for key, value in state.items() if key not in TORCHSCRIPT_EXTRA_KEYS}
    return _load_strict(model, state, path)


_BUILDERS = MappingProxyType(
    {
        "alexnet": _alexnet,
        "inception_v3": _inception_v3,
        "efficientnet_b1": _efficientnet_b1,
        "swav_resnet50": _swav_resnet50,
    }
)


def _check_images(images) -> None:
    """Images must be a floating (N >= 1, 3, H, W) tensor with values in [0, 1]."""
    import torch

    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3 or images.shape[0] < 1:
        shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise ConfigError(f"images must be an (N >= 1, 3, H, W) tensor, got {shape}")
    if not images.is_floating_point():
        raise ConfigError(f"images must be floating point in [0, 1], got dtype {images.dtype}")
    low, high = float(images.min()), float(images.max())
    if low < 0.0 or high > 1.0:
        raise ConfigError(f"images must lie in [0, 1], got values from {low:.4g} to {high:.4g}")


def _preprocess(network: FeatureNetwork, batch):
    """Shorter side resized to the network's size (bilinear, antialiased, no crop), then normalised per channel."""
    import torch
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import resize

    resized = resize(batch, [network.size_px], interpolation=InterpolationMode.BILINEAR, antialias=True)
    mean = torch.tensor(network.mean, dtype=resized.dtype, device=resized.device).view(1, 3, 1, 1)
    std = torch.tensor(network.std, dtype=resized.dtype, device=resized.device).view(1, 3, 1, 1)
    return (resized - mean) / std


def _batch_features(network: FeatureNetwork, module, node: str, batch):
    import torch

    inputs = _preprocess(network, batch)
    with torch.inference_mode():
        if node == CLIP_NODE:
            features = module.encode_image(inputs)
        else:
            features = _node_output(module, node, inputs)
    return features.float().cpu()


def _node_output(module, node: str, inputs):
    """The output of submodule ``node`` during one forward pass, captured by a forward hook."""
    try:
        submodule = module.get_submodule(node)
    except AttributeError as error:
        raise ConfigError(f"node {node!r} is not a submodule of {type(module).__name__}") from error
    outputs = []
    handle = submodule.register_forward_hook(lambda _module, _inputs, output: outputs.append(output.clone()))
    try:
        module(inputs)
    finally:
        handle.remove()
    if len(outputs) != 1:
        raise ConfigError(f"node {node!r} ran {len(outputs)} times in one forward pass; its features are ambiguous")
    return outputs[0]
