"""The README's main command: an evolutionary merge search on the small model zoo, end to end;
with ``--base smollm2`` (``make demo-real``), on experts fine-tuned from a real pretrained LLM.

1. builds (once, cached under runs/zoo-small) the small zoo: a base and three experts (rev, enc,
   fact) trained here on the CPU;
2. writes a run config (runs/demo/search.yaml) and runs a CMA-ES search over per-layer,
   per-module TIES weights and densities, scored on the zoo-demo suite's search split (smooth margins);
3. exports the best recipe (mergekit YAML + merged model + report) and prints the comparison
   table (parents, the default merge and the best found, on the search and held-out splits), then
   the fixed metric: held-out accuracy of the base, the parents, the default merges and the best.

The zoo trains under pinned numerics (see :mod:`evomerge.zoo`): the same zoo under every setting
of one machine, though not on every CPU (an AMD EPYC builds another one than the README's Xeon);
the search runs at the machine's own speed and floats, so its winner can differ between CPUs too. The closing lines name the machine and the zoo's weights digest, so that a
run can be matched with the README's table.

With ``--base smollm2`` the zoo is :mod:`evomerge.realzoo` (SmolLM2-135M-Instruct and three
fine-tuned experts, cached under runs/zoo-smollm2); the search scores the smollm2-demo suite (the
skills' margins and the retention task's accuracy) with racing, and the verdict is the mean held-out exact
match over the skills, against every parent and the default merges, with the retention task
within ``RETENTION_SLACK`` of the base.

    python -m evomerge.demo [--base smollm2] [--out DIR] [--zoo DIR] [--zoo-seed N] [--candidates N] [--threads N]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # the libraries' progress bars off: tqdm reads this when torch imports it
    os.environ.setdefault("TQDM_DISABLE", "1")  # (the search's own bar passes disable=False)

import yaml

from evomerge.cli import positive_int, quiet_libraries
from evomerge.zoo import COMPOSED, family, format_heldout, heldout_scores, skill_mean


def demo_config(zoo: dict, candidates: int) -> dict:
    return {
        "name": "demo",
        "models": family(zoo),
        "merge_method": "ties",
        "space": "per_layer_per_module",
        "fitness": {"suite": "zoo-demo"},
        "driver": {"name": "cma", "popsize": 16, "sigma0": 0.2},
        "budget": {"max_candidates": candidates},
        "seed": 0,
    }


REAL_GAIN, RETENTION_SLACK = 0.10, 0.02  # the real-model demo's goals: see real_verdict


def real_config(zoo: dict, candidates: int) -> dict:
    """The real-model demo's search: TIES weights and densities per expert and group of 5 layers,
    racing on the skills' margins and the retention task's accuracy (suite smollm2-demo), driven by
    Optuna's TPE, which ``bench-quality-real`` ranks first on this zoo."""
    return {
        "name": "demo-smollm2",
        "models": family(zoo),
        "merge_method": "ties",
        "space": {"granularity": "layer_groups", "layers_per_group": 5},
        "fitness": {"suite": "smollm2-demo", "estimate": {"racing": {}}},
        "driver": {"name": "optuna", "sampler": "tpe"},
        "budget": {"max_candidates": candidates},
        "seed": 0,
    }


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", choices=["smollm2"], help="the real pretrained base's zoo instead of the small zoo")
    ap.add_argument("--out", help="default runs/demo (runs/demo-smollm2 with --base)")
    ap.add_argument("--zoo", help="default runs/zoo-small (runs/zoo-smollm2 with --base)")
    ap.add_argument("--candidates", type=positive_int, help="default 960 (360 with --base)")
    ap.add_argument("--zoo-seed", type=int, default=0, help="the zoo's training seed")
    ap.add_argument("--threads", type=positive_int, metavar="N",
                    help="torch's CPU threads (default: the cores other processes leave free)")
    args = ap.parse_args(argv)
    real = args.base == "smollm2"
    suffix = "-smollm2" if real else ""
    args.out = args.out or f"runs/demo{suffix}"
    args.zoo = args.zoo or ("runs/zoo-smollm2" if real else "runs/zoo-small")
    args.candidates = args.candidates or (360 if real else 960)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    quiet_libraries()
    for noisy in ("evomerge.merging.engine", "evomerge.merging.kernel"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from evomerge import machine
    from evomerge.run.report import comparison_table, export, status_text, write_plots
    from evomerge.run.loop import run_search
    from evomerge.run.rundir import create_run
    from evomerge.zoo import describe_zoo, load_or_build_zoo

    t0 = time.perf_counter()
    if real:
        from evomerge.realzoo import load_or_build_real_zoo

        zoo, trained = load_or_build_real_zoo(args.zoo, seed=args.zoo_seed)
    else:
        zoo, trained = load_or_build_zoo(args.zoo, "small", seed=args.zoo_seed)
    print(f"model zoo: trained {zoo['root']} in {zoo['build_seconds']:.0f} s" if trained
          else f"model zoo: {zoo['root']} (cached)")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = out / "search.yaml"
    config.write_text(yaml.safe_dump((real_config if real else demo_config)(zoo, args.candidates), sort_keys=False))
    run_dir = out / "search"
    if run_dir.exists() and not (run_dir / "run.json").is_file():
        raise SystemExit(f"demo: {run_dir} exists and holds no run: it is not the demo's; pass another --out")
    shutil.rmtree(run_dir, ignore_errors=True)  # the demo always starts a fresh run (its own previous one)
    run = create_run(config, run_dir)
    print(f"search: {config} -> {run_dir} (dimension {run.space.dimension}, {args.candidates} candidates)")
    summary = run_search(run, threads=args.threads)
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
    if real:
        ok = real_verdict(zoo, str(exported / "model"))
        print(f"machine: {machine.describe()}\n{describe_zoo(zoo)}")
        print(f"demo took {(time.perf_counter() - t0) / 60:.1f} min")
        return 0 if ok else 1

    table = heldout_table(zoo, str(exported / "model"))
    print("\n" + "\n".join(format_heldout(table)))
    best = skill_mean(table["best (exported)"])
    parent_best = max(skill_mean(row) for name, row in table.items() if name.startswith("parent"))
    default_best = max(skill_mean(row) for name, row in table.items() if name.startswith("default"))
    composed_parent = max(row[COMPOSED] for name, row in table.items() if name.startswith("parent"))
    print(f"\nbest against the best parent: {best - parent_best:+.3f} (goal >= +0.15); "
          f"against the best default merge: {best - default_best:+.3f} (goal >= +0.15); "
          f"{COMPOSED}: {table['best (exported)'][COMPOSED]:.3f} against the best parent's {composed_parent:.3f}")
    print(f"machine: {machine.describe()}\n{describe_zoo(zoo)}")
    print(f"demo took {(time.perf_counter() - t0) / 60:.1f} min")
    return 0 if best > parent_best else 1


def real_verdict(zoo: dict, best_model: str) -> bool:
    """Print the real zoo's held-out table and whether the winner met the goals: its mean over
    the skills at least ``REAL_GAIN`` above every parent and default merge, and the retention
    task within ``RETENTION_SLACK`` of the base."""
    from evomerge import realzoo

    table = heldout_table(zoo, best_model, realzoo.heldout_scores)
    print("\n" + "\n".join(realzoo.format_heldout(table)))
    best = table["best (exported)"]
    parent = max(realzoo.skill_mean(row) for name, row in table.items() if name.startswith("parent"))
    default = max(realzoo.skill_mean(row) for name, row in table.items() if name.startswith("default"))
    gain = realzoo.skill_mean(best) - max(parent, default)
    kept = best[realzoo.RETENTION] - table["base"][realzoo.RETENTION]
    ok = gain >= REAL_GAIN and kept >= -RETENTION_SLACK
    print(f"\nbest against the best parent: {realzoo.skill_mean(best) - parent:+.3f}, against the best default "
          f"merge: {realzoo.skill_mean(best) - default:+.3f} (goal: >= +{REAL_GAIN:.2f} against both); "
          f"{realzoo.RETENTION} against the base: {kept:+.3f} (goal >= -{RETENTION_SLACK:.2f}): "
          + ("goals met" if ok else "GOALS NOT MET"))
    return ok


def heldout_table(zoo: dict, best_model: str, scores=heldout_scores) -> dict[str, dict[str, float]]:
    """Held-out scores on the zoo's skills and the composed task: the base, every parent and the
    default merges a user would try first (as the zoo's build measured them), and the exported best."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def label(name: str) -> str:
        for prefix, shown in (("expert_", "parent "), ("merge_", "default ")):
            if name.startswith(prefix):
                return shown + name.removeprefix(prefix)
        return name

    table = {label(name): row for name, row in zoo["report"]["heldout"].items()}
    model = AutoModelForCausalLM.from_pretrained(best_model).eval()
    table["best (exported)"] = scores(model, AutoTokenizer.from_pretrained(best_model))
    return table


if __name__ == "__main__":
    sys.exit(main())
