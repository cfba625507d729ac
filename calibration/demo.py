"""``rtdecode demo``: the whole system on a laptop, with no scanner and no downloaded weights.

1. **Build** (or reuse from the cache) a small model on the synthetic world with the real code: pretrain on 7
   synthetic subjects (the trainer), scan the 8th's calibration runs as DICOM (the simulator) and calibrate it
   (``calibrate``), which writes its subject bundle; embed the live run's pictures for the retrieval pool.
2. **Play** one more run of that subject live: the simulated scanner writes DICOM at an accelerated TR with faults
   injected, the simulated stimulus program logs each trial as it happens.
3. **Serve** it with the real daemon, and watch it with the operator display (what ``rtdecode view --save``
   writes, and the web page with ``rtdecode demo --view``).
4. **Summarise** (:mod:`calibration.demo_report`): volumes, trials decoded, retrieval accuracy against the
   simulation's truth, latency per stage, and a gallery page of what each trial decoded to.

The model is cached under a key of every setting and of the source code that builds it, so a later run reuses it
and a changed rtdecode rebuilds it.

The demo model's image space is a random-weight CLIP tower (nothing can be downloaded), which no image generator
was trained on: the demo decodes to retrieval (the closest pictures of the pool), and says so.
"""

import dataclasses
import fcntl
import hashlib
import json
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from calibration.bench import (
    NEW_SUBJECT,
    PRETRAIN_SUBJECTS,
    TOWER,
    BenchSettings,
    calibrate_config,
    pretrain_config,
    world_settings,
)
from calibration.demo_report import DemoResult, read_truth, score, write_gallery
from rtdecode.config import Config
from rtdecode.errors import CalibrationError

DEMO_FAULTS = ("slow@3", "duplicate@6", "reorder@9", "drop@12", "late@14:2", "truncate@17")
CACHE_VERSION = 4
BUILT_MARKER = "built.json"  # written last: a folder without it is an interrupted build
SOURCE_PACKAGES = ("rtdecode", "trainer", "calibration")


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo. ``emit_delay_s`` is the online beta's wait after a trial's onset (calibration and serve
    use the same): 10 s decodes the synthetic world's trials far better than 6 s."""

    bench: BenchSettings
    emit_delay_s: float = 10.0
    speed: float = 8.0

    @classmethod
    def full(cls) -> "DemoSettings":
        sizes = BenchSettings(
            n_test_images=60, n_train_images=240, pretrain_train_images=300, n_features=16,
            hidden_dim=128, pretrain_epochs=20, finetune_epochs=60, n_way=60,
        )  # fmt: skip
        return cls(sizes)

    @classmethod
    def quick(cls) -> "DemoSettings":
        sizes = BenchSettings(
            n_test_images=40, n_train_images=160, pretrain_train_images=160, n_features=16,
            hidden_dim=128, pretrain_epochs=10, finetune_epochs=60, n_way=40,
        )  # fmt: skip
        return cls(sizes, speed=16.0)

    def cache_key(self) -> dict:
        """Everything the cached model depends on: the sizes, the world, the tower, the subjects, the code."""
        return {
            "version": CACHE_VERSION,
            "bench": dataclasses.asdict(self.bench),
            "emit_delay_s": self.emit_delay_s,
            "world": world_settings(self.bench, self.bench.n_train_images).model_dump(mode="json"),
            "pretrain_world": world_settings(self.bench, self.bench.pretrain_train_images).model_dump(mode="json"),
            "tower": TOWER,
            "subjects": [*PRETRAIN_SUBJECTS, NEW_SUBJECT],
            "source": source_digest(),
        }


def key_digest(key: dict) -> str:
    """The cache folder's name for a :meth:`DemoSettings.cache_key`."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def source_digest() -> str:
    """A hash of the Python source of the packages that build the model: an upgraded rtdecode rebuilds it."""
    import importlib

    digest = hashlib.sha256()
    for package in SOURCE_PACKAGES:
        root = Path(importlib.import_module(package).__file__).parent
        for path in sorted(root.rglob("*.py")):
            digest.update(str(path.relative_to(root.parent)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class DemoModel:
    """What the build step leaves in the cache."""

    folder: Path
    home: Path  # a store holding the subject bundle
    pool: Path  # the retrieval pool of the live run's pictures
    built_s: float  # 0 when reused

    @property
    def pool_images(self) -> Path:
        """The pool's pictures as ``<id>.png`` (for the display's ``--pool-images``)."""
        return self.pool / "images"


def build_model(settings: DemoSettings, cache_dir: Path, say: Callable[[str], None]) -> DemoModel:
    """Pretrain, scan, calibrate and embed the pool, unless the cache already holds them. One build at a time per
    key (a lock file); a build cut short is started again, since its marker is written last."""
    key = settings.cache_key()  # hashes the packages' source: once, and the folder and marker agree
    folder = cache_dir / key_digest(key)
    model = DemoModel(folder, folder / "home", folder / "pool", 0.0)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f"{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (folder / BUILT_MARKER).is_file():
            say(f"model: reusing {folder}")
            return model
        started_s = time.monotonic()
        say("model: pretraining on 7 synthetic subjects, then calibrating a new one (first run only)")
        shutil.rmtree(folder, ignore_errors=True)
        _pretrain(settings, folder)
        world = _world(settings)  # about a second to build: once for both steps
        _calibrate(settings, world, folder, model.home)
        _write_pool(world, model.pool)
        built = dataclasses.replace(model, built_s=time.monotonic() - started_s)
        (folder / BUILT_MARKER).write_text(json.dumps({"key": key, "built_s": built.built_s}))
        return built


def heldout(model: DemoModel) -> dict | None:
    """The bundle's own held-out retrieval figure from calibration (``bundle.json``)."""
    bundle = json.loads((model.home / "subjects" / NEW_SUBJECT / "bundle" / "bundle.json").read_text())
    return bundle.get("heldout")


def _pretrain(settings: DemoSettings, folder: Path) -> None:
    from trainer.loop import Pretrainer

    Pretrainer(pretrain_config(settings.bench, folder)).fit()


def _calibrate(settings: DemoSettings, world, folder: Path, home: Path) -> None:
    from calibration.bench import _layout
    from calibration.calibrate import calibrate
    from rtdecode.sim.session import write_world_session

    scan = folder / "scan"
    write_world_session(world, NEW_SUBJECT, 1, scan, runs=_runs(world)[1:])
    config = calibrate_config(
        settings.bench, folder, _layout(scan), pretrained=folder / "pretrain" / "model", betas="online"
    )
    values = config.model_dump(mode="json")
    values["paths"]["home"] = str(home)
    values["glm"]["emit_delay_s"] = settings.emit_delay_s
    calibrate(Config.model_validate(values), NEW_SUBJECT, 1, work_dir=folder / "calibration", write_bundle=True)


def _write_pool(world, pool: Path) -> None:
    """The live run's pictures embedded by the same tower the model was trained against."""
    import torch

    from rtdecode.models.embedder import ImageEmbedder
    from rtdecode.models.retrieval import RetrievalIndex
    from rtdecode.sim.session import write_stimulus_images

    plan = next(plan for plan in world.runs(NEW_SUBJECT) if plan.run == _runs(world)[0])
    indices = np.unique(plan.image_indices)
    tower = dict(TOWER)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(tower.pop("seed")))
        embedder = ImageEmbedder.from_config(tower)
    vectors = embedder.embed(torch.as_tensor(world.images(indices), dtype=torch.float32))
    RetrievalIndex([world.image_ids[int(k)] for k in indices], vectors).save(pool)
    (pool / "images").mkdir()
    write_stimulus_images(world, [plan], pool / "images")


def _runs(world) -> list[int]:
    """The calibrated subject's runs: the first is played live (so the scanner's first series is run 1, as its
    events file is named), the others calibrate it."""
    return [plan.run for plan in world.runs(NEW_SUBJECT)]


def _world(settings: DemoSettings):
    from rtdecode.sim.world import SyntheticWorld
    from trainer.data.synthetic import world_config

    return SyntheticWorld(world_config(world_settings(settings.bench, settings.bench.n_train_images)))


def play_live(
    settings: DemoSettings, model: DemoModel, workdir: Path, say: Callable[[str], None], state=None
) -> DemoResult:
    """Serve one live run of the calibrated subject and watch it with the display ``state`` (a new one by
    default; ``rtdecode demo --view`` passes the one its web page shows); return the summary's numbers."""
    from rtdecode.serve import open_daemon
    from rtdecode.sim.live import LiveSession
    from rtdecode.view.save import Saver
    from rtdecode.view.server import Bridge
    from rtdecode.view.state import DisplayState

    require_empty(workdir)
    world = _world(settings)
    live_run = _runs(world)[0]
    live = LiveSession(
        world, NEW_SUBJECT, 1, workdir / "session", runs=[live_run], speed=settings.speed,
        faults={live_run: list(DEMO_FAULTS)},
    )  # fmt: skip
    layout = live.prepare()
    home = workdir / "home"
    shutil.copytree(model.home / "subjects" / NEW_SUBJECT / "bundle", home / "subjects" / NEW_SUBJECT / "bundle")
    config = _serve_config(settings, layout, home, model.pool)
    state = state if state is not None else DisplayState()
    served = open_daemon(config, NEW_SUBJECT, 2)
    runner = _DaemonThread(served.daemon)
    try:
        saver = Saver(workdir / "display")
        bridge = Bridge(state, _endpoint(config, "publish"), _endpoint(config, "snapshot"), handlers=(saver.write,))
        try:
            bridge.start()
            runner.start()
            faults = ", ".join(DEMO_FAULTS)
            say(f"live: the scanner writes run {live_run} at {settings.speed:g}x real time, faults {faults}")
            live.run()
            served.daemon.request_stop()  # ends the run; the daemon decodes what is queued, then says "stopped"
            runner.join_or_raise(timeout_s=180)
            if not _wait_for_stopped(state, timeout_s=10):
                say("warning: the display did not receive the daemon's 'stopped' status; the summary may miss the end")
        finally:
            runner.stop()
            bridge.stop()
            saver.close()
    finally:
        if not runner.is_alive():  # closing sockets under a running daemon would race it
            served.close()
    return _result(live, layout, state, served.daemon.counts, model, workdir)


def require_empty(workdir: Path) -> None:
    """The demo writes a whole session into ``workdir``: refuse one that holds anything."""
    if workdir.exists() and any(workdir.iterdir()):
        raise CalibrationError(f"demo workdir {workdir} is not empty: give a new --workdir")


class _DaemonThread(threading.Thread):
    """The daemon's run loop in a thread that keeps its exception for the caller."""

    def __init__(self, daemon) -> None:
        super().__init__(name="daemon", daemon=True)
        self.served_daemon = daemon
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.served_daemon.run()
        except BaseException as error:  # handed to the caller by join_or_raise
            self.error = error

    def join_or_raise(self, timeout_s: float) -> None:
        self.join(timeout_s)
        if self.is_alive():
            raise CalibrationError(f"the daemon did not stop within {timeout_s:g} s")
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        """On the way out of an error or Ctrl-C: stop at once and wait a little."""
        if self.is_alive():
            self.served_daemon.abort()
            self.join(timeout=30)


def _endpoint(config: Config, name: str) -> str:
    return f"tcp://127.0.0.1:{getattr(config.ports, name)}"


def _wait_for_stopped(state, timeout_s: float) -> bool:
    """Wait until the display state has the daemon's 'stopped' status (its last message); False on timeout."""
    deadline_s = time.monotonic() + timeout_s
    version = state.version
    while state.to_json()["health"].get("state") != "stopped":
        remaining_s = deadline_s - time.monotonic()
        if remaining_s <= 0:
            return False
        version = state.wait_changed(version, remaining_s)
    return True


def _serve_config(settings: DemoSettings, layout, home: Path, pool: Path) -> Config:
    from rtdecode.bench.serve import free_ports

    publish, snapshot, decoder, events = free_ports(4)
    return Config.model_validate(
        {
            "paths": {"home": str(home), "watch_dir": str(layout.watch_dir)},
            "scanner": {"tr_s": 1.6, "incomplete_timeout_s": 1.0, "reorder_wait_s": 0.5 / settings.speed},
            "glm": {"emit_delay_s": settings.emit_delay_s},
            "preprocess": {"device": "cpu"},
            "models": {"retrieval_pool": str(pool)},
            "serve": {"events_dir": str(layout.events_dir), "reconstruct": False, "heartbeat_s": 0.5},
            "ports": {"publish": publish, "snapshot": snapshot, "decoder": decoder, "events": events},
        }
    )


def _result(live, layout, state, counts, model: DemoModel, workdir: Path) -> DemoResult:
    """Score the saved trials against the truth, write the gallery page, collect the display's figures."""
    from rtdecode.models.retrieval import RetrievalIndex
    from rtdecode.view.save import read_saved_trials

    display_dir = workdir / "display"
    trials, truth = read_saved_trials(display_dir), read_truth(layout.truth_path)
    retrieval = score(trials, truth, len(RetrievalIndex.load(model.pool)))
    gallery = write_gallery(trials, truth, layout.images_dir, workdir / "gallery.html")
    view = state.to_json()
    problems = [item.get("text", str(item)) for item in view.get("problems", {}).get("items", [])]
    n_logged = sum(len(run.trials) for run in live.truth)
    return DemoResult(
        counts.n_volumes, n_logged, retrieval, heldout(model), view.get("latency", []), problems, display_dir, gallery
    )
