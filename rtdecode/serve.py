"""Open everything ``rtdecode serve`` and ``rtdecode decode-worker`` need from the config, checked before the first
volume: the subject bundle, the GLM settings it was calibrated with, the sockets and their keys, the decoder.

Security rule: a socket bound to an interface other than loopback needs CURVE keys (``rtdecode keys``) unless
``[serve] insecure = true``; with keys, only clients whose public key is in the authorised folder get anything.
Keys folder (``[serve] keys_dir``, default ``$RTDECODE_HOME/keys``)::

    server.key, server.key_secret      the daemon's key pair (clients need server.key)
    authorised/NAME.key                public keys of the displays and decode workers allowed in
    clients/NAME.key, NAME.key_secret  client pairs made by ``rtdecode keys add NAME``, to copy to the client
"""

import dataclasses
import logging
import threading
from collections.abc import Callable
from pathlib import Path

import zmq

from rtdecode.backlog import Backlog
from rtdecode.betas import SessionBetas, normaliser
from rtdecode.config import Config
from rtdecode.daemon import Daemon
from rtdecode.errors import ServeError
from rtdecode.glm.events import EventReceiver, EventsFolder
from rtdecode.glm.normalise import ZScore
from rtdecode.ingest.pipeline import Ingestor
from rtdecode.publish.keys import CurveServer, check_endpoint_security, endpoint_needs_curve, server_curve
from rtdecode.publish.publisher import Publisher
from rtdecode.remote.dispatcher import Dispatcher
from rtdecode.remote.worker import run_worker
from rtdecode.serve_journal import ServeJournal
from rtdecode.store import Store
from rtdecode.subject_bundle import SubjectBundle, glm_differences, load_subject_bundle

log = logging.getLogger(__name__)

LOCAL_DECODER = "inproc://rtdecode-decoder"


def open_bundle(config: Config, subject: str, load_model: bool = False) -> SubjectBundle:
    """The subject's bundle, checked against the [glm] settings (calibration and serve must agree)."""
    folder = Store(config.home).bundle_dir(subject)
    if not (folder / "bundle.json").is_file():
        raise ServeError(
            f"no subject bundle for {subject!r} at {folder}: calibrate first "
            f"(rtdecode calibrate --subject {subject} --session 1)"
        )
    bundle = load_subject_bundle(folder, load_model=load_model, device=config.generate.device)
    differences = glm_differences(bundle.glm, config.glm.model_dump(mode="json"))
    if differences:
        raise ServeError(
            f"the [glm] settings differ from the ones {subject}'s model was calibrated with, so live betas would not "
            f"mean what it learnt: {'; '.join(differences)}. Set them back (or re-calibrate)."
        )
    return bundle


def session_normaliser(config: Config, bundle: SubjectBundle) -> ZScore:
    """The calibration statistics the model was trained with (``normalise.statistics`` or the bundle's), unless
    ``normalise.method = "running"`` was set explicitly."""
    settings = config.normalise
    if settings.method == "running" and "method" in settings.model_fields_set:
        log.warning("normalise.method = running: betas are z-scored by this session's running statistics")
        return normaliser(settings, bundle.mask.n_voxels)
    statistics = settings.statistics or bundle.path("zscore")
    return normaliser(
        settings.model_copy(update={"method": "calibration", "statistics": statistics}), bundle.mask.n_voxels
    )


@dataclasses.dataclass
class ServeSession:
    """A daemon and what it owns; :meth:`close` releases it all."""

    daemon: Daemon
    context: zmq.Context
    closers: list[Callable[[], None]]

    def close(self) -> None:
        for close in reversed(self.closers):
            try:
                close()
            except Exception:  # closing everything matters more than the first failure
                log.exception("while closing")
        self.context.term()


def open_daemon(config: Config, subject: str, session: int) -> ServeSession:
    """Everything checked and opened (not started): the bundle, the chain, sockets, decoder, journal."""
    if config.paths.watch_dir is None:
        raise ServeError("no scanner folder to watch: give --watch DIR or set paths.watch_dir")
    store = Store(config.home)
    bundle = open_bundle(config, subject)
    session_dir = store.create_session(subject, session)
    context = zmq.Context()
    closers: list[Callable[[], None]] = []
    try:
        daemon = _build(config, subject, session, bundle, session_dir, context, closers)
    except BaseException:
        for close in reversed(closers):
            close()
        context.term()
        raise
    return ServeSession(daemon, context, closers)


@dataclasses.dataclass(frozen=True)
class _Endpoints:
    """Where the daemon's sockets bind, and the one CURVE server they share (None: no socket needs it)."""

    publish: str
    snapshot: str
    events: str
    decoder: str
    curve: CurveServer | None
    insecure: bool

    def curve_for(self, name: str, endpoint: str) -> CurveServer | None:
        """The CURVE server for one socket; SecurityError if it is exposed without keys (and not opted out)."""
        check_endpoint_security(name, endpoint, self.curve is not None, allow_insecure=self.insecure)
        return self.curve if self.curve is not None and endpoint_needs_curve(endpoint) else None


def _endpoints(config: Config) -> _Endpoints:
    host, ports = config.ports.host, config.ports
    publish, snapshot, events = (f"tcp://{host}:{port}" for port in (ports.publish, ports.snapshot, ports.events))
    decoder = config.serve.decoder or LOCAL_DECODER
    curve = server_curve(config, [publish, snapshot, events, decoder])
    return _Endpoints(publish, snapshot, events, decoder, curve, config.serve.insecure)


def _session_betas(config: Config, bundle: SubjectBundle) -> SessionBetas:
    """The live chain with the bundle's mask, reference and statistics."""
    from rtdecode.preprocess.motion import MotionCorrector

    corrector = MotionCorrector(
        bundle.mask,
        bundle.reference,
        fd_threshold_mm=config.preprocess.fd_threshold_mm,
        device=config.preprocess.device,
    )
    return SessionBetas(corrector, config.glm, None, session_normaliser(config, bundle))


def _build(
    config: Config,
    subject: str,
    session: int,
    bundle: SubjectBundle,
    session_dir: Path,
    context: zmq.Context,
    closers: list[Callable[[], None]],
) -> Daemon:
    """Open the sockets (each registered in ``closers`` as it opens) and assemble the daemon."""
    endpoints = _endpoints(config)
    if endpoints.curve is not None:
        closers.append(endpoints.curve.close)  # after every CURVE socket is closed (closers run last to first)
    publisher = Publisher(
        endpoints.publish,
        endpoints.snapshot,
        context=context,
        curve=endpoints.curve_for("[ports] publish", endpoints.publish),
        allow_insecure=config.serve.insecure,
    )
    closers.append(publisher.close)
    receiver = EventReceiver(endpoints.events, context, curve=endpoints.curve_for("[ports] events", endpoints.events))
    closers.append(receiver.close)
    backlog = Backlog(config.serve.backlog, config.serve.max_backlog)
    daemon_ref: list[Daemon] = []
    dispatcher = Dispatcher(
        endpoints.decoder,
        backlog,
        lambda part: daemon_ref[0].on_part(part),
        context=context,
        curve_server=endpoints.curve_for("[serve] decoder", endpoints.decoder),
        worker_timeout_s=config.serve.worker_timeout_s,
    )
    closers.append(dispatcher.stop)
    daemon = Daemon(
        subject=subject,
        session=session,
        betas=_session_betas(config, bundle),
        ingestor=Ingestor(config.paths.watch_dir, config.scanner, session_dir / "quarantine"),
        publisher=publisher,
        dispatcher=dispatcher,
        backlog=backlog,
        journal=ServeJournal(session_dir / "serve"),
        settings=config.serve,
        events_folder=EventsFolder(config.serve.events_dir or session_dir / "events"),
        event_receiver=receiver,
    )
    daemon_ref.append(daemon)
    if config.serve.decoder is None:
        closers.append(_start_local_worker(config, subject, context))
    return daemon


def _start_local_worker(config: Config, subject: str, context: zmq.Context) -> Callable[[], None]:
    """Decode in this process: a worker thread on the in-process endpoint; returns its stop function."""
    from rtdecode.decoding import load_decoder

    decoder = load_decoder(config, Store(config.home).bundle_dir(subject))
    log.info("decoding in this process: %s", decoder.describe())
    decoder.warm_up()
    stop = threading.Event()
    thread = threading.Thread(
        target=run_worker,
        args=(LOCAL_DECODER, decoder),
        kwargs={"stop": stop, "context": context, "name": "local"},
        name="rtdecode-decoder",
        daemon=True,
    )
    thread.start()

    def stop_worker() -> None:
        stop.set()
        thread.join(timeout=10)  # the worker leaves at once; a generation in progress is abandoned

    return stop_worker
