"""The generation commands as real processes (model import-unclip, model init-image-models, bench generate), and the
beta -> preview -> reconstruction wiring of :mod:`rtdecode.reconstruct`."""

import os

import numpy as np
import pytest
import torch

from rtdecode.bench.generate import mindeye2_config
from rtdecode.config import GenerateConfig, ModelsConfig
from rtdecode.errors import GenerateError
from rtdecode.generate.geometry import UnclipGeometry
from rtdecode.generate.pipeline import ImagePipeline
from rtdecode.generate.random_components import write_random_components
from rtdecode.generate.unclip_folder import load_unclip
from rtdecode.models.config import ConverterConfig
from rtdecode.models.converter import CLIPConverter
from rtdecode.models.mindeye2 import MindEye2
from rtdecode.models.retrieval import RetrievalIndex
from rtdecode.reconstruct import Reconstructor
from tests.helpers import run_rtdecode
from tests.rtdecode.generate.test_unclip_import import UNCLIP6_YAML, lightning_checkpoint, sgm_checkpoint_state

TINY_YAML_CHANGES = {
    "model_channels: 320": "model_channels: 32",
    "attention_resolutions: [ 4, 2 ]": "attention_resolutions: [ 2 ]",
    "num_res_blocks: 2\n        channel_mult: [ 1, 2, 4 ]": "num_res_blocks: 1\n        channel_mult: [ 1, 2 ]",
    "num_head_channels: 64": "num_head_channels: 16",
    "transformer_depth: [ 1, 2, 10 ]": "transformer_depth: [ 1, 1 ]",
    "context_dim: 1664": "context_dim: 24",
    "adm_in_channels: 1024": "adm_in_channels: 32",
    "ch: 128": "ch: 32",
    "ch_mult: [ 1, 2, 4, 4 ]\n          num_res_blocks: 2": "ch_mult: [ 1, 2 ]\n          num_res_blocks: 1",
}


@pytest.fixture
def env(tmp_path):
    return {**os.environ, "RTDECODE_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}


def rtdecode(*args, env, check=True):
    return run_rtdecode(*args, env=env, check=check)


def tiny_yaml(path):
    text = UNCLIP6_YAML
    for old, new in TINY_YAML_CHANGES.items():
        assert old in text, old
        text = text.replace(old, new)
    path.write_text(text)
    return path


def test_import_unclip_reads_the_head_layout_from_the_training_yaml(env, tmp_path):
    checkpoint = lightning_checkpoint(sgm_checkpoint_state(UnclipGeometry.tiny()), tmp_path / "unclip6.ckpt")
    refused = rtdecode("model", "import-unclip", str(checkpoint), "--out", str(tmp_path / "u"), env=env, check=False)
    assert refused.returncode != 0 and "unclip6.ckpt" in refused.stderr  # the published geometry does not fit
    yaml = tiny_yaml(tmp_path / "tiny.yaml")
    out = rtdecode(
        "model", "import-unclip", str(checkpoint), "--out", str(tmp_path / "u"), "--config", str(yaml),
        "--dtype", "fp16", env=env,
    ).stdout  # fmt: skip
    assert f'set [models] unclip_dir = "{tmp_path / "u"}"' in out
    unet, vae, geometry = load_unclip(tmp_path / "u", dtype=torch.float16)
    assert geometry.context_dim == 24 and unet.dtype == torch.float16 and vae.dtype == torch.float32


def test_init_image_models_prints_the_models_section(env, tmp_path):
    out = rtdecode("model", "init-image-models", "--out", str(tmp_path / "img"), env=env).stdout.splitlines()
    section = out[out.index("[models]") + 1 :]
    entries = dict(line.split(" = ") for line in section)
    assert set(entries) == {"unclip_dir", "refiner_dir", "caption_dir", "low_level_vae_dir"}
    models = ModelsConfig(**{key: value.strip('"') for key, value in entries.items()})
    pipeline = ImagePipeline.from_config(models, GenerateConfig(unclip_steps=2, refine_steps=4, refine_start_step=2))
    assert pipeline.describe() == "unCLIP 2 steps, caption, refine 2 steps, low-level blend"


def test_bench_generate_prints_every_stage(env):
    result = rtdecode("bench", "generate", "--reps", "1", "--unclip-steps", "3", env=env)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("beta -> final image, tiny size, random weights, batch 1, device cpu")
    stages = {line.split()[0] for line in lines[3:]}
    assert {"embed", "low_level_preview", "prior", "caption", "unclip", "refine", "blend", "jpeg", "preview"} <= stages
    total = next(line for line in lines if line.startswith("total (median)"))
    assert float(total.split()[-1]) > 0


@pytest.fixture(scope="module")
def reconstructor(tmp_path_factory):
    models = ModelsConfig(**write_random_components(tmp_path_factory.mktemp("components")))
    settings = GenerateConfig(unclip_steps=3, refine_steps=4, refine_start_step=2, output_size_px=20)
    torch.manual_seed(0)
    model = MindEye2(mindeye2_config("tiny", 24, 37, context_dim=24))
    converter = CLIPConverter(ConverterConfig(in_tokens=6, out_tokens=17, in_dim=24, out_dim=16))
    pool = RetrievalIndex([f"img{i}" for i in range(8)], torch.randn(8, 6, 24))
    pipeline = ImagePipeline.from_config(models, settings)
    return Reconstructor(model, "s1", pipeline, converter=converter, retrieval=pool, n_matches=3)


def test_a_beta_gives_a_preview_then_a_reconstruction(reconstructor):
    voxels = np.random.default_rng(0).standard_normal((2, 37)).astype(np.float32)
    preview = reconstructor.preview(voxels)
    assert [len(m) for m in preview.matches] == [3, 3] and preview.matches[0][0].id.startswith("img")
    assert preview.low_level[0].shape == (12, 12, 3)
    assert {"embed", "retrieval", "low_level_preview"} == set(preview.timings_ms)
    first = reconstructor.reconstruct(preview, seed=5)
    assert len(first) == 2 and first[0].final.shape == (20, 20, 3) and first[0].caption
    assert {"embed", "prior", "converter", "caption", "unclip", "refine", "blend"} <= set(first[0].timings_ms)
    again = reconstructor.reconstruct(reconstructor.preview(voxels), seed=5)
    np.testing.assert_array_equal(again[1].final, first[1].final)


def test_an_unknown_subject_or_a_missing_converter_is_refused(reconstructor):
    with pytest.raises(ValueError, match="s9"):
        Reconstructor(reconstructor.model, "s9", reconstructor.pipeline)
    with pytest.raises(GenerateError, match="captions need the bigG->CLIP-L converter.*bigG_to_L_epoch8.pth"):
        Reconstructor(reconstructor.model, "s1", reconstructor.pipeline)


def test_import_low_level_vae_checks_and_writes_the_sd1_vae(env, tmp_path):
    from diffusers import AutoencoderKL

    from rtdecode.generate.low_level import LowLevelDecoder
    from rtdecode.generate.random_components import low_level_vae_config

    torch.manual_seed(0)
    state = AutoencoderKL(**low_level_vae_config()).state_dict()
    assert sum(v.numel() for v in state.values()) == 83_653_863  # spec §2.2: 83.65 M
    torch.save(state, tmp_path / "sd_image_var_autoenc.pth")
    out = rtdecode("model", "import-low-level-vae", str(tmp_path / "sd_image_var_autoenc.pth"), "--out",
                   str(tmp_path / "vae"), env=env).stdout  # fmt: skip
    assert "low_level_vae_dir" in out
    decoder = LowLevelDecoder.from_folder(tmp_path / "vae")
    torch.testing.assert_close(decoder.vae.state_dict()["decoder.conv_out.weight"], state["decoder.conv_out.weight"])
    assert decoder.decode(torch.randn(1, 4, 28, 28)).shape == (1, 3, 224, 224)
    del state["decoder.conv_out.weight"]
    torch.save(state, tmp_path / "broken.pth")
    refused = rtdecode("model", "import-low-level-vae", str(tmp_path / "broken.pth"), "--out", str(tmp_path / "v2"),
                       env=env, check=False)  # fmt: skip
    assert refused.returncode != 0 and "decoder.conv_out.weight" in refused.stderr
