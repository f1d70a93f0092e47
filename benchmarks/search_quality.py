"""Search quality: which driver finds the better merge for the same budget, on the small zoo or
on the real one (SmolLM2-135M-Instruct's experts, ``--size smollm2``).

Every method searches TIES recipes for the zoo's three experts, with the same budget of
candidates, on the same search fitness (log-prob margins of the search split: suite zoo-smooth,
or smollm2-demo on the real zoo), for several seeds. Along the way, the best candidate so far (by
search fitness) is scored on the held-out split with the fixed metric: the mean held-out accuracy
over the skills (suite zoo, or smollm2).

On the small zoo:

- ``cma``: CMA-ES on per_layer_per_module (the demo's driver settings);
- ``tpe``: Optuna's TPE on per_layer_per_module;
- ``random``: Optuna's random sampler on per_layer_per_module;
- ``mergekit-evolve``: that tool's protocol, run in evomerge: layer groups (its layer_granularity),
  the first N items of each task instead of a seeded sample (its lm-eval ``limit``), and pycma's
  defaults (sigma0 1/6, default population, started at the centre);
- ``dfs``: the data-flow space (``layer_path``: a path through the base's and the experts' layers),
  CMA-ES on its slots, started from the best parent's stack (the parents are scored first, outside
  the budget);
- ``hybrid``: ``cma`` for half the candidates, then ``dfs`` over its winner (as the base) and the
  experts for the other half;
- ``cma-racing`` and ``cma-anchors``: cma with estimated fitness (``fitness.estimate``): racing
  with its defaults (10% then 30% of the items, z 0.25), and 3 anchor items per task (chosen after
  8 calibration candidates) then racing on 30%. They are compared
  with full-fitness cma at equal candidates, at equal item evaluations and at equal wall time,
  and their estimates with the truth (Spearman's rho on 30 estimated candidates per run).

On the real zoo every method races (``fitness.estimate`` racing with its defaults) on the demo's
space, TIES weights and densities per group of 5 layers: ``cma`` with the demo's settings, ``tpe``,
and the ``mergekit-evolve`` protocol (first N items, pycma's defaults). They are compared at equal
candidates and at equal item evaluations.

Prints the curves (mean and spread over seeds) against candidates evaluated and against item
evaluations, the final ratios against the mergekit-evolve protocol, and writes a PNG.

    python benchmarks/search_quality.py [--candidates 120] [--seeds 0 1 2] [--size small|smollm2] [--zoo DIR]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

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
    # cma as above, with estimated fitness (fitness.estimate): racing alone (its defaults), and
    # anchors then racing
    "cma-racing": {"space": "per_layer_per_module", "driver": {"name": "cma", "popsize": 16, "sigma0": 0.2},
                   "subsample": "seeded", "estimate": {"racing": {}}},
    "cma-anchors": {"space": "per_layer_per_module", "driver": {"name": "cma", "popsize": 16, "sigma0": 0.2},
                    "subsample": "seeded", "estimate": {"anchors": 3, "calibration": 8, "racing": {"rungs": [0.3]}}},
    # the data-flow space: a layer path over the base and the experts (CMA-ES on its slots), and the
    # hybrid: cma for half the budget, then a layer path over its winner and the experts
    "dfs": {"space": "layer_path", "merge_method": "passthrough", "driver": {"name": "cma", "popsize": 16},
            "subsample": "seeded", "references": True},  # scores the parents first: it starts from the best one
    "hybrid": {"space": "per_layer_per_module", "driver": {"name": "cma", "popsize": 16, "sigma0": 0.2},
               "subsample": "seeded", "then": {"space": "layer_path", "merge_method": "passthrough",
                                                "driver": {"name": "cma", "popsize": 16}}},
}
GROUPS_OF_5 = {"granularity": "layer_groups", "layers_per_group": 5}
RACING = {"racing": {}}
REAL_METHODS = {  # the real zoo: every method races, on the real demo's space
    "cma": {"space": GROUPS_OF_5, "driver": {"name": "cma", "popsize": 12, "sigma0": 0.25}, "subsample": "seeded",
            "estimate": RACING},
    "tpe": {"space": GROUPS_OF_5, "driver": {"name": "optuna", "sampler": "tpe"}, "subsample": "seeded",
            "estimate": RACING},
    "mergekit-evolve": {"space": GROUPS_OF_5, "driver": {"name": "cma", "sigma0": 1 / 6, "x0": "center"},
                        "subsample": "first", "estimate": RACING},
}
PEER = "mergekit-evolve"
FULL = "cma"  # on the small zoo, what the estimated-fitness methods are compared with
RANKED = 30  # estimated candidates per run scored on every item for the rank correlation


@dataclass(frozen=True)
class Profile:
    """What a zoo size is searched and judged with."""

    zoo: str  # default zoo directory
    methods: dict[str, dict]
    search: str  # shipped suite of the search fitness
    heldout: str  # shipped suite of the fixed held-out metric
    compare_full: bool  # compare estimated-fitness methods with full-fitness cma (small zoo only)


PROFILES = {
    "small": Profile("runs/zoo-small", METHODS, "zoo-smooth", "zoo", True),
    "smollm2": Profile("runs/zoo-smollm2", REAL_METHODS, "smollm2-demo", "smollm2", False),
}


def search_suite(work: Path, name: str, subsample: str) -> Path:
    """The shipped suite ``name`` with the given subsample rule on every task, as a suite file."""
    from evomerge.resources import suites_dir

    raw = yaml.safe_load((suites_dir() / f"{name}.yaml").read_text())
    tasks = [t | {"data": str(suites_dir() / t["data"]), "subsample": subsample} for t in raw["tasks"]]
    path = work / f"suite-{subsample}.yaml"
    path.write_text(yaml.safe_dump({"name": f"{name}-{subsample}", "tasks": tasks}))
    return path


def items_per_candidate(suite_file: Path) -> int:
    """Item evaluations of one candidate on every item of the search fitness."""
    from evomerge.fitness.suite import Suite

    suite = Suite.resolve(str(suite_file))
    return sum(len(task.items("search")) for task in suite.tasks)


@dataclass
class Curve:
    heldout: list[float]  # held-out skill mean of the best so far, at each checkpoint
    items: list[int]  # item evaluations used by then
    seconds: list[float]  # search wall time by then
    spearman: Optional[float] = None  # estimated against true search fitness (estimated candidates)


def best_so_far(run, checkpoints: list[int]) -> list[tuple]:
    """(best row by recorded, possibly estimated, search fitness; item evaluations used; seconds)
    once each checkpoint's number of candidates completed."""

    trials = {t.number: t for t in run.db.trials()}
    rows = sorted((r for r in run.db.rows() if r.state == "complete" and r.fitness is not None),
                  key=lambda r: r.number)
    start = min(t.datetime_start for t in trials.values())
    out, best, used = [], None, 0
    for i, row in enumerate(rows, start=1):
        used += row.record.items_scored()
        if best is None or row.fitness > best.fitness:
            best = row
        if i in checkpoints:
            out.append((best, used, (trials[row.number].datetime_complete - start).total_seconds()))
    return out


def curve(run, checkpoints: list[int], heldout) -> Curve:
    """The held-out quality of the best candidate so far at each checkpoint."""
    points = best_so_far(run, checkpoints)
    return Curve([heldout(b) for b, _, _ in points], [u for _, u, _ in points], [t for _, _, t in points])


def two_stage_curve(first, second, checkpoints: list[int], half: int, first_heldout, second_heldout) -> Curve:
    """A two-stage run's curve: the first stage's up to ``half`` candidates, then the best so far
    over both (by search fitness: the stages score the same items), items and seconds added up."""
    out = curve(first, [c for c in checkpoints if c <= half], first_heldout)
    (first_best, used, seconds), = best_so_far(first, [half])
    for best, items, t in best_so_far(second, [c - half for c in checkpoints if c > half]):
        out.heldout.append(second_heldout(best) if best.fitness > first_best.fitness else first_heldout(first_best))
        out.items.append(used + items)
        out.seconds.append(seconds + t)
    return out


def at(c: Curve, axis: str, x: float) -> float:
    """Held-out quality of the best so far once ``axis`` (items or seconds) reached ``x`` (the last
    checkpoint at or before it; the first one if none)."""
    xs = getattr(c, axis)
    i = max([j for j, v in enumerate(xs) if v <= x], default=0)
    return c.heldout[i]


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.mean(ra), statistics.mean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return cov / ((sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5 or 1.0)


def rank_correlation(run, scorer) -> Optional[float]:
    """Spearman's rho between recorded (estimated) and true search fitness, on up to RANKED
    estimated candidates spread over the run."""
    from evomerge.merging.plan import read_recipe

    est = [r for r in run.db.rows() if r.state == "complete" and r.record.estimated_from()]
    if len(est) < 3:
        return None
    picked = est[::max(1, len(est) // RANKED)][:RANKED]
    truth = [scorer.score_recipe(read_recipe(r.recipe)).fitness for r in picked]
    return spearman([r.fitness for r in picked], truth)


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidates", type=int, default=120)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--size", default="small", choices=list(PROFILES), help="the small zoo or the real one")
    ap.add_argument("--zoo", help="the zoo's directory (default runs/zoo-small or runs/zoo-smollm2)")
    ap.add_argument("--methods", nargs="+", help="default: every method of the zoo's size")
    ap.add_argument("--png", help="default runs/search_quality.png (small) or runs/search_quality-smollm2.png")
    args = ap.parse_args()
    profile = PROFILES[args.size]
    methods = args.methods or list(profile.methods)
    unknown = sorted(set(methods) - set(profile.methods))
    if unknown:
        ap.error(f"--methods: {', '.join(unknown)} not among {', '.join(profile.methods)} for size {args.size}")
    png = Path(args.png or ("runs/search_quality.png" if args.size == "small" else f"runs/search_quality-{args.size}.png"))
    logging.basicConfig(level=logging.WARNING)

    from evomerge.fitness.suite import Suite
    from evomerge.merging.plan import read_recipe
    from evomerge.merging.to_disk import merge_to_disk
    from evomerge.rundb.store import best_row
    from evomerge.search.evaluator import Evaluator
    from evomerge.run.loop import run_search
    from evomerge.run.rundir import create_run
    from evomerge.zoo import load_or_build_any

    if args.size == "smollm2":
        from evomerge.realzoo import skill_mean
    else:
        from evomerge.zoo import skill_mean
    zoo, _ = load_or_build_any(args.zoo or profile.zoo, args.size, seed=0)
    work = Path(tempfile.mkdtemp(prefix="evomerge-quality-"))
    checkpoints = sorted({c for c in (10, 20, 40, 60, 80, 100, 120, 160, 240, 320, 480) if c < args.candidates}
                         | {args.candidates})
    exact = Suite.load(profile.heldout)
    curves: dict[str, list[list[float]]] = {}
    t0 = time.perf_counter()
    def search(name: str, spec: dict, base: str, suite_file: Path, candidates: int, seed: int):
        cfg = {"name": name, "models": {"base": base, "experts": list(zoo["experts"].values())},
               "merge_method": spec.get("merge_method", "ties"), "space": spec["space"],
               "fitness": {"suite": str(suite_file), **({"estimate": spec["estimate"]} if "estimate" in spec else {})},
               "driver": spec["driver"], "budget": {"max_candidates": candidates}, "seed": seed,
               "references": spec.get("references", False)}
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        run = create_run(path, work / name)
        run_search(run, live=False)
        scorer = Evaluator(run.cfg, exact)
        cache: dict[int, float] = {}

        def heldout(row) -> float:
            if row.number not in cache:
                scored = scorer.score_recipe(read_recipe(row.recipe), "heldout")
                cache[row.number] = skill_mean({k: v.value for k, v in scored.result.tasks.items()})
            return cache[row.number]

        return run, heldout

    for method in methods:
        spec = profile.methods[method]
        suite_file = search_suite(work, profile.search, spec["subsample"])
        for seed in args.seeds:
            if "then" in spec:  # two stages at the same total budget: the second over the first's winner
                half = args.candidates // 2
                first, first_heldout = search(f"{method}-{seed}-ps", spec, zoo["base"], suite_file, half, seed)
                winner = best_row(first.db.rows())
                model = merge_to_disk(read_recipe(winner.recipe), work / f"{method}-{seed}-ps-best")
                run, second_heldout = search(f"{method}-{seed}", spec["then"], str(model), suite_file,
                                             args.candidates - half, seed)
                c = two_stage_curve(first, run, checkpoints, half, first_heldout, second_heldout)
            else:
                run, heldout = search(f"{method}-{seed}", spec, zoo["base"], suite_file, args.candidates, seed)
                c = curve(run, checkpoints, heldout)
            if "estimate" in spec and profile.compare_full:
                c.spearman = rank_correlation(run, Evaluator(run.cfg, Suite.resolve(run.cfg.fitness.suite)))
            curves.setdefault(method, []).append(c)
            print(f"{method} seed {seed}: held-out skill mean of the best so far {[round(v, 3) for v in c.heldout]}, "
                  f"{c.items[-1]} item evaluations, {c.seconds[-1]:.0f} s ({time.perf_counter() - t0:.0f} s)",
                  flush=True)

    full_items = items_per_candidate(search_suite(work, profile.search, "seeded"))
    print(f"\nheld-out mean accuracy over the skills of the best candidate so far, mean (min-max) over seeds "
          f"{args.seeds}; with full fitness one candidate = {full_items} item evaluations")
    print(f"  {'candidates':>10s}" + "".join(f"{m:>22s}" for m in curves))
    for i, c in enumerate(checkpoints):
        cells = []
        for runs in curves.values():
            vals = [r.heldout[i] for r in runs]
            cells.append(f"{statistics.mean(vals):.3f} ({min(vals):.3f}-{max(vals):.3f})")
        print(f"  {c:10d}" + "".join(f"{x:>22s}" for x in cells))
    print("\nper method, mean over seeds: final held-out, item evaluations, search seconds")
    for method, runs in curves.items():
        line = (f"  {method:16s} {statistics.mean(r.heldout[-1] for r in runs):.3f}  "
                f"{statistics.mean(r.items[-1] for r in runs):8.0f}  {statistics.mean(r.seconds[-1] for r in runs):6.1f} s")
        if PEER in curves:
            line += f"  {statistics.mean(r.heldout[-1] for r in runs) / statistics.mean(r.heldout[-1] for r in curves[PEER]):.2f}x {PEER}"
        print(line)
    budget = min(statistics.mean(r.items[-1] for r in runs) for runs in curves.values())
    print(f"at equal item evaluations ({budget:.0f}, the smallest method's mean), mean over seeds: " + ", ".join(
        f"{method} {statistics.mean(at(r, 'items', budget) for r in runs):.3f}" for method, runs in curves.items()))
    if profile.compare_full and FULL in curves:
        compare_estimates(curves)
    parents = {k: skill_mean(v) for k, v in zoo["report"]["heldout"].items()}
    print("  zoo references (held-out skill mean): " + ", ".join(f"{k} {v:.3f}" for k, v in parents.items()))
    write_png(png, checkpoints, curves, parents)
    print(f"plot: {png}; took {(time.perf_counter() - t0) / 60:.1f} min")
    return 0


def compare_estimates(curves: dict) -> None:
    """Each estimated-fitness method against full-fitness cma, per seed then averaged: at equal
    candidates, at equal item evaluations and at equal wall time."""
    full = curves[FULL]
    for method, runs in curves.items():
        if not method.startswith(f"{FULL}-"):
            continue
        eq_cand = statistics.mean(f.heldout[-1] for f in full)
        mine = statistics.mean(r.heldout[-1] for r in runs)
        share = statistics.mean(r.items[-1] / f.items[-1] for r, f in zip(runs, full))
        eq_items = statistics.mean(at(f, "items", r.items[-1]) for r, f in zip(runs, full))
        eq_time = statistics.mean(at(f, "seconds", r.seconds[-1]) for r, f in zip(runs, full))
        rhos = [r.spearman for r in runs if r.spearman is not None]
        print(f"  {method} against {FULL} (full fitness): held-out {mine:.3f} vs {eq_cand:.3f} at equal candidates "
              f"({mine - eq_cand:+.3f}) with {share:.1%} of its item evaluations (1/{1 / share:.1f}); {FULL} at the "
              f"same item evaluations {eq_items:.3f}, at the same wall time {eq_time:.3f}; Spearman rho of "
              f"estimated against true search fitness {statistics.mean(rhos) if rhos else float('nan'):.2f} "
              f"({', '.join(f'{x:.2f}' for x in rhos)})")


def write_png(path: Path, checkpoints: list[int], curves: dict, parents: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, axis, label in ((axes[0], None, "candidates evaluated"), (axes[1], "items", "item evaluations")):
        for method, runs in curves.items():
            x = checkpoints if axis is None else [statistics.mean(getattr(r, axis)[i] for r in runs)
                                                  for i in range(len(checkpoints))]
            mean = [statistics.mean(r.heldout[i] for r in runs) for i in range(len(x))]
            ax.plot(x, mean, marker="o", label=method)
            ax.fill_between(x, [min(r.heldout[i] for r in runs) for i in range(len(x))],
                            [max(r.heldout[i] for r in runs) for i in range(len(x))], alpha=0.15)
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
