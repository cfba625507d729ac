"""DeepSpeed ZeRO folders -> one fp32 state_dict, read with weights-only loads (spec §2.1).

Two kinds of fixture:

- Hand-built folders, written here from DeepSpeed's on-disk format (engine.save_checkpoint / stage_1_and_2.state_dict /
  stage3.state_dict of DeepSpeed 0.19): no DeepSpeed needed, so these run everywhere. DeepSpeed's pickled classes are
  written under their real global names through throw-away modules in ``sys.modules``; alignment padding is NaN so a
  reader that takes a padding value as a weight fails.
- Real checkpoints from DeepSpeed itself (2 ranks on gloo, CPU) and from accelerate's ``save_state``, when deepspeed is
  installed (it is not a project dependency). Its own ``zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint`` (which
  unpickles freely) and the engine's fp32 master weights are the oracles; they also check the hand-built folders.
"""

import contextlib
import dataclasses
import enum
import importlib.util
import json
import math
import os
import pickle
import shutil
import socket
import subprocess
import sys
import types
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor

from rtdecode.errors import CheckpointError
from rtdecode.models.zero import is_zero_checkpoint, read_zero_checkpoint

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed (not a project dependency)")
GENERATOR_TIMEOUT_S = 240
NAN = float("nan")


# --- DeepSpeed's pickled classes, under their real global names ------------------------------------------------------


class _ZeroStageEnum(enum.IntEnum):
    disabled = 0
    optimizer_states = 1
    gradients = 2
    weights = 3


class _LossScaler:
    def __init__(self, scale: float) -> None:
        self.cur_scale = scale
        self.dynamic = False


class _DynamicLossScaler:
    def __init__(self) -> None:
        self.cur_scale, self.cur_iter, self.last_overflow_iter, self.scale_factor = 65536.0, 7, -1, 2.0
        self.scale_window, self.min_scale, self.delayed_shift, self.cur_hysteresis = 1000, 1, 2, 2
        self.consecutive_hysteresis, self.raise_error_at_min_scale, self.dynamic = False, True, True
        self.dtype = torch.float16


@dataclasses.dataclass
class _FragmentAddress:
    numel: int
    start: int


class _DeepSpeedConfig:
    """An object graph of classes the reader has never heard of (old DeepSpeed pickled its config object)."""

    def __init__(self) -> None:
        self.zero_config = _ZeroConfig()
        self.train_batch_size = 2


class _ZeroConfig:
    def __init__(self) -> None:
        self.stage = _ZeroStageEnum.gradients
        self.offload = {"device": "cpu"}


_FAKE_GLOBALS = {
    "deepspeed.runtime.zero.config": {"ZeroStageEnum": _ZeroStageEnum, "DeepSpeedZeroConfig": _ZeroConfig},
    "deepspeed.runtime.fp16.loss_scaler": {"LossScaler": _LossScaler, "DynamicLossScaler": _DynamicLossScaler},
    "deepspeed.utils.tensor_fragment": {"fragment_address": _FragmentAddress},
    "deepspeed.runtime.config": {"DeepSpeedConfig": _DeepSpeedConfig},
}


@contextlib.contextmanager
def deepspeed_names() -> Iterator[None]:
    """While active, the fake classes pickle under DeepSpeed's module and class names."""
    renamed = [
        (cls, cls.__module__, cls.__qualname__) for classes in _FAKE_GLOBALS.values() for cls in classes.values()
    ]
    with pytest.MonkeyPatch.context() as patch:
        try:
            for module_name, classes in _FAKE_GLOBALS.items():
                parts = module_name.split(".")
                for depth in range(1, len(parts)):
                    patch.setitem(sys.modules, ".".join(parts[:depth]), types.ModuleType(".".join(parts[:depth])))
                module = types.ModuleType(module_name)
                for class_name, cls in classes.items():
                    cls.__module__, cls.__qualname__ = module_name, class_name
                    setattr(module, class_name, cls)
                patch.setitem(sys.modules, module_name, module)
            yield
        finally:
            for cls, module_name, qualname in renamed:
                cls.__module__, cls.__qualname__ = module_name, qualname


# --- Hand-built folders ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TinyModel:
    """The tensors a hand-built checkpoint holds: fp32 master weights per param group, frozen params, buffers."""

    groups: list[dict[str, Tensor]]
    frozen: dict[str, Tensor]
    buffers: dict[str, Tensor]
    shared: dict[str, str]


def tiny_model(seed: int = 0) -> TinyModel:
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator)

    return TinyModel(
        groups=[
            {"embed.weight": randn(3, 5), "hidden.weight": randn(7, 3), "head.weight": randn(2, 7)},
            {"embed.bias": randn(3), "hidden.bias": randn(7), "norm.weight": randn(7)},
        ],
        frozen={"frozen.weight": randn(3, 3).bfloat16(), "frozen.bias": randn(3).bfloat16()},
        buffers={"counts": torch.arange(4), "scale": torch.linspace(0.5, 1.5, 3).half()},
        shared={"tied.weight": "head.weight"},
    )


def expected_state(model: TinyModel, stage: int) -> dict[str, Tensor]:
    """zero_to_fp32's result: buffers, frozen params (not saved by stage 1), trainables by group, tied aliases."""
    state = {name: t.float() if t.is_floating_point() else t for name, t in model.buffers.items()}
    if stage >= 2:
        state.update({name: t.float() for name, t in model.frozen.items()})
    for group in model.groups:
        state.update(group)
    for alias, source in model.shared.items():
        state[alias] = state[source]
    return state


def _padded(flat: Tensor, numel: int) -> Tensor:
    return torch.cat([flat, torch.full((numel - flat.numel(),), NAN, dtype=flat.dtype)])


def _stage12_partitions(
    group: dict[str, Tensor], world_size: int, alignment: int | None
) -> tuple[list[Tensor], list[int], list[int]]:
    """One flat group cut as stage 1/2 does: per-rank slices (last one trimmed), group paddings, param paddings."""
    pieces, param_paddings, offset = [], [], 0
    for index, tensor in enumerate(group.values()):
        offset += tensor.numel()
        last = index == len(group) - 1
        padding = 0 if last or alignment is None else (-offset) % alignment
        pieces += [tensor.flatten(), torch.full((padding,), NAN)]
        param_paddings.append(padding)
        offset += padding
    align = 2 * world_size
    flat = _padded(torch.cat(pieces), math.ceil(offset / align) * align)
    per_rank = flat.numel() // world_size
    group_padding = flat.numel() - offset
    slices, group_paddings = [], []
    for rank in range(world_size):
        trimmed = group_padding if rank == world_size - 1 else 0
        slices.append(flat[rank * per_rank : (rank + 1) * per_rank - trimmed].clone())
        group_paddings.append(trimmed)
    return slices, group_paddings, param_paddings


def _stage3_slice(tensor: Tensor, world_size: int, rank: int) -> Tensor:
    per_rank = math.ceil(tensor.numel() / world_size)
    return _padded(tensor.flatten(), per_rank * world_size)[rank * per_rank : (rank + 1) * per_rank].clone()


def _loss_scaler(dynamic: bool) -> object:
    return _DynamicLossScaler() if dynamic else _LossScaler(1.0)


def _model_states(model: TinyModel, stage: int, rank: int, world_size: int, config: object) -> dict:
    params = {name: t.bfloat16() for group in model.groups for name, t in group.items()}
    if stage == 3:
        params = {name: torch.empty(0) for name in params}
    fragments = OrderedDict(model.frozen)
    if stage == 3:
        fragments = OrderedDict((name, _stage3_slice(t, world_size, rank)) for name, t in model.frozen.items())
    return {
        "module": OrderedDict({**model.buffers, **params, **model.frozen}),
        "buffer_names": list(model.buffers),
        "optimizer": None,
        "param_shapes": [OrderedDict((name, t.shape) for name, t in group.items()) for group in model.groups],
        "frozen_param_shapes": OrderedDict((n, t.shape) for n, t in model.frozen.items()) if stage >= 2 else None,
        "shared_params": dict(model.shared) if rank == 0 else {},
        "frozen_param_fragments": fragments if stage >= 2 else None,
        "lr_scheduler": None,
        "global_steps": 1,
        "dp_world_size": world_size,
        "ds_config": config,
        "ds_version": "0.19.8",
    }


def write_zero_checkpoint(
    save_dir: Path,
    model: TinyModel,
    stage: int,
    world_size: int,
    *,
    tag: str = "global_step1",
    alignment: int | None = 4,
    prefix: str = "",
    dynamic_loss_scaler: bool = False,
    config_object: bool = False,
    stage_value: object = None,
    legacy_format: bool = False,
) -> Path:
    """A ZeRO checkpoint folder as DeepSpeed writes it; returns ``save_dir``.

    ``legacy_format``: torch's pre-1.6 (non-zip) serialization, which cannot be memory-mapped.
    """

    def save(payload: dict, path: Path) -> None:
        torch.save(payload, path, _use_new_zipfile_serialization=not legacy_format)

    folder = save_dir / tag
    folder.mkdir(parents=True, exist_ok=True)
    (save_dir / "latest").write_text(tag)
    config = _DeepSpeedConfig() if config_object else {"train_batch_size": world_size, "zero_optimization": {}}
    zero_stage = _ZeroStageEnum(stage) if stage_value is None else stage_value
    with deepspeed_names():
        if stage <= 2:
            save(_model_states(model, stage, 0, world_size, config), folder / "mp_rank_00_model_states.pt")
            cuts = [_stage12_partitions(group, world_size, alignment) for group in model.groups]
        for rank in range(world_size):
            optimizer: dict = {"loss_scaler": _loss_scaler(dynamic_loss_scaler), "dynamic_loss_scale": False}
            optimizer.update(overflow=False, zero_stage=zero_stage, ds_version="0.19.8")
            if stage <= 2:
                flat_groups = [slices[rank] for slices, _, _ in cuts]
                optimizer.update(
                    single_partition_of_fp32_groups=flat_groups,
                    group_paddings=[paddings[rank] for _, paddings, _ in cuts],
                    partition_count=[world_size] * len(model.groups),
                    param_slice_mappings=[OrderedDict((n, _FragmentAddress(1, 0)) for n in g) for g in model.groups],
                )
                if alignment is not None:
                    optimizer["param_alignment_paddings"] = [param_paddings for _, _, param_paddings in cuts]
            else:
                save(
                    _model_states(model, stage, rank, world_size, config),
                    folder / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt",
                )
                flat_groups = [
                    torch.cat([_stage3_slice(t, world_size, rank) for t in group.values()]) for group in model.groups
                ]
                optimizer.update(fp32_flat_groups=flat_groups, partition_count=world_size)
            optimizer["base_optimizer_state"] = {"state": {i: {"exp_avg": g * 0} for i, g in enumerate(flat_groups)}}
            payload = {"optimizer_state_dict": optimizer, "ds_config": config, "ds_version": "0.19.8"}
            save(payload, folder / f"{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    return save_dir


def assert_same_state(got: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    """Same keys in the same order, fp32 where floating, identical values (NaN padding would show up here)."""
    assert list(got) == list(want)
    for name, tensor in want.items():
        expected_dtype = torch.float32 if tensor.is_floating_point() else tensor.dtype
        assert got[name].dtype == expected_dtype, name
        assert got[name].shape == tensor.shape, name
        assert torch.equal(got[name], tensor.to(expected_dtype)), name


HAND_BUILT_CASES = {
    "stage1-ws2": dict(stage=1, world_size=2),
    "stage2-ws1": dict(stage=2, world_size=1),
    "stage2-ws2": dict(stage=2, world_size=2),
    "stage2-ws3-bf16-no-alignment": dict(stage=2, world_size=3, prefix="bf16_", alignment=None),
    "stage3-ws1": dict(stage=3, world_size=1),
    "stage3-ws2": dict(stage=3, world_size=2),
    "stage3-ws3-bf16": dict(stage=3, world_size=3, prefix="bf16_"),
    "stage2-ws2-legacy-format": dict(stage=2, world_size=2, legacy_format=True),
}
# zero_to_fp32 memory-maps the optimizer files, which the legacy format does not allow.
ORACLE_CASES = [case for case, options in HAND_BUILT_CASES.items() if not options.get("legacy_format")]


@pytest.fixture(scope="module")
def hand_built(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hand_built")
    return {name: write_zero_checkpoint(root / name, tiny_model(), **case) for name, case in HAND_BUILT_CASES.items()}


@pytest.mark.parametrize("case", HAND_BUILT_CASES)
def test_hand_built_folders_give_back_the_saved_tensors(hand_built, case):
    stage = HAND_BUILT_CASES[case]["stage"]
    state = read_zero_checkpoint(hand_built[case])
    assert_same_state(state, expected_state(tiny_model(), stage))
    assert state["tied.weight"] is state["head.weight"]


def _mapped_ranges(folder: Path) -> list[tuple[int, int]]:
    """Address ranges of this process's memory mappings of files under ``folder`` (Linux /proc/self/maps)."""
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5].startswith(str(folder.resolve())):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((start, end))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux /proc/self/maps")
@pytest.mark.parametrize("case", ["stage2-ws2", "stage3-ws3-bf16"])
def test_every_tensor_owns_exactly_its_own_memory(hand_built, case):
    """Copies: not views into the memory-mapped files, nor into padded partitions (torch.save would keep those)."""
    state = read_zero_checkpoint(hand_built[case])
    ranges = _mapped_ranges(hand_built[case])
    for name, tensor in state.items():
        assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size(), name
        assert not any(start <= tensor.data_ptr() < end for start, end in ranges), name


def test_every_load_is_weights_only_and_memory_mapped(hand_built, monkeypatch):
    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    read_zero_checkpoint(hand_built["stage3-ws2"])
    assert len(calls) == 4  # 2 model-states + 2 optimizer-states files
    assert all(call.get("weights_only") is True and call.get("mmap") is True for call in calls)


def test_deepspeed_objects_load_as_inert_stand_ins_without_importing_deepspeed(tmp_path, monkeypatch):
    """A dynamic loss scaler and a whole config object graph of unknown DeepSpeed classes: read, nothing imported."""
    folder = write_zero_checkpoint(tmp_path / "ck", tiny_model(), 2, 2, dynamic_loss_scaler=True, config_object=True)
    for name in [name for name in sys.modules if name == "deepspeed" or name.startswith("deepspeed.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # any import of deepspeed now raises ImportError
    safe_globals_before = torch.serialization.get_safe_globals()
    assert_same_state(read_zero_checkpoint(folder), expected_state(tiny_model(), 2))
    # the allow-list was scoped to each load (compared as sets: torch keeps no stable order)
    assert set(map(repr, torch.serialization.get_safe_globals())) == set(map(repr, safe_globals_before))


def test_a_plain_weights_only_load_refuses_these_files(hand_built):
    """Why the stand-ins exist: torch alone rejects DeepSpeed's pickled classes."""
    optim_file = hand_built["stage2-ws2"] / "global_step1" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    with pytest.raises(pickle.UnpicklingError, match="GLOBAL deepspeed"):
        torch.load(optim_file, weights_only=True)


def test_code_in_a_checkpoint_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').close()",))

    folder = write_zero_checkpoint(tmp_path / "ck", tiny_model(), 2, 1)
    optim_file = folder / "global_step1" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": {"zero_stage": 2, "loss_scaler": Payload()}}, optim_file)
    with pytest.raises(CheckpointError, match=r"zero_pp_rank_0_mp_rank_00_optim_states\.pt: refused .*exec"):
        read_zero_checkpoint(folder)
    assert not marker.exists()
    torch.load(optim_file, weights_only=False)  # the payload is real: an unrestricted load runs it
    assert marker.exists()


def test_accelerate_layout_reads_from_the_save_state_folder_and_its_tag_folder(tmp_path):
    """accelerate 1.15 save_state(dir): save_checkpoint(dir, "pytorch_model") -> dir/latest, dir/pytorch_model/."""
    folder = write_zero_checkpoint(tmp_path / "checkpoint_0", tiny_model(), 2, 2, tag="pytorch_model")
    (folder / "random_states_0.pkl").write_bytes(b"not read")
    (folder / "scheduler.bin").write_bytes(b"not read")
    want = expected_state(tiny_model(), 2)
    assert_same_state(read_zero_checkpoint(folder), want)
    assert_same_state(read_zero_checkpoint(folder / "pytorch_model"), want)
    assert is_zero_checkpoint(folder) and is_zero_checkpoint(folder / "pytorch_model")


def test_tag_overrides_latest(tmp_path):
    write_zero_checkpoint(tmp_path, tiny_model(seed=1), 2, 1, tag="global_step1")
    write_zero_checkpoint(tmp_path, tiny_model(seed=2), 2, 1, tag="global_step2")
    assert_same_state(read_zero_checkpoint(tmp_path), expected_state(tiny_model(seed=2), 2))
    assert_same_state(read_zero_checkpoint(tmp_path, tag="global_step1"), expected_state(tiny_model(seed=1), 2))


def test_is_zero_checkpoint_looks_at_the_layout(tmp_path, hand_built):
    (tmp_path / "last.pth").write_bytes(b"x")
    assert is_zero_checkpoint(hand_built["stage2-ws1"])
    assert not is_zero_checkpoint(tmp_path)
    assert not is_zero_checkpoint(tmp_path / "last.pth")
    assert not is_zero_checkpoint(tmp_path / "absent")


# --- Errors ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def copy_of(hand_built, tmp_path):
    def copy(case: str) -> Path:
        return Path(shutil.copytree(hand_built[case], tmp_path / case))

    return copy


def test_no_latest_and_no_tag(copy_of):
    folder = copy_of("stage2-ws1")
    (folder / "latest").unlink()
    with pytest.raises(
        CheckpointError, match=r"latest: missing and no tag given.*tag folders present: \['global_step1'"
    ):
        read_zero_checkpoint(folder)
    assert is_zero_checkpoint(
        folder
    )  # recognised, so the importer reports the missing tag instead of "not a checkpoint"


def test_latest_naming_a_missing_tag_folder(copy_of):
    folder = copy_of("stage2-ws1")
    (folder / "latest").write_text("global_step9\n")
    with pytest.raises(CheckpointError, match=r"latest: tag folder .*global_step9 missing"):
        read_zero_checkpoint(folder)


def test_a_tag_must_be_a_folder_name(copy_of):
    with pytest.raises(CheckpointError, match=r"tag '\.\./x' must be the name of a folder"):
        read_zero_checkpoint(copy_of("stage2-ws1"), tag="../x")


def test_missing_rank_file(copy_of):
    folder = copy_of("stage2-ws2")
    (folder / "global_step1" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(
        CheckpointError, match=r"zero_pp_rank_1_mp_rank_00_optim_states\.pt: missing.*partition_count 2"
    ):
        read_zero_checkpoint(folder)


def test_missing_stage3_model_states_file(copy_of):
    folder = copy_of("stage3-ws2")
    (folder / "global_step1" / "zero_pp_rank_1_mp_rank_00_model_states.pt").unlink()
    with pytest.raises(CheckpointError, match=r"zero_pp_rank_1_mp_rank_00_model_states\.pt: missing.*stage 3"):
        read_zero_checkpoint(folder)


def test_world_size_mismatch(copy_of):
    folder = copy_of("stage2-ws2") / "global_step1"
    shutil.copy(
        folder / "zero_pp_rank_1_mp_rank_00_optim_states.pt", folder / "zero_pp_rank_2_mp_rank_00_optim_states.pt"
    )
    with pytest.raises(CheckpointError, match=r"world-size mismatch: .*ranks \[0, 1, 2\].*partition_count 2"):
        read_zero_checkpoint(folder.parent)


@pytest.mark.parametrize("stage_value", [_ZeroStageEnum.disabled, 4])
def test_unsupported_stage(tmp_path, stage_value):
    folder = write_zero_checkpoint(tmp_path, tiny_model(), 2, 1, stage_value=stage_value)
    with pytest.raises(CheckpointError, match=rf"optim_states\.pt: unsupported ZeRO stage .*{int(stage_value)}"):
        read_zero_checkpoint(folder)


def test_model_states_of_another_model(tmp_path):
    """Shapes that do not fit the partitions (a file from another run) are caught, not silently mis-sliced."""
    small = tiny_model()
    small.groups[0]["hidden.weight"] = small.groups[0]["hidden.weight"][:2]
    write_zero_checkpoint(tmp_path / "small", small, 2, 1)
    folder = write_zero_checkpoint(tmp_path / "big", tiny_model(), 2, 1)
    model_states = "global_step1/mp_rank_00_model_states.pt"
    shutil.copy(tmp_path / "small" / model_states, folder / model_states)
    with pytest.raises(CheckpointError, match=r"param group 0: the parameter shapes use \d+ values but"):
        read_zero_checkpoint(folder)


# --- Real DeepSpeed checkpoints (2 ranks, gloo, CPU) -----------------------------------------------------------------

_GENERATOR = r'''
"""Runs as one of 2 ranks: real ZeRO checkpoints, then (rank 0) zero_to_fp32 + engine master weights as oracles."""
import importlib, json, os, shutil, sys
from pathlib import Path
import torch, deepspeed
# The CPU backend builds a C++ shared-memory allreduce kernel on first use (30 s); gloo alone is enough here.
importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
from deepspeed.utils import safe_get_full_fp32_param
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

RANK, WORLD_SIZE = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])

class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(5, 3)
        self.hidden = torch.nn.Linear(3, 7)
        self.norm = torch.nn.LayerNorm(7)
        self.frozen = torch.nn.Linear(3, 3).requires_grad_(False)
        self.head = torch.nn.Linear(7, 3, bias=False)
        self.tied = torch.nn.Linear(7, 3, bias=False)
        self.tied.weight = self.head.weight
        self.register_buffer("counts", torch.arange(4))
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 3))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)

    def forward(self, x):
        h = self.norm(self.hidden(self.frozen(self.embed(x)) * self.scale.to(x.dtype)))
        return (self.head(h) + self.tied(h)).square().sum()

def batch(step, dtype=torch.float32):
    return torch.randn(2, 5, dtype=dtype, generator=torch.Generator().manual_seed(RANK * 10 + step))

def save_oracle(folder, master):
    if RANK == 0:
        oracle = get_fp32_state_dict_from_zero_checkpoint(str(folder))
        torch.save({"oracle": dict(oracle), "master": master}, Path(str(folder) + ".expected.pt"))

def deepspeed_case(out, name, stage, extra):
    torch.manual_seed(0)
    model = Tiny()
    weights = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith("weight")]
    others = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith("weight")]
    groups = [{"params": weights, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}]
    config = {"train_batch_size": WORLD_SIZE, "zero_optimization": {"stage": stage},
              "optimizer": {"type": "AdamW", "params": {"lr": 0.05, "torch_adam": True}}, **extra}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=config)
    dtype = torch.bfloat16 if extra.get("bf16", {}).get("enabled") else torch.float32
    for step in range(2):
        engine.backward(engine(batch(step, dtype)))
        engine.step()
    engine.save_checkpoint(str(out / name))
    master = {n: safe_get_full_fp32_param(p) for n, p in engine.module.named_parameters() if p.requires_grad}
    save_oracle(out / name, master)

def accelerate_case(out, name, stage):
    """accelerate's save_state layout. On this CPU backend accelerate counts 1 process; DeepSpeed still runs 2 ranks."""
    from accelerate import Accelerator, DeepSpeedPlugin
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(zero_stage=stage, gradient_accumulation_steps=1))
    accelerator.state.deepspeed_plugin.deepspeed_config.update(
        train_micro_batch_size_per_gpu=1, train_batch_size=WORLD_SIZE
    )
    torch.manual_seed(0)
    model = Tiny()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.backward(model(batch(0)))
    optimizer.step()
    accelerator.save_state(str(out / name))
    master = {n: safe_get_full_fp32_param(p) for n, p in model.module.named_parameters() if p.requires_grad}
    save_oracle(out / name, master)

def fp16_style_copy(source, target):
    """MindEye2 trained in fp16: its files hold a DynamicLossScaler (fp16 cannot run on this CPU backend)."""
    shutil.copytree(source, target)
    for path in sorted(target.glob("*/*_optim_states.pt")):
        state = torch.load(path, weights_only=False)
        scaler = DynamicLossScaler(2.0**16, 1000, 1, 2, False, dtype=torch.float16)
        state["optimizer_state_dict"]["loss_scaler"] = scaler
        state["optimizer_state_dict"]["dynamic_loss_scale"] = True
        torch.save(state, path)
    save_oracle(target, {})

def main():
    out = Path(sys.argv[1])
    for name, stage, extra in json.loads(sys.argv[2]):
        if name.startswith("accelerate"):
            accelerate_case(out, name, stage)
        else:
            deepspeed_case(out, name, stage, extra)
    if RANK == 0:
        fp16_style_copy(out / "stage2", out / "stage2-fp16-loss-scaler")
        for folder in json.loads(sys.argv[3]):
            save_oracle(Path(folder), {})
    # leave together and tear the process group down: a rank exiting alone can abort ("terminate called ...")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()

main()
'''

REAL_CASES = {
    "stage1": (1, {}),
    "stage2": (2, {}),
    "stage3": (3, {}),
    "stage2-bf16": (2, {"bf16": {"enabled": True}}),
    "stage3-bf16": (3, {"bf16": {"enabled": True}}),
    "accelerate": (2, {}),
}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def real_checkpoints(tmp_path_factory, hand_built) -> Path:
    """Checkpoints written by DeepSpeed 2-rank runs, each with ``<name>.expected.pt`` (oracle, master weights)."""
    out = tmp_path_factory.mktemp("deepspeed")
    script = out / "generate.py"
    script.write_text(_GENERATOR)
    cases = json.dumps([[name, stage, extra] for name, (stage, extra) in REAL_CASES.items()])
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2")
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TORCH_EXTENSIONS_DIR=str(out / "torch_extensions"))
    ranks = []
    for rank in range(2):
        log = open(out / f"rank{rank}.log", "w")
        oracle_folders = json.dumps([str(hand_built[case]) for case in ORACLE_CASES])
        command = [sys.executable, str(script), str(out), cases, oracle_folders]
        rank_env = dict(env, RANK=str(rank), LOCAL_RANK=str(rank))
        ranks.append((subprocess.Popen(command, env=rank_env, stdout=log, stderr=subprocess.STDOUT), log))
    failed = []
    for rank, (process, log) in enumerate(ranks):
        try:
            failed += [rank] if process.wait(timeout=GENERATOR_TIMEOUT_S) != 0 else []
        except subprocess.TimeoutExpired:
            failed.append(rank)
        finally:
            for other, _ in ranks:
                if other.poll() is None and failed:
                    other.kill()
            log.close()
    if failed:
        tail = (out / f"rank{failed[0]}.log").read_text()[-4000:]
        pytest.fail(f"DeepSpeed generator rank {failed[0]} failed:\n{tail}")
    return out


def _oracle(folder: Path) -> dict:
    return torch.load(Path(str(folder) + ".expected.pt"), weights_only=True)


@needs_deepspeed
@pytest.mark.parametrize("case", list(REAL_CASES) + ["stage2-fp16-loss-scaler"])
def test_real_deepspeed_checkpoints_match_zero_to_fp32_and_the_engine(real_checkpoints, case):
    folder = real_checkpoints / case
    expected = _oracle(folder)
    state = read_zero_checkpoint(folder)
    assert_same_state(state, expected["oracle"])
    for name, master in expected["master"].items():
        assert torch.equal(state[name], master), name
    assert state["tied.weight"] is state["head.weight"]
    assert ("frozen.weight" in state) == (REAL_CASES.get(case, (2,))[0] >= 2)


@needs_deepspeed
def test_real_accelerate_layout(real_checkpoints):
    folder = real_checkpoints / "accelerate"
    assert (folder / "latest").read_text().strip() == "pytorch_model"
    assert (folder / "pytorch_model" / "mp_rank_00_model_states.pt").is_file()
    assert_same_state(read_zero_checkpoint(folder / "pytorch_model"), _oracle(folder)["oracle"])


@needs_deepspeed
@pytest.mark.parametrize("case", ORACLE_CASES)
def test_zero_to_fp32_agrees_on_the_hand_built_folders(real_checkpoints, hand_built, case):
    """Checks the fixture writer itself: DeepSpeed's own reader gets the same tensors out of those folders."""
    oracle = _oracle(hand_built[case])["oracle"]
    upcast = {name: t.float() if t.is_floating_point() else t for name, t in oracle.items()}
    assert_same_state(upcast, expected_state(tiny_model(), HAND_BUILT_CASES[case]["stage"]))
