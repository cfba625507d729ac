"""SDXL-unCLIP geometry, sgm -> diffusers key mapping (checked against diffusers' own converter), folder import/load."""

import argparse
import dataclasses
import hashlib
import json
import re

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

from rtdecode.errors import CheckpointError, ComponentMissingError, GenerateError
from rtdecode.generate.geometry import UnclipGeometry
from rtdecode.generate.unclip_folder import (
    convert_unet_state,
    convert_vae_state,
    import_unclip,
    load_unclip,
    sgm_unet_state,
    sgm_vae_state,
    write_random_unclip,
)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SDXL_BASE_UNET_PARAMS = 2_567_463_684  # context 2048, adm 2816
SDXL_VAE_PARAMS = 83_653_863
# The published structure (3 levels, 2 res blocks, attention at 2x and 4x) at a small width.
SMALL_PUBLISHED = dataclasses.replace(
    UnclipGeometry.published(),
    model_channels=32,
    transformer_depth=(1, 2, 3),
    num_head_channels=16,
    context_dim=24,
    adm_in_channels=32,
    vae_ch=32,
    image_size_px=64,
)
GEOMETRIES = {"tiny": UnclipGeometry.tiny(), "small-published": SMALL_PUBLISHED}

UNCLIP6_YAML = """\
model:
  base_learning_rate: 1.0e-5
  target: sgm.models.diffusion.DiffusionEngine
  params:
    scale_factor: 0.13025
    disable_first_stage_autocast: True
    network_config:
      target: sgm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        adm_in_channels: 1024 #2816
        num_classes: sequential
        use_checkpoint: True
        in_channels: 4
        out_channels: 4
        model_channels: 320
        attention_resolutions: [ 4, 2 ]
        num_res_blocks: 2
        channel_mult: [ 1, 2, 4 ]
        num_head_channels: 64
        use_linear_in_transformer: True
        transformer_depth: [ 1, 2, 10 ]
        context_dim: 1664 #1280
        spatial_transformer_attn_type: softmax-xformers
    first_stage_config:
      target: sgm.models.autoencoder.AutoencoderKLInferenceWrapper
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          attn_type: vanilla
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult: [ 1, 2, 4, 4 ]
          num_res_blocks: 2
          attn_resolutions: [ ]
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
"""


def random_diffusers_states(geometry: UnclipGeometry, seed: int) -> tuple[dict, dict]:
    """Distinct random values for every tensor of the diffusers UNet and VAE (so a swapped key shows)."""
    generator = torch.Generator().manual_seed(seed)
    unet = UNet2DConditionModel(**geometry.unet_config())
    vae = AutoencoderKL(**geometry.vae_config())
    return (
        {k: torch.randn(v.shape, generator=generator) for k, v in unet.state_dict().items()},
        {k: torch.randn(v.shape, generator=generator) for k, v in vae.state_dict().items()},
    )


def sgm_checkpoint_state(geometry: UnclipGeometry, seed: int = 0) -> dict:
    """A tiny sgm DiffusionEngine state dict (prefixed UNet and VAE keys), from random diffusers weights."""
    unet_state, vae_state = random_diffusers_states(geometry, seed)
    return {UNET_PREFIX + k: v.contiguous() for k, v in sgm_unet_state(unet_state, geometry).items()} | {
        VAE_PREFIX + k: v.contiguous() for k, v in sgm_vae_state(vae_state, geometry).items()
    }


def oracle_models(sgm_state: dict, geometry: UnclipGeometry) -> tuple[UNet2DConditionModel, AutoencoderKL]:
    """The diffusers models loaded with diffusers' own ldm converter's output (strict: every key)."""
    unet = UNet2DConditionModel(**geometry.unet_config())
    vae = AutoencoderKL(**geometry.vae_config())
    unet.load_state_dict(convert_ldm_unet_checkpoint(sgm_state, unet.config), strict=True)
    vae.load_state_dict(convert_ldm_vae_checkpoint(sgm_state, vae.config), strict=True)
    return unet.eval(), vae.eval()


def lightning_checkpoint(sgm_state: dict, path, *, with_conditioner: bool = True):
    """A file laid out like unclip6_epoch0_step110000.ckpt: sgm weights under "state_dict", Lightning metadata."""
    extras = {"denoiser.sigmas": torch.linspace(0.03, 14.6, 1000)}
    if with_conditioner:
        extras |= {
            "conditioner.embedders.0.open_clip.model.visual.conv1.weight": torch.randn(8, 3, 2, 2),
            "conditioner.embedders.0.open_clip.model.visual.ln_post.weight": torch.ones(8),
        }
    torch.save(
        {
            "state_dict": sgm_state | extras,
            "epoch": 0,
            "global_step": 110000,
            "pytorch-lightning_version": "2.0.1",
            "hyper_parameters": argparse.Namespace(base_learning_rate=1e-5),  # a foreign pickled object
        },
        path,
    )
    return path


def unet_output(unet: UNet2DConditionModel, geometry: UnclipGeometry) -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    side = geometry.latent_size_px
    sample = torch.randn(2, geometry.in_channels, side, side, generator=generator)
    tokens = torch.randn(2, 5, geometry.context_dim, generator=generator)
    added = {"text_embeds": torch.zeros(2, 0), "time_ids": torch.tensor([[768.0, 768.0, 0.0, 0.0]] * 2)}
    with torch.no_grad():
        return unet(sample, torch.tensor([999, 26]), tokens, added_cond_kwargs=added).sample


def vae_output(vae: AutoencoderKL, geometry: UnclipGeometry) -> torch.Tensor:
    generator = torch.Generator().manual_seed(8)
    side = geometry.latent_size_px
    with torch.no_grad():
        return vae.decode(torch.randn(2, geometry.vae_z_channels, side, side, generator=generator)).sample


# --- key mapping against diffusers' converter ---------------------------------------------------------------------


@pytest.mark.parametrize("name", GEOMETRIES)
def test_unet_mapping_equals_diffusers_converter(name):
    geometry = GEOMETRIES[name]
    sgm_state = sgm_checkpoint_state(geometry, seed=1)
    sgm_unet = {k.removeprefix(UNET_PREFIX): v for k, v in sgm_state.items() if k.startswith(UNET_PREFIX)}
    ours = convert_unet_state(sgm_unet, geometry)
    model = UNet2DConditionModel(**geometry.unet_config())
    oracle = convert_ldm_unet_checkpoint(sgm_state, model.config)
    model_keys = set(model.state_dict())

    assert set(ours) == set(oracle) == model_keys
    assert all(torch.equal(ours[key], oracle[key]) for key in ours)


@pytest.mark.parametrize("name", GEOMETRIES)
def test_vae_mapping_equals_diffusers_converter(name):
    geometry = GEOMETRIES[name]
    sgm_state = sgm_checkpoint_state(geometry, seed=2)
    sgm_vae = {k.removeprefix(VAE_PREFIX): v for k, v in sgm_state.items() if k.startswith(VAE_PREFIX)}
    ours = convert_vae_state(sgm_vae, geometry)
    oracle = convert_ldm_vae_checkpoint(sgm_state, AutoencoderKL(**geometry.vae_config()).config)

    assert set(ours) == set(oracle) == set(AutoencoderKL(**geometry.vae_config()).state_dict())
    assert all(torch.equal(ours[key], oracle[key]) for key in ours)
    assert sgm_vae["decoder.mid.attn_1.q.weight"].shape[2:] == (1, 1)  # ldm stores attention as 1x1 convs
    assert "decoder.up.0.upsample.conv.weight" not in sgm_vae  # ldm's finest decoder level has no upsampler


def test_unmapped_key_is_named():
    geometry = UnclipGeometry.tiny()
    sgm_unet = {
        k.removeprefix(UNET_PREFIX): v for k, v in sgm_checkpoint_state(geometry).items() if k.startswith(UNET_PREFIX)
    }
    sgm_unet["input_blocks.9.0.in_layers.0.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"input_blocks\.9\.0\.in_layers\.0\.weight"):
        convert_unet_state(sgm_unet, geometry)


# --- geometry ------------------------------------------------------------------------------------------------------


def parameter_count(geometry: UnclipGeometry) -> tuple[int, int]:
    with torch.device("meta"):
        unet = UNet2DConditionModel(**geometry.unet_config())
        vae = AutoencoderKL(**geometry.vae_config())
    return sum(p.numel() for p in unet.parameters()), sum(p.numel() for p in vae.parameters())


def test_published_parameter_count_follows_sgm_arithmetic():
    published = UnclipGeometry.published()
    sdxl_base = dataclasses.replace(published, context_dim=2048, adm_in_channels=2816)
    # sgm: transformer blocks per level = depth x (num_res_blocks down + num_res_blocks + 1 up), plus the middle's.
    blocks_640 = 2 * (2 + 3)
    blocks_1280 = 10 * (2 + 3) + 10
    attn2_kv_change = 2 * (2048 - 1664) * (640 * blocks_640 + 1280 * blocks_1280)
    label_emb_change = (2816 - 1024) * 1280

    assert parameter_count(sdxl_base)[0] == SDXL_BASE_UNET_PARAMS
    unet_params, vae_params = parameter_count(published)
    assert unet_params == SDXL_BASE_UNET_PARAMS - attn2_kv_change - label_emb_change == 2_501_272_324
    assert vae_params == SDXL_VAE_PARAMS


def test_published_sgm_layout_matches_unclip6_yaml():
    """unclip6.yaml's Finetuner regex (re-initialised attn2 to_k/to_v) must select exactly those keys."""
    geometry = UnclipGeometry.published()
    with torch.device("meta"):
        unet_state = UNet2DConditionModel(**geometry.unet_config()).state_dict()
        vae_state = AutoencoderKL(**geometry.vae_config()).state_dict()
    sgm_unet = {UNET_PREFIX + k: v for k, v in sgm_unet_state(unet_state, geometry).items()}
    finetuned = re.compile(
        r"model\.diffusion_model\.(input_blocks|middle_block|output_blocks)(\.[0-9])?\.[0-9]\.transformer_blocks"
        r"\.[0-9]\.attn2\.(to_k|to_v)\.weight"
    )
    selected = {k for k in sgm_unet if finetuned.fullmatch(k)}

    assert len(sgm_unet) == 1680 and len(sgm_vae_state(vae_state, geometry)) == 248  # SDXL base UNet / VAE keys
    assert selected == {k for k in sgm_unet if re.search(r"attn2\.to_[kv]\.weight$", k)}
    assert len(selected) == 2 * (2 * 5 + 10 * 5 + 10)
    assert {sgm_unet[k].shape[1] for k in selected} == {1664}
    assert sgm_unet[UNET_PREFIX + "label_emb.0.0.weight"].shape == (1280, 1024)  # Pruner slice ":, :1024"
    assert sgm_unet[UNET_PREFIX + "output_blocks.2.2.conv.weight"].shape == (1280, 1280, 3, 3)  # after attention
    assert sgm_unet[UNET_PREFIX + "input_blocks.3.0.op.weight"].shape == (320, 320, 3, 3)


def test_heads_are_channels_over_head_width():
    assert UnclipGeometry.published().unet_config()["attention_head_dim"] == (5, 10, 20)
    geometry = UnclipGeometry.tiny()
    unet = UNet2DConditionModel(**geometry.unet_config())
    attention = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    middle = unet.mid_block.attentions[0].transformer_blocks[0].attn2
    assert (attention.heads, attention.inner_dim // attention.heads) == (4, geometry.num_head_channels)
    assert (middle.heads, middle.inner_dim // middle.heads) == (4, geometry.num_head_channels)


def test_geometry_dict_round_trip_is_json():
    for geometry in (UnclipGeometry.published(), UnclipGeometry.tiny(), SMALL_PUBLISHED):
        assert UnclipGeometry.from_dict(json.loads(json.dumps(geometry.to_dict()))) == geometry
    with pytest.raises(GenerateError, match="context_dims"):
        UnclipGeometry.from_dict(UnclipGeometry.tiny().to_dict() | {"context_dims": 3})


def test_from_yaml_reads_unclip6(tmp_path):
    path = tmp_path / "unclip6.yaml"
    path.write_text(UNCLIP6_YAML)
    assert UnclipGeometry.from_yaml(path) == UnclipGeometry.published()


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ("num_head_channels: 64", "num_head_channels: -1\n        num_heads: 8", "num_head_channels"),
        ("num_head_channels: 64", "num_heads: 8", "num_head_channels"),
        ("num_classes: sequential", "num_classes: 1000", "num_classes"),
        ("transformer_depth: [ 1, 2, 10 ]", "transformer_depth: [ 2, 10 ]", "transformer_depth"),
        ("context_dim: 1664 #1280", "context_dim: [1664]", "context_dim"),
        ("in_channels: 4\n", "in_channels: 4\n        legacy: True\n", "legacy"),
        ("adm_in_channels: 1024", "adm_in_channels: 1026", "adm_in_channels"),
        ("attn_resolutions: [ ]", "attn_resolutions: [ 32 ]", "attn_resolutions"),
        ("embed_dim: 4", "embed_dim: 8", "embed_dim"),
        ("    network_config:", "    network_configs:", "network_config"),
    ],
)
def test_from_yaml_names_file_and_field(tmp_path, old, new, field):
    path = tmp_path / "bad.yaml"
    assert old in UNCLIP6_YAML
    path.write_text(UNCLIP6_YAML.replace(old, new, 1))
    with pytest.raises(GenerateError) as caught:
        UnclipGeometry.from_yaml(path)
    assert str(path) in str(caught.value) and field in str(caught.value)


# --- import and load -----------------------------------------------------------------------------------------------


def test_import_round_trip_gives_the_oracle_outputs(tmp_path):
    geometry = UnclipGeometry.tiny()
    sgm_state = sgm_checkpoint_state(geometry, seed=3)
    checkpoint = lightning_checkpoint(sgm_state, tmp_path / "unclip6_epoch0_step110000.ckpt")
    messages: list[str] = []

    folder = import_unclip(checkpoint, tmp_path / "unclip", geometry=geometry, progress=messages.append)
    unet, vae, loaded_geometry = load_unclip(folder)
    oracle_unet, oracle_vae = oracle_models(sgm_state, geometry)

    assert loaded_geometry == geometry and not unet.training and not vae.training
    assert torch.equal(unet_output(unet, geometry), unet_output(oracle_unet, geometry))
    assert torch.equal(vae_output(vae, geometry), vae_output(oracle_vae, geometry))
    manifest = json.loads((folder / "unclip.json").read_text())
    assert manifest["format"] == "rtdecode-unclip" and manifest["format_version"] == 1
    assert manifest["provenance"]["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert manifest["provenance"]["dtype"] == "fp32" and manifest["provenance"]["source"] == str(checkpoint.resolve())
    assert any("UNet" in message for message in messages)
    assert not (tmp_path / "unclip.partial").exists()


def test_import_bare_state_dict_in_fp16_keeps_the_vae_in_fp32(tmp_path):
    geometry = SMALL_PUBLISHED
    sgm_state = sgm_checkpoint_state(geometry, seed=4)
    torch.save(sgm_state, tmp_path / "bare.pt")

    folder = import_unclip(tmp_path / "bare.pt", tmp_path / "unclip", geometry=geometry, dtype="fp16")
    unet, vae, _ = load_unclip(folder, dtype=torch.float16)
    oracle_unet, oracle_vae = oracle_models(sgm_state, geometry)

    assert {p.dtype for p in unet.parameters()} == {torch.float16}
    assert {p.dtype for p in vae.parameters()} == {torch.float32}
    oracle_half = oracle_unet.state_dict()
    assert all(torch.equal(v, oracle_half[k].half()) for k, v in unet.state_dict().items())
    assert torch.equal(vae_output(vae, geometry), vae_output(oracle_vae, geometry))


def broken(state: dict, kind: str) -> tuple[dict, str]:
    """A copy of an sgm state dict with one defect, and the key the error must name."""
    state = dict(state)
    key = UNET_PREFIX + "middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    if kind == "mis-shaped":
        state[key] = torch.zeros(7, 7)
    elif kind == "missing":
        del state[key]
    elif kind == "extra-unet-key":
        key = UNET_PREFIX + "middle_block.3.0.weight"
        state[key] = torch.zeros(2)
    elif kind == "unexpected-prefix":
        key = "cond_stage_model.transformer.weight"
        state[key] = torch.zeros(2)
    return state, key


@pytest.mark.parametrize("kind", ["mis-shaped", "missing", "extra-unet-key", "unexpected-prefix"])
def test_import_errors_name_key_and_file(tmp_path, kind):
    geometry = UnclipGeometry.tiny()
    state, key = broken(sgm_checkpoint_state(geometry), kind)
    checkpoint = lightning_checkpoint(state, tmp_path / "unclip.ckpt")

    with pytest.raises(CheckpointError) as caught:
        import_unclip(checkpoint, tmp_path / "unclip", geometry=geometry)
    assert key in str(caught.value) and str(checkpoint) in str(caught.value)
    assert not (tmp_path / "unclip").exists()


def test_import_with_the_wrong_geometry_lists_all_differences(tmp_path):
    checkpoint = lightning_checkpoint(sgm_checkpoint_state(UnclipGeometry.tiny()), tmp_path / "unclip.ckpt")
    wider_context = dataclasses.replace(UnclipGeometry.tiny(), context_dim=32)
    with pytest.raises(CheckpointError, match=r"8 mis-shaped key\(s\)") as caught:
        import_unclip(checkpoint, tmp_path / "unclip", geometry=wider_context)
    assert "attn2.to_k.weight: expected (64, 32), found (64, 24)" in str(caught.value)


def test_missing_folder_names_manifest_and_command(tmp_path):
    with pytest.raises(ComponentMissingError) as caught:
        load_unclip(tmp_path / "nowhere")
    message = str(caught.value)
    assert str(tmp_path / "nowhere" / "unclip.json") in message
    assert "rtdecode model import-unclip" in message and "[models] unclip_dir" in message


def test_missing_weights_and_wrong_format_are_reported(tmp_path):
    folder = write_random_unclip(tmp_path / "unclip")
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ComponentMissingError, match=r"vae/diffusion_pytorch_model\.safetensors"):
        load_unclip(folder)

    manifest = json.loads((folder / "unclip.json").read_text())
    (folder / "unclip.json").write_text(json.dumps(manifest | {"format": "something-else"}))
    with pytest.raises(GenerateError, match="something-else"):
        load_unclip(folder)


def test_random_folder_loads_and_is_replaced_not_mixed(tmp_path):
    folder = write_random_unclip(tmp_path / "unclip", seed=1)
    first, _, geometry = load_unclip(folder)
    write_random_unclip(folder, seed=2)
    second, _, _ = load_unclip(folder)

    assert geometry == UnclipGeometry.tiny()
    assert json.loads((folder / "unclip.json").read_text())["provenance"]["source"] == "random"
    assert not torch.equal(first.conv_in.weight, second.conv_in.weight)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(GenerateError, match="not empty"):
        write_random_unclip(tmp_path / "other")
