"""The README's main command: an evolutionary merge search on the small model zoo, end to end.

1. builds (once, cached under runs/zoo-small) the small zoo: a base and three experts (rev, enc,
   fact) trained here on the CPU;
2. writes a run config (runs/demo/search.yaml) and runs a CMA-ES search over per-layer,
   per-module TIES weights and densities, scored on the zoo-demo suite's search split (smooth margins);
3. exports the best recipe (mergekit YAML + merged model + report) and prints the comparison
   table: parents, the default merge and the best found, on the search and held-out splits, plus
   the exact-answer suite on held-out items.

    python -m evomerge.demo [--out runs/demo] [--zoo runs/zoo-small] [--candidates N]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import yaml


def demo_config(zoo: dict, candidates: int) -> dict:
    return {
        "name": "demo",
        "models": {"base": zoo["base"], "experts": list(zoo["experts"].values())},
        "merge_method": "ties",
        "space": "per_layer_per_module",
        "fitness": {"suite": "zoo-demo"},
        "driver": {"name": "cma", "popsize": 16, "sigma0": 0.2},
        "budget": {"max_candidates": candidates},
        "seed": 0,
    }


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--zoo", default="runs/zoo-small")
    ap.add_argument("--candidates", type=int, default=960)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("evomerge.merging.engine", "evomerge.merging.kernel", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from evomerge.fitness.suite import Suite
    from evomerge.search.evaluator import Evaluator
    from evomerge.run.report import comparison_table, export, status_text, write_plots
    from evomerge.search.loop import create_run, reference_recipes, run_search
    from evomerge.zoo import load_or_build_zoo

    t0 = time.perf_counter()
    zoo, trained = load_or_build_zoo(args.zoo, "small")
    print(f"model zoo: trained {zoo['root']} in {zoo['build_seconds']:.0f} s" if trained
          else f"model zoo: {zoo['root']} (cached)")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = out / "search.yaml"
    config.write_text(yaml.safe_dump(demo_config(zoo, args.candidates), sort_keys=False))
    run_dir = out / "search"
    shutil.rmtree(run_dir, ignore_errors=True)  # the demo always starts a fresh run
    run = create_run(config, run_dir)
    print(f"search: {config} -> {run_dir} (dimension {run.space.dimension}, {args.candidates} candidates)")
    summary = run_search(run)
    print(status_text(run, recent=3))
    for path in write_plots(run):
        print(f"plot: {path}")
    if summary["stopped_by"].startswith("signal"):
        return 130

    exported = out / "best"
    report = export(run, exported, overwrite=True)
    print(f"\nexported {exported}: recipe.yaml, model/, report.json, report.md\n")
    print(f"fitness = suite {run.cfg.fitness.suite} (log-prob margins; higher is better)")
    print(comparison_table(report))

    # the exact-answer suite on held-out items: what the margins stand for
    exact = Suite.load("zoo")
    ev = Evaluator(run.cfg, exact)
    print(f"\nsuite {exact.name} (exact answers / accuracy), held-out split:")
    print(f"  {'model':22s}" + "".join(f"{t.name:>8s}" for t in exact.tasks) + f"{'mean':>8s}")
    scored = {f"parent:{k}": ev.score_model_dir(path, ("heldout",))["heldout"] for k, path in zoo["experts"].items()}
    scored["default"] = ev.score_recipe(reference_recipes(run)["default"], "heldout")
    scored["best"] = ev.score_model_dir(str(exported / "model"), ("heldout",))["heldout"]
    for name, result in scored.items():
        tasks = result.result.tasks if result.result else {}
        print(f"  {name:22s}" + "".join(f"{tasks[t.name].value:8.3f}" if t.name in tasks else f"{'-':>8s}"
                                         for t in exact.tasks) + f"{result.fitness or 0:8.3f}")
    best, default = report["table"][f"best #{report['candidate']}"], report["table"]["default"]
    gain = best["heldout"]["fitness"] - default["heldout"]["fitness"]
    print(f"\nheld-out fitness: best {best['heldout']['fitness']:.4f} vs default {default['heldout']['fitness']:.4f} "
          f"({gain:+.4f}); demo took {(time.perf_counter() - t0) / 60:.1f} min")
    return 0 if gain > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
