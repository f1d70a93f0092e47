"""What defines a candidate's score, as digests stored with the run: a resumed or joined run whose
inputs changed is refused, naming what changed, instead of mixing incomparable candidates.

- each task of the suite: its settings (metric, weight, n, seed, ...), its items (prompts,
  answers, choices; both splits) and the search subsample, and the suite's objectives; for a
  task of the user's own lm-eval YAML, each file that defines it (YAML, modules, data);
- each model: the content of every weight file, of ``config.json``, ``generation_config.json``
  and the tokenizer's files. Weight files are hashed once: the hashes are kept in the run
  directory (``hashes.json``), keyed by each file's size, modification time and inode;
- every config key, one level deep (``driver.sigma0``), but those that may change on resume
  (:data:`RESUMABLE`).

Fingerprints of older runs (no ``version``) hashed only the weight files' headers and a few
config keys: they are compared as they were computed, and replaced by a full one on resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from evomerge.config import RunConfig
    from evomerge.fitness.suite import Suite

VERSION = 2
RESUMABLE = ("name", "budget", "heartbeat", "device", "cache", "references", "fail_fast", "report_to")  # may change on resume
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")
HASHES_FILE = "hashes.json"


def digest(value: Any) -> str:
    """16 hex digits of the sha256 of ``value`` as sorted JSON."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


class FileHashes:
    """sha256 of files, cached in a JSON file by (size, mtime, inode): a weight file is read once
    per run, not at every resume."""

    def __init__(self, path: Optional[Path]):
        self.path = path
        self.known: dict[str, dict] = {}
        if path is not None and path.is_file():
            try:
                loaded = json.loads(path.read_text())
                self.known = loaded if isinstance(loaded, dict) else {}
            except ValueError:
                self.known = {}  # a damaged cache is only a cache: hash again
        self.changed = False

    def sha256(self, f: Path) -> str:
        st = f.stat()
        key, ident = str(f.resolve()), [st.st_size, st.st_mtime_ns, st.st_ino]
        hit = self.known.get(key)
        if isinstance(hit, dict) and hit.get("id") == ident and isinstance(hit.get("sha256"), str):
            return hit["sha256"]
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 23), b""):
                h.update(block)
        self.known[key] = {"id": ident, "sha256": h.hexdigest()}
        self.changed = True
        return h.hexdigest()

    def save(self) -> None:
        if self.path is None or not self.changed:
            return
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.known, indent=1))
        tmp.replace(self.path)
        self.changed = False


def _model_root(ref: str) -> Path:
    from evomerge.merging.headers import resolve_model_path

    return resolve_model_path(ref, allow_download=False)


def _weight_files(root: Path) -> list[Path]:
    return sorted(root.glob("*.safetensors")) or sorted(root.glob("*.bin"))


def model_files(ref: str, hashes: FileHashes) -> dict[str, str]:
    """Digest of each file of a model that changes its outputs: weights, config, tokenizer."""
    from evomerge.merging.headers import TOKENIZER_FILES

    root = _model_root(ref)
    files = _weight_files(root) + [root / n for n in (*MODEL_FILES, *TOKENIZER_FILES) if (root / n).is_file()]
    return {f.name: hashes.sha256(f)[:16] for f in files}


def _legacy_model_digest(ref: str) -> str:
    """The model digest of fingerprints without a version: the weight files' headers."""
    parts = []
    for f in _weight_files(_model_root(ref)):
        with open(f, "rb") as fh:
            if f.suffix == ".safetensors":
                head = fh.read(8)
                n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
                parts.append([f.name, hashlib.sha256(fh.read(min(n, 100_000_000))).hexdigest()])
            else:
                parts.append([f.name, f.stat().st_size])
    return digest(parts)


def config_digests(cfg: "RunConfig") -> dict[str, str]:
    """A digest per config key, one level deep (``driver.sigma0``), but the resumable ones and
    the suite's name or path (its content is fingerprinted on its own)."""
    out = {}
    for key, value in cfg.to_dict().items():
        if key in RESUMABLE:
            continue
        if isinstance(value, dict) and value:
            for sub, v in value.items():
                if (key, sub) != ("fitness", "suite"):
                    out[f"{key}.{sub}"] = digest(v)
        else:
            out[key] = digest(value)
    return out


def fingerprint(cfg: "RunConfig", suite: "Suite", hashes: FileHashes) -> dict:
    tasks = {}
    for t in suite.tasks:
        items = ([[it.id, it.prompt, it.answer, list(it.choices or ())] for it in t.all_items()]
                 + [it.id for it in t.items("search")] if t.local else [])
        tasks[t.name] = digest([t.spec.model_dump(mode="json", exclude={"data"}), items])
    tasks["(objectives)"] = digest(suite.spec.model_dump(mode="json").get("objectives"))
    tasks |= _included_files(suite, hashes)
    models = [m for m in [cfg.models.base, *cfg.models.experts] if m]
    return {"version": VERSION, "suite": tasks, "models": {m: model_files(m, hashes) for m in models},
            "config": config_digests(cfg)}


def _included_files(suite: "Suite", hashes: FileHashes) -> dict[str, str]:
    """The content of each file defining a task of the suite's own lm-eval YAML, keyed
    ``task (file)``: an edited task YAML, template, function module or data file is named."""
    included = [t for t in suite.tasks if t.include is not None]
    if not included:
        return {}
    from evomerge.fitness.lmeval_tasks import Resolver, definition_files

    resolver = Resolver()
    return {f"{t.name} ({label})": hashes.sha256(f)[:16]
            for t in included for label, f in definition_files(t, resolver).items()}


LEGACY_CONFIG_KEYS = ("merge_method", "fixed_parameters", "default_parameters", "dtype", "seed", "space")


def _legacy(cfg: "RunConfig", now: dict) -> dict:
    """The current inputs as a fingerprint without a version computed them."""
    config = cfg.to_dict()
    return {"suite": now["suite"], "models": {m: _legacy_model_digest(m) for m in now["models"]},
            "config": {k: digest(config.get(k)) for k in LEGACY_CONFIG_KEYS}
            | {"fitness": digest({k: v for k, v in config.get("fitness", {}).items() if k != "suite"})}}


def compare(stored: Optional[dict], cfg: "RunConfig", now: dict) -> list[str]:
    """What changed (in words) between the fingerprint a run stored and ``now``, its inputs'
    :func:`fingerprint` now; an older run's is compared as it was computed."""
    if stored is None:
        return []
    return changes(stored, now if "version" in stored else _legacy(cfg, now))


def changes(stored: dict, now: dict) -> list[str]:
    """What differs between two fingerprints of the same version, in words."""
    out = []
    for part, template in (("suite", "suite task {}"), ("config", "config key {}")):
        out += _differences(stored.get(part, {}), now.get(part, {}), template)
    old_models, new_models = stored.get("models", {}), now.get("models", {})
    for m in sorted(set(old_models) | set(new_models)):
        old, new = old_models.get(m), new_models.get(m)
        if old is None or new is None:
            out.append(f"model {m} ({'added' if old is None else 'removed'})")
        elif isinstance(old, dict) and isinstance(new, dict):
            out += _differences(old, new, f"model {m}: file {{}}")
        elif old != new:
            out.append(f"model {m}")
    return out


def _differences(old: dict, new: dict, template: str) -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            state = " (added)" if key not in old else " (removed)" if key not in new else ""
            out.append(template.format(key) + state)
    return out
