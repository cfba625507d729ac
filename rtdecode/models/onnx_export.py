"""ONNX export of the three graphs the engines run, and an onnxruntime parity check.

* ``embed-<subject>.onnx``: one subject's betas (B, n_voxels) -> backbone tokens (B, T, D), the
  retrieval embedding ``clip_voxels`` (B, T, D) and the mixed hidden state (B, 1, H) the low-level
  graph starts from.
* ``prior_step.onnx``: one network evaluation of the diffusion prior: noisy image tokens, the
  continuous timestep (B,) and the backbone tokens -> predicted x0. The sampler (a few element-wise
  DDIM updates, :func:`rtdecode.models.prior.ddim_timesteps`) stays in the host language; guidance
  feeds the null embeddings through the same graph.
* ``low_level.onnx``: hidden state -> SD-VAE latent (B, 4, 28, 28).

Batch is a dynamic axis. A graph whose weights exceed ``external_data_bytes`` (ONNX's protobuf
limit is 2 GB) keeps them in a ``.onnx.data`` file beside it. ``onnx.json`` records what was written.
torch's dynamo exporter is used (it needs ``onnxscript``: the ``onnx`` extra).
"""

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from rtdecode.errors import ModelError
from rtdecode.models.mindeye2 import MindEye2

GRAPHS = ("embed", "prior_step", "low_level")
EXTERNAL_DATA_BYTES = 2_000_000_000  # below protobuf's 2 GiB hard limit, with room for the graph itself
MANIFEST_FILE = "onnx.json"


class EmbedGraph(nn.Module):
    """Ridge layer of one subject + backbone + retrieval head."""

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
    """One prior network evaluation, conditional (MindEye2 samples with guidance scale 1)."""

    def __init__(self, model: MindEye2) -> None:
        super().__init__()
        self.net = model.diffusion_prior.net

    def forward(self, image_tokens: Tensor, timesteps: Tensor, brain_tokens: Tensor) -> Tensor:
        return self.net(image_tokens, timesteps, brain_tokens)


class LowLevelGraph(nn.Module):
    """Hidden state -> low-level latent (blin1, group norm, diffusers Decoder)."""

    def __init__(self, model: MindEye2) -> None:
        super().__init__()
        self.backbone = model.backbone

    def forward(self, mixed: Tensor) -> Tensor:
        latent, _ = self.backbone.low_level(mixed)
        return latent


@dataclass(frozen=True)
class GraphSpec:
    name: str
    module: nn.Module
    inputs: tuple[Tensor, ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]


def graph_specs(model: MindEye2, subject: str, graphs: Sequence[str] | None = None, batch: int = 2) -> list[GraphSpec]:
    """The wrapped modules with example inputs (``batch`` rows) and their input/output names.

    ``graphs`` None: every graph the model has (no ``low_level`` for a no-low-level model); naming
    ``low_level`` for such a model is an error.
    """
    unknown = sorted(set(graphs or ()) - set(GRAPHS))
    if unknown:
        raise ModelError(f"unknown ONNX graph(s) {unknown}; choose from {list(GRAPHS)}")
    wrong_dtype = sorted({str(p.dtype) for p in model.parameters() if p.dtype != torch.float32})
    if wrong_dtype:
        raise ModelError(
            f"ONNX export needs a float32 model, this one has {wrong_dtype} parameters "
            "(load the bundle with dtype='fp32'; engines choose their own precision)"
        )
    config = model.config
    n_voxels = config.n_voxels[config.subject_index(subject)]
    tokens = torch.randn(batch, config.prior.n_tokens, config.prior.dim)
    mixed = torch.randn(batch, config.backbone.seq_len, config.backbone.hidden_dim)
    embed_outputs = ("backbone", "clip_voxels", "mixed") if config.backbone.retrieval else ("backbone", "mixed")
    specs = {
        "embed": GraphSpec(
            f"embed-{subject}", EmbedGraph(model, subject), (torch.randn(batch, n_voxels),), ("voxels",), embed_outputs
        ),
        "prior_step": GraphSpec(
            "prior_step",
            PriorStepGraph(model),
            (torch.randn_like(tokens), torch.full((batch,), 57.0), tokens),
            ("image_tokens", "timesteps", "brain_tokens"),
            ("x0",),
        ),
    }
    if config.backbone.low_level is not None:
        specs["low_level"] = GraphSpec("low_level", LowLevelGraph(model), (mixed,), ("mixed",), ("latent",))
    elif graphs is not None and "low_level" in graphs:
        raise ModelError("this model has no low-level branch (no_blurry_recon); it has no low_level graph")
    return [specs[name] for name in (graphs or GRAPHS) if name in specs]


def export_onnx(
    model: MindEye2,
    subject: str,
    out_dir: Path,
    *,
    graphs: Sequence[str] | None = None,
    external_data_bytes: int = EXTERNAL_DATA_BYTES,
) -> dict[str, Path]:
    """Export the graphs (fp32, eval mode) to ``out_dir``; returns graph name -> .onnx path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    written = {}
    manifest = []
    for spec in graph_specs(model, subject, graphs):
        path = out_dir / f"{spec.name}.onnx"
        external = _weight_bytes(spec.module) > external_data_bytes
        batch = torch.export.Dim("batch", min=1, max=1024)
        dynamic_shapes = tuple({0: batch} for _ in spec.inputs)
        with torch.no_grad():
            torch.onnx.export(
                spec.module.eval(),
                spec.inputs,
                str(path),
                input_names=list(spec.input_names),
                output_names=list(spec.output_names),
                dynamo=True,
                external_data=external,
                dynamic_shapes=dynamic_shapes,
            )
        written[spec.name] = path
        manifest.append(_manifest_entry(spec, path, external))
    record = {"subject": subject, "config": model.config.to_dict(), "graphs": manifest}
    (out_dir / MANIFEST_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return written


def onnx_parity(
    model: MindEye2, subject: str, out_dir: Path, *, graphs: Sequence[str] | None = None, batch: int = 3, seed: int = 0
) -> dict[str, float]:
    """Largest absolute difference between onnxruntime (CPU) and torch, per exported graph."""
    import onnxruntime

    torch.manual_seed(seed)
    differences = {}
    for spec in graph_specs(model.eval(), subject, graphs, batch=batch):
        session = onnxruntime.InferenceSession(
            str(Path(out_dir) / f"{spec.name}.onnx"), providers=["CPUExecutionProvider"]
        )
        feeds = {name: value.numpy() for name, value in zip(spec.input_names, spec.inputs, strict=True)}
        ort_outputs = session.run(list(spec.output_names), feeds)
        with torch.no_grad():
            torch_outputs = spec.module(*spec.inputs)
        torch_outputs = torch_outputs if isinstance(torch_outputs, tuple) else (torch_outputs,)
        differences[spec.name] = max(
            float(np.max(np.abs(ours.numpy() - theirs)))
            for ours, theirs in zip(torch_outputs, ort_outputs, strict=True)
        )
    return differences


def _weight_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def _manifest_entry(spec: GraphSpec, path: Path, external: bool) -> dict:
    return {
        "name": spec.name,
        "file": path.name,
        "external_data": external,
        "inputs": {n: ["batch", *t.shape[1:]] for n, t in zip(spec.input_names, spec.inputs, strict=True)},
        "outputs": list(spec.output_names),
    }
