"""The real-time daemon: the only place that knows the order of the stages.

::

    ingest (watcher threads) ──queue──► volume loop: motion, mask, GLM, z-score ──► publish volume, motion, beta
                                              │ trial betas (Backlog: keep_all / drop_oldest / latest_only)
                                              ▼
                                        Dispatcher ──ZeroMQ──► decode workers (a thread here, or GPU hosts)
                                              │ parts: retrieval, preview, caption, image
                                              ▼
                                           publish (PUB + late-joiner snapshot)

The volume loop never waits for decoding: a trial's beta goes into the backlog and the loop returns to the next
volume; decoders take trials from the backlog as they free up. Every record carries per-stage monotonic
timestamps (``seen``, ``read``, ``available``, ``preprocessed``, ``estimated``, ``normalised``, then
``queued``, ``result_received``, and the publisher's ``published_s``), and every message carries them.

Stopping: :meth:`Daemon.request_stop` (SIGTERM) stops ingest, ends the open run (its final betas are published,
and trials whose response was still coming are decoded from them), lets the decoders finish the trials queued (up
to ``[serve] shutdown_timeout_s``; any left are reported skipped, and a restart decodes them) and flushes the
journal. :meth:`Daemon.abort` (a second SIGTERM) stops at once.

Crash safety: see :mod:`rtdecode.serve_journal`. After a restart the volumes are read again and nothing that was
published is published again.
"""

import dataclasses
import logging
import queue
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from rtdecode.backlog import Backlog
from rtdecode.betas import SessionBetas
from rtdecode.config import ServeConfig
from rtdecode.decoding import trial_seed
from rtdecode.glm.events import EventReceiver, EventsFolder
from rtdecode.ingest.pipeline import END, Ingestor
from rtdecode.records import IngestEvent, IngestEventKind, TrialBeta, Volume
from rtdecode.remote.dispatcher import Dispatcher
from rtdecode.remote.wire import Job, JobPart
from rtdecode.serve_journal import RunState, ServeJournal

log = logging.getLogger(__name__)

_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[/\\][^/\\\s:;,'\"()\[\]]+)+")


def without_folders(text: str) -> str:
    """``text`` with every file path cut to its last part: scanner folders can be named after the patient."""
    return _PATH.sub(lambda match: re.split(r"[/\\]", match.group(0))[-1], text)


RUN_SCOPED_TOPICS = ("motion", "beta", "retrieval", "preview", "caption", "image")
LOOP_WAIT_S = 0.05
DECODED = "decoded"  # the journal key of a trial whose decoding finished


@dataclasses.dataclass
class ServeCounts:
    """What a serve session did, for the heartbeat and the summary."""

    n_volumes: int = 0
    n_betas: int = 0
    n_decoded: int = 0
    n_skipped: int = 0
    n_failed: int = 0


@dataclasses.dataclass(frozen=True)
class TrialRef:
    """The ids of a trial sent for decoding, and the stamps of its beta."""

    run: int
    trial_id: str
    stimulus_id: str | None
    timestamps: dict[str, float]


class Daemon:
    """Wires one session's stages together. Build it with :func:`rtdecode.serve.open_daemon`.

    Parameters
    ----------
    subject, session
        Who is scanned (ids in every message).
    betas : SessionBetas
        The preprocess -> GLM -> z-score chain (mask, references and statistics from the subject bundle).
    ingestor : Ingestor
        Not started yet.
    publisher
        A :class:`rtdecode.publish.publisher.Publisher`.
    dispatcher : Dispatcher
        Not started yet; its backlog is ``backlog``.
    backlog : Backlog
    journal : ServeJournal
    settings : ServeConfig
    events_folder, event_receiver
        Where stimulus events come from (either may be None).
    """

    def __init__(
        self,
        *,
        subject: str,
        session: int,
        betas: SessionBetas,
        ingestor: Ingestor,
        publisher: Any,
        dispatcher: Dispatcher,
        backlog: Backlog,
        journal: ServeJournal,
        settings: ServeConfig,
        events_folder: EventsFolder | None = None,
        event_receiver: EventReceiver | None = None,
    ) -> None:
        self.subject = subject
        self.session = session
        self.betas = betas
        self.ingestor = ingestor
        self.publisher = publisher
        self.dispatcher = dispatcher
        self.backlog = backlog
        self.journal = journal
        self.settings = settings
        self.events_folder = events_folder
        self.event_receiver = event_receiver
        self.counts = ServeCounts()
        self.failure: str | None = None  # why the daemon could not go on, if it could not
        self._lock = threading.RLock()  # journal and trial table: the volume loop and the dispatcher thread
        self._stop = threading.Event()
        self._abort = threading.Event()
        self._journaled: dict[int, RunState] = {}  # per run: what was processed and published (journal + live)
        self._trials: dict[str, TrialRef] = {}
        self._current_run: int | None = None
        self._run_open = False
        self._last_volume_s: float | None = None
        self._next_heartbeat_s = 0.0
        self._state = "starting"

    # -- control ----------------------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Finish the current trials and stop (the first SIGTERM)."""
        self._stop.set()

    def abort(self) -> None:
        """Stop at once: nothing more is decoded or published (flags only: safe from a signal handler)."""
        self._abort.set()
        self._stop.set()

    def run(self) -> ServeCounts:
        """Serve until stopped and ingest has drained; return the counts."""
        self._restore()
        self.dispatcher.start()
        self.ingestor.start()
        self._state = "waiting"
        self._status("started", message=f"serving subject {self.subject} session {self.session}")
        try:
            self._loop()
            self._finish()
        finally:
            self.dispatcher.stop()  # no result may arrive once the journal is closed
            self.journal.close()
        return self.counts

    def _loop(self) -> None:
        stopping = False
        while not self._abort.is_set():
            try:
                item = self.ingestor.output.get(timeout=LOOP_WAIT_S)
            except queue.Empty:
                item = None
            if item is END:
                return
            if item is not None:
                self._safely(self._handle, item)
            self._safely(self._poll_events)
            self._safely(self._heartbeat_if_due)
            if self._stop.is_set() and not stopping:
                stopping = True
                self._state = "stopping"
                self._status("stopping", message="stop requested: ingest flushes, then running trials finish")
                self.ingestor.stop()

    def _finish(self) -> None:
        """After ingest ended: end open runs, let running trials finish, say goodbye."""
        if self._abort.is_set():
            self._status("stopped", message="stopped at once (second stop request)")
            self.dispatcher.stop()
            return
        for run in sorted(self.betas.runs):
            if not self._ended(run):
                self._end_run(run)
        if not self._stop.is_set():  # ingest ended by itself (e.g. it failed): nothing more will come
            self._stop.set()
        finished = self._wait_for_decoders()
        for dropped in self._drain_backlog():
            self._skipped(dropped, "not decoded within [serve] shutdown_timeout_s of the stop (a restart decodes it)")
        self.dispatcher.stop()
        message = "stopped" if finished else f"stopped; trials left after {self.settings.shutdown_timeout_s} s"
        self._state = "stopped"
        self._status("stopped", message=message)

    def _wait_for_decoders(self) -> bool:
        """Until the trials queued are decoded, ``shutdown_timeout_s`` passes or :meth:`abort`; heartbeats go on."""
        deadline_s = time.monotonic() + self.settings.shutdown_timeout_s
        while not self._abort.is_set() and time.monotonic() < deadline_s:
            if self.dispatcher.wait_idle(min(self.settings.heartbeat_s, max(0.0, deadline_s - time.monotonic()))):
                return True
            self._safely(self._heartbeat_if_due)
        return False

    def _safely(self, step: Callable[..., None], *args: Any) -> None:
        """One step of the loop; a bug or an unreadable input met there is logged and reported, and the daemon
        goes on (the scan does not stop for it)."""
        try:
            step(*args)
        except Exception as error:
            where = _describe(args[0]) if args else step.__name__.strip("_").replace("_", " ")
            log.exception("internal error on %s", where)
            self.betas.report(f"internal error on {where}: {error!r}")
            try:
                self._status("error", message=f"internal error on {where}: {error!r} (see the log)")
            except Exception:  # the publisher itself failed: the log has it
                log.exception("cannot publish the error status")

    # -- volumes and ingest reports ---------------------------------------------------------------------------

    def _handle(self, item: Volume | IngestEvent) -> None:
        if isinstance(item, Volume):
            self._volume(item)
            return
        kind = item.kind.value
        if item.kind == IngestEventKind.RUN_ENDED and item.run_index is not None:
            self._end_run(item.run_index)
        elif item.kind in (IngestEventKind.MISSING, IngestEventKind.QUARANTINED, IngestEventKind.FAILED):
            self.betas.report(without_folders(item.describe()))
        if item.kind == IngestEventKind.FAILED:  # nothing more will come: finish, then exit non-zero
            self.failure = f"ingest stopped: {without_folders(item.reason)}"
        fields = {"event": kind, "run": item.run_index, "series": item.series_number}
        fields |= {"volumes": list(item.volume_indices), "reason": without_folders(item.reason)}
        if item.path is not None:
            fields["file"] = item.path.name
        self._status("ingest", **fields)

    def _volume(self, volume: Volume) -> None:
        run = volume.run_index
        if self._current_run is None or run > self._current_run:
            self._start_run(volume)
        self._last_volume_s = time.monotonic()
        motion_before = len(self.betas.runs[run].motion) if run in self.betas.runs else 0
        due = self.betas.add_volume(volume)
        self.counts.n_volumes += 1
        journaled = self._journaled_run(run)
        if volume.volume_index not in journaled.volumes:
            self._publish_volume(volume, motion_before)
            with self._lock:
                self.journal.volume(run, volume.volume_index)
                journaled.volumes.add(volume.volume_index)
        for beta in due:
            self._beta(beta)

    def _start_run(self, volume: Volume) -> None:
        run = volume.run_index
        self._current_run, self._run_open, self._state = run, True, "running"
        restored = self._journaled_run(run)
        if restored.series is not None and restored.series != volume.series_number:
            aside = self.journal.set_aside(run)
            log.warning(
                "run %d: the journal says series %s, the files say series %d; journal moved to %s, run served afresh",
                run,
                restored.series,
                volume.series_number,
                aside.name,
            )
            with self._lock:
                restored = self._journaled[run] = RunState()
        elif restored.events:
            for beta in self.betas.add_events(run, restored.events):
                self._beta(beta)
        if restored.series is None:
            restored.series = volume.series_number
            with self._lock:
                self.journal.run_started(run, volume.series_number)
        self.publisher.clear_history(RUN_SCOPED_TOPICS)
        self._status("run_started", run=run, series=volume.series_number)

    def _end_run(self, run: int) -> None:
        if self._current_run == run:
            self._run_open = False
            self._state = "waiting"
        if self.events_folder is not None:
            events, errors = self.events_folder.flush(run)
            self._add_events(run, events, errors)
        for beta in self.betas.end_run(run):
            self._beta(beta)
        with self._lock:
            self.journal.run_ended(run)
        self._status("run_ended", run=run)

    def _ended(self, run: int) -> bool:
        record = self.betas.runs.get(run)
        return record is None or bool(record.final) or (self._current_run == run and not self._run_open)

    def _publish_volume(self, volume: Volume, motion_before: int) -> None:
        ids = {"subject": self.subject, "session": self.session, "run": volume.run_index, "volume": volume.volume_index}
        record = self.betas.runs.get(volume.run_index)
        prepared = record.motion[-1] if record is not None and len(record.motion) > motion_before else None
        stamps = dict(prepared.timestamps if prepared is not None else volume.timestamps)
        header = {**ids, "series": volume.series_number, "late": volume.late, "shape": list(volume.shape)}
        self.publisher.publish("volume", {**header, "preprocessed": prepared is not None, "timestamps": stamps})
        if prepared is not None:
            motion = {"params": [round(float(p), 6) for p in prepared.motion_params], "fd_mm": round(prepared.fd_mm, 4)}
            self.publisher.publish("motion", {**ids, **motion, "flagged": prepared.flagged, "timestamps": stamps})

    # -- events -----------------------------------------------------------------------------------------------

    def _poll_events(self) -> None:
        if self.events_folder is not None:
            found, errors = self.events_folder.poll()
            by_run: dict[int, list] = {}
            for run, event in found:
                by_run.setdefault(run, []).append(event)
            for run, events in by_run.items():
                self._add_events(run, events, [])
            self._report_event_errors(errors)
        if self.event_receiver is not None:
            found, errors = self.event_receiver.poll_runs(0)
            for named_run, event in found:
                run = named_run or self._live_event_run()
                with self._lock:
                    self.journal.event(run, event)
                self._add_events(run, [event], [])
            self._report_event_errors(errors)

    def _live_event_run(self) -> int:
        """For an event that names no run: the open run; between runs, the next one."""
        if self._current_run is None:
            return 1
        return self._current_run if self._run_open else self._current_run + 1

    def _add_events(self, run: int, events: list, errors: list) -> None:
        self._report_event_errors(errors)
        if events:
            for beta in self.betas.add_events(run, events):
                self._beta(beta)

    def _report_event_errors(self, errors: list) -> None:
        for error in errors:
            self.betas.report(str(error))
            self._status("error", message=f"event ignored: {error}")

    # -- trials -----------------------------------------------------------------------------------------------

    def _beta(self, beta: TrialBeta) -> None:
        self.counts.n_betas += 1
        vector = beta.zscored if beta.zscored is not None else beta.beta
        vector = np.ascontiguousarray(vector, dtype=np.float32)
        header = {
            **self._trial_ids(beta.run_index, beta.event.trial_id),
            "stimulus_id": beta.event.stimulus_id,
            "onset_s": beta.event.onset_s,
            "version": beta.version,
            "n_voxels": int(vector.size),
            "n_frames": beta.n_frames,
            "zscored": beta.zscored is not None,
            "decodable": beta.decodable,
            "payload": {"encoding": "float32", "shape": [int(vector.size)]},
            "timestamps": dict(beta.timestamps),
        }
        if beta.version == "final" and self._stop.is_set():
            # the run may go on after a restart: these finals are provisional, published but not journaled
            self.publisher.publish("beta", {**header, "provisional": True, "repeat": False}, vector.tobytes())
        else:
            key = f"beta:{beta.version}"
            self._publish_trial(beta.run_index, beta.event.trial_id, key, "beta", header, vector.tobytes())
        if not (beta.decodable and self._decodes(beta)):
            return
        if not np.all(np.isfinite(vector)):
            self.counts.n_skipped += 1
            message = "its beta holds NaN or infinite values (too few volumes after its onset?)"
            self._status("trial_skipped", run=beta.run_index, trial_id=beta.event.trial_id, message=message)
            return
        self._queue(beta, vector, header["timestamps"])

    def _decodes(self, beta: TrialBeta) -> bool:
        """Online betas are decoded; a final beta only when its trial had none (its response was still coming
        when the run ended), so every trial is decoded once."""
        if beta.version == "online":
            return True
        run = self.betas.runs.get(beta.run_index)
        return run is None or beta.event.trial_id not in run.online

    def _queue(self, beta: TrialBeta, vector: np.ndarray, stamps: dict[str, float]) -> None:
        run, trial_id = beta.run_index, beta.event.trial_id
        if (trial_id, DECODED) in self._journaled_run(run).sent:
            return
        job_id = f"{run}/{trial_id}"
        stamps = {**stamps, "queued": time.monotonic()}
        seed = trial_seed(self.subject, self.session, run, trial_id)
        job_header = {**self._trial_ids(run, trial_id), "n_voxels": int(vector.size), "seed": seed}
        with self._lock:
            self._trials[job_id] = TrialRef(run, trial_id, beta.event.stimulus_id, stamps)
        for dropped in self.backlog.put(Job(job_id, job_header, vector.tobytes())):
            self._skipped(dropped, f"backlog policy {self.settings.backlog} (more than {self.settings.max_backlog})")

    def _skipped(self, job: Job, reason: str) -> None:
        with self._lock:
            trial = self._trials.pop(job.job_id, None)
        self.counts.n_skipped += 1
        if trial is not None:
            self._status("trial_skipped", run=trial.run, trial_id=trial.trial_id, message=reason)

    def _drain_backlog(self) -> list[Job]:
        dropped = []
        while (job := self.backlog.get(0)) is not None:
            dropped.append(job)
        return dropped

    def on_part(self, part: JobPart) -> None:
        """A decoder's result (called on the dispatcher's thread): publish it, journal it."""
        try:
            self._on_part(part)
        except Exception as error:  # the dispatcher thread must live on
            log.exception("internal error on a result of %s", part.job_id)
            self._status("error", message=f"internal error on a result of {part.job_id}: {error!r} (see the log)")

    def _on_part(self, part: JobPart) -> None:
        with self._lock:
            trial = self._trials.get(part.job_id)
        if trial is None:
            log.warning("result for unknown trial %s ignored", part.job_id)
            return
        received_s = time.monotonic()
        if "error" in part.header:
            self.counts.n_failed += 1
            self._status(
                "error", run=trial.run, trial_id=trial.trial_id, message=f"decoding failed: {part.header['error']}"
            )
        elif "topic" in part.header:
            header = {key: value for key, value in part.header.items() if key != "topic"}
            header |= self._trial_ids(trial.run, trial.trial_id) | {"stimulus_id": trial.stimulus_id}
            header |= {"worker": part.worker, "attempt": part.attempt}
            header["timestamps"] = {**trial.timestamps, "result_received": received_s}
            topic = part.header["topic"]
            self._publish_trial(trial.run, trial.trial_id, topic, topic, header, part.payload)
        if part.final:
            journaled = self._journaled_run(trial.run)
            with self._lock:
                self._trials.pop(part.job_id, None)
                if "error" not in part.header:
                    self.journal.sent(trial.run, trial.trial_id, DECODED)
                    journaled.sent.add((trial.trial_id, DECODED))
            if "error" not in part.header:
                self.counts.n_decoded += 1

    def _publish_trial(self, run: int, trial_id: str, key: str, topic: str, header: dict, payload: bytes) -> None:
        """Publish one message of a trial unless it was published before a restart (then count it)."""
        journaled = self._journaled_run(run)
        with self._lock:
            if (trial_id, key) in journaled.sent or (trial_id, key) in journaled.publishing:
                return  # a repeat: after a restart, or from a worker given the trial again
            header["repeat"] = (trial_id, key) in journaled.sending  # the daemon died about when it was published
            journaled.publishing.add((trial_id, key))
            self.journal.sending(run, trial_id, key)
        self.publisher.publish(topic, header, payload)
        with self._lock:
            self.journal.sent(run, trial_id, key)
            journaled.sent.add((trial_id, key))
            journaled.publishing.discard((trial_id, key))

    def _trial_ids(self, run: int, trial_id: str) -> dict[str, Any]:
        return {"subject": self.subject, "session": self.session, "run": run, "trial_id": trial_id}

    # -- status -----------------------------------------------------------------------------------------------

    def _heartbeat_if_due(self) -> None:
        now = time.monotonic()
        if now < self._next_heartbeat_s:
            return
        self._next_heartbeat_s = now + self.settings.heartbeat_s
        if self._state == "running" and self._last_volume_s is not None:
            if now - self._last_volume_s > self.settings.stall_after_s:
                self._state = "stalled"
                log.warning("run %s: no volume for %.1f s", self._current_run, now - self._last_volume_s)
        elif self._state == "stalled" and self._last_volume_s is not None:
            if now - self._last_volume_s <= self.settings.stall_after_s:
                self._state = "running"
        self._status("heartbeat")
        if not self.dispatcher.status().get("running", True) and not self._stop.is_set():
            self._status("error", message="the decoder link stopped (see the log): trials wait; restart serve")

    def _status(self, kind: str, **fields: Any) -> None:
        workers = self.dispatcher.status()
        age_s = None if self._last_volume_s is None else round(time.monotonic() - self._last_volume_s, 3)
        header = {
            "kind": kind,
            "state": self._state,
            "subject": self.subject,
            "session": self.session,
            "current_run": self._current_run,
            "n_volumes": self.counts.n_volumes,
            "n_betas": self.counts.n_betas,
            "n_trials_decoded": self.counts.n_decoded,
            "n_trials_skipped": self.counts.n_skipped,
            "n_trials_failed": self.counts.n_failed,
            "n_problems": len(self.betas.problems),
            "backlog": len(self.backlog),
            "backlog_peak": self.backlog.peak,
            "workers": workers.get("n_workers", 0),
            "in_flight": workers.get("in_flight", 0),
            "last_volume_age_s": age_s,
            **fields,
        }
        if kind != "heartbeat":
            log.info("%s %s", kind, " ".join(f"{k}={v}" for k, v in fields.items()))
        self.publisher.publish("status", header)

    # -- restart ----------------------------------------------------------------------------------------------

    def _restore(self) -> None:
        """The journal of earlier lifetimes (its ZeroMQ events are applied when their run's series is confirmed)."""
        self._journaled = self.journal.restore()
        if self._journaled:
            n_sent = sum(len(state.sent) for state in self._journaled.values())
            log.info("resuming: journal of %d run(s), %d messages already published", len(self._journaled), n_sent)

    def _journaled_run(self, run: int) -> RunState:
        """What the journal holds for ``run``: restored at start, kept up to date as the daemon goes."""
        with self._lock:
            return self._journaled.setdefault(run, RunState())


def _describe(item: Volume | IngestEvent) -> str:
    if isinstance(item, Volume):
        return f"run {item.run_index} volume {item.volume_index}"
    return f"ingest event {item.kind.value}"
