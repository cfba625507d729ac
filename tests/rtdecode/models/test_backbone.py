"""Ridge, BrainNetwork and the bigG->L converter: published sizes and key layout (spec §1.3, §2.1), the
dead-weight quirk of ``mixer_blocks1`` (spec §1.2), shapes and input checks at tiny size."""

import dataclasses
import re

import pytest
import torch

from rtdecode.errors import ModelError
from rtdecode.models.backbone import BrainNetwork, BrainOutputs
from rtdecode.models.config import NSD_VOXELS, BackboneConfig, ConverterConfig, light, paper, tiny
from rtdecode.models.converter import CLIPConverter
from rtdecode.models.ridge import RidgeRegression

MULTI_SUBJECT_VOXELS = [count for subject, count in NSD_VOXELS.items() if subject != "subj01"]
BATCH = 3


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def on_meta(build):
    with torch.device("meta"):
        return build()


def randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter drawn N(0, 0.5^2), so LayerNorm biases (zero at init) matter too."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * 0.5)
    return module


def tiny_backbone(seed: int = 0, **changes) -> BrainNetwork:
    config = dataclasses.replace(tiny().backbone, **changes)
    torch.manual_seed(seed)
    return randomise(BrainNetwork(config), seed)


def tiny_input(config: BackboneConfig, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, config.seq_len, config.hidden_dim, generator=generator)


# --- parameter counts at real size (spec §1.3) -------------------------------------------------------------------


def test_ridge_parameter_counts_match_the_published_models():
    assert n_params(on_meta(lambda: RidgeRegression([15724], 4096))) == 64_409_600
    assert n_params(on_meta(lambda: RidgeRegression(MULTI_SUBJECT_VOXELS, 4096))) == 412_377_088
    assert n_params(on_meta(lambda: RidgeRegression(MULTI_SUBJECT_VOXELS, 1024))) == 103_094_272


def test_paper_backbone_parameter_count_and_breakdown():
    backbone = on_meta(lambda: BrainNetwork(paper().backbone))
    parts = {name: n_params(child) for name, child in backbone.named_children()}
    assert parts == {
        "mixer_blocks1": 134_283_264,
        "mixer_blocks2": 24,
        "backbone_linear": 1_745_256_448,
        "clip_proj": 8_321_664,
        "blin1": 12_848_192,
        "bdropout": 0,
        "bnorm": 128,
        "bupsampler": 1_750_692,
        "b_maps_projector": 559_616,
    }
    assert n_params(backbone) == 1_903_020_028


def test_light_backbone_parameter_count():
    assert n_params(on_meta(lambda: BrainNetwork(light().backbone))) == 453_360_280


# --- state-dict layout at real size (spec §2.1) ----------------------------------------------------------------


def expected_core_shapes(hidden: int) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the mixer blocks, backbone_linear and clip_proj, written from spec §2.1."""
    shapes: dict[str, tuple[int, ...]] = {}
    for k in range(4):
        for suffix in ("weight", "bias"):
            shapes[f"mixer_blocks1.{k}.0.{suffix}"] = (hidden,)
            shapes[f"mixer_blocks2.{k}.0.{suffix}"] = (1,)
        for index in (0, 3):
            shapes[f"mixer_blocks1.{k}.1.{index}.weight"] = (hidden, hidden)
            shapes[f"mixer_blocks1.{k}.1.{index}.bias"] = (hidden,)
            shapes[f"mixer_blocks2.{k}.1.{index}.weight"] = (1, 1)
            shapes[f"mixer_blocks2.{k}.1.{index}.bias"] = (1,)
    shapes["backbone_linear.weight"] = (425984, hidden)
    shapes["backbone_linear.bias"] = (425984,)
    for index in (0, 3, 6):
        shapes[f"clip_proj.{index}.weight"] = (1664,)
        shapes[f"clip_proj.{index}.bias"] = (1664,)
    for index in (2, 5, 8):
        shapes[f"clip_proj.{index}.weight"] = (1664, 1664)
        shapes[f"clip_proj.{index}.bias"] = (1664,)
    return shapes


def expected_low_level_shapes(hidden: int) -> dict[str, tuple[int, ...]]:
    """blin1, bnorm and b_maps_projector keys (spec §2.1); the decoder is checked separately."""
    return {
        "blin1.weight": (3136, hidden),
        "blin1.bias": (3136,),
        "bnorm.weight": (64,),
        "bnorm.bias": (64,),
        "b_maps_projector.0.weight": (512, 64, 1, 1),
        "b_maps_projector.1.weight": (512,),
        "b_maps_projector.1.bias": (512,),
        "b_maps_projector.3.weight": (512, 512, 1, 1),
        "b_maps_projector.4.weight": (512,),
        "b_maps_projector.4.bias": (512,),
        "b_maps_projector.6.weight": (512, 512, 1, 1),
        "b_maps_projector.6.bias": (512,),
    }


# diffusers 0.23 Decoder submodules named in spec §2.1; every bupsampler key lies under exactly one of these.
DECODER_MODULES = [
    "conv_in",
    "mid_block.attentions.0.group_norm",
    "mid_block.attentions.0.to_q",
    "mid_block.attentions.0.to_k",
    "mid_block.attentions.0.to_v",
    "mid_block.attentions.0.to_out.0",
    "mid_block.resnets.0",
    "mid_block.resnets.1",
    *[f"up_blocks.{block}.resnets.{layer}" for block in range(3) for layer in range(2)],
    "up_blocks.0.upsamplers.0.conv",
    "up_blocks.1.upsamplers.0.conv",
    "conv_norm_out",
    "conv_out",
]
RESNET_KEY = re.compile(r"(norm1|conv1|norm2|conv2|conv_shortcut)\.(weight|bias)")


def shapes_of(module: torch.nn.Module, prefix: str = "") -> dict[str, tuple[int, ...]]:
    return {key[len(prefix) :]: tuple(v.shape) for key, v in module.state_dict().items() if key.startswith(prefix)}


def test_paper_backbone_keys_and_shapes_follow_the_published_layout():
    backbone = on_meta(lambda: BrainNetwork(paper().backbone))
    shapes = shapes_of(backbone)
    decoder = {key: shape for key, shape in shapes.items() if key.startswith("bupsampler.")}
    rest = {key: shape for key, shape in shapes.items() if key not in decoder}
    assert rest == {**expected_core_shapes(4096), **expected_low_level_shapes(4096)}
    assert decoder["bupsampler.conv_in.weight"] == (128, 64, 3, 3)
    assert decoder["bupsampler.conv_out.weight"] == (4, 32, 3, 3)
    for name in ("to_q", "to_k", "to_v", "to_out.0"):
        assert decoder[f"bupsampler.mid_block.attentions.0.{name}.weight"] == (128, 128)


def test_decoder_keys_use_the_diffusers_0_23_names():
    decoder = shapes_of(on_meta(lambda: BrainNetwork(paper().backbone)).bupsampler)
    owners = {module: [] for module in DECODER_MODULES}
    for key in decoder:
        matches = [module for module in DECODER_MODULES if key.startswith(module + ".")]
        assert len(matches) == 1, f"{key} is not under exactly one diffusers-0.23 module"
        owners[matches[0]].append(key[len(matches[0]) + 1 :])
    for module, leaves in owners.items():
        if ".resnets." in module:
            assert {"norm1.weight", "conv1.weight", "norm2.weight", "conv2.weight"} <= set(leaves), module
            assert all(RESNET_KEY.fullmatch(leaf) for leaf in leaves), (module, leaves)
        else:
            assert sorted(leaves) == ["bias", "weight"], (module, leaves)


def test_light_backbone_has_no_low_level_keys():
    shapes = shapes_of(on_meta(lambda: BrainNetwork(light().backbone)))
    assert shapes == expected_core_shapes(1024)


def test_ridge_keys_and_shapes():
    ridge = on_meta(lambda: RidgeRegression(MULTI_SUBJECT_VOXELS, 4096))
    expected = {}
    for index, count in enumerate(MULTI_SUBJECT_VOXELS):
        expected[f"linears.{index}.weight"] = (4096, count)
        expected[f"linears.{index}.bias"] = (4096,)
    assert shapes_of(ridge) == expected


def test_converter_keys_match_the_published_file():
    converter = on_meta(lambda: CLIPConverter(ConverterConfig()))
    assert shapes_of(converter) == {
        "linear1.weight": (257, 256),
        "linear1.bias": (257,),
        "linear2.weight": (1024, 1664),
        "linear2.bias": (1024,),
    }


def test_published_style_state_dict_loads_strictly():
    """A state dict built key by key from the spec loads with strict=True (the layout a checkpoint has)."""
    config = BackboneConfig(hidden_dim=8, clip_tokens=2, clip_dim=1664, low_level=None)
    backbone = BrainNetwork(config)
    shapes = expected_core_shapes(8)
    shapes["backbone_linear.weight"] = (2 * 1664, 8)
    shapes["backbone_linear.bias"] = (2 * 1664,)
    state = {key: torch.full(shape, 0.25) for key, shape in shapes.items()}
    backbone.load_state_dict(state, strict=True)
    assert torch.equal(backbone.clip_proj[8].weight, torch.full((1664, 1664), 0.25))


# --- the dead-weight quirk (spec §1.2 [VERIFIED]) --------------------------------------------------------------


def all_outputs_equal(first: BrainOutputs, second: BrainOutputs) -> bool:
    return all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def perturbed_outputs(backbone: BrainNetwork, x: torch.Tensor, part: torch.nn.Module) -> BrainOutputs:
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in part.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 3.0)
        return backbone(x)


def test_mixer_blocks1_never_reaches_the_output_and_mixer_blocks2_does():
    backbone = tiny_backbone().eval()
    x = tiny_input(backbone.config)
    with torch.no_grad():
        reference = backbone(x)
    assert all_outputs_equal(perturbed_outputs(backbone, x, backbone.mixer_blocks1), reference)
    changed = perturbed_outputs(backbone, x, backbone.mixer_blocks2)
    assert all(not torch.equal(a, b) for a, b in zip(changed, reference, strict=True))


def test_mixer_blocks1_gradient_is_only_rounding_noise():
    """Zero in exact arithmetic; torch's LayerNorm backward over one element leaves rounding noise (float64:
    about 1e-16 of the mixer_blocks2 gradient, float32: not exactly 0 either, unlike the forward)."""
    backbone = tiny_backbone().double().train()
    outputs = backbone(tiny_input(backbone.config).double())
    sum(output.square().sum() for output in outputs).backward()
    dead = max(p.grad.abs().max() for p in backbone.mixer_blocks1.parameters())
    live = max(p.grad.abs().max() for p in backbone.mixer_blocks2.parameters())
    assert live > 1.0
    assert dead < 1e-12 * live


def test_eval_backbone_is_linear_in_the_ridge_output_plus_collapsed_bias():
    torch.manual_seed(3)
    config = tiny()
    ridge = randomise(RidgeRegression(config.n_voxels, config.backbone.hidden_dim), 4).double()
    backbone = tiny_backbone(seed=5).double().eval()
    voxels = torch.randn(BATCH, 1, config.n_voxels[1], dtype=torch.float64)
    with torch.no_grad():
        outputs = backbone(ridge(voxels, 1))
        shifted = ridge(voxels, 1)[:, 0] + backbone.collapsed_bias()
        tokens = backbone.backbone_linear(shifted).reshape(BATCH, 6, 20)
        low = config.backbone.low_level
        maps = backbone.bnorm(backbone.blin1(shifted).reshape(BATCH, low.channels, low.grid, low.grid))
        latent = backbone.bupsampler(maps)
        features = backbone.b_maps_projector(maps).flatten(2).transpose(1, 2)
    assert backbone.collapsed_bias().abs() > 0.01  # the constant is not trivially zero
    torch.testing.assert_close(outputs.backbone, tokens, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(outputs.clip_voxels, backbone.clip_proj(tokens), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(outputs.low_level_latent, latent, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(outputs.low_level_features, features, rtol=1e-12, atol=1e-12)


def test_collapsed_bias_needs_seq_len_one():
    backbone = BrainNetwork(dataclasses.replace(tiny().backbone, seq_len=2))
    with pytest.raises(ModelError, match="seq_len"):
        backbone.collapsed_bias()


# --- shapes, modes, input checks at tiny size ------------------------------------------------------------------


@pytest.mark.parametrize("retrieval", [True, False])
@pytest.mark.parametrize("low_level", [True, False])
def test_output_shapes_for_each_head_combination(retrieval: bool, low_level: bool):
    config = tiny(low_level=low_level).backbone
    backbone = tiny_backbone(retrieval=retrieval, low_level=config.low_level).eval()
    with torch.no_grad():
        outputs = backbone(tiny_input(backbone.config))
    assert outputs.backbone.shape == (BATCH, 6, 20)
    assert (outputs.clip_voxels.shape if retrieval else outputs.clip_voxels) == ((BATCH, 6, 20) if retrieval else None)
    if low_level:
        assert outputs.low_level_latent.shape == (BATCH, 4, 6, 6)  # grid 3, two decoder blocks: 3 -> 6
        assert outputs.low_level_features.shape == (BATCH, 9, 12)
    else:
        assert outputs.low_level_latent is None and outputs.low_level_features is None
        with pytest.raises(ModelError, match="low_level"):
            backbone.low_level(backbone.mix(tiny_input(backbone.config)))
    if not retrieval:
        with pytest.raises(ModelError, match="retrieval"):
            backbone.retrieval(outputs.backbone)


def test_pieces_compose_to_forward():
    backbone = tiny_backbone().eval()
    x = tiny_input(backbone.config)
    with torch.no_grad():
        outputs = backbone(x)
        mixed = backbone.mix(x)
        tokens = backbone.tokens(mixed)
        latent, features = backbone.low_level(mixed)
        pieces = BrainOutputs(tokens, backbone.retrieval(tokens), latent, features)
    assert mixed.shape == (BATCH, 1, 24)
    assert all_outputs_equal(outputs, pieces)


def test_eval_is_deterministic_and_train_applies_dropout():
    backbone = tiny_backbone()
    x = tiny_input(backbone.config)
    with torch.no_grad():
        backbone.eval()
        assert all_outputs_equal(backbone(x), backbone(x))
        backbone.train()
        torch.manual_seed(11)
        first = backbone(x)
        torch.manual_seed(12)
        second = backbone(x)
    assert not torch.equal(first.backbone, second.backbone)  # mixer_blocks2 dropout
    assert not torch.equal(first.low_level_features, second.low_level_features)  # bdropout


@pytest.mark.parametrize("shape", [(BATCH, 24), (BATCH, 2, 24), (BATCH, 1, 23)])
def test_backbone_rejects_bad_input_shapes(shape):
    backbone = tiny_backbone()
    with pytest.raises(ModelError, match=r"\(B, 1, 24\)"):
        backbone(torch.zeros(shape))


def test_ridge_maps_each_subject_to_hidden():
    ridge = RidgeRegression((37, 29), 24)
    voxels = torch.randn(BATCH, 29)
    out = ridge(voxels, 1)
    assert out.shape == (BATCH, 1, 24)
    torch.testing.assert_close(out[:, 0], voxels @ ridge.linears[1].weight.T + ridge.linears[1].bias)
    assert torch.equal(ridge(voxels[:, None], 1), out)
    assert ridge(torch.randn(BATCH, 1, 37), 0).shape == (BATCH, 1, 24)


def test_ridge_rejects_wrong_voxel_count_naming_subject_and_count():
    ridge = RidgeRegression((37, 29), 24)
    with pytest.raises(ModelError, match=r"subject index 0 .*\(B, 37\)"):
        ridge(torch.zeros(BATCH, 29), 0)
    with pytest.raises(ModelError, match=r"subject index 1 .*29"):
        ridge(torch.zeros(BATCH, 2, 29), 1)


@pytest.mark.parametrize("index", [2, -1, True])
def test_ridge_rejects_unknown_subject_index(index):
    ridge = RidgeRegression((37, 29), 24)
    with pytest.raises(ModelError, match=r"subject_index .*\[0, 2\)"):
        ridge(torch.zeros(BATCH, 29), index)


def test_ridge_rejects_bad_sizes():
    with pytest.raises(ModelError, match="n_voxels"):
        RidgeRegression((), 24)
    with pytest.raises(ModelError, match=r"n_voxels\[1\]"):
        RidgeRegression((37, 0), 24)


# --- converter (spec §2.4) -------------------------------------------------------------------------------------

TINY_CONVERTER = ConverterConfig(in_tokens=6, out_tokens=7, in_dim=20, out_dim=9)


def test_converter_equals_explicit_einsum():
    torch.manual_seed(0)
    converter = randomise(CLIPConverter(TINY_CONVERTER), 1).double()
    x = torch.randn(BATCH, 6, 20, dtype=torch.float64)
    tokens = torch.einsum("btd,ot->bod", x, converter.linear1.weight) + converter.linear1.bias[None, :, None]
    expected = torch.einsum("bod,ed->boe", tokens, converter.linear2.weight) + converter.linear2.bias
    with torch.no_grad():
        out = converter(x)
    assert out.shape == (BATCH, 7, 9)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(BATCH, 20, 6), (BATCH, 6), (BATCH, 7, 20)])
def test_converter_rejects_bad_shapes_naming_the_expected_one(shape):
    with pytest.raises(ModelError, match=r"\(B, 6, 20\)"):
        CLIPConverter(TINY_CONVERTER)(torch.zeros(shape))
