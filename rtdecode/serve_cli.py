"""``rtdecode serve``, ``rtdecode decode-worker`` and ``rtdecode keys``: the daemon's commands.

Thin: parse, load the config, call :mod:`rtdecode.serve`. rtdecode's CLI loads this module only when one of
these commands runs, so ``rtdecode --help`` stays fast.
"""

import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import click

from rtdecode.errors import ServeError


@click.command("serve")
@click.option("--subject", help="Subject id; its bundle (rtdecode calibrate) must exist. Default: subject.id.")
@click.option("--session", type=int, help="Session (visit) number. Default: subject.session.")
@click.option("--watch", "watch_dir", type=click.Path(path_type=Path), help="Scanner export folder (paths.watch_dir).")
@click.option(
    "--events-dir",
    type=click.Path(path_type=Path),
    help="The stimulus program's events.tsv per run (serve.events_dir; default: the session's events/).",
)
@click.option(
    "--decoder",
    metavar="tcp://HOST:PORT",
    help="Decode on GPU hosts: bind this endpoint for decode workers (serve.decoder). Default: decode here.",
)
@click.option("--backlog", type=click.Choice(["keep_all", "drop_oldest", "latest_only"]), help="serve.backlog.")
@click.pass_obj
def serve(g, subject, session, watch_dir, events_dir, decoder, backlog) -> None:
    """The real-time daemon: watch the scanner, decode every trial, publish over ZeroMQ.

    \b
    Each volume is motion-corrected onto the subject's reference, masked, and added to the online
    single-trial GLM; each trial's beta is z-scored with the calibration statistics and decoded
    (retrieval, low-level preview, caption, image). Everything is published on the PUB socket
    ([ports] publish, default 5555) with a late-joiner snapshot ([ports] snapshot, 5556); the
    contract is docs/protocol.md. Stimulus events come from --events-dir (events.tsv per run, read
    as it grows) or over ZeroMQ ([ports] events, 5558).

    \b
    Two hosts: on the scanner host
        rtdecode serve --subject new01 --decoder tcp://10.0.0.2:5557
    and on each GPU host (same subject bundle and [models] folders there)
        rtdecode decode-worker --subject new01 --connect tcp://10.0.0.2:5557 \\
            --client-key gpu1.key_secret --server-key server.key
    Binding beyond 127.0.0.1 needs CURVE keys: rtdecode keys init; rtdecode keys add gpu1.

    \b
    Stopping: Ctrl-C or SIGTERM ends the run (its final betas are published), decodes the trials
    already queued (up to serve.shutdown_timeout_s) and flushes the journal; a second one stops at
    once. After a crash, start the same command
    again: the run resumes where it was, and nothing published is published again.
    """
    from rtdecode.serve import open_daemon

    overrides = {"subject.id": subject, "subject.session": session, "paths.watch_dir": watch_dir}
    overrides |= {"serve.events_dir": events_dir, "serve.decoder": decoder, "serve.backlog": backlog}
    config = g.load_subject(overrides)
    served = open_daemon(config, config.subject.id, config.subject.session)
    _stop_on_signals(served.daemon.request_stop)
    ports = config.ports
    click.echo(
        f"serving {config.subject.id} session {config.subject.session}: watching {config.paths.watch_dir}; "
        f"publishing on tcp://{ports.host}:{ports.publish} (snapshot {ports.snapshot}); "
        f"decoding {'via ' + config.serve.decoder if config.serve.decoder else 'here'}",
        err=True,
    )
    try:
        counts = served.daemon.run()
    finally:
        served.close()
    if served.daemon.failure is not None:
        raise ServeError(served.daemon.failure)
    click.echo(
        f"{counts.n_volumes} volumes, {counts.n_betas} betas, {counts.n_decoded} trials decoded, "
        f"{counts.n_skipped} skipped, {counts.n_failed} failed"
    )


@click.command("decode-worker")
@click.option("--subject", help="Subject id; its bundle must be in this host's store. Default: subject.id.")
@click.option("--connect", "endpoint", required=True, metavar="tcp://HOST:PORT", help="The daemon's serve.decoder.")
@click.option("--client-key", type=click.Path(path_type=Path), help="This worker's secret key (NAME.key_secret).")
@click.option("--server-key", type=click.Path(path_type=Path), help="The daemon's public key (server.key).")
@click.option("--name", help="Worker name in the daemon's status (default: host name and process id).")
@click.pass_obj
def decode_worker(g, subject, endpoint, client_key, server_key, name) -> None:
    """A GPU-side decoder: takes trial betas from a daemon (rtdecode serve --decoder), returns images.

    Loads the subject bundle's model and the [models] image folders on [generate] device, warms
    them up, then connects. Several workers may serve one daemon; each takes the next trial when
    free. A worker that dies mid-trial loses nothing: the daemon gives the trial to another.
    Ctrl-C / SIGTERM finishes the current trial and leaves.
    """
    import socket

    from rtdecode.decoding import load_decoder
    from rtdecode.publish.keys import client_curve
    from rtdecode.remote.worker import run_worker
    from rtdecode.serve import open_bundle
    from rtdecode.store import Store

    config = g.load_subject({"subject.id": subject})
    curve = client_curve(config, endpoint, client_key, server_key)
    open_bundle(config, config.subject.id)  # the same [glm] checks as the daemon's, before loading models
    decoder = load_decoder(config, Store(config.home).bundle_dir(config.subject.id))
    click.echo(f"decode worker: {decoder.describe()}; warming up", err=True)
    decoder.warm_up()
    stop = threading.Event()
    _stop_on_signals(stop.set)
    name = name or f"{socket.gethostname()}-{os.getpid()}"
    click.echo(f"decode worker {name}: connecting to {endpoint}", err=True)
    n_jobs = run_worker(endpoint, decoder, stop=stop, curve_client=curve, name=name)
    click.echo(f"decode worker {name}: {n_jobs} trials decoded")


@click.group("keys")
def keys() -> None:
    """CURVE keys: needed to bind the daemon's sockets beyond loopback (docs/protocol.md, Security)."""


@keys.command("init")
@click.option("--force", is_flag=True, help="Replace an existing server key pair (every client needs the new one).")
@click.pass_obj
def keys_init(g, force) -> None:
    """Make the daemon's key pair (server.key, server.key_secret) in serve.keys_dir."""
    from rtdecode.publish.keys import SERVER_KEY, create_keypair, keys_dir

    config, _ = g.load()
    folder = keys_dir(config)
    public, secret = create_keypair(folder, SERVER_KEY, force=force)
    (folder / "authorised").mkdir(exist_ok=True)
    click.echo(
        f"server keys: {public} (give to clients), {secret} (stays here)\nauthorised clients: {folder / 'authorised'}"
    )


@keys.command("add")
@click.argument("name")
@click.option("--force", is_flag=True, help="Replace an existing pair of this name.")
@click.pass_obj
def keys_add(g, name, force) -> None:
    """Make a client key pair NAME (a display or a decode worker) and authorise it."""
    import shutil

    from rtdecode.publish.keys import SERVER_KEY, create_keypair, keys_dir

    config, _ = g.load()
    folder = keys_dir(config)
    if not (folder / f"{SERVER_KEY}.key").is_file():
        raise click.UsageError(f"no server keys in {folder}: run `rtdecode keys init` first")
    public, secret = create_keypair(folder / "clients", name, force=force)
    (folder / "authorised").mkdir(exist_ok=True)
    shutil.copy2(public, folder / "authorised" / public.name)
    click.echo(
        f"client {name}: authorised ({folder / 'authorised' / public.name}).\n"
        f"copy {secret} and {folder / (SERVER_KEY + '.key')} to the client; e.g.\n"
        f"  rtdecode decode-worker --connect tcp://HOST:PORT --client-key {secret.name} --server-key server.key\n"
        f"to revoke: delete {folder / 'authorised' / public.name} and restart serve"
    )


@keys.command("list")
@click.pass_obj
def keys_list(g) -> None:
    """The authorised client keys."""
    from rtdecode.publish.keys import keys_dir

    config, _ = g.load()
    authorised = keys_dir(config) / "authorised"
    names = sorted(p.stem for p in authorised.glob("*.key")) if authorised.is_dir() else []
    click.echo("\n".join(names) if names else f"no authorised clients in {authorised}")


def _stop_on_signals(first: Callable[[], None]) -> None:
    """First SIGINT/SIGTERM: ``first()`` (finish cleanly: it only sets a flag). Second: exit at once; the journal
    is written line by line, so nothing already done is lost, and a restart resumes."""
    calls = []

    def handler(signum, frame):
        calls.append(signum)
        if len(calls) == 1:
            click.echo(f"\n{signal.Signals(signum).name}: finishing current trials (again to stop at once)", err=True)
            first()
        else:
            click.echo(f"\n{signal.Signals(signum).name} again: stopping at once", err=True)
            os._exit(128 + signum)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
