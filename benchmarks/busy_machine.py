"""Candidates per minute of the demo's search, alone and beside a busy process, with the old and the new thread default.

The old default gave torch one intra-op thread per core whatever else ran; the new one
(:class:`evomerge.machine.ThreadFit`) gives it the cores other processes leave free. The competing
process is a ``torch.matmul`` loop on one thread. Each of the four runs searches the demo's config
(small zoo, per-layer per-module TIES, CMA-ES, zoo-demo suite, no references) in a fresh run
directory for ``--candidates`` candidates or ``--minutes`` minutes, whichever ends first.

    python benchmarks/busy_machine.py [--candidates 120] [--minutes 1.5] [--zoo runs/zoo-small]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MATMUL_LOOP = ("import select, sys, torch\ntorch.set_num_threads(1)\na = torch.randn(1024, 1024)\n"
               "while not select.select([sys.stdin], [], [], 0)[0]:\n    a = (a @ a).tanh()\n")


def _search(zoo: dict, work: Path, name: str, candidates: int, minutes: float, threads) -> dict:
    from evomerge.demo import demo_config
    from evomerge.run.loop import run_search
    from evomerge.run.rundir import create_run

    cfg = demo_config(zoo, candidates) | {"references": False, "name": name}
    cfg["budget"] = {"max_candidates": candidates, "max_minutes": minutes}
    (work / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    run = create_run(work / f"{name}.yaml", work / name)
    summary = run_search(run, live=False, threads=threads)
    return {"candidates": summary["own"], "wall_s": summary["wall_s"], "threads": summary["threads"],
            "per_minute": round(60 * summary["own"] / summary["wall_s"], 1)}


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidates", type=int, default=120)
    ap.add_argument("--minutes", type=float, default=1.5)
    ap.add_argument("--zoo", default=str(ROOT / "runs" / "zoo-small"))
    ap.add_argument("--json", default=str(ROOT / "runs" / "bench" / "busy_machine.json"))
    args = ap.parse_args()
    if os.environ.get("OMP_NUM_THREADS"):
        sys.exit("busy_machine.py: unset OMP_NUM_THREADS: it fixes the threads of both defaults")

    from evomerge import machine
    from evomerge.zoo import describe_zoo, load_or_build_zoo

    zoo, _ = load_or_build_zoo(args.zoo, "small", seed=0)
    work = Path(tempfile.mkdtemp(prefix="evomerge-busy-"))
    cores = machine.usable_cores()
    defaults = {f"old: {cores} threads (one per core)": cores, "new: fitted to the free cores": None}
    rows = []
    for load in ("alone", "beside a 1-thread matmul loop"):
        busy = subprocess.Popen([sys.executable, "-c", MATMUL_LOOP], stdin=subprocess.PIPE) if load != "alone" else None
        try:
            for label, threads in defaults.items():
                name = f"{'busy' if busy else 'alone'}-{'old' if threads else 'new'}"
                rows.append({"load": load, "default": label} |
                            _search(zoo, work, name, args.candidates, args.minutes, threads))
                print(json.dumps(rows[-1]), file=sys.stderr)
        finally:
            if busy is not None:
                busy.stdin.close()
                busy.wait()
    print(f"\nmachine: {machine.describe()}\n{describe_zoo(zoo)}")
    print(f"demo search, up to {args.candidates} candidates or {args.minutes} min per row\n")
    print("| load | thread default | threads at the end | candidates | candidates per minute |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['load']} | {r['default']} | {r['threads']} | {r['candidates']} | {r['per_minute']} |")
    by = {(r["load"], r["default"].split(":")[0]): r["per_minute"] for r in rows}
    busy_load = "beside a 1-thread matmul loop"
    print(f"\nbeside the busy process: new/old = {by[(busy_load, 'new')] / by[(busy_load, 'old')]:.2f}x; "
          f"alone: new/old = {by[('alone', 'new')] / by[('alone', 'old')]:.2f}x")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"machine": machine.describe(), "zoo": describe_zoo(zoo), "rows": rows},
                                          indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
