"""The diffusion prior's transformer (spec §1.4): MindEye2's FlaggedCausalTransformer with ``causal=False``.

MindEye2 assembles it from dalle2-pytorch 1.15.6 pieces (LayerNorm, RelPosBias, Attention, FeedForward) and a
rotary-embedding-torch 0.9.x RotaryEmbedding. This module re-implements each piece from that behaviour, quirks
included, because the published weights were trained with them:

* the LayerNorm has a gain only, and its eps is 1e-5 for float32 input but 1e-3 for *any* other dtype (the
  "fp16 eps"); the final norm is the ``stable`` variant that first divides by the (detached) row maximum;
* attention is multi-query (one shared 2 x dim_head K/V head) with a learned null key/value prepended *after*
  the rotary embedding, cosine similarity with a fixed scale of 16, and a softmax computed in float32;
* the T5 relative-position bias is computed on an ``n x (n + 1)`` grid (the null key takes key position 0, so
  every real key is shifted by one), with the public bucket function (only "past" distances are bucketed).

Attribute names and Sequential indices reproduce the published state_dict under
``diffusion_prior.net.causal_transformer.`` (spec §2.1). One :class:`RotaryEmbedding` is shared by every layer:
its ``freqs`` appears under each layer's key but counts once in ``parameters()``.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rtdecode.errors import ModelError
from rtdecode.models.config import PriorConfig
from rtdecode.models.precision import Float32Tables

FP32_EPS = 1e-5  # LayerNorm eps for float32 input
LOW_PRECISION_EPS = 1e-3  # LayerNorm eps for every other dtype (dalle2's "fp16_eps", also hits bf16)
ROTARY_THETA = 10000.0
COSINE_SIM_SCALE = 16  # q is multiplied by it before the rotary; q and k by its square root after the l2norm


class GainLayerNorm(nn.Module):
    """dalle2's LayerNorm: gain ``g`` only, no bias; eps depends on the input dtype (see module docstring).

    ``stable=True`` divides each row by its detached maximum first (the transformer's final norm).
    """

    def __init__(self, dim: int, *, stable: bool = False) -> None:
        super().__init__()
        self.stable = stable
        self.g = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        eps = FP32_EPS if x.dtype == torch.float32 else LOW_PRECISION_EPS
        if self.stable:
            x = x / x.amax(dim=-1, keepdim=True).detach()
        var = torch.var(x, dim=-1, correction=0, keepdim=True)
        mean = torch.mean(x, dim=-1, keepdim=True)
        return (x - mean) * (var + eps).rsqrt() * self.g


def _rotate_pairs(x: Tensor) -> Tensor:
    """Interleaved pairs ``(a, b) -> (-b, a)`` along the last axis (rotary-embedding-torch's ``rotate_half``)."""
    pairs = x.unflatten(-1, (-1, 2))
    first, second = pairs.unbind(dim=-1)
    return torch.stack((-second, first), dim=-1).flatten(-2)


class RotaryEmbedding(Float32Tables):
    """Rotary position embedding of the first ``2 * (dim // 2)`` features ("lang" frequencies, theta 10000).

    ``freqs`` is a non-trainable parameter (as in rotary-embedding-torch, which is why it is in the checkpoints);
    it stays float32 when the model is cast to fp16/bf16 (:class:`Float32Tables`), as under the public autocast.
    Positions are built in the dtype of the rotated tensor and then cast to the dtype of ``freqs``, as the public
    code does (so bf16 input rounds positions above 256); the rotation itself runs in the promoted dtype and the
    result is cast back to the input dtype.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim < 2:
            raise ModelError(f"prior rotary dim must be >= 2 (min(rotary_dim_max, dim_head)), got {dim}")
        exponents = torch.arange(0, dim, 2)[: dim // 2].float() / dim
        self.freqs = nn.Parameter(1.0 / (ROTARY_THETA**exponents), requires_grad=False)

    def angles(self, n_positions: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """(n_positions, 2 * len(freqs)) angles, each frequency repeated for its pair of features."""
        positions = torch.arange(n_positions, device=device, dtype=dtype).to(self.freqs.dtype)
        return (positions[:, None] * self.freqs[None, :]).repeat_interleave(2, dim=-1)

    def rotate(self, x: Tensor) -> Tensor:
        """Rotate ``x`` of shape (..., n, d) by its position along axis -2."""
        angles = self.angles(x.shape[-2], x.dtype, x.device)
        n_rotated = angles.shape[-1]
        head, tail = x[..., :n_rotated], x[..., n_rotated:]
        rotated = head * angles.cos() + _rotate_pairs(head) * angles.sin()
        return torch.cat((rotated, tail.to(rotated.dtype)), dim=-1).to(x.dtype)


def relative_position_bucket(relative_position: Tensor, n_buckets: int, max_distance: int) -> Tensor:
    """T5 bucket of ``key - query`` offsets, as dalle2's RelPosBias computes it.

    Only past offsets are distinguished (future ones fall in bucket 0). Distances below ``n_buckets // 2`` get
    their own bucket; larger ones are binned logarithmically up to ``max_distance`` and clamped to the last
    bucket. The float32 arithmetic order is the public one, so the truncations agree bucket for bucket.
    """
    distance = (-relative_position).clamp(min=0)
    n_exact = n_buckets // 2
    is_exact = distance < n_exact
    far = distance.clamp(min=n_exact)  # the exact branch is taken below n_exact; avoids log(0)
    log_ratio = torch.log(far.float() / n_exact) / math.log(max_distance / n_exact)
    binned = n_exact + (log_ratio * (n_buckets - n_exact)).long()
    binned = binned.clamp(max=n_buckets - 1)
    return torch.where(is_exact, distance, binned)


class RelPosBias(nn.Module):
    """T5-style learned relative-position bias, one scalar per (bucket, head)."""

    def __init__(self, heads: int, n_buckets: int, max_distance: int) -> None:
        super().__init__()
        if n_buckets < 2 or max_distance <= n_buckets // 2:
            raise ModelError(
                f"prior rel-pos bias needs rel_pos_buckets >= 2 and rel_pos_max_distance > rel_pos_buckets // 2, "
                f"got {n_buckets} buckets, max distance {max_distance}"
            )
        self.n_buckets = n_buckets
        self.max_distance = max_distance
        self.relative_attention_bias = nn.Embedding(n_buckets, heads)

    def forward(self, n_queries: int, n_keys: int, device: torch.device) -> Tensor:
        """(heads, n_queries, n_keys) bias for query positions ``0..n_queries-1`` and keys ``0..n_keys-1``."""
        query_positions = torch.arange(n_queries, dtype=torch.long, device=device)
        key_positions = torch.arange(n_keys, dtype=torch.long, device=device)
        offsets = key_positions[None, :] - query_positions[:, None]
        buckets = relative_position_bucket(offsets, self.n_buckets, self.max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)


def attention_weights(sim: Tensor) -> Tensor:
    """Softmax over keys computed in float32, returned in the dtype of ``sim`` (dalle2 Attention)."""
    return sim.softmax(dim=-1, dtype=torch.float32).to(sim.dtype)


class Attention(nn.Module):
    """Pre-norm multi-query cosine-similarity attention with a learned null key/value (dalle2 Attention).

    Order (spec §1.4): norm; q (heads x dim_head) and one shared k, v; q x 16; rotary on q and k; null k/v
    prepended; l2-normalise q and k and multiply each by sqrt(16); add the rel-pos bias; float32 softmax;
    ``to_out`` = Linear then gain LayerNorm. No mask: MindEye2 builds the transformer with ``causal=False``.
    """

    def __init__(self, dim: int, dim_head: int, heads: int, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        self.heads = heads
        inner_dim = dim_head * heads
        self.norm = GainLayerNorm(dim)
        self.null_kv = nn.Parameter(torch.randn(2, dim_head))
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim, dim_head * 2, bias=False)
        self.rotary_emb = rotary_emb
        self.to_out = nn.Sequential(nn.Linear(inner_dim, dim, bias=False), GainLayerNorm(dim))

    def forward(self, x: Tensor, attn_bias: Tensor) -> Tensor:
        """``x`` (B, n, dim), ``attn_bias`` (heads, n, n + 1) -> (B, n, dim)."""
        batch, n_tokens = x.shape[:2]
        x = self.norm(x)
        q = self.to_q(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, heads, n, dim_head)
        k, v = self.to_kv(x).chunk(2, dim=-1)  # (B, n, dim_head) each: one head shared by all queries
        q = q * COSINE_SIM_SCALE
        q, k = self.rotary_emb.rotate(q), self.rotary_emb.rotate(k)
        k, v = self._prepend_null_kv(k, v, batch)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        q, k = q * math.sqrt(COSINE_SIM_SCALE), k * math.sqrt(COSINE_SIM_SCALE)
        sim = torch.einsum("b h i d, b j d -> b h i j", q, k) + attn_bias
        out = torch.einsum("b h i j, b j d -> b h i d", attention_weights(sim), v)
        return self.to_out(out.transpose(1, 2).reshape(batch, n_tokens, -1))

    def _prepend_null_kv(self, k: Tensor, v: Tensor, batch: int) -> tuple[Tensor, Tensor]:
        null_k, null_v = (row.expand(batch, 1, -1) for row in self.null_kv.unbind(dim=-2))
        return torch.cat((null_k, k), dim=-2), torch.cat((null_v, v), dim=-2)


class SwiGLU(nn.Module):
    """Split the last axis in half: ``x * silu(gate)``."""

    def forward(self, x: Tensor) -> Tensor:
        x, gate = x.chunk(2, dim=-1)
        return x * F.silu(gate)


class FeedForward(nn.Sequential):
    """dalle2 FeedForward: gain LayerNorm, Linear(dim, 2 x mult x dim), SwiGLU, Linear(mult x dim, dim).

    Indices 3 and 4 hold the post-activation norm (off) and the dropout (p = 0) of the public Sequential; they have
    no parameters, but keeping the slots keeps the last Linear at index 5, as the checkpoints name it.
    """

    def __init__(self, dim: int, mult: int) -> None:
        inner_dim = mult * dim
        super().__init__(
            GainLayerNorm(dim),
            nn.Linear(dim, inner_dim * 2, bias=False),
            SwiGLU(),
            nn.Identity(),
            nn.Identity(),
            nn.Linear(inner_dim, dim, bias=False),
        )


class PriorTransformer(nn.Module):
    """The FlaggedCausalTransformer as MindEye2 instantiates it: non-causal, pre-norm, stable final norm.

    ``init_norm`` is an Identity (norm_in=False); each layer is ``x = attn(x) + x; x = ff(x) + x``; then the
    stable gain LayerNorm and ``project_out`` (no bias).
    """

    def __init__(self, config: PriorConfig) -> None:
        super().__init__()
        self.init_norm = nn.Identity()
        self.rel_pos_bias = RelPosBias(config.heads, config.rel_pos_buckets, config.rel_pos_max_distance)
        rotary_emb = RotaryEmbedding(config.rotary_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    Attention(config.dim, config.dim_head, config.heads, rotary_emb),
                    FeedForward(config.dim, config.ff_mult),
                ]
            )
            for _ in range(config.depth)
        )
        self.norm = GainLayerNorm(config.dim, stable=True)
        self.project_out = nn.Linear(config.dim, config.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """(B, n, dim) tokens -> (B, n, dim)."""
        n_tokens = x.shape[1]
        x = self.init_norm(x)
        attn_bias = self.rel_pos_bias(n_tokens, n_tokens + 1, device=x.device)
        for attn, ff in self.layers:
            x = attn(x, attn_bias) + x
            x = ff(x) + x
        return self.project_out(self.norm(x))
