"""``rtdecode bench serve``: a simulated scanner and stimulus program feeding the real daemon; latency per trial.

The daemon runs with a subject bundle whose model has random weights (no weights are downloaded; a random model
costs what a trained one costs) on the simulated subject's signal region, and with random-weight image models at
tiny or real size. A subscriber on the PUB socket measures, per trial, the time from the closing of the file of
the volume that completed the trial's beta (the watcher's ``seen`` stamp, inotify close-write) to the beta being
published, and to the image being published; and whether every trial of the run was decoded with no growing
backlog.
"""

import dataclasses
import json
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import click
import numpy as np

from rtdecode.config import Config, GlmConfig

SUBJECT = "syn08"


def free_ports(n_ports: int) -> list[int]:
    """``n_ports`` distinct TCP ports free on the loopback right now."""
    sockets, ports = [], []
    for _ in range(n_ports):
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        sockets.append(probe)
        ports.append(probe.getsockname()[1])
    for probe in sockets:
        probe.close()
    return ports


def write_random_subject_bundle(
    home: Path,
    subject: str,
    mask_path: Path,
    reference_path: Path,
    glm: GlmConfig,
    *,
    size: str = "tiny",
    hidden_dim: int = 1024,
    seed: int = 0,
) -> Path:
    """A subject bundle whose model has random weights (with the low-level head and a caption converter sized
    for the ``size`` image models), for the given mask and reference; statistics are the identity (mean 0, sd 1).

    Honest about itself: its manifest and report say ``random weights, not calibrated``.
    """
    import torch

    from rtdecode.bench.generate import mindeye2_config
    from rtdecode.betas import load_reference
    from rtdecode.generate.caption import captioner_config, feature_token_count
    from rtdecode.generate.geometry import UnclipGeometry
    from rtdecode.glm.normalise import ZScore
    from rtdecode.models.bundle import save_model_bundle
    from rtdecode.models.config import ConverterConfig
    from rtdecode.models.converter import CLIPConverter
    from rtdecode.models.mindeye2 import MindEye2
    from rtdecode.preprocess.mask import Mask
    from rtdecode.store import Store
    from rtdecode.subject_bundle import write_subject_bundle

    mask = Mask.from_nifti(mask_path)
    geometry = UnclipGeometry.published() if size == "real" else UnclipGeometry.tiny()
    caption = captioner_config("large" if size == "real" else "tiny")
    config = mindeye2_config(size, hidden_dim, mask.n_voxels, geometry.context_dim)
    config = dataclasses.replace(config, subjects=(subject,))
    converter_config = ConverterConfig(
        in_tokens=config.backbone.clip_tokens,
        out_tokens=feature_token_count(caption),
        in_dim=geometry.context_dim,
        out_dim=caption.vision_config.hidden_size,
    )
    torch.manual_seed(seed)
    provenance = {"source_kind": "random", "size": size, "seed": seed, "note": "random weights, not calibrated"}
    statistics = ZScore("calibration", 1, np.zeros(mask.n_voxels), np.ones(mask.n_voxels), epsilon=0.0)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        model_dir = save_model_bundle(
            scratch / "model", MindEye2(config), provenance=provenance, converter=CLIPConverter(converter_config)
        )
        report = {"note": "random weights, not calibrated: for timing and tests"}
        (scratch / "report.json").write_text(json.dumps(report) + "\n")
        (scratch / "report.html").write_text(f"<!doctype html><title>random</title><p>{report['note']}</p>\n")
        return write_subject_bundle(
            Store(home).bundle_dir(subject),
            manifest={"subject": subject, "session": 0, "glm": glm.model_dump(mode="json"), "betas": "online"},
            mask=mask,
            reference=load_reference(reference_path),
            zscore=statistics,
            model_dir=model_dir,
            report_files=(scratch / "report.json", scratch / "report.html"),
        )


@dataclasses.dataclass
class Received:
    """What a subscriber saw, per topic."""

    messages: dict[str, list] = dataclasses.field(default_factory=dict)

    def add(self, message) -> None:
        self.messages.setdefault(message.topic, []).append(message)

    def of(self, topic: str) -> list:
        return self.messages.get(topic, [])


def collect(subscriber, received: Received, stop: threading.Event) -> None:
    """Receive until ``stop``."""
    while not stop.is_set():
        message = subscriber.receive(0.1)
        if message is not None:
            received.add(message)


def latency_ms(message) -> float | None:
    """File close of the trial's completing volume -> published, milliseconds (one host's monotonic clock)."""
    seen_s = message.header.get("timestamps", {}).get("seen")
    return None if seen_s is None else (message.header["published_s"] - seen_s) * 1000


@click.command("serve")
@click.option("--volumes", "n_volumes", type=int, help="Cut the run to this many volumes (default: all 188).")
@click.option("--speed", type=float, default=4.0, show_default=True, help="Times faster than real time (TR 1.6 s).")
@click.option("--size", type=click.Choice(["tiny", "real"]), default="tiny", show_default=True, help="Model sizes.")
@click.option("--device", default="cpu", show_default=True, help="Torch device of the decoder.")
@click.option("--no-images", is_flag=True, help="Decode embeddings, retrieval and previews only.")
@click.option("--workdir", type=click.Path(path_type=Path), help="Keep the files here (default: a temporary folder).")
def bench_serve(n_volumes, speed, size, device, no_images, workdir) -> None:
    """File close -> beta published and -> image published, per trial of a simulated 63-trial run.

    \b
    A simulated scanner writes one NSD-like run (TR 1.6 s, 63 trials, Siemens mosaic DICOM, head
    motion) at --speed, a simulated stimulus program appends each trial to events.tsv as it happens,
    and the real daemon (ingest, motion correction, online GLM, decoding, publishing) serves it with
    random-weight models. Goals: beta published p95 <= 250 ms after its volume's file closed;
    every trial decoded with no growing backlog.
    """
    folder = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="rtdecode-bench-serve-"))
    try:
        report = run_bench(folder, n_volumes, speed, size, device, not no_images)
    finally:
        if workdir is None:
            shutil.rmtree(folder, ignore_errors=True)
    click.echo(report)


def run_bench(folder: Path, n_volumes: int, speed: float, size: str, device: str, images: bool) -> str:
    from rtdecode.publish.subscriber import Subscriber
    from rtdecode.serve import open_daemon
    from rtdecode.sim.live import LiveSession
    from rtdecode.sim.world import SyntheticWorld, WorldConfig

    world = SyntheticWorld(WorldConfig(trials_per_run=63, n_train_images=261))  # 7 runs of exactly 63 trials
    live = LiveSession(world, SUBJECT, 1, folder / "session", runs=[1], speed=speed, n_volumes=n_volumes)
    layout = live.prepare()
    config = _bench_config(folder, layout, size, device, images)
    write_random_subject_bundle(
        config.home, SUBJECT, layout.region_mask_path, layout.reference_path, config.glm, size=size
    )
    served = open_daemon(config, SUBJECT, 1)
    ports = config.ports
    subscriber = Subscriber(f"tcp://127.0.0.1:{ports.publish}")
    received, stop_collecting = Received(), threading.Event()
    collector = threading.Thread(target=collect, args=(subscriber, received, stop_collecting), daemon=True)
    collector.start()
    daemon_thread = threading.Thread(target=served.daemon.run, name="daemon", daemon=True)
    started_s = time.monotonic()
    daemon_thread.start()
    try:
        time.sleep(0.5)  # the subscriber's connection settles (PUB drops messages to late subscribers)
        results = live.run()
        _wait_for_decoding(served.daemon, timeout_s=60)
        served.daemon.request_stop()
        daemon_thread.join(timeout=120)
    finally:
        stop_collecting.set()
        collector.join(timeout=5)
        subscriber.close()
        served.close()
    n_logged = sum(len(result.logged) for result in results)
    return _report(received, n_logged, served.daemon.counts, time.monotonic() - started_s, config, speed)


def _bench_config(folder: Path, layout, size: str, device: str, images: bool) -> Config:
    from rtdecode.generate.random_components import write_random_components

    publish, snapshot, decoder, events = free_ports(4)
    models = {}
    if images:
        models = {key: str(value) for key, value in write_random_components(folder / "image-models", size).items()}
    models["retrieval_pool"] = str(write_random_pool(folder / "retrieval-pool", size))
    generate = {"device": device}
    if size == "tiny":
        generate |= {"unclip_steps": 3, "refine_steps": 4, "refine_start_step": 2, "output_size_px": 64}
    return Config(
        paths={"home": folder / "home", "watch_dir": layout.watch_dir},
        scanner={"tr_s": 1.6},
        models=models,
        generate=generate,
        serve={"events_dir": layout.events_dir, "reconstruct": images},
        ports={"publish": publish, "snapshot": snapshot, "decoder": decoder, "events": events},
    )


def write_random_pool(folder: Path, size: str = "tiny", n_images: int = 1000) -> Path:
    """A retrieval pool of random embeddings shaped like the model's CLIP output (searching costs the same)."""
    import torch

    from rtdecode.generate.geometry import UnclipGeometry
    from rtdecode.models.retrieval import RetrievalIndex

    geometry = UnclipGeometry.published() if size == "real" else UnclipGeometry.tiny()
    n_tokens = 256 if size == "real" else 6
    vectors = torch.randn(n_images, n_tokens, geometry.context_dim, generator=torch.Generator().manual_seed(0))
    return RetrievalIndex([f"pool{i:05d}" for i in range(n_images)], vectors).save(folder)


def _wait_for_decoding(daemon, timeout_s: float) -> None:
    """After the scanner's last file: until ingest has had time to settle and the decoders are idle."""
    deadline_s = time.monotonic() + timeout_s
    time.sleep(1.0)
    while time.monotonic() < deadline_s and (len(daemon.backlog) or daemon.dispatcher.status().get("in_flight")):
        time.sleep(0.1)


def _report(received: Received, n_logged: int, counts, wall_s: float, config: Config, speed: float) -> str:
    online = [m for m in received.of("beta") if m.header.get("version") == "online"]
    final_topic = "image" if config.serve.reconstruct else "retrieval"
    finals = received.of(final_topic)
    lines = [
        f"rtdecode bench serve: one simulated run, {counts.n_volumes} volumes, TR 1.6 s at {speed:g}x, "
        f"{n_logged} trials logged; decoder: random weights, {'images' if config.serve.reconstruct else 'no images'}, "
        f"device {config.generate.device}",
        f"volumes processed: {counts.n_volumes}; online betas published: {len(online)}; trials decoded "
        f"({final_topic} published): {len({m.header['trial_id'] for m in finals})} of {n_logged}; "
        f"skipped {counts.n_skipped}, failed {counts.n_failed}",
    ]
    for name, messages in (("beta published", online), (f"{final_topic} published", finals)):
        values = [v for v in map(latency_ms, messages) if v is not None]
        if values:
            median, p95 = np.percentile(values, [50, 95])
            lines.append(f"file close -> {name}: median {median:.1f} ms, p95 {p95:.1f} ms, max {max(values):.1f} ms")
    statuses = received.of("status")
    if statuses:
        peaks = [m.header.get("backlog_peak", 0) for m in statuses]
        lines.append(f"backlog: peak {max(peaks)} trial(s); at the end {statuses[-1].header.get('backlog')}")
    lines.append(f"wall time {wall_s:.1f} s")
    return "\n".join(lines)
