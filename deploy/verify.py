"""``rtdecode verify-engines``: every engine of a subject against torch, on the fixtures saved at build time.

The error measure is the relative RMS error of each output, ``||engine - torch|| / ||torch||``, compared with a
tolerance per precision; the largest absolute difference is reported beside it. An engine that cannot run here
(stale for this host, or its backend missing) is reported as such, not as a pass.
"""

import dataclasses
import json
import math
from pathlib import Path

import torch

from deploy.build import FIXTURES_DIR, load_fixture
from rtdecode.engines.loading import open_engine
from rtdecode.engines.manifest import EngineEntry, EngineManifest, current_platform, stale_reasons
from rtdecode.errors import EngineError
from rtdecode.file_integrity import write_atomically
from rtdecode.stage_engines import VERIFY_REPORT_FILE

# relative RMS error allowed per precision: fp32 differs from torch by kernel order only; fp16 keeps ~3 decimal
# digits through a deep UNet; bf16 ~2.
TOLERANCES = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 5e-2, "fp8": 1e-1}


@dataclasses.dataclass
class StageCheck:
    stage: str
    backend: str
    precision: str
    status: str  # pass | fail | cannot_run
    tolerance: float
    relative_rms_error: dict[str, float] = dataclasses.field(default_factory=dict)
    max_abs_error: dict[str, float] = dataclasses.field(default_factory=dict)
    reason: str = ""


def verify_engines(folder: Path, device: str) -> list[StageCheck]:
    """One check per engine of ``folder``'s manifest; also written to ``folder/verify.json``, where the daemon
    reads which engines failed (and runs those stages in torch)."""
    manifest = EngineManifest.read(Path(folder))
    platform_reasons = stale_reasons(manifest, Path(folder), current_platform(), weights_sha256=None)
    checks = [_check(entry, Path(folder), device, platform_reasons[entry.stage]) for entry in manifest.engines]
    report = {"subject": manifest.subject, "device": device, "checks": [dataclasses.asdict(c) for c in checks]}
    write_atomically(Path(folder) / VERIFY_REPORT_FILE, json.dumps(report, indent=1) + "\n")
    return checks


def _check(entry: EngineEntry, folder: Path, device: str, reasons: list[str]) -> StageCheck:
    check = StageCheck(entry.stage, entry.backend, entry.precision, "cannot_run", TOLERANCES[entry.precision])
    if reasons:
        check.reason = "; ".join(reasons)
        return check
    try:
        engine = open_engine(entry, folder, device)
        inputs, expected = load_fixture(folder / FIXTURES_DIR / f"{entry.stage}.npz")
        outputs = engine(*(inputs[name] for name in engine.signature.input_names))
    except EngineError as err:
        check.reason = str(err)
        return check
    for name, output in zip(entry.outputs, outputs, strict=True):
        reference = expected[name].to(output.device)
        difference = (output - reference).float()
        check.relative_rms_error[name] = float(difference.norm() / reference.norm().clamp_min(torch.finfo().tiny))
        check.max_abs_error[name] = float(difference.abs().max())
    within = all(error <= check.tolerance for error in check.relative_rms_error.values())  # NaN is not within
    check.status = "pass" if within else "fail"
    return check


def format_checks(checks: list[StageCheck]) -> str:
    """A table, one line per stage."""
    lines = [f"{'stage':<20} {'backend':<12} {'precision':<9} {'status':<10} {'rel. RMS err':>12} {'tolerance':>9}"
             f" {'max |diff|':>10}"]  # fmt: skip
    for check in checks:
        worst_rms = _worst(check.relative_rms_error.values())
        worst_abs = _worst(check.max_abs_error.values())
        lines.append(
            f"{check.stage:<20} {check.backend:<12} {check.precision:<9} {check.status:<10} {worst_rms:>12.2e} "
            f"{check.tolerance:>9.0e} {worst_abs:>10.2e}" + (f"  {check.reason}" if check.reason else "")
        )
    return "\n".join(lines)


def _worst(values) -> float:
    """The largest value; NaN when there is none or any is NaN (``max`` would skip a NaN after a number)."""
    values = list(values)
    return float("nan") if not values or any(math.isnan(v) for v in values) else max(values)
