"""The metrics' feature networks (spec §6): weights only from local files, clear errors naming each missing file and
its metrics, the real load path (random torchvision / tiny open_clip models saved to files) giving the features the
in-memory model gives at each node, and the spec's preprocessing seen at each network's first layer."""

import warnings

import pytest
import torch
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor

from rtdecode.errors import CheckpointError, ConfigError
from rtdecode.evaluate import features
from rtdecode.evaluate.metrics import METRICS

N_IMAGES = 3
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # spec §6 preprocessing, written out independently
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
SPEC_PREPROCESSING = {  # network: (resize to, (mean, std))
    "alexnet": (256, IMAGENET),
    "inception_v3": (342, IMAGENET),
    "clip_vit_l14": (224, CLIP),
    "efficientnet_b1": (255, IMAGENET),
    "swav_resnet50": (224, IMAGENET),
}
TINY_CLIP = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "patch_size": 32, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}
FIRST_LAYERS = {
    "alexnet": "features.0",
    "inception_v3": "Conv2d_1a_3x3.conv",
    "efficientnet_b1": "features.0.0",
    "swav_resnet50": "conv1",
    "clip_vit_l14": "visual.conv1",
}
SHAPES_64PX = {  # (alexnet: 64 px images resized to 256, conv1 stride 4 -> 63, maxpool -> 31, maxpool -> 15)
    ("alexnet", "features.4"): (192, 31, 31),
    ("alexnet", "features.11"): (256, 15, 15),
    ("inception_v3", "avgpool"): (2048, 1, 1),
    ("efficientnet_b1", "avgpool"): (1280, 1, 1),
    ("swav_resnet50", "avgpool"): (2048, 1, 1),
    ("clip_vit_l14", "encode_image"): (16,),
}


def random_models() -> dict[str, torch.nn.Module]:
    """The architectures with seeded random weights, built here independently of the code under test."""
    import open_clip

    builders = {
        "alexnet": lambda: torchvision.models.alexnet(weights=None),
        "inception_v3": lambda: torchvision.models.inception_v3(
            weights=None, aux_logits=True, init_weights=False, transform_input=True
        ),
        "efficientnet_b1": lambda: torchvision.models.efficientnet_b1(weights=None),
        "swav_resnet50": lambda: torchvision.models.resnet50(weights=None),
        "clip_vit_l14": lambda: open_clip.CLIP(**TINY_CLIP),
    }
    models = {}
    for seed, (name, build) in enumerate(builders.items()):
        torch.manual_seed(seed)
        models[name] = build().eval()
    return models


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A weights folder with every network's random state dict, and the in-memory models they came from."""
    weights_dir = tmp_path_factory.mktemp("weights")
    models = random_models()
    for name, model in models.items():
        torch.save(model.state_dict(), weights_dir / features.FEATURE_NETWORKS[name].weights_file)
    return weights_dir, models


@pytest.fixture(scope="module")
def loaded(saved):
    """Every network through the real load path."""
    weights_dir, _ = saved
    clip = {"clip_vit_l14": {"clip_config": TINY_CLIP}}
    return {name: features.load_network(name, weights_dir, "cpu", **clip.get(name, {})) for name in FIRST_LAYERS}


def images(n_images: int = N_IMAGES, size_px: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(n_images, 3, size_px, size_px, generator=torch.Generator().manual_seed(seed))


def reference_features(name: str, model, node: str, batch: torch.Tensor) -> torch.Tensor:
    """The spec's preprocessing with torchvision's own transforms, and the node read by torchvision's fx extractor."""
    size_px, (mean, std) = SPEC_PREPROCESSING[name]
    transform = torchvision.transforms.Compose(
        [torchvision.transforms.Resize(size_px), torchvision.transforms.Normalize(mean, std)]
    )
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fx tracing notes that eval-mode nodes are a subset of train-mode ones
        inputs = transform(batch)
        if name == "clip_vit_l14":
            return model.encode_image(inputs)
        return create_feature_extractor(model, return_nodes={node: "out"})(inputs)["out"]


def assert_same_features(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float error relative to the features' own scale (random deep nets can have tiny activations)."""
    scale = expected.abs().max()
    assert scale > 0 and not torch.allclose(expected[0], expected[1], rtol=1e-3, atol=1e-3 * scale)  # informative
    torch.testing.assert_close(got / scale, expected / scale, rtol=1e-4, atol=1e-5)


def first_layer_inputs(name: str, module, batch: torch.Tensor) -> torch.Tensor:
    seen = []
    layer = module.get_submodule(FIRST_LAYERS[name])
    handle = layer.register_forward_pre_hook(lambda _module, args: seen.append(args[0].clone()))
    try:
        features.extract(name, module, batch)
    finally:
        handle.remove()
    return torch.cat(seen)


def test_missing_weights_error_names_every_file_and_the_metrics_needing_it(tmp_path):
    with pytest.raises(ConfigError) as caught:
        features.check_weights(tmp_path, ["pixcorr", "alexnet2", "swav", "alexnet5", "clip"])
    message = str(caught.value)
    assert "alexnet.pth (needed by alexnet2, alexnet5;" in message
    assert "swav_resnet50.pth (needed by swav;" in message
    assert "clip_vit_l14.pt (needed by clip;" in message
    assert "inception_v3.pth" not in message and "efficientnet_b1.pth" not in message
    assert str(tmp_path) in message


def test_missing_folder_and_missing_folder_argument_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="no such folder.*efficientnet_b1.pth \\(needed by effnet"):
        features.check_weights(tmp_path / "absent", ["effnet"])
    with pytest.raises(ConfigError, match="no weights folder"):
        features.check_weights(None, ["inception"])
    with pytest.raises(ConfigError, match="inception_v3.pth \\(needed by inception"):
        features.load_network("inception_v3", tmp_path, "cpu")


def test_check_weights_returns_the_files_and_needs_none_for_low_level_metrics(tmp_path):
    (tmp_path / "alexnet.pth").write_bytes(b"")
    (tmp_path / "swav_resnet50.pth").write_bytes(b"")
    assert features.check_weights(None, ["pixcorr", "ssim"]) == {}
    assert features.check_weights(tmp_path, ["alexnet5", "swav"]) == {
        "alexnet": tmp_path / "alexnet.pth",
        "swav_resnet50": tmp_path / "swav_resnet50.pth",
    }
    with pytest.raises(ConfigError, match="metric 'alexnet3' is unknown"):
        features.check_weights(tmp_path, ["alexnet3"])


def test_network_table_matches_the_metric_table():
    served = {metric: network.name for network in features.FEATURE_NETWORKS.values() for metric in network.metric_names}
    assert served == {spec.name: spec.network for spec in METRICS if spec.network is not None}
    alexnet = features.FEATURE_NETWORKS["alexnet"]
    assert (alexnet.node_for("alexnet2"), alexnet.node_for("alexnet5")) == ("features.4", "features.11")


@pytest.mark.parametrize(("name", "node"), list(SHAPES_64PX))
def test_loaded_network_gives_the_in_memory_models_features_at_its_node(saved, loaded, name, node):
    _, models = saved
    batch = images()
    got = features.extract(name, loaded[name], batch, batch_size=2, node=node)
    assert got.dtype == torch.float32 and tuple(got.shape) == (N_IMAGES, *SHAPES_64PX[(name, node)])
    assert_same_features(got, reference_features(name, models[name], node, batch))


@pytest.mark.parametrize("name", list(FIRST_LAYERS))
def test_first_layer_sees_images_resized_to_the_networks_size(loaded, name):
    size_px = SPEC_PREPROCESSING[name][0]
    seen = first_layer_inputs(name, loaded[name], images(n_images=2))
    assert tuple(seen.shape) == (2, 3, size_px, size_px)


@pytest.mark.parametrize("name", ["alexnet", "clip_vit_l14"])
def test_first_layer_sees_antialiased_resized_images_normalised_with_the_networks_statistics(loaded, name):
    size_px, (mean, std) = SPEC_PREPROCESSING[name]
    batch = images(n_images=2, size_px=320)  # downscaled: antialiasing matters
    seen = first_layer_inputs(name, loaded[name], batch)
    resized = torch.nn.functional.interpolate(batch, size=(size_px, size_px), mode="bilinear", antialias=True)
    expected = (resized - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(seen, expected)


def test_identical_images_give_identical_features_in_any_batch(loaded):
    one = images(n_images=1)
    batch = torch.cat([one, images(n_images=1, seed=5), one])
    together = features.extract("swav_resnet50", loaded["swav_resnet50"], batch, batch_size=3)
    apart = features.extract("swav_resnet50", loaded["swav_resnet50"], batch, batch_size=1)
    assert torch.equal(together[0], together[2])
    assert not torch.equal(together[0], together[1])
    torch.testing.assert_close(together, apart)


def test_swav_checkpoint_with_module_prefix_and_no_fc_loads(saved, tmp_path):
    _, models = saved
    resnet = models["swav_resnet50"]
    state = {f"module.{key}": value for key, value in resnet.state_dict().items() if not key.startswith("fc.")}
    state["module.projection_head.0.weight"] = torch.zeros(8, 2048)  # SwAV's extra heads are ignored
    state["module.prototypes.weight"] = torch.zeros(4, 8)
    torch.save(state, tmp_path / "swav_resnet50.pth")
    module = features.load_network("swav_resnet50", tmp_path, "cpu")
    batch = images(n_images=2)
    got = features.extract("swav_resnet50", module, batch)
    assert_same_features(got, reference_features("swav_resnet50", resnet, "avgpool", batch))


def test_swav_checkpoint_missing_trunk_weights_is_a_checkpoint_error(saved, tmp_path):
    _, models = saved
    state = {key: value for key, value in models["swav_resnet50"].state_dict().items() if key != "layer4.2.bn3.weight"}
    torch.save(state, tmp_path / "swav_resnet50.pth")
    with pytest.raises(CheckpointError, match="swav_resnet50.pth lacks 1 ResNet-50 weights.*layer4.2.bn3.weight"):
        features.load_network("swav_resnet50", tmp_path, "cpu")


def test_weights_of_another_network_are_a_checkpoint_error_naming_the_file(saved, tmp_path):
    _, models = saved
    torch.save(models["alexnet"].state_dict(), tmp_path / "efficientnet_b1.pth")
    with pytest.raises(CheckpointError, match="efficientnet_b1.pth does not fit EfficientNet"):
        features.load_network("efficientnet_b1", tmp_path, "cpu")
    (tmp_path / "inception_v3.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="inception_v3.pth cannot be read"):
        features.load_network("inception_v3", tmp_path, "cpu")


def test_clip_loads_from_a_torchscript_archive_like_openais_file(saved, tmp_path):
    _, models = saved
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated; OpenAI's file is TorchScript all the same
        torch.jit.script(models["clip_vit_l14"]).save(str(tmp_path / "clip_vit_l14.pt"))
        module = features.load_network("clip_vit_l14", tmp_path, "cpu", clip_config=TINY_CLIP)
    batch = images(n_images=2)
    got = features.extract("clip_vit_l14", module, batch)
    assert_same_features(got, reference_features("clip_vit_l14", models["clip_vit_l14"], "", batch))


def test_loaded_network_is_frozen_in_eval_mode(loaded):
    module = loaded["efficientnet_b1"]
    assert not module.training
    assert not any(parameter.requires_grad for parameter in module.parameters())


def test_bad_arguments_are_config_errors(loaded, saved):
    weights_dir, _ = saved
    alexnet = loaded["alexnet"]
    with pytest.raises(ConfigError, match="must lie in \\[0, 1\\]"):
        features.extract("alexnet", alexnet, images(n_images=1) * 2)
    with pytest.raises(ConfigError, match="\\(N >= 1, 3, H, W\\)"):
        features.extract("alexnet", alexnet, images(n_images=1)[:, :1])
    with pytest.raises(ConfigError, match="batch_size"):
        features.extract("alexnet", alexnet, images(n_images=1), batch_size=0)
    with pytest.raises(ConfigError, match="node 'features.99'"):
        features.extract("alexnet", alexnet, images(n_images=1), node="features.99")
    with pytest.raises(ConfigError, match="feature network 'vgg' is unknown"):
        features.load_network("vgg", weights_dir, "cpu")
    with pytest.raises(ConfigError, match="clip_config applies to clip_vit_l14 only"):
        features.load_network("alexnet", weights_dir, "cpu", clip_config=TINY_CLIP)


def test_default_clip_architecture_is_openais_vit_l14(saved):
    """Without clip_config the file must hold OpenAI's ViT-L/14 (1024 wide, 14 px patches): a tiny one does not fit;
    the architecture is open_clip's ViT-L-14 with OpenAI's QuickGELU."""
    import open_clip

    weights_dir, _ = saved
    assert open_clip.get_model_config(features.CLIP_ARCHITECTURE) == open_clip.get_model_config("ViT-L-14") | {
        "quick_gelu": True
    }
    with pytest.raises(CheckpointError, match=r"(?s)clip_vit_l14.pt does not fit CLIP.*\[1024, 3, 14, 14\]"):
        features.load_network("clip_vit_l14", weights_dir, "cpu")
