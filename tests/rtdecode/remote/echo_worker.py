"""A decode worker for the tests, run as a subprocess: ``python -m tests.rtdecode.remote.echo_worker ENDPOINT``.

It echoes each job back as one part. For the job named by ``--block-job`` it writes the ``--marker`` file and then
blocks until the ``--gate`` file exists (without ``--gate``: until the process is killed, e.g. with SIGKILL).
"""

import argparse
import logging
import signal
import threading
import time
from pathlib import Path

from rtdecode.remote.worker import run_worker


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("endpoint")
    parser.add_argument("--name", default="echo")
    parser.add_argument("--block-job")
    parser.add_argument("--marker", type=Path)
    parser.add_argument("--gate", type=Path)
    parser.add_argument("--heartbeat-s", type=float, default=0.1)
    parser.add_argument("--dispatcher-timeout-s", type=float, default=0.6)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format=f"[{args.name}] %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def handler(job):
        if job.job_id == args.block_job:
            args.marker.write_text(job.job_id)
            while args.gate is None or not args.gate.exists():
                time.sleep(0.01)
        yield {"echo": job.header, "worker": args.name}, job.payload

    run_worker(
        args.endpoint,
        handler,
        stop=stop,
        heartbeat_s=args.heartbeat_s,
        dispatcher_timeout_s=args.dispatcher_timeout_s,
        name=args.name,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
