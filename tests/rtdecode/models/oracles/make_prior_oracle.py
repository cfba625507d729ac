"""Writes tests/rtdecode/models/data/prior_oracle.safetensors: the public diffusion-prior pieces, run at tiny size.

The oracle is dalle2-pytorch 1.15.6 (Attention, FeedForward, RelPosBias, LayerNorm, SinusoidalPosEmb, MLP,
CausalTransformer, NoiseScheduler, DiffusionPrior's DDIM/DDPM loops and p_losses) with rotary-embedding-torch 0.9.1,
i.e. what MindEye2's ``models.py`` builds on. MindEye2's own two classes are thin; the wrappers below restate them
from the spec (§1.4): ``OraclePriorNetwork`` (PriorNetwork, learned_query_mode="pos_emb", continuous time,
causal=False) and ``OracleBrainDiffusionPrior`` (its p_sample_loop does not divide by image_embed_scale, its
forward does not scale the target). Nothing from rtdecode is imported: the test compares rtdecode against this file.

Run it in a scratch venv OUTSIDE the repository (the project venv must not get these packages)::

    /work/main/.venv/bin/python -m venv /tmp/oracle-venv
    PIP_CONSTRAINT=/work/main/constraints/cpu.txt /tmp/oracle-venv/bin/pip install torch==2.13.0
    /tmp/oracle-venv/bin/pip install --no-deps dalle2-pytorch==1.15.6 rotary-embedding-torch==0.9.1 \
        einops==0.8.2 tqdm==4.70.1 safetensors==0.8.0 numpy==2.4.6
    cd /work/main && /tmp/oracle-venv/bin/python tests/rtdecode/models/oracles/make_prior_oracle.py

dalle2_pytorch's package ``__init__`` imports CLIP, kornia, torchvision, a VQGAN and a tokenizer that the prior
does not use; the module file is therefore loaded by path with those imports stubbed (see ``load_dalle2``).

The config is tiny (dim 16 = 2 heads x 8, depth 2, 100 timesteps; the rotary covers 6 of the 8 head dims, partial
like the real 32 of 52) but has ``n_tokens=65``: the transformer then sees 2 x 65 + 1 = 131 tokens, more than the
rel-pos max distance 128, so the logarithmic and the clamped buckets are exercised too. The file stays < 200 KB.
"""

import importlib.util
import json
import sys
import types
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

OUT = Path(__file__).resolve().parents[1] / "data" / "prior_oracle.safetensors"
CONFIG = {
    "dim": 16,
    "depth": 2,
    "dim_head": 8,
    "heads": 2,
    "n_tokens": 65,
    "timesteps": 100,
    "cond_drop_prob": 0.2,
    "ff_mult": 4,
    "rel_pos_buckets": 32,
    "rel_pos_max_distance": 128,
    "rotary_dim_max": 6,
}
BATCH = 2
SEEDS = {"weights": 0, "inputs": 1, "ddim20": 11, "ddim7_guided": 12, "ddpm": 13, "loss": None}
FORWARD_TIMES = [3.0, 71.0]
GUIDANCE = {"forward_guided": 2.5, "ddim7_guided": 3.0}
BUCKET_OFFSETS = (-600, 600)
WEIGHT_NOISE = 0.3
PROJECT_OUT_SCALE = 0.1


def _stub(name: str, **attributes: object) -> None:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module


def load_dalle2() -> types.ModuleType:
    """dalle2_pytorch/dalle2_pytorch.py by path, with its unused heavy imports replaced by empty stand-ins."""
    import rotary_embedding_torch  # noqa: F401  (must be the real one)

    spec = importlib.util.find_spec("dalle2_pytorch")
    package_dir = Path(spec.submodule_search_locations[0])
    placeholder = type("Unused", (), {})
    package = types.ModuleType("dalle2_pytorch")
    package.__path__ = [str(package_dir)]
    sys.modules["dalle2_pytorch"] = package
    _stub("dalle2_pytorch.tokenizer", tokenizer=None)
    _stub("dalle2_pytorch.vqgan_vae", NullVQGanVAE=placeholder, VQGanVAE=placeholder)
    _stub("torchvision")
    _stub("torchvision.transforms")
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    _stub("kornia")
    _stub("kornia.filters", gaussian_blur2d=None)
    _stub("kornia.augmentation")
    _stub("resize_right", resize=None)
    _stub("x_clip", CLIP=placeholder)
    _stub("coca_pytorch", CoCa=placeholder)
    module_spec = importlib.util.spec_from_file_location(
        "dalle2_pytorch.dalle2_pytorch", package_dir / "dalle2_pytorch.py"
    )
    module = importlib.util.module_from_spec(module_spec)
    sys.modules["dalle2_pytorch.dalle2_pytorch"] = module
    module_spec.loader.exec_module(module)
    module.tqdm = lambda iterable, **_: iterable  # the sampling loops' progress bars
    return module


D2 = load_dalle2()


def flagged_transformer(cfg: dict) -> nn.Module:
    """dalle2's CausalTransformer turned into MindEye2's FlaggedCausalTransformer(causal=False).

    The two differ only in the causal flag handed to Attention. The rotary module is replaced by one of
    min(rotary_dim_max, dim_head) dims (the public code's min(32, dim_head) at the real size), still shared.
    """
    transformer = D2.CausalTransformer(
        dim=cfg["dim"], depth=cfg["depth"], dim_head=cfg["dim_head"], heads=cfg["heads"], ff_mult=cfg["ff_mult"]
    )
    rotary = D2.RotaryEmbedding(dim=min(cfg["rotary_dim_max"], cfg["dim_head"]))
    for attention, _ in transformer.layers:
        attention.causal = False
        attention.rotary_emb = rotary
    bias = transformer.rel_pos_bias
    if (bias.num_buckets, bias.max_distance) != (cfg["rel_pos_buckets"], cfg["rel_pos_max_distance"]):
        raise SystemExit("config rel-pos settings differ from dalle2's defaults")
    return transformer


class OraclePriorNetwork(nn.Module):
    """MindEye2 PriorNetwork (pos_emb mode, continuous time), restated from spec §1.4 around dalle2 pieces."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        dim, n_tokens = cfg["dim"], cfg["n_tokens"]
        self.dim = dim
        self.n_tokens = n_tokens
        self.self_cond = False
        self.to_time_embeds = nn.Sequential(
            nn.Sequential(D2.SinusoidalPosEmb(dim), D2.MLP(dim, dim)), D2.Rearrange("b (n d) -> b n d", n=1)
        )
        self.learned_query = nn.Parameter(torch.randn(n_tokens, dim) * dim**-0.5)
        self.causal_transformer = flagged_transformer(cfg)
        self.null_brain_embeds = nn.Parameter(torch.randn(n_tokens, dim))
        self.null_image_embed = nn.Parameter(torch.randn(n_tokens, dim))

    def forward_with_cond_scale(self, *args, cond_scale=1.0, **kwargs):
        logits = self.forward(*args, **kwargs)
        if cond_scale == 1:
            return logits
        null_logits = self.forward(*args, text_cond_drop_prob=1.0, image_cond_drop_prob=1.0, **kwargs)
        return null_logits + (logits - null_logits) * cond_scale

    def forward(
        self, image_embed, diffusion_timesteps, *, text_embed, self_cond=None, text_cond_drop_prob=0.0,
        image_cond_drop_prob=0.0,
    ):  # fmt: skip
        batch, device, dtype = image_embed.shape[0], image_embed.device, image_embed.dtype
        brain_keep = D2.prob_mask_like((batch,), 1 - text_cond_drop_prob, device=device)[:, None, None]
        image_keep = D2.prob_mask_like((batch,), 1 - image_cond_drop_prob, device=device)[:, None, None]
        brain = torch.where(brain_keep, text_embed, self.null_brain_embeds.to(text_embed.dtype)[None])
        image = torch.where(image_keep, image_embed, self.null_image_embed.to(dtype)[None])
        time_embed = self.to_time_embeds(diffusion_timesteps.type(dtype))
        image = image + self.learned_query[None].expand(batch, -1, -1)
        empty_queries = torch.empty((batch, 0, self.dim), device=device)
        tokens = self.causal_transformer(torch.cat((brain, time_embed, image, empty_queries), dim=-2))
        return tokens[..., -self.n_tokens :, :]


class OracleBrainDiffusionPrior(D2.DiffusionPrior):
    """MindEye2's BrainDiffusionPrior: p_sample_loop without the image_embed_scale division."""

    def p_sample_loop(self, *args, timesteps=None, **kwargs):
        timesteps = timesteps or self.noise_scheduler.num_timesteps
        if timesteps < self.noise_scheduler.num_timesteps:
            return self.p_sample_loop_ddim(*args, **kwargs, timesteps=timesteps)
        return self.p_sample_loop_ddpm(*args, **kwargs)

    def mindeye_loss(self, image_embed, text_embed):
        """MindEye2's forward (no target scaling): random t, then dalle2's p_losses."""
        times = self.noise_scheduler.sample_random_times(image_embed.shape[0])
        return self.p_losses(image_embed, times, text_cond={"text_embed": text_embed}), times


def build_prior() -> OracleBrainDiffusionPrior:
    """Seeded oracle prior; every parameter but the rotary freqs is perturbed so unit gains are tested too.

    ``project_out`` is then shrunk: a random transformer is far from contractive in x_t, and 19-100 sampling
    steps would amplify a 1e-7 rounding difference (another CPU's BLAS summation order) to O(1). Shrunk, a
    1e-6 input change moves the samples by < 1e-5 (guided DDIM: < 2e-4), so the fixture holds across machines.
    """
    torch.manual_seed(SEEDS["weights"])
    net = OraclePriorNetwork(CONFIG)
    prior = OracleBrainDiffusionPrior(
        net,
        image_embed_dim=CONFIG["dim"],
        timesteps=CONFIG["timesteps"],
        cond_drop_prob=CONFIG["cond_drop_prob"],
        condition_on_text_encodings=False,
    )
    with torch.no_grad():
        for parameter in prior.parameters():
            if parameter.requires_grad:
                parameter.add_(WEIGHT_NOISE * torch.randn_like(parameter))
        prior.net.causal_transformer.project_out.weight.mul_(PROJECT_OUT_SCALE)
    return prior.eval()


def loss_seed(prior: OracleBrainDiffusionPrior, batch: int) -> int:
    """The first seed whose drop masks (drawn after t and the noise) drop at least one condition."""
    for seed in range(100, 1000):
        torch.manual_seed(seed)
        torch.randint(0, CONFIG["timesteps"], (batch,))
        torch.randn(batch, CONFIG["n_tokens"], CONFIG["dim"])
        brain_keep = torch.zeros(batch).uniform_(0, 1) < 1 - CONFIG["cond_drop_prob"]
        image_keep = torch.zeros(batch).uniform_(0, 1) < 1 - CONFIG["cond_drop_prob"]
        if not (brain_keep.all() and image_keep.all()):
            return seed
    raise SystemExit("no seed drops a condition")


def state_in_published_layout(prior: nn.Module) -> dict[str, torch.Tensor]:
    """``diffusion_prior.``-prefixed copies (safetensors refuses the shared rotary table)."""
    return {f"diffusion_prior.{key}": value.detach().clone().contiguous() for key, value in prior.state_dict().items()}


def run_oracle(prior: OracleBrainDiffusionPrior) -> dict[str, torch.Tensor]:
    torch.manual_seed(SEEDS["inputs"])
    shape = (BATCH, CONFIG["n_tokens"], CONFIG["dim"])
    brain, image = torch.randn(shape), torch.randn(shape)
    times = torch.tensor(FORWARD_TIMES)
    text_cond = {"text_embed": brain}
    out = {"inputs.brain_tokens": brain, "inputs.image_tokens": image, "inputs.timesteps": times}
    with torch.no_grad():
        out["outputs.forward"] = prior.net(image, times, text_embed=brain)
        out["outputs.forward_guided"] = prior.net.forward_with_cond_scale(
            image, times, cond_scale=GUIDANCE["forward_guided"], text_embed=brain
        )
        torch.manual_seed(SEEDS["ddim20"])
        out["outputs.ddim20"] = prior.p_sample_loop(shape, text_cond=text_cond, cond_scale=1.0, timesteps=20)
        torch.manual_seed(SEEDS["ddim7_guided"])
        out["outputs.ddim7_guided"] = prior.p_sample_loop(
            shape, text_cond=text_cond, cond_scale=GUIDANCE["ddim7_guided"], timesteps=7
        )
        torch.manual_seed(SEEDS["ddpm"])
        out["outputs.ddpm"] = prior.p_sample_loop(shape, text_cond=text_cond, cond_scale=1.0, timesteps=100)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # brain tokens come from an autocast backbone
            out["outputs.forward_autocast_bf16"] = prior.net(image, times, text_embed=brain.bfloat16()).float()
        with torch.autocast("cpu", dtype=torch.float16):  # MindEye2 samples under fp16 autocast (spec §5.1)
            torch.manual_seed(SEEDS["ddim20"])
            half_cond = {"text_embed": brain.half()}
            out["outputs.ddim20_autocast_fp16"] = prior.p_sample_loop(
                shape, text_cond=half_cond, cond_scale=1.0, timesteps=20
            ).float()
        torch.manual_seed(SEEDS["loss"])
        loss, loss_times = prior.mindeye_loss(image, brain)
    out["outputs.loss"] = loss.reshape(1)
    out["outputs.loss_times"] = loss_times
    offsets = torch.arange(BUCKET_OFFSETS[0], BUCKET_OFFSETS[1] + 1)
    out["outputs.rel_pos_buckets"] = D2.RelPosBias._relative_position_bucket(offsets).to(torch.int32)
    return out


def main() -> None:
    prior = build_prior()
    SEEDS["loss"] = loss_seed(prior, BATCH)
    outputs = {key: value.contiguous() for key, value in run_oracle(prior).items()}
    tensors = state_in_published_layout(prior) | outputs
    metadata = {
        "config": json.dumps(CONFIG),
        "seeds": json.dumps(SEEDS),
        "forward_times": json.dumps(FORWARD_TIMES),
        "guidance": json.dumps(GUIDANCE),
        "bucket_offsets": json.dumps(BUCKET_OFFSETS),
        "versions": json.dumps(
            {"torch": torch.__version__, "dalle2-pytorch": "1.15.6", "rotary-embedding-torch": "0.9.1"}
        ),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(OUT), metadata=metadata)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(tensors)} tensors), loss seed {SEEDS['loss']}")


if __name__ == "__main__":
    main()
