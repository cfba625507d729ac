"""``rtdecode bench generate``: milliseconds per stage from a beta to the final image, batch 1.

Everything is built in memory with random weights (sizes need no weights): ``--size real`` is MindEye2 (hidden
1024 by default) with the published unCLIP geometry, SDXL base as refiner, git-large-coco and the SD 1.x VAE;
``--size tiny`` is the same structure at test widths (CPU seconds). Stages, in the order a trial runs them:

embed (ridge, backbone, heads) -> low-level preview -> prior (20 DDIM steps) -> converter -> caption (GIT,
<= 19 tokens) -> unCLIP (38 guided Euler steps) -> unCLIP VAE decode -> refine (VAE encode, 12 guided steps,
decode) -> blend (reusing the preview's low-level image) -> JPEG. "preview" is what the fast preview waits for:
embed + low-level decode (no retrieval pool here).

Modes: ``eager``; ``compile`` (``torch.compile`` of both UNets); ``cudagraphs`` (the same with
``mode="reduce-overhead"``, CUDA only). The VAEs always run in float32, as published.
"""

import dataclasses
import sys
import time
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from rtdecode.config import GenerateConfig
from rtdecode.generate.caption import (
    Captioner,
    captioner_config,
    captioner_vocabulary,
    feature_fed_git_class,
    feature_token_count,
)
from rtdecode.generate.geometry import UnclipGeometry
from rtdecode.generate.images import encode_image
from rtdecode.generate.low_level import LowLevelDecoder
from rtdecode.generate.pipeline import ImagePipeline
from rtdecode.generate.random_components import build_low_level_vae, build_refiner_pipeline
from rtdecode.generate.refine import Refiner, RefineSettings
from rtdecode.generate.unclip import UnclipGenerator, UnclipSettings
from rtdecode.generate.unclip_folder import DTYPES
from rtdecode.models.config import BackboneConfig, ConverterConfig, LowLevelConfig, MindEye2Config, PriorConfig
from rtdecode.models.converter import CLIPConverter
from rtdecode.models.mindeye2 import MindEye2
from rtdecode.reconstruct import Reconstructor

Size = Literal["tiny", "real"]
GOAL_MS = 1000.0
STAGES = ("embed", "low_level_preview", "prior", "converter", "caption", "unclip", "unclip_decode", "refine", "blend",
          "jpeg")  # fmt: skip


@dataclasses.dataclass
class GenerateResult:
    dtype: str
    mode: str
    stages_ms: dict[str, np.ndarray]
    caption: str

    def total_ms(self) -> np.ndarray:
        return sum(self.stages_ms.values())

    def preview_ms(self) -> np.ndarray:
        return self.stages_ms["embed"] + self.stages_ms["low_level_preview"]


def mindeye2_config(size: Size, hidden_dim: int, n_voxels: int, context_dim: int) -> MindEye2Config:
    """MindEye2 with the low-level branch (the blend needs its latent); tiny: clip width = the tiny unCLIP's."""
    if size == "real":
        backbone = BackboneConfig(hidden_dim=hidden_dim, low_level=LowLevelConfig())
        return MindEye2Config(subjects=("subj01",), n_voxels=(n_voxels,), backbone=backbone)
    low = LowLevelConfig(channels=8, grid=3, decoder_block_out_channels=(32, 64), feature_channels=12)
    backbone = BackboneConfig(hidden_dim=24, clip_tokens=6, clip_dim=context_dim, low_level=low)
    prior = PriorConfig(dim=context_dim, depth=2, dim_head=12, heads=2, n_tokens=6, rotary_dim_max=6)
    return MindEye2Config(subjects=("s1",), n_voxels=(n_voxels,), backbone=backbone, prior=prior)


def build_stack(
    size: Size, device: str, dtype: str, settings: GenerateConfig, hidden_dim: int, n_voxels: int
) -> Reconstructor:
    """Random weights at ``size``, built directly on ``device``."""
    torch_dtype = DTYPES[dtype]
    geometry = UnclipGeometry.published() if size == "real" else UnclipGeometry.tiny()
    caption_config = captioner_config("large" if size == "real" else "tiny")
    config = mindeye2_config(size, hidden_dim, n_voxels, geometry.context_dim)
    converter_config = ConverterConfig(
        in_tokens=config.backbone.clip_tokens,
        out_tokens=feature_token_count(caption_config),
        in_dim=geometry.context_dim,
        out_dim=caption_config.vision_config.hidden_size,
    )
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import BertTokenizer

    torch.manual_seed(0)
    with torch.device(device):
        model = MindEye2(config).to(torch_dtype).eval()
        converter = CLIPConverter(converter_config).to(torch_dtype).eval()
        unet = UNet2DConditionModel(**geometry.unet_config()).to(torch_dtype).eval()
        vae = AutoencoderKL(**geometry.vae_config()).eval()
        git = feature_fed_git_class()(caption_config).to(torch_dtype).eval()
    vocabulary = captioner_vocabulary("large" if size == "real" else "tiny")
    tokenizer = BertTokenizer(vocab={token: index for index, token in enumerate(vocabulary)})
    refiner_pipeline = build_refiner_pipeline(size, device=device)
    for part in (refiner_pipeline.unet, refiner_pipeline.text_encoder, refiner_pipeline.text_encoder_2):
        part.to(torch_dtype)
    unclip_settings = UnclipSettings(n_steps=settings.unclip_steps, guidance=settings.unclip_guidance)
    refine_settings = RefineSettings(
        n_steps=settings.refine_steps, start_step=settings.refine_start_step, guidance=settings.refine_guidance
    )
    pipeline = ImagePipeline(
        UnclipGenerator(unet, vae, unclip_settings),
        captioner=Captioner(git, tokenizer),
        refiner=Refiner(refiner_pipeline, refine_settings),
        low_level=LowLevelDecoder(build_low_level_vae(size, device=device)),
        settings=settings,
    )
    return Reconstructor(model, config.subjects[0], pipeline, converter=converter)


def compile_unets(stack: Reconstructor, mode: str) -> None:
    """``Module.compile`` on the two UNets (the bulk of the work); nothing for eager."""
    if mode == "eager":
        return
    options = {"compile": {}, "cudagraphs": {"mode": "reduce-overhead"}}[mode]
    stack.pipeline.unclip.unet.compile(**options)
    stack.pipeline.refiner.unet.compile(**options)


def run_trial(stack: Reconstructor, seed: int) -> tuple[dict[str, float], str]:
    """One beta through every stage; milliseconds per stage (device-synchronised) and the caption."""
    n_voxels = stack.model.config.n_voxels[0]
    voxels = torch.randn(1, n_voxels, generator=torch.Generator().manual_seed(seed))
    (result,) = stack.reconstruct(stack.preview(voxels), seed=seed)
    start_s = time.perf_counter()
    encode_image(result.final, "jpeg")
    return {**result.timings_ms, "jpeg": (time.perf_counter() - start_s) * 1e3}, result.caption or ""


def bench_generate(
    size: Size,
    device: str,
    dtypes: Sequence[str],
    modes: Sequence[str],
    settings: GenerateConfig,
    *,
    hidden_dim: int = 1024,
    n_voxels: int = 15724,
    n_reps: int = 3,
    n_warmup: int = 1,
) -> list[GenerateResult]:
    results = []
    for dtype in dtypes:
        for mode in modes:
            print(f"building {size} models ({dtype}, {mode}) on {device} ...", file=sys.stderr)
            stack = build_stack(size, device, dtype, settings, hidden_dim, n_voxels)
            compile_unets(stack, mode)
            for rep in range(n_warmup):
                print(f"warm-up {rep + 1}/{n_warmup} ...", file=sys.stderr)
                run_trial(stack, seed=rep)
            timings, caption = [], ""
            for rep in range(n_reps):
                start_s = time.perf_counter()
                stages, caption = run_trial(stack, seed=100 + rep)
                timings.append(stages)
                print(f"trial {rep + 1}/{n_reps}: {(time.perf_counter() - start_s) * 1e3:.0f} ms", file=sys.stderr)
            stages_ms = {name: np.array([t.get(name, 0.0) for t in timings]) for name in STAGES}
            results.append(GenerateResult(dtype, mode, stages_ms, caption))
            del stack
            torch.compiler.reset()
    return results


def format_results(results: Sequence[GenerateResult], size: Size, device: str, settings: GenerateConfig) -> str:
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    n_refine = settings.refine_steps - settings.refine_start_step
    lines = [
        f"beta -> final image, {size} size, random weights, batch 1, device {name}",
        f"unCLIP {settings.unclip_steps} steps x2 (guidance {settings.unclip_guidance:g}), refine {n_refine} steps "
        f"x2, latent handoff {'on' if settings.latent_handoff else 'off'}; medians in ms",
        f"{'stage':18}" + "".join(f"{r.dtype + ' ' + r.mode:>18}" for r in results),
    ]
    for stage in STAGES:
        lines.append(f"{stage:18}" + "".join(f"{np.median(r.stages_ms[stage]):18.1f}" for r in results))
    lines.append(f"{'preview':18}" + "".join(f"{np.median(r.preview_ms()):18.1f}" for r in results))
    lines.append(f"{'total (median)':18}" + "".join(f"{np.median(r.total_ms()):18.1f}" for r in results))
    lines.append(f"{'total (max)':18}" + "".join(f"{np.max(r.total_ms()):18.1f}" for r in results))
    if size == "real":
        best = min(float(np.median(r.total_ms())) for r in results)
        verdict = "meets" if best <= GOAL_MS else "misses"
        lines.append(f"goal: beta -> final image <= {GOAL_MS:.0f} ms on one H100; best here {best:.0f} ms ({verdict})")
    return "\n".join(lines)
