"""The README's main command (until the search arrives): merge the bundled tiny model family.

Builds (once, cached under runs/demo/) a tiny Llama base and three experts, merges them with a
TIES recipe through ``evomerge merge``, then applies several recipes in place into a live model
with the merge engine, checking that the one equal to the disk recipe gives the same tensors.

    python -m evomerge.demo [--out runs/demo]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from .engine import MergeEngine
from .merge import merge_to_disk
from .recipe import Recipe, build, gradient, per_kind
from .tiny import TinySpec, build_family


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/demo")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    out = Path(args.out)
    zoo = out / "zoo"
    if (zoo / "family.json").exists():
        fam = json.loads((zoo / "family.json").read_text())
        print(f"model family: {zoo} (cached)")
    else:
        t = time.perf_counter()
        fam = build_family(zoo, TinySpec(dtype=torch.bfloat16), n_experts=3, seed=0)
        print(f"model family: built {zoo} in {time.perf_counter() - t:.1f} s")

    # a recipe as the search builds it: per layer for attention, per kind for the rest
    weight = per_kind({"attention": gradient([0.2, 0.4, 0.6, 0.8]), "mlp": 0.5, "embed": 0.3}, default=0.4)
    recipe = build("ties", fam["base"], {e: {"weight": weight, "density": 0.5} for e in fam["experts"]},
                   dtype="bfloat16")
    (out / "recipe.yaml").write_text(recipe.to_yaml())
    t = time.perf_counter()
    merged = merge_to_disk(Recipe.from_yaml(out / "recipe.yaml"), out / "merged", overwrite=True)
    print(f"evomerge merge {out / 'recipe.yaml'} -> {merged} in {time.perf_counter() - t:.2f} s")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(merged)
    tok = AutoTokenizer.from_pretrained(merged)
    engine = MergeEngine(recipe)
    print(f"merge engine: cache {engine.placement}, {engine.cache_bytes / 2**20:.1f} MiB, "
          f"built in {engine.build_seconds:.2f} s")
    prompt = tok("w1 w2 w3", return_tensors="pt")
    written = dict(AutoModelForCausalLM.from_pretrained(merged).state_dict())
    for density in (0.2, 0.9, 0.5):
        r = build("ties", fam["base"], {e: {"weight": weight, "density": density} for e in fam["experts"]},
                  dtype="bfloat16")
        seconds = engine.apply(r, model)
        with torch.no_grad():
            nll = model(**prompt, labels=prompt["input_ids"]).loss.item()
        print(f"  in-place apply, density {density}: {seconds * 1e3:.1f} ms, loss on the prompt {nll:.4f}")
    same = all(torch.equal(v, written[k]) for k, v in model.state_dict().items())
    print(f"in-place apply of the disk recipe equals the written model: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
