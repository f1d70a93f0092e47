"""Several workers on one node: ``evomerge search CONFIG --devices cuda:0,cuda:1`` creates the run,
then starts one ``evomerge worker`` process per device on the run's database (its SQLite file, or
``--storage``), shows their joint progress and waits for them.

The workers run in their own sessions, so a Ctrl-C reaches this process only; it passes each
signal on once (the first: finish the candidate in flight and stop; the second: abandon it).
CPU workers share the machine's cores: each gets an equal share of threads.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from evomerge.errors import EvomergeError
from evomerge.machine import usable_cores
from evomerge.run.rundir import Run, run_budget

log = logging.getLogger(__name__)


def parse_devices(text: str) -> list[str]:
    from evomerge.config import check_device

    devices = [d.strip() for d in text.split(",") if d.strip()]
    if not devices:
        raise EvomergeError("--devices: give one device per worker, e.g. cuda:0,cuda:1 (or cpu,cpu)")
    for d in devices:
        try:
            check_device(d)
        except ValueError as e:
            raise EvomergeError(f"--devices: {e}") from None
    return devices


def run_workers(run: Run, devices: list[str], storage: Optional[str] = None, poll_s: float = 2.0) -> dict:
    """Start a worker per device, wait for all; returns the run-wide summary."""
    if not run.db.shareable:
        raise EvomergeError("--devices: the workers need a SQLite file or PostgreSQL as the run's storage")
    n_cpu = sum(d == "cpu" for d in devices)
    threads = max(1, usable_cores() // n_cpu) if n_cpu else None
    env = os.environ.copy()
    if storage:
        env["EVOMERGE_STORAGE"] = storage  # not on the command line, where a password would show
    procs: list[tuple[subprocess.Popen, Path]] = []
    for i, device in enumerate(devices):
        cmd = [sys.executable, "-m", "evomerge.cli", "worker", str(run.run_dir), "--device", device]
        if device == "cpu" and threads:
            cmd += ["--threads", str(threads)]
        logfile = run.run_dir / f"worker-{i}.log"
        with open(logfile, "ab") as out:
            procs.append((subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                           start_new_session=True), logfile))
    log.info("started %d workers (%s); their logs: %s", len(procs), ", ".join(devices),
             ", ".join(str(p) for _, p in procs))
    signals = {"count": 0}

    def forward(signum, frame) -> None:
        signals["count"] += 1
        for p, _ in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    budget = run_budget(run).get("max_candidates")
    last = -1
    try:
        while any(p.poll() is None for p, _ in procs):
            done, running = run.db.leases.counts()
            if done != last:
                log.info("%d%s candidates, %d running, %d/%d workers alive", done, f"/{budget}" if budget else "",
                         running, sum(p.poll() is None for p, _ in procs), len(procs))
                last = done
            time.sleep(poll_s)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    codes = [p.returncode for p, _ in procs]
    failed = [(i, c, f) for i, (c, (_, f)) in enumerate(zip(codes, procs)) if c not in (0, 130)]
    for i, c, f in failed:
        log.error("worker %d (%s) exited with %d; see %s", i, devices[i], c, f)
    done = run.db.leases.counts()[0]
    stopped_by = "signal" if signals["count"] else ("budget" if not failed else "worker failure")
    return {"evaluated": done, "stopped_by": stopped_by, "worker_exit_codes": codes,
            "elapsed_s": run.db.metadata.elapsed()}
