"""Config dataclasses of the MindEye2 models: one per model, every size a field.

The defaults are the paper's sizes (spec §1). :func:`light` is the 1024-hidden "lite" model the
real-time work starts from; :func:`tiny` is what the tests build. A config round-trips through
JSON (:meth:`to_dict` / ``from_dict``) and travels in every bundle next to the weights.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

from rtdecode.errors import ModelError

# nsdgeneral voxel counts of NSD subjects 1..8 (spec §1.1): how an import names the ridge layers.
NSD_VOXELS = {
    "subj01": 15724,
    "subj02": 14278,
    "subj03": 15226,
    "subj04": 13153,
    "subj05": 13039,
    "subj06": 17907,
    "subj07": 12682,
    "subj08": 14386,
}


class _Config:
    """JSON round trip shared by the config dataclasses (nested configs and tuples included)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Self:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ModelError(f"{cls.__name__}: unknown field(s) {unknown}; known: {sorted(fields)}")
        kwargs = {}
        for name, value in values.items():
            nested = _NESTED.get((cls.__name__, name))
            if nested is not None and value is not None:
                value = nested.from_dict(value)
            elif isinstance(value, list):
                value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
            kwargs[name] = value
        return cls(**kwargs)


def _positive(owner: str, **values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ModelError(f"{owner}.{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class LowLevelConfig(_Config):
    """The low-level ("blurry") branch: hidden -> 64x7x7 -> diffusers Decoder -> 4x28x28 SD-VAE latent."""

    channels: int = 64
    grid: int = 7
    decoder_block_out_channels: tuple[int, ...] = (32, 64, 128)
    decoder_norm_groups: int = 32
    latent_channels: int = 4
    feature_channels: int = 512  # b_maps_projector width (VICRegL ConvNeXt-XL feature maps)
    dropout: float = 0.3

    def __post_init__(self) -> None:
        _positive("low_level", channels=self.channels, grid=self.grid, latent_channels=self.latent_channels)
        for width in self.decoder_block_out_channels:
            if width % self.decoder_norm_groups:
                raise ModelError(
                    f"low_level.decoder_block_out_channels {self.decoder_block_out_channels} must all be "
                    f"multiples of decoder_norm_groups={self.decoder_norm_groups}"
                )

    @property
    def latent_size(self) -> int:
        """Side of the output latent: each decoder block but the last doubles the grid."""
        return self.grid * 2 ** (len(self.decoder_block_out_channels) - 1)


@dataclass(frozen=True)
class BackboneConfig(_Config):
    """BrainNetwork (spec §1.2): mixer blocks, the linear to clip tokens, retrieval and low-level heads."""

    hidden_dim: int = 4096
    n_blocks: int = 4
    seq_len: int = 1
    clip_tokens: int = 256
    clip_dim: int = 1664
    dropout: float = 0.15
    retrieval: bool = True  # clip_proj (the public code builds it when clip_scale > 0)
    low_level: LowLevelConfig | None = field(default_factory=LowLevelConfig)

    def __post_init__(self) -> None:
        _positive(
            "backbone",
            hidden_dim=self.hidden_dim,
            n_blocks=self.n_blocks,
            seq_len=self.seq_len,
            clip_tokens=self.clip_tokens,
            clip_dim=self.clip_dim,
        )


@dataclass(frozen=True)
class PriorConfig(_Config):
    """The diffusion prior (spec §1.4): PriorNetwork transformer + a cosine noise schedule, predicts x0."""

    dim: int = 1664
    depth: int = 6
    dim_head: int = 52
    heads: int = 32
    n_tokens: int = 256
    timesteps: int = 100
    cond_drop_prob: float = 0.2
    ff_mult: int = 4
    rel_pos_buckets: int = 32
    rel_pos_max_distance: int = 128
    rotary_dim_max: int = 32  # the rotary embedding covers min(32, dim_head) dims of each head

    def __post_init__(self) -> None:
        _positive(
            "prior", dim=self.dim, depth=self.depth, dim_head=self.dim_head, heads=self.heads, n_tokens=self.n_tokens
        )
        if self.heads * self.dim_head != self.dim:
            raise ModelError(f"prior.heads x prior.dim_head must equal prior.dim, got {self.heads}x{self.dim_head}")

    @property
    def rotary_dim(self) -> int:
        return min(self.rotary_dim_max, self.dim_head)


@dataclass(frozen=True)
class MindEye2Config(_Config):
    """The whole model: one ridge layer per subject, the shared backbone, the diffusion prior."""

    subjects: tuple[str, ...] = ("subj01",)
    n_voxels: tuple[int, ...] = (15724,)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)

    def __post_init__(self) -> None:
        if len(self.subjects) != len(self.n_voxels) or not self.subjects:
            raise ModelError(
                f"subjects {self.subjects} and n_voxels {self.n_voxels} must be non-empty and of equal length"
            )
        if len(set(self.subjects)) != len(self.subjects):
            raise ModelError(f"subjects must be distinct, got {self.subjects}")
        _positive("mindeye2", **{f"n_voxels[{s}]": n for s, n in zip(self.subjects, self.n_voxels, strict=True)})
        if (self.prior.dim, self.prior.n_tokens) != (self.backbone.clip_dim, self.backbone.clip_tokens):
            raise ModelError(
                f"prior (n_tokens, dim) = {(self.prior.n_tokens, self.prior.dim)} must equal the backbone's "
                f"(clip_tokens, clip_dim) = {(self.backbone.clip_tokens, self.backbone.clip_dim)}"
            )

    def subjects_text(self) -> str:
        """``subj01 (15724 voxels), subj02 (14278 voxels)``: for messages and ``rtdecode model info``."""
        return ", ".join(f"{s} ({n} voxels)" for s, n in zip(self.subjects, self.n_voxels, strict=True))

    def subject_index(self, subject: str) -> int:
        """Index of ``subject``'s ridge layer, or a :class:`ModelError` listing the known subjects."""
        try:
            return self.subjects.index(subject)
        except ValueError:
            raise ModelError(f"unknown subject {subject!r}; this model has {list(self.subjects)}") from None


@dataclass(frozen=True)
class ConverterConfig(_Config):
    """bigG -> CLIP-L token converter (spec §2.4): Linear over tokens, then Linear over features."""

    in_tokens: int = 256
    out_tokens: int = 257
    in_dim: int = 1664
    out_dim: int = 1024

    def __post_init__(self) -> None:
        _positive(
            "converter", in_tokens=self.in_tokens, out_tokens=self.out_tokens, in_dim=self.in_dim, out_dim=self.out_dim
        )


_NESTED: dict[tuple[str, str], type[_Config]] = {
    ("BackboneConfig", "low_level"): LowLevelConfig,
    ("MindEye2Config", "backbone"): BackboneConfig,
    ("MindEye2Config", "prior"): PriorConfig,
}


def paper(subjects: Sequence[str] = ("subj01",), n_voxels: Sequence[int] = (15724,)) -> MindEye2Config:
    """The paper's model: hidden 4096, low-level branch on (``final_subj01_*``)."""
    return MindEye2Config(subjects=tuple(subjects), n_voxels=tuple(n_voxels))


def light(subjects: Sequence[str] = ("subj01",), n_voxels: Sequence[int] = (15724,)) -> MindEye2Config:
    """Hidden 1024 without the low-level branch (``multisubject_subj01_1024hid_nolow_300ep``)."""
    backbone = BackboneConfig(hidden_dim=1024, low_level=None)
    return MindEye2Config(subjects=tuple(subjects), n_voxels=tuple(n_voxels), backbone=backbone)


def tiny(
    subjects: Sequence[str] = ("s1", "s2"), n_voxels: Sequence[int] = (37, 29), low_level: bool = True
) -> MindEye2Config:
    """A model small enough for CPU tests in milliseconds; no size repeats so shape bugs show."""
    # decoder widths stay multiples of the default 32 groups: group counts cannot be read from tensor shapes
    low = None
    if low_level:
        low = LowLevelConfig(channels=8, grid=3, decoder_block_out_channels=(32, 64), feature_channels=12)
    backbone = BackboneConfig(hidden_dim=24, clip_tokens=6, clip_dim=20, low_level=low)
    prior = PriorConfig(dim=20, depth=2, dim_head=10, heads=2, n_tokens=6, rotary_dim_max=6)
    return MindEye2Config(subjects=tuple(subjects), n_voxels=tuple(n_voxels), backbone=backbone, prior=prior)
