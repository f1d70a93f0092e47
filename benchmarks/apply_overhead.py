"""Host work per tensor of the in-place apply: a random Llama of many small tensors (hidden 64, 32
layers: 291 tensors of at most 16K elements), where the kernels take almost no time and what is
left is the Python and the small tensor operations around them. This is what bounds a GPU apply
of a large model when it is host-bound.

With ``--zoo DIR`` it times a zoo's base and experts instead (``zoo.json``: the real zoo of
SmolLM2-135M, whose LoRA experts leave embeddings and norms unchanged).

Prints, per method, the median apply time over 10 recipes after 2 warm-ups, and its share per
tensor. One torch thread.

    python benchmarks/apply_overhead.py [--methods ties,dare_ties,breadcrumbs_ties,task_arithmetic]
        [--dtype bfloat16|float32] [--cache runs/bench_small_tensors] [--zoo runs/zoo-smollm2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from merge_speed import recipe  # noqa: E402

from evomerge.tiny import TinySpec, build_family  # noqa: E402
from evomerge.zoo import family, load_zoo  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="ties,dare_ties,breadcrumbs_ties,task_arithmetic")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--cache", default=str(ROOT / "runs" / "bench_small_tensors"))
    ap.add_argument("--zoo", help="a zoo directory (zoo.json) to time instead of the random model")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    from evomerge.merging.engine import MergeEngine
    from evomerge.merging.recipe import Recipe

    dtype = getattr(torch, args.dtype)
    if args.zoo:
        zoo = load_zoo(args.zoo)
        fam = family(zoo)
        what = f"zoo {args.zoo}"
    else:
        root = Path(args.cache) / args.dtype
        marker = root / "family.json"  # written once the whole family is
        if not marker.exists():
            spec = TinySpec(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=32,
                            num_attention_heads=4, num_key_value_heads=4, dtype=dtype)
            marker.write_text(json.dumps(build_family(root, spec)))
        fam = json.loads(marker.read_text())
        what = "random Llama"
    model = AutoModelForCausalLM.from_pretrained(fam["base"], dtype=dtype)
    tensors = len(model.state_dict())
    print(f"{what}, {tensors} tensors, {args.dtype}, {len(fam['experts'])} experts; torch {torch.__version__}, "
          "one thread")
    for method in args.methods.split(","):
        def make(i: int) -> Recipe:
            r = recipe(method, fam, density=0.3 + 0.02 * i, weights=(0.4 + 0.01 * i, 0.3, 0.2)[:len(fam["experts"])])
            r["dtype"] = args.dtype
            return Recipe.from_dict(r)

        engine = MergeEngine(make(0), device="cpu")
        times = []
        for i in range(12):
            t = time.perf_counter()
            engine.apply(make(i), model)
            times.append(time.perf_counter() - t)
        apply_s = statistics.median(times[2:])
        print(f"  {method:18s} apply {apply_s * 1e3:7.1f} ms: {apply_s / tensors * 1e6:5.0f} us per tensor")
        del engine


if __name__ == "__main__":
    main()
