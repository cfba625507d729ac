"""The shape of MindEye2's SDXL-unCLIP model (UNet + first-stage VAE), in the sgm training yaml's own terms.

The published checkpoint (``unclip6_epoch0_step110000.ckpt``, spec §2.3) carries no description of itself, and the
UNet's attention head width cannot be read from tensor shapes (spec second §5.3), so the geometry comes from the
training yaml (``unclip6.yaml``) or from :meth:`UnclipGeometry.published`. :meth:`UnclipGeometry.unet_config` and
:meth:`UnclipGeometry.vae_config` translate it into diffusers constructor arguments that compute what sgm computes.
"""

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from rtdecode.errors import GenerateError

GROUP_NORM_GROUPS = 32  # sgm's GroupNorm32 and diffusers' norm_num_groups default
N_VECTOR_NUMBERS = 4  # sgm vector: original height, original width, crop top, crop left (spec second §5.3)
UNET_NETWORK_PATH = "model.params.network_config.params"
VAE_DDCONFIG_PATH = "model.params.first_stage_config.params.ddconfig"
# sgm UNetModel options whose non-default values change the network in ways diffusers' UNet2DConditionModel
# (as configured here) does not reproduce: option -> the value rtdecode supports.
UNSUPPORTED_UNET_OPTIONS: dict[str, Any] = {
    "dims": 2,
    "conv_resample": True,
    "use_scale_shift_norm": False,
    "resblock_updown": False,
    "num_attention_blocks": None,
    "disable_self_attentions": None,
    "disable_middle_self_attn": False,
    "disable_middle_transformer": False,
    "transformer_depth_output": None,
    "legacy": False,
}


@dataclasses.dataclass(frozen=True)
class UnclipGeometry:
    """UNet and VAE hyper-parameters under their sgm names (``network_config.params`` and ``ddconfig``).

    ``image_size_px`` is not in the yaml: it is the decoded image side MindEye2 samples at (768, spec §5.1); it
    only sets the diffusers ``sample_size`` fields.
    """

    in_channels: int
    out_channels: int
    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    attention_resolutions: tuple[int, ...]
    transformer_depth: tuple[int, ...]
    transformer_depth_middle: int | None
    num_head_channels: int
    context_dim: int
    adm_in_channels: int
    use_linear_in_transformer: bool
    vae_ch: int
    vae_ch_mult: tuple[int, ...]
    vae_num_res_blocks: int
    vae_z_channels: int
    vae_in_channels: int
    vae_out_ch: int
    scale_factor: float
    image_size_px: int = 768

    def __post_init__(self) -> None:
        for name in ("channel_mult", "attention_resolutions", "transformer_depth", "vae_ch_mult"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        _check_positive_ints(self)
        _check_unet_structure(self)
        _check_vae_structure(self)

    @classmethod
    def published(cls) -> "UnclipGeometry":
        """MindEye2's unclip6: SDXL-base UNet with context 1664 and a 1024-wide vector, SDXL VAE (spec §2.3)."""
        return cls(
            in_channels=4,
            out_channels=4,
            model_channels=320,
            channel_mult=(1, 2, 4),
            num_res_blocks=2,
            attention_resolutions=(4, 2),
            transformer_depth=(1, 2, 10),
            transformer_depth_middle=None,
            num_head_channels=64,
            context_dim=1664,
            adm_in_channels=1024,
            use_linear_in_transformer=True,
            vae_ch=128,
            vae_ch_mult=(1, 2, 4, 4),
            vae_num_res_blocks=2,
            vae_z_channels=4,
            vae_in_channels=3,
            vae_out_ch=3,
            scale_factor=0.13025,
            image_size_px=768,
        )

    @classmethod
    def tiny(cls) -> "UnclipGeometry":
        """A few-hundred-kB model of the same structure, for tests and demos.

        Its head width (16) differs from its head count at the attention level (64 / 16 = 4), so a head count
        read the naive way round gives a different network.
        """
        return cls(
            in_channels=4,
            out_channels=4,
            model_channels=32,
            channel_mult=(1, 2),
            num_res_blocks=1,
            attention_resolutions=(2,),
            transformer_depth=(1, 1),
            transformer_depth_middle=None,
            num_head_channels=16,
            context_dim=24,
            adm_in_channels=N_VECTOR_NUMBERS * 8,
            use_linear_in_transformer=True,
            vae_ch=32,
            vae_ch_mult=(1, 2),
            vae_num_res_blocks=1,
            vae_z_channels=4,
            vae_in_channels=3,
            vae_out_ch=3,
            scale_factor=0.13025,
            image_size_px=32,
        )

    @classmethod
    def from_yaml(cls, path: Path, *, image_size_px: int = 768) -> "UnclipGeometry":
        """The geometry an sgm training yaml (e.g. MindEye2's ``unclip6.yaml``) describes.

        Reads ``model.params.network_config.params`` (UNet), ``model.params.first_stage_config.params.ddconfig``
        (VAE) and ``model.params.scale_factor`` (sgm's default 1.0 when absent). Options the diffusers port does
        not reproduce are refused with a GenerateError naming the file and the field.
        """
        path = Path(path)
        document = _read_yaml(path)
        network = _YamlSection(path, UNET_NETWORK_PATH, _dig(document, UNET_NETWORK_PATH, path))
        ddconfig = _YamlSection(path, VAE_DDCONFIG_PATH, _dig(document, VAE_DDCONFIG_PATH, path))
        model_params = _YamlSection(path, "model.params", _dig(document, "model.params", path))
        first_stage = _YamlSection(
            path,
            "model.params.first_stage_config.params",
            _dig(document, "model.params.first_stage_config.params", path),
        )
        fields = {**_unet_fields(network), **_vae_fields(ddconfig, first_stage)}
        scale_factor = model_params.number("scale_factor", default=1.0)
        try:
            return cls(**fields, scale_factor=scale_factor, image_size_px=image_size_px)
        except GenerateError as error:
            raise GenerateError(f"{path}: {error}") from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields (tuples as lists)."""
        return {
            key: list(value) if isinstance(value, tuple) else value for key, value in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "UnclipGeometry":
        """Inverse of :meth:`to_dict`; unknown or missing fields are a GenerateError."""
        names = {field.name for field in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        unknown = sorted(set(data) - names)
        missing = sorted(required - set(data))
        if unknown or missing:
            raise GenerateError(f"unCLIP geometry: unknown fields {unknown}, missing fields {missing}")
        return cls(**data)

    @property
    def n_levels(self) -> int:
        """UNet resolution levels (one per channel multiplier)."""
        return len(self.channel_mult)

    def level_channels(self) -> tuple[int, ...]:
        """UNet channels per level (sgm: model_channels * mult)."""
        return tuple(self.model_channels * mult for mult in self.channel_mult)

    def has_attention(self, level: int) -> bool:
        """sgm puts a SpatialTransformer after each ResBlock of a level whose downsampling 2**level is listed."""
        return 2**level in self.attention_resolutions

    def heads_per_level(self) -> tuple[int, ...]:
        """Attention heads per level: sgm's ``channels // num_head_channels`` (head width fixed)."""
        return tuple(channels // self.num_head_channels for channels in self.level_channels())

    @property
    def vector_number_width(self) -> int:
        """Width of one number's sinusoidal embedding in the sgm vector (256 for unclip6)."""
        return self.adm_in_channels // N_VECTOR_NUMBERS

    @property
    def latent_size_px(self) -> int:
        """Latent side for an ``image_size_px`` image (the VAE halves the side at every level but the last)."""
        return self.image_size_px // 2 ** (len(self.vae_ch_mult) - 1)

    def unet_config(self) -> dict[str, Any]:
        """``diffusers.UNet2DConditionModel`` kwargs computing what sgm's UNetModel computes (spec second §5.3).

        diffusers' ``attention_head_dim`` is, despite its name, the number of heads per level (diffusers issue
        2011): passing the sgm head width there still loads the weights but splits attention differently.
        """
        levels = range(self.n_levels)
        return {
            "sample_size": self.latent_size_px,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": tuple(
                "CrossAttnDownBlock2D" if self.has_attention(level) else "DownBlock2D" for level in levels
            ),
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "up_block_types": tuple(
                "CrossAttnUpBlock2D" if self.has_attention(level) else "UpBlock2D" for level in reversed(levels)
            ),
            "block_out_channels": self.level_channels(),
            "layers_per_block": self.num_res_blocks,
            "transformer_layers_per_block": self.transformer_depth,
            "attention_head_dim": self.heads_per_level(),
            "cross_attention_dim": self.context_dim,
            "use_linear_projection": self.use_linear_in_transformer,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": self.vector_number_width,
            "projection_class_embeddings_input_dim": self.adm_in_channels,
            "flip_sin_to_cos": True,
            "freq_shift": 0,
            "norm_num_groups": GROUP_NORM_GROUPS,
        }

    def vae_config(self) -> dict[str, Any]:
        """``diffusers.AutoencoderKL`` kwargs for the sgm/ldm first-stage autoencoder (SDXL VAE when published)."""
        n_levels = len(self.vae_ch_mult)
        return {
            "in_channels": self.vae_in_channels,
            "out_channels": self.vae_out_ch,
            "down_block_types": ("DownEncoderBlock2D",) * n_levels,
            "up_block_types": ("UpDecoderBlock2D",) * n_levels,
            "block_out_channels": tuple(self.vae_ch * mult for mult in self.vae_ch_mult),
            "layers_per_block": self.vae_num_res_blocks,
            "latent_channels": self.vae_z_channels,
            "norm_num_groups": GROUP_NORM_GROUPS,
            "sample_size": self.image_size_px,
            "scaling_factor": self.scale_factor,
        }


def _check_positive_ints(geometry: UnclipGeometry) -> None:
    """Every count is a positive int (bools and floats refused: a yaml typo, not a size)."""
    for field in dataclasses.fields(geometry):
        value = getattr(geometry, field.name)
        values = value if isinstance(value, tuple) else (value,)
        if field.name in ("use_linear_in_transformer", "scale_factor") or value is None:
            continue
        if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
            raise GenerateError(f"unCLIP geometry field {field.name} must be positive integer(s), got {value!r}")
    if not isinstance(geometry.use_linear_in_transformer, bool):
        raise GenerateError(
            "unCLIP geometry field use_linear_in_transformer must be true/false, "
            f"got {geometry.use_linear_in_transformer!r}"
        )
    if isinstance(geometry.scale_factor, bool) or not isinstance(geometry.scale_factor, int | float):
        raise GenerateError(f"unCLIP geometry field scale_factor must be a number, got {geometry.scale_factor!r}")


def _check_unet_structure(geometry: UnclipGeometry) -> None:
    """The UNet options are consistent and expressible as a diffusers UNet2DConditionModel."""
    if len(geometry.transformer_depth) != geometry.n_levels:
        raise GenerateError(
            f"unCLIP geometry: transformer_depth {list(geometry.transformer_depth)} must give one depth per "
            f"channel_mult level ({geometry.n_levels} levels: {list(geometry.channel_mult)})"
        )
    level_downsampling = {2**level for level in range(geometry.n_levels)}
    stray = sorted(set(geometry.attention_resolutions) - level_downsampling)
    if stray:
        raise GenerateError(
            f"unCLIP geometry: attention_resolutions {stray} match no level (the {geometry.n_levels} levels "
            f"downsample by {sorted(level_downsampling)})"
        )
    middle = geometry.transformer_depth_middle
    if middle is not None and middle != geometry.transformer_depth[-1]:
        raise GenerateError(
            f"unCLIP geometry: transformer_depth_middle {middle} differs from the last level's depth "
            f"{geometry.transformer_depth[-1]}; diffusers' UNet2DConditionModel cannot express that"
        )
    for channels in geometry.level_channels():
        if channels % GROUP_NORM_GROUPS or channels % geometry.num_head_channels:
            raise GenerateError(
                f"unCLIP geometry: level width {channels} (model_channels {geometry.model_channels} x channel_mult) "
                f"must be a multiple of {GROUP_NORM_GROUPS} (GroupNorm) and of num_head_channels "
                f"{geometry.num_head_channels}"
            )
    if geometry.adm_in_channels % N_VECTOR_NUMBERS:
        raise GenerateError(
            f"unCLIP geometry: adm_in_channels {geometry.adm_in_channels} must be {N_VECTOR_NUMBERS} x the "
            "per-number sinusoid width (original size h, w and crop top, left; 4 x 256 = 1024 in unclip6)"
        )


def _check_vae_structure(geometry: UnclipGeometry) -> None:
    """The VAE widths suit GroupNorm(32)."""
    for mult in geometry.vae_ch_mult:
        if (geometry.vae_ch * mult) % GROUP_NORM_GROUPS:
            raise GenerateError(
                f"unCLIP geometry: VAE width {geometry.vae_ch * mult} (vae_ch {geometry.vae_ch} x vae_ch_mult) must "
                f"be a multiple of {GROUP_NORM_GROUPS} (GroupNorm)"
            )


class _YamlSection:
    """One mapping of an sgm yaml, with typed reads whose errors name the file and the dotted field."""

    def __init__(self, path: Path, where: str, values: Mapping[str, Any]):
        self.path = path
        self.where = where
        self.values = values

    def error(self, name: str, rule: str) -> GenerateError:
        shown = self.values.get(name, "(absent)")
        return GenerateError(f"{self.path}: {self.where}.{name} {rule}, got {shown!r}")

    def has(self, name: str) -> bool:
        return name in self.values

    def integer(self, name: str, default: int | None = None) -> int:
        value = self.values.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(name, "must be an integer")
        return value

    def integers(self, name: str) -> tuple[int, ...]:
        value = self.values.get(name)
        if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
            raise self.error(name, "must be a list of integers")
        return tuple(value)

    def integer_or_list(self, name: str, n_levels: int, default: int | None = None) -> tuple[int, ...]:
        """sgm accepts an int (the same for every level) or a per-level list."""
        value = self.values.get(name, default)
        if isinstance(value, list):
            return self.integers(name)
        return (self.integer(name, default),) * n_levels

    def flag(self, name: str, default: bool) -> bool:
        value = self.values.get(name, default)
        if not isinstance(value, bool):
            raise self.error(name, "must be true or false")
        return value

    def number(self, name: str, default: float) -> float:
        value = self.values.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(name, "must be a number")
        return float(value)


def _unet_fields(network: _YamlSection) -> dict[str, Any]:
    """The UNet geometry fields of ``network_config.params``."""
    _refuse_unsupported_unet_options(network)
    channel_mult = network.integers("channel_mult")
    n_levels = len(channel_mult)
    num_head_channels = network.integer("num_head_channels", -1)
    if num_head_channels == -1:
        raise network.error(
            "num_head_channels",
            f"must give the head width (unclip6.yaml: 64); heads given as num_heads "
            f"({network.values.get('num_heads', '(absent)')!r}) are not supported",
        )
    num_classes = network.values.get("num_classes")
    if num_classes != "sequential":
        raise network.error("num_classes", "must be 'sequential' (the vector enters through label_emb.0)")
    if network.has("transformer_depth") and isinstance(network.values["transformer_depth"], list):
        if len(network.values["transformer_depth"]) != n_levels:
            raise network.error("transformer_depth", f"must list one depth per channel_mult level ({n_levels})")
    num_res_blocks = network.integer_or_list("num_res_blocks", n_levels)
    if len(set(num_res_blocks)) != 1 or len(num_res_blocks) != n_levels:
        raise network.error("num_res_blocks", f"must be one integer for all {n_levels} levels")
    middle = network.values.get("transformer_depth_middle")
    return {
        "in_channels": network.integer("in_channels"),
        "out_channels": network.integer("out_channels"),
        "model_channels": network.integer("model_channels"),
        "channel_mult": channel_mult,
        "num_res_blocks": num_res_blocks[0],
        "attention_resolutions": network.integers("attention_resolutions"),
        "transformer_depth": network.integer_or_list("transformer_depth", n_levels, default=1),
        "transformer_depth_middle": None if middle is None else network.integer("transformer_depth_middle"),
        "num_head_channels": num_head_channels,
        "context_dim": network.integer("context_dim"),
        "adm_in_channels": network.integer("adm_in_channels"),
        "use_linear_in_transformer": network.flag("use_linear_in_transformer", False),
    }


def _refuse_unsupported_unet_options(network: _YamlSection) -> None:
    """Options that change the sgm network in ways the diffusers port does not reproduce."""
    for name, supported in UNSUPPORTED_UNET_OPTIONS.items():
        if network.has(name) and network.values[name] != supported:
            raise network.error(name, f"is not supported by the diffusers port (needs {supported!r})")


def _vae_fields(ddconfig: _YamlSection, first_stage: _YamlSection) -> dict[str, Any]:
    """The VAE geometry fields of ``first_stage_config.params.ddconfig`` (a plain ldm AutoencoderKL)."""
    if not ddconfig.flag("double_z", True):
        raise ddconfig.error("double_z", "must be true (a KL autoencoder: mean and log-variance)")
    if ddconfig.values.get("attn_resolutions", []) not in ([], None):
        raise ddconfig.error(
            "attn_resolutions", "must be empty (diffusers' AutoencoderKL has mid-block attention only)"
        )
    attn_type = ddconfig.values.get("attn_type", "vanilla")
    if not isinstance(attn_type, str) or not attn_type.startswith("vanilla"):
        raise ddconfig.error("attn_type", "must be 'vanilla' or 'vanilla-xformers' (the same weights)")
    z_channels = ddconfig.integer("z_channels")
    if first_stage.has("embed_dim") and first_stage.integer("embed_dim") != z_channels:
        raise first_stage.error("embed_dim", f"must equal ddconfig.z_channels ({z_channels})")
    return {
        "vae_ch": ddconfig.integer("ch"),
        "vae_ch_mult": ddconfig.integers("ch_mult"),
        "vae_num_res_blocks": ddconfig.integer("num_res_blocks"),
        "vae_z_channels": z_channels,
        "vae_in_channels": ddconfig.integer("in_channels"),
        "vae_out_ch": ddconfig.integer("out_ch"),
    }


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise GenerateError(f"sgm training yaml {path} does not exist")
    try:
        return yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise GenerateError(f"{path}: not a readable yaml file ({error})") from None


def _dig(document: Any, dotted: str, path: Path) -> Mapping[str, Any]:
    """The mapping at ``dotted`` (e.g. ``model.params.network_config.params``), or a GenerateError naming it."""
    node = document
    for depth, name in enumerate(dotted.split(".")):
        if not isinstance(node, Mapping) or not isinstance(node.get(name), Mapping):
            reached = ".".join(dotted.split(".")[: depth + 1])
            raise GenerateError(f"{path}: {reached} is missing or not a mapping (an sgm training yaml has {dotted})")
        node = node[name]
    return node
