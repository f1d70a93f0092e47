"""Time per candidate of the fitness backends on a zoo model and the same items.

Peers, in the same process: lm-eval's ``simple_evaluate`` as a user would call it on a live model
(with the same explicit ``samples``), and our wrapped lm-eval backend (model wrapped once, task
dict built once). Each "candidate" is a new set of weights written in place into the live model.
Prints seconds per candidate, the ratios, and whether the metrics are identical.

    python benchmarks/fitness_speed.py [--zoo runs/zoo-tiny] [--candidates 5]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--zoo", default=str(ROOT / "runs" / "zoo-tiny"))
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--suite", default="zoo")
    ap.add_argument("--candidates", type=int, default=5)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.fitness.base import get_backend
    from evomerge.fitness.suite import Suite
    from evomerge.fitness.lmeval import _task_name, task_config
    from evomerge.zoo import load_or_build_any

    zoo, _ = load_or_build_any(args.zoo, args.size)
    suite = Suite.load(args.suite)
    tok = AutoTokenizer.from_pretrained(zoo["base"])
    model = AutoModelForCausalLM.from_pretrained(zoo["base"]).eval()
    states = [AutoModelForCausalLM.from_pretrained(p).state_dict() for p in zoo["experts"].values()]
    base = {k: v.clone() for k, v in model.state_dict().items()}

    def candidate(i: int) -> None:  # a new merge in place: base + w * (expert - base), w varying
        w = 0.4 + 0.15 * i
        with torch.no_grad():
            for k, p in model.state_dict().items():
                p.copy_(base[k] + w * sum(s[k] - base[k] for s in states))

    configs = [task_config(t) for t in suite.tasks]
    samples = {_task_name(t): [it.index for it in t.items("search")] for t in suite.tasks}

    def run_simple_evaluate():
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=32)
        out = simple_evaluate(model=lm, tasks=configs, samples=samples, bootstrap_iters=0, log_samples=False)
        return {t.name: out["results"][_task_name(t)] for t in suite.tasks}

    native, wrapped = get_backend("native"), get_backend("lm-eval")
    timings = {"native": [], "lm-eval backend": [], "simple_evaluate": []}
    identical = True
    for i in range(args.candidates + 1):  # the first candidate warms every path up; not timed
        candidate(i)
        t = time.perf_counter()
        a = native.score(model, tok, suite)
        t_native = time.perf_counter() - t
        t = time.perf_counter()
        b = wrapped.score(model, tok, suite)
        t_wrapped = time.perf_counter() - t
        t = time.perf_counter()
        c = run_simple_evaluate()
        t_simple = time.perf_counter() - t
        for task in suite.tasks:
            metric = task.spec.metric
            key = next(k for k in c[task.name] if k.startswith(metric + ","))
            same = a.tasks[task.name].value == b.tasks[task.name].value == c[task.name][key]
            identical &= same
        print(f"candidate {i}: fitness native {a.fitness:.4f} lm-eval {b.fitness:.4f}; "
              f"native {t_native:.3f} s, lm-eval backend {t_wrapped:.3f} s, simple_evaluate {t_simple:.3f} s"
              + ("" if i else " (warm-up, not counted)"), flush=True)
        if i:
            timings["native"].append(t_native)
            timings["lm-eval backend"].append(t_wrapped)
            timings["simple_evaluate"].append(t_simple)
    med = {k: statistics.median(v) for k, v in timings.items()}
    n_items = sum(len(t.items("search")) for t in suite.tasks)
    print(f"\nsuite {suite.name}: {n_items} items per candidate, zoo {zoo['size']}, torch threads {torch.get_num_threads()}")
    for k, v in med.items():
        print(f"  {k:16s} {v:.3f} s per candidate (median of {args.candidates})")
    print(f"  native is {med['simple_evaluate'] / med['native']:.1f}x faster than simple_evaluate (goal >= 3x), "
          f"{med['lm-eval backend'] / med['native']:.1f}x faster than our lm-eval backend")
    print(f"  metrics identical across the three: {identical}")


if __name__ == "__main__":
    main()
