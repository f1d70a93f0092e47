"""Start-up cost of the resume fingerprint: hashing every weight file of a run's models on its
first start, against a resume that finds the hashes cached in the run directory (hashes.json).

    python benchmarks/fingerprint_cost.py [--zoos runs/zoo-small runs/zoo-smollm2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SUITES = {"smollm2": "smollm2-demo"}  # a zoo's size -> its search suite (default zoo-smooth)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoos", nargs="+", default=["runs/zoo-small", "runs/zoo-smollm2"],
                    help="zoo directories (built ones; a missing one is skipped and said)")
    args = ap.parse_args()
    from evomerge.config import RunConfig
    from evomerge.fitness.suite import Suite
    from evomerge.search.fingerprint import FileHashes, fingerprint
    from evomerge.zoo import family, load_zoo

    for root in map(Path, args.zoos):
        if not (root / "zoo.json").is_file():
            print(f"{root}: no zoo here (build it with 'evomerge zoo build'); skipped")
            continue
        zoo = load_zoo(root)
        suite = SUITES.get(zoo["size"], "zoo-smooth")
        cfg = RunConfig.from_dict({"models": family(zoo),
                                   "merge_method": "ties", "fitness": {"suite": suite},
                                   "budget": {"max_candidates": 1}})
        models = [cfg.models.base, *cfg.models.experts]
        size = sum(f.stat().st_size for m in models for f in Path(m).glob("*.safetensors"))
        cache = Path(tempfile.mkdtemp(prefix="evomerge-fp-")) / "hashes.json"
        times = []
        for _ in range(2):
            hashes = FileHashes(cache)
            t0 = time.perf_counter()
            fingerprint(cfg, Suite.resolve(suite), hashes)
            hashes.save()
            times.append(time.perf_counter() - t0)
        print(f"{root} ({len(models)} models, {size / 2**30:.2f} GiB of weights): first start {times[0]:.2f} s, "
              f"resume {times[1]:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
