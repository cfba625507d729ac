"""Starting a run from a trained model bundle: the fine-tune of a new subject (spec §4).

The public fine-tune builds a model for the new subject(s) with the pretrained architecture, then loads the
multi-subject checkpoint with ``strict=False`` after popping only the first ridge weight. So every backbone
and prior weight is loaded, the new ridge weights are freshly initialised (PyTorch's Linear init), and, a
quirk kept here, ridge layer ``i``'s bias is copied from the pretrained ridge layer ``i`` where one exists.
Nothing is frozen; the optimiser, scheduler and epoch counter start afresh.
"""

import dataclasses
import logging
from pathlib import Path

import torch

from rtdecode.errors import TrainError
from rtdecode.models.bundle import PROVENANCE_FILE, WEIGHTS_FILE, read_bundle_config
from rtdecode.models.config import MindEye2Config
from rtdecode.models.mindeye2 import MindEye2

log = logging.getLogger(__name__)


def fine_tune_config(
    bundle_dir: Path, subjects: tuple[str, ...], n_voxels: tuple[int, ...], token_shape: tuple[int, int]
) -> MindEye2Config:
    """The bundle's architecture with ridge layers for ``subjects``; TrainError if the targets do not fit it."""
    pretrained, _ = read_bundle_config(Path(bundle_dir))
    backbone = pretrained.backbone
    if (backbone.clip_tokens, backbone.clip_dim) != tuple(token_shape):
        raise TrainError(
            f"model.init_from {bundle_dir}: the model predicts ({backbone.clip_tokens}, {backbone.clip_dim}) image "
            f"tokens; the embedder gives {tuple(token_shape)}. Use the embedder the bundle was trained with"
        )
    return dataclasses.replace(pretrained, subjects=tuple(subjects), n_voxels=tuple(n_voxels))


def load_pretrained(model: MindEye2, bundle_dir: Path) -> dict[str, int]:
    """Copy the bundle's weights into ``model`` (spec §4); return counts of loaded and fresh tensors.

    Loaded: every non-ridge tensor, and ridge biases of layers the bundle also has. Fresh: the ridge weights,
    and a ridge bias without a pretrained counterpart. Any other missing or mis-shaped tensor is an error.
    """
    from rtdecode.checkpoint_io import read_safetensors

    path = Path(bundle_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise TrainError(f"model.init_from {bundle_dir}: {WEIGHTS_FILE} is missing")
    pretrained = read_safetensors(path)
    own = model.state_dict()
    chosen, fresh = {}, []
    for name, tensor in own.items():
        source = pretrained.get(name)
        if _fresh_ridge_weight(name) or (source is None and name.startswith("ridge.")):
            fresh.append(name)
            continue
        if source is None or tuple(source.shape) != tuple(tensor.shape):
            found = "missing" if source is None else f"shape {tuple(source.shape)}"
            raise TrainError(f"model.init_from {bundle_dir}: {name} is {found}; this model needs {tuple(tensor.shape)}")
        chosen[name] = source.to(dtype=tensor.dtype)
    with torch.no_grad():
        model.load_state_dict({**own, **chosen}, strict=True)
    log.info("fine-tune: %d tensors from %s, %d fresh (%s)", len(chosen), bundle_dir, len(fresh), ", ".join(fresh))
    return {"loaded": len(chosen), "fresh": len(fresh)}


def bundle_identity(bundle_dir: Path) -> str:
    """What a resumed fine-tune must share with its start: the bundle's weights checksum (no path)."""
    import json

    provenance = Path(bundle_dir) / PROVENANCE_FILE
    if provenance.is_file():
        digest = json.loads(provenance.read_text()).get("weights_sha256")
        if digest:
            return str(digest)
    from rtdecode.models.bundle import file_sha256

    return file_sha256(Path(bundle_dir) / WEIGHTS_FILE)


def _fresh_ridge_weight(name: str) -> bool:
    return name.startswith("ridge.linears.") and name.endswith(".weight")
