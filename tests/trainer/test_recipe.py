"""The paper's recipe (spec §3.3, §3.4): loss schedule, AdamW groups on a real tiny MindEye2, OneCycle, batch plans."""

import math
import re

import numpy as np
import pytest
import torch

from rtdecode.errors import TrainError
from rtdecode.models.config import tiny
from rtdecode.models.mindeye2 import MindEye2
from trainer.config import RecipeConfig
from trainer.data.source import Dataset, SubjectData
from trainer.recipe import (
    batch_plan,
    loss_schedule,
    make_optimizer,
    make_scheduler,
    parameter_groups,
    step_rng,
    steps_per_epoch,
)


class _NoImages:
    """An image store of ``n_images`` images; the recipe never reads them."""

    def __init__(self, n_images: int) -> None:
        self._n_images = n_images

    @property
    def n_images(self) -> int:
        return self._n_images

    @property
    def identity(self) -> str:
        return "none"

    def read(self, indices: np.ndarray) -> np.ndarray:
        raise AssertionError("the recipe must not read images")


def _subject(name: str, n_train: int) -> SubjectData:
    n_rows = n_train + 2
    return SubjectData(
        name=name,
        betas=np.zeros((n_rows, 3), dtype=np.float32),
        train_rows=np.arange(n_train, dtype=np.int64),
        train_images=np.arange(n_train, dtype=np.int64),
        test_rows=np.array([[n_train] * 3, [n_train + 1] * 3], dtype=np.int64),
        test_images=np.array([0, 1], dtype=np.int64),
        origin="test",
    )


def _dataset(*n_train: int) -> Dataset:
    subjects = tuple(_subject(f"s{i}", n) for i, n in enumerate(n_train))
    return Dataset(subjects, _NoImages(max(n_train) + 2), "test data")


@pytest.fixture(scope="module")
def model() -> MindEye2:
    torch.manual_seed(0)
    return MindEye2(tiny())


# ------------------------------------------------------------------------------------------------ defaults


def test_recipe_defaults_are_the_papers():
    recipe = RecipeConfig()
    assert recipe.epochs == 150
    assert recipe.batch_per_subject == 6  # 42 / 7 subjects
    assert recipe.samples_per_epoch is None
    assert recipe.max_lr == 3e-4
    assert recipe.weight_decay == 1e-2
    assert recipe.mixup_pct == 0.33
    assert (recipe.prior_scale, recipe.clip_scale, recipe.blur_scale) == (30.0, 1.0, 0.5)
    assert recipe.final_div_factor == 1000.0
    assert recipe.warmup_epochs == 2.0


# ------------------------------------------------------------------------------------------------ loss schedule


def test_loss_schedule_of_the_paper():
    schedule = loss_schedule(RecipeConfig())
    assert len(schedule) == 150
    kinds = [e.kind for e in schedule]
    assert kinds == ["bimixco"] * 49 + ["softclip"] * 101
    assert {e.temperature for e in schedule[:49]} == {0.006}
    soft = [e.temperature for e in schedule[49:]]
    assert soft[0] == pytest.approx(0.004, rel=1e-12)
    assert soft[-1] == pytest.approx(0.0075, rel=1e-12)
    assert all(a < b for a, b in zip(soft, soft[1:], strict=False))
    # cosine: half-way (epoch 49 + 50) is the mean of the two ends
    assert soft[50] == pytest.approx((0.004 + 0.0075) / 2, rel=1e-12)
    for k, temperature in enumerate(soft):
        want = 0.0075 - (0.0075 - 0.004) * (1 + math.cos(math.pi * k / 100)) / 2
        assert temperature == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize(
    ("epochs", "mixup_pct", "n_mixco"), [(300, 0.33, 99), (10, 0.33, 3), (4, 0.0, 0), (4, 1.0, 4), (1, 0.33, 0)]
)
def test_loss_schedule_splits_at_int_mixup_pct_epochs(epochs, mixup_pct, n_mixco):
    schedule = loss_schedule(RecipeConfig(epochs=epochs, mixup_pct=mixup_pct))
    assert len(schedule) == epochs
    assert [e.kind for e in schedule] == ["bimixco"] * n_mixco + ["softclip"] * (epochs - n_mixco)
    if epochs - n_mixco >= 2:
        assert schedule[n_mixco].temperature == pytest.approx(0.004)
        assert schedule[-1].temperature == pytest.approx(0.0075)


# ------------------------------------------------------------------------------------------------ AdamW groups


def test_parameter_groups_follow_the_public_filter(model):
    groups = parameter_groups(model, 0.01)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    frozen = [p for p in model.parameters() if not p.requires_grad]
    in_groups = [id(p) for group in groups for p in group["params"]]
    assert len(in_groups) == len(set(in_groups))  # no parameter twice
    assert set(in_groups) == {id(p) for p in trainable.values()}  # every trainable parameter once
    assert not {id(p) for p in frozen} & set(in_groups)
    decay_of = {id(p): group["weight_decay"] for group in groups for p in group["params"]}
    no_decay_name = re.compile(r"bias|LayerNorm\.weight")
    for name, param in trainable.items():
        if name.split(".")[0] == "ridge":
            want = 0.01  # the ridge layers are decayed, biases included
        else:
            want = 0.0 if no_decay_name.search(name) else 0.01
        assert decay_of[id(param)] == want, name
    # the named quirks of the public filter (§3.4): LayerNorms named by index and dalle2 ``.g`` gains are decayed;
    # rel_pos_bias's embedding weight matches 'bias' and is not
    named = dict(model.named_parameters())
    assert decay_of[id(named["ridge.linears.0.bias"])] == 0.01
    assert decay_of[id(named["backbone.mixer_blocks1.0.0.weight"])] == 0.01
    assert decay_of[id(named["backbone.mixer_blocks1.0.0.bias"])] == 0.0
    assert decay_of[id(named["diffusion_prior.net.causal_transformer.norm.g"])] == 0.01
    assert (
        decay_of[id(named["diffusion_prior.net.causal_transformer.rel_pos_bias.relative_attention_bias.weight"])] == 0
    )
    assert decay_of[id(named["backbone.backbone_linear.weight"])] == 0.01


def test_parameter_groups_with_a_layer_norm_named_layernorm():
    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.LayerNorm = torch.nn.LayerNorm(3)
            self.proj = torch.nn.Linear(3, 3)

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ridge = torch.nn.Linear(4, 3)
            self.backbone = Block()

    net = Tiny()
    groups = parameter_groups(net, 0.5)
    decay_of = {id(p): group["weight_decay"] for group in groups for p in group["params"]}
    assert decay_of[id(net.ridge.weight)] == 0.5 and decay_of[id(net.ridge.bias)] == 0.5
    assert decay_of[id(net.backbone.LayerNorm.weight)] == 0.0
    assert decay_of[id(net.backbone.LayerNorm.bias)] == 0.0
    assert decay_of[id(net.backbone.proj.weight)] == 0.5
    assert decay_of[id(net.backbone.proj.bias)] == 0.0
    assert all(group["params"] for group in groups)  # no empty group


def test_make_optimizer_is_adamw_at_max_lr(model):
    recipe = RecipeConfig()
    optimizer = make_optimizer(model, recipe)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert {group["lr"] for group in optimizer.param_groups} == {3e-4}
    assert {group["weight_decay"] for group in optimizer.param_groups} == {0.0, 0.01}
    n_params = sum(len(group["params"]) for group in optimizer.param_groups)
    assert n_params == sum(1 for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------------ OneCycle


def _cosine(start: float, end: float, fraction: float) -> float:
    return end + (start - end) * (1 + math.cos(math.pi * fraction)) / 2


def test_one_cycle_of_the_paper(model):
    recipe = RecipeConfig()  # 150 epochs, max_lr 3e-4, 2 warm-up epochs, final_div_factor 1000
    n_steps_per_epoch = 3
    total = 150 * n_steps_per_epoch
    optimizer = make_optimizer(model, recipe)
    scheduler = make_scheduler(optimizer, recipe, n_steps_per_epoch)
    assert scheduler.total_steps == total
    lrs, beta1s = [], []
    for step in range(total):
        lrs.append([group["lr"] for group in optimizer.param_groups])
        beta1s.append([group["betas"][0] for group in optimizer.param_groups])
        if step < total - 1:
            optimizer.step()
            scheduler.step()
    lrs, beta1s = np.array(lrs), np.array(beta1s)
    assert np.all(lrs == lrs[:, :1]) and np.all(beta1s == beta1s[:, :1])  # every group alike
    lr, beta1 = lrs[:, 0], beta1s[:, 0]
    start, peak, final = 3e-4 / 25, 3e-4, 3e-4 / 25 / 1000
    warmup_end = 2 * n_steps_per_epoch - 1  # pct_start 2/150 of the steps: the peak is reached at step 5
    assert lr[0] == pytest.approx(start, rel=1e-9)  # 1.2e-5
    assert int(np.argmax(lr)) == warmup_end
    assert lr[warmup_end] == pytest.approx(peak, rel=1e-9)
    assert lr[-1] == pytest.approx(final, rel=1e-6)  # 1.2e-8
    assert beta1[0] == pytest.approx(0.95) and beta1[warmup_end] == pytest.approx(0.85)
    assert beta1[-1] == pytest.approx(0.95)
    for step in range(total):
        if step <= warmup_end:
            fraction = step / warmup_end
            want_lr, want_beta1 = _cosine(start, peak, fraction), _cosine(0.95, 0.85, fraction)
        else:
            fraction = (step - warmup_end) / (total - 1 - warmup_end)
            want_lr, want_beta1 = _cosine(peak, final, fraction), _cosine(0.85, 0.95, fraction)
        assert lr[step] == pytest.approx(want_lr, rel=1e-6, abs=1e-15), step
        assert beta1[step] == pytest.approx(want_beta1, rel=1e-9), step


def test_one_cycle_total_steps_follow_steps_per_epoch(model):
    recipe = RecipeConfig(epochs=7, warmup_epochs=2.0, max_lr=1e-3)
    optimizer = make_optimizer(model, recipe)
    scheduler = make_scheduler(optimizer, recipe, 714)
    assert scheduler.total_steps == 7 * 714
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(2 * 714 + 10):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert int(np.argmax(lrs)) == 2 * 714 - 1
    assert max(lrs) == pytest.approx(1e-3, rel=1e-9)


@pytest.mark.parametrize(
    ("epochs", "n_steps_per_epoch", "warmup_epochs"),
    [(10, 1, 1.0), (4, 2, 0.5), (3, 1, 2.0), (2, 3, 2.0), (2, 1, 2.0), (1, 2, 2.0)],
)
def test_one_cycle_runs_for_short_runs_and_small_data(epochs, n_steps_per_epoch, warmup_epochs):
    """Smoke runs on small data have 1 step per epoch (steps_per_epoch's floor): the schedule must still run.

    torch's OneCycleLR divides by zero when pct_start x total_steps is exactly 1 (a zero-length warm-up).
    Two optimiser steps in all may be refused with a TrainError that names the step count instead.
    """
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=1e-3)
    recipe = RecipeConfig(epochs=epochs, warmup_epochs=warmup_epochs, max_lr=1e-3)
    total = epochs * n_steps_per_epoch
    try:
        scheduler = make_scheduler(optimizer, recipe, n_steps_per_epoch)
    except TrainError as error:
        assert total < 3 and str(total) in str(error)
        return
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(total - 1):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert all(math.isfinite(lr) and lr > 0 for lr in lrs)
    assert lrs[-1] == pytest.approx(1e-3 / 25 / 1000, rel=1e-6)
    if total >= 3:
        assert lrs[0] == pytest.approx(1e-3 / 25, rel=1e-6)
        assert max(lrs) <= 1e-3 * (1 + 1e-9)


# ------------------------------------------------------------------------------------------------ steps per epoch


def test_steps_per_epoch_of_the_published_runs():
    # multi-subject: 7 subjects, 40 sessions x 750 for the largest, 42 per step -> 714 it/epoch (§3.2)
    seven = _dataset(30000, 24000, 22500, 30000, 27750, 22500, 30000)
    assert steps_per_epoch(seven, RecipeConfig(batch_per_subject=6)) == 714
    assert steps_per_epoch(seven, RecipeConfig(batch_per_subject=6), n_processes=2) == 30000 // 2 // 42
    assert steps_per_epoch(seven, RecipeConfig(batch_per_subject=6), n_processes=8) == 89
    # single subject, batch 24: 1 session -> 31, 40 sessions -> 1250
    assert steps_per_epoch(_dataset(750), RecipeConfig(batch_per_subject=24)) == 31
    assert steps_per_epoch(_dataset(30000), RecipeConfig(batch_per_subject=24)) == 1250


def test_steps_per_epoch_defaults_to_the_largest_subject_and_honours_samples_per_epoch():
    data = _dataset(50, 230, 120)
    assert steps_per_epoch(data, RecipeConfig(batch_per_subject=4)) == 230 // 12
    recipe = RecipeConfig(batch_per_subject=5, samples_per_epoch=1000)
    assert steps_per_epoch(_dataset(10, 20), recipe, n_processes=3) == 1000 // (3 * 10)
    assert steps_per_epoch(_dataset(3, 4), RecipeConfig(batch_per_subject=6)) == 1  # at least one step


# ------------------------------------------------------------------------------------------------ batch plans


def _plan(data: Dataset, recipe: RecipeConfig, **kwargs) -> list[list[np.ndarray]]:
    return list(batch_plan(data, recipe, **kwargs))


def test_batch_plan_gives_every_subject_its_share_every_step():
    data = _dataset(7, 30, 12)
    recipe = RecipeConfig(batch_per_subject=3)
    plan = _plan(data, recipe, seed=42, epoch=0, process=0, n_steps=6)
    assert len(plan) == 6
    for step in plan:
        assert len(step) == 3
        for positions, subject in zip(step, data.subjects, strict=True):
            assert positions.dtype == np.int64 and positions.shape == (3,)
            assert positions.min() >= 0 and positions.max() < subject.n_train


def test_batch_plan_passes_cover_every_position_before_repeating():
    data = _dataset(7, 30)
    recipe = RecipeConfig(batch_per_subject=3)
    plan = _plan(data, recipe, seed=1, epoch=3, process=0, n_steps=6)  # 18 positions per subject
    small = np.concatenate([step[0] for step in plan])
    for start in (0, 7):
        np.testing.assert_array_equal(np.sort(small[start : start + 7]), np.arange(7))
    assert len(set(small[14:].tolist())) == 4  # the third pass has begun without repeats
    large = np.concatenate([step[1] for step in plan])
    assert len(set(large.tolist())) == 18  # less than one pass: no repeats
    # each pass is reshuffled
    assert not np.array_equal(small[:7], small[7:14])


def test_batch_plan_is_reproducible_and_differs_by_epoch_process_seed_and_subject():
    data = _dataset(40, 40)
    recipe = RecipeConfig(batch_per_subject=4)

    def flat(**kwargs) -> list[np.ndarray]:
        plan = _plan(data, recipe, n_steps=5, **kwargs)
        return [np.concatenate([step[i] for step in plan]) for i in range(2)]

    base = flat(seed=42, epoch=2, process=0)
    again = flat(seed=42, epoch=2, process=0)
    for a, b in zip(base, again, strict=True):
        np.testing.assert_array_equal(a, b)
    for other in (
        flat(seed=42, epoch=3, process=0),
        flat(seed=42, epoch=2, process=1),
        flat(seed=7, epoch=2, process=0),
    ):
        assert not np.array_equal(base[0], other[0])
        assert not np.array_equal(base[1], other[1])
    assert not np.array_equal(base[0], base[1])  # same size, own order


def test_batch_plan_does_not_depend_on_how_many_steps_are_taken():
    data = _dataset(9, 25)
    recipe = RecipeConfig(batch_per_subject=2)
    short = _plan(data, recipe, seed=5, epoch=1, process=0, n_steps=3)
    long = _plan(data, recipe, seed=5, epoch=1, process=0, n_steps=8)
    for a, b in zip(short, long[:3], strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)


def test_step_rng_is_reproducible_and_distinct_per_step():
    draws = {}
    for key in [(42, 0, 0, 0), (42, 0, 0, 1), (42, 1, 0, 0), (42, 0, 1, 0), (7, 0, 0, 0)]:
        first = step_rng(*key).random(4)
        np.testing.assert_array_equal(first, step_rng(*key).random(4))
        draws[key] = tuple(first)
    assert len(set(draws.values())) == len(draws)
