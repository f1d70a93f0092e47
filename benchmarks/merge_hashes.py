"""Hashes of the tensors that fixed recipes merge to, every method, by the merge to disk and by the
in-place engine: run it on two checkouts and compare the JSON to show that a change left merges
bit-identical.

    python benchmarks/merge_hashes.py CHECKOUT [FAMILY_CACHE] > hashes.json

CHECKOUT is the source tree whose evomerge is imported; FAMILY_CACHE (default runs/hash_families)
keeps the three tiny model families between runs, so both sides merge the same files.
"""
import hashlib
import json
import sys
from pathlib import Path
import torch
sys.path.insert(0, sys.argv[1])
try:
    from evomerge.merging.engine import MergeEngine
    from evomerge.merging.to_disk import merged_tensors
    from evomerge.merging.recipe import Recipe
except ImportError:
    from evomerge.engine import MergeEngine
    from evomerge.merge import merged_tensors
    from evomerge.recipe import Recipe
from evomerge.tiny import TinySpec, build_family

root = Path(sys.argv[2] if len(sys.argv) > 2 else "runs/hash_families")
out = {}
for dt, scale, hidden in ((torch.float32, 0.02, 256), (torch.bfloat16, 0.02, 256), (torch.bfloat16, 0.5, 128)):
    name = f"{dt}-{scale}-{hidden}"
    d = root / name
    spec = TinySpec(dtype=dt, hidden_size=hidden, intermediate_size=hidden * 3)
    fam = json.loads((d / "family.json").read_text()) if (d / "family.json").exists() else build_family(d, spec=spec, scale=scale)
    M = {"task_arithmetic": {}, "ties": {"density": 0.4}, "dare_ties": {"density": 0.4}, "dare_linear": {"density": 0.7},
         "breadcrumbs": {"density": 0.5, "gamma": 0.05}, "breadcrumbs_ties": {"density": 0.3},
         "della": {"density": 0.5, "epsilon": 0.1}, "della_linear": {"density": 0.6}, "linear": {}, "slerp": {}}
    for method, params in M.items():
        for variant in (0, 1):
            if method == "slerp":
                r = {"merge_method": "slerp", "base_model": fam["base"], "random_seed": 3,
                     "models": [{"model": fam["base"]}, {"model": fam["experts"][0]}], "parameters": {"t": [0.2, 0.7 + 0.1 * variant]}}
            elif method == "linear":
                r = {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": w + variant}} for m, w in zip(fam["experts"], (0.2, 0.5, 0.3))]}
            else:
                r = {"merge_method": method, "base_model": fam["base"], "random_seed": 3 + variant,
                     "parameters": {"lambda": 1.0 + 0.2 * variant},
                     "models": [{"model": e, "parameters": {"weight": [{"filter": "self_attn", "value": [0.3, 0.9]}, {"value": 0.6}] if i == 0 else -0.2 + 0.5 * variant, **params}} for i, e in enumerate(fam["experts"])]}
            rec = Recipe.from_dict(r)
            h = hashlib.sha256()
            for n, t in merged_tensors(rec):
                h.update(n.encode()); h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
            eng = MergeEngine(rec)
            h2 = hashlib.sha256()
            for n, t in eng.merged(rec):
                h2.update(n.encode()); h2.update(t.contiguous().view(torch.uint8).numpy().tobytes())
            out[f"{name}/{method}/{variant}"] = (h.hexdigest()[:16], h2.hexdigest()[:16])
json.dump(out, sys.stdout, indent=1, sort_keys=True)
