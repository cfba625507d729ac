"""The ``rtdecode`` command: parse arguments, load the config, call library code.

Heavy modules are imported inside the commands that need them, so ``rtdecode --help`` is fast.
"""

import dataclasses
import importlib
import signal
import sys
import threading
from pathlib import Path

import click

from rtdecode import __version__
from rtdecode.errors import RtDecodeError
from rtdecode.sim import LAYOUTS


@dataclasses.dataclass
class _Globals:
    config_path: Path | None
    overrides: tuple[str, ...]

    def load(self, *extra: str):
        from rtdecode.config import load_config

        return load_config(self.config_path, self.overrides + tuple(extra))

    def load_subject(self, flags: dict):
        """The config with the command's ``flags`` (``section.key`` -> value or None); a UsageError when it names
        no subject."""
        from rtdecode.config import flag_overrides

        config, _ = self.load(*flag_overrides(flags))
        if config.subject.id is None:
            raise click.UsageError("no subject: give --subject ID or set subject.id")
        return config


def _shape(text: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(n) for n in text.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"expected NXxNYxNZ such as 81x104x83, got {text!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise click.BadParameter(f"expected three positive sizes such as 81x104x83, got {text!r}")
    return shape


class _LazyGroup(click.Group):
    """A group with commands that live in the packages above the runtime (``trainer``, ``calibration``).

    rtdecode never imports them at module level (import rule: they import rtdecode, not the reverse);
    ``lazy_commands`` maps a command name to ``"module:attribute"``, imported only when that command or
    the group's help is asked for.
    """

    def __init__(self, *args, lazy_commands: dict[str, str] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands = dict(lazy_commands or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy_commands:
            module, attribute = self.lazy_commands[name].split(":")
            return getattr(importlib.import_module(module), attribute)
        return super().get_command(ctx, name)


@click.group(
    cls=_LazyGroup,
    lazy_commands={
        "pretrain": "trainer.cli:pretrain",
        "calibrate": "calibration.cli:calibrate",
        "serve": "rtdecode.serve_cli:serve",
        "decode-worker": "rtdecode.serve_cli:decode_worker",
        "keys": "rtdecode.serve_cli:keys",
        "view": "rtdecode.view.cli:view",
        "evaluate": "rtdecode.evaluate_cli:evaluate",
        "demo": "calibration.demo_cli:demo",
        "build-engines": "deploy.cli:build_engines",
        "verify-engines": "deploy.cli:verify_engines",
    },
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="rtdecode")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    help="Config file (TOML). Default: $RTDECODE_CONFIG, else $RTDECODE_HOME/config.toml if present.",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override one config value, e.g. --set scanner.tr_s=1.5 (repeatable).",
)
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    help="Default: INFO (demo: ERROR, as it prints its own report).",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="json: one object per line, for log collectors.",
)
@click.pass_context
def cli(ctx: click.Context, config_path, overrides, log_level, log_format) -> None:
    """rtdecode: real-time fMRI decoding (MindEye2) next to the scanner.

    Every command reads one TOML config (see `rtdecode config show`), validated before any work
    starts; --set and the commands' own flags override it.
    """
    from rtdecode.logs import configure_logging

    quiet_default = ctx.invoked_subcommand == "demo"
    configure_logging((log_level or ("ERROR" if quiet_default else "INFO")).upper(), log_format)
    ctx.obj = _Globals(config_path, tuple(overrides))


# -- config / store ------------------------------------------------------------------------------


@cli.group("config")
def config_group() -> None:
    """Inspect the configuration."""


@config_group.command("show")
@click.pass_obj
def config_show(g: _Globals) -> None:
    """Print the resolved config as TOML: every key, its value and what it means."""
    from rtdecode.config import render_config

    config, sources = g.load()
    click.echo(render_config(config, sources), nl=False)


@cli.group("store")
def store_group() -> None:
    """The subject and session store under RTDECODE_HOME."""


@store_group.command("list")
@click.pass_obj
def store_list(g: _Globals) -> None:
    """List subjects and their sessions."""
    from rtdecode.store import Store

    config, _ = g.load()
    store = Store(config.home)
    subjects = store.subjects()
    click.echo(f"store: {store.home}")
    if not subjects:
        click.echo("  no subjects yet")
    for subject in subjects:
        sessions = ", ".join(str(s) for s in store.sessions(subject)) or "none"
        click.echo(f"  {subject}: sessions {sessions}")


# -- ingest --------------------------------------------------------------------------------------


@cli.command("ingest")
@click.option(
    "--watch", "watch_dir", type=click.Path(path_type=Path), help="Scanner export folder (default: paths.watch_dir)."
)
@click.option(
    "--mode",
    type=click.Choice(["auto", "inotify", "poll"]),
    help="Watch mode (default: scanner.watch_mode; auto polls on network filesystems).",
)
@click.option(
    "--format", "fmt", type=click.Choice(["auto", "dicom", "nifti"]), help="File format (default: scanner.format)."
)
@click.option("--tr", "tr_s", type=float, help="Repetition time in seconds (default: scanner.tr_s, else from headers).")
@click.option("--subject", help="Subject id: journal and quarantine go to its session in the store.")
@click.option("--session", type=int, help="Session number (default: subject.session).")
@click.option(
    "--quarantine",
    "quarantine_dir",
    type=click.Path(path_type=Path),
    help="Quarantine folder (default: the session's, else $RTDECODE_HOME/quarantine).",
)
@click.option(
    "--duration", "duration_s", type=float, help="Stop after this many seconds (default: run until Ctrl-C / SIGTERM)."
)
@click.option("--max-volumes", type=int, help="Stop after this many volumes.")
@click.pass_obj
def ingest(g: _Globals, watch_dir, mode, fmt, tr_s, subject, session, quarantine_dir, duration_s, max_volumes) -> None:
    """Run the ingest stage alone: watch a folder and log each volume with its latency.

    Each volume is logged with its latency from the watcher's hint that led to reading it (the file's
    close, in inotify mode) to the volume being available;
    gaps, duplicates, late and out-of-order volumes, run restarts and quarantined files are logged
    as warnings and written to the session journal (ingest.jsonl).
    """
    from rtdecode.config import flag_overrides
    from rtdecode.ingest.pipeline import Ingestor
    from rtdecode.ingest.service import consume
    from rtdecode.store import Journal, Store

    extra = flag_overrides(
        {
            "paths.watch_dir": watch_dir,
            "scanner.watch_mode": mode,
            "scanner.format": fmt,
            "scanner.tr_s": tr_s,
            "subject.id": subject,
            "subject.session": session,
            "paths.quarantine_dir": quarantine_dir,
        }
    )
    config, _ = g.load(*extra)
    if config.paths.watch_dir is None:
        raise click.UsageError("no folder to watch: give --watch DIR or set paths.watch_dir")
    store = Store(config.home)
    quarantine = config.paths.quarantine_dir or store.quarantine_dir(config.subject.id, config.subject.session)
    journal = None
    if config.subject.id is not None:
        journal = Journal(store.create_session(config.subject.id, config.subject.session) / "ingest.jsonl")
    ingestor = Ingestor(config.paths.watch_dir, config.scanner, quarantine)
    stop = threading.Event()
    _stop_on_signals(stop)
    click.echo(
        f"watching {ingestor.watch_dir} ({ingestor.mode}); quarantine: {quarantine}"
        + (f"; journal: {journal.path}" if journal else ""),
        err=True,
    )
    ingestor.start()
    summary = consume(ingestor, journal, stop, duration_s=duration_s, max_volumes=max_volumes)
    click.echo(summary.describe())


def _stop_on_signals(stop: threading.Event) -> None:
    """First SIGINT/SIGTERM: finish cleanly (flush, summary). Second: exit at once."""

    def handler(signum, frame):
        if stop.is_set():
            sys.exit(128 + signum)
        click.echo(f"\n{signal.Signals(signum).name}: finishing (again to stop at once)", err=True)
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


# -- simulator -----------------------------------------------------------------------------------


@cli.command("simulate-session")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Empty folder to write.")
@click.option("--subject", default="syn08", show_default=True, help="Synthetic-world subject (syn01 ... syn08).")
@click.option("--session", type=int, default=1, show_default=True)
@click.option("--runs", help="Only these runs of the session, e.g. 1,2 (default: all).")
@click.option("--layout", type=click.Choice(LAYOUTS), default="mosaic", show_default=True)
@click.option("--shape", default="32x36x28", show_default=True, help="Volume grid NXxNYxNZ (3 mm voxels).")
@click.option("--world-seed", type=int, default=0, show_default=True, help="The synthetic world's seed.")
@click.option("--test-images", "n_test_images", type=int, default=60, show_default=True)
@click.option("--train-images", "n_train_images", type=int, default=240, show_default=True)
@click.option("--test-reps", "n_test_reps", type=int, default=3, show_default=True)
@click.option("--runs-per-session", "n_runs_per_session", type=int, help="Default: every run in session 1.")
@click.option("--motion-scale", type=float, default=1.0, show_default=True, help="0: no head motion.")
@click.option("--seed", type=int, default=0, show_default=True, help="Phantom and noise seed.")
def simulate_session(
    out_dir,
    subject,
    session,
    runs,
    layout,
    shape,
    world_seed,
    n_test_images,
    n_train_images,
    n_test_reps,
    n_runs_per_session,
    motion_scale,
    seed,
) -> None:
    """Write one session of a synthetic-world subject as a scanner and a stimulus program would.

    OUT gets raw/ (volume files, run n = series n), events/run-NN_events.tsv (onset, duration, trial_id,
    stimulus_id, split), stimuli/<id>.png and truth/ (the voxels carrying signal, the motion, the world). It is
    what `rtdecode calibrate --raw OUT/raw --events ... --images OUT/stimuli` reads; nothing is paced.
    """
    from rtdecode.sim.session import write_world_session
    from rtdecode.sim.world import SyntheticWorld, WorldConfig

    world = SyntheticWorld(
        WorldConfig(
            seed=world_seed,
            n_test_images=n_test_images,
            n_train_images=n_train_images,
            n_test_reps=n_test_reps,
            n_runs_per_session=n_runs_per_session,
        )
    )
    chosen = None if runs is None else [int(r) for r in runs.split(",")]
    written = write_world_session(
        world,
        subject,
        session,
        out_dir,
        layout=layout,
        shape=_shape(shape),
        runs=chosen,
        motion_scale=motion_scale,
        seed=seed,
        progress=True,
    )
    click.echo(f"{len(written.events)} run(s) of {subject} session {session} written to {out_dir}")


@cli.command("simulate-scanner")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    required=True,
    help="Folder to write into (created if missing).",
)
@click.option(
    "--input",
    "input_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="4D NIfTI to replay (default: a synthetic run).",
)
@click.option(
    "--layout",
    type=click.Choice(LAYOUTS),
    default="mosaic",
    show_default=True,
)
@click.option("--tr", "tr_s", type=float, help="TR in seconds (default: the input's, else scanner.tr_s, else 1.6).")
@click.option("--speed", type=float, default=1.0, show_default=True, help="Times faster than real time.")
@click.option("--volumes", "n_volumes", type=int, help="How many volumes (default: all of --input; 40 synthetic).")
@click.option("--shape", default="81x104x83", show_default=True, help="Synthetic run grid NXxNYxNZ.")
@click.option("--series", "first_series", type=int, default=1, show_default=True, help="First series number.")
@click.option(
    "--fault",
    "faults",
    multiple=True,
    metavar="KIND@INDEX[:VALUE]",
    help="Inject a fault (repeatable): truncate, slow, duplicate, reorder, drop, late, restart, corrupt. "
    "INDEX counts from 0.",
)
@click.option(
    "--jitter", "jitter_s", type=float, default=0.0, show_default=True, help="Random shift of each write, +/- seconds."
)
@click.option("--chunks", type=int, default=4, show_default=True, help="Pieces each file is written in.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.pass_obj
def simulate_scanner(
    g: _Globals,
    out_dir,
    input_path,
    layout,
    tr_s,
    speed,
    n_volumes,
    shape,
    first_series,
    faults,
    jitter_s,
    chunks,
    seed,
) -> None:
    """Write a run into a folder the way a scanner's real-time export does.

    Files arrive at TR pace (or --speed times faster), written in chunks, not atomically. Faults and
    what ingest makes of them are listed in docs/ingest.md. Example:

      rtdecode simulate-scanner --out /tmp/scanner --speed 4 --fault drop@5 --fault restart@20
    """
    from rtdecode.sim.faults import parse_fault
    from rtdecode.sim.scanner import SimulatedScanner
    from rtdecode.sim.sources import NiftiRun, SyntheticRun

    config, _ = g.load()
    try:
        parsed = [parse_fault(text) for text in faults]
        source = (
            NiftiRun(input_path)
            if input_path
            else SyntheticRun(shape=_shape(shape), n_volumes=n_volumes or 40, seed=seed)
        )
    except ValueError as error:
        raise click.BadParameter(str(error)) from None
    tr_s = tr_s or getattr(source, "tr_s", None) or config.scanner.tr_s or 1.6
    try:
        scanner = SimulatedScanner(
            out_dir,
            source,
            layout=layout,
            tr_s=tr_s,
            speed=speed,
            faults=parsed,
            jitter_s=jitter_s,
            chunks=chunks,
            first_series=first_series,
            n_volumes=n_volumes,
            seed=seed,
        )
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    click.echo(f"writing {len(scanner.plan)} {layout} files into {out_dir}, one every {tr_s / speed:.3f} s", err=True)
    stop = threading.Event()
    _stop_on_signals(stop)
    records = scanner.run(
        stop,
        on_write=lambda r: click.echo(
            f"  series {r.write.series_number} volume {r.write.volume_number}"
            + (f" [{r.write.mode}]" if r.write.mode != "normal" else "")
            + (" [copy]" if r.write.copy else "")
            + f" -> {r.paths[-1].name}",
            err=True,
        ),
    )
    click.echo(f"wrote {len(records)} of {len(scanner.plan)} planned writes", err=True)


# -- models ----------------------------------------------------------------------------------------


@cli.group("model")
def model_group() -> None:
    """MindEye2 model bundles: import the published weights, inspect, export to ONNX."""


@model_group.command("import-mindeye2")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Bundle folder."
)
@click.option(
    "--subjects",
    help="Comma-separated names of the ridge layers, in checkpoint order (default: the NSD subject whose "
    "voxel count matches, e.g. subj02, else subject0, subject1, ...).",
)
@click.option(
    "--converter",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Also import the bigG->CLIP-L converter (bigG_to_L_epoch8.pth) into the bundle.",
)
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), help="Cast the weights (default: keep).")
@click.option("--tag", help="DeepSpeed folders: the step folder to read (default: the one named in 'latest').")
@click.option("--force", is_flag=True, help="Replace an existing bundle in --out.")
def model_import(source, out_dir, subjects, converter, dtype, tag, force) -> None:
    """Check a published MindEye2 checkpoint and write it as a bundle.

    SOURCE is a train_logs/<model>/last.pth file (its model_state_dict), a bare state_dict file, or a
    DeepSpeed ZeRO checkpoint folder. Files are read with torch.load(weights_only=True), memory-mapped:
    nothing in them is executed. Every key and shape is checked; the model's geometry (hidden size,
    subjects and voxel counts, low-level branch, prior) is read from the tensors.

    \b
    Example:
      rtdecode model import-mindeye2 train_logs/multisubject_subj01_1024hid_nolow_300ep/last.pth \\
          --out ~/models/me2-1024 --converter bigG_to_L_epoch8.pth
    """
    from rtdecode.models.published import import_mindeye2

    names = None if subjects is None else [s.strip() for s in subjects.split(",") if s.strip()]
    folder = import_mindeye2(
        source, out_dir, subjects=names, converter=converter, dtype=dtype, tag=tag, overwrite=force, progress=_say
    )
    click.echo(f"wrote {folder}")


@model_group.command("info")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
def model_info(bundle) -> None:
    """Print a bundle's geometry, parameter counts and provenance (reads no weights)."""
    from rtdecode.models.info import describe_bundle

    click.echo(describe_bundle(bundle))


@model_group.command("init")
@click.option("--preset", type=click.Choice(["paper", "light", "tiny"]), default="light", show_default=True)
@click.option(
    "--subject",
    "subjects",
    multiple=True,
    help="NAME=N_VOXELS, repeatable (default: subj01=15724; tiny: s1=37, s2=29).",
)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing bundle in --out.")
def model_init(preset, subjects, out_dir, seed, force) -> None:
    """Write a bundle with randomly initialised weights (for sizing, benchmarks and engine builds)."""
    from rtdecode.models.info import random_bundle

    parsed = [_subject_voxels(text) for text in subjects]
    click.echo(f"wrote {random_bundle(out_dir, preset, parsed, seed=seed, overwrite=force)}")


@model_group.command("import-unclip")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--config",
    "yaml_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The model's sgm training yaml (MindEye2: generative_models/configs/unclip6.yaml); the attention head "
    "layout is not in the tensor shapes. Default: the published unclip6 geometry.",
)
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
              help="UNet precision on disk; the VAE is always kept fp32.")  # fmt: skip
def model_import_unclip(checkpoint, out_dir, yaml_path, dtype) -> None:
    """Convert MindEye2's SDXL unCLIP checkpoint into a diffusers folder for [models] unclip_dir.

    CHECKPOINT is unclip6_epoch0_step110000.ckpt (about 18 GB). Only the UNet and the VAE are kept; the
    embedded OpenCLIP bigG tower is skipped without being read (the file is memory-mapped). Every key and
    shape is checked before anything is written.

    \b
    Example:
      rtdecode model import-unclip unclip6_epoch0_step110000.ckpt --out ~/models/unclip6 \\
          --config generative_models/configs/unclip6.yaml --dtype fp16
    """
    from rtdecode.generate.geometry import UnclipGeometry
    from rtdecode.generate.unclip_folder import import_unclip

    geometry = UnclipGeometry.from_yaml(yaml_path) if yaml_path else None
    folder = import_unclip(checkpoint, out_dir, geometry=geometry, dtype=dtype, progress=_say)
    click.echo(f'wrote {folder}; set [models] unclip_dir = "{folder}"')


@model_group.command("import-low-level-vae")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
def model_import_low_level_vae(checkpoint, out_dir) -> None:
    """Convert MindEye2's sd_image_var_autoenc.pth (the SD 1.x VAE its low-level branch was trained against)
    into a diffusers folder for [models] low_level_vae_dir."""
    from rtdecode.generate.low_level import import_low_level_vae

    folder = import_low_level_vae(checkpoint, out_dir)
    click.echo(f'wrote {folder}; set [models] low_level_vae_dir = "{folder}"')


@model_group.command("init-image-models")
@click.option("--size", type=click.Choice(["tiny", "real"]), default="tiny", show_default=True,
              help="real: published geometries (about 25 GB on disk in fp32).")  # fmt: skip
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True)
def model_init_image_models(size, out_dir, seed) -> None:
    """Write unCLIP, refiner, captioner and low-level VAE folders with random weights.

    For trying the pipeline, timing and engine builds without the real weights. Prints the [models]
    entries to put in the config.
    """
    from rtdecode.generate.random_components import write_random_components

    folders = write_random_components(out_dir, size, seed=seed)
    click.echo("\n".join(["[models]", *(f'{field} = "{folder}"' for field, folder in folders.items())]))


def _subject_voxels(text: str) -> tuple[str, int]:
    name, _, count = text.partition("=")
    if not name or not count.isdigit() or int(count) < 1:
        raise click.BadParameter(f"expected NAME=N_VOXELS such as subj01=15724, got {text!r}")
    return name, int(count)


def _say(message: str) -> None:
    click.echo(message, err=True)


# -- benchmarks and demo ---------------------------------------------------------------------------


@cli.group(
    "bench",
    cls=_LazyGroup,
    lazy_commands={
        "train": "trainer.cli:bench_train",
        "calibrate": "calibration.cli:bench_calibrate",
        "serve": "rtdecode.bench.serve:bench_serve",
        "engines": "deploy.cli:bench_engines",
    },
)
def bench_group() -> None:
    """Benchmarks: commands that print measured figures (never pass/fail tests)."""


@bench_group.command("ingest")
@click.option("--volumes", "n_volumes", type=int, default=200, show_default=True)
@click.option("--shape", default="81x104x83", show_default=True, help="Volume grid (default: NSD 1.8 mm).")
@click.option("--interval", "interval_s", type=float, default=0.1, show_default=True, help="Seconds between files.")
@click.option(
    "--layout",
    "layouts",
    multiple=True,
    default=("mosaic", "nifti"),
    show_default=True,
    type=click.Choice(LAYOUTS),
)
@click.option("--mode", type=click.Choice(["auto", "inotify", "poll"]), default="auto", show_default=True)
@click.option("--goal-ms", type=float, default=10.0, show_default=True, help="p95 goal to compare against.")
def bench_ingest(n_volumes, shape, interval_s, layouts, mode, goal_ms) -> None:
    """Latency from a file being closed to its Volume being available (median, p95)."""
    import tempfile

    from rtdecode.bench.ingest import bench_layout, format_results
    from rtdecode.ingest.watcher import choose_watch_mode

    grid = _shape(shape)
    resolved = choose_watch_mode(Path(tempfile.gettempdir()), mode)
    results = []
    for layout in layouts:
        click.echo(f"running {layout} ...", err=True)
        results.append(bench_layout(layout, n_volumes, grid, interval_s, resolved))
    click.echo(format_results(results, grid, interval_s, resolved, goal_ms))


@cli.command("preprocess")
@click.argument("raw_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--events",
    "events_files",
    multiple=True,
    type=click.Path(path_type=Path),
    help="BIDS events.tsv of run 1, then run 2, ... (repeat the option).",
)
@click.option("--mask", type=click.Path(path_type=Path), help="Subject mask, NIfTI (default: preprocess.mask).")
@click.option(
    "--reference",
    type=click.Path(path_type=Path),
    help="Calibration reference the mask lies on, NIfTI (default: preprocess.reference; none: the first "
    "run's first volume defines the space).",
)
@click.option(
    "--stimuli",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Text file of known stimulus ids, one per line: trials naming another stay in the design, undecoded.",
)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--tr", "tr_s", type=float, help="Repetition time in seconds (default: scanner.tr_s, else headers).")
@click.pass_obj
def preprocess(g: _Globals, raw_dir, events_files, mask, reference, stimuli, out_dir, tr_s) -> None:
    """Betas of recorded runs, computed exactly as the daemon computes them live.

    Reads every volume in RAW_DIR through the ingest stage (DICOM or NIfTI, runs told apart by series),
    motion-corrects each to its run's reference (and the session to the calibration reference), masks
    it, and feeds the online GLM with the events of each run. Writes to --out: betas.npz (final and
    online betas, raw and z-scored, trial table), motion.tsv, zscore.npz, normalisation.npz and
    summary.json. Settings come from the [glm], [preprocess] and [normalise] config sections (rtdecode
    config show).

    \b
    Example:
      rtdecode preprocess raw/ses-01 --events ses-01/run-1_events.tsv --events ses-01/run-2_events.tsv \\
          --mask new01_mask.nii.gz --reference new01_boldref.nii.gz --out betas/ses-01
    """
    from rtdecode.betas import SessionBetas, normaliser, preprocess_recorded, read_events, write_session
    from rtdecode.config import flag_overrides

    config, _ = g.load(
        *flag_overrides({"preprocess.mask": mask, "preprocess.reference": reference, "scanner.tr_s": tr_s})
    )
    corrector = _motion_corrector(config)
    known = None if stimuli is None else {line.strip() for line in stimuli.read_text().splitlines() if line.strip()}
    zscore = normaliser(config.normalise, corrector.mask.n_voxels)
    session = SessionBetas(corrector, config.glm, known, zscore)
    preprocess_recorded(session, raw_dir, read_events(list(events_files)), config.scanner, out_dir / "quarantine")
    sections = ("glm", "preprocess", "normalise")
    summary = write_session(session, out_dir, {name: getattr(config, name).model_dump() for name in sections})
    click.echo(
        f"{summary['n_volumes']} volumes in {summary['n_runs']} run(s), {summary['n_trials']} trials "
        f"({summary['n_online']} online), {summary['n_voxels']} voxels, {summary['n_flagged_volumes']} volumes "
        f"over the motion threshold, {len(summary['problems'])} problem(s); written to {out_dir}"
    )


def _motion_corrector(config):
    """The session's motion corrector from the [preprocess] section (mask required)."""
    from rtdecode.betas import load_reference
    from rtdecode.preprocess.mask import Mask
    from rtdecode.preprocess.motion import MotionCorrector

    if config.preprocess.mask is None:
        raise click.UsageError("no mask: give --mask FILE or set preprocess.mask")
    reference = None if config.preprocess.reference is None else load_reference(config.preprocess.reference)
    return MotionCorrector(
        Mask.from_nifti(config.preprocess.mask),
        reference,
        fd_threshold_mm=config.preprocess.fd_threshold_mm,
        device=config.preprocess.device,
    )


@bench_group.command("preprocess")
@click.option("--volumes", "n_volumes", type=int, default=100, show_default=True)
@click.option("--shape", default="81x104x83", show_default=True, help="Volume grid (default: NSD 1.8 mm).")
@click.option("--voxels", "n_voxels", type=int, default=15724, show_default=True, help="Mask size (NSD subj01).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--goal-ms", type=float, default=50.0, show_default=True, help="p95 goal per volume.")
def bench_preprocess(n_volumes, shape, n_voxels, device, goal_ms) -> None:
    """Motion correction + masking per volume (median, p95) and its accuracy against the known motion."""
    from rtdecode.bench.preprocess import bench_preprocess as run
    from rtdecode.bench.preprocess import format_results

    click.echo(format_results(run(n_volumes, _shape(shape), n_voxels, device), goal_ms))


@bench_group.command("glm")
@click.option("--voxels", "n_voxels", type=int, default=15724, show_default=True, help="Mask size (NSD subj01).")
@click.option("--noise-model", "noise_models", multiple=True, default=("ols", "ar1"), show_default=True)
@click.option("--nilearn-refits", "n_nilearn", type=int, default=3, show_default=True, help="Trials nilearn refits.")
@click.option("--goal-ms", type=float, default=10.0, show_default=True, help="p95 goal per trial beta.")
@click.option(
    "--nilearn-grid",
    help="Grid NXxNYxNZ of the 4D image nilearn gets, e.g. 81x104x83 as a real-time pipeline would give it "
    "(default: the smallest cube holding the mask, nilearn's best case; the full grid needs ~1 GB and minutes).",
)
def bench_glm(n_voxels, noise_models, n_nilearn, goal_ms, nilearn_grid) -> None:
    """Cost of a trial's beta at 288 volumes, next to a nilearn per-trial refit on the same data.

    Needs nilearn (the dev extra).
    """
    from rtdecode.bench.glm import bench_glm as run
    from rtdecode.bench.glm import format_results

    grid = None if nilearn_grid is None else _shape(nilearn_grid)
    results = run(n_voxels, noise_models, n_nilearn, nilearn_grid=grid)
    click.echo(format_results(results, n_voxels, goal_ms, nilearn_grid=grid))


@bench_group.command("model")
@click.option("--hidden", "hidden_dim", type=int, default=1024, show_default=True, help="1024 light, 4096 paper.")
@click.option("--voxels", "n_voxels", type=int, default=15724, show_default=True, help="Ridge input (NSD subj01).")
@click.option("--low-level/--no-low-level", default=False, show_default=True, help="Include the low-level branch.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option(
    "--dtype", "dtypes", multiple=True, type=click.Choice(["fp32", "fp16", "bf16"]),
    help="Repeatable (default: fp32 on CPU; fp16 and bf16 on CUDA).",
)  # fmt: skip
@click.option(
    "--mode", "modes", multiple=True, type=click.Choice(["eager", "compile", "cudagraphs"]),
    help="Repeatable (default: eager on CPU; eager, compile and cudagraphs on CUDA).",
)  # fmt: skip
@click.option("--steps", "n_steps", type=int, default=20, show_default=True, help="Prior DDIM steps.")
@click.option("--embed-reps", "n_embed", type=int, default=20, show_default=True)
@click.option("--prior-reps", "n_prior", type=int, default=3, show_default=True)
@click.option("--no-load", is_flag=True, help="Skip the loading-memory measurement (it writes a bundle to /tmp).")
def bench_model(hidden_dim, n_voxels, low_level, device, dtypes, modes, n_steps, n_embed, n_prior, no_load) -> None:
    """MindEye2 embed and 20-step prior latency at real size (random weights), and loading memory."""
    from rtdecode.bench.model import bench_config, format_results
    from rtdecode.bench.model import bench_model as run

    device, dtypes, modes = _bench_targets(device, dtypes, modes)
    results, load = run(
        hidden_dim, n_voxels, low_level, device, dtypes, modes,
        n_steps=n_steps, n_embed=n_embed, n_prior=n_prior, measure_loading=not no_load,
    )  # fmt: skip
    click.echo(format_results(results, load, bench_config(hidden_dim, n_voxels, low_level), device))


@bench_group.command("generate")
@click.option("--size", type=click.Choice(["tiny", "real"]), default="tiny", show_default=True,
              help="real: MindEye2 + published unCLIP + SDXL refiner + git-large-coco, random weights.")  # fmt: skip
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option(
    "--dtype", "dtypes", multiple=True, type=click.Choice(["fp32", "fp16", "bf16"]),
    help="Repeatable (default: fp32 on CPU; fp16 on CUDA). The VAEs always run in fp32.",
)  # fmt: skip
@click.option(
    "--mode", "modes", multiple=True, type=click.Choice(["eager", "compile", "cudagraphs"]),
    help="Repeatable (default: eager on CPU; eager, compile and cudagraphs on CUDA).",
)  # fmt: skip
@click.option("--hidden", "hidden_dim", type=int, default=1024, show_default=True, help="MindEye2 hidden width.")
@click.option("--reps", "n_reps", type=int, default=3, show_default=True)
@click.option("--latent-handoff", is_flag=True, help="Hand unCLIP latents straight to the refiner.")
@click.option("--unclip-steps", type=int, default=38, show_default=True)
def bench_generate(size, device, dtypes, modes, hidden_dim, n_reps, latent_handoff, unclip_steps) -> None:
    """Per-stage milliseconds from a beta to the final image (goal on one H100: <= 1.0 s)."""
    from rtdecode.bench.generate import bench_generate as run
    from rtdecode.bench.generate import format_results
    from rtdecode.config import GenerateConfig

    # each (dtype, mode) rebuilds ~6.5 B parameters and compiles two SDXL UNets: one dtype by default
    device, dtypes, modes = _bench_targets(device, dtypes, modes, heavy=True)
    settings = GenerateConfig(device=device, latent_handoff=latent_handoff, unclip_steps=unclip_steps)
    n_voxels = 15724 if size == "real" else 37
    results = run(size, device, dtypes, modes, settings, hidden_dim=hidden_dim, n_voxels=n_voxels, n_reps=n_reps)
    click.echo(format_results(results, size, device, settings))


def _bench_targets(device: str, dtypes: tuple, modes: tuple, heavy: bool = False) -> tuple[str, tuple, tuple]:
    """Resolve ``auto`` and the per-device defaults of the GPU benchmarks' --device, --dtype and --mode
    (``heavy``: one dtype on CUDA, fp16)."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    on_cuda = device == "cuda"
    if not on_cuda and "cudagraphs" in modes:
        raise click.BadParameter("cudagraphs needs --device cuda", param_hint="--mode")
    cuda_dtypes = ("fp16",) if heavy else ("fp16", "bf16")
    dtypes = dtypes or (cuda_dtypes if on_cuda else ("fp32",))
    modes = modes or (("eager", "compile", "cudagraphs") if on_cuda else ("eager",))
    return device, dtypes, modes


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code. Domain errors print one clear line, not a traceback."""
    try:
        cli.main(args=argv, prog_name="rtdecode", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as error:
        error.show()
        return error.exit_code
    except RtDecodeError as error:
        click.echo(f"rtdecode: error: {error}", err=True)
        return 2
    return 0


def console_main() -> None:
    """The console script: ``sys.exit(main())``."""
    sys.exit(main())
