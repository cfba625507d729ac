"""``rtdecode bench calibrate``: the paper's one-session claim in simulation (a benchmark, not a test).

MindEye2's point (paper §3.1.1) is that a model pretrained on other people and fine-tuned on one session of a new
person beats one trained on that session alone. Here, in the synthetic world (:mod:`rtdecode.sim.world`):

1. **pretrain** on 7 synthetic subjects (the trainer's synthetic source: run-end GLM betas), each with
   ``pretrain_train_images`` train images (NSD's pretraining subjects had 40 sessions each; these have a few);
2. **scan** the 8th: one session written as DICOM by the scanner simulator, with head motion: its
   ``n_train_images`` train images and the ``n_test_images`` shared test images, each shown once;
3. **calibrate** it with the real ``calibrate`` code, fine-tuned from the pretrained model and from scratch with
   the same architecture, recipe, voxels and betas, and compare held-out retrieval (the session's test images,
   never trained on). Both arms are run on the run-end betas (``calibrate.betas = "final"``, the kind the
   pretraining used: the like-for-like comparison of the claim) and on the online betas the daemon computes live.

The voxels are the world's signal region, supplied as the native-space mask (the oracle an nsdgeneral-like mask
stands for); the session has no repeated images to choose voxels from.

The pretraining subjects and the calibrated one belong to one world although their train-image counts differ: a
subject's tuning, images and noise depend only on its name (and the test images on the world's seed), see
:mod:`rtdecode.sim.world`; the count only sets how many of its images exist.

The world makes the comparison mean something: subjects share a latent image representation but each maps it
into its voxels through its own random tuning (half along directions common to all, half its own), single
trials are NSD-noisy, and held-out retrieval is single-trial and 300-way. The report prints the world's
parameters with the numbers.
"""

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

from rtdecode.config import Config
from trainer.config import (
    DataConfig,
    ModelSettings,
    RecipeConfig,
    RunConfig,
    TargetsConfig,
    TrainConfig,
    ValidationConfig,
    WorldSettings,
)

log = logging.getLogger(__name__)

TOWER = {
    "seed": 0,
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 24, "layers": 2, "head_width": 12, "mlp_ratio": 2.0},
}
PRETRAIN_SUBJECTS = tuple(f"syn{k:02d}" for k in range(1, 8))
NEW_SUBJECT = "syn08"


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    """Sizes of the benchmark; ``quick`` shrinks everything for a smoke check (numbers then mean little)."""

    n_test_images: int = 300
    n_train_images: int = 450
    pretrain_train_images: int = 1500
    n_features: int = 32
    hidden_dim: int = 256
    pretrain_epochs: int = 40
    finetune_epochs: int = 150
    batch_per_subject: int = 8
    finetune_batch: int = 24
    n_way: int = 300

    @classmethod
    def quick(cls) -> "BenchSettings":
        return cls(
            n_test_images=40,
            n_train_images=60,
            pretrain_train_images=60,
            n_features=16,
            hidden_dim=64,
            pretrain_epochs=3,
            finetune_epochs=3,
            n_way=40,
        )


def world_settings(settings: BenchSettings, n_train_images: int) -> WorldSettings:
    """Every subject's whole schedule is one session: its test images once each, its own train images once."""
    return WorldSettings(
        seed=0,
        n_subjects=8,
        n_features=settings.n_features,
        n_test_images=settings.n_test_images,
        n_train_images=n_train_images,
        n_test_reps=1,
        image_size_px=32,
    )


def pretrain_config(settings: BenchSettings, out_dir: Path) -> TrainConfig:
    n_train = len(PRETRAIN_SUBJECTS) * settings.pretrain_train_images
    return TrainConfig(
        run=RunConfig(name="bench-calibrate-pretrain", out_dir=out_dir / "pretrain", cpu=True, progress=True),
        data=DataConfig(
            source="synthetic",
            root=out_dir / "world",
            subjects=PRETRAIN_SUBJECTS,
            world=world_settings(settings, settings.pretrain_train_images),
        ),
        model=ModelSettings(preset="tiny", hidden_dim=settings.hidden_dim, low_level=False),
        targets=TargetsConfig(embedder_random=TOWER, cache_dir=out_dir / "pretrain-targets"),
        recipe=RecipeConfig(
            epochs=settings.pretrain_epochs, batch_per_subject=settings.batch_per_subject, samples_per_epoch=n_train
        ),
        validation=ValidationConfig(n_way=settings.n_way, n_draws=30, every_epochs=max(1, settings.pretrain_epochs)),
    )


def calibrate_config(
    settings: BenchSettings, out_dir: Path, session, *, pretrained: Path | None, betas: str = "final"
) -> Config:
    """The rtdecode config of one arm: the same everything, only the starting model differs."""
    values = {
        "paths": {"home": str(out_dir / "home")},
        "preprocess": {"device": "cpu", "mask": str(session.region_mask_path)},
        "calibrate": {
            "raw_dir": str(session.raw_dir),
            "events": [str(p) for p in session.events],
            "images_dir": str(session.images_dir),
            "heldout": "marked",
            "betas": betas,
            "pretrained": None if pretrained is None else str(pretrained),
            "from_scratch": pretrained is None,
            "scratch_preset": "tiny",
            "scratch_hidden_dim": settings.hidden_dim,
            "epochs": settings.finetune_epochs,
            "batch_size": settings.finetune_batch,
            "cpu": True,
            "image_size_px": 32,
            "n_way": settings.n_way,
            "embedder_random": TOWER,
        },
    }
    return Config.model_validate(values)


def run_bench(out_dir: Path, settings: BenchSettings) -> str:
    """Pretrain (or reuse), scan, calibrate both ways; return the printed report."""
    from calibration.calibrate import calibrate
    from rtdecode.sim.session import write_world_session
    from rtdecode.sim.world import SyntheticWorld
    from trainer.data.synthetic import world_config
    from trainer.loop import Pretrainer

    out_dir = Path(out_dir)
    timings_s = {}
    started = time.perf_counter()
    pretrainer = Pretrainer(pretrain_config(settings, out_dir))
    records = pretrainer.fit()
    timings_s["pretrain"] = time.perf_counter() - started
    world = SyntheticWorld(world_config(world_settings(settings, settings.n_train_images)))
    session_dir = out_dir / "scan"
    started = time.perf_counter()
    if not (session_dir / "truth" / "truth.json").is_file():
        write_world_session(world, NEW_SUBJECT, 1, session_dir, progress=True)
    session = _layout(session_dir)
    timings_s["scan"] = time.perf_counter() - started
    results = {}
    for kind in ("final", "online"):
        for arm, pretrained in (("pretrained", out_dir / "pretrain" / "model"), ("scratch", None)):
            started = time.perf_counter()
            config = calibrate_config(settings, out_dir, session, pretrained=pretrained, betas=kind)
            work = out_dir / f"calibration-{kind}"
            _share_betas(out_dir / "calibration-final" / "runs", work / "runs")
            result = calibrate(
                config, NEW_SUBJECT, 1, work_dir=work, write_bundle=False, world=_world_parameters(world, settings)
            )
            results[(kind, arm)] = result.report
            timings_s[f"calibrate ({kind} betas, {arm})"] = time.perf_counter() - started
    return _report(settings, records, results, timings_s, out_dir)


def _share_betas(source: Path, target: Path) -> None:
    """The per-run betas hold both kinds: computed once, copied to the other work folder."""
    if source != target and source.is_dir() and not target.exists():
        shutil.copytree(source, target)


def _layout(session_dir: Path):
    from rtdecode.sim.session import SessionLayout

    truth = json.loads((session_dir / "truth" / "truth.json").read_text())
    runs = sorted(run["run"] for run in truth["runs"])
    return SessionLayout(
        raw_dir=session_dir / "raw",
        events=tuple(session_dir / "events" / f"run-{run:02d}_events.tsv" for run in runs),
        images_dir=session_dir / "stimuli",
        truth_dir=session_dir / "truth",
        series_numbers=tuple(runs),
    )


def _world_parameters(world, settings: BenchSettings) -> dict:
    config = world.config
    index = config.subjects.index(NEW_SUBJECT)
    return {
        "subjects": list(config.subjects),
        "pretrained_on": list(PRETRAIN_SUBJECTS),
        "calibrated": NEW_SUBJECT,
        "n_voxels": dict(zip(config.subjects, config.n_voxels, strict=True)),
        "n_features (shared latent)": config.n_features,
        "shared_rank / shared_fraction of each voxel's tuning": [config.shared_rank, config.shared_fraction],
        "subject-specific": "each subject's own random tuning directions and gains (its own voxel mixing)",
        "signal_sd / noise_sd / ar1": [config.signal_sd, config.noise_sd, config.ar1],
        "trials per session (calibrated subject)": config.n_test_images + config.n_train_images,
        "held-out images (single trials)": config.n_test_images,
        "train trials (calibrated subject)": config.n_train_images,
        "train trials per pretraining subject": settings.pretrain_train_images,
        "calibrated subject's voxels": config.n_voxels[index],
        "timing": "NSD: TR 1.6 s, 3 s image + 1 s gap, 188 volumes per run",
        "hidden_dim": settings.hidden_dim,
    }


def _report(settings: BenchSettings, records, results: dict, timings_s: dict, out_dir: Path) -> str:
    first = results[("final", "pretrained")]
    lines = ["rtdecode bench calibrate: pretrained-then-fine-tuned vs from scratch, one simulated session", ""]
    lines.append("world:")
    lines += [f"  {key}: {value}" for key, value in first.get("world", {}).items()]
    if records and records[-1].validation:
        fwd = sum(v["forward"] for v in records[-1].validation) / len(records[-1].validation)
        lines.append(
            f"pretraining (7 subjects x {settings.pretrain_train_images} train trials, {settings.pretrain_epochs} "
            f"epochs): mean held-out retrieval brain->image {fwd:.3f}"
        )
    for kind in ("final", "online"):
        lines += ["", f"{kind} betas:"]
        heldout = {arm: results[(kind, arm)]["heldout"] for arm in ("pretrained", "scratch")}
        for arm, numbers in heldout.items():
            lines.append(
                f"  {arm:>10}: {numbers['n_way']}-way top-1 brain->image {numbers['forward']:.3f}, image->brain "
                f"{numbers['backward']:.3f} (chance {numbers['chance']:.4f})"
            )
        for direction, name in (("forward", "brain->image"), ("backward", "image->brain")):
            scratch = heldout["scratch"][direction]
            ratio = float("inf") if scratch == 0 else heldout["pretrained"][direction] / scratch
            lines.append(f"  ratio pretrained / scratch ({name}): {ratio:.2f}")
    inputs = first["inputs"]
    lines.append(
        f"session: {inputs['n_runs']} runs, {inputs['n_volumes']} volumes (DICOM mosaic), {inputs['n_train']} train "
        f"and {inputs['n_heldout']} held-out trials (single trials); {first['selection']['n_selected']} voxels "
        "(the world's signal region, supplied as the mask)"
    )
    lines.append("time: " + ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in timings_s.items()))
    lines.append(f"reports: {out_dir}/calibration-*/report-*/report.html")
    return "\n".join(lines)
