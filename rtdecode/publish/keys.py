"""ZeroMQ CURVE keys: making key pairs, and turning any socket into an authenticating server or a client.

The security model (docs/protocol.md): sockets on loopback (127.0.0.0/8, ::1, localhost) or on ``ipc://`` /
``inproc://`` need no keys; any other interface needs CURVE (encryption plus a list of authorised client keys),
unless the operator opts out explicitly. Key files are the ZeroMQ certificate format that ``zmq.auth`` writes and
reads: ``NAME.key`` holds the public key (shared freely), ``NAME.key_secret`` the pair (mode 0600, never leaves
its host). A server accepts the clients whose ``*.key`` files are in its authorised folder, checked by a ZAP
handler (``zmq.auth.thread.ThreadAuthenticator``) on the socket's context.

Used by the display publisher and by the two-host decoder link; nothing here knows which socket it serves.
"""

import ipaddress
import logging
import os
import re
import tempfile
import threading
from pathlib import Path
from types import TracebackType

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from rtdecode.config import Config
from rtdecode.errors import ConfigError, SecurityError

log = logging.getLogger(__name__)

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
SECRET_FILE_MODE = 0o600
PUBLIC_FILE_MODE = 0o644
KEYS_DIR_MODE = 0o700
LOCAL_TRANSPORTS = ("ipc", "inproc")
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def create_keypair(keys_dir: Path, name: str, *, force: bool = False) -> tuple[Path, Path]:
    """Write a new CURVE pair ``keys_dir/NAME.key`` (public) and ``NAME.key_secret`` (secret, mode 0600).

    The files are written in a private temporary folder and moved into place, so the secret is never readable by
    others. An existing pair is kept (SecurityError) unless ``force``: every client holding the old public key
    would be locked out. Returns ``(public_file, secret_file)``.
    """
    if not _NAME_PATTERN.fullmatch(name):
        raise ConfigError(f"key name must match {_NAME_PATTERN.pattern} (a plain file name), got {name!r}")
    keys_dir = Path(keys_dir)
    public_file, secret_file = keys_dir / f"{name}{PUBLIC_SUFFIX}", keys_dir / f"{name}{SECRET_SUFFIX}"
    existing = [str(path) for path in (public_file, secret_file) if path.exists()]
    if existing and not force:
        raise SecurityError(
            f"key pair {name!r} already exists ({', '.join(existing)}); refusing to overwrite it "
            "(force replaces it, and every client must then get the new public key)"
        )
    try:
        keys_dir.mkdir(mode=KEYS_DIR_MODE, parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=keys_dir, prefix=f".{name}-") as private_dir:
            new_public, new_secret = zmq.auth.create_certificates(private_dir, name)
            os.chmod(new_secret, SECRET_FILE_MODE)
            os.chmod(new_public, PUBLIC_FILE_MODE)
            os.replace(new_secret, secret_file)
            os.replace(new_public, public_file)
    except OSError as err:
        raise SecurityError(f"cannot write CURVE key pair {name!r} in {keys_dir}: {err}") from None
    log.info("created CURVE key pair %s (public %s)", name, public_file)
    return public_file, secret_file


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address: 127.0.0.0/8, ::1 (brackets allowed) or ``localhost``."""
    bare = host.strip().strip("[]")
    if bare.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(bare).is_loopback
    except ValueError:
        return False


def needs_curve(host: str) -> bool:
    """Whether a socket on ``host`` must use CURVE: any interface other than loopback (``*`` included)."""
    return not is_loopback(host)


def endpoint_needs_curve(endpoint: str) -> bool:
    """Whether a ZeroMQ ``endpoint`` must use CURVE: ``tcp://`` (and other network transports) on a host that is
    not loopback; ``ipc://`` and ``inproc://`` stay on the machine and need none."""
    transport, separator, address = endpoint.partition("://")
    if not separator:
        raise ConfigError(f"endpoint must look like 'tcp://HOST:PORT', got {endpoint!r}")
    if transport in LOCAL_TRANSPORTS:
        return False
    host = address.rpartition(":")[0] if ":" in address else address
    return needs_curve(host.rpartition(";")[2])


def check_endpoint_security(name: str, endpoint: str, has_curve: bool, *, allow_insecure: bool = False) -> None:
    """A SecurityError when ``endpoint`` (parameter ``name``) is reachable from other hosts and has no CURVE keys,
    unless the operator opted out with ``allow_insecure`` (logged as a warning)."""
    if has_curve or not endpoint_needs_curve(endpoint):
        return
    if allow_insecure:
        log.warning("%s %s is reachable from other hosts without CURVE (operator opted out)", name, endpoint)
        return
    raise SecurityError(
        f"{name} {endpoint} is not loopback, so it needs CURVE keys (make them with 'rtdecode keys'); "
        "bind to 127.0.0.1 or give the keys"
    )


class CurveServer:
    """Makes sockets CURVE servers that accept only the clients whose public keys are in ``authorised_dir``.

    Keys are read and checked when it is made (a clear error naming the file or folder). :meth:`apply` starts one
    ZAP authenticator per ZeroMQ context, the first time a socket of that context is given; :meth:`release` stops
    the one of a context (after its CURVE sockets are closed, before the context is terminated), :meth:`close`
    all of them. A context has room for one ZAP handler, so share one CurveServer among the sockets of a context.
    Public keys added to the folder later take effect after :meth:`reload`.
    """

    def __init__(self, secret_key_file: Path, authorised_dir: Path) -> None:
        self.secret_key_file = Path(secret_key_file)
        self.authorised_dir = Path(authorised_dir)
        self.public_key, self._secret_key = load_secret_pair(self.secret_key_file)
        self.authorised_keys = load_authorised_keys(self.authorised_dir)
        self._authenticators: dict[zmq.Context, ThreadAuthenticator] = {}
        self._lock = threading.Lock()
        self._closed = False

    def apply(self, socket: zmq.Socket) -> None:
        """Make ``socket`` a CURVE server (call before it binds), with ZAP checking clients on its context."""
        self._authenticator(socket.context)
        socket.curve_secretkey = self._secret_key
        socket.curve_publickey = self.public_key
        socket.curve_server = True

    def reload(self) -> None:
        """Read the authorised folder again (a display's key was added or removed) and use it from now on."""
        keys = load_authorised_keys(self.authorised_dir)
        with self._lock:
            self.authorised_keys = keys
            for authenticator in self._authenticators.values():
                authenticator.configure_curve(domain="*", location=str(self.authorised_dir))

    def release(self, context: zmq.Context) -> None:
        """Stop the ZAP authenticator of ``context``, if this server started one. Close its CURVE sockets first:
        a CURVE socket with no ZAP handler would accept any client."""
        with self._lock:
            authenticator = self._authenticators.pop(context, None)
        if authenticator is not None:
            authenticator.stop()

    def close(self) -> None:
        """Stop every authenticator this server started; idempotent."""
        with self._lock:
            self._closed = True
            contexts = list(self._authenticators)
        for context in contexts:
            self.release(context)

    def __enter__(self) -> "CurveServer":
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, traceback: TracebackType | None) -> None:
        self.close()

    def _authenticator(self, context: zmq.Context) -> ThreadAuthenticator:
        with self._lock:
            if self._closed:
                raise SecurityError(f"CurveServer for {self.secret_key_file} is closed")
            if context not in self._authenticators:
                self._authenticators[context] = self._start_authenticator(context)
            return self._authenticators[context]

    def _start_authenticator(self, context: zmq.Context) -> ThreadAuthenticator:
        authenticator = ThreadAuthenticator(context, log=logging.getLogger(f"{__name__}.zap"))
        try:
            authenticator.start()
        except zmq.ZMQError as err:
            authenticator.stop()
            raise SecurityError(
                f"cannot start the CURVE authenticator: another ZAP handler already runs on this ZeroMQ context "
                f"({err}); share one CurveServer among the sockets of a context"
            ) from None
        authenticator.configure_curve(domain="*", location=str(self.authorised_dir))
        return authenticator


class CurveClient:
    """Makes sockets CURVE clients of the server whose public key is in ``server_public_key_file``."""

    def __init__(self, secret_key_file: Path, server_public_key_file: Path) -> None:
        self.secret_key_file = Path(secret_key_file)
        self.server_public_key_file = Path(server_public_key_file)
        self.public_key, self._secret_key = load_secret_pair(self.secret_key_file)
        self.server_public_key = load_public_key(self.server_public_key_file)

    def apply(self, socket: zmq.Socket) -> None:
        """Make ``socket`` a CURVE client (call before it connects)."""
        socket.curve_secretkey = self._secret_key
        socket.curve_publickey = self.public_key
        socket.curve_serverkey = self.server_public_key


def load_public_key(path: Path) -> bytes:
    """The public key (Z85) in a key file; a SecurityError naming the file when it is missing or unreadable."""
    return _read_key_file(Path(path))[0]


def load_secret_pair(path: Path) -> tuple[bytes, bytes]:
    """``(public, secret)`` keys from a ``*.key_secret`` file; a SecurityError naming the file when it is missing,
    unreadable or holds no secret key."""
    path = Path(path)
    public_key, secret_key = _read_key_file(path)
    if secret_key is None:
        raise SecurityError(f"CURVE key file {path} holds only a public key; give the secret file (*{SECRET_SUFFIX})")
    if path.stat().st_mode & 0o077:
        log.warning("CURVE secret key file %s is readable by other users; chmod 600 it", path)
    return public_key, secret_key


def load_authorised_keys(folder: Path) -> frozenset[bytes]:
    """The public keys (Z85) of the ``*.key`` files in ``folder``; a SecurityError naming the folder when it is
    missing or holds none (no client could ever connect), or naming a file that is not a key file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SecurityError(f"authorised keys folder {folder} does not exist (put the clients' *.key files there)")
    files = sorted(folder.glob(f"*{PUBLIC_SUFFIX}"))
    if not files:
        raise SecurityError(
            f"authorised keys folder {folder} holds no public key (*{PUBLIC_SUFFIX}), so no client could connect; "
            "copy each client's public key file there"
        )
    return frozenset(_read_key_file(path)[0] for path in files)


def _read_key_file(path: Path) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        raise SecurityError(f"CURVE key file {path} does not exist (make key pairs with 'rtdecode keys')")
    try:
        public_key, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as err:
        raise SecurityError(f"CURVE key file {path} cannot be read as a ZeroMQ key file: {err}") from None
    if len(public_key) != 40 or (secret_key is not None and len(secret_key) != 40):
        raise SecurityError(f"CURVE key file {path} holds a key that is not 40 Z85 characters")
    return public_key, secret_key


# -- the keys folder of a configured daemon (rtdecode keys, serve, decode-worker, view) ---------------------------

SERVER_KEY = "server"


def keys_dir(config: Config) -> Path:
    return config.serve.keys_dir or config.home / "keys"


def server_curve(config: Config, endpoints: list[str]) -> CurveServer | None:
    """One CURVE server for the daemon's sockets (a ZeroMQ context has room for one ZAP handler), or None when
    every endpoint stays on this machine or ``[serve] insecure`` is set (the sockets then log a warning)."""
    exposed = [endpoint for endpoint in endpoints if endpoint_needs_curve(endpoint)]
    if not exposed or config.serve.insecure:
        return None
    folder = keys_dir(config)
    secret = folder / f"{SERVER_KEY}.key_secret"
    if not secret.is_file():
        raise SecurityError(
            f"binding {', '.join(exposed)} (beyond loopback) needs CURVE keys and {secret} does not exist: run "
            "`rtdecode keys init` and `rtdecode keys add NAME` for each display or worker, or bind 127.0.0.1 "
            "([ports] host), or accept traffic in clear with --set serve.insecure=true"
        )
    return CurveServer(secret, folder / "authorised")


def client_curve(config: Config, endpoint: str, client_key: Path | None, server_key: Path | None) -> CurveClient | None:
    """CURVE for a client connecting to ``endpoint`` (a display or a decode worker)."""
    if client_key is None and server_key is None and (not endpoint_needs_curve(endpoint) or config.serve.insecure):
        return None
    if client_key is None or server_key is None:
        raise SecurityError(
            f"connecting to {endpoint} beyond loopback needs CURVE keys: --client-key NAME.key_secret and "
            "--server-key server.key (made by `rtdecode keys add NAME` on the daemon's host)"
        )
    return CurveClient(client_key, server_key)
