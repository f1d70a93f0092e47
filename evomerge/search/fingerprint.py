"""What defines a candidate's score, as digests stored with the run: a resumed or joined run whose
inputs changed is refused, naming what changed, instead of mixing incomparable candidates.

- each task of the suite: its settings (metric, weight, n, seed, ...), its items (prompts,
  answers, choices; both splits) and the search subsample, and the suite's objectives;
- each model: its weight files' headers (tensor names, dtypes, shapes, offsets);
- the merge: method, fixed and default parameters, dtype, seed; the search space; the fitness
  backend and its options.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from evomerge.config import RunConfig
    from evomerge.fitness.suite import Suite

MERGE_KEYS = ("merge_method", "fixed_parameters", "default_parameters", "dtype", "seed", "space")


def digest(value: Any) -> str:
    """16 hex digits of the sha256 of ``value`` as sorted JSON."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _model_digest(ref: str) -> str:
    from evomerge.merging.model_io import resolve_model_path

    root = resolve_model_path(ref, allow_download=False)
    parts = []
    for f in sorted(root.glob("*.safetensors")) or sorted(root.glob("*.bin")):
        with open(f, "rb") as fh:
            if f.suffix == ".safetensors":
                head = fh.read(8)
                n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
                parts.append([f.name, hashlib.sha256(fh.read(min(n, 100_000_000))).hexdigest()])
            else:
                parts.append([f.name, f.stat().st_size])
    return digest(parts)


def fingerprint(cfg: "RunConfig", suite: "Suite") -> dict[str, dict[str, str]]:
    tasks = {}
    for t in suite.tasks:
        items = ([[it.id, it.prompt, it.answer, list(it.choices or ())] for it in t.all_items()]
                 + [it.id for it in t.items("search")] if t.local else [])
        tasks[t.name] = digest([t.spec.model_dump(mode="json", exclude={"data"}), items])
    tasks["(objectives)"] = digest(suite.spec.model_dump(mode="json").get("objectives"))
    models = [m for m in [cfg.models.base, *cfg.models.experts] if m]
    config = cfg.to_dict()
    return {
        "suite": tasks,
        "models": {m: _model_digest(m) for m in models},
        "config": {k: digest(config.get(k)) for k in MERGE_KEYS}
        | {"fitness": digest({k: v for k, v in config.get("fitness", {}).items() if k != "suite"})},
    }


def changes(stored: dict, now: dict) -> list[str]:
    """What differs between two fingerprints, in words."""
    words = {"suite": "suite task {}", "models": "model {}", "config": "config key {}"}
    out = []
    for part, template in words.items():
        old, new = stored.get(part, {}), now.get(part, {})
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                if key not in old or key not in new:
                    state = "added" if key not in old else "removed"
                    out.append(template.format(key) + f" ({state})")
                else:
                    out.append(template.format(key))
    return out
