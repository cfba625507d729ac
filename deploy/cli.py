"""The deploy commands: ``rtdecode build-engines``, ``verify-engines`` and ``bench engines`` (loaded lazily by the
``rtdecode`` command)."""

import logging
from pathlib import Path

import click

# rtdecode.stage_graphs.STAGES, spelled out so that --help imports no torch (a test keeps them equal)
STAGE_NAMES = (
    "embed", "prior_step", "low_level", "unclip_unet", "unclip_vae_decode", "refiner_unet", "refiner_vae_encode",
    "refiner_vae_decode", "low_level_decode",
)  # fmt: skip


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _engines_dir(config) -> Path:
    from rtdecode.stage_engines import ENGINES_DIR
    from rtdecode.store import Store

    return Store(config.home).bundle_dir(config.subject.id) / ENGINES_DIR


@click.command("build-engines")
@click.option("--subject", help="Subject id (default: subject.id).")
@click.option(
    "--backend",
    type=click.Choice(["tensorrt", "onnx"]),
    default="tensorrt",
    show_default=True,
    help="tensorrt: ONNX, then TensorRT engines for this GPU; onnx: the ONNX graphs, run with onnxruntime.",
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16", "bf16", "fp8"]),
    help="Engine precision (default: fp16 for tensorrt, fp32 for onnx, its only one). fp8 is refused: it needs "
    "a Q/DQ-calibrated graph.",
)
@click.option("--stage", "stages", multiple=True, type=click.Choice(STAGE_NAMES), help="Repeatable; default: all.")
@click.option("--device", help="Device the torch weights load on for export and fixtures (default: cuda if present).")
@click.option("--workspace-gib", type=click.FloatRange(min=0.5), help="TensorRT builder workspace limit.")
@click.option(
    "--optimization-level", type=click.IntRange(0, 5), default=3, show_default=True, help="TensorRT builder level."
)
@click.pass_obj
def build_engines(obj, subject, backend, precision, stages, device, workspace_gib, optimization_level) -> None:
    """Export and build the compiled engines of one subject's decoder into its bundle (engines/).

    Every GPU stage the configured decoder runs (the model's embed, prior step and low-level head; the unCLIP
    UNet and VAE decoder; the refiner's UNet and VAE; the low-level VAE) is exported to ONNX (weights beside the
    graph above 2 GB), its torch outputs saved as a fixture, and with --backend tensorrt built into a TensorRT
    engine at its static serving shape with a timing cache. manifest.json records the TensorRT/CUDA/GPU versions,
    the weights' SHA-256, shapes and precision; rtdecode serve uses an engine only while all of them still hold,
    and runs torch otherwise, saying why in its log.

    Build on the GPU host that will serve, after calibration, and again after any change of weights, GPU or
    TensorRT. Then check with: rtdecode verify-engines --subject ID

    \b
    Examples:
      rtdecode build-engines --subject new01                      # TensorRT fp16, every stage
      rtdecode build-engines --subject new01 --backend onnx       # onnxruntime, fp32
      rtdecode build-engines --subject new01 --stage unclip_unet --precision bf16
    """
    from deploy.build import BuildSettings
    from deploy.build import build_engines as run_build

    for chatty in ("onnx_ir", "onnxscript"):  # an INFO line per folded constant and de-duplicated initializer
        logging.getLogger(chatty).setLevel(logging.WARNING)

    config = obj.load_subject({"subject.id": subject})
    settings = BuildSettings(
        backend=backend,
        precision=precision or ("fp16" if backend == "tensorrt" else "fp32"),
        stages=tuple(stages),
        device=device or _default_device(),
        workspace_bytes=None if workspace_gib is None else int(workspace_gib * 2**30),
        optimization_level=optimization_level,
    )
    manifest = run_build(config, config.subject.id, settings, echo=click.echo)
    click.echo(f"{len(manifest.engines)} engines for {manifest.subject} in {_engines_dir(config)}")
    click.echo(f"check them with: rtdecode verify-engines --subject {manifest.subject}")


@click.command("verify-engines")
@click.option("--subject", help="Subject id (default: subject.id).")
@click.option("--device", help="Device to run the engines on (default: cuda if present).")
@click.pass_obj
def verify_engines(obj, subject, device) -> None:
    """Run each built engine on its saved fixture and compare with torch's outputs.

    The measure is the relative RMS error per output against a tolerance per precision (fp32 1e-3, fp16 2e-2,
    bf16 5e-2); the largest absolute difference is printed beside it. Engines that cannot run on this host
    (another GPU or TensorRT version, backend missing) are listed as cannot_run with the reason. The report is
    also written to engines/verify.json; rtdecode serve runs the stages whose engine failed in torch. Exit status
    1 when any engine fails or cannot run.
    """
    from deploy.verify import format_checks
    from deploy.verify import verify_engines as run_verify
    from rtdecode.stage_engines import VERIFY_REPORT_FILE

    config = obj.load_subject({"subject.id": subject})
    folder = _engines_dir(config)
    checks = run_verify(folder, device or _default_device())
    click.echo(format_checks(checks))
    click.echo(f"report: {folder / VERIFY_REPORT_FILE}")
    if any(check.status != "pass" for check in checks):
        raise SystemExit(1)


@click.command("engines")
@click.option("--subject", help="Subject id (default: subject.id).")
@click.option("--stage", "stages", multiple=True, type=click.Choice(STAGE_NAMES), help="Repeatable; default: all.")
@click.option("--device", help="Default: cuda if present.")
@click.option(
    "--torch-mode",
    "torch_modes",
    multiple=True,
    type=click.Choice(["eager", "compile"]),
    help="Repeatable (default: eager and compile).",
)
@click.option("--repeats", type=click.IntRange(min=1), default=20, show_default=True, help="Timed calls per backend.")
@click.option("--warmup", type=click.IntRange(min=1), default=3, show_default=True, help="Untimed calls first.")
@click.pass_obj
def bench_engines(obj, subject, stages, device, torch_modes, repeats, warmup) -> None:
    """Per-stage latency: torch eager, torch compiled, and the subject's built engines (onnxruntime, TensorRT).

    Every backend runs the same inputs at the serving shape; the times include the device synchronisation.
    Weights are the subject's, in float32 for torch (the engines carry their own precision).
    """
    from deploy.bench import HEADER
    from deploy.bench import bench_engines as run_bench
    from deploy.build import load_graphs

    config = obj.load_subject({"subject.id": subject})
    device = device or _default_device()
    graphs = [g for g in load_graphs(config, config.subject.id, device) if not stages or g.stage in stages]
    click.echo(f"device {device}, {repeats} calls after {warmup} warm-up per backend")
    click.echo(HEADER)
    run_bench(
        graphs, _engines_dir(config), device=device, torch_modes=tuple(torch_modes) or ("eager", "compile"),
        n_warmup=warmup, n_reps=repeats, echo=click.echo,
    )  # fmt: skip
