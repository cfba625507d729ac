"""``rtdecode view``: the operator display (a local web page), or ``--save DIR`` to record the stream headless.

Thin: parse, load the config, start the receiver, the web server and/or the saver, wait for Ctrl-C.
"""

import contextlib
import logging
import os
import signal
import sys
import threading
import webbrowser
from collections.abc import Iterator
from pathlib import Path

import click

from rtdecode.errors import SecurityError, ServeError
from rtdecode.publish.keys import is_loopback

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:8765"
WILDCARD_HOSTS = ("*", "0.0.0.0", "::", "[::]")
WAIT_S = 0.5  # how often the command looks at the receiver while it waits for Ctrl-C


@click.command("view")
@click.option(
    "--connect",
    "publish_endpoint",
    metavar="tcp://HOST:PORT",
    help="The daemon's publish socket. Default: tcp://127.0.0.1:[ports] publish (5555).",
)
@click.option(
    "--snapshot",
    "snapshot_endpoint",
    metavar="tcp://HOST:PORT",
    help="The daemon's snapshot socket (late join). Default: the --connect host, port [ports] snapshot (5556).",
)
@click.option("--client-key", type=click.Path(path_type=Path), help="This display's secret key (NAME.key_secret).")
@click.option("--server-key", type=click.Path(path_type=Path), help="The daemon's public key (server.key).")
@click.option(
    "--listen", metavar="HOST:PORT", help=f"Serve the page here. Default: {DEFAULT_LISTEN} (not with --save)."
)
@click.option(
    "--allow-remote",
    is_flag=True,
    help="Allow --listen beyond loopback, and requests that reach the page under any host name (without it, a "
    "loopback page answers only to 127.0.0.1, localhost and [::1]): the page has no login.",
)
@click.option(
    "--save",
    "save_dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Write what arrives to this folder (images, trials.jsonl, motion.tsv, status.jsonl); headless unless "
    "--listen is given too.",
)
@click.option(
    "--pool-images",
    "pool_images_dir",
    metavar="DIR",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    help="Pictures of the retrieval pool, named <id>.png or .jpg, shown beside the matches.",
)
@click.option("--open/--no-open", "open_page", default=False, show_default=True, help="Open a browser on the page.")
@click.pass_obj
def view(
    g,
    publish_endpoint,
    snapshot_endpoint,
    client_key,
    server_key,
    listen,
    allow_remote,
    save_dir,
    pool_images_dir,
    open_page,
) -> None:
    """The operator display: the daemon's stream as a live web page, or saved to a folder.

    \b
    Subscribes to a running `rtdecode serve` (catching up from its snapshot when started late) and
    serves a page at http://127.0.0.1:8765/ with the latest reconstruction, its caption and
    retrieval matches, the run's gallery, the motion trace, per-stage latency, missing or
    quarantined volumes and the daemon's health (green running, amber stalled or backlog
    growing, red silent, error or no decode worker; docs/operator.md says what to do).

    \b
    On another host than the daemon's, give CURVE keys (rtdecode keys add NAME on the daemon's host):
        rtdecode view --connect tcp://10.0.0.2:5555 --client-key NAME.key_secret --server-key server.key
    Headless:
        rtdecode view --save ~/session-record
    Ctrl-C stops.
    """
    from rtdecode.publish.keys import client_curve
    from rtdecode.view.save import Saver
    from rtdecode.view.server import ANY_HOST, Bridge, ViewServer
    from rtdecode.view.state import DisplayState

    config, _ = g.load()
    publish_endpoint = publish_endpoint or default_publish_endpoint(config.ports.host, config.ports.publish)
    snapshot_endpoint = snapshot_endpoint or default_snapshot_endpoint(publish_endpoint, config.ports.snapshot)
    curve = client_curve(config, publish_endpoint, client_key, server_key)
    if curve is None:  # the same rule for the snapshot socket (its own host may be another)
        client_curve(config, snapshot_endpoint, client_key, server_key)
    headless = save_dir is not None and listen is None
    listen_address = None if headless else checked_listen(listen or DEFAULT_LISTEN, allow_remote)
    state = DisplayState(fd_threshold_mm=config.preprocess.fd_threshold_mm)
    saver = Saver(save_dir) if save_dir is not None else None
    bridge = Bridge(state, publish_endpoint, snapshot_endpoint, curve=curve, handlers=[saver.write] if saver else [])
    allowed_hosts = (ANY_HOST,) if allow_remote else None
    server = None
    if listen_address is not None:
        server = ViewServer(state, *listen_address, allowed_hosts=allowed_hosts, pool_images_dir=pool_images_dir)
    _run(bridge, server, saver, open_page, publish_endpoint)


def default_publish_endpoint(ports_host: str, publish_port: int) -> str:
    """``tcp://HOST:PORT`` of the daemon's publish socket from ``[ports]``: its host, or 127.0.0.1 when the daemon
    binds every interface."""
    host = "127.0.0.1" if ports_host in WILDCARD_HOSTS else ports_host
    host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"tcp://{host}:{publish_port}"


def default_snapshot_endpoint(publish_endpoint: str, snapshot_port: int) -> str:
    """The snapshot socket on the host of ``publish_endpoint`` (``tcp://`` only)."""
    transport, _, address = publish_endpoint.partition("://")
    host, separator, _ = address.rpartition(":")
    if transport != "tcp" or not separator or not host:
        raise click.UsageError(f"--snapshot is needed with --connect {publish_endpoint} (not tcp://HOST:PORT)")
    return f"tcp://{host}:{snapshot_port}"


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 in brackets) as ``(host, port)``; a UsageError otherwise."""
    host, separator, port = text.rpartition(":")
    host = host.strip("[]")
    if not separator or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise click.UsageError(f"--listen must be HOST:PORT such as {DEFAULT_LISTEN}, got {text!r}")
    return host, int(port)


def checked_listen(text: str, allow_remote: bool) -> tuple[str, int]:
    """``--listen HOST:PORT`` as ``(host, port)`` (:func:`parse_listen`), refused with a SecurityError when the
    host is beyond loopback and ``allow_remote`` (``--allow-remote``) is not given: the page has no login."""
    host, port = parse_listen(text)
    if not is_loopback(host) and not allow_remote:
        raise SecurityError(
            f"--listen {text}: the page has no login, so anyone who can reach {host} would see the decoded images; "
            "listen on 127.0.0.1 (and use an SSH tunnel), or add --allow-remote on a trusted network"
        )
    return host, port


@contextlib.contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """An Event that SIGINT (Ctrl-C) and SIGTERM set while the block runs, instead of interrupting it; the previous
    handlers come back at the end. Signals reach the main thread only: elsewhere the Event is only set by its
    owner."""
    stop = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {
            sig: signal.signal(sig, lambda signum, frame: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)
        }
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(bridge, server, saver, open_page: bool, publish_endpoint: str) -> None:
    """Start everything, wait for Ctrl-C / SIGTERM (or a receiver that ended: it cannot go on), stop everything."""
    with stop_on_signals() as stop:
        try:
            if server is not None:
                server.start()
                click.echo(f"view: {server.url} (receiving from {publish_endpoint}; Ctrl-C stops)")
                if open_page:
                    open_browser(server.url)
            if saver is not None:
                click.echo(f"view: saving to {saver.folder} (receiving from {publish_endpoint}; Ctrl-C stops)")
            bridge.start()
            while bridge.running and not stop.wait(WAIT_S):
                pass
        finally:
            _stop_all(bridge, server, saver)
    if bridge.failure is not None:
        raise ServeError(f"view: {bridge.failure}")
    saved = f"; {saver.n_images} images saved in {saver.folder}" if saver is not None else ""
    click.echo(f"view: stopped after {bridge.n_received} messages{saved}")


def _stop_all(bridge, server, saver) -> None:
    """Stop the receiver, the web server and the saver (each whether or not it was started)."""
    bridge.stop()
    if server is not None:
        server.stop()
    if saver is not None:
        saver.close()


def open_browser(url: str) -> None:
    """Open a browser on ``url`` when this machine has a display (on a headless host: say so, go on; a text
    browser would take over the terminal)."""
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        click.echo(f"view: no display here to open a browser on; open {url} yourself", err=True)
        return
    try:
        opened = webbrowser.open(url)
    except webbrowser.Error as err:
        opened = False
        log.debug("webbrowser: %s", err)
    if not opened:
        click.echo(f"view: no browser to open here; open {url} yourself", err=True)
