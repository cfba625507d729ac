"""Bundles: save/load round trip, memory-mapped loading, clear errors for a broken folder."""

import json

import pytest
import torch
from safetensors.torch import save_file

from rtdecode.errors import CheckpointError, ModelError
from rtdecode.models.bundle import load_bundle, read_bundle_config, save_model_bundle
from rtdecode.models.config import tiny
from rtdecode.models.info import describe_bundle, parameter_counts, random_bundle
from rtdecode.models.mindeye2 import MindEye2


@pytest.fixture
def folder(tmp_path):
    return random_bundle(tmp_path / "bundle", "tiny", seed=3)


def test_a_saved_model_loads_with_the_same_weights(tmp_path):
    torch.manual_seed(0)
    model = MindEye2(tiny(low_level=False))
    folder = save_model_bundle(tmp_path / "b", model, provenance={"source_kind": "test"})
    loaded = load_bundle(folder)
    assert loaded.config == model.config
    assert not loaded.model.training
    want, got = model.state_dict(), loaded.model.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    assert loaded.provenance["source_kind"] == "test"
    assert len(loaded.provenance["weights_sha256"]) == 64


def file_mappings(path) -> list[tuple[int, int]]:
    """Address ranges of this process's memory mappings of ``path`` (Linux /proc/self/maps)."""
    ranges = []
    for line in open("/proc/self/maps"):
        fields = line.split()
        if len(fields) >= 6 and fields[5] == str(path):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def test_loaded_weights_are_memory_mapped_not_copied(folder):
    """Every parameter points into the mapping of the weights file: no second copy of the weights in RAM."""
    model = load_bundle(folder).model
    ranges = file_mappings((folder / "mindeye2.safetensors").resolve())
    assert ranges, "the weights file is not memory-mapped"
    outside = [
        name
        for name, parameter in model.named_parameters()
        if not any(start <= parameter.data_ptr() < end for start, end in ranges)
    ]
    assert outside == []


def test_the_shared_rotary_table_survives_the_round_trip(folder):
    model = load_bundle(folder).model
    layers = model.diffusion_prior.net.causal_transformer.layers
    tables = {id(layer[0].rotary_emb) for layer in layers}
    assert len(tables) == 1  # one module shared by all layers, as the public prior


def test_dtype_conversion_on_load(folder):
    model = load_bundle(folder, dtype="fp16").model
    dtypes = {name: tensor.dtype for name, tensor in model.state_dict().items()}
    float32 = sorted({name.split(".")[-1] for name, dtype in dtypes.items() if dtype == torch.float32})
    assert {dtype for dtype in dtypes.values()} == {torch.float16, torch.float32}
    # only the prior's schedule tables and rotary frequencies stay float32, as under the public autocast
    assert all(
        "noise_scheduler." in n or n.endswith("rotary_emb.freqs") for n, d in dtypes.items() if d != torch.float16
    )
    assert "freqs" in float32 and "alphas_cumprod_prev" in float32
    with pytest.raises(ModelError, match=r"dtype must be one of \['bf16', 'fp16', 'fp32'\], got 'fp8'"):
        load_bundle(folder, dtype="fp8")


def test_missing_and_foreign_folders_are_named(tmp_path, folder):
    with pytest.raises(CheckpointError, match=r"nowhere does not exist"):
        load_bundle(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"config\.json is missing.*rtdecode model import-mindeye2"):
        load_bundle(tmp_path / "empty")
    header = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**header, "format_version": 99}))
    with pytest.raises(CheckpointError, match=r"version 99; this rtdecode reads 'rtdecode.mindeye2' version 1"):
        read_bundle_config(folder)


def test_weights_that_do_not_match_the_config_are_listed(folder):
    state = {"ridge.linears.0.weight": torch.zeros(24, 36)}
    save_file(state, folder / "mindeye2.safetensors")
    with pytest.raises(CheckpointError, match=r"(?s)missing key.*mis-shaped.*expected \(24, 37\), found \(24, 36\)"):
        load_bundle(folder)
    (folder / "mindeye2.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match=r"mindeye2\.safetensors: unreadable safetensors file"):
        load_bundle(folder)


def test_info_describes_geometry_and_counts_without_loading(folder):
    text = describe_bundle(folder)
    counts = parameter_counts(tiny())
    assert "s1 (37 voxels), s2 (29 voxels)" in text
    assert f"total {counts['total']:,}" in text
    assert "source_kind: random" in text
    assert counts["total"] == counts["ridge."] + counts["backbone."] + counts["diffusion_prior."]
