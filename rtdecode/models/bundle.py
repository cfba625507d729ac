"""The model bundle: one folder with the config, the weights and where they came from.

Layout (``format_version`` 1)::

    config.json              {"format": "rtdecode.mindeye2", "format_version": 1,
                              "model": MindEye2Config, "converter": ConverterConfig | null}
    mindeye2.safetensors     the MindEye2 state_dict in the published key layout (spec §2.1)
    converter.safetensors    optional bigG -> CLIP-L converter (linear1, linear2)
    provenance.json          source file(s), checksums, dtype, rtdecode/torch versions, time

Loading never holds two copies of the weights: the model is built on the ``meta`` device and its
parameters are *assigned* the memory-mapped safetensors tensors, so a 4096-hidden bundle costs
its own size in (page-cache backed) memory, not twice that.
"""

import datetime
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from rtdecode.checkpoint_io import check_state, expected_shapes, read_safetensors
from rtdecode.errors import CheckpointError, ModelError
from rtdecode.file_integrity import file_sha256
from rtdecode.models.config import ConverterConfig, MindEye2Config
from rtdecode.models.converter import CLIPConverter
from rtdecode.models.mindeye2 import MindEye2
from rtdecode.models.precision import cast_state

FORMAT = "rtdecode.mindeye2"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "mindeye2.safetensors"
CONVERTER_FILE = "converter.safetensors"
PROVENANCE_FILE = "provenance.json"


@dataclass
class Bundle:
    """A loaded bundle: the model (eval mode), the optional converter, and the folder's records."""

    folder: Path
    config: MindEye2Config
    model: MindEye2
    converter: CLIPConverter | None = None
    provenance: dict[str, Any] = field(default_factory=dict)


def save_bundle(
    folder: Path,
    config: MindEye2Config,
    state: Mapping[str, Tensor],
    *,
    provenance: Mapping[str, Any],
    converter: tuple[ConverterConfig, Mapping[str, Tensor]] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a bundle from state dicts (already checked against ``config``) and return its folder."""
    folder = Path(folder)
    if (folder / CONFIG_FILE).exists() and not overwrite:
        raise CheckpointError(f"{folder} already holds a bundle; pass overwrite (--force) to replace it")
    folder.mkdir(parents=True, exist_ok=True)
    save_file(_unshared(state), folder / WEIGHTS_FILE, metadata={"format": FORMAT})
    converter_config = None
    if converter is not None:
        converter_config, converter_state = converter
        save_file(_unshared(converter_state), folder / CONVERTER_FILE, metadata={"format": FORMAT})
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": config.to_dict(),
        "converter": None if converter_config is None else converter_config.to_dict(),
    }
    records = {**provenance, "written_at": _now(), "torch_version": torch.__version__}
    records.setdefault("weights_sha256", file_sha256(folder / WEIGHTS_FILE))
    (folder / PROVENANCE_FILE).write_text(json.dumps(records, indent=2, default=str) + "\n")
    (folder / CONFIG_FILE).write_text(json.dumps(header, indent=2) + "\n")  # last: marks the bundle complete
    return folder


def save_model_bundle(
    folder: Path,
    model: MindEye2,
    *,
    provenance: Mapping[str, Any],
    converter: CLIPConverter | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a bundle from a model in memory (a trained or randomly initialised one)."""
    converter_part = None if converter is None else (converter.config, converter.state_dict())
    return save_bundle(
        folder,
        model.config,
        model.state_dict(),
        provenance=provenance,
        converter=converter_part,
        overwrite=overwrite,
    )


def read_bundle_config(folder: Path) -> tuple[MindEye2Config, ConverterConfig | None]:
    """The configs of a bundle, without touching its weights."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{folder} is not a MindEye2 bundle: {CONFIG_FILE} is missing "
            f"(make one with `rtdecode model import-mindeye2 last.pth --out {folder}`)"
        )
    try:
        header = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from None
    if header.get("format") != FORMAT or header.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format {header.get('format')!r} version {header.get('format_version')!r}; "
            f"this rtdecode reads {FORMAT!r} version {FORMAT_VERSION}"
        )
    try:
        model_config = MindEye2Config.from_dict(header["model"])
        converter = header.get("converter")
        converter_config = None if converter is None else ConverterConfig.from_dict(converter)
    except (KeyError, TypeError, ModelError) as error:
        raise CheckpointError(f"{path}: invalid model config ({error})") from None
    return model_config, converter_config


def load_bundle(folder: Path, *, device: str | torch.device = "cpu", dtype: str | None = None) -> Bundle:
    """Load a bundle for inference (eval mode), memory-mapped on CPU.

    ``dtype`` ("fp32", "fp16", "bf16") converts the weights; None keeps what the file stores.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"model bundle folder {folder} does not exist (models.mindeye2_dir)")
    config, converter_config = read_bundle_config(folder)
    model = _load_module(MindEye2, config, folder / WEIGHTS_FILE, device, dtype)
    converter = None
    if converter_config is not None:
        converter = _load_module(CLIPConverter, converter_config, folder / CONVERTER_FILE, device, dtype)
    provenance_path = folder / PROVENANCE_FILE
    provenance = json.loads(provenance_path.read_text()) if provenance_path.is_file() else {}
    return Bundle(folder=folder, config=config, model=model, converter=converter, provenance=provenance)


def _load_module(
    module_type: type[nn.Module], config: Any, path: Path, device: str | torch.device, dtype: str | None
) -> Any:
    """Build on meta, assign the memory-mapped tensors (one rotary module shared by the prior's layers
    receives the same table under each key, so sharing survives ``assign``)."""
    if not path.is_file():
        raise CheckpointError(f"bundle weights {path} are missing")
    with torch.device("meta"):
        module = module_type(config)
    state = read_safetensors(path)
    check_state(expected_shapes(module), state, str(path))
    state = cast_state(state, dtype)
    module.load_state_dict(state, strict=True, assign=True)
    return module.to(device).eval()


def _unshared(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """safetensors refuses tensors sharing storage (the prior's one rotary table under every layer): copy repeats."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for key, value in state.items():
        tensor = value.detach()
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if identity in seen:
            tensor = tensor.clone()
        seen.add(identity)
        out[key] = tensor.contiguous()
    return out


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
