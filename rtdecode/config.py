"""Typed configuration: one TOML file plus command-line overrides, validated before the first volume.

Where the file comes from, first match wins:

1. ``--config PATH`` on the command line (it must exist);
2. the ``RTDECODE_CONFIG`` environment variable (it must exist);
3. ``$RTDECODE_HOME/config.toml`` if it exists;
4. none: built-in defaults.

``--set section.key=value`` overrides one value (the value is read as a TOML value, so
``--set scanner.tr_s=1.5`` is a float and ``--set subject.id=new01`` a string). Commands also turn
their own flags (``--subject``, ``--watch``) into overrides. Every error names the key, the rule,
the value and where the value came from. ``rtdecode config show`` prints the resolved result.
"""

import dataclasses
import fnmatch
import json
import os
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from rtdecode.errors import ConfigError

# Used with re.fullmatch here, and by pydantic (whose Rust regex reads $ as the very end, newline or not).
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"

# A path from the config: ``~`` is expanded.
UserPath = Annotated[Path, pydantic.AfterValidator(Path.expanduser)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class PathsConfig(_Section):
    """Where things are on disk. ``~`` is expanded."""

    home: UserPath | None = Field(
        None,
        description="Store root (subjects, sessions). Default: $RTDECODE_HOME, else ~/.rtdecode.",
    )
    watch_dir: UserPath | None = Field(
        None, description="The scanner's export folder (DICOM or NIfTI); watched recursively."
    )
    quarantine_dir: UserPath | None = Field(
        None,
        description="Where files that never become valid volumes are copied, with a reason. "
        "Default: the session's folder in the store, else $home/quarantine.",
    )


class ScannerConfig(_Section):
    """How the scanner exports, and how ingest watches it."""

    format: Literal["auto", "dicom", "nifti"] = Field(
        "auto", description="auto: NIfTI by extension (.nii, .nii.gz), anything else as DICOM."
    )
    tr_s: float | None = Field(None, gt=0, le=60, description="Repetition time. Default: from each file's header.")
    watch_mode: Literal["auto", "inotify", "poll"] = Field(
        "auto", description="auto: inotify on local disks, polling on NFS/SMB/CIFS and FUSE mounts."
    )
    poll_interval_s: float = Field(0.1, gt=0, le=10, description="Scan period in polling mode.")
    rescan_interval_s: float = Field(1.0, gt=0, le=60, description="Safety-net rescan period in inotify mode.")
    incomplete_timeout_s: float = Field(
        10.0, gt=0, le=3600, description="A file still incomplete after this long is quarantined."
    )
    reorder_wait_s: float | None = Field(
        None,
        ge=0,
        le=60,
        description="How long a volume is held while an earlier one is missing. Default: TR / 2.",
    )
    slices_per_volume: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="Classic one-slice-per-file DICOM: slices per volume when headers do not say.",
    )
    existing_files: Literal["ingest", "ignore"] = Field(
        "ingest", description="Files already in the watched folder at start: ingest or ignore."
    )
    ignore: tuple[str, ...] = Field(
        (".*", "*.json", "*.tmp", "*.part", "DICOMDIR"),
        description="File-name patterns that are never volumes (sidecars, temporary names).",
    )

    def ignores(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.ignore)


class PreprocessConfig(_Section):
    """Motion correction and masking (rtdecode.preprocess)."""

    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when present, else the CPU.")
    fd_threshold_mm: float = Field(
        0.5, gt=0, le=100, description="Volumes whose framewise displacement exceeds this are flagged (kept)."
    )
    mask: UserPath | None = Field(
        None, description="The subject's mask (NIfTI, native space). Default: the subject bundle's, once calibrated."
    )
    reference: UserPath | None = Field(
        None, description="The calibration reference volume the mask is defined on (NIfTI). Default: the bundle's."
    )


class GlmConfig(_Section):
    """The online single-trial GLM (rtdecode.glm). Calibration and serve must agree on every value."""

    mode: Literal["lss", "lsa"] = Field("lss", description="lss: one fit per trial (probe vs rest); lsa: one fit.")
    noise_model: Literal["ols", "ar1"] = Field("ar1", description="ar1: nilearn's binned AR(1) prewhitening.")
    high_pass_hz: float = Field(0.01, ge=0, le=0.5, description="Cosine drift cutoff.")
    slice_time_ref: float = Field(0.0, ge=0, le=1, description="Frame time within the TR (0: volume start).")
    motion_regressors: bool = Field(True, description="The six motion parameters as confounds.")
    emit_delay_s: float = Field(
        6.0,
        ge=0,
        le=60,
        description="A trial's online beta is estimated once onset + this has been acquired (Glover HRF "
        "peaks about 5 s after onset).",
    )
    planned_volumes: int | None = Field(
        None, ge=2, le=100000, description="Volumes per run, if fixed: the online drift basis uses it."
    )


class NormaliseConfig(_Section):
    """Per-voxel z-scoring of betas (rtdecode.glm.normalise)."""

    method: Literal["running", "calibration"] = Field(
        "running", description="running: over the session's betas so far; calibration: the bundle's statistics."
    )
    epsilon: float = Field(1e-6, ge=0, description="Added to the running standard deviation.")
    warmup_betas: int = Field(0, ge=0, description="Running method: betas observed before any counts as normalised.")
    statistics: UserPath | None = Field(
        None,
        description="Calibration method: the statistics file (zscore.npz). Default: the subject bundle's.",
    )


class SubjectConfig(_Section):
    """Who is scanned, and which visit."""

    id: str | None = Field(None, pattern=ID_PATTERN, description="Subject id, e.g. new01.")
    session: int = Field(1, ge=1, le=999, description="Session (visit) number, 1-based.")


class ModelsConfig(_Section):
    """Local folders holding model weights. Nothing is downloaded at run time."""

    mindeye2_dir: UserPath | None = Field(
        None, description="MindEye2 bundle folder (rtdecode model import-mindeye2 / model init)."
    )
    image_embedder: UserPath | None = Field(
        None,
        description="OpenCLIP ViT-bigG-14 (laion2b_s39b_b160k) weight file, .safetensors/.bin/.pt; "
        "only the visual tower is read. Embeds images for retrieval pools and calibration targets.",
    )
    image_embedder_scaling: Literal["mindeye2", "conventional"] = Field(
        "mindeye2",
        description="Input scaling: 'mindeye2' reproduces the public (x+1)/2 quirk the checkpoints were "
        "trained with; 'conventional' is plain CLIP normalisation.",
    )
    unclip_dir: UserPath | None = Field(
        None, description="SDXL unCLIP UNet + VAE (folder written by rtdecode model import-unclip)."
    )
    refiner_dir: UserPath | None = Field(
        None, description="SDXL base pipeline for refinement (diffusers folder: unet, vae, text encoders)."
    )
    caption_dir: UserPath | None = Field(
        None, description="GIT captioner, git-large-coco layout (transformers folder with its tokenizer)."
    )
    low_level_vae_dir: UserPath | None = Field(
        None, description="SD 1.x VAE (diffusers AutoencoderKL folder) decoding the low-level latent."
    )
    retrieval_pool: UserPath | None = Field(
        None,
        description="Retrieval pool (RetrievalIndex folder: image ids and their CLIP embeddings) searched for each "
        "trial's closest images. Default: none, no retrieval.",
    )
    metric_networks_dir: UserPath | None = Field(
        None,
        description="Evaluation's feature networks (rtdecode evaluate): a folder with alexnet.pth, inception_v3.pth, "
        "clip_vit_l14.pt, efficientnet_b1.pth, swav_resnet50.pth (see docs/evaluation.md).",
    )
    sentence_model_dir: UserPath | None = Field(
        None,
        description="Evaluation's caption similarity: a local all-MiniLM-L6-v2 folder (transformers layout).",
    )


class GenerateConfig(_Section):
    """Image generation from brain embeddings (MindEye2's defaults; spec §5)."""

    device: str = Field("cpu", min_length=1, description="Torch device of the image models, e.g. 'cuda', 'cuda:1'.")
    dtype: Literal["fp32", "fp16", "bf16"] = Field(
        "fp32", description="UNet and text-model precision; the VAEs always run in fp32 as published."
    )
    unclip_steps: int = Field(38, ge=1, le=1000, description="Euler steps of the unCLIP sampler.")
    unclip_guidance: float = Field(5.0, ge=0.0, description="Classifier-free guidance scale of unCLIP.")
    caption: bool = Field(True, description="Predict a caption (GIT); needed by refinement.")
    caption_max_length: int = Field(
        20, ge=2, le=1024, description="GIT's max_length: tokens including the leading [CLS] (20: at most 19 new)."
    )
    refine: bool = Field(True, description="Refine the unCLIP image with SDXL img2img guided by the caption.")
    refine_steps: int = Field(25, ge=2, le=1000, description="Length of the refiner's step grid.")
    refine_start_step: int = Field(
        13, ge=1, description="Index into the grid where refinement starts (13 of 25: 12 steps from sigma 1.51)."
    )
    refine_guidance: float = Field(5.0, ge=0.0, description="Classifier-free guidance scale of refinement.")
    latent_handoff: bool = Field(
        False,
        description="Speed option: hand unCLIP latents straight to the refiner, skipping a VAE decode and "
        "encode (and the published 0.8x+0.2 colour mapping between them).",
    )
    low_level: bool = Field(
        True, description="Decode the low-level latent (fast preview, and the final blend) with the SD 1.x VAE."
    )
    blend_weight: float = Field(
        0.75, ge=0.0, le=1.0, description="Weight of the refined image against the low-level one (paper: 0.75)."
    )
    output_size_px: int = Field(256, ge=16, le=2048, description="Side of the final blended image.")
    engines: Literal["auto", "off"] = Field(
        "auto",
        description="auto: run the compiled engines of the subject bundle (rtdecode build-engines) for every stage "
        "whose engine is fresh, torch for the others, saying why in the log; off: torch only.",
    )

    @pydantic.model_validator(mode="after")
    def _start_inside_grid(self) -> "GenerateConfig":
        if self.refine_start_step >= self.refine_steps:
            raise ValueError(
                f"refine_start_step ({self.refine_start_step}) must be below refine_steps ({self.refine_steps})"
            )
        return self


class CalibrateConfig(_Section):
    """Calibration: one session of a new subject -> subject bundle (``rtdecode calibrate``).

    The GLM, motion and scanner settings are the [glm], [preprocess] and [scanner] sections, the very ones
    the daemon uses, so calibration betas and live betas mean the same thing.
    """

    raw_dir: UserPath | None = Field(None, description="The session's volume files. Default: the session's raw/.")
    events: tuple[UserPath, ...] = Field(
        (), description="BIDS events.tsv per run, in run order. Default: the session's events/*.tsv, sorted."
    )
    images_dir: UserPath | None = Field(
        None, description="The stimulus images, <stimulus_id>.png/.jpg. Default: the session's stimuli/."
    )
    reference_run: int = Field(1, ge=1, description="The run whose first volume becomes the reference volume.")
    search_mask: UserPath | None = Field(
        None,
        description="Where reliable voxels are sought (NIfTI on the reference grid, e.g. a posterior mask) when "
        "preprocess.mask is unset. Default: a brain mask of the reference volume.",
    )
    reliability_threshold: float | None = Field(
        None, ge=-1, le=1, description="Keep voxels whose repeat reliability exceeds this. Default: from the FDR."
    )
    reliability_fdr: float = Field(
        0.05, gt=0, lt=1, description="Default threshold: false discovery rate (Benjamini-Hochberg, no-signal null)."
    )
    max_voxels: int | None = Field(None, ge=1, description="Keep at most this many of the most reliable voxels.")
    min_voxels: int = Field(10, ge=1, description="Fewer selected voxels than this stops calibration.")
    heldout: Literal["auto", "marked", "repeated"] = Field(
        "auto",
        description="Trials held out for evaluation: marked (events 'split' column = test), repeated (images "
        "shown more than once), auto: marked if the events mark any, else repeated.",
    )
    betas: Literal["online", "final"] = Field(
        "online", description="Train on the betas the daemon decodes live (online) or on run-end refits (final)."
    )
    min_train_trials: int = Field(20, ge=2, description="Fewer train trials than this stops calibration.")
    pretrained: UserPath | None = Field(
        None, description="Multi-subject model bundle to fine-tune from. Default: models.mindeye2_dir."
    )
    from_scratch: bool = Field(False, description="Train a new model instead of fine-tuning a pretrained one.")
    scratch_preset: Literal["paper", "light", "tiny"] = Field("light", description="From scratch: the architecture.")
    scratch_hidden_dim: int | None = Field(None, ge=1, description="From scratch: override the hidden size.")
    epochs: int = Field(150, ge=1, description="Fine-tuning epochs (paper: 150).")
    batch_size: int = Field(24, ge=2, description="Trials per step (paper: 24).")
    samples_per_epoch: int | None = Field(
        None, ge=1, description="Default: the session's trial count, held-out included (spec §4: 750 / 24 = 31 steps)."
    )
    max_lr: float = Field(3e-4, gt=0, description="OneCycle peak learning rate (paper: 3e-4).")
    mixup_pct: float = Field(0.33, ge=0, le=1, description="BiMixCo for this fraction of the epochs.")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="accelerate precision (GPU: fp16).")
    cpu: bool = Field(False, description="Train on the CPU even when a GPU is present.")
    seed: int = Field(42, description="Seeds the new ridge layer, batch order and mixing.")
    checkpoint_every_epochs: int = Field(5, ge=1, description="Training checkpoints (an interrupted run resumes).")
    image_size_px: int = Field(224, ge=8, description="Stimulus images are resized to this square size.")
    n_way: int = Field(300, ge=2, description="Held-out retrieval: n-way top-1 (all held-out images if fewer).")
    n_draws: int = Field(30, ge=1, description="Held-out retrieval: random draws of n_way images.")
    embedder_random: dict[str, Any] | None = Field(
        None,
        description="Tests and demos only: a random-weight open_clip tower ({embed_dim, vision_cfg, seed}) "
        "instead of models.image_embedder.",
    )


class ServeConfig(_Section):
    """The real-time daemon (``rtdecode serve``) and its decode workers (``rtdecode decode-worker``)."""

    events_dir: UserPath | None = Field(
        None,
        description="Folder of the stimulus program's events.tsv per run (a name with run-NN gives the run), read "
        "as lines are appended. Default: the session's events/ folder. Events also arrive over ZeroMQ on ports.events.",
    )
    backlog: Literal["keep_all", "drop_oldest", "latest_only"] = Field(
        "keep_all",
        description="Trials waiting for a decoder: keep_all decodes every trial however late; drop_oldest keeps the "
        "newest max_backlog; latest_only keeps only the newest (dropped trials are published as skipped).",
    )
    max_backlog: int = Field(
        16, ge=1, le=100000, description="drop_oldest: the most trials kept waiting; keep_all: a warning level."
    )
    decoder: str | None = Field(
        None,
        description="Decode on other hosts: the endpoint decode workers connect to, bound here, e.g. "
        "tcp://10.0.0.2:5557 (start rtdecode decode-worker --connect on each GPU node). Default: decode in this "
        "process.",
    )
    reconstruct: bool = Field(
        True,
        description="Generate images (needs the [models] image folders); false: embeddings, retrieval and the "
        "low-level preview only.",
    )
    image_format: Literal["jpeg", "png"] = Field("jpeg", description="Published images: JPEG, or fast (level 1) PNG.")
    jpeg_quality: int = Field(90, ge=1, le=100, description="JPEG quality of published images.")
    heartbeat_s: float = Field(1.0, gt=0, le=60, description="Status heartbeat period.")
    stall_after_s: float = Field(
        10.0, gt=0, le=3600, description="A run with no new volume for this long is reported stalled."
    )
    worker_timeout_s: float = Field(
        5.0,
        ge=1.0,
        le=3600,
        description="A decode worker silent this long is declared dead; its trial goes to another.",
    )
    shutdown_timeout_s: float = Field(
        60.0,
        ge=0,
        le=3600,
        description="First SIGTERM: how long the decoders may take to finish the trials already queued.",
    )
    keys_dir: UserPath | None = Field(None, description="CURVE keys (rtdecode keys). Default: $home/keys.")
    insecure: bool = Field(
        False,
        description="Allow binding beyond loopback without CURVE keys (traffic in clear, anyone on the network "
        "can read it). Off: such a bind needs keys.",
    )


class PortsConfig(_Section):
    """ZeroMQ endpoints of the daemon."""

    host: str = Field("127.0.0.1", min_length=1, description="Interface the daemon binds.")
    publish: int = Field(5555, ge=1024, le=65535, description="PUB socket for displays.")
    snapshot: int = Field(5556, ge=1024, le=65535, description="Late-joiner snapshot socket.")
    decoder: int = Field(5557, ge=1024, le=65535, description="Scanner-side to decode workers.")
    events: int = Field(5558, ge=1024, le=65535, description="PULL socket the stimulus program sends events to.")

    @pydantic.model_validator(mode="after")
    def _distinct(self) -> "PortsConfig":
        ports = {"publish": self.publish, "snapshot": self.snapshot, "decoder": self.decoder, "events": self.events}
        if len(set(ports.values())) != len(ports):
            raise ValueError(f"ports must be distinct, got {ports}")
        return self


class Config(_Section):
    """The whole resolved configuration."""

    paths: PathsConfig = PathsConfig()
    scanner: ScannerConfig = ScannerConfig()
    subject: SubjectConfig = SubjectConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    glm: GlmConfig = GlmConfig()
    normalise: NormaliseConfig = NormaliseConfig()
    models: ModelsConfig = ModelsConfig()
    generate: GenerateConfig = GenerateConfig()
    calibrate: CalibrateConfig = CalibrateConfig()
    serve: ServeConfig = ServeConfig()
    ports: PortsConfig = PortsConfig()

    @property
    def home(self) -> Path:
        """The store root; always set on a config returned by :func:`load_config`."""
        if self.paths.home is None:
            raise ConfigError("'paths.home' is not resolved; use load_config()")
        return self.paths.home


@dataclasses.dataclass(frozen=True)
class ConfigSources:
    """Where the values of a resolved config came from (for messages and ``config show``)."""

    file: Path | None
    overridden_keys: tuple[str, ...]


def default_home(environ: Mapping[str, str]) -> Path:
    """``$RTDECODE_HOME``, else ``~/.rtdecode``."""
    value = environ.get("RTDECODE_HOME")
    return Path(value).expanduser() if value else Path.home() / ".rtdecode"


def load_config(
    path: Path | None = None,
    overrides: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
) -> tuple[Config, ConfigSources]:
    """Read, override, resolve and validate the configuration.

    Parameters
    ----------
    path : Path or None
        An explicit config file; it must exist.
    overrides : sequence of str
        ``"section.key=value"`` items, applied in order after the file.
    environ : mapping or None
        The environment (default ``os.environ``): ``RTDECODE_CONFIG``, ``RTDECODE_HOME``.

    Raises
    ------
    ConfigError
        Naming the key, the rule, the value and its source, for every bad value at once.
    """
    environ = os.environ if environ is None else environ
    file = _choose_file(path, environ)
    raw = read_toml(file) if file is not None else {}
    keys = apply_overrides(raw, overrides)
    raw.setdefault("paths", {})
    if isinstance(raw["paths"], dict) and raw["paths"].get("home") is None:
        raw["paths"]["home"] = str(default_home(environ))
    sources = ConfigSources(file=file, overridden_keys=tuple(keys))
    try:
        config = Config.model_validate(raw)
    except pydantic.ValidationError as error:
        raise ConfigError(describe_validation(error, sources)) from None
    return config, sources


def _choose_file(path: Path | None, environ: Mapping[str, str]) -> Path | None:
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"config file given with --config does not exist: {path}")
        return Path(path)
    if environ.get("RTDECODE_CONFIG"):
        named = Path(environ["RTDECODE_CONFIG"]).expanduser()
        if not named.is_file():
            raise ConfigError(f"config file named by RTDECODE_CONFIG does not exist: {named}")
        return named
    in_home = default_home(environ) / "config.toml"
    return in_home if in_home.is_file() else None


def read_toml(file: Path) -> dict[str, Any]:
    try:
        with open(file, "rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {file} is not valid TOML: {error}") from None
    except OSError as error:
        raise ConfigError(f"config file {file} cannot be read: {error}") from None


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> tuple[str, ...]:
    """Apply ``section.key=value`` items to a raw TOML dict, in order; return the keys set."""
    keys = []
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(raw, key, value)
        keys.append(key)
    return tuple(keys)


def flag_overrides(values: Mapping[str, Any]) -> list[str]:
    """Command flags as ``section.key=value`` overrides, skipping flags not given (None, an empty tuple).

    Values are written as JSON, which is valid TOML for the numbers, booleans, strings and arrays flags hold
    (paths become strings, tuples arrays of strings).
    """
    items = []
    for key, value in values.items():
        if value is None or value == ():
            continue
        if isinstance(value, tuple):
            value = [str(v) for v in value]
        elif isinstance(value, Path):
            value = str(value)
        items.append(f"{key}={json.dumps(value)}")
    return items


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override must look like 'section.key=value', got {item!r}")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # a bare word: take it as a string
    return key, value


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is a value, not a section")
        node = child
    node[leaf] = value


def describe_validation(error: pydantic.ValidationError, sources: ConfigSources) -> str:
    lines = ["invalid configuration:"]
    for problem in error.errors():
        key = ".".join(str(part) for part in problem["loc"])
        origin = _origin(key, sources)
        if problem["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (from {origin}); see `rtdecode config show`")
            continue
        lines.append(f"  {key}: {problem['msg']}; got {problem['input']!r} (from {origin})")
    return "\n".join(lines)


def _origin(key: str, sources: ConfigSources) -> str:
    related = [k for k in sources.overridden_keys if k == key or k.startswith(key + ".") or key.startswith(k + ".")]
    if related:
        return ", ".join(f"--set {k}" for k in related)
    if sources.file is not None:
        return str(sources.file)
    return "defaults"


def render_config(config: Config, sources: ConfigSources) -> str:
    """The resolved config as commented TOML: every key with its description; unset keys commented out."""
    import tomli_w

    lines = [f"# config file: {sources.file or 'none (built-in defaults)'}"]
    if sources.overridden_keys:
        lines.append("# overridden on the command line: " + ", ".join(sources.overridden_keys))
    for section_name in type(config).model_fields:
        section = getattr(config, section_name)
        values = section.model_dump(mode="json")
        lines += ["", f"[{section_name}]"]
        for key, field in type(section).model_fields.items():
            if field.description:
                lines.append(f"# {field.description}")
            if values[key] is None:
                lines.append(f"# {key} = (unset)")
            else:
                lines.append(tomli_w.dumps({key: values[key]}).strip())
    return "\n".join(lines) + "\n"
