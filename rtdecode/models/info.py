"""What a bundle holds (``rtdecode model info``) and random bundles of a preset (``rtdecode model init``)."""

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from rtdecode import __version__
from rtdecode.errors import ModelError
from rtdecode.models import config as presets
from rtdecode.models.bundle import PROVENANCE_FILE, WEIGHTS_FILE, read_bundle_config, save_model_bundle
from rtdecode.models.config import MindEye2Config
from rtdecode.models.mindeye2 import MindEye2, count_parameters

PARTS = ("ridge.", "backbone.", "diffusion_prior.")
PRESETS = {"paper": presets.paper, "light": presets.light, "tiny": presets.tiny}


def parameter_counts(config: MindEye2Config) -> dict[str, int]:
    """Parameters per part and in total, counted on the meta device (no memory, any size)."""
    with torch.device("meta"):
        model = MindEye2(config)
    return count_parameters(model, ("", *PARTS))


def describe_bundle(folder: Path) -> str:
    """A few lines on a bundle: subjects, geometry, parameters, file size, provenance."""
    folder = Path(folder)
    config, converter = read_bundle_config(folder)
    counts = parameter_counts(config)
    backbone, prior = config.backbone, config.prior
    low = backbone.low_level
    lines = [
        f"bundle      {folder}",
        f"subjects    {config.subjects_text()}",
        f"backbone    hidden {backbone.hidden_dim}, {backbone.n_blocks} blocks, tokens {backbone.clip_tokens}x"
        f"{backbone.clip_dim}, retrieval {'on' if backbone.retrieval else 'off'}, low-level "
        + (f"{low.latent_channels}x{low.latent_size}x{low.latent_size} latent" if low else "off"),
        f"prior       dim {prior.dim}, depth {prior.depth}, {prior.heads} heads of {prior.dim_head}, "
        f"{prior.timesteps} timesteps",
        "converter   "
        + (
            "none"
            if converter is None
            else f"{converter.in_tokens}x{converter.in_dim} -> {converter.out_tokens}x{converter.out_dim}"
        ),
        "parameters  " + ", ".join(f"{name.rstrip('.')} {count:,}" for name, count in counts.items()),
        f"weights     {(folder / WEIGHTS_FILE).stat().st_size / 1e9:.2f} GB ({WEIGHTS_FILE})",
    ]
    provenance_path = folder / PROVENANCE_FILE
    if provenance_path.is_file():
        provenance = json.loads(provenance_path.read_text())
        lines += [f"provenance  {key}: {value}" for key, value in provenance.items()]
    return "\n".join(lines)


def random_bundle(
    folder: Path, preset: str, subjects: Sequence[tuple[str, int]] = (), *, seed: int = 0, overwrite: bool = False
) -> Path:
    """A bundle with the preset's geometry and random weights (``subjects``: (name, n_voxels) pairs)."""
    if preset not in PRESETS:
        raise ModelError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    kwargs = {}
    if subjects:
        kwargs = {"subjects": [name for name, _ in subjects], "n_voxels": [count for _, count in subjects]}
    config = PRESETS[preset](**kwargs)
    torch.manual_seed(seed)
    model = MindEye2(config)
    provenance = {"source_kind": "random", "preset": preset, "seed": seed, "created_by": f"rtdecode {__version__}"}
    return save_model_bundle(folder, model, provenance=provenance, overwrite=overwrite)
