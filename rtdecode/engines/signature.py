"""What an engine takes and gives: named float32 inputs of known shape, named outputs."""

import dataclasses
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from rtdecode.errors import EngineError


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One input: its name and shape; ``None`` marks an axis of any size (the batch axis of an ONNX graph)."""

    name: str
    shape: tuple[int | None, ...]

    def describe(self) -> str:
        return "(" + ", ".join("any" if size is None else str(size) for size in self.shape) + ")"


@dataclasses.dataclass(frozen=True)
class Signature:
    """A stage's inputs (in call order) and output names."""

    stage: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[str, ...]

    @classmethod
    def of(cls, stage: str, input_shapes: Mapping[str, Sequence[int]], outputs: Sequence[str],
           *, dynamic_batch: bool = False) -> "Signature":  # fmt: skip
        """From ``{name: shape}`` in call order; ``dynamic_batch`` frees the first axis of every input."""
        specs = tuple(
            TensorSpec(name, (None, *shape[1:]) if dynamic_batch else tuple(shape))
            for name, shape in input_shapes.items()
        )
        return cls(stage, specs, tuple(outputs))

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.inputs)

    def check(self, inputs: Sequence[object]) -> None:
        """EngineError naming the stage, the input, the expected and the given shape, for any input that does
        not fit. Every backend calls this first, so they all refuse the same inputs with the same words."""
        if len(inputs) != len(self.inputs):
            raise EngineError(
                f"engine {self.stage!r} takes {len(self.inputs)} inputs {list(self.input_names)}, got {len(inputs)}"
            )
        for spec, value in zip(self.inputs, inputs, strict=True):
            if not isinstance(value, Tensor) or not torch.is_floating_point(value):
                got = f"a {value.dtype} tensor" if isinstance(value, Tensor) else type(value).__name__
                raise EngineError(f"engine {self.stage!r}: input {spec.name!r} must be a floating tensor, got {got}")
            fits = value.ndim == len(spec.shape) and all(
                want is None or want == size for want, size in zip(spec.shape, value.shape, strict=False)
            )
            if not fits:
                raise EngineError(
                    f"engine {self.stage!r}: input {spec.name!r} must have shape {spec.describe()}, "
                    f"got {tuple(value.shape)}"
                )
