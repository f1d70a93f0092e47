"""The README's main command (until the search arrives): merge the trained tiny zoo and score it.

Builds (once, cached under runs/demo/zoo) the tiny model zoo: a base and three experts trained
here on the CPU, and prints how each model and the default merges score. Then it writes a merge
to disk, scores it with ``evomerge eval``'s native backend, and scores a few recipes applied in
place into one live model, checking that the in-place recipe equal to the disk one gives the
same weights and the same fitness.

    python -m evomerge.demo [--out runs/demo]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/demo")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .engine import MergeEngine
    from .fitness import Suite
    from .fitness.native import NativeBackend
    from .merge import merge_to_disk
    from .recipe import Recipe, build, per_kind
    from .zoo import build_zoo, format_report, load_zoo

    out = Path(args.out)
    try:
        zoo = load_zoo(out / "zoo")
        print(f"model zoo: {zoo['root']} (cached)")
    except FileNotFoundError:
        zoo = build_zoo(out / "zoo", size="tiny", seed=0)
        print(f"model zoo: trained {zoo['root']} in {zoo['build_seconds']:.0f} s")
    print(format_report(zoo["report"]))

    suite, scorer = Suite.load("zoo"), NativeBackend()
    experts = list(zoo["experts"].values())

    def recipe(weight: float, attention: float, density: float) -> Recipe:
        w = per_kind({"attention": attention}, default=weight)
        return build("ties", zoo["base"], {e: {"weight": w, "density": density} for e in experts})

    first = recipe(0.5, 0.8, 0.7)
    (out / "recipe.yaml").write_text(first.to_yaml())
    t = time.perf_counter()
    merged = merge_to_disk(Recipe.from_yaml(out / "recipe.yaml"), out / "merged", overwrite=True)
    print(f"\nevomerge merge {out / 'recipe.yaml'} -> {merged} in {time.perf_counter() - t:.2f} s")
    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    on_disk = scorer.score(model, tok, suite)
    written = {k: v.clone() for k, v in model.state_dict().items()}
    print(f"  fitness of the written model on suite {suite.name}: {on_disk.fitness:.4f}")

    engine = MergeEngine(first)
    print(f"merge engine: cache {engine.placement}, built in {engine.build_seconds:.2f} s; recipes applied in place:")
    for weight, attention, density in ((1.0, 1.0, 0.9), (0.8, 1.2, 0.5), (1.2, 0.6, 0.3), (0.5, 0.8, 0.7)):
        seconds = engine.apply(recipe(weight, attention, density), model)
        r = scorer.score(model, tok, suite)
        per_task = ", ".join(f"{k} {v.value:.2f}" for k, v in r.tasks.items())
        print(f"  weight {weight}, attention {attention}, density {density}: apply {seconds * 1e3:.0f} ms, "
              f"fitness {r.fitness:.4f} ({per_task}) in {r.seconds * 1e3:.0f} ms")
    same = all(torch.equal(v, written[k]) for k, v in model.state_dict().items())
    same_fitness = r.fitness == on_disk.fitness
    print(f"the last in-place recipe equals the written one: weights {same}, fitness {same_fitness}")
    return 0 if same and same_fitness else 1


if __name__ == "__main__":
    sys.exit(main())
