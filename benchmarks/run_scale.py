"""What a run costs as it grows: status, a resume's start, export's choice of the winner, one
claim and finish, the database's size and the process's memory, at 1,000 to 20,000 candidates.

A real run is started on a tiny model family (a 1-item suite, two candidates), then grown through
the run database's own write path (``Leases.claim`` and ``Leases.finish``, the record of a real
candidate with a varied fitness and per-item results of a 40-item suite). At each size it times,
in this process (the imports, paid once, left out):

- ``status``: ``status_text``, as ``evomerge status`` prints it, and apart its plots (matplotlib
  drawing every candidate);
- ``resume``: ``open_run`` and ``run_search(resume=True)`` until it claims its first candidate;
- ``export pick``: the choice of the winner, without the model write;
- ``claim+finish``: the mean of 50 claims and finishes;
- the database's size, and this process's peak RSS;

then a fresh search of ``--memory`` candidates (3,000) in this process, its RSS after every 100th.

Goals at 20,000: status <= 1 s, resume start <= 3 s, claim + finish within 1.5x of its cost at
1,000; the search's RSS grows at most 5% after its first 200 candidates. The exit status is 1
when one is missed.

    python benchmarks/run_scale.py [--sizes 1000 5000 20000] [--memory 3000] [--postgres]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from workers import _database, _start_postgres  # noqa: E402  (a throwaway server, as bench-workers starts)


def make_run(work: Path, storage: str | None) -> Path:
    """A run directory holding a real two-candidate search on a tiny family."""
    from evomerge.run.loop import run_search
    from evomerge.run.rundir import create_run
    from evomerge.tiny import build_family

    family = build_family(work / "family", n_experts=2)
    rows = [{"id": "a", "split": "search", "prompt": "w5 w6", "choices": ["w7", "w8"], "answer": 0},
            {"id": "b", "split": "heldout", "prompt": "w6 w5", "choices": ["w8", "w7"], "answer": 1}]
    (work / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    suite = {"name": "one", "tasks": [{"name": "one", "data": str(work / "items.jsonl"), "kind": "multiple_choice"}]}
    cfg = {"name": "scale", "models": {"base": family["base"], "experts": family["experts"]},
           "merge_method": "ties", "space": "global", "fitness": {"suite": suite}, "references": False,
           "driver": {"name": "cma", "popsize": 8}, "budget": {"max_candidates": 2}, "seed": 0}
    (work / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    run_dir = work / "run"
    run = create_run(work / "cfg.yaml", run_dir, storage)
    run_search(run)
    run.db.close()
    return run_dir


def grow(run_dir: Path, storage: str | None, target: int, rng: random.Random) -> None:
    """Add candidates through the run database's write path until it holds ``target``."""
    from evomerge.fitness.record import TaskRecord
    from evomerge.rundb.leases import Owner
    from evomerge.run.rundir import open_run

    run = open_run(run_dir, storage)
    owner = Owner.this_process()
    template = run.db.row(run.db.scores()[0].trial_id)
    done, _ = run.db.leases.counts()
    for _ in range(target - done):
        fitness = rng.random()
        lease = run.db.leases.claim(template.params, owner)
        marks = "".join("1" if rng.random() < fitness else "0" for _ in range(40))
        record = replace(template.record, fitness=fitness, items={"one": marks},
                         tasks={"one": TaskRecord("acc", fitness, {"acc": fitness})})
        run.db.leases.finish(lease.trial_id, [fitness], record)
    run.db.close()


def claim_finish(run_dir: Path, storage: str | None, n: int = 50) -> float:
    """Mean seconds of one claim and one finish, as the loop does them (under the run lock)."""
    from evomerge.rundb.leases import Owner
    from evomerge.run.rundir import open_run

    run = open_run(run_dir, storage)
    owner = Owner.this_process()
    template = run.db.row(run.db.scores()[0].trial_id)
    t0 = time.perf_counter()
    for _ in range(n):
        with run.db.lock():
            lease = run.db.leases.claim(template.params, owner)
        with run.db.lock():
            run.db.leases.finish(lease.trial_id, [0.0], replace(template.record, fitness=0.0))
    seconds = (time.perf_counter() - t0) / n
    run.db.close()
    return seconds


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def status(run_dir: Path, storage: str | None) -> tuple[float, float]:
    """Seconds of ``evomerge status``'s text, and of its plots."""
    from evomerge.run.report import status_text, write_plots
    from evomerge.run.rundir import open_run

    run = open_run(run_dir, storage)
    t = timed(lambda: status_text(run)), timed(lambda: write_plots(run))
    run.db.close()
    return t


def export_pick(run_dir: Path, storage: str | None) -> float:
    from evomerge.run.report import pick
    from evomerge.run.rundir import open_run

    run = open_run(run_dir, storage)
    t = timed(lambda: pick(run, None))
    run.db.close()
    return t


def resume_start(run_dir: Path, storage: str | None) -> float:
    """Seconds from opening the run to its first new candidate's claim, in ``run_search(resume=True)``."""
    from evomerge.run.loop import run_search
    from evomerge.run.rundir import open_run
    from evomerge.rundb import leases

    first: list[float] = []
    claim = leases.Leases.claim

    def claim_once(self, *a, **kw):
        first.append(time.perf_counter())
        raise KeyboardInterrupt  # the session stops at its first claim, as Ctrl-C would

    leases.Leases.claim = claim_once
    t0 = time.perf_counter()
    try:
        run = open_run(run_dir, storage)
        try:
            run_search(run, resume=True, max_candidates=10 ** 7)
        except KeyboardInterrupt:
            pass
        run.db.close()
    finally:
        leases.Leases.claim = claim
    return first[0] - t0


def db_megabytes(run_dir: Path, storage: str | None) -> float:
    """The run database's size: its SQLite files, or the PostgreSQL database's."""
    if storage is None:
        return sum(f.stat().st_size for f in run_dir.glob("*.db*")) / 2 ** 20
    import sqlalchemy as sa

    engine = sa.create_engine(storage)
    with engine.connect() as conn:
        size = conn.execute(sa.text("SELECT pg_database_size(current_database())")).scalar_one()
    engine.dispose()
    return size / 2 ** 20


def rss_mb() -> float:
    """This process's resident memory now (not its peak), in MB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def memory(work: Path, candidates: int) -> list[tuple[int, float]]:
    """A fresh search of ``candidates`` on the tiny family, in this process (SQLite in its run
    directory): (candidates done, RSS in MB) after every 100th."""
    from evomerge.search import claims
    from evomerge.run.loop import run_search
    from evomerge.run.rundir import create_run

    cfg = yaml.safe_load((work / "cfg.yaml").read_text()) | {"name": "memory",
                                                              "budget": {"max_candidates": candidates}}
    (work / "memory.yaml").write_text(yaml.safe_dump(cfg))
    trace: list[tuple[int, float]] = []
    tell = claims.DriverClaims.tell

    def traced(self, *a, **kw):
        ok = tell(self, *a, **kw)
        done = len(trace) and trace[-1][0]
        if self.db.leases.counts()[0] >= done + 100:
            trace.append((done + 100, rss_mb()))
        return ok

    claims.DriverClaims.tell = traced
    try:
        run = create_run(work / "memory.yaml", work / "memory")
        run_search(run, live=False)
        run.db.close()
    finally:
        claims.DriverClaims.tell = tell
    return trace


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000])
    ap.add_argument("--postgres", action="store_true",
                    help="the run database on a PostgreSQL server started here (scripts/pg_cluster.sh), not SQLite")
    ap.add_argument("--memory", type=int, default=3000, help="candidates of the search whose memory is traced (0: none)")
    args = ap.parse_args()
    import logging

    logging.disable(logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="evomerge-scale-"))
    server, pg_dir = _start_postgres() if args.postgres else (None, None)
    try:
        return measure(args, work, server and _database(server, "scale"))
    finally:
        if pg_dir is not None:
            subprocess.run(["bash", str(ROOT / "scripts" / "pg_cluster.sh"), "stop", str(pg_dir / "cluster")],
                           capture_output=True)
            shutil.rmtree(pg_dir, ignore_errors=True)


def measure(args: argparse.Namespace, work: Path, storage: str | None) -> int:
    """Grow the run through ``args.sizes``, time it at each, trace a search's memory; print and
    write the figures; 0 when every goal is met."""
    run_dir = make_run(work, storage)
    rng = random.Random(0)
    from evomerge import machine

    print(f"run {run_dir} ({'PostgreSQL' if storage else 'SQLite'}); {machine.describe()}")
    print(f"{'candidates':>10s}{'status s':>10s}{'plots s':>9s}{'resume s':>10s}{'pick s':>9s}"
          f"{'claim+fin ms':>14s}{'db MB':>8s}{'RSS MB':>8s}")
    base_cf = None
    out = []
    for size in args.sizes:
        t = time.perf_counter()
        grow(run_dir, storage, size, rng)
        grown = time.perf_counter() - t
        st, plots = status(run_dir, storage)
        rs = resume_start(run_dir, storage)
        pk = export_pick(run_dir, storage)
        cf = claim_finish(run_dir, storage)
        base_cf = base_cf or cf
        db = db_megabytes(run_dir, storage)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out.append({"candidates": size, "status_s": st, "plots_s": plots, "resume_s": rs, "pick_s": pk,
                    "claim_finish_s": cf, "db_mb": db, "max_rss_mb": rss, "grow_s": grown})
        print(f"{size:10d}{st:10.3f}{plots:9.3f}{rs:10.3f}{pk:9.3f}{cf * 1e3:14.1f}{db:8.1f}{rss:8.0f}", flush=True)
    last = out[-1]
    verdict = {"status <= 1 s": last["status_s"] <= 1.0,
               "resume start <= 3 s": last["resume_s"] <= 3.0,
               "claim+finish within 1.5x of the first size": last["claim_finish_s"] <= 1.5 * base_cf}
    if args.memory:
        trace = memory(work, args.memory)
        at200 = next(mb for n, mb in trace if n >= 200)
        growth = trace[-1][1] / at200 - 1
        print("search RSS MB every 100 candidates: " + " ".join(f"{mb:.0f}" for _, mb in trace))
        print(f"RSS growth after the first 200 candidates: {growth:+.1%} ({at200:.0f} -> {trace[-1][1]:.0f} MB "
              f"at {trace[-1][0]})")
        verdict["search RSS grows <= 5% after the first 200 candidates"] = growth <= 0.05
        out.append({"memory_trace": trace, "growth": growth})
    for goal, ok in verdict.items():
        print(f"{'met' if ok else 'MISSED'}: {goal}")
    (work / "run_scale.json").write_text(json.dumps({"sizes": out, "goals": verdict}, indent=2))
    print(f"figures: {work / 'run_scale.json'}")
    return 0 if all(verdict.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
