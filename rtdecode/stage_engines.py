"""Which compiled engines a decoder runs, and swapping them in.

The subject bundle's ``engines/`` folder (``rtdecode build-engines``) holds a manifest. Before use, every engine is
checked against what the decoder would run now (:func:`rtdecode.engines.manifest.stale_reasons`: its file, the
SHA-256 of the weights, the serving shapes, the TensorRT version and GPU); a stage whose engine is missing, stale or
fails to open runs in torch, and the log says which and why. Nothing is rebuilt here: building takes minutes to
an hour and belongs before the session.
"""

import dataclasses
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

from torch import Tensor

from rtdecode.config import Config
from rtdecode.engines.engine import Engine
from rtdecode.engines.loading import open_engine
from rtdecode.engines.manifest import MANIFEST_FILE, EngineEntry, EngineManifest, current_platform, stale_reasons
from rtdecode.engines.weights import WeightHasher
from rtdecode.errors import EngineError
from rtdecode.generate.sampler import Conditioning, NoiseNet
from rtdecode.reconstruct import Reconstructor
from rtdecode.stage_graphs import StageGraph, decoder_graphs
from rtdecode.subject_bundle import SubjectBundle

log = logging.getLogger(__name__)
ENGINES_DIR = "engines"
VERIFY_REPORT_FILE = "verify.json"  # written by rtdecode verify-engines; a build drops its stages' verdicts


@dataclasses.dataclass
class EngineSelection:
    """The engines in use, and for every other stage the reason it runs in torch."""

    engines: dict[str, Engine]
    torch_reasons: dict[str, str]

    def summary(self) -> str:
        used = ", ".join(engine.describe() for engine in self.engines.values()) or "none"
        return f"engines in use: {used}; in torch: {', '.join(self.torch_reasons) or 'nothing'}"


def select_engines(folder: Path, subject: str, graphs: list[StageGraph], device: str) -> EngineSelection:
    """Open the fresh engines of ``folder`` for ``graphs``; the reason for every stage left to torch. Never raises
    for a problem with the engines themselves: the decoder can always run in torch."""
    build_hint = f"build them with: rtdecode build-engines --subject {subject}"
    folder = Path(folder)
    if not (folder / MANIFEST_FILE).is_file():
        reason = f"no engines built ({folder / MANIFEST_FILE} not found; {build_hint})"
        return EngineSelection({}, {graph.stage: reason for graph in graphs})
    try:
        manifest = EngineManifest.read(folder)
        reasons = _unusable(manifest, folder, subject, graphs, build_hint)
    except (EngineError, OSError) as err:
        return EngineSelection({}, {graph.stage: f"{err} ({build_hint})" for graph in graphs})
    entries = {entry.stage: entry for entry in manifest.engines}
    selection = EngineSelection({}, {})
    for graph in graphs:
        if reasons.get(graph.stage):
            selection.torch_reasons[graph.stage] = reasons[graph.stage]
        else:
            _open(entries[graph.stage], folder, device, selection)
    if "low_level" in selection.engines and "embed" not in selection.engines:
        del selection.engines["low_level"]
        selection.torch_reasons["low_level"] = "its input is the embed engine's output, and embed runs in torch"
    return selection


def _unusable(manifest: EngineManifest, folder: Path, subject: str, graphs: list[StageGraph],
              build_hint: str) -> dict[str, str]:  # fmt: skip
    """Per stage, why its engine cannot be used (not listed: it can)."""
    if manifest.subject != subject:
        reason = f"the engines in {folder} were built for subject {manifest.subject!r}; {build_hint}"
        return {graph.stage: reason for graph in graphs}
    built = {entry.stage for entry in manifest.engines}
    reasons = {g.stage: f"no engine built for this stage ({build_hint})" for g in graphs if g.stage not in built}
    stale = _stale(manifest, folder, [graph for graph in graphs if graph.stage in built])
    reasons |= {stage: f"stale: {'; '.join(why)} ({build_hint})" for stage, why in stale.items() if why}
    failed = verify_failures(folder)
    reasons |= {stage: why for stage, why in failed.items() if stage in built and stage not in reasons}
    return reasons


def verify_failures(folder: Path) -> dict[str, str]:
    """Stages that ``rtdecode verify-engines`` failed (its report, when there is one for these engines)."""
    path = folder / VERIFY_REPORT_FILE
    if not path.is_file():
        return {}
    try:
        checks = json.loads(path.read_text())["checks"]
        return {c["stage"]: f"rtdecode verify-engines failed it ({path})" for c in checks if c["status"] == "fail"}
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # an unreadable report is no evidence either way; verify-engines writes it again


def _stale(manifest: EngineManifest, folder: Path, graphs: list[StageGraph]) -> dict[str, list[str]]:
    hasher = WeightHasher(folder)
    weights = {graph.stage: hasher.files_sha256(graph.weight_files) for graph in graphs}
    try:
        hasher.save()
    except OSError as err:  # a read-only engines folder only costs hashing again at the next start
        log.warning("cannot update the weight-hash cache in %s (%s); the next start hashes again", folder, err)
    shapes = {graph.stage: graph.input_shapes for graph in graphs}
    reasons = stale_reasons(manifest, folder, current_platform(), weights, shapes)
    return {stage: why for stage, why in reasons.items() if stage in shapes}


def _open(entry: EngineEntry, folder: Path, device: str, selection: EngineSelection) -> None:
    try:
        selection.engines[entry.stage] = open_engine(entry, folder, device)
    except (EngineError, RuntimeError, OSError) as err:  # RuntimeError: CUDA out of memory and the like
        selection.torch_reasons[entry.stage] = f"its engine did not open: {err}"


def install_engines(reconstructor: Reconstructor, engines: Mapping[str, Engine]) -> None:
    """Swap the engines in for the torch modules they were built from."""
    reconstructor.use_engines(
        embed=engines.get("embed"), low_level=engines.get("low_level"), prior_step=engines.get("prior_step")
    )
    pipeline = reconstructor.pipeline
    if pipeline is None:
        return
    pipeline.unclip.use_networks(
        noise_net=_noise_net(engines.get("unclip_unet")), vae_decode=_single(engines.get("unclip_vae_decode"))
    )
    if pipeline.refiner is not None:
        pipeline.refiner.use_networks(
            noise_net=_noise_net(engines.get("refiner_unet")),
            vae_decode=_single(engines.get("refiner_vae_decode")),
            vae_encode=engines.get("refiner_vae_encode"),
        )
    if pipeline.low_level is not None:
        pipeline.low_level.use_networks(vae_decode=_single(engines.get("low_level_decode")))


def attach_engines(reconstructor: Reconstructor, config: Config, bundle: SubjectBundle) -> EngineSelection:
    """Select and install the bundle's engines per ``[generate] engines``, logging what runs where."""
    if config.generate.engines == "off":
        log.info("[generate] engines = 'off': every stage runs in torch")
        return EngineSelection({}, {})
    try:
        graphs = decoder_graphs(
            reconstructor.model,
            reconstructor.subject,
            reconstructor.pipeline,
            config.models,
            bundle.path("model"),
        )
    except (EngineError, OSError) as err:
        log.warning("running every stage in torch: the stages' weight files cannot be read (%s)", err)
        return EngineSelection({}, {})
    selection = select_engines(bundle.folder / ENGINES_DIR, reconstructor.subject, graphs, config.generate.device)
    by_reason: dict[str, list[str]] = {}
    for stage, reason in selection.torch_reasons.items():
        by_reason.setdefault(reason, []).append(stage)
    for reason, stages in by_reason.items():
        log.warning("running in torch (no compiled engine) for %s: %s", ", ".join(stages), reason)
    install_engines(reconstructor, selection.engines)
    log.info(selection.summary())
    return selection


def _noise_net(engine: Engine | None) -> NoiseNet | None:
    if engine is None:
        return None
    added_names = engine.signature.input_names[3:]  # after sample, timestep, context

    def predict_noise(x: Tensor, index: Tensor, cond: Conditioning) -> Tensor:
        return engine(x, index.float(), cond.context, *(cond.added[name] for name in added_names))[0]

    return predict_noise


def _single(engine: Engine | None) -> Callable[[Tensor], Tensor] | None:
    return None if engine is None else (lambda value: engine(value)[0])
