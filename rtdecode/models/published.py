"""Import of the published MindEye2 checkpoints into a bundle (``rtdecode model import-mindeye2``).

Reads ``train_logs/<model>/last.pth`` (spec §2.1: a dict whose ``model_state_dict`` is the unwrapped
model) or a DeepSpeed ZeRO folder, always with ``weights_only=True`` (nothing in the file is executed)
and memory-mapped. The model's geometry is read from the tensor shapes (hidden size, subjects and
their voxel counts, low-level branch present or not, prior size); every key and shape is then checked
against the model built from that geometry, and the weights are written unchanged (or cast, if asked)
to a bundle that :func:`rtdecode.models.bundle.load_bundle` loads.
"""

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rtdecode import __version__
from rtdecode.checkpoint_io import check_state, expected_shapes, inert_stand_in, torch_load
from rtdecode.errors import CheckpointError
from rtdecode.models.bundle import file_sha256, save_bundle
from rtdecode.models.config import (
    NSD_VOXELS,
    BackboneConfig,
    ConverterConfig,
    LowLevelConfig,
    MindEye2Config,
    PriorConfig,
)
from rtdecode.models.converter import CLIPConverter
from rtdecode.models.mindeye2 import MindEye2
from rtdecode.models.precision import cast_state
from rtdecode.models.transformer import RotaryEmbedding
from rtdecode.models.zero import is_zero_checkpoint, read_zero_checkpoint

STATE_KEYS = ("model_state_dict", "state_dict", "model", "module")  # where a checkpoint may nest its weights
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / torch.compile wrappers around the saved model


def import_mindeye2(
    source: Path,
    out: Path,
    *,
    subjects: Sequence[str] | None = None,
    converter: Path | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    tag: str | None = None,
    progress: Callable[[str], None] = lambda message: None,
) -> Path:
    """Check a published checkpoint (file or ZeRO folder, ``tag`` naming its step folder) and write a bundle."""
    source = Path(source)
    progress(f"reading {source}")
    state, provenance = read_checkpoint(source, tag=tag)
    try:
        config = infer_config(state, subjects=subjects)
    except CheckpointError as error:
        raise CheckpointError(f"{source}: {error}") from None
    if provenance["source_kind"] == "deepspeed-zero":
        state, filled = _fill_rotary_tables(state, config)
        if filled:
            provenance["filled_keys"] = filled
    progress(f"geometry: {describe(config)}")
    with torch.device("meta"):
        check_state(expected_shapes(MindEye2(config)), state, str(source))
    converter_part = None
    if converter is not None:
        converter_part = read_converter(converter)
        provenance["converter_source"] = str(converter)
    state = cast_state(state, dtype)
    provenance.update(imported_by=f"rtdecode {__version__}", dtype=_dtype_name(state))
    progress(f"writing bundle {out}")
    return save_bundle(out, config, state, provenance=provenance, converter=converter_part, overwrite=overwrite)


def read_checkpoint(source: Path, *, tag: str | None = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The model state_dict of a ``last.pth`` (or bare state_dict file) or a ZeRO folder, plus provenance."""
    if not source.exists():
        raise CheckpointError(f"checkpoint {source} does not exist")
    if source.is_dir():
        if is_zero_checkpoint(source):
            state = read_zero_checkpoint(source, tag)
            return _unwrap(state, source), {"source": str(source.resolve()), "source_kind": "deepspeed-zero"}
        if (source / "last.pth").is_file():
            return read_checkpoint(source / "last.pth")
        raise CheckpointError(f"{source} is a folder with neither last.pth nor a DeepSpeed ZeRO checkpoint")
    payload = _torch_load(source)
    state = _unwrap(_state_dict_of(payload, source), source)
    provenance: dict[str, Any] = {"source": str(source.resolve()), "source_kind": "torch"}
    provenance["source_sha256"] = file_sha256(source)
    if isinstance(payload, Mapping) and isinstance(payload.get("epoch"), int):
        provenance["epoch"] = payload["epoch"]
    return state, provenance


def read_converter(path: Path) -> tuple[ConverterConfig, dict[str, Tensor]]:
    """The bigG -> CLIP-L converter (``bigG_to_L_epoch8.pth``: ``model_state_dict`` with linear1/linear2)."""
    state = _unwrap(_state_dict_of(_torch_load(Path(path)), Path(path)), Path(path))
    for key in ("linear1.weight", "linear2.weight"):
        if key not in state:
            raise CheckpointError(f"{path}: converter key {key!r} missing; found {sorted(state)[:8]}")
    out_tokens, in_tokens = state["linear1.weight"].shape
    out_dim, in_dim = state["linear2.weight"].shape
    config = ConverterConfig(in_tokens=in_tokens, out_tokens=out_tokens, in_dim=in_dim, out_dim=out_dim)
    with torch.device("meta"):
        check_state(expected_shapes(CLIPConverter(config)), state, str(path))
    return config, state


def infer_config(state: Mapping[str, Tensor], *, subjects: Sequence[str] | None = None) -> MindEye2Config:
    """The model geometry the tensors describe (spec §2.1 key layout)."""
    n_voxels = tuple(_shape(state, f"ridge.linears.{i}.weight")[1] for i in range(_count(state, r"ridge\.linears\.")))
    if not n_voxels:
        raise CheckpointError("no ridge.linears.{i}.weight keys: this is not a MindEye2 model_state_dict")
    return MindEye2Config(
        subjects=_subject_names(n_voxels, subjects),
        n_voxels=n_voxels,
        backbone=_infer_backbone(state),
        prior=_infer_prior(state),
    )


def describe(config: MindEye2Config) -> str:
    low = "with low-level" if config.backbone.low_level else "no low-level"
    return (
        f"hidden {config.backbone.hidden_dim}, {low}, prior depth {config.prior.depth}; "
        f"subjects {config.subjects_text()}"
    )


def _infer_backbone(state: Mapping[str, Tensor]) -> BackboneConfig:
    hidden_dim = _shape(state, "ridge.linears.0.weight")[0]
    clip_tokens, clip_dim = _shape(state, "diffusion_prior.net.learned_query")
    low_level = _infer_low_level(state) if "backbone.blin1.weight" in state else None
    return BackboneConfig(
        hidden_dim=hidden_dim,
        n_blocks=_count(state, r"backbone\.mixer_blocks1\."),
        seq_len=_shape(state, "backbone.mixer_blocks2.0.0.weight")[0],
        clip_tokens=clip_tokens,
        clip_dim=clip_dim,
        retrieval="backbone.clip_proj.2.weight" in state,
        low_level=low_level,
    )


def _infer_low_level(state: Mapping[str, Tensor]) -> LowLevelConfig:
    channels = _shape(state, "backbone.bnorm.weight")[0]
    grid = round((_shape(state, "backbone.blin1.weight")[0] / channels) ** 0.5)
    n_up_blocks = _count(state, r"backbone\.bupsampler\.up_blocks\.")
    # up block i outputs reversed(block_out_channels)[i] channels
    widths = [_shape(state, f"backbone.bupsampler.up_blocks.{i}.resnets.0.conv1.weight")[0] for i in range(n_up_blocks)]
    return LowLevelConfig(
        channels=channels,
        grid=grid,
        decoder_block_out_channels=tuple(reversed(widths)),
        latent_channels=_shape(state, "backbone.bupsampler.conv_out.weight")[0],
        feature_channels=_shape(state, "backbone.b_maps_projector.0.weight")[0],
    )


def _infer_prior(state: Mapping[str, Tensor]) -> PriorConfig:
    prefix = "diffusion_prior.net.causal_transformer."
    n_tokens, dim = _shape(state, "diffusion_prior.net.learned_query")
    dim_head = _shape(state, prefix + "layers.0.0.null_kv")[1]
    freqs_key = prefix + "layers.0.0.rotary_emb.freqs"  # absent from ZeRO stage-1 folders (a frozen parameter)
    n_freqs = _shape(state, freqs_key)[0] if freqs_key in state else PriorConfig.rotary_dim_max // 2
    return PriorConfig(
        dim=dim,
        depth=_count(state, re.escape(prefix + "layers.")),
        dim_head=dim_head,
        heads=dim // dim_head,
        n_tokens=n_tokens,
        timesteps=_shape(state, "diffusion_prior.noise_scheduler.betas")[0],
        ff_mult=_shape(state, prefix + "layers.0.1.1.weight")[0] // (2 * dim),
        rel_pos_buckets=_shape(state, prefix + "rel_pos_bias.relative_attention_bias.weight")[0],
        rotary_dim_max=2 * n_freqs,
    )


def _fill_rotary_tables(state: dict[str, Tensor], config: MindEye2Config) -> tuple[dict[str, Tensor], list[str]]:
    """ZeRO stage 1 does not save frozen parameters: the rotary frequencies (a fixed formula, not trained) are
    recomputed, as the public loader's ``strict=False`` would keep its freshly built ones."""
    freqs = RotaryEmbedding(config.prior.rotary_dim).freqs.detach()
    prefix = "diffusion_prior.net.causal_transformer.layers."
    missing = [f"{prefix}{i}.0.rotary_emb.freqs" for i in range(config.prior.depth)]
    missing = [key for key in missing if key not in state]
    return {**state, **{key: freqs.clone() for key in missing}}, missing


def _subject_names(n_voxels: tuple[int, ...], subjects: Sequence[str] | None) -> tuple[str, ...]:
    """Given names, else the NSD subject whose nsdgeneral count matches, else ``subject{i}``."""
    if subjects is not None:
        if len(subjects) != len(n_voxels):
            raise CheckpointError(
                f"--subjects names {len(subjects)} subject(s) {list(subjects)} but the checkpoint has "
                f"{len(n_voxels)} ridge layer(s) with voxel counts {list(n_voxels)}"
            )
        return tuple(subjects)
    by_count = {count: name for name, count in NSD_VOXELS.items()}
    names = tuple(by_count.get(count, f"subject{i}") for i, count in enumerate(n_voxels))
    return names if len(set(names)) == len(names) else tuple(f"subject{i}" for i in range(len(n_voxels)))


def _torch_load(path: Path) -> Any:
    """weights_only load; objects beside the weights (an lr-scheduler's bound method, training args) load as
    inert stand-ins, and :func:`_unwrap` refuses any that sits among the weights."""
    return torch_load(path, stand_in_for=inert_stand_in)


def _state_dict_of(payload: Any, source: Path) -> Mapping[str, Tensor]:
    if isinstance(payload, Mapping):
        for key in STATE_KEYS:
            if isinstance(payload.get(key), Mapping):
                return payload[key]
        if payload and all(isinstance(v, Tensor) for v in payload.values()):
            return payload
    found = sorted(payload)[:10] if isinstance(payload, Mapping) else type(payload).__name__
    raise CheckpointError(f"{source}: no state dict under {list(STATE_KEYS)} and not a bare state dict; found {found}")


def _unwrap(state: Mapping[str, Any], source: Path) -> dict[str, Tensor]:
    not_tensors = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise CheckpointError(f"{source}: state dict entries that are not tensors: {not_tensors[:10]}")
    out = dict(state)
    for prefix in WRAPPER_PREFIXES:
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix) :]: v for k, v in out.items()}
    return out


def _dtype_name(state: Mapping[str, Tensor]) -> str:
    names = {str(v.dtype).removeprefix("torch.") for v in state.values() if v.is_floating_point()}
    return "+".join(sorted(names))


def _shape(state: Mapping[str, Tensor], key: str) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"key {key!r} missing: cannot read the model geometry without it")
    return tuple(state[key].shape)


def _count(state: Mapping[str, Tensor], prefix_pattern: str) -> int:
    """How many consecutive indices ``prefix{i}.`` occur (0, 1, 2, ... with no gap)."""
    pattern = re.compile(prefix_pattern + r"(\d+)\.")
    indices = {int(m.group(1)) for key in state if (m := pattern.match(key))}
    count = 0
    while count in indices:
        count += 1
    return count  # keys past a gap are then reported as unexpected by check_state
