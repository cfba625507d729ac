"""The operator display's web side: the page, the state as JSON and as Server-Sent Events, the images; and the
receiver thread that feeds the state from the daemon's ZeroMQ stream.

Routes of :class:`ViewServer` (stdlib ``http.server``, one thread per connection):

* ``/``: the page (``static/index.html`` with the current state inlined, so the first paint already shows it);
* ``/static/NAME``: the page's script and style sheet (files of ``static/`` only);
* ``/state``: :meth:`DisplayState.to_json <rtdecode.view.state.DisplayState.to_json>` as JSON;
* ``/events``: Server-Sent Events: the state JSON each time its version moves (at most every
  :data:`MIN_PUSH_INTERVAL_S`), a keep-alive comment every :data:`KEEPALIVE_S`;
* ``/image/RUN/TRIAL_ID/KIND?v=TAG``: a trial's ``image`` or ``preview`` bytes as published (``image/jpeg`` or
  ``image/png``); 404 when the state does not hold it;
* ``/pool/ID``: the retrieval pool's picture of match ``ID``, ``<pool_images_dir>/ID.png`` (or ``.jpg``,
  ``.jpeg``), when the server was given that folder (``rtdecode view --pool-images DIR``); 404 otherwise, and for
  an ``ID`` outside :data:`POOL_ID_PATTERN` (never a path: no separator, no leading dot).

The state JSON (inlined in the page, ``/state``, ``/events``) is :meth:`DisplayState.to_json
<rtdecode.view.state.DisplayState.to_json>` plus ``pool_images`` (whether ``/pool/`` has a folder to serve from).
It is written without NaN or Infinity (a browser's ``JSON.parse`` refuses them, and the page would stop
updating): such a value is sent as null, and a ``view`` problem names where it was.

Caching: the page (it holds the state), ``/state`` and ``/events`` are ``no-store``; the script and style sheet
are ``no-cache`` with an ``ETag`` (the browser asks each time and gets a 304 while the file is unchanged, a new
version once the package is updated); a picture's URL names its bytes for ever (``TAG`` is the state's instance
id and the version the picture arrived at, :func:`~rtdecode.view.state.image_url`), so a request whose ``TAG``
is the picture's own is ``immutable``, and any other (an old or a made-up ``TAG``) gets the current bytes,
``no-store``; a pool picture is cached for :data:`POOL_CACHE` (the pool does not change during a session). Every
response says ``X-Content-Type-Options: nosniff``: the browser takes each body as its declared type only.

The page has no login: keep it on loopback (the default) unless the network is trusted. On loopback, a request
must name this server in its ``Host`` header (``127.0.0.1``, ``localhost``, ``[::1]`` or the listen address, with
the port), else 403: a web page the operator visits cannot reach the display through a DNS name it points at
127.0.0.1 (DNS rebinding).
"""

import hashlib
import http.server
import json
import logging
import math
import re
import socket
import threading
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import SplitResult, parse_qs, unquote, urlsplit

from rtdecode.errors import ConfigError, NewerSchemaError, ProtocolError, RtDecodeError, SecurityError, ServeError
from rtdecode.publish.keys import CurveClient, is_loopback
from rtdecode.publish.protocol import Message
from rtdecode.publish.subscriber import Subscriber
from rtdecode.view.state import DisplayState, image_tag

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
INITIAL_STATE_MARK = '<script id="initial-state" type="application/json">null</script>'
KEEPALIVE_S = 5.0  # an SSE comment this often, so proxies and the browser see the stream alive
MIN_PUSH_INTERVAL_S = 0.1  # SSE pushes are coalesced to at most 10 a second (a snapshot is hundreds of messages)
TICK_S = 0.5  # how often an idle SSE stream re-evaluates time-based health (silence)
SSE_RETRY_MS = 1000  # the browser reconnects this long after losing the stream
POLL_S = 0.25  # the receiver's receive timeout: how quickly it notices a stop request
CONNECT_TIMEOUT_S = 2.0  # first wait for the daemon's handshake and snapshot; doubled up to MAX_CONNECT_TIMEOUT_S
MAX_CONNECT_TIMEOUT_S = 8.0
NO_STORE = "no-store"  # the state, in the page, as JSON or as events: always fresh
REVALIDATE = "no-cache"  # static files: asked for again each time (a 304 while unchanged)
IMMUTABLE = "private, max-age=31536000, immutable"  # a picture under its versioned URL never changes
POOL_CACHE = "private, max-age=3600"  # a retrieval pool picture: the pool does not change during a session
POOL_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")  # ids served from the pool folder (full match)
POOL_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
ANY_HOST = "*"
MAX_NON_FINITE_NAMED = 5  # fields named in the problem a non-finite value in the state becomes


class ViewServer:
    """Serves the display for ``state`` on ``host``:``port`` (port 0: a free one; :attr:`port` after
    :meth:`start`).

    ``allowed_hosts``: the names a request's ``Host`` header may give (with this server's port), ``"*"`` for any;
    None: the loopback names (and ``host``) when ``host`` is loopback, any name otherwise (the command refuses a
    non-loopback address without ``--allow-remote``). Other requests get 403.

    ``pool_images_dir``: a folder of the retrieval pool's pictures (``<id>.png``, ``.jpg`` or ``.jpeg``), served
    as ``/pool/<id>`` and shown by the page beside the matches; ConfigError when it is not a folder.
    """

    def __init__(
        self,
        state: DisplayState,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        allowed_hosts: Collection[str] | None = None,
        pool_images_dir: Path | None = None,
        static_dir: Path = STATIC_DIR,
    ) -> None:
        if pool_images_dir is not None and not Path(pool_images_dir).is_dir():
            raise ConfigError(f"pool_images_dir {pool_images_dir} is not a folder (of <id>.png or <id>.jpg pictures)")
        self.state = state
        self.host = host
        self.requested_port = port
        self.static_dir = Path(static_dir)
        self.pool_images_dir = None if pool_images_dir is None else Path(pool_images_dir)
        self.allowed_hosts = host_names(host, allowed_hosts)
        self._httpd: _HttpServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (after :meth:`start`)."""
        if self._httpd is None:
            raise ServeError("ViewServer.port is known once start() has bound the socket")
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        """The page's address, e.g. ``http://127.0.0.1:8765/``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> None:
        """Bind and serve in a background thread. ServeError naming the address when it cannot bind."""
        server_class = _HttpServer6 if ":" in self.host else _HttpServer
        try:
            self._httpd = server_class(
                (self.host, self.requested_port), self.state, self.static_dir, self.allowed_hosts, self.pool_images_dir
            )
        except OSError as err:
            raise ServeError(f"view: cannot listen on {self.host}:{self.requested_port}: {err}") from None
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="rtdecode-view-http", daemon=True
        )
        self._thread.start()
        log.info("view: serving %s", self.url)

    def stop(self) -> None:
        """Stop serving (open SSE streams end within :data:`TICK_S`) and close the socket. Idempotent."""
        if self._httpd is None or self._thread is None:
            return
        self._httpd.stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()
        self._thread = None

    def __enter__(self) -> "ViewServer":
        self.start()
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, traceback: TracebackType | None) -> None:
        self.stop()


def host_names(host: str, allowed_hosts: Collection[str] | None) -> frozenset[str] | None:
    """The host names a request may name (lower case, IPv6 without brackets), None for any (see
    :class:`ViewServer`)."""
    if allowed_hosts is None:
        return LOOPBACK_NAMES | {host.strip("[]").lower()} if is_loopback(host) else None
    names = frozenset(name.strip().strip("[]").lower() for name in allowed_hosts)
    return None if ANY_HOST in names else names


def host_allowed(host_header: str | None, names: frozenset[str] | None, port: int) -> bool:
    """Whether a request's ``Host`` header names this server: one of ``names`` (None: any) with ``port`` (a header
    without a port means 80)."""
    if names is None:
        return True
    if not host_header or any(char in host_header for char in "@/?#\\"):  # a bare host[:port] only
        return False
    try:
        address = urlsplit("//" + host_header.strip())
        header_port = 80 if address.port is None else address.port
    except ValueError:  # a port that is not a number, brackets that do not close
        return False
    return address.hostname in names and header_port == port


def finite_json(view: dict[str, Any]) -> tuple[str, list[str]]:
    """``view`` as JSON text without NaN or Infinity, and the fields that held one (sent as null; each named as a
    ``view`` problem at the head of ``view["problems"]``, when it has that list)."""
    try:
        return json.dumps(view, allow_nan=False, separators=(",", ":")), []
    except ValueError:
        fields: list[str] = []
        cleaned = _finite(view, "", fields)
    named = ", ".join(fields[:MAX_NON_FINITE_NAMED]) + (", ..." if len(fields) > MAX_NON_FINITE_NAMED else "")
    problem = {"kind": "view", "text": f"not a finite number (shown empty): {named}", "time_unix_s": time.time()}
    problems = cleaned.get("problems")
    if isinstance(problems, dict) and isinstance(problems.get("items"), list):
        problems["items"].insert(0, problem)
        problems.setdefault("counts", {})["not_finite"] = len(fields)
    return json.dumps(cleaned, allow_nan=False, separators=(",", ":")), fields


def _finite(value: Any, path: str, fields: list[str]) -> Any:
    """A copy of a JSON-ready value with each non-finite float replaced by None (its path added to ``fields``)."""
    if isinstance(value, float) and not math.isfinite(value):
        fields.append(path)
        return None
    if isinstance(value, dict):
        return {key: _finite(item, f"{path}.{key}" if path else str(key), fields) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item, f"{path}[{i}]", fields) for i, item in enumerate(value)]
    return value


def pool_picture(folder: Path, match_id: str) -> Path | None:
    """The picture of pool image ``match_id`` in ``folder`` (``.png``, ``.jpg``, then ``.jpeg``), or None; an id
    outside :data:`POOL_ID_PATTERN` has none (so it is never a path out of the folder)."""
    if not POOL_ID_PATTERN.fullmatch(match_id):
        return None
    for suffix in POOL_TYPES:
        path = folder / f"{match_id}{suffix}"
        if path.is_file():
            return path
    return None


class _HttpServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        state: DisplayState,
        static_dir: Path,
        allowed_hosts: frozenset[str] | None,
        pool_images_dir: Path | None = None,
    ) -> None:
        self.state = state
        self.static_dir = static_dir
        self.allowed_hosts = allowed_hosts
        self.pool_images_dir = pool_images_dir
        self.non_finite_reported: set[str] = set()  # fields already logged (the state is sent up to 10 times a second)
        self.report_lock = threading.Lock()
        self.static_files = {path.name: path for path in static_dir.iterdir() if path.suffix in STATIC_TYPES}
        self.stopping = threading.Event()
        super().__init__(address, _Handler)


class _HttpServer6(_HttpServer):
    address_family = socket.AF_INET6


class _Handler(http.server.BaseHTTPRequestHandler):
    """One request. HTTP/1.1 with lengths everywhere, so a browser reuses connections for the gallery."""

    server: _HttpServer
    protocol_version = "HTTP/1.1"
    server_version = "rtdecode-view"

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        url = urlsplit(self.path)
        path = url.path
        try:
            if not host_allowed(self.headers.get("Host"), self.server.allowed_hosts, self.server.server_address[1]):
                self._refuse_host()
            elif path in ("/", "/index.html"):
                self._page()
            elif path == "/state":
                self._send(200, "application/json", self._view_json()[1].encode("utf-8"))
            elif path == "/events":
                self._events()
            elif path.startswith("/static/"):
                self._static(path.removeprefix("/static/"))
            elif path.startswith("/image/"):
                self._image(url)
            elif path.startswith("/pool/"):
                self._pool(unquote(path.removeprefix("/pool/")))
            else:
                self._not_found(f"no such page: {path}")
        except (BrokenPipeError, ConnectionResetError):
            log.debug("view: client left during %s", path)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the stdlib's signature)
        log.debug("view http: " + format, *args)

    def end_headers(self) -> None:
        """Every response (errors of the stdlib included): its body is only ever its declared type."""
        self.send_header("X-Content-Type-Options", "nosniff")
        super().end_headers()

    def _view_json(self) -> tuple[int, str]:
        """The state's version and what the page draws, as JSON text (see the module docstring)."""
        view = self.server.state.to_json()
        view["pool_images"] = self.server.pool_images_dir is not None
        text, fields = finite_json(view)
        with self.server.report_lock:
            new = [field for field in fields if field not in self.server.non_finite_reported]
            self.server.non_finite_reported.update(new)
        if new:
            log.warning("view: the display state holds non-finite numbers (sent as null): %s", ", ".join(new))
        return view["version"], text

    def _page(self) -> None:
        template = (self.server.static_dir / "index.html").read_text(encoding="utf-8")
        initial = self._view_json()[1].replace("<", "\\u003c")
        body = template.replace(INITIAL_STATE_MARK, INITIAL_STATE_MARK.replace("null", initial))
        self._send(200, STATIC_TYPES[".html"], body.encode("utf-8"))

    def _static(self, name: str) -> None:
        """A static file, revalidated each time: 304 while its ``ETag`` (a digest of its bytes) is unchanged."""
        path = self.server.static_files.get(name)
        if path is None:
            self._not_found(f"no static file {name!r}")
            return
        body = path.read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        if etag in [tag.strip() for tag in self.headers.get("If-None-Match", "").split(",")]:
            self.send_response(304)
            self.send_header("ETag", etag)
            self.send_header("Cache-Control", REVALIDATE)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self._send(200, STATIC_TYPES[path.suffix], body, cache_control=REVALIDATE, headers={"ETag": etag})

    def _image(self, url: SplitResult) -> None:
        """A picture: cached for good under its own versioned URL, not cached under any other."""
        parts = url.path.removeprefix("/image/").split("/")
        if len(parts) != 3 or not (parts[0].isascii() and parts[0].isdigit()):  # "²".isdigit() is true
            self._not_found("image URLs are /image/RUN/TRIAL_ID/KIND")
            return
        run, trial_id, kind = int(parts[0]), unquote(parts[1]), parts[2]
        state = self.server.state
        image = state.image(run, trial_id, kind)
        if image is None:
            self._not_found(f"no {kind} of run {run} trial {trial_id!r} (kinds: image, preview; old trials leave)")
            return
        own_url = parse_qs(url.query).get("v") == [image_tag(image.version, state.instance)]
        self._send(200, image.content_type, image.payload, cache_control=IMMUTABLE if own_url else NO_STORE)

    def _pool(self, match_id: str) -> None:
        """A retrieval pool picture from the folder given to the server."""
        folder = self.server.pool_images_dir
        path = None if folder is None else pool_picture(folder, match_id)
        if path is None:
            where = "no --pool-images folder" if folder is None else f"not in {folder} as .png, .jpg or .jpeg"
            self._not_found(f"no pool picture for {match_id!r} ({where})")
            return
        try:
            body = path.read_bytes()
        except OSError as err:
            self._not_found(f"pool picture {path.name} cannot be read: {err}")
            return
        self._send(200, POOL_TYPES[path.suffix], body, cache_control=POOL_CACHE)

    def _events(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", NO_STORE)
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        self._write(f"retry: {SSE_RETRY_MS}\n\n")
        state, stopping = self.server.state, self.server.stopping
        sent_version, last_write_s = -1, time.monotonic()
        while not stopping.is_set():
            state.tick()
            if state.version != sent_version:
                sent_version, text = self._view_json()
                self._write(f"id: {sent_version}\ndata: {text}\n\n")
                last_write_s = time.monotonic()
                stopping.wait(MIN_PUSH_INTERVAL_S)
                continue
            if time.monotonic() - last_write_s >= KEEPALIVE_S:
                self._write(": keep-alive\n\n")
                last_write_s = time.monotonic()
            state.wait_changed(sent_version, TICK_S)

    def _write(self, text: str) -> None:
        self.wfile.write(text.encode("utf-8"))
        self.wfile.flush()

    def _not_found(self, text: str) -> None:
        self._send(404, "text/plain; charset=utf-8", (text + "\n").encode("utf-8"))

    def _refuse_host(self) -> None:
        host = self.headers.get("Host")
        log.warning("view: refused a request for Host %r (not this server's address)", host)
        text = (
            f"403: the Host header {host!r} does not name this server; open the address rtdecode view printed "
            "(a display reached under another name needs rtdecode view --allow-remote)"
        )
        self._send(403, "text/plain; charset=utf-8", (text + "\n").encode("utf-8"))

    def _send(
        self,
        code: int,
        content_type: str,
        body: bytes,
        *,
        cache_control: str = NO_STORE,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache_control)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


class Bridge:
    """Receives the daemon's stream in a thread and feeds it to ``state`` and then to each of ``handlers``.

    It joins late (:meth:`Subscriber.catch_up <rtdecode.publish.subscriber.Subscriber.catch_up>`: the snapshot
    gives the run's gallery and motion trace), retries while the daemon is not there, follows restarts, and
    reports the link in the state. A refused CURVE key or a newer protocol ends it: :attr:`failure` says why.
    """

    def __init__(
        self,
        state: DisplayState,
        publish_endpoint: str,
        snapshot_endpoint: str,
        *,
        curve: CurveClient | None = None,
        handlers: Sequence[Callable[[Message], None]] = (),
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
    ) -> None:
        self.state = state
        self.publish_endpoint = publish_endpoint
        self.snapshot_endpoint = snapshot_endpoint
        self.curve = curve
        self.handlers = tuple(handlers)
        self.connect_timeout_s = connect_timeout_s
        self.failure: str | None = None
        self.n_received = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rtdecode-view-bridge", daemon=True)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = MAX_CONNECT_TIMEOUT_S + 1.0) -> None:
        """Ask the thread to stop and wait for it (a connection attempt in progress ends within its timeout)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def __enter__(self) -> "Bridge":
        self.start()
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, traceback: TracebackType | None) -> None:
        self.stop()

    def _run(self) -> None:
        """The thread: whatever ends it other than :meth:`stop` is a :attr:`failure` (red page, the command ends),
        never a silent death."""
        try:
            with Subscriber(self.publish_endpoint, self.snapshot_endpoint, curve=self.curve) as subscriber:
                if self._catch_up(subscriber):
                    self._receive(subscriber)
        except RtDecodeError as err:  # a refused endpoint or setting: one clear line
            self._fail(str(err))
        except Exception as err:
            log.exception("view: the receiver stopped")
            self._fail(f"the receiver stopped: {err!r}")

    def _catch_up(self, subscriber: Subscriber) -> bool:
        timeout_s = self.connect_timeout_s
        while not self._stop.is_set():
            try:
                messages = subscriber.catch_up(timeout_s)
            except TimeoutError as err:
                self.state.note_link("connecting", f"waiting for the daemon: {err}")
                timeout_s = min(2.0 * timeout_s, MAX_CONNECT_TIMEOUT_S)
                continue
            except ProtocolError as err:
                self._fail(_protocol_failure(err))
                return False
            except SecurityError as err:
                self._fail(str(err))
                return False
            self.state.note_link("connected", f"{self.publish_endpoint}: {len(messages)} messages from the snapshot")
            for message in messages:
                self._deliver(message)
            return True
        return False

    def _receive(self, subscriber: Subscriber) -> None:
        while not self._stop.is_set():
            try:
                message = subscriber.receive(POLL_S)
            except ProtocolError as err:
                if isinstance(err, NewerSchemaError):  # every later message will be newer too: nothing to show
                    self._fail(_protocol_failure(err))
                    return
                log.warning("view: %s", err)
                self.state.note_problem("protocol", str(err))
                continue
            if message is not None:
                self._deliver(message)
            self.state.note_link("connected", f"receiving from {self.publish_endpoint}", n_lost=subscriber.n_lost)
            self.state.tick()

    def _deliver(self, message: Message) -> None:
        self.n_received += 1
        for handler in (self.state.apply, *self.handlers):
            try:
                handler(message)
            except Exception as err:  # one bad message or a full disk must not stop the display
                log.exception("view: %s seq %s not handled", message.topic, message.header.get("seq"))
                self.state.note_problem("view", f"{message.topic} message not handled: {err!r}")

    def _fail(self, text: str) -> None:
        log.error("view: %s", text)
        self.failure = text
        self.state.note_link("failed", text)


def _protocol_failure(err: ProtocolError) -> str:
    """The operator's line for a protocol error that ends the receiver."""
    if isinstance(err, NewerSchemaError):
        return f"the daemon publishes a newer protocol than this display reads ({err}): upgrade rtdecode view"
    return str(err)
