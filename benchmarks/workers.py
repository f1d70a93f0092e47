"""Scaling of one search over several worker processes on this machine: candidates per minute
with 1, 2 and 3 workers on the tiny zoo (CPU), and each worker's idle share.

Every setting runs the same search (tiny zoo, per-layer TIES, CMA-ES popsize 6, suite
zoo-smooth, no references) in a fresh run, with ``evomerge worker`` processes sharing its
database: the run's SQLite file, or with ``--postgres`` a PostgreSQL server started here for the
benchmark (scripts/pg_cluster.sh). Throughput is measured between the first and the last recorded
candidate (process start-up and model loading excluded). A worker's idle share is the part of its
loop's wall time not spent merging or scoring: waiting for the run's lock, database work, and
at the end waiting for the last candidates of the others. The peer is the single worker, which
gets all the machine's cores; N workers share them (threads = cores // N).

    python benchmarks/workers.py [--candidates 90] [--workers 1,2,3] [--postgres] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _start_postgres() -> tuple[str, Path]:
    d = Path(tempfile.mkdtemp(prefix="evomerge-bench-pg-"))
    d.chmod(0o755)
    out = subprocess.run(["bash", str(ROOT / "scripts" / "pg_cluster.sh"), "start", str(d / "cluster")],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip(), d


def _database(server: str, name: str) -> str:
    import sqlalchemy as sa

    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    admin.dispose()
    return server.rsplit("/", 1)[0] + f"/{name}"


def run_setting(n: int, zoo: dict, work: Path, candidates: int, device: str, server: str | None) -> dict:
    from evomerge.run.rundir import create_run
    from evomerge.zoo import family

    name = f"w{n}"
    cfg = {"name": name, "models": family(zoo),
           "merge_method": "ties", "space": "per_layer", "fitness": {"suite": "zoo-smooth"},
           "driver": {"name": "cma", "popsize": 6}, "budget": {"max_candidates": candidates}, "seed": 0,
           "references": False, "device": device}
    (work / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    storage = _database(server, name) if server else None
    run = create_run(work / f"{name}.yaml", work / name, storage)
    threads = max(1, (os.cpu_count() or 1) // n)
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    if storage:
        env["EVOMERGE_STORAGE"] = storage
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "evomerge.cli", "worker", str(work / name),
                               "--threads", str(threads)], env=env, stdout=subprocess.DEVNULL,
                              stderr=open(work / f"{name}-{i}.log", "w")) for i in range(n)]
    codes = [p.wait() for p in procs]
    wall = time.perf_counter() - t0
    if any(codes):
        raise SystemExit(f"{n} workers: exit codes {codes}; logs in {work}")
    done = sorted(t.datetime_complete for t in run.db.trials() if t.datetime_complete and t.state.name == "COMPLETE")
    span = (done[-1] - done[0]).total_seconds()
    workers = run.db.registry.all()
    counted, _ = run.db.leases.counts()
    run.db.close()
    return {"workers": n, "threads": threads, "candidates": counted, "wall_s": wall,
            "rate": (len(done) - 1) / span * 60, "own": [w["own"] for w in workers],
            "idle": [w["idle_share"] for w in workers], "setup": [w["setup_s"] for w in workers]}


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidates", type=int, default=90)
    ap.add_argument("--workers", default="1,2,3")
    ap.add_argument("--zoo", default="runs/zoo-tiny")
    ap.add_argument("--postgres", action="store_true", help="share a PostgreSQL database instead of SQLite")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    from evomerge.zoo import load_or_build_zoo

    zoo, _ = load_or_build_zoo(args.zoo, "tiny", seed=0)
    work = Path(tempfile.mkdtemp(prefix="evomerge-workers-"))
    server, pg_dir = _start_postgres() if args.postgres else (None, None)
    try:
        results = [run_setting(int(n), zoo, work, args.candidates, args.device, server)
                   for n in args.workers.split(",")]
    finally:
        if pg_dir is not None:
            subprocess.run(["bash", str(ROOT / "scripts" / "pg_cluster.sh"), "stop", str(pg_dir / "cluster")],
                           capture_output=True)
            shutil.rmtree(pg_dir, ignore_errors=True)
    base = results[0]["rate"]
    print(f"search on the tiny zoo: {args.candidates} candidates per setting, CMA-ES popsize 6, device "
          f"{args.device}, {os.cpu_count()} cores, database {'PostgreSQL' if server else 'SQLite file'}")
    print(f"{'workers':>8s} {'threads':>8s} {'cand/min':>9s} {'vs 1':>6s} {'wall s':>7s}  per worker: "
          "candidates, idle share, start-up s")
    for r in results:
        per = "; ".join(f"{o} / {i:.1%} / {s:.1f}" for o, i, s in zip(r["own"], r["idle"], r["setup"]))
        print(f"{r['workers']:8d} {r['threads']:8d} {r['rate']:9.1f} {r['rate'] / base:5.2f}x {r['wall_s']:7.1f}  {per}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
