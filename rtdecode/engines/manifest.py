"""The engine manifest: what was built, for which platform and weights, so a stale engine is never run.

``rtdecode build-engines`` writes ``engines/manifest.json`` in the subject bundle: the platform the engines were
built on (TensorRT, CUDA, GPU name and compute capability, onnxruntime, torch) and, per stage, the engine file, its
backend, precision, input shapes and the SHA-256 of the weights it was built from. TensorRT engines only run on the
TensorRT version and GPU that built them; any engine is stale once its weights change. :func:`stale_reasons` says,
per stage, why its engine cannot be used here, and the daemon then falls back to torch with that reason in its log.
"""

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path

from rtdecode.engines.signature import Signature
from rtdecode.errors import EngineError
from rtdecode.file_integrity import write_atomically

FORMAT = "rtdecode-engines"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
BACKENDS = ("onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "fp16", "bf16", "fp8")


@dataclasses.dataclass(frozen=True)
class Platform:
    """Versions and device an engine depends on (None: not present on this host)."""

    torch: str
    onnxruntime: str | None = None
    tensorrt: str | None = None
    cuda: str | None = None
    gpu: str | None = None
    compute_capability: str | None = None


@dataclasses.dataclass(frozen=True)
class EngineEntry:
    """One stage's engine."""

    stage: str
    file: str  # relative to the manifest's folder
    backend: str
    precision: str
    input_shapes: Mapping[str, tuple[int, ...]]  # in call order, at the serving shape it was built for
    outputs: tuple[str, ...]
    weights_sha256: str

    def signature(self) -> Signature:
        """What the engine takes: exactly the built shapes for TensorRT, any batch for an ONNX graph."""
        return Signature.of(self.stage, self.input_shapes, self.outputs, dynamic_batch=self.backend == "onnxruntime")


@dataclasses.dataclass(frozen=True)
class EngineManifest:
    subject: str
    platform: Platform
    engines: tuple[EngineEntry, ...]

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "subject": self.subject,
            "platform": dataclasses.asdict(self.platform),
            "engines": [
                {
                    **dataclasses.asdict(entry),
                    "input_shapes": {k: list(v) for k, v in entry.input_shapes.items()},
                    "outputs": list(entry.outputs),
                }
                for entry in self.engines
            ],
        }

    def write(self, folder: Path) -> Path:
        """``folder/manifest.json``, written atomically."""
        folder.mkdir(parents=True, exist_ok=True)
        return write_atomically(folder / MANIFEST_FILE, json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def read(cls, folder: Path) -> "EngineManifest":
        """The manifest in ``folder``; EngineError naming the file and the field when it is not one."""
        path = folder / MANIFEST_FILE
        try:
            value = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise EngineError(f"{path}: not a readable engine manifest ({err})") from None
        if not isinstance(value, dict) or value.get("format") != FORMAT:
            raise EngineError(f"{path}: not an engine manifest (format must be {FORMAT!r})")
        if value.get("format_version") != FORMAT_VERSION:
            raise EngineError(
                f"{path}: format_version {value.get('format_version')!r}, this rtdecode reads {FORMAT_VERSION}"
            )
        try:
            return cls(
                str(value["subject"]),
                Platform(**value["platform"]),
                tuple(_entry(item) for item in value["engines"]),
            )
        except (KeyError, TypeError) as err:
            raise EngineError(f"{path}: malformed engine manifest ({err!r})") from None


def _entry(item: Mapping) -> EngineEntry:
    entry = EngineEntry(
        str(item["stage"]), str(item["file"]), str(item["backend"]), str(item["precision"]),
        {str(name): tuple(int(size) for size in shape) for name, shape in item["input_shapes"].items()},
        tuple(str(name) for name in item["outputs"]),
        str(item["weights_sha256"]),
    )  # fmt: skip
    if entry.backend not in BACKENDS or entry.precision not in PRECISIONS:
        raise TypeError(f"stage {entry.stage!r}: backend {entry.backend!r} / precision {entry.precision!r}")
    return entry


def stale_reasons(
    manifest: EngineManifest,
    folder: Path,
    platform: Platform,
    weights_sha256: Mapping[str, str] | None,
    input_shapes: Mapping[str, Mapping[str, tuple[int, ...]]] | None = None,
) -> dict[str, list[str]]:
    """Per stage, why its engine cannot run on ``platform`` (an empty list: it can). ``weights_sha256`` holds the
    hashes of the weights each stage would run from now (None: not checked), ``input_shapes`` (when given) the
    shapes it would be fed."""
    return {
        entry.stage: _file_reasons(entry, folder, weights_sha256)
        + _shape_reasons(entry, input_shapes)
        + _platform_reasons(entry, manifest.platform, platform)
        for entry in manifest.engines
    }


def _shape_reasons(entry: EngineEntry, input_shapes: Mapping[str, Mapping[str, tuple[int, ...]]] | None) -> list[str]:
    if input_shapes is None or entry.stage not in input_shapes:
        return []
    wanted = {name: tuple(shape) for name, shape in input_shapes[entry.stage].items()}
    built = dict(entry.input_shapes)
    if entry.backend == "onnxruntime":  # any batch
        wanted = {name: shape[1:] for name, shape in wanted.items()}
        built = {name: shape[1:] for name, shape in built.items()}
    if list(wanted.items()) == list(built.items()):  # in order: engines are called positionally
        return []
    return [f"built for inputs {_shapes(built)}, the configured models feed {_shapes(wanted)}"]


def _shapes(shapes: Mapping[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{name} {tuple(shape)}" for name, shape in shapes.items())


def _file_reasons(entry: EngineEntry, folder: Path, weights_sha256: Mapping[str, str] | None) -> list[str]:
    reasons = []
    if not (folder / entry.file).is_file():
        reasons.append(f"engine file {entry.file} is missing")
    if weights_sha256 is None:
        return reasons
    current = weights_sha256.get(entry.stage)
    if current != entry.weights_sha256:
        reasons.append(f"weights changed since the build (sha256 {entry.weights_sha256[:12]} -> {str(current)[:12]})")
    return reasons


def _platform_reasons(entry: EngineEntry, built: Platform, here: Platform) -> list[str]:
    """A TensorRT engine needs the TensorRT version and the GPU that built it; an onnxruntime one needs
    onnxruntime (any version: the ONNX file is portable)."""
    if entry.backend == "onnxruntime":
        return [] if here.onnxruntime else ["onnxruntime is not installed here"]
    reasons = []
    for field, what in (("tensorrt", "TensorRT"), ("gpu", "GPU"), ("compute_capability", "compute capability")):
        was, now = getattr(built, field), getattr(here, field)
        if was != now:
            reasons.append(f"built for {what} {was}, this host has {now or 'none'}")
    return reasons


def current_platform() -> Platform:
    """This host's platform (TensorRT and onnxruntime only when they import; the GPU of cuda:0)."""
    import torch

    gpu = capability = cuda = None
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
        capability = "{}.{}".format(*torch.cuda.get_device_capability(0))
        cuda = torch.version.cuda
    return Platform(torch.__version__, _version_of("onnxruntime"), _version_of("tensorrt"), cuda, gpu, capability)


def _version_of(module_name: str) -> str | None:
    import importlib

    try:
        return str(importlib.import_module(module_name).__version__)
    except ImportError:
        return None
