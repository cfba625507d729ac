"""A scanner site for the serve tests: a store with a subject bundle (random tiny model), image models, a live
simulated session (scanner + stimulus program), a config file, and helpers to run the real daemon and listen.

The daemon runs as a real subprocess (``rtdecode serve``), so signals, ``kill -9`` and restarts are real.
"""

import collections
import dataclasses
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from rtdecode.bench.serve import free_ports, write_random_pool, write_random_subject_bundle
from rtdecode.config import GlmConfig
from rtdecode.publish.subscriber import Subscriber
from rtdecode.sim.live import LiveSession
from rtdecode.sim.world import SyntheticWorld, WorldConfig
from tests.helpers import PYTHON

SUBJECT = "syn08"
PATIENT = ("Zyxwvu^Qponml", "MRN-ZX4711-PHI")  # written into every DICOM; must never leave the scanner side
FAST_IMAGES = {"unclip_steps": 2, "refine_steps": 4, "refine_start_step": 2, "output_size_px": 24}


@dataclasses.dataclass
class Site:
    folder: Path
    config_path: Path
    live: LiveSession
    ports: dict[str, int]

    @property
    def home(self) -> Path:
        return self.folder / "home"

    @property
    def publish_endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.ports['publish']}"

    @property
    def decoder_endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.ports['decoder']}"

    @property
    def snapshot_endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.ports['snapshot']}"

    def command(self, *args: str) -> list[str]:
        return [PYTHON, "-m", "rtdecode", "--config", str(self.config_path), "--log-format", "json", *args]

    def start(self, *args: str, log_name: str = "serve") -> subprocess.Popen:
        """``rtdecode serve --subject syn08`` (or ``args``) in the background, logs to a file of the site."""
        log_path = self.folder / f"{log_name}.log"
        with open(log_path, "ab") as log:
            return subprocess.Popen(
                self.command(*(args or ("serve", "--subject", SUBJECT))),
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"},
            )

    def logs(self) -> str:
        return "".join(path.read_text(errors="replace") for path in sorted(self.folder.glob("*.log")))


def make_site(
    folder: Path,
    components: dict[str, Path],
    *,
    n_volumes: int = 60,
    speed: float = 10.0,
    runs: tuple[int, ...] = (1,),
    faults: dict[int, list[str]] | None = None,
    serve: dict | None = None,
    generate: dict | None = None,
    host: str = "127.0.0.1",
    remote_decoders: bool = False,
) -> Site:
    """A prepared site; nothing runs yet."""
    world = SyntheticWorld(WorldConfig(trials_per_run=20))
    live = LiveSession(
        world, SUBJECT, 1, folder / "session", runs=runs, speed=speed, n_volumes=n_volumes, faults=faults,
        patient=PATIENT, shape=(28, 32, 24),
    )  # fmt: skip
    layout = live.prepare()
    ports = dict(zip(("publish", "snapshot", "decoder", "events"), free_ports(4), strict=True))
    write_random_subject_bundle(
        folder / "home", SUBJECT, layout.region_mask_path, layout.reference_path, GlmConfig(), hidden_dim=24
    )
    serve = {"events_dir": str(layout.events_dir), "heartbeat_s": 0.2, **(serve or {})}
    if remote_decoders:
        serve["decoder"] = f"tcp://127.0.0.1:{ports['decoder']}"
    config = {
        "paths": {"home": str(folder / "home"), "watch_dir": str(layout.watch_dir)},
        "scanner": {"tr_s": 1.6, "incomplete_timeout_s": 1.0, "reorder_wait_s": 0.5 / speed},
        "models": {
            **{key: str(value) for key, value in components.items()},
            "retrieval_pool": str(write_random_pool(folder / "pool", n_images=50)),
        },
        "generate": {**FAST_IMAGES, **(generate or {})},
        "serve": serve,
        "ports": {"host": host, **ports},
    }
    config_path = folder / "config.toml"
    config_path.write_text(toml_text(config))
    return Site(folder, config_path, live, ports)


def toml_text(config: dict) -> str:
    """A config of flat sections as TOML (values as JSON, which is TOML for these)."""
    lines = []
    for section, values in config.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


class Listener:
    """A subscriber thread keeping every message, deduplicated by (stream, topic, seq)."""

    def __init__(self, site: Site, curve=None) -> None:
        self.subscriber = Subscriber(site.publish_endpoint, site.snapshot_endpoint, curve=curve)
        self.messages: list = []
        self._seen: set = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self.subscriber.receive(0.1)
            if message is None:
                continue
            key = (message.stream, message.topic, message.seq)
            with self._lock:
                if key not in self._seen:
                    self._seen.add(key)
                    self.messages.append(message)

    def of(self, topic: str, **fields) -> list:
        with self._lock:
            return [
                m
                for m in self.messages
                if m.topic == topic and all(m.header.get(key) == value for key, value in fields.items())
            ]

    def wait_for(self, predicate, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
            time.sleep(0.05)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.subscriber.close()


def trial_keys(messages) -> collections.Counter:
    """(run, trial_id) -> how many messages, repeats (flagged) left out."""
    return collections.Counter((m.header["run"], m.header["trial_id"]) for m in messages if not m.header.get("repeat"))


def trials_shown(messages) -> set[tuple[int, str]]:
    """(run, trial_id) of every message, repeats included: what a display that replaces repeats shows. A daemon
    killed between journaling ``sending`` and publishing sends its message only after the restart, flagged."""
    return {(m.header["run"], m.header["trial_id"]) for m in messages}


def logged_trials(site: Site) -> set[tuple[int, str]]:
    """Every trial the stimulus program logged (known in advance from the session's truth)."""
    return {(truth.run, trial.trial_id) for truth in site.live.truth for trial in truth.trials}


def stop(process: subprocess.Popen, timeout_s: float = 60) -> int:
    """SIGTERM, then wait for the exit code."""
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout=timeout_s)


def play(site: Site) -> threading.Thread:
    """The scanner and the stimulus program, in the background."""
    thread = threading.Thread(target=site.live.run, daemon=True)
    thread.start()
    return thread
