"""The SDXL-unCLIP model folder (UNet + VAE in diffusers format), and its import from MindEye2's sgm checkpoint.

Folder layout (the ``[models] unclip_dir`` component)::

    DIR/unet/          diffusers UNet2DConditionModel (save_pretrained, safetensors)
    DIR/vae/           diffusers AutoencoderKL, always float32 (the published pipeline decodes in fp32, spec §2.3)
    DIR/unclip.json    {"format": "rtdecode-unclip", "format_version": 1, "geometry": {...}, "provenance": {...}}

The published checkpoint (``unclip6_epoch0_step110000.ckpt``, about 18 GB, spec §2.3) is an sgm DiffusionEngine
state dict: ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE), ``conditioner.*`` (a full OpenCLIP
bigG tower, never read: the file is memory-mapped) and ``denoiser.sigmas``. The key mapping below is derived from the
sgm module structure (spec second §5.3): which ``input_blocks`` index holds a ResBlock, a SpatialTransformer or a
Downsample at each level, and so on.
"""

import dataclasses
import datetime
import json
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from rtdecode.checkpoint_io import check_state, inert_stand_in, torch_load
from rtdecode.errors import CheckpointError, ComponentMissingError, GenerateError
from rtdecode.file_integrity import file_sha256
from rtdecode.generate.geometry import UnclipGeometry

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, UNet2DConditionModel

FORMAT_NAME = "rtdecode-unclip"
FORMAT_VERSION = 1
MANIFEST_NAME = "unclip.json"
UNET_DIR_NAME = "unet"
VAE_DIR_NAME = "vae"
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# Prefixes of an sgm DiffusionEngine state dict that hold no UNet/VAE weight: the conditioner (bigG tower), the
# denoiser's sigma table, EMA copies, loss modules (an autoencoder's training loss sits under first_stage_model.loss.).
SKIPPED_PREFIXES = ("conditioner.", "denoiser.", "model_ema.", "loss_fn.", "first_stage_model.loss.")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
IMPORT_COMMAND = "rtdecode model import-unclip CHECKPOINT --out FOLDER"
MAX_LISTED_KEYS = 20


@dataclasses.dataclass(frozen=True)
class _Renaming:
    """How the parameter names inside one module differ between sgm and diffusers.

    ``names``: sgm sub-module -> diffusers sub-module (None: the same names on both sides, nothing renamed).
    ``conv1x1_to_linear``: sgm stores the weights as 1x1 convolutions, diffusers as linear layers.
    """

    names: Mapping[str, str] | None = None
    conv1x1_to_linear: bool = False


SAME_NAMES = _Renaming()
# sgm ResBlock: in_layers = (GroupNorm, SiLU, conv), emb_layers = (SiLU, linear), out_layers = (GroupNorm, SiLU,
# Dropout, conv), skip_connection (1x1 conv when the width changes); diffusers ResnetBlock2D names them flatly.
UNET_RESNET = _Renaming(
    {
        "in_layers.0": "norm1",
        "in_layers.2": "conv1",
        "emb_layers.1": "time_emb_proj",
        "out_layers.0": "norm2",
        "out_layers.3": "conv2",
        "skip_connection": "conv_shortcut",
    }
)
# ldm VAE ResnetBlock: same names as diffusers but for the 1x1 shortcut (no time embedding in a VAE).
VAE_RESNET = _Renaming(
    {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
)
# ldm AttnBlock: GroupNorm + 1x1-conv q/k/v/proj_out; diffusers Attention: group_norm + linear to_q/k/v/to_out.0.
VAE_ATTENTION = _Renaming(
    {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}, conv1x1_to_linear=True
)


@dataclasses.dataclass(frozen=True)
class ModulePair:
    """One module under its sgm name and its diffusers name, with the renaming of its parameters."""

    sgm: str
    diffusers: str
    renaming: _Renaming = SAME_NAMES


def unet_module_pairs(geometry: UnclipGeometry) -> list[ModulePair]:
    """Every weight-holding module of sgm's UNetModel with its diffusers UNet2DConditionModel counterpart.

    sgm numbers its ``input_blocks`` consecutively: 0 is conv_in; then per level ``num_res_blocks`` blocks of
    (ResBlock ``.0``, SpatialTransformer ``.1`` at attention levels), then, except at the last level, a block holding
    only a Downsample (``.0.op``). ``output_blocks`` run through the levels in reverse with ``num_res_blocks + 1``
    blocks each, the last of a level (but the lowest) ending with an Upsample (``.1.conv``, or ``.2.conv`` after
    attention). ``label_emb.0`` is the vector's MLP: diffusers' ``add_embedding`` of a "text_time" model.
    """
    pairs = [
        ModulePair("time_embed.0", "time_embedding.linear_1"),
        ModulePair("time_embed.2", "time_embedding.linear_2"),
        ModulePair("label_emb.0.0", "add_embedding.linear_1"),
        ModulePair("label_emb.0.2", "add_embedding.linear_2"),
        ModulePair("input_blocks.0.0", "conv_in"),
        *_unet_down_pairs(geometry),
        ModulePair("middle_block.0", "mid_block.resnets.0", UNET_RESNET),
        ModulePair("middle_block.1", "mid_block.attentions.0"),
        ModulePair("middle_block.2", "mid_block.resnets.1", UNET_RESNET),
        *_unet_up_pairs(geometry),
        ModulePair("out.0", "conv_norm_out"),
        ModulePair("out.2", "conv_out"),
    ]
    return pairs


def _unet_down_pairs(geometry: UnclipGeometry) -> Iterator[ModulePair]:
    block = 1
    for level in range(geometry.n_levels):
        for layer in range(geometry.num_res_blocks):
            yield ModulePair(f"input_blocks.{block}.0", f"down_blocks.{level}.resnets.{layer}", UNET_RESNET)
            if geometry.has_attention(level):
                yield ModulePair(f"input_blocks.{block}.1", f"down_blocks.{level}.attentions.{layer}")
            block += 1
        if level < geometry.n_levels - 1:
            yield ModulePair(f"input_blocks.{block}.0.op", f"down_blocks.{level}.downsamplers.0.conv")
            block += 1


def _unet_up_pairs(geometry: UnclipGeometry) -> Iterator[ModulePair]:
    block = 0
    for up_index, level in enumerate(reversed(range(geometry.n_levels))):
        for layer in range(geometry.num_res_blocks + 1):
            yield ModulePair(f"output_blocks.{block}.0", f"up_blocks.{up_index}.resnets.{layer}", UNET_RESNET)
            next_slot = 1
            if geometry.has_attention(level):
                yield ModulePair(f"output_blocks.{block}.1", f"up_blocks.{up_index}.attentions.{layer}")
                next_slot = 2
            if level > 0 and layer == geometry.num_res_blocks:
                yield ModulePair(f"output_blocks.{block}.{next_slot}.conv", f"up_blocks.{up_index}.upsamplers.0.conv")
            block += 1


def vae_module_pairs(geometry: UnclipGeometry) -> list[ModulePair]:
    """Every weight-holding module of the ldm/sgm autoencoder with its diffusers AutoencoderKL counterpart.

    The ldm decoder numbers its ``up`` levels from the finest (``up.0``, no upsampler) to the coarsest; diffusers'
    ``up_blocks`` run the other way, in the order they are applied.
    """
    n_levels = len(geometry.vae_ch_mult)
    pairs = [ModulePair(name, name) for name in ("quant_conv", "post_quant_conv")]
    for part in ("encoder", "decoder"):
        pairs += [
            ModulePair(f"{part}.conv_in", f"{part}.conv_in"),
            ModulePair(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", VAE_RESNET),
            ModulePair(f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", VAE_ATTENTION),
            ModulePair(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", VAE_RESNET),
            ModulePair(f"{part}.norm_out", f"{part}.conv_norm_out"),
            ModulePair(f"{part}.conv_out", f"{part}.conv_out"),
        ]
    for level in range(n_levels):
        for layer in range(geometry.vae_num_res_blocks):
            pairs.append(
                ModulePair(
                    f"encoder.down.{level}.block.{layer}", f"encoder.down_blocks.{level}.resnets.{layer}", VAE_RESNET
                )
            )
        if level < n_levels - 1:
            pairs.append(
                ModulePair(f"encoder.down.{level}.downsample.conv", f"encoder.down_blocks.{level}.downsamplers.0.conv")
            )
    for level in range(n_levels):
        up_index = n_levels - 1 - level
        for layer in range(geometry.vae_num_res_blocks + 1):
            pairs.append(
                ModulePair(
                    f"decoder.up.{level}.block.{layer}", f"decoder.up_blocks.{up_index}.resnets.{layer}", VAE_RESNET
                )
            )
        if level > 0:
            pairs.append(
                ModulePair(f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{up_index}.upsamplers.0.conv")
            )
    return pairs


def convert_unet_state(sgm_unet: Mapping[str, Tensor], geometry: UnclipGeometry) -> dict[str, Tensor]:
    """sgm UNet weights (keys after ``model.diffusion_model.``) under diffusers UNet2DConditionModel names.

    Tensors are renamed, not copied. A key that belongs to no module of ``geometry`` is a CheckpointError.
    """
    return _rename_state(sgm_unet, unet_module_pairs(geometry), to_diffusers=True, what="sgm UNet")


def convert_vae_state(sgm_vae: Mapping[str, Tensor], geometry: UnclipGeometry) -> dict[str, Tensor]:
    """sgm/ldm VAE weights (keys after ``first_stage_model.``) under diffusers AutoencoderKL names.

    The attention's 1x1-conv weights become linear weights (views of the same memory).
    """
    return _rename_state(sgm_vae, vae_module_pairs(geometry), to_diffusers=True, what="sgm VAE")


def sgm_unet_state(diffusers_unet: Mapping[str, Tensor], geometry: UnclipGeometry) -> dict[str, Tensor]:
    """Inverse of :func:`convert_unet_state`: diffusers UNet weights under sgm names (without the prefix)."""
    return _rename_state(diffusers_unet, unet_module_pairs(geometry), to_diffusers=False, what="diffusers UNet")


def sgm_vae_state(diffusers_vae: Mapping[str, Tensor], geometry: UnclipGeometry) -> dict[str, Tensor]:
    """Inverse of :func:`convert_vae_state` (linear attention weights back to 1x1 convolutions)."""
    return _rename_state(diffusers_vae, vae_module_pairs(geometry), to_diffusers=False, what="diffusers VAE")


def _rename_state(
    state: Mapping[str, Tensor], pairs: list[ModulePair], *, to_diffusers: bool, what: str
) -> dict[str, Tensor]:
    """Each key renamed through the module that holds it (longest matching module prefix)."""
    by_module = {(pair.sgm if to_diffusers else pair.diffusers): pair for pair in pairs}
    renamed: dict[str, Tensor] = {}
    unmapped = []
    for key, tensor in state.items():
        pair = _owning_pair(key, by_module)
        new_key = None if pair is None else _rename_key(key, pair, to_diffusers)
        if new_key is None:
            unmapped.append(key)
            continue
        renamed[new_key] = _reshape(tensor, pair.renaming, to_diffusers, key)
    if unmapped:
        raise CheckpointError(f"{what} keys that belong to no module of this geometry:\n    " + _listing(unmapped))
    return renamed


def _owning_pair(key: str, by_module: Mapping[str, ModulePair]) -> ModulePair | None:
    """The pair whose module name is the longest dotted prefix of ``key`` (None: no module holds it)."""
    parts = key.split(".")
    for n_parts in range(len(parts) - 1, 0, -1):
        pair = by_module.get(".".join(parts[:n_parts]))
        if pair is not None:
            return pair
    return None


def _rename_key(key: str, pair: ModulePair, to_diffusers: bool) -> str | None:
    """``key`` under the other side's names, or None when its sub-module is not one the renaming knows."""
    source, target = (pair.sgm, pair.diffusers) if to_diffusers else (pair.diffusers, pair.sgm)
    rest = key[len(source) + 1 :]
    names = pair.renaming.names
    if names is None:
        return f"{target}.{rest}"
    sub_module, _, parameter = rest.rpartition(".")
    mapping = names if to_diffusers else {new: old for old, new in names.items()}
    if sub_module not in mapping:
        return None
    return f"{target}.{mapping[sub_module]}.{parameter}"


def _reshape(tensor: Tensor, renaming: _Renaming, to_diffusers: bool, key: str) -> Tensor:
    """1x1-conv weights (C_out, C_in, 1, 1) <-> linear weights (C_out, C_in); other tensors unchanged."""
    if not renaming.conv1x1_to_linear or not key.endswith("weight"):
        return tensor
    if to_diffusers and tensor.ndim == 4 and tensor.shape[2:] == (1, 1):
        return tensor.flatten(1)
    if not to_diffusers and tensor.ndim == 2:
        return tensor[:, :, None, None]
    return tensor  # a wrong shape is left for check_state to report, under its own key


def import_unclip(
    checkpoint: Path,
    out_dir: Path,
    *,
    geometry: UnclipGeometry | None = None,
    dtype: str = "fp32",
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Convert MindEye2's sgm unCLIP checkpoint into an unCLIP folder at ``out_dir``; returns ``out_dir``.

    ``geometry`` defaults to :meth:`UnclipGeometry.published` (or read it from the training yaml with
    :meth:`UnclipGeometry.from_yaml`). Every UNet and VAE key and shape is checked before anything is written; the
    UNet is saved in ``dtype``, the VAE in fp32. The checkpoint is memory-mapped: the conditioner's bigG tower is
    never read, and the UNet is held once (fp32: the mapped file itself; fp16/bf16: one cast copy).
    """
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    geometry = geometry or UnclipGeometry.published()
    torch_dtype = _torch_dtype(dtype)
    report = progress or (lambda message: None)
    _check_out_dir(out_dir)
    report(f"reading {checkpoint} (memory-mapped)")
    state = _checkpoint_state(checkpoint)
    unet_part, vae_part = _split_state(state, checkpoint)
    del state
    _check_against_geometry(unet_part, vae_part, geometry, checkpoint)
    partial = _partial_dir(out_dir)
    report(f"converting and saving the UNet ({dtype})")
    unet_state = {k: v.to(torch_dtype) for k, v in convert_unet_state(unet_part, geometry).items()}
    del unet_part
    _save_model(_unet_class(), geometry.unet_config(), unet_state, partial / UNET_DIR_NAME)
    del unet_state
    report("converting and saving the VAE (fp32)")
    vae_state = {k: v.to(torch.float32) for k, v in convert_vae_state(vae_part, geometry).items()}
    _save_model(_vae_class(), geometry.vae_config(), vae_state, partial / VAE_DIR_NAME)
    report(f"hashing {checkpoint} (sha256)")
    provenance = _provenance(str(checkpoint.resolve()), file_sha256(checkpoint), dtype)
    _write_manifest(partial, geometry, provenance)
    _commit(partial, out_dir)
    report(f"wrote {out_dir}")
    return out_dir


def load_unclip(
    folder: Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple["UNet2DConditionModel", "AutoencoderKL", UnclipGeometry]:
    """(UNet2DConditionModel in ``dtype``, AutoencoderKL in fp32, geometry) from an unCLIP folder, in eval mode.

    Local files only. A missing folder or file is a ComponentMissingError naming the file and the import command.
    """
    folder = Path(folder)
    geometry = read_manifest(folder)
    for sub_dir in (UNET_DIR_NAME, VAE_DIR_NAME):
        _require_model_files(folder, sub_dir)
    unet = _unet_class().from_pretrained(folder / UNET_DIR_NAME, local_files_only=True, dtype=dtype)
    vae = _vae_class().from_pretrained(folder / VAE_DIR_NAME, local_files_only=True, dtype=torch.float32)
    _check_config(unet.config, geometry.unet_config(), folder / UNET_DIR_NAME / "config.json")
    _check_config(vae.config, geometry.vae_config(), folder / VAE_DIR_NAME / "config.json")
    return unet.to(device).eval(), vae.to(device).eval(), geometry


def read_manifest(folder: Path) -> UnclipGeometry:
    """The geometry recorded in ``folder/unclip.json`` (checks the format; reads no weights)."""
    manifest_path = Path(folder) / MANIFEST_NAME
    if not manifest_path.is_file():
        raise _missing(manifest_path, folder)
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise GenerateError(f"{manifest_path}: not valid JSON ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise GenerateError(f"{manifest_path}: format must be {FORMAT_NAME!r}, got {found!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise GenerateError(
            f"{manifest_path}: format_version must be {FORMAT_VERSION}, got {manifest.get('format_version')!r}"
        )
    geometry = manifest.get("geometry")
    if not isinstance(geometry, dict):
        raise GenerateError(f"{manifest_path}: 'geometry' must be an object, got {geometry!r}")
    try:
        return UnclipGeometry.from_dict(geometry)
    except GenerateError as error:
        raise GenerateError(f"{manifest_path}: {error}") from None


def write_random_unclip(out_dir: Path, geometry: UnclipGeometry | None = None, *, seed: int = 0) -> Path:
    """An unCLIP folder with random weights (default: the tiny geometry), for tests, benchmarks and the demo."""
    out_dir = Path(out_dir)
    geometry = geometry or UnclipGeometry.tiny()
    _check_out_dir(out_dir)
    partial = _partial_dir(out_dir)
    torch.manual_seed(seed)
    _unet_class()(**geometry.unet_config()).save_pretrained(partial / UNET_DIR_NAME, safe_serialization=True)
    _vae_class()(**geometry.vae_config()).save_pretrained(partial / VAE_DIR_NAME, safe_serialization=True)
    _write_manifest(partial, geometry, _provenance("random", None, "fp32", seed=seed))
    _commit(partial, out_dir)
    return out_dir


def _unet_class() -> type:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel


def _vae_class() -> type:
    from diffusers import AutoencoderKL

    return AutoencoderKL


def _torch_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise GenerateError(f"unCLIP import dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def _checkpoint_state(checkpoint: Path) -> Mapping[str, Any]:
    """The state dict of a Lightning checkpoint (``["state_dict"]``) or of a bare state dict file.

    Foreign objects in the Lightning metadata (hyper-parameters, callbacks) load as inert stand-ins; a stand-in
    among the weights is refused later (it is not a tensor).
    """
    payload = torch_load(checkpoint, stand_in_for=inert_stand_in)
    if not isinstance(payload, Mapping):
        raise CheckpointError(
            f"{checkpoint}: expected a dict (a Lightning checkpoint or a state dict), got {type(payload).__name__}"
        )
    state = payload.get("state_dict", payload)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{checkpoint}: 'state_dict' must be a dict of tensors, got {type(state).__name__}")
    return state


def _split_state(state: Mapping[str, Any], checkpoint: Path) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(UNet keys, VAE keys) without their prefixes; known non-weights skipped, anything else a CheckpointError."""
    unet_part: dict[str, Tensor] = {}
    vae_part: dict[str, Tensor] = {}
    unexpected = []
    not_tensors = []
    for key, value in state.items():
        if not isinstance(key, str) or key.startswith(SKIPPED_PREFIXES):
            continue
        if key.startswith(UNET_PREFIX):
            unet_part[key.removeprefix(UNET_PREFIX)] = value
        elif key.startswith(VAE_PREFIX):
            vae_part[key.removeprefix(VAE_PREFIX)] = value
        else:
            unexpected.append(key)
            continue
        if not isinstance(value, Tensor):
            not_tensors.append(f"{key}: {type(value).__name__}")
    if unexpected or not_tensors:
        raise CheckpointError(
            f"{checkpoint} is not an sgm unCLIP checkpoint as expected: it should hold {UNET_PREFIX}*, "
            f"{VAE_PREFIX}* and the skipped {list(SKIPPED_PREFIXES)} keys only."
            + (
                f"\n  {len(unexpected)} key(s) with an unexpected prefix:\n    {_listing(unexpected)}"
                if unexpected
                else ""
            )
            + (
                f"\n  {len(not_tensors)} value(s) that are not tensors:\n    {_listing(not_tensors)}"
                if not_tensors
                else ""
            )
        )
    return unet_part, vae_part


def _check_against_geometry(
    unet_part: Mapping[str, Tensor], vae_part: Mapping[str, Tensor], geometry: UnclipGeometry, checkpoint: Path
) -> None:
    """Every key and shape the geometry implies, under the checkpoint's own (sgm) names: one error listing all."""
    with torch.device("meta"):
        unet_expected = sgm_unet_state(_unet_class()(**geometry.unet_config()).state_dict(), geometry)
        vae_expected = sgm_vae_state(_vae_class()(**geometry.vae_config()).state_dict(), geometry)
    expected = {UNET_PREFIX + k: tuple(v.shape) for k, v in unet_expected.items()}
    expected |= {VAE_PREFIX + k: tuple(v.shape) for k, v in vae_expected.items()}
    found = {UNET_PREFIX + k: v for k, v in unet_part.items()} | {VAE_PREFIX + k: v for k, v in vae_part.items()}
    hint = (
        "\n  (geometry used: UnclipGeometry.published() unless given; pass the training yaml's geometry with "
        "UnclipGeometry.from_yaml if the checkpoint is not MindEye2's unclip6)"
    )
    check_state(expected, found, f"checkpoint {checkpoint}", hint=hint)


def _save_model(model_class: type, config: dict[str, Any], state: dict[str, Tensor], folder: Path) -> None:
    """Build the model on the meta device, take ``state``'s tensors as its parameters (no copy), save it."""
    with torch.device("meta"):
        model = model_class(**config)
    model.load_state_dict(state, strict=True, assign=True)
    model.save_pretrained(folder, safe_serialization=True)


def _check_out_dir(out_dir: Path) -> None:
    """``out_dir`` must be absent, empty, or an unCLIP folder (which is then replaced)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise GenerateError(f"unCLIP output {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).is_file():
        raise GenerateError(
            f"unCLIP output folder {out_dir} is not empty and holds no {MANIFEST_NAME}: choose an empty or new folder"
        )


def _partial_dir(out_dir: Path) -> Path:
    """A fresh sibling folder to write into, renamed to ``out_dir`` only when complete."""
    partial = out_dir.with_name(out_dir.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    return partial


def _commit(partial: Path, out_dir: Path) -> None:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    partial.rename(out_dir)


def _write_manifest(folder: Path, geometry: UnclipGeometry, provenance: dict[str, Any]) -> None:
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "geometry": geometry.to_dict(),
        "provenance": provenance,
    }
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")


def _provenance(source: str, sha256: str | None, dtype: str, **extra: Any) -> dict[str, Any]:
    import diffusers

    return {
        "source": source,
        "sha256": sha256,
        "dtype": dtype,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        **extra,
    }


def _require_model_files(folder: Path, sub_dir: str) -> None:
    """A diffusers model folder needs its config.json and its safetensors weights (single file or sharded)."""
    model_dir = folder / sub_dir
    config = model_dir / "config.json"
    if not config.is_file():
        raise _missing(config, folder)
    weights = [
        model_dir / "diffusion_pytorch_model.safetensors",
        model_dir / "diffusion_pytorch_model.safetensors.index.json",
    ]
    if not any(path.is_file() for path in weights):
        raise _missing(weights[0], folder)


def _missing(path: Path, folder: Path) -> ComponentMissingError:
    return ComponentMissingError(
        f"SDXL unCLIP model file {path} not found. Make the folder from MindEye2's unclip6_epoch0_step110000.ckpt "
        f"with `{IMPORT_COMMAND.replace('FOLDER', str(folder))}` and name it in the config as `[models] unclip_dir`"
    )


def _check_config(config: Mapping[str, Any], wanted: Mapping[str, Any], config_path: Path) -> None:
    """The saved diffusers config computes what the folder's geometry says (a hand-edited folder is refused)."""
    differing = [
        f"{name}: {config.get(name)!r} (geometry gives {value!r})"
        for name, value in wanted.items()
        if _plain(config.get(name)) != _plain(value)
    ]
    if differing:
        raise GenerateError(f"{config_path} disagrees with {MANIFEST_NAME}'s geometry: " + "; ".join(differing))


def _plain(value: Any) -> Any:
    """Tuples and lists compare equal (JSON turns one into the other)."""
    return [_plain(v) for v in value] if isinstance(value, list | tuple) else value


def _listing(items: list[str]) -> str:
    shown = "\n    ".join(items[:MAX_LISTED_KEYS])
    more = f"\n    ... and {len(items) - MAX_LISTED_KEYS} more" if len(items) > MAX_LISTED_KEYS else ""
    return shown + more
