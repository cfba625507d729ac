"""The GIT captioner fed with vision features (spec §2.4, §5.1 step 4), on a tiny random git-large-coco-layout folder.

The oracle for the bypass is GIT's own image path: an unmodified ``GitForCausalLM`` loaded from the same folder,
captioning an image, must give the same token ids and first-step logits as our captioner fed the features that
model's image encoder computes for that image.
"""

import shutil
from pathlib import Path

import pytest
import torch
from transformers import GitForCausalLM

from rtdecode.errors import CheckpointError, ComponentMissingError, GenerateError
from rtdecode.generate.caption import (
    GIT_LARGE_COCO,
    Captioner,
    captioner_config,
    captioner_vocabulary,
    feature_fed_git_class,
    write_random_captioner,
)

N_TOKENS = 17  # tiny: (16 px / 4 px)^2 + 1
FEATURE_DIM = 16
IMAGE_SIZE_PX = 16


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_random_captioner(tmp_path_factory.mktemp("captioner") / "git", feature_dim=FEATURE_DIM, n_layers=2)


@pytest.fixture(scope="module")
def captioner(folder) -> Captioner:
    return Captioner.from_folder(folder)


@pytest.fixture(scope="module")
def original(folder) -> GitForCausalLM:
    """The unmodified model, image encoder included: GIT's own path."""
    return GitForCausalLM.from_pretrained(folder, local_files_only=True).eval()


def random_images(n_images: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n_images, 3, IMAGE_SIZE_PX, IMAGE_SIZE_PX, generator=torch.Generator().manual_seed(seed))


def random_features(n_images: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n_images, N_TOKENS, FEATURE_DIM, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def image_features(original: GitForCausalLM, images: torch.Tensor) -> torch.Tensor:
    return original.git.image_encoder(images).last_hidden_state


def test_feeding_features_equals_gits_own_image_path(captioner, original):
    images = random_images(4)
    features = image_features(original, images)
    assert features.shape == (4, captioner.n_feature_tokens, captioner.feature_dim)

    expected_ids = original.generate(pixel_values=images, max_length=20)
    ids = captioner.caption_ids(features, max_length=20)
    assert torch.equal(ids, expected_ids)
    assert len({tuple(row) for row in ids.tolist()}) == 4  # the captions depend on the image: not a vacuous match

    bos_ids = torch.full((4, 1), original.generation_config.bos_token_id)
    with torch.no_grad():
        expected_logits = original(input_ids=bos_ids, pixel_values=images).logits[:, -1]
    torch.testing.assert_close(captioner.first_token_logits(features), expected_logits, rtol=0, atol=1e-6)

    expected_text = captioner.tokenizer.batch_decode(expected_ids, skip_special_tokens=True)
    assert captioner.caption(features) == [text.strip() for text in expected_text]


def test_captions_are_greedy_decoding_counting_cls_in_max_length(captioner):
    """A plain greedy loop without cache, [CLS] first, ``max_length`` tokens in all, [PAD] after [SEP]."""
    features = random_features(3, seed=1)
    config = captioner.model.generation_config
    ids = torch.full((3, 1), config.bos_token_id)
    done = torch.zeros(3, dtype=torch.bool)
    with torch.no_grad():
        while ids.shape[1] < 12 and not done.all():
            logits = captioner.model(input_ids=ids, pixel_values=features.unsqueeze(1), use_cache=False).logits
            next_ids = torch.where(done, config.pad_token_id, logits[:, -1].argmax(-1))
            ids = torch.cat([ids, next_ids[:, None]], dim=1)
            done |= next_ids == config.eos_token_id
    assert torch.equal(captioner.caption_ids(features, max_length=12), ids)


def test_captions_are_deterministic_and_respect_max_length(captioner):
    features = random_features(2, seed=2)
    first, second = captioner.caption(features), captioner.caption(features)
    assert first == second
    assert all(isinstance(text, str) and text == text.strip() and text for text in first)
    assert not any(token in text for text in first for token in ("[CLS]", "[SEP]", "[PAD]"))
    for max_length in (2, 3, 20):
        ids = captioner.caption_ids(features, max_length=max_length)
        assert ids.shape[1] <= max_length
        assert (ids[:, 0] == captioner.model.generation_config.bos_token_id).all()
    shortest = captioner.caption(features, max_length=2)  # one generated word piece
    assert all(len(captioner.tokenizer.tokenize(text)) <= 1 for text in shortest)


def test_features_are_cast_to_the_model_dtype(captioner):
    features = random_features(2, seed=3)
    assert captioner.caption(features.double()) == captioner.caption(features)


def test_image_encoder_weights_are_not_held(captioner, original):
    n_params = sum(parameter.numel() for parameter in captioner.model.parameters())
    n_vit_params = sum(parameter.numel() for parameter in original.git.image_encoder.parameters())
    assert n_vit_params > 0
    assert n_params == sum(parameter.numel() for parameter in original.parameters()) - n_vit_params
    assert not [key for key in captioner.model.state_dict() if "image_encoder" in key]


def test_real_geometry_drops_the_vit_l_and_takes_257_by_1024_features():
    config = captioner_config("large")
    with torch.device("meta"):
        full = GitForCausalLM(config)
        fed = feature_fed_git_class()(config)
    n_full = sum(parameter.numel() for parameter in full.parameters())
    n_fed = sum(parameter.numel() for parameter in fed.parameters())
    assert (n_full, n_fed) == (394_196_026, 91_016_250)  # git-large-coco: ~394M, of which ~303M are the ViT-L/14
    assert (fed.git.image_encoder.n_tokens, fed.git.image_encoder.feature_dim) == (257, 1024)
    vocabulary = captioner_vocabulary("large")
    assert len(vocabulary) == config.vocab_size == len(set(vocabulary))
    ids = {token: vocabulary.index(token) for token in ("[PAD]", "[CLS]", "[SEP]")}
    assert ids == {"[PAD]": config.pad_token_id, "[CLS]": config.bos_token_id, "[SEP]": config.eos_token_id}


@pytest.mark.parametrize(
    ("features", "shape_text"),
    [
        (torch.zeros(N_TOKENS, FEATURE_DIM), f"({N_TOKENS}, {FEATURE_DIM})"),
        (torch.zeros(1, N_TOKENS - 1, FEATURE_DIM), f"(1, {N_TOKENS - 1}, {FEATURE_DIM})"),
        (torch.zeros(1, N_TOKENS, FEATURE_DIM + 2), f"(1, {N_TOKENS}, {FEATURE_DIM + 2})"),
        (torch.zeros(0, N_TOKENS, FEATURE_DIM), f"(0, {N_TOKENS}, {FEATURE_DIM})"),
        (torch.zeros(1, 1, N_TOKENS, FEATURE_DIM), f"(1, 1, {N_TOKENS}, {FEATURE_DIM})"),
        (torch.zeros(1, N_TOKENS, FEATURE_DIM).index_fill_(1, torch.tensor([3]), float("nan")), "NaN"),
        (torch.zeros(1, N_TOKENS, FEATURE_DIM).index_fill_(2, torch.tensor([0]), float("inf")), "inf"),
        (torch.zeros(1, N_TOKENS, FEATURE_DIM, dtype=torch.int64), "torch.int64"),
        (torch.zeros(1, N_TOKENS, FEATURE_DIM).numpy(), "ndarray"),
    ],
)
def test_bad_features_are_refused(captioner, features, shape_text):
    for call in (captioner.caption, captioner.caption_ids, captioner.first_token_logits):
        with pytest.raises(GenerateError, match="features") as error:
            call(features)
        assert shape_text in str(error.value)


@pytest.mark.parametrize("max_length", [0, 1, 65, 2.5, True])
def test_bad_max_length_is_refused(captioner, max_length):
    with pytest.raises(GenerateError, match=r"max_length must be an int in \[2, 64\]"):
        captioner.caption(random_features(1), max_length=max_length)


def test_the_feature_input_refuses_images(captioner):
    with pytest.raises(GenerateError, match=r"images are not accepted") as error:
        captioner.model.generate(pixel_values=random_images(1), max_length=5)
    assert f"(1, 3, {IMAGE_SIZE_PX}, {IMAGE_SIZE_PX})" in str(error.value)


@pytest.mark.parametrize(
    ("removed", "named"),
    [
        (None, "folder"),
        ("config.json", "config.json"),
        ("model.safetensors", "model.safetensors"),
        ("tokenizer.json", "tokenizer.json"),
    ],
)
def test_missing_component_names_the_file_and_how_to_make_it(folder, tmp_path, removed, named):
    copy = tmp_path / "git"
    if removed is not None:
        shutil.copytree(folder, copy)
        (copy / removed).unlink()
    with pytest.raises(ComponentMissingError) as error:
        Captioner.from_folder(copy)
    message = str(error.value)
    assert str(copy / named) in message if removed else f"folder {copy}" in message
    assert GIT_LARGE_COCO in message and "save_pretrained" in message and "caption_dir" in message
    assert isinstance(error.value, FileNotFoundError)


def test_a_missing_text_weight_is_a_checkpoint_error(folder, tmp_path):
    from safetensors.torch import load_file, save_file

    copy = shutil.copytree(folder, tmp_path / "git")
    state = load_file(copy / "model.safetensors")
    del state["git.visual_projection.visual_projection.0.weight"]
    save_file(state, copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing: git\.visual_projection\.visual_projection\.0\.weight"):
        Captioner.from_folder(copy)


def test_a_tokenizer_of_another_model_is_refused(folder, tmp_path):
    from transformers import BertTokenizer

    copy = shutil.copytree(folder, tmp_path / "git")
    vocabulary = captioner_vocabulary("tiny")
    shuffled = [*vocabulary[5:7], *vocabulary[:5], *vocabulary[7:]]  # [CLS]/[SEP] no longer at bos/eos ids
    BertTokenizer(vocab={token: token_id for token_id, token in enumerate(shuffled)}).save_pretrained(copy)
    with pytest.raises(CheckpointError, match=r"\[CLS\] 4 != bos 2"):
        Captioner.from_folder(copy)


def test_random_captioner_is_seeded_and_leaves_the_global_rng_alone(tmp_path):
    from safetensors.torch import load_file

    state_before = torch.random.get_rng_state()
    paths = [write_random_captioner(tmp_path / name, seed=seed) for name, seed in (("a", 0), ("b", 0), ("c", 1))]
    assert torch.equal(torch.random.get_rng_state(), state_before)
    weights = [load_file(path / "model.safetensors") for path in paths]
    key = "git.visual_projection.visual_projection.0.weight"
    assert torch.equal(weights[0][key], weights[1][key]) and not torch.equal(weights[0][key], weights[2][key])
    assert any(key.startswith("git.image_encoder.") for key in weights[0])  # the layout of git-large-coco
    with pytest.raises(GenerateError, match="tiny captioner only"):
        captioner_config("large", feature_dim=16)
