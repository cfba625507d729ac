"""The MindEye2 container: the inference API on a tiny model."""

import numpy as np
import pytest
import torch

from rtdecode.errors import ModelError
from rtdecode.models.config import tiny
from rtdecode.models.mindeye2 import MindEye2


@pytest.fixture
def model():
    torch.manual_seed(0)
    return MindEye2(tiny()).eval()


def test_embed_gives_every_head_for_each_subject(model):
    config = model.config
    for subject, n_voxels in zip(config.subjects, config.n_voxels, strict=True):
        with torch.no_grad():
            out = model.embed(torch.randn(3, n_voxels), subject)
        tokens = (3, config.backbone.clip_tokens, config.backbone.clip_dim)
        low = config.backbone.low_level
        assert out.backbone.shape == tokens
        assert out.clip_voxels.shape == tokens
        assert out.low_level_latent.shape == (3, low.latent_channels, low.latent_size, low.latent_size)


def test_embed_takes_one_beta_as_numpy(model):
    beta = np.random.default_rng(0).standard_normal(model.config.n_voxels[1]).astype(np.float32)
    with torch.no_grad():
        single = model.embed(beta, "s2").backbone
        batched = model.embed(torch.from_numpy(beta)[None], "s2").backbone
    assert single.shape[0] == 1
    torch.testing.assert_close(single, batched)


def test_subjects_have_their_own_ridge_layer(model):
    with torch.no_grad():
        a = model.embed(torch.ones(1, 37), "s1").backbone
        model.ridge.linears[1].weight.add_(1.0)  # s2's layer only
        b = model.embed(torch.ones(1, 37), "s1").backbone
    torch.testing.assert_close(a, b)


def test_unknown_subject_and_wrong_voxel_count_are_clear_errors(model):
    with pytest.raises(ModelError, match=r"unknown subject 'nope'.*\['s1', 's2'\]"):
        model.embed(torch.zeros(1, 37), "nope")
    with pytest.raises(ModelError, match=r"subject 's2' must be \(batch, 29\), got \(1, 37\)"):
        model.embed(torch.zeros(1, 37), "s2")


def test_prior_sampling_is_deterministic_per_seed(model):
    with torch.no_grad():
        tokens = model.embed(torch.randn(2, 37), "s1").backbone
    first = model.sample_prior(tokens, n_steps=20, seed=7)
    again = model.sample_prior(tokens, n_steps=20, seed=7)
    other = model.sample_prior(tokens, n_steps=20, seed=8)
    assert first.shape == tokens.shape
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.allclose(first, other)


def test_prior_step_count_is_checked(model):
    tokens = torch.zeros(1, model.config.prior.n_tokens, model.config.prior.dim)
    with pytest.raises(ModelError, match=r"n_steps"):
        model.sample_prior(tokens, n_steps=0)
