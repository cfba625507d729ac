"""BrainNetwork: the shared backbone from hidden space to CLIP tokens, plus retrieval and low-level heads (spec §1.2).

Module and attribute names reproduce the public implementation's state_dict (spec §2.1) so the published
checkpoints load with ``strict=True`` under the ``backbone.`` prefix. The forward pass is computed exactly as the
public code does, including its quirk: at ``seq_len=1`` the ``mixer_blocks1`` weights never reach the output
(spec §1.2 [VERIFIED]). They are kept, and wired as published, because the checkpoints store them and "fixing" the
residuals would change the published outputs. :meth:`BrainNetwork.collapsed_bias` gives the constant the mixer
blocks reduce to in eval mode.
"""

from typing import NamedTuple

import torch
from diffusers.models.autoencoders.vae import Decoder
from torch import Tensor, nn

from rtdecode.errors import ModelError
from rtdecode.models.config import BackboneConfig, LowLevelConfig


class BrainOutputs(NamedTuple):
    """What :meth:`BrainNetwork.forward` returns; a head that is not built gives ``None``."""

    backbone: Tensor  # (B, clip_tokens, clip_dim): the diffusion prior's condition
    clip_voxels: Tensor | None  # (B, clip_tokens, clip_dim): clip_proj output, for retrieval
    low_level_latent: Tensor | None  # (B, latent_channels, S, S): SD-VAE latent (already x 0.18215)
    low_level_features: Tensor | None  # (B, grid * grid, feature_channels): matched to VICRegL maps


def _mlp(width: int, dropout: float) -> nn.Sequential:
    """Linear, GELU, Dropout, Linear: the MLP of a mixer block (keys ``.0`` and ``.3``)."""
    return nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Dropout(dropout), nn.Linear(width, width))


def _mixer_block(width: int, dropout: float) -> nn.Sequential:
    """LayerNorm then MLP over the last axis (keys ``.0`` LayerNorm, ``.1.{0,3}`` Linears)."""
    return nn.Sequential(nn.LayerNorm(width), _mlp(width, dropout))


def _clip_proj(clip_dim: int) -> nn.Sequential:
    """Three (LayerNorm, GELU, Linear) stages per token: ``clip_proj.{0,3,6}`` norms, ``.{2,5,8}`` Linears."""
    layers: list[nn.Module] = []
    for _ in range(3):
        layers += [nn.LayerNorm(clip_dim), nn.GELU(), nn.Linear(clip_dim, clip_dim)]
    return nn.Sequential(*layers)


def _upsampler(low: LowLevelConfig) -> Decoder:
    """The diffusers VAE Decoder mapping the (channels, grid, grid) map to the SD-VAE latent.

    diffusers 0.42 names its keys as diffusers 0.23 did (``mid_block.attentions.0.{group_norm,to_q,to_k,to_v,
    to_out.0}``, spec §2.1), so published weights load without a remap.
    """
    n_blocks = len(low.decoder_block_out_channels)
    return Decoder(
        in_channels=low.channels,
        out_channels=low.latent_channels,
        up_block_types=("UpDecoderBlock2D",) * n_blocks,
        block_out_channels=tuple(low.decoder_block_out_channels),
        layers_per_block=1,
        norm_num_groups=low.decoder_norm_groups,
    )


def _maps_projector(in_channels: int, width: int) -> nn.Sequential:
    """1x1 convs with GroupNorm(1)/ReLU between them; parameters at indices 0, 1, 3, 4, 6 (spec §1.2)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 1, bias=False),
        nn.GroupNorm(1, width),
        nn.ReLU(),
        nn.Conv2d(width, width, 1, bias=False),
        nn.GroupNorm(1, width),
        nn.ReLU(),
        nn.Conv2d(width, width, 1, bias=True),
    )


class BrainNetwork(nn.Module):
    """Mixer blocks -> ``backbone_linear`` -> CLIP tokens; ``clip_proj`` and the blurry branch as configured."""

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.config = config
        hidden, seq_len = config.hidden_dim, config.seq_len
        self.mixer_blocks1 = nn.ModuleList(_mixer_block(hidden, config.dropout) for _ in range(config.n_blocks))
        self.mixer_blocks2 = nn.ModuleList(_mixer_block(seq_len, config.dropout) for _ in range(config.n_blocks))
        self.backbone_linear = nn.Linear(hidden * seq_len, config.clip_tokens * config.clip_dim)
        if config.retrieval:
            self.clip_proj = _clip_proj(config.clip_dim)
        low = config.low_level
        if low is not None:
            self.blin1 = nn.Linear(hidden * seq_len, low.channels * low.grid * low.grid)
            self.bdropout = nn.Dropout(low.dropout)
            self.bnorm = nn.GroupNorm(1, low.channels)
            self.bupsampler = _upsampler(low)
            self.b_maps_projector = _maps_projector(low.channels, low.feature_channels)

    def forward(self, x: Tensor) -> BrainOutputs:
        """(B, seq_len, hidden) ridge output -> :class:`BrainOutputs`, as the public forward computes it."""
        mixed = self.mix(x)
        tokens = self.tokens(mixed)
        clip_voxels = self.retrieval(tokens) if self.config.retrieval else None
        latent, features = self.low_level(mixed) if self.config.low_level is not None else (None, None)
        return BrainOutputs(tokens, clip_voxels, latent, features)

    def mix(self, x: Tensor) -> Tensor:
        """The mixer blocks with the public code's two residual streams (spec §1.2); (B, seq, hidden) out.

        Stream 1 runs over the hidden axis, stream 2 over the transposed (sequence) axis. Each block2 output
        replaces x, so at seq_len=1 the block1 results only reach block2's LayerNorm over a singleton axis, which
        outputs its bias whatever the input: block1 is dead weight, kept on purpose.
        """
        self._check_input(x)
        residual1 = x
        residual2 = x.transpose(1, 2)
        for block1, block2 in zip(self.mixer_blocks1, self.mixer_blocks2, strict=True):
            x = block1(x) + residual1
            residual1 = x
            x = x.transpose(1, 2)
            x = block2(x) + residual2
            residual2 = x
            x = x.transpose(1, 2)
        return x

    def tokens(self, mixed: Tensor) -> Tensor:
        """``backbone_linear`` on the flattened mixer output, reshaped to (B, clip_tokens, clip_dim)."""
        flat = mixed.reshape(mixed.shape[0], -1)
        return self.backbone_linear(flat).reshape(mixed.shape[0], self.config.clip_tokens, self.config.clip_dim)

    def retrieval(self, tokens: Tensor) -> Tensor:
        """``clip_proj`` per token: the ``clip_voxels`` used for retrieval (same shape as ``tokens``)."""
        if not self.config.retrieval:
            raise ModelError("backbone: retrieval head requested but config.retrieval is False (no clip_proj)")
        return self.clip_proj(tokens)

    def low_level(self, mixed: Tensor) -> tuple[Tensor, Tensor]:
        """Blurry branch: (SD-VAE latent (B, latent_channels, S, S), features (B, grid*grid, feature_channels)).

        ``blin1`` sees the same flattened mixer output as ``backbone_linear``. As in the public code, the maps
        projector is applied to the ``bnorm`` output (the (channels, grid, grid) map), not to the decoder output.
        """
        low = self._low_config()
        hidden = self.blin1(mixed.reshape(mixed.shape[0], -1))
        hidden = self.bdropout(hidden)
        maps = self.bnorm(hidden.reshape(hidden.shape[0], low.channels, low.grid, low.grid))
        features = self.b_maps_projector(maps).flatten(2).transpose(1, 2)
        return self.bupsampler(maps), features

    def collapsed_bias(self) -> Tensor:
        """The scalar C with ``mix(x) == x + C`` in eval mode at seq_len=1 (spec §1.2 [VERIFIED] quirk).

        Each block2 sees a LayerNorm over one element, which outputs its bias b; the block adds the
        input-independent c_k = Linear2(GELU(Linear1(b))) (dropout is off in eval), and C = c_1 + ... + c_n.
        Equal to the full forward up to float rounding of the summation order.
        """
        if self.config.seq_len != 1:
            raise ModelError(f"backbone: collapsed_bias needs seq_len == 1, got seq_len={self.config.seq_len}")
        total = torch.zeros((), dtype=self.backbone_linear.weight.dtype, device=self.backbone_linear.weight.device)
        for norm, mlp in self.mixer_blocks2:
            first, activation, _dropout, second = mlp
            total = total + second(activation(first(norm.bias.reshape(1, 1)))).reshape(())
        return total

    def _check_input(self, x: Tensor) -> None:
        expected = (self.config.seq_len, self.config.hidden_dim)
        if not isinstance(x, torch.Tensor) or x.ndim != 3 or tuple(x.shape[1:]) != expected:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ModelError(f"backbone: input must have shape (B, {expected[0]}, {expected[1]}), got {shape}")

    def _low_config(self) -> LowLevelConfig:
        if self.config.low_level is None:
            raise ModelError("backbone: low-level head requested but config.low_level is None (no blurry branch)")
        return self.config.low_level
