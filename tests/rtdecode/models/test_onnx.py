"""ONNX export of the embed, prior-step and low-level graphs; onnxruntime matches torch on CPU."""

import json

import onnx
import pytest
import torch

from rtdecode.errors import ModelError
from rtdecode.models.config import tiny
from rtdecode.models.mindeye2 import MindEye2
from rtdecode.models.onnx_export import export_onnx, onnx_parity


def model_of(low_level: bool = True) -> MindEye2:
    torch.manual_seed(0)
    return MindEye2(tiny(low_level=low_level)).eval()


def test_every_graph_matches_torch_to_1e_4(tmp_path):
    model = model_of()
    written = export_onnx(model, "s2", tmp_path)
    assert sorted(written) == ["embed-s2", "low_level", "prior_step"]
    differences = onnx_parity(model, "s2", tmp_path, batch=3)  # exported at batch 2: the batch axis is dynamic
    assert set(differences) == set(written)
    assert max(differences.values()) < 1e-4, differences
    manifest = json.loads((tmp_path / "onnx.json").read_text())
    assert [g["name"] for g in manifest["graphs"]] == ["embed-s2", "prior_step", "low_level"]
    assert manifest["graphs"][0]["inputs"] == {"voxels": ["batch", 29]}


def test_large_graphs_keep_their_weights_in_external_data(tmp_path):
    model = model_of(low_level=False)
    written = export_onnx(model, "s1", tmp_path, graphs=["embed"], external_data_bytes=0)
    data_files = list(tmp_path.glob("embed-s1.onnx*.data")) + list(tmp_path.glob("*.data"))
    assert data_files, sorted(p.name for p in tmp_path.iterdir())
    proto = onnx.load(str(written["embed-s1"]), load_external_data=False)
    assert any(onnx.external_data_helper.uses_external_data(t) for t in proto.graph.initializer)
    assert onnx_parity(model, "s1", tmp_path, graphs=["embed"])["embed-s1"] < 1e-4


def test_small_graphs_are_self_contained(tmp_path):
    written = export_onnx(model_of(), "s1", tmp_path, graphs=["low_level"])
    proto = onnx.load(str(written["low_level"]), load_external_data=False)
    assert not any(onnx.external_data_helper.uses_external_data(t) for t in proto.graph.initializer)


def test_a_model_without_low_level_branch_has_no_low_level_graph(tmp_path):
    assert sorted(export_onnx(model_of(low_level=False), "s1", tmp_path)) == ["embed-s1", "prior_step"]
    with pytest.raises(ModelError, match="no low-level branch"):
        export_onnx(model_of(low_level=False), "s1", tmp_path, graphs=["low_level"])
    with pytest.raises(ModelError, match="no low-level branch"):
        export_onnx(model_of(low_level=False), "s1", tmp_path, graphs=["embed", "prior_step", "low_level"])
    with pytest.raises(ModelError, match=r"unknown ONNX graph\(s\) \['unet'\]"):
        export_onnx(model_of(), "s1", tmp_path, graphs=["unet"])


def test_export_needs_a_float32_model(tmp_path):
    with pytest.raises(ModelError, match=r"needs a float32 model.*torch\.float16.*dtype='fp32'"):
        export_onnx(model_of().half(), "s1", tmp_path)
