"""What a model directory is, read without torch: where a reference resolves to (a directory or a
Hugging Face hub snapshot), its config.json and its tensor names from the safetensors index or the
files' headers. The search space, ``evomerge status`` and the run's checks need no more; reading
the tensors themselves is :class:`evomerge.merging.model_io.ModelFiles`."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Optional

from evomerge.errors import ModelError, first_line

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json", "spiece.model")


def hub_ref(ref: str) -> Optional[tuple[str, Optional[str]]]:
    """(repo id, revision or None) of a Hugging Face hub reference, ``org/name`` or
    ``org/name@revision`` (a branch, tag or commit); None for anything else."""
    repo, at, revision = ref.partition("@")
    if repo.count("/") != 1 or ref.startswith((".", "/", "~")) or (at and not revision):
        return None
    return repo, revision or None


def resolve_model_path(ref: str, *, allow_download: bool = True) -> Path:
    """A local directory as is; otherwise a Hugging Face hub reference (:func:`hub_ref`): its
    snapshot in the local cache, fetched first (weights as safetensors) unless ``allow_download``
    is off or ``HF_HUB_OFFLINE`` is set. The snapshot's directory is named by its commit."""
    p = Path(ref).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise ModelError(f"model {ref}: not a directory")
    hub = hub_ref(ref)
    if hub is None:
        raise ModelError(f"model {ref}: no such directory")
    offline_env = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    offline = offline_env or not allow_download
    try:
        from huggingface_hub import snapshot_download
        path = snapshot_download(hub[0], revision=hub[1], local_files_only=offline,
                                 allow_patterns=["*.json", "*.safetensors", *TOKENIZER_FILES])
    except Exception as e:  # not cached, unknown repo or revision, network failure
        if offline:
            raise ModelError(f"model {ref}: not a local directory, and not in the local Hugging Face cache"
                             + (" (HF_HUB_OFFLINE is set: nothing is fetched)" if offline_env else "")) from None
        raise ModelError(f"model {ref}: not a local directory, and fetching it from the hub failed: "
                         f"{first_line(e)}") from None
    return Path(path)


def hub_commits(refs: list[str]) -> dict[str, str]:
    """The commit each hub reference among ``refs`` resolves to in the local cache."""
    return {ref: resolve_model_path(ref, allow_download=False).name for ref in refs if hub_ref(ref)}


def read_config(path: Path, ref: str) -> dict:
    """A model directory's config.json; errors name the model and the file."""
    f = path / "config.json"
    try:
        return json.loads(f.read_text())
    except FileNotFoundError:
        raise ModelError(f"model {ref}: {f} is missing") from None
    except json.JSONDecodeError as e:
        raise ModelError(f"model {ref}: {f} is not valid JSON: {e}") from None


def safetensors_names(file: Path, ref: str) -> list[str]:
    """The tensor names in a safetensors file's header (8 bytes of length, then JSON)."""
    try:
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100 << 20:
                raise ValueError(f"a header of {length} bytes")
            header = json.loads(f.read(length))
        if not isinstance(header, dict):
            raise ValueError("the header is not a mapping")
    except (OSError, ValueError, struct.error) as e:
        raise ModelError(f"model {ref}: cannot read {file}: not a safetensors file ({first_line(e)})") from None
    return sorted(name for name in header if name != "__metadata__")  # as safetensors lists them


class ModelHeader:
    """One model directory's config and tensor names, without reading a tensor or loading torch
    (pickle checkpoints, allowed with ``allow_pickle``, are the exception: their names are read by
    loading them)."""

    def __init__(self, ref: str, *, allow_pickle: bool = False, allow_download: bool = True):
        self.ref = ref
        self.path = resolve_model_path(ref, allow_download=allow_download)
        self.config = read_config(self.path, ref)
        self.weight_map = self._index(allow_pickle)

    def _index(self, allow_pickle: bool) -> dict[str, str]:
        p = self.path
        for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                                   ("pytorch_model.bin.index.json", "pytorch_model.bin")):
            pickled = single.endswith(".bin")
            index = p / index_name
            if index.exists() or (p / single).exists():
                if pickled and not allow_pickle:
                    raise ModelError(f"model {self.ref}: only pickle checkpoints ({single}); loading them can run "
                                     f"arbitrary code: convert to safetensors, or pass --allow-pickle")
                if index.exists():
                    try:
                        weight_map = json.loads(index.read_text())["weight_map"]
                    except (json.JSONDecodeError, KeyError) as e:
                        raise ModelError(f"model {self.ref}: {index} is malformed: {e}") from None
                else:
                    weight_map = None
                    files = [single]
                if weight_map is not None:
                    files = sorted(set(weight_map.values()))
                missing = [f for f in files if not (p / f).exists()]
                if missing:
                    raise ModelError(f"model {self.ref}: shard files listed in {index_name} are missing: "
                                     f"{', '.join(missing)}")
                if weight_map is None:
                    weight_map = {n: single for n in self._names_in(single, pickled)}
                return weight_map
        shards = sorted(x.name for x in p.glob("*.safetensors"))
        if shards:
            return {n: f for f in shards for n in self._names_in(f, False)}
        raise ModelError(f"model {self.ref}: no model.safetensors, index or .safetensors files in {p}")

    def _names_in(self, file: str, pickled: bool) -> list[str]:
        if pickled:
            return list(self._pickle(file).keys())
        return safetensors_names(self.path / file, self.ref)

    def _pickle(self, file: str) -> dict:
        import torch

        try:
            return torch.load(self.path / file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise ModelError(f"model {self.ref}: cannot read {self.path / file}: {e}") from None

    def names(self) -> list[str]:
        """Tensor names in the model layout transformers builds (fused MoE experts), else as stored."""
        return list(self.layout_plan or self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in (self.layout_plan or self.weight_map)

    @property
    def conversion_key(self) -> Optional[str]:
        """The key of transformers' conversions for this model (its class or model_type), if any."""
        if not hasattr(self, "_conversion_key"):
            from evomerge.merging.conversion import conversion_key

            self._conversion_key = conversion_key(self.config)
        return self._conversion_key

    @property
    def layout_plan(self):
        """Where each model-layout tensor comes from, for checkpoints transformers fuses; else None."""
        if not hasattr(self, "_layout_plan"):
            self._layout_plan = None
            if any(".experts." in n for n in self.weight_map):  # what transformers fuses: MoE experts
                from evomerge.merging.conversion import plan  # (importing the registry takes a second)

                self._layout_plan = plan(self.conversion_key, list(self.weight_map))
        return self._layout_plan
