"""Read a DeepSpeed ZeRO checkpoint folder into one full fp32 state_dict, without DeepSpeed and without pickle.

Spec §2.1: when ``torch.load(last.pth)`` fails, MindEye2's public code treats the path as a DeepSpeed ZeRO folder and
calls ``deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(outdir, tag)``. This module rebuilds the
same state_dict (same names, same order, same values; floating tensors as fp32) from the same files, but every file is
read with ``torch.load(weights_only=True)`` (memory-mapped where the file format allows) because such folders come from
the internet. DeepSpeed pickles a few of its own objects into them (the loss scaler, ``ZeroStageEnum``, fragment
addresses); each ``deepspeed.*`` global a file names is allow-listed, for that one load only
(``torch.serialization.safe_globals``), as an inert stand-in defined here, so no DeepSpeed code is imported or run.
Any other global (``builtins.eval``, ``os.system``, ...) is still refused by torch.

Layout written by ``engine.save_checkpoint(save_dir, tag)`` (DeepSpeed 0.13 to 0.19, data-parallel only)::

    save_dir/latest                                                 text file: the tag of the newest save
    save_dir/<tag>/mp_rank_00_model_states.pt                       stage 1/2: buffers, names and shapes
    save_dir/<tag>/zero_pp_rank_<r>_mp_rank_00_model_states.pt      stage 3: the same, one per rank r
    save_dir/<tag>/[bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt  each rank's fp32 master partition

accelerate's ``Accelerator.save_state(dir)`` under DeepSpeed calls ``save_checkpoint(dir, "pytorch_model")`` (tag
``pytorch_model_<i>`` for the i-th further model), so ``dir/latest`` holds ``pytorch_model`` next to accelerate's own
``random_states_*.pkl`` / ``scheduler.bin``; the same reader applies to ``dir``, and to ``dir/pytorch_model`` itself.

How the fp32 master weights are laid out (what ``zero_to_fp32`` undoes):

- Stage 1/2: per param group, the group's parameters are flattened in ``param_shapes`` order (with
  ``param_alignment_paddings`` values after each, DeepSpeed >= 0.19), the flat vector is padded and cut into one
  equal slice per rank; the last rank's slice is saved without the padding. Concatenating the ranks' slices gives the
  flat group back.
- Stage 3: every parameter is cut into ``ceil(numel / world_size)`` values per rank (zero-padded); each rank's file
  holds its slices of all parameters, back to back (split into per-group tensors).
- Frozen parameters (``requires_grad=False``) are not in the optimizer: stage 2/3 keep them in the model-states files
  (stage 2 whole, stage 3 as per-rank slices); stage 1 does not save them, so they are absent, as in ``zero_to_fp32``.
- Tied parameters are stored once; ``shared_params`` maps each alias to the stored name, and the alias gets the same
  tensor object.
"""

import enum
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rtdecode.checkpoint_io import InertRecord, inert_stand_in, torch_load
from rtdecode.errors import CheckpointError

LATEST_FILE = "latest"
STAGE12_MODEL_FILE = "mp_rank_00_model_states.pt"
# bf16_ (and fp16_, used by DeepSpeed's universal-checkpoint tools) prefix the optimizer files of low-precision runs.
_OPTIM_FILE = re.compile(r"(?P<prefix>(?:bf16_|fp16_)?)zero_pp_rank_(?P<rank>\d+)_mp_rank_(?P<mp>\d+)_optim_states\.pt")
_STAGE3_MODEL_FILE = re.compile(r"zero_pp_rank_(?P<rank>\d+)_mp_rank_(?P<mp>\d+)_model_states\.pt")
_DEEPSPEED_PREFIX = "deepspeed."
_ZERO_STAGE_CLASS = "ZeroStageEnum"
# Read even without scanning (legacy, non-zip files): the DeepSpeed objects a ZeRO optimizer file normally holds.
_KNOWN_DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
_SUPPORTED_STAGES = (1, 2, 3)


class ZeroStage(enum.IntEnum):
    """Stand-in for ``deepspeed.runtime.zero.config.ZeroStageEnum`` (pickled as ``ZeroStageEnum(value)``)."""

    DISABLED = 0
    OPTIMIZER_STATES = 1
    GRADIENTS = 2
    WEIGHTS = 3


class DeepSpeedRecord(InertRecord):
    """Inert stand-in for any other DeepSpeed object in a checkpoint (loss scaler, fragment address, config ...)."""

    global_name = "deepspeed"


@dataclass(frozen=True)
class _ModelStates:
    """What a ``*_model_states.pt`` file contributes: buffers, parameter names and shapes, frozen params, aliases."""

    path: Path
    buffers: dict[str, Tensor]
    param_shapes: list[dict[str, torch.Size]]
    frozen_param_shapes: dict[str, torch.Size]
    frozen_param_fragments: dict[str, Tensor]
    shared_params: dict[str, str]


@dataclass(frozen=True)
class _Partition:
    """What one rank's ``*_optim_states.pt`` file contributes: its slice of the fp32 master weights, per group."""

    path: Path
    stage: int
    world_size: int
    flat_groups: list[Tensor]
    alignment_paddings: list[list[int]] | None


def is_zero_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a DeepSpeed ZeRO checkpoint folder :func:`read_zero_checkpoint` can start on.

    True for a save folder with a ``latest`` file or a tag folder holding ``*_optim_states.pt`` files (DeepSpeed's
    and accelerate's layouts), and for such a tag folder itself. Looks at file names only; reads no checkpoint file.
    Which tag to read (and whether ``latest`` names a real one) is :func:`read_zero_checkpoint`'s to report.
    """
    path = Path(path)
    try:
        if not path.is_dir():
            return False
        if (path / LATEST_FILE).is_file() or _has_optim_files(path):
            return True
        return any(_has_optim_files(child) for child in path.iterdir())
    except OSError:
        return False


def read_zero_checkpoint(folder: Path, tag: str | None = None) -> dict[str, Tensor]:
    """The full fp32 state_dict of a DeepSpeed ZeRO (stage 1, 2 or 3) checkpoint, as ``zero_to_fp32`` builds it.

    ``folder`` is the ``save_dir`` given to ``save_checkpoint`` (or accelerate's ``save_state`` folder), or the tag
    folder itself. ``tag`` picks the save; without it the ``latest`` file does. Keys are the module's names exactly as
    DeepSpeed stored them: persistent buffers first, then frozen parameters, then the trainable ones group by group,
    then tied aliases (the same tensor object as the name they alias). Floating tensors are fp32 (the optimizer's
    master weights; buffers and frozen parameters upcast from bf16/fp16); integer buffers keep their dtype. Every
    tensor is a fresh copy, not a view of a memory-mapped file.
    """
    tag_folder = _tag_folder(Path(folder), tag)
    optim_files = _optim_files(tag_folder)
    first = _read_partition(optim_files[0])
    _check_rank_files(tag_folder, optim_files, first)
    partitions = [first] + [_read_partition(optim_files[rank]) for rank in range(1, first.world_size)]
    _check_partitions_agree(partitions)
    if first.stage <= 2:
        model = _read_model_states(_existing(tag_folder / STAGE12_MODEL_FILE, first))
        return _stage12_state_dict(model, partitions)
    models = [_read_model_states(path) for path in _stage3_model_files(tag_folder, first)]
    return _stage3_state_dict(models, partitions)


def _tag_folder(folder: Path, tag: str | None) -> Path:
    """The folder holding the rank files: ``folder/tag``, else ``folder/<content of latest>``, else ``folder``."""
    if not folder.is_dir():
        raise CheckpointError(f"ZeRO checkpoint {folder}: not a directory")
    if tag is not None:
        return _checked_tag_folder(folder, tag, source=f"tag={tag!r}")
    latest = folder / LATEST_FILE
    if latest.is_file():
        return _checked_tag_folder(folder, latest.read_text(encoding="utf-8").strip(), source=str(latest))
    if _has_optim_files(folder):
        return folder
    candidates = sorted(child.name for child in folder.iterdir() if _has_optim_files(child))
    hint = f"; tag folders present: {candidates}, pass tag= (--tag)" if candidates else ""
    raise CheckpointError(
        f"{latest}: missing and no tag given; a ZeRO checkpoint folder needs a 'latest' file naming the tag folder "
        f"that holds the *_optim_states.pt files{hint}"
    )


def _checked_tag_folder(folder: Path, tag: str, source: str) -> Path:
    """``folder/tag`` after checking that the tag is one plain folder name holding optimizer-state files."""
    if not tag or Path(tag).name != tag or tag in (".", ".."):
        raise CheckpointError(f"{source}: tag {tag!r} must be the name of a folder inside {folder}")
    tag_folder = folder / tag
    if not _has_optim_files(tag_folder):
        raise CheckpointError(f"{source}: tag folder {tag_folder} missing or holds no *_optim_states.pt files")
    return tag_folder


def _has_optim_files(folder: Path) -> bool:
    return folder.is_dir() and any(_OPTIM_FILE.fullmatch(path.name) for path in folder.iterdir())


def _optim_files(tag_folder: Path) -> dict[int, Path]:
    """Rank -> optimizer-state file; CheckpointError for model-parallel files, duplicate ranks or no rank 0."""
    files: dict[int, Path] = {}
    for path in sorted(tag_folder.iterdir()):
        match = _OPTIM_FILE.fullmatch(path.name)
        if match is None:
            continue
        if int(match["mp"]) != 0:
            raise CheckpointError(
                f"{path}: model-parallel rank {int(match['mp'])}; only data-parallel ZeRO checkpoints (mp_rank_00) "
                "are supported, as in zero_to_fp32"
            )
        rank = int(match["rank"])
        if rank in files:
            raise CheckpointError(f"{path} and {files[rank].name}: two optimizer-state files for rank {rank}")
        files[rank] = path
    if 0 not in files:
        raise CheckpointError(f"{tag_folder / _optim_name('', 0)}: missing (rank 0 optimizer states)")
    return files


def _optim_name(prefix: str, rank: int) -> str:
    return f"{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


def _check_rank_files(tag_folder: Path, files: dict[int, Path], first: _Partition) -> None:
    """One optimizer-state file per rank 0..world_size-1, world_size being rank 0's ``partition_count``."""
    prefix = _OPTIM_FILE.fullmatch(first.path.name)["prefix"]
    missing = [rank for rank in range(first.world_size) if rank not in files]
    if missing:
        raise CheckpointError(
            f"{tag_folder / _optim_name(prefix, missing[0])}: missing; {first.path.name} says partition_count "
            f"{first.world_size}, so ranks 0..{first.world_size - 1} each need an optimizer-state file "
            f"(missing ranks {missing})"
        )
    extra = sorted(rank for rank in files if rank >= first.world_size)
    if extra:
        raise CheckpointError(
            f"{tag_folder}: world-size mismatch: optimizer-state files for ranks {sorted(files)} but "
            f"{first.path.name} says partition_count {first.world_size} (files of ranks {extra} left from another "
            "save?)"
        )


def _stage3_model_files(tag_folder: Path, first: _Partition) -> list[Path]:
    """Stage 3 keeps one model-states file per rank: exactly ranks 0..world_size-1."""
    ranks = sorted(
        int(match["rank"])
        for path in tag_folder.iterdir()
        if (match := _STAGE3_MODEL_FILE.fullmatch(path.name)) is not None and int(match["mp"]) == 0
    )
    extra = [rank for rank in ranks if rank >= first.world_size]
    if extra:
        raise CheckpointError(
            f"{tag_folder}: world-size mismatch: model-states files for ranks {ranks} but {first.path.name} says "
            f"partition_count {first.world_size}"
        )
    return [
        _existing(tag_folder / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt", first)
        for rank in range(first.world_size)
    ]


def _existing(path: Path, first: _Partition) -> Path:
    if not path.is_file():
        raise CheckpointError(
            f"{path}: missing; a ZeRO stage {first.stage} checkpoint with world size {first.world_size} "
            f"(from {first.path.name}) needs it"
        )
    return path


def _load(path: Path) -> dict[str, Any]:
    """One checkpoint file via ``torch.load(weights_only=True)``, DeepSpeed's globals replaced by inert stand-ins."""
    payload = torch_load(path, stand_in_for=_stand_in, known_globals=_KNOWN_DEEPSPEED_GLOBALS)
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: holds a {type(payload).__name__}, expected a dict")
    return payload


def _stand_in(global_name: str) -> type | None:
    """``ZeroStage`` for DeepSpeed's ZeroStageEnum (its value is read), an inert record for other DeepSpeed
    classes, None (refused) for anything outside DeepSpeed."""
    if not global_name.startswith(_DEEPSPEED_PREFIX):
        return None
    if global_name.rsplit(".", 1)[-1] == _ZERO_STAGE_CLASS:
        return ZeroStage
    return inert_stand_in(global_name, base=DeepSpeedRecord)


def _read_partition(path: Path) -> _Partition:
    """A rank's fp32 master partition plus the stage and world size it declares."""
    optimizer = _load(path).get("optimizer_state_dict")
    if not isinstance(optimizer, Mapping) or "zero_stage" not in optimizer:
        raise CheckpointError(f"{path}: not a ZeRO optimizer-state file (no optimizer_state_dict['zero_stage'])")
    stage = optimizer["zero_stage"]
    if isinstance(stage, bool) or not isinstance(stage, int) or stage not in _SUPPORTED_STAGES:
        raise CheckpointError(f"{path}: unsupported ZeRO stage {stage!r}; expected one of {_SUPPORTED_STAGES}")
    key = "single_partition_of_fp32_groups" if stage <= 2 else "fp32_flat_groups"
    return _Partition(
        path=path,
        stage=int(stage),
        world_size=_world_size(optimizer.get("partition_count"), path),
        flat_groups=_flat_groups(optimizer.get(key), path, key),
        alignment_paddings=_alignment_paddings(optimizer.get("param_alignment_paddings"), path),
    )


def _world_size(partition_count: object, path: Path) -> int:
    """``partition_count``: an int (stage 3) or one int per param group (stage 1/2); they must agree."""
    counts = list(partition_count) if isinstance(partition_count, (list, tuple)) else [partition_count]
    if not counts or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in counts):
        raise CheckpointError(f"{path}: partition_count {partition_count!r} is not a positive int (or list of them)")
    if len(set(counts)) != 1:
        raise CheckpointError(
            f"{path}: partition_count {counts} differs between param groups (MoE expert groups); only one "
            "data-parallel world size is supported"
        )
    return counts[0]


def _flat_groups(groups: object, path: Path, key: str) -> list[Tensor]:
    if isinstance(groups, Tensor):
        groups = [groups]
    if not isinstance(groups, (list, tuple)) or not all(isinstance(g, Tensor) for g in groups):
        raise CheckpointError(f"{path}: optimizer_state_dict[{key!r}] must be a list of tensors, got {type(groups)}")
    return [group.reshape(-1) for group in groups]


def _alignment_paddings(paddings: object, path: Path) -> list[list[int]] | None:
    if paddings is None:
        return None
    if not isinstance(paddings, (list, tuple)) or not all(isinstance(group, (list, tuple)) for group in paddings):
        raise CheckpointError(f"{path}: param_alignment_paddings must be a list of lists of ints, got {paddings!r}")
    return [[int(value) for value in group] for group in paddings]


def _check_partitions_agree(partitions: Sequence[_Partition]) -> None:
    first = partitions[0]
    for partition in partitions[1:]:
        if (partition.stage, partition.world_size) != (first.stage, first.world_size):
            raise CheckpointError(
                f"{partition.path}: ZeRO stage {partition.stage}, partition_count {partition.world_size}; "
                f"{first.path.name} says stage {first.stage}, partition_count {first.world_size}"
            )
        if len(partition.flat_groups) != len(first.flat_groups):
            raise CheckpointError(
                f"{partition.path}: {len(partition.flat_groups)} fp32 groups; {first.path.name} has "
                f"{len(first.flat_groups)}"
            )


def _read_model_states(path: Path) -> _ModelStates:
    state = _load(path)
    for key in ("module", "buffer_names", "param_shapes"):
        if key not in state:
            raise CheckpointError(f"{path}: not a DeepSpeed model-states file (key {key!r} missing)")
    module, buffer_names, param_shapes = state["module"], state["buffer_names"], state["param_shapes"]
    if not isinstance(module, Mapping) or not isinstance(buffer_names, (list, tuple)):
        raise CheckpointError(f"{path}: 'module' must be a state_dict and 'buffer_names' a list of names")
    if isinstance(param_shapes, Mapping):
        param_shapes = [param_shapes]
    if not isinstance(param_shapes, (list, tuple)):
        raise CheckpointError(f"{path}: param_shapes must be a list of name -> shape maps, got {param_shapes!r}")
    return _ModelStates(
        path=path,
        buffers={name: tensor for name, tensor in module.items() if name in set(buffer_names)},
        param_shapes=[_shapes(group, path, "param_shapes") for group in param_shapes],
        frozen_param_shapes=_shapes(state.get("frozen_param_shapes") or {}, path, "frozen_param_shapes"),
        frozen_param_fragments=dict(state.get("frozen_param_fragments") or {}),
        shared_params=dict(state.get("shared_params") or {}),
    )


def _shapes(shapes: object, path: Path, key: str) -> dict[str, torch.Size]:
    if not isinstance(shapes, Mapping):
        raise CheckpointError(f"{path}: {key} must map parameter names to shapes, got {type(shapes).__name__}")
    try:
        return {str(name): torch.Size(shape) for name, shape in shapes.items()}
    except TypeError as error:
        raise CheckpointError(f"{path}: {key} holds a value that is not a shape: {error}") from error


def _stage12_state_dict(model: _ModelStates, partitions: Sequence[_Partition]) -> dict[str, Tensor]:
    state = _fp32_buffers(model)
    for name, shape in model.frozen_param_shapes.items():
        fragment = _fragment(model, name)
        if fragment.numel() != shape.numel():
            raise CheckpointError(
                f"{model.path}: frozen parameter {name!r} has {fragment.numel()} values, shape {shape}"
            )
        state[name] = _fp32_copy(fragment).reshape(shape)
    state.update(_stage12_trainable(model, partitions))
    return _with_shared(state, model)


def _stage12_trainable(model: _ModelStates, partitions: Sequence[_Partition]) -> dict[str, Tensor]:
    """Each group: the ranks' slices back to back, cut at the ``param_shapes`` sizes (plus alignment paddings)."""
    first = partitions[0]
    if len(first.flat_groups) != len(model.param_shapes):
        raise CheckpointError(
            f"{first.path}: {len(first.flat_groups)} fp32 groups; {model.path.name} lists {len(model.param_shapes)} "
            "param groups"
        )
    state: dict[str, Tensor] = {}
    for group_index, shapes in enumerate(model.param_shapes):
        pieces = [partition.flat_groups[group_index] for partition in partitions]
        paddings = _group_paddings(first, group_index, len(shapes))
        offset = 0
        for (name, shape), padding in zip(shapes.items(), paddings, strict=True):
            state[name] = _gather(pieces, offset, shape.numel(), f"{first.path.parent}: {name!r}").reshape(shape)
            offset += shape.numel() + padding
        _check_consumed(first, group_index, offset, sum(piece.numel() for piece in pieces))
    return state


def _group_paddings(first: _Partition, group_index: int, n_params: int) -> list[int]:
    if first.alignment_paddings is None:
        return [0] * n_params
    if group_index >= len(first.alignment_paddings) or len(first.alignment_paddings[group_index]) != n_params:
        raise CheckpointError(
            f"{first.path}: param_alignment_paddings has no entry per parameter of group {group_index} "
            f"({n_params} parameters)"
        )
    return first.alignment_paddings[group_index]


def _check_consumed(first: _Partition, group_index: int, used: int, available: int) -> None:
    """As zero_to_fp32: both counts rounded up to 2 * world_size must agree (DeepSpeed pads groups that much)."""
    align = 2 * first.world_size
    if math.ceil(used / align) != math.ceil(available / align):
        raise CheckpointError(
            f"{first.path.parent}: param group {group_index}: the parameter shapes use {used} values but the ranks' "
            f"fp32 partitions hold {available} (compared after rounding up to {align}); the files do not belong "
            "together"
        )


def _stage3_state_dict(models: Sequence[_ModelStates], partitions: Sequence[_Partition]) -> dict[str, Tensor]:
    first_model = models[0]
    state = _fp32_buffers(first_model)
    world_size = len(partitions)
    for name, shape in first_model.frozen_param_shapes.items():
        slices = [_fragment(model, name).reshape(-1) for model in models]
        state[name] = _gather(slices, 0, shape.numel(), f"{first_model.path.parent}: frozen {name!r}").reshape(shape)
    shapes = {name: shape for group in first_model.param_shapes for name, shape in group.items()}
    available = _stage3_available(partitions)
    offset = 0
    for name, shape in shapes.items():
        per_rank = math.ceil(shape.numel() / world_size)
        where = f"{partitions[0].path.parent}: {name!r}"
        padded = torch.cat([_gather(p.flat_groups, offset, per_rank, where) for p in partitions])
        state[name] = (padded if padded.numel() == shape.numel() else padded[: shape.numel()].clone()).reshape(shape)
        offset += per_rank
    if offset != available:
        raise CheckpointError(
            f"{partitions[0].path.parent}: the parameter shapes use {offset} values per rank but each rank's fp32 "
            f"partition holds {available}; the files do not belong together"
        )
    return _with_shared(state, first_model)


def _stage3_available(partitions: Sequence[_Partition]) -> int:
    sizes = [sum(group.numel() for group in partition.flat_groups) for partition in partitions]
    if len(set(sizes)) != 1:
        raise CheckpointError(
            f"{partitions[0].path.parent}: ranks hold fp32 partitions of different sizes {sizes}; stage 3 "
            "partitions are equal"
        )
    return sizes[0]


def _fragment(model: _ModelStates, name: str) -> Tensor:
    fragment = model.frozen_param_fragments.get(name)
    if not isinstance(fragment, Tensor):
        raise CheckpointError(f"{model.path}: frozen parameter {name!r} has a shape but no fragment")
    return fragment


def _gather(pieces: Sequence[Tensor], start: int, numel: int, where: str) -> Tensor:
    """Values ``start .. start+numel`` of the pieces laid end to end, as a new fp32 (or integer) tensor."""
    chunks = []
    piece_start = 0
    for piece in pieces:
        low, high = max(start, piece_start), min(start + numel, piece_start + piece.numel())
        if low < high:
            chunks.append(piece[low - piece_start : high - piece_start])
        piece_start += piece.numel()
    found = sum(chunk.numel() for chunk in chunks)
    if found != numel:
        raise CheckpointError(
            f"{where}: needs values {start}..{start + numel} of the fp32 partitions, which hold only {piece_start}"
        )
    return _as_fp32(torch.cat(chunks)) if chunks else torch.zeros(0)


def _fp32_buffers(model: _ModelStates) -> dict[str, Tensor]:
    return {name: _fp32_copy(tensor) for name, tensor in model.buffers.items()}


def _fp32_copy(tensor: Tensor) -> Tensor:
    """A copy that owns its memory; floating tensors as fp32 (zero_to_fp32 upcasts buffers the same way)."""
    return _as_fp32(tensor.detach().clone())


def _as_fp32(tensor: Tensor) -> Tensor:
    return tensor.float() if tensor.is_floating_point() else tensor


def _with_shared(state: dict[str, Tensor], model: _ModelStates) -> dict[str, Tensor]:
    """Tied aliases get the very tensor of the name they alias (zero_to_fp32 does the same)."""
    for alias, source in model.shared_params.items():
        if source in state:
            state[alias] = state[source]
    return state
