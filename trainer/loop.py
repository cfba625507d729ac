"""The pretraining loop: the paper's recipe (spec §3) on any data source, through accelerate.

One step takes ``batch_per_subject`` trials of every subject (subject-major), mixes voxels within each
subject during the BiMixCo epochs, runs one forward (ridge per subject -> backbone -> prior loss), and
minimises ``prior_scale * prior + clip_scale * contrastive + blur_scale * L1(low-level latent)``.
AdamW with parameter groups, OneCycle stepped once per step. Validation after every epoch is the
paper's retrieval. Checkpoints resume exactly (see :mod:`trainer.checkpoints`); the trained model is
written as an rtdecode model bundle (``OUT/model``) that ``rtdecode model info`` and calibration read.

Multi-GPU and multi-node runs are ``accelerate launch`` of the same command (docs/training.md). The LR
schedule is stepped once per optimiser step on every process (``step_scheduler_with_optimizer=False``),
so it spans the run whatever the number of processes; accelerate's default would step it once per
process and finish the cycle early.
"""

import dataclasses
import json
import logging
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, set_seed
from tqdm.auto import tqdm

from rtdecode.evaluate.retrieval import normalised_rows
from rtdecode.models.bundle import save_model_bundle
from rtdecode.models.embedder import ImageEmbedder
from rtdecode.models.mindeye2 import MindEye2
from rtdecode.models.zero import read_zero_checkpoint
from trainer import checkpoints
from trainer.config import TrainConfig, config_dict
from trainer.data.source import Dataset
from trainer.experiment import load_dataset, load_embedder, model_config
from trainer.finetune import bundle_identity, load_pretrained
from trainer.losses import Mixing, bimixco_loss, low_level_l1, soft_clip_loss
from trainer.recipe import (
    EpochLoss,
    batch_plan,
    check_schedule,
    loss_schedule,
    make_optimizer,
    make_scheduler,
    step_rng,
    steps_per_epoch,
)
from trainer.targets import LatentTargets, TokenTargets
from trainer.validation import Retrieval, TestImages, retrieval, subject_embeddings

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
MODEL_DIR = "model"
# Other processes wait at a barrier while the main one builds the target caches (hours for NSD's VAE latents);
# torch's default of 10 minutes would kill them. `rtdecode pretrain --prepare-only` builds them beforehand.
BARRIER_TIMEOUT = timedelta(hours=12)


@dataclasses.dataclass
class EpochRecord:
    """What one epoch did: mean losses, the learning rate of its last step, throughput, validation."""

    epoch: int
    contrastive: str  # "bimixco" or "softclip"
    temperature: float
    loss: dict[str, float]  # means over the epoch's steps and processes
    lr: float
    samples_per_s: float
    validation: list[dict] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        parts = [f"epoch {self.epoch + 1} ({self.contrastive})", f"loss {self.loss['total']:.4f}", f"lr {self.lr:.2e}"]
        if self.validation:
            fwd = np.mean([v["forward"] for v in self.validation])
            bwd = np.mean([v["backward"] for v in self.validation])
            n_way = min(v["n_way"] for v in self.validation)
            parts.append(f"retrieval fwd {fwd:.3f} bwd {bwd:.3f} ({n_way}-way, chance {1 / n_way:.3f})")
        parts.append(f"{self.samples_per_s:.1f} samples/s")
        return ", ".join(parts)


class Pretrainer:
    """One experiment: builds everything from the config, then :meth:`fit` trains (resuming if it can).

    Order: data and the embedder (cheap checks: model size, schedule length, resumability) first, then the
    target caches (expensive), then the model, optimizer and scheduler through accelerate.
    """

    def __init__(self, config: TrainConfig, *, resume: bool = True, prepare_only: bool = False) -> None:
        self.config = config
        self.out_dir = Path(config.run.out_dir)
        self.accelerator = Accelerator(
            mixed_precision=config.run.mixed_precision,
            cpu=config.run.cpu,
            step_scheduler_with_optimizer=False,
            kwargs_handlers=[
                DistributedDataParallelKwargs(find_unused_parameters=True),
                InitProcessGroupKwargs(timeout=BARRIER_TIMEOUT),
            ],
        )
        set_seed(config.run.seed)
        if self.accelerator.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # as the public script (spec §3.4)
        self.dataset = self._dataset()
        embedder, identity = load_embedder(config, self.accelerator.device)
        self.model_config = model_config(config, self.dataset, (embedder.n_tokens, embedder.width))
        self.n_steps = steps_per_epoch(self.dataset, config.recipe, self.accelerator.num_processes)
        check_schedule(config.recipe, self.n_steps)
        self.schedule = loss_schedule(config.recipe)
        found = self._resumable() if resume else None
        self.tokens = self._token_targets(embedder, identity)
        self.latents = self._low_level_targets()
        self._test_images: TestImages | None = None
        self.start_epoch, self.global_step = 0, 0
        self._last_checkpoint: Path | None = None
        if prepare_only:
            return
        self._build_training()
        if found is not None:
            self._resume(*found)
        elif self.is_main:
            self._forget_metrics_after(-1)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def fit(self, until_epoch: int | None = None) -> list[EpochRecord]:
        """Train from the current epoch to the end (or through epoch ``until_epoch``, 1-based); return the records."""
        last = self.config.recipe.epochs if until_epoch is None else min(until_epoch, self.config.recipe.epochs)
        records = []
        for epoch in range(self.start_epoch, last):
            record = self._epoch(epoch)
            if (epoch + 1) % self.config.validation.every_epochs == 0 or epoch + 1 == self.config.recipe.epochs:
                record.validation = [v.to_dict() for v in self.validate()] if self.is_main else []
                self.accelerator.wait_for_everyone()
            self._log_epoch(record)
            records.append(record)
            if (epoch + 1) % self.config.run.checkpoint_every_epochs == 0 or epoch + 1 == last:
                self.save_checkpoint(epoch)
        if last == self.config.recipe.epochs:
            self.write_model()
        self.start_epoch = max(self.start_epoch, last)
        return records

    # ----------------------------------------------------------------------------------------- setup

    def _dataset(self) -> Dataset:
        with self.accelerator.main_process_first():
            dataset = load_dataset(self.config, progress=self.config.run.progress and self.is_main)
        log.info("data: %s", dataset.description)
        for subject in dataset.subjects:
            log.info(
                "  %s: %d voxels, %d train trials, %d test images (%s)",
                subject.name,
                subject.n_voxels,
                subject.n_train,
                subject.n_test_images,
                subject.origin,
            )
        return dataset

    def _token_targets(self, embedder: ImageEmbedder, identity: str) -> TokenTargets:
        cache_dir = self.config.targets.cache_dir
        cache = None if cache_dir is None else Path(cache_dir) / "tokens.npy"
        progress = self.config.run.progress and self.is_main
        tokens = TokenTargets(
            embedder, self.dataset.images, embedder_identity=identity, cache_path=cache, progress=progress
        )
        with self.accelerator.main_process_first():
            tokens.prepare()
        log.info("targets: %s", tokens.describe())
        return tokens

    def _low_level_targets(self) -> LatentTargets | None:
        """SD-VAE latent targets when the model has the low-level branch (it has one only with a VAE folder)."""
        low = self.model_config.backbone.low_level
        if low is None:
            log.info("low-level loss: off (the model has no low-level branch)")
            return None
        cache_dir = self.config.targets.cache_dir
        cache = None if cache_dir is None else Path(cache_dir) / f"latents-{low.latent_size}.npy"
        latents = LatentTargets.from_folder(
            Path(self.config.targets.low_level_vae),
            self.dataset.images,
            latent_size=low.latent_size,
            cache_path=cache,
            progress=self.config.run.progress and self.is_main,
            device=self.accelerator.device,
        )
        with self.accelerator.main_process_first():
            latents.prepare()
        log.info("low-level loss: L1 on %s", latents.describe())
        log.warning("low-level loss: the VICRegL feature term (0.1 x cont) is not implemented; L1 only")
        return latents

    def _build_training(self) -> None:
        model = MindEye2(self.model_config)
        if self.config.model.init_from is not None:
            load_pretrained(model, self.config.model.init_from)
        optimizer = make_optimizer(model, self.config.recipe)
        scheduler = make_scheduler(optimizer, self.config.recipe, self.n_steps)
        plugin = self.accelerator.state.deepspeed_plugin
        if plugin is not None:  # no DataLoader to infer it from
            batch = self.config.recipe.batch_per_subject * len(self.dataset.subjects)
            plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = batch
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        log.info(
            "model: %s, %s; %d steps/epoch x %d epochs on %d process(es), device %s, precision %s",
            self.config.model.preset,
            self.model_config.subjects_text(),
            self.n_steps,
            self.config.recipe.epochs,
            self.accelerator.num_processes,
            self.accelerator.device,
            self.config.run.mixed_precision,
        )

    def _run_identity(self) -> dict[str, Any]:
        """What a checkpoint must share with the run resuming it (JSON values)."""
        identity = {
            "model": self.model_config.to_dict(),
            # subjects and split sizes, no paths: data staged to another folder (cluster scratch) still resumes
            "data": [[s.name, s.n_voxels, s.n_train, s.n_test_images] for s in self.dataset.subjects],
            "steps_per_epoch": self.n_steps,
            "n_processes": self.accelerator.num_processes,
            "seed": self.config.run.seed,
            "init_from": None if self.config.model.init_from is None else bundle_identity(self.config.model.init_from),
        }
        identity.update({f"recipe.{k}": v for k, v in self.config.recipe.model_dump(mode="json").items()})
        return json.loads(json.dumps(identity))

    def _resumable(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest checkpoint, checked against this run before anything expensive starts."""
        found = checkpoints.latest(self.out_dir)
        if found is not None:
            checkpoints.check_resumable(found[0], found[1], self._run_identity())
        return found

    def _resume(self, folder: Path, state: dict[str, Any]) -> None:
        self.accelerator.load_state(str(folder))
        self.start_epoch = state["epoch"] + 1
        self.global_step = state["global_step"]
        if self.is_main:
            self._forget_metrics_after(state["epoch"])
        log.info("resumed from %s: epoch %d done, step %d", folder, state["epoch"] + 1, self.global_step)

    def _forget_metrics_after(self, epoch: int) -> None:
        """Keep only metrics lines up to ``epoch`` (later ones are run again), dropping a line cut by a crash."""
        path = self.out_dir / METRICS_FILE
        if not path.is_file():
            return
        lines = path.read_text().splitlines()
        kept = [line for line in lines if _metrics_epoch(line) is not None and _metrics_epoch(line) <= epoch]
        if len(kept) != len(lines):
            log.info(
                "metrics: %d line(s) after epoch %d dropped (they are run again)", len(lines) - len(kept), epoch + 1
            )
            path.write_text("".join(line + "\n" for line in kept))

    # ----------------------------------------------------------------------------------------- training

    def _epoch(self, epoch: int) -> EpochRecord:
        self.model.train()
        loss_kind = self.schedule[epoch]
        plan = batch_plan(
            self.dataset,
            self.config.recipe,
            seed=self.config.run.seed,
            epoch=epoch,
            process=self.accelerator.process_index,
            n_processes=self.accelerator.num_processes,
            n_steps=self.n_steps,
        )
        sums: dict[str, float] = {}
        started = time.perf_counter()
        bar = tqdm(
            total=self.n_steps,
            desc=f"epoch {epoch + 1}/{self.config.recipe.epochs} ({loss_kind.kind})",
            disable=not (self.config.run.progress and self.is_main),
            leave=False,
        )
        for step, positions in enumerate(plan):
            lr = self.scheduler.get_last_lr()[0]  # the rate this step uses (recorded: the epoch's last)
            parts = self.train_step(epoch, step, positions)
            for name, value in parts.items():
                sums[name] = sums.get(name, 0.0) + value
            bar.update(1)
            bar.set_postfix(loss=f"{parts['total']:.4f}")
        bar.close()
        elapsed_s = time.perf_counter() - started
        n_samples = self.n_steps * self.config.recipe.batch_per_subject * len(self.dataset.subjects)
        means = self._mean_over_processes({name: value / self.n_steps for name, value in sums.items()})
        samples_per_s = n_samples * self.accelerator.num_processes / elapsed_s
        return EpochRecord(epoch, loss_kind.kind, loss_kind.temperature, means, lr, samples_per_s)

    def train_step(self, epoch: int, step: int, positions: list[np.ndarray]) -> dict[str, float]:
        """One optimiser step on each subject's train ``positions``; returns the loss parts (this process's)."""
        loss_kind = self.schedule[epoch]
        rng = step_rng(self.config.run.seed, epoch, self.accelerator.process_index, step)
        voxels, image_index, mixing = self._batch(positions, loss_kind, rng)
        clip_target = self.tokens.get(image_index).to(self.accelerator.device)
        outputs, prior_loss = self.model(voxels, clip_target)
        total, parts = self._losses(outputs, prior_loss, clip_target, image_index, loss_kind, mixing)
        self.accelerator.backward(total)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        return {"total": total.item(), **{name: value.item() for name, value in parts.items()}}

    def _batch(
        self, positions: list[np.ndarray], loss_kind: EpochLoss, rng: np.random.Generator
    ) -> tuple[list[torch.Tensor], np.ndarray, Mixing | None]:
        """Each subject's voxels (mixed within the subject during BiMixCo), the images, the batch's mixing."""
        device = self.accelerator.device
        voxels, images, mixings = [], [], []
        start = 0
        for subject, picked in zip(self.dataset.subjects, positions, strict=True):
            rows = subject.train_rows[picked]
            batch = torch.as_tensor(subject.betas[rows]).to(device=device, dtype=torch.float32)
            if loss_kind.kind == "bimixco":
                mixing = Mixing.draw(len(rows), rng, device)
                batch = mixing.apply(batch)
                mixings.append(mixing.offset(start))
            voxels.append(batch)
            images.append(subject.train_images[picked])
            start += len(rows)
        return voxels, np.concatenate(images), Mixing.concat(mixings) if mixings else None

    def _losses(self, outputs, prior_loss, clip_target, image_index, loss_kind: EpochLoss, mixing: Mixing | None):
        """The weighted total and its parts: prior x prior_scale, contrastive x clip_scale, L1 x blur_scale."""
        recipe = self.config.recipe
        brain, image = normalised_rows(outputs.clip_voxels), normalised_rows(clip_target)
        if mixing is not None:
            contrastive = bimixco_loss(brain, image, mixing, loss_kind.temperature)
        else:
            contrastive = soft_clip_loss(brain, image, loss_kind.temperature)
        parts = {"prior": prior_loss, "contrastive": contrastive}
        total = recipe.prior_scale * prior_loss + recipe.clip_scale * contrastive
        if self.latents is not None:  # against the unmixed image's latent, as the public code
            target = self.latents.get(image_index).to(self.accelerator.device)
            parts["low_level_l1"] = low_level_l1(outputs.low_level_latent, target)
            total = total + recipe.blur_scale * parts["low_level_l1"]
        return total, parts

    def _mean_over_processes(self, means: dict[str, float]) -> dict[str, float]:
        names = sorted(means)
        values = torch.tensor([means[n] for n in names], device=self.accelerator.device, dtype=torch.float64)
        reduced = self.accelerator.reduce(values, "mean")
        return {name: float(value) for name, value in zip(names, reduced.tolist(), strict=True)}

    # ----------------------------------------------------------------------------------------- validation

    @torch.no_grad()
    def validate(self) -> list[Retrieval]:
        """Retrieval of every subject's test images (eval mode, main process); see :mod:`trainer.validation`."""
        model = self.accelerator.unwrap_model(self.model)
        model.eval()
        if self._test_images is None:  # fixed targets: embedded once
            self._test_images = TestImages.build(self.dataset, self.tokens, self.accelerator.device)
        results = []
        settings = self.config.validation
        with self.accelerator.autocast():
            for index, subject in enumerate(self.dataset.subjects):
                brain = subject_embeddings(model, subject, index)
                image = self._test_images.rows(subject.test_images)
                results.append(retrieval(brain, image, subject.name, n_way=settings.n_way, n_draws=settings.n_draws))
        model.train()
        return results

    # ----------------------------------------------------------------------------------------- outputs

    def _log_epoch(self, record: EpochRecord) -> None:
        log.info("%s", record.summary())
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / METRICS_FILE, "a") as handle:
                handle.write(json.dumps(dataclasses.asdict(record)) + "\n")

    def save_checkpoint(self, epoch: int) -> Path:
        folder = checkpoints.checkpoint_dir(self.out_dir, epoch + 1)
        self.accelerator.save_state(str(folder))
        self.accelerator.wait_for_everyone()
        if self.is_main:
            state = {**self._run_identity(), "epoch": epoch, "global_step": self.global_step}
            state["config"] = config_dict(self.config)
            checkpoints.write_state(folder, state)
            checkpoints.prune(self.out_dir, self.config.run.keep_checkpoints)
            log.info("checkpoint: %s", folder)
        self.accelerator.wait_for_everyone()
        self._last_checkpoint = folder
        return folder

    def write_model(self) -> Path | None:
        """The trained model, float32, as an rtdecode bundle in ``OUT/model`` (replaced if there).

        Under DeepSpeed the weights are the fp32 master copy read from the last checkpoint (the engine's own
        module holds fp16/bf16 copies in a mixed-precision run).
        """
        if self.accelerator.state.deepspeed_plugin is not None and self._last_checkpoint is not None:
            state = read_zero_checkpoint(self._last_checkpoint) if self.is_main else None
        else:
            state = self.accelerator.get_state_dict(self.model)
        if not self.is_main:
            return None
        trained = MindEye2(self.model_config)
        trained.load_state_dict({name: tensor.float() for name, tensor in state.items()})
        provenance = {
            "source": f"rtdecode pretrain ({self.config.run.name})",
            "data": self.dataset.description,
            "epochs": self.config.recipe.epochs,
            "dtype": "float32",
            "trained_in": self.config.run.mixed_precision,
            "config": config_dict(self.config),
        }
        folder = self.out_dir / MODEL_DIR
        save_model_bundle(folder, trained, provenance=provenance, overwrite=True)
        log.info("model bundle: %s", folder)
        return folder


def _metrics_epoch(line: str) -> int | None:
    """The epoch of a metrics line, or None for a line a crash cut short."""
    try:
        return int(json.loads(line)["epoch"])
    except (ValueError, KeyError, TypeError):
        return None
