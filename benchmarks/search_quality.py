"""Search quality on the small zoo: which driver finds the better merge for the same budget.

Every method searches TIES recipes for the small zoo's three experts, with the same budget of
candidates, on the same search fitness (log-prob margins of the search split, as in zoo-smooth),
for several seeds. Along the way, the best candidate so far (by search fitness) is scored on the
held-out split with the fixed metric: the mean held-out accuracy over the skills (suite zoo).

- ``cma``: CMA-ES on per_layer_per_module (the demo's driver settings);
- ``tpe``: Optuna's TPE on per_layer_per_module;
- ``random``: Optuna's random sampler on per_layer_per_module;
- ``mergekit-evolve``: that tool's protocol, run in evomerge: layer groups (its layer_granularity),
  the first N items of each task instead of a seeded sample (its lm-eval ``limit``), and pycma's
  defaults (sigma0 1/6, default population, started at the centre).

Prints the curves (mean and spread over seeds) against candidates evaluated and against item
evaluations, the final ratios against the mergekit-evolve protocol, and writes a PNG.

    python benchmarks/search_quality.py [--candidates 120] [--seeds 0 1 2] [--zoo runs/zoo-small]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

METHODS = {
    "cma": {"space": "per_layer_per_module", "driver": {"name": "cma", "popsize": 16, "sigma0": 0.2},
            "subsample": "seeded"},
    "tpe": {"space": "per_layer_per_module", "driver": {"name": "optuna", "sampler": "tpe"}, "subsample": "seeded"},
    "random": {"space": "per_layer_per_module", "driver": {"name": "optuna", "sampler": "random"},
               "subsample": "seeded"},
    "mergekit-evolve": {"space": "layer_groups", "driver": {"name": "cma", "sigma0": 1 / 6, "x0": "center"},
                        "subsample": "first"},
}
PEER = "mergekit-evolve"
N_ITEMS = {"rev": 40, "enc": 40, "fact": 20}  # the search fitness's items per task


def search_suite(work: Path, subsample: str) -> Path:
    """zoo-smooth's tasks (margins) with the given subsample rule, as a suite file."""
    from evomerge.resources import suites_dir

    data = suites_dir() / "data" / "zoo"
    seq = {"kind": "generate", "metric": "margin", "stop": ["."], "answer_regex": "([a-l](?: [a-l])*)",
           "max_new_tokens": 6}
    tasks = [{"name": t, "data": str(data / f"{t}.jsonl"), "n": N_ITEMS[t], "subsample": subsample,
              **(seq if t != "fact" else {"kind": "multiple_choice", "metric": "margin"})} for t in N_ITEMS]
    path = work / f"suite-{subsample}.yaml"
    path.write_text(yaml.safe_dump({"name": f"zoo-smooth-{subsample}", "tasks": tasks}))
    return path


def curve(run, checkpoints: list[int], heldout) -> list[float]:
    """Held-out skill mean of the best candidate so far (by search fitness) at each checkpoint."""
    rows = sorted((r for r in run.db.rows() if r.state == "complete" and r.fitness is not None),
                  key=lambda r: r.number)
    out, best = [], None
    for i, row in enumerate(rows, start=1):
        if best is None or row.fitness > best.fitness:
            best = row
        if i in checkpoints:
            out.append(heldout(best))
    return out


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidates", type=int, default=120)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--zoo", default="runs/zoo-small")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--png", default="runs/search_quality.png")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from evomerge.fitness.suite import Suite
    from evomerge.merging.recipe import Recipe
    from evomerge.search.evaluator import Evaluator
    from evomerge.search.loop import create_run, run_search
    from evomerge.zoo import load_or_build_zoo, skill_mean

    zoo, _ = load_or_build_zoo(args.zoo, "small", seed=0)
    work = Path(tempfile.mkdtemp(prefix="evomerge-quality-"))
    checkpoints = sorted({c for c in (10, 20, 40, 60, 80, 100, 120, 160, 240, 320, 480) if c < args.candidates}
                         | {args.candidates})
    exact = Suite.load("zoo")
    curves: dict[str, list[list[float]]] = {}
    t0 = time.perf_counter()
    for method in args.methods:
        spec = METHODS[method]
        suite_file = search_suite(work, spec["subsample"])
        for seed in args.seeds:
            cfg = {"name": f"{method}-{seed}", "models": {"base": zoo["base"], "experts": list(zoo["experts"].values())},
                   "merge_method": "ties", "space": spec["space"], "fitness": {"suite": str(suite_file)},
                   "driver": spec["driver"], "budget": {"max_candidates": args.candidates}, "seed": seed,
                   "references": False}
            path = work / f"{method}-{seed}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            run = create_run(path, work / f"{method}-{seed}")
            run_search(run, live=False)
            scorer = Evaluator(run.cfg, exact)
            cache: dict[int, float] = {}

            def heldout(row) -> float:
                if row.number not in cache:
                    scored = scorer.score_recipe(Recipe.from_dict(row.recipe), "heldout")
                    cache[row.number] = skill_mean({k: v.value for k, v in scored.result.tasks.items()})
                return cache[row.number]

            curves.setdefault(method, []).append(curve(run, checkpoints, heldout))
            print(f"{method} seed {seed}: held-out skill mean of the best so far "
                  f"{[round(v, 3) for v in curves[method][-1]]} ({time.perf_counter() - t0:.0f} s)", flush=True)

    items_per_candidate = sum(N_ITEMS.values())
    print(f"\nheld-out mean accuracy over the skills of the best candidate so far, mean (min-max) over seeds "
          f"{args.seeds}; one candidate = {items_per_candidate} item evaluations")
    print(f"  {'candidates':>10s} {'items':>7s}" + "".join(f"{m:>22s}" for m in curves))
    for i, c in enumerate(checkpoints):
        cells = []
        for runs in curves.values():
            vals = [r[i] for r in runs]
            cells.append(f"{statistics.mean(vals):.3f} ({min(vals):.3f}-{max(vals):.3f})")
        print(f"  {c:10d} {c * items_per_candidate:7d}" + "".join(f"{x:>22s}" for x in cells))
    if PEER in curves:
        peer = statistics.mean(r[-1] for r in curves[PEER])
        for method, runs in curves.items():
            final = statistics.mean(r[-1] for r in runs)
            print(f"  {method}: final {final:.3f}, {final / peer:.2f}x the {PEER} protocol's {peer:.3f}")
    parents = {k: skill_mean(v) for k, v in zoo["report"]["heldout"].items()}
    print("  zoo references (held-out skill mean): " + ", ".join(f"{k} {v:.3f}" for k, v in parents.items()))
    write_png(Path(args.png), checkpoints, items_per_candidate, curves, parents)
    print(f"plot: {args.png}; took {(time.perf_counter() - t0) / 60:.1f} min")
    return 0


def write_png(path: Path, checkpoints: list[int], per: int, curves: dict, parents: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, scale, label in ((axes[0], 1, "candidates evaluated"), (axes[1], per, "item evaluations")):
        x = [c * scale for c in checkpoints]
        for method, runs in curves.items():
            mean = [statistics.mean(r[i] for r in runs) for i in range(len(x))]
            ax.plot(x, mean, marker="o", label=method)
            ax.fill_between(x, [min(r[i] for r in runs) for i in range(len(x))],
                            [max(r[i] for r in runs) for i in range(len(x))], alpha=0.15)
        best_parent = max(v for k, v in parents.items() if k.startswith("expert_"))
        best_default = max(v for k, v in parents.items() if k.startswith("merge_"))
        ax.axhline(best_parent, color="grey", ls="--", lw=1, label="best parent")
        ax.axhline(best_default, color="grey", ls=":", lw=1, label="best default merge")
        ax.set_xlabel(label)
    axes[0].set_ylabel("held-out mean accuracy over the skills")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
