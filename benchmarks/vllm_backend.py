"""The vllm fitness backend against the native scorer and the lm-eval backend, per candidate, on the
trained zoo (the small zoo: head_dim 32, which vLLM's CPU attention needs).

Each backend runs in a process of its own (so its peak RSS is its own): it starts (loads the model,
or starts the vLLM engine), then scores N candidates, each a new set of weights
(each expert alone, then ``base + w * sum(expert - base)`` at growing w) put in place: copied into the live model for native
and lm-eval, streamed into the running engine for vllm. Prints start-up, seconds per candidate,
the total with and without start-up, peak RSS, the ratios, and whether every item's correctness
and generated text agree across the backends.

    python benchmarks/vllm_backend.py [--zoo runs/zoo-small] [--candidates 5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BACKENDS = ("native", "lm-eval", "vllm")


def worker(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.fitness.base import get_backend
    from evomerge.fitness.suite import Suite
    from evomerge.zoo import load_or_build_any

    zoo, _ = load_or_build_any(args.zoo, args.size)
    suite = Suite.load(args.suite)
    tok = AutoTokenizer.from_pretrained(zoo["base"])
    base = AutoModelForCausalLM.from_pretrained(zoo["base"]).state_dict()
    deltas = [{k: v - base[k] for k, v in AutoModelForCausalLM.from_pretrained(p).state_dict().items()}
              for p in zoo["experts"].values()]

    def weights(i: int):  # each expert alone, then task arithmetic over all three at growing weights
        ws = [float(j == i) for j in range(len(deltas))] if i < len(deltas) else [0.2 + 0.1 * i] * len(deltas)
        for k, v in base.items():
            yield k, v + sum(w * d[k] for w, d in zip(ws, deltas))

    t0 = time.perf_counter()
    backend = get_backend(args.worker, model_dir=zoo["base"])
    streams = hasattr(backend, "load_weights")
    model = None if streams else AutoModelForCausalLM.from_pretrained(zoo["base"]).eval()
    seconds, items = [], []
    for i in range(args.candidates + 1):
        t = time.perf_counter()
        if streams:
            backend.load_weights(weights(i), tok)
        else:
            with torch.no_grad():
                live = model.state_dict()
                for k, v in weights(i):
                    live[k].copy_(v)
        result = backend.score(None if streams else model, tok, suite)
        seconds.append(time.perf_counter() - t)
        items.append({f"{name}/{it.id}": [it.correct, it.output] for name, r in result.tasks.items() for it in r.items})
        if i == 0:
            seconds.clear()  # the first candidate warms up; it counts as start-up
    startup = time.perf_counter() - t0 - sum(seconds)  # start-up plus the first (warm-up) candidate
    print(json.dumps({"startup": startup, "seconds": seconds, "items": items,
                      "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "values": {n: r.value for n, r in result.tasks.items()}}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--zoo", default=str(ROOT / "runs" / "zoo-small"))
    ap.add_argument("--size", default="small")
    ap.add_argument("--suite", default="zoo")
    ap.add_argument("--candidates", type=int, default=5)
    ap.add_argument("--worker", choices=BACKENDS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    runs = {}
    for name in BACKENDS:
        cmd = [sys.executable, __file__, "--worker", name, "--zoo", args.zoo, "--size", args.size,
               "--suite", args.suite, "--candidates", str(args.candidates)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
        runs[name] = json.loads(out.stdout.strip().splitlines()[-1])
    n = args.candidates
    print(f"{n} candidates on {args.zoo} (suite {args.suite}), {torch_threads()} threads; seconds")
    print(f"{'backend':10s} {'start-up':>9s} {'per cand.':>9s} {'total excl.':>11s} {'total incl.':>11s} "
          f"{'peak RSS MiB':>12s}")
    for name, r in runs.items():
        per = statistics.median(r["seconds"])
        print(f"{name:10s} {r['startup']:9.2f} {per:9.3f} {sum(r['seconds']):11.2f} "
              f"{sum(r['seconds']) + r['startup']:11.2f} {r['rss_mib']:12.0f}")
    v = runs["vllm"]
    for peer in ("native", "lm-eval"):
        p = runs[peer]
        print(f"vllm / {peer}: per candidate {statistics.median(v['seconds']) / statistics.median(p['seconds']):.2f}x, "
              f"with start-up {(sum(v['seconds']) + v['startup']) / (sum(p['seconds']) + p['startup']):.2f}x, "
              f"peak RSS {v['rss_mib'] / p['rss_mib']:.2f}x")
    same = all(runs[b]["items"] == runs["native"]["items"] for b in BACKENDS)
    differ = {b: sum(x != y for c1, c2 in zip(runs[b]["items"], runs["native"]["items"]) for k in c1
                     for x, y in [(c1[k], c2[k])]) for b in BACKENDS}
    right = sum(ok for c in runs["native"]["items"] for ok, _ in c.values())
    total = sum(len(c) for c in runs["native"]["items"])
    print(f"every item's correctness and generated text equal across backends: {same} (items differing from "
          f"native: {differ}; {right} of {total} item scorings correct)")


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
