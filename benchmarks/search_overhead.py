"""Where a candidate's wall time goes on the demo search: fitness evaluation vs. everything else.

Runs the demo's config (small zoo, per-layer per-module TIES, CMA-ES, zoo-demo suite) for N
candidates in a fresh run directory, times every phase of every candidate inside the loop, and
prints the share of each candidate's wall time spent outside fitness evaluation (the lost-candidate
and budget checks, driver ask/tell with the database claim and write, recipe decoding, merge apply).
Goal: under 10%. It also checks that no model weights were written to disk during the search.

    python benchmarks/search_overhead.py [--candidates 160] [--zoo runs/zoo-small]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidates", type=int, default=160)
    ap.add_argument("--zoo", default="runs/zoo-small")
    ap.add_argument("--suite", default="zoo-demo")
    args = ap.parse_args()

    from evomerge.demo import demo_config
    from evomerge.rundb.leases import Leases
    from evomerge.search import evaluator as evaluator_mod
    from evomerge.run import loop as search_mod
    from evomerge.run.rundir import create_run
    from evomerge.search.space import SearchSpace
    from evomerge.search.claims import DriverClaims
    from evomerge.zoo import load_or_build_zoo

    zoo, _ = load_or_build_zoo(args.zoo, "small", seed=0)
    work = Path(tempfile.mkdtemp(prefix="evomerge-overhead-"))
    cfg = demo_config(zoo, args.candidates) | {"references": False}
    cfg["fitness"] = {"suite": args.suite}
    (work / "cfg.yaml").write_text(yaml.safe_dump(cfg))

    phases: dict[str, list[float]] = defaultdict(list)

    def timed(name, fn):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                phases[name].append(time.perf_counter() - t)
        return wrapper

    # time every phase where the loop calls it
    asked: list[float] = []
    ask = DriverClaims.ask

    def ask_stamped(self):
        asked.append(time.perf_counter())
        return ask(self)

    DriverClaims.ask = timed("driver ask + database claim", ask_stamped)
    Leases.claim = timed("database claim (in ask)", Leases.claim)
    Leases.finish = timed("database write (in tell)", Leases.finish)
    Leases.reclaim = timed("lost-candidate check", Leases.reclaim)
    Leases.counts = timed("budget check", Leases.counts)
    DriverClaims.tell = timed("driver tell + database write", DriverClaims.tell)
    SearchSpace.decode = timed("decode recipe", SearchSpace.decode)
    evaluator_mod.Evaluator.score_recipe = timed("candidate (merge + fitness)", evaluator_mod.Evaluator.score_recipe)
    evaluator_mod.Evaluator.score_model = timed("fitness evaluation", evaluator_mod.Evaluator.score_model)

    before = {p for p in Path(zoo["root"]).rglob("*") if p.is_file()}
    run = create_run(work / "cfg.yaml", work / "run")
    loop = search_mod._Search.loop
    wall = []

    def timed_loop(self):
        t = time.perf_counter()
        out = loop(self)
        wall.append(time.perf_counter() - t)
        return out

    search_mod._Search.loop = timed_loop
    search_mod.run_search(run, live=False)
    rows = run.db.rows()
    n = len(rows)
    written = [p for p in work.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin")]
    written += [p for p in Path(zoo["root"]).rglob("*") if p.is_file() and p not in before]
    names = ("lost-candidate check", "budget check", "driver ask + database claim", "database claim (in ask)",
             "decode recipe", "candidate (merge + fitness)", "fitness evaluation", "driver tell + database write",
             "database write (in tell)")
    # per candidate: the wall time from its ask to the next ask (everything the loop does for it),
    # and the part of it that is not fitness evaluation
    wall_c = [b - a for a, b in zip(asked, asked[1:])]
    outside_c = [w - f for w, f in zip(wall_c, phases["fitness evaluation"])]
    warm = run.cfg.driver.popsize or 16  # the first generation compiles the merge kernel's variants
    print(f"demo search: {n} candidates, space dimension {run.space.dimension}, suite {args.suite}")
    for label, sl in ((f"steady state (candidates {warm + 1}-{len(wall_c)})", slice(warm, len(wall_c))),
                      ("all candidates, incl. one-time kernel compilation", slice(0, len(wall_c)))):
        k = len(wall_c[sl])
        print(label + ", mean per candidate:")
        for name in names:
            print(f"  {name:32s} {sum(phases[name][sl]) / k * 1e3:8.1f} ms")
        print(f"  {'merge apply (recorded)':32s} {sum(r.record.merge_s for r in rows[sl]) / k * 1e3:8.1f} ms")
        share = sum(outside_c[sl]) / sum(wall_c[sl])
        print(f"  outside fitness evaluation: {sum(outside_c[sl]) / k * 1e3:.1f} ms of {sum(wall_c[sl]) / k * 1e3:.1f} ms"
              f" = {share * 100:.1f}% (goal < 10%)")
    steady = sum(outside_c[warm:]) / sum(wall_c[warm:])
    print(f"search loop wall time {wall[0]:.1f} s for {n} candidates (incl. engine build and live-model load)")
    print(f"model weight files written during the search: {len(written)} (goal 0)")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if steady < 0.10 and not written else 1


if __name__ == "__main__":
    sys.exit(main())
