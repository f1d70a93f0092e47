"""The same zoo whatever the CPU: builds a zoo under the float settings of other machines and compares the weights.

Each build runs ``evomerge zoo build`` with ``OMP_NUM_THREADS`` 1 or 2, and torch's kernels left to
the CPU (``native``), forced to AVX2 (``avx2``: ``ATEN_CPU_CAPABILITY=avx2`` and
``MKL_ENABLE_INSTRUCTIONS=AVX2``, an AVX2-only CPU such as an AMD EPYC of this kind) or to the
plain ones (``default``). It prints, per size, each build's weights digest, expert attempt,
whether the design goals hold and its time. The zoo trains under pinned numerics, so every row of
a size should show one digest.

    python benchmarks/zoo_numerics.py [--sizes tiny small] [--seed 0] [--threads 1 2]
        [--kernels native avx2 default] [--jobs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

KERNELS = {"native": {}, "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
           "default": {"ATEN_CPU_CAPABILITY": "default"}}


def _build(out: Path, size: str, seed: int, threads: int, kernels: str) -> dict:
    from evomerge.zoo import load_zoo, weights_digest

    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")}
    env |= {"OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"} | KERNELS[kernels]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "evomerge.cli", "zoo", "build", str(out), "--size", size,
                           "--seed", str(seed)], env=env, capture_output=True, text=True)
    row = {"size": size, "threads": threads, "kernels": kernels, "seconds": round(time.perf_counter() - t0)}
    if not (out / "zoo.json").exists():
        return row | {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    zoo = load_zoo(out)
    return row | {"digest": weights_digest(zoo), "attempt": zoo["expert_attempt"],
                  "goals_met": zoo["report"]["goals_met"], "built_on": zoo["built_on"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="OMP_NUM_THREADS values")
    ap.add_argument("--kernels", nargs="+", choices=list(KERNELS), default=list(KERNELS))
    ap.add_argument("--jobs", type=int, default=1, help="builds at once (each trains on one thread)")
    ap.add_argument("--json", default=str(ROOT / "runs" / "bench" / "zoo_numerics.json"))
    args = ap.parse_args()

    from evomerge import machine

    work = Path(tempfile.mkdtemp(prefix="evomerge-zoo-numerics-"))
    plan = [(size, threads, kernels) for size in args.sizes for threads in args.threads for kernels in args.kernels]
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda p: _build(work / "-".join(map(str, p)), p[0], args.seed, p[1], p[2]), plan))
    print(f"machine: {machine.describe()}; zoo seed {args.seed}\n")
    print("| size | OMP_NUM_THREADS | kernels | weights digest | expert attempt | design goals | seconds |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['threads']} | {r['kernels']} | {r.get('digest', r.get('error'))} | "
              f"{r.get('attempt', '-')} | {'met' if r.get('goals_met') else 'missed'} | {r['seconds']} |")
    for size in args.sizes:
        digests = {r.get("digest") for r in rows if r["size"] == size}
        print(f"{size}: {'one digest in every setting' if len(digests) == 1 else f'{len(digests)} different digests'}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"machine": machine.describe(), "rows": rows}, indent=2))
    return 0 if all(len({r.get("digest") for r in rows if r["size"] == s}) == 1 for s in args.sizes) else 1


if __name__ == "__main__":
    sys.exit(main())
