"""The GPU stages as graphs: a module with named float32 inputs at the serving shape, named outputs, and the
weight files it is built from. Engines (:mod:`rtdecode.engines`) are exported and built from these graphs, and
swapped in for the torch modules they replace (:mod:`rtdecode.stage_engines`).

Stages (serving shapes of the published models; one trial at a time, guidance doubles the UNets' batch):

- ``embed``: voxels (1, n_voxels) -> backbone, clip_voxels (1, 256, 1664), mixed (1, 1, 4096).
- ``prior_step``: image_tokens (1, 256, 1664), timesteps (1,), brain_tokens -> x0: one prior network evaluation.
- ``low_level``: mixed -> latent (1, 4, 28, 28).
- ``low_level_decode``: latent (1, 4, 28, 28) already divided by 0.18215 -> image (1, 3, 224, 224) in about [-1, 1].
- ``unclip_unet``: sample (2, 4, 96, 96), timestep (2,), context (2, 256, 1664), time_ids (2, 4) -> eps.
- ``unclip_vae_decode``: latent (1, 4, 96, 96) already divided by the VAE scale -> image (1, 3, 768, 768).
- ``refiner_unet``: sample (2, 4, 96, 96), timestep (2,), context (2, 77, 2048), text_embeds (2, 1280),
  time_ids (2, 6) -> eps.
- ``refiner_vae_encode``: image (1, 3, 768, 768) in [-1, 1] -> the posterior's mean and std (1, 4, 96, 96).
- ``refiner_vae_decode``: latent (1, 4, 96, 96) already divided by the VAE scale -> image (1, 3, 768, 768).

Each graph is the network alone: the samplers, noise draws, scalings and colour mappings stay in the host code,
the same for every backend. Timesteps enter as float32 (the UNets and the prior embed them as floats anyway).
"""

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from rtdecode.config import ModelsConfig
from rtdecode.engines.signature import Signature
from rtdecode.errors import EngineError
from rtdecode.generate.pipeline import ImagePipeline
from rtdecode.generate.unclip_folder import UNET_DIR_NAME, VAE_DIR_NAME
from rtdecode.models.bundle import CONFIG_FILE, WEIGHTS_FILE
from rtdecode.models.mindeye2 import MindEye2

MODEL_STAGES = ("embed", "prior_step", "low_level")
IMAGE_STAGES = (
    "unclip_unet", "unclip_vae_decode", "refiner_unet", "refiner_vae_encode", "refiner_vae_decode", "low_level_decode"
)  # fmt: skip
STAGES = MODEL_STAGES + IMAGE_STAGES
GUIDED_BATCH = 2  # one trial, unconditional and conditional halves


@dataclasses.dataclass(frozen=True)
class StageGraph:
    """One stage: the module (float32, eval), example inputs at the serving shape, output names, weight files."""

    stage: str
    module: nn.Module
    inputs: dict[str, Tensor]
    outputs: tuple[str, ...]
    weight_files: tuple[Path, ...]

    @property
    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(value.shape) for name, value in self.inputs.items()}

    def signature(self, *, dynamic_batch: bool = False) -> Signature:
        return Signature.of(self.stage, self.input_shapes, self.outputs, dynamic_batch=dynamic_batch)

    def run_torch(self, inputs: Sequence[Tensor] | None = None) -> tuple[Tensor, ...]:
        """The module's outputs (float32) for ``inputs`` (default: the example inputs), on the module's device."""
        values = list(self.inputs.values()) if inputs is None else list(inputs)
        parameter = next(self.module.parameters(), None)
        if parameter is not None:
            values = [value.to(parameter.device, parameter.dtype) for value in values]
        with torch.no_grad():
            outputs = self.module(*values)
        return tuple(output.float() for output in (outputs if isinstance(outputs, tuple) else (outputs,)))


class EmbedGraph(nn.Module):
    """Ridge layer of one subject + backbone mixer + token head (+ retrieval head)."""

    def __init__(self, model: MindEye2, subject: str) -> None:
        super().__init__()
        self.ridge = model.ridge.linears[model.config.subject_index(subject)]
        self.backbone = model.backbone
        self.retrieval = model.config.backbone.retrieval

    def forward(self, voxels: Tensor) -> tuple[Tensor, ...]:
        mixed = self.backbone.mix(self.ridge(voxels)[:, None])
        tokens = self.backbone.tokens(mixed)
        if self.retrieval:
            return tokens, self.backbone.retrieval(tokens), mixed
        return tokens, mixed


class PriorStepGraph(nn.Module):
    """One conditional evaluation of the prior network (MindEye2 samples with guidance scale 1)."""

    def __init__(self, model: MindEye2) -> None:
        super().__init__()
        self.net = model.diffusion_prior.net

    def forward(self, image_tokens: Tensor, timesteps: Tensor, brain_tokens: Tensor) -> Tensor:
        return self.net(image_tokens, timesteps, brain_tokens)


class LowLevelGraph(nn.Module):
    """Mixed hidden state -> low-level latent (blin1, group norm, diffusers Decoder)."""

    def __init__(self, model: MindEye2) -> None:
        super().__init__()
        self.backbone = model.backbone

    def forward(self, mixed: Tensor) -> Tensor:
        latent, _ = self.backbone.low_level(mixed)
        return latent


class RefinerUnetGraph(nn.Module):
    """A diffusers SDXL UNet with positional inputs (the refiner: pooled text and six time ids)."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self, sample: Tensor, timestep: Tensor, context: Tensor, text_embeds: Tensor, time_ids: Tensor
    ) -> Tensor:
        added_cond = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states=context, added_cond_kwargs=added_cond).sample


class UnclipUnetGraph(RefinerUnetGraph):
    """The unCLIP UNet: no pooled text, so the added vector is the time ids' embedding alone (an empty
    ``text_embeds``, as the sampler passes)."""

    def forward(self, sample: Tensor, timestep: Tensor, context: Tensor, time_ids: Tensor) -> Tensor:
        return super().forward(sample, timestep, context, time_ids[:, :0], time_ids)


class VaeDecodeGraph(nn.Module):
    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent: Tensor) -> Tensor:
        return self.vae.decode(latent).sample


class VaeEncodeGraph(nn.Module):
    """Image in [-1, 1] -> the posterior's mean and standard deviation (the host draws the sample)."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        posterior = self.vae.encode(image).latent_dist
        return posterior.mean, posterior.std


def model_graphs(model: MindEye2, subject: str, model_dir: Path, *, seed: int = 0) -> list[StageGraph]:
    """``embed``, ``prior_step`` and (when the model has the branch) ``low_level`` of one subject's model, whose
    weights are the model bundle ``model_dir`` (its weights and config files)."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    n_voxels = config.n_voxels[config.subject_index(subject)]
    tokens_shape = (1, config.prior.n_tokens, config.prior.dim)
    files = tuple(Path(model_dir) / name for name in (CONFIG_FILE, WEIGHTS_FILE))
    missing = [str(path) for path in files if not path.is_file()]
    if missing:
        raise EngineError(f"model bundle files {missing} not found (the weights the model stages are built from)")
    outputs = ("backbone", "clip_voxels", "mixed") if config.backbone.retrieval else ("backbone", "mixed")
    graphs = [
        StageGraph("embed", EmbedGraph(model, subject).eval(), {"voxels": _randn((1, n_voxels), generator)}, outputs,
                   files),
        StageGraph(
            "prior_step",
            PriorStepGraph(model).eval(),
            {"image_tokens": _randn(tokens_shape, generator), "timesteps": torch.tensor([57.0]),
             "brain_tokens": _randn(tokens_shape, generator)},
            ("x0",),
            files,
        ),
    ]  # fmt: skip
    if config.backbone.low_level is not None:
        mixed = _randn((1, config.backbone.seq_len, config.backbone.hidden_dim), generator)
        graphs.append(StageGraph("low_level", LowLevelGraph(model).eval(), {"mixed": mixed}, ("latent",), files))
    return graphs


def image_graphs(pipeline: ImagePipeline, models: ModelsConfig, *, n_context_tokens: int,
                 low_level_side: int | None, seed: int = 0) -> list[StageGraph]:  # fmt: skip
    """The image pipeline's stages that are switched on: unCLIP UNet and VAE decode, the refiner's UNet and VAE
    (encode and decode), the low-level VAE decode (when the model has a low-level latent to decode).
    ``n_context_tokens`` is the prior's token count (256), ``low_level_side`` the low-level latent's side (28)."""
    generator = torch.Generator().manual_seed(seed)
    graphs = _unclip_graphs(pipeline, Path(models.unclip_dir), n_context_tokens, generator)
    if pipeline.refiner is not None:
        graphs += _refiner_graphs(pipeline, Path(models.refiner_dir), generator)
    if pipeline.refiner is not None and pipeline.settings.latent_handoff:  # latents go straight to the refiner
        graphs = [graph for graph in graphs if graph.stage not in ("unclip_vae_decode", "refiner_vae_encode")]
    if pipeline.low_level is not None and low_level_side is not None:
        vae = pipeline.low_level.vae
        latent = _randn((1, pipeline.low_level.n_channels, low_level_side, low_level_side), generator)
        files = _files(Path(models.low_level_vae_dir))
        graphs.append(StageGraph("low_level_decode", VaeDecodeGraph(vae).eval(), {"latent": latent}, ("image",), files))
    return graphs


def _unclip_graphs(pipeline: ImagePipeline, folder: Path, n_tokens: int, generator: torch.Generator) -> list:
    unclip = pipeline.unclip
    latent_shape = unclip.latent_shape
    batch = _unet_batch(unclip.settings.guidance)
    time_ids = torch.tensor([[*unclip.settings.original_size_px, *unclip.settings.crop_px]] * batch)
    unet_inputs = {
        "sample": _randn((batch, *latent_shape), generator),
        "timestep": torch.full((batch,), 999.0),
        "context": _randn((batch, n_tokens, unclip.context_dim), generator),
        "time_ids": time_ids.float(),
    }
    return [
        StageGraph("unclip_unet", UnclipUnetGraph(unclip.unet).eval(), unet_inputs, ("eps",),
                   _files(folder / UNET_DIR_NAME)),
        StageGraph("unclip_vae_decode", VaeDecodeGraph(unclip.vae).eval(),
                   {"latent": _randn((1, *latent_shape), generator)}, ("image",), _files(folder / VAE_DIR_NAME)),
    ]  # fmt: skip


def _refiner_graphs(pipeline: ImagePipeline, folder: Path, generator: torch.Generator) -> list:
    refiner, size_px = pipeline.refiner, pipeline.unclip.size_px
    downscale = 2 ** (len(refiner.vae.config.block_out_channels) - 1)
    latent_shape = (int(refiner.unet.config.in_channels), size_px // downscale, size_px // downscale)
    settings = refiner.settings
    numbers = [*settings.original_size_px, *settings.crop_px, *settings.target_size_px]
    text = refiner.pipeline.text_encoder_2.config
    batch = _unet_batch(settings.guidance)
    unet_inputs = {
        "sample": _randn((batch, *latent_shape), generator),
        "timestep": torch.full((batch,), 479.0),
        "context": _randn((batch, refiner.pipeline.tokenizer.model_max_length,
                           int(refiner.unet.config.cross_attention_dim)), generator),
        "text_embeds": _randn((batch, int(text.projection_dim)), generator),
        "time_ids": torch.tensor([numbers] * batch).float(),
    }  # fmt: skip
    vae_files = _files(folder / "vae")
    image = _randn((1, 3, size_px, size_px), generator).clamp(-1.0, 1.0)
    return [
        StageGraph("refiner_unet", RefinerUnetGraph(refiner.unet).eval(), unet_inputs, ("eps",),
                   _files(folder / "unet")),
        StageGraph("refiner_vae_encode", VaeEncodeGraph(refiner.vae).eval(), {"image": image}, ("mean", "std"),
                   vae_files),
        StageGraph("refiner_vae_decode", VaeDecodeGraph(refiner.vae).eval(),
                   {"latent": _randn((1, *latent_shape), generator)}, ("image",), vae_files),
    ]  # fmt: skip


def _unet_batch(guidance: float) -> int:
    """The UNet's batch for one trial: both guidance halves, or one without guidance (scale 1)."""
    return GUIDED_BATCH if guidance != 1.0 else 1


def _randn(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    return torch.randn(shape, generator=generator)


def _files(folder: Path) -> tuple[Path, ...]:
    files = tuple(sorted(path for path in folder.rglob("*") if path.is_file()))
    if not files:
        raise EngineError(f"{folder}: no weight files found (the folder a stage's weights load from)")
    return files


def decoder_graphs(model: MindEye2, subject: str, pipeline: ImagePipeline | None, models: ModelsConfig,
                   model_dir: Path) -> list[StageGraph]:  # fmt: skip
    """The stage graphs of one decoder: the model's, then the image pipeline's switched-on parts."""
    graphs = model_graphs(model, subject, model_dir)
    if pipeline is not None:
        low = model.config.backbone.low_level
        graphs += image_graphs(
            pipeline,
            models,
            n_context_tokens=model.config.prior.n_tokens,
            low_level_side=None if low is None else low.latent_size,
        )
    return graphs
