"""Reading weight files safely, and checking them against a model. One place for all of it.

* :func:`torch_load`: ``torch.load(weights_only=True)`` on CPU, memory-mapped when the file is a zip
  archive. Nothing in a file is executed. A caller may let named foreign objects (DeepSpeed's loss
  scaler, an lr-scheduler's bound method) load as *inert stand-ins*: our own empty classes, listed
  with torch's ``safe_globals`` for that one load, so the weights beside them can still be read.
* :func:`read_safetensors`: memory-mapped tensors of a safetensors file (optionally some keys only).
* :func:`check_state`: every expected key with its shape and nothing else, or one error listing all
  the differences.
"""

import pickle
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from rtdecode.errors import CheckpointError

MAX_LISTED_KEYS = 20


class InertRecord:
    """Stand-in for a foreign object in a checkpoint: keeps the pickled arguments and state, runs nothing.

    The weights-only unpickler calls the class with the pickled arguments, or creates it bare and fills its
    ``__dict__``; either way nothing is read from it later.
    """

    global_name = "?"

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.args = args

    def __repr__(self) -> str:
        return f"<stand-in for {self.global_name}>"


def inert_stand_in(global_name: str, base: type[InertRecord] = InertRecord) -> type:
    """A fresh ``base`` subclass named after ``global_name`` (usable as a ``stand_in_for``)."""
    short_name = global_name.rsplit(".", 1)[-1] or "record"
    return type(short_name, (base,), {"global_name": global_name, "__module__": base.__module__})


def torch_load(
    path: Path, *, stand_in_for: Callable[[str], type | None] | None = None, known_globals: Iterable[str] = ()
) -> Any:
    """A torch checkpoint file, loaded with ``weights_only=True`` (and ``mmap`` for zip archives).

    ``stand_in_for(global_name)`` returns the inert class to build instead of a global the pickle names, or
    None to refuse it (the default refuses everything torch does not allow). It is asked about the globals
    torch finds in a zip archive and about ``known_globals`` (which also covers legacy, non-zip files).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    is_zip = zipfile.is_zipfile(path)
    stand_ins = _stand_ins(path, is_zip, stand_in_for, known_globals) if stand_in_for is not None else []
    with torch.serialization.safe_globals(stand_ins):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
        except pickle.UnpicklingError as error:
            raise CheckpointError(
                f"{path}: refused by the safe loader (weights_only=True): {_unpickler_reason(error)}"
            ) from None
        except (RuntimeError, EOFError, OSError, ValueError) as error:
            raise CheckpointError(f"{path}: not a readable torch checkpoint ({error})") from None


def read_safetensors(path: Path, keep: Callable[[str], bool] = lambda key: True) -> dict[str, Tensor]:
    """The tensors of a safetensors file whose key ``keep`` accepts, memory-mapped (not copied)."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys() if keep(key)}
    except Exception as error:  # safetensors raises its own SafetensorError, OSError for unreadable files
        raise CheckpointError(f"{path}: unreadable safetensors file ({error})") from None


def expected_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a module's state_dict (build the module on the meta device: no memory)."""
    return {key: tuple(value.shape) for key, value in module.state_dict().items()}


def check_state(
    expected: Mapping[str, tuple[int, ...]], state: Mapping[str, Any], source: str, *, hint: str = ""
) -> None:
    """Every expected key present with its shape and nothing else, or one CheckpointError listing it all."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mis_shaped = [
        f"{k}: expected {tuple(expected[k])}, found {_shape(state[k])}"
        for k in expected
        if k in state and _shape(state[k]) != tuple(expected[k])
    ]
    problems = [
        _listing(title, items)
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped))
        if items
    ]
    if problems:
        raise CheckpointError(f"{source} does not match the model:\n" + "\n".join(problems) + hint)


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(getattr(value, "shape", ()))


def _listing(title: str, items: list[str]) -> str:
    shown = "\n    ".join(items[:MAX_LISTED_KEYS])
    more = f"\n    ... and {len(items) - MAX_LISTED_KEYS} more" if len(items) > MAX_LISTED_KEYS else ""
    return f"  {len(items)} {title} key(s):\n    {shown}{more}"


def _stand_ins(
    path: Path, is_zip: bool, stand_in_for: Callable[[str], type | None], known_globals: Iterable[str]
) -> list[tuple[type, str]]:
    """(stand-in, global name) pairs for the globals the file's pickle names that ``stand_in_for`` accepts."""
    names = set(known_globals)
    if is_zip:  # torch lists the globals of zip archives only
        try:
            names.update(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except (RuntimeError, ValueError, pickle.UnpicklingError) as error:
            raise CheckpointError(f"{path}: cannot list the globals its pickle uses: {error}") from None
    pairs = []
    for name in sorted(names):
        stand_in = stand_in_for(name)
        if stand_in is not None:
            pairs.append((stand_in, name))
    return pairs


def _unpickler_reason(error: Exception) -> str:
    """The line of torch's message that names the refused global, without its advice to retry unsafely."""
    lines = [line.strip() for line in str(error).replace("WeightsUnpickler error:", "\n").splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or "Unsupported" in line:
            return line
    return lines[-1] if lines else type(error).__name__
