"""Reading and writing Hugging Face model directories.

Reading is lazy: tensors come one at a time from memory-mapped safetensors files, so a merge
holds a few tensors per model, never whole models. Writing streams each tensor to its shard as
soon as it is merged (the shard layout is planned from shapes up front) into a hidden temporary
directory that is renamed into place only once complete: a crash or a full disk never leaves a
directory that looks like a finished model.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from safetensors import safe_open

from evomerge.errors import ModelError, first_line
from evomerge.merging.headers import TOKENIZER_FILES, ModelHeader, resolve_model_path
from evomerge.procs import HOST, ended, this_process_tag

log = logging.getLogger(__name__)

_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "float64": torch.float64}



def dtype_from_name(name: str) -> torch.dtype:
    from evomerge.merging.recipe import DTYPES
    return TORCH_DTYPES[DTYPES[name]]


def load_causal_lm(ref: str, *, device: str = "cpu", dtype: Optional[str] = None, trust_remote_code: bool = False,
                   allow_pickle: bool = False):
    """A saved model as transformers loads it, with evomerge's safety defaults: safetensors only
    unless ``allow_pickle``, no remote code unless ``trust_remote_code``. Errors name the model."""
    from transformers import AutoModelForCausalLM

    try:
        path = resolve_model_path(ref)
    except ModelError as e:
        raise ModelError(f"model {ref}: cannot be loaded ({str(e).removeprefix(f'model {ref}: ')})") from None
    if not allow_pickle and not any(path.glob("*.safetensors")) and any(path.glob("*.bin")):
        raise ModelError(f"model {ref}: only pickle checkpoints (.bin); loading them can run arbitrary code: "
                         "convert to safetensors, or pass --allow-pickle")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype_from_name(dtype) if dtype else "auto", trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle else True)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"model {ref}: cannot be loaded ({type(e).__name__}: {first_line(e)})") from None
    return model.to(device).eval()


def all_finite(t: torch.Tensor, chunk: int = 1 << 22) -> bool:
    """Whether no element is NaN or inf. A sum is finite unless one is (or the sum overflows, which
    the exact check then tells apart): one fast reduction, no tensor-sized temporary."""
    if bool(torch.isfinite(t.sum())):
        return True
    return all(bool(torch.isfinite(part).all()) for part in t.reshape(-1).split(chunk))


class ModelFiles(ModelHeader):
    """Lazy access to one model directory's tensors and config."""

    def __init__(self, ref: str, *, allow_pickle: bool = False, allow_download: bool = True):
        self._handles: dict[str, Any] = {}
        self._pickled: dict[str, dict[str, torch.Tensor]] = {}
        super().__init__(ref, allow_pickle=allow_pickle, allow_download=allow_download)

    def _handle(self, file: str) -> Any:
        h = self._handles.get(file)
        if h is None:
            try:
                h = safe_open(str(self.path / file), framework="pt", device="cpu")
            except Exception as e:
                raise ModelError(f"model {self.ref}: cannot read {self.path / file}: {e}") from None
            self._handles[file] = h
        return h

    def _pickle(self, file: str) -> dict[str, torch.Tensor]:
        sd = self._pickled.get(file)
        if sd is None:
            sd = self._pickled[file] = super()._pickle(file)
        return sd

    def _origin(self, name: str):
        """The stored tensor name, or how transformers builds the tensor from stored ones."""
        origin = self.layout_plan.get(name) if self.layout_plan else name
        if origin is None:
            raise ModelError(f"model {self.ref}: has no tensor {name}")
        return origin

    def meta(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype without reading the data."""
        origin = self._origin(name)
        if not isinstance(origin, str):
            from evomerge.merging.conversion import materialize

            def empty(n: str) -> torch.Tensor:
                shape, dtype = self._stored_meta(n)
                return torch.empty(shape, dtype=dtype, device="meta")

            t = materialize(self.conversion_key, name, origin, empty)
            return tuple(t.shape), t.dtype
        return self._stored_meta(origin)

    def _stored_meta(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        file = self.weight_map[name]
        if file.endswith(".bin"):
            t = self._pickle(file)[name]
            return tuple(t.shape), t.dtype
        sl = self._handle(file).get_slice(name)
        return tuple(sl.get_shape()), _ST_NAMES[sl.get_dtype()]

    def get(self, name: str) -> torch.Tensor:
        origin = self._origin(name)
        if isinstance(origin, str):
            return self._stored(origin)
        from evomerge.merging.conversion import materialize

        return materialize(self.conversion_key, name, origin, self._stored)

    def stored_items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every stored tensor under its stored name, one at a time, each checked finite."""
        for name in self.weight_map:
            t = self._stored(name)
            self.check_finite(name, t)
            yield name, t

    def as_stored(self, name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """A model-layout tensor under the checkpoint's own names: itself, or a fused tensor split
        back into the stored tensors transformers built it from (vLLM's loader takes those)."""
        origin = self._origin(name)
        if isinstance(origin, str):
            return [(origin, t)]
        from evomerge.merging.conversion import unfuse

        try:
            return unfuse(self.conversion_key, name, origin, t, lambda n: self._stored_meta(n)[0])
        except KeyError as e:
            raise ModelError(f"model {self.ref}: tensor {name} cannot be split back into its stored tensors "
                             f"({e.args[0]})") from None

    def check_finite(self, name: str, t: torch.Tensor) -> None:
        """Refuse a tensor holding NaN or inf, naming this model and the tensor."""
        if t.is_floating_point() and not all_finite(t):
            raise ModelError(f"model {self.ref}: tensor {name} holds NaN or inf values; a merge of it "
                             "would be meaningless (repair or replace the checkpoint)")

    def _stored(self, name: str) -> torch.Tensor:
        file = self.weight_map.get(name)
        if file is None:
            raise ModelError(f"model {self.ref}: has no tensor {name}")
        if file.endswith(".bin"):
            return self._pickle(file)[name]
        try:
            return self._handle(file).get_tensor(name)
        except Exception as e:
            raise ModelError(f"model {self.ref}: tensor {name} in {file} is unreadable: {first_line(e)}") from None

    @property
    def tied_embeddings(self) -> bool:
        cfg = self.config.get("text_config", self.config)
        return bool(cfg.get("tie_word_embeddings", self.config.get("tie_word_embeddings", True)))

    @property
    def vocab_size(self) -> int | None:
        cfg = self.config.get("text_config", self.config)
        return cfg.get("vocab_size")

    def has_tokenizer(self) -> bool:
        return any((self.path / f).exists() for f in TOKENIZER_FILES)

    def vocabulary(self, trust_remote_code: bool = False) -> dict[str, int]:
        from transformers import AutoTokenizer
        try:
            tok = AutoTokenizer.from_pretrained(str(self.path), trust_remote_code=trust_remote_code)
        except Exception as e:
            raise ModelError(f"model {self.ref}: cannot load its tokenizer: {e}") from None
        return tok.get_vocab()


# -- writing ------------------------------------------------------------------------------------


@dataclass
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


class ShardedWriter:
    """Streams tensors into sharded safetensors files whose headers are planned from the specs.

    Tensors must be written in the order of ``specs``. Call :meth:`finish` to write the index.
    """

    def __init__(self, directory: Path, specs: Sequence[TensorSpec], max_shard_bytes: int = 2 << 30):
        self.dir = directory
        self.specs = list(specs)
        shards: list[list[TensorSpec]] = [[]]
        size = 0
        for s in self.specs:
            if shards[-1] and size + s.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(s)
            size += s.nbytes
        n = len(shards)
        self.shards = [(("model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"), sh)
                       for i, sh in enumerate(shards)]
        self._position = 0  # index into self.specs
        self._file = None
        self._shard = -1
        self._in_shard = 0

    def _open_next(self) -> None:
        if self._file is not None:
            self._file.close()
        self._shard += 1
        self._in_shard = 0
        fname, specs = self.shards[self._shard]
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for s in specs:
            header[s.name] = {"dtype": _ST_DTYPES[s.dtype], "shape": list(s.shape),
                              "data_offsets": [offset, offset + s.nbytes]}
            offset += s.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._file = open(self.dir / fname, "wb")
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self.specs[self._position]
        if name != spec.name:
            raise RuntimeError(f"writer: expected tensor {spec.name}, got {name}")
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise RuntimeError(f"writer: tensor {name} is {tuple(tensor.shape)} {tensor.dtype}, "
                               f"planned {spec.shape} {spec.dtype}")
        if self._file is None or self._in_shard == len(self.shards[self._shard][1]):
            self._open_next()
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._file.write(memoryview(data))
        self._position += 1
        self._in_shard += 1

    def finish(self) -> None:
        if self._position != len(self.specs):
            raise RuntimeError(f"writer: {len(self.specs) - self._position} tensors were never written")
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
        if len(self.shards) > 1:
            index = {"metadata": {"total_size": sum(s.nbytes for s in self.specs)},
                     "weight_map": {s.name: f for f, sh in self.shards for s in sh}}
            (self.dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


OUTPUT_MARKER = ".evomerge-output"  # written into every directory evomerge creates as an output


def is_evomerge_output(path: Path) -> bool:
    """Whether ``path`` is a directory evomerge wrote as an output (merged model, export, zoo): it
    holds the marker; or, written before the marker existed, an export (``report.json`` and
    ``recipe.yaml``) or a zoo (``zoo.json``)."""
    return path.is_dir() and ((path / OUTPUT_MARKER).is_file() or (path / "zoo.json").is_file()
                              or ((path / "report.json").is_file() and (path / "recipe.yaml").is_file()))


def refuse_existing(out: Path, overwrite: bool, protected: Sequence[Path] = ()) -> None:
    """Refuse an output directory that exists and is not empty, unless ``overwrite``; even then
    refuse one that evomerge did not write (:func:`is_evomerge_output`), that is or holds one of
    ``protected`` (the command's inputs), or that holds a run directory."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not overwrite:
        raise ModelError(f"output {out}: exists and is not empty (pass --overwrite to replace it)")
    for p in protected:
        p = Path(p).resolve()
        if out == p or out in p.parents:
            raise ModelError(f"output {out}: {'is' if out == p else 'holds'} {p}, an input of this command; "
                             "--overwrite never replaces an input")
    if not is_evomerge_output(out):
        raise ModelError(f"output {out}: was not written by evomerge (no {OUTPUT_MARKER}); --overwrite only "
                         "replaces evomerge's own outputs: remove it yourself, or pick another directory")
    run = next((f.parent for f in out.rglob("run.json") if (f.parent / "config.yaml").is_file()), None)
    if run is not None:
        raise ModelError(f"output {out}: holds the run directory {run}; --overwrite never replaces a run")


@contextmanager
def atomic_directory(out_dir: str | Path, overwrite: bool = False, protected: Sequence[Path] = ()) -> Iterator[Path]:
    """Yield a hidden temporary directory beside ``out_dir``; rename it to ``out_dir`` (marked as
    evomerge's output) on success, delete it on any failure. An existing ``out_dir`` is replaced
    only under the conditions of :func:`refuse_existing`."""
    out = Path(out_dir).resolve()
    refuse_existing(out, overwrite, protected)
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(out.parent)
    tag = this_process_tag()
    tmp = out.parent / f".{out.name}.partial-{tag}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        (tmp / OUTPUT_MARKER).write_text("written by evomerge: 'evomerge ... --overwrite' may replace this directory\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{tag}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


_STALE = re.compile(r"^\..+\.(?:partial|old)-(?P<host>.+)-(?P<pid>\d+)-(?P<started>\d+)$")


def sweep_stale(parent: Path) -> list[Path]:
    """Remove the temporary directories (``.NAME.partial-*``, ``.NAME.old-*``) that killed merges
    and exports on this host left in ``parent``, once their process is gone; returns them."""
    removed = []
    for p in parent.iterdir():
        m = _STALE.match(p.name)
        if m and m["host"] == HOST and p.is_dir() and ended(int(m["pid"]), int(m["started"]) or None):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def copy_tokenizer(src: ModelFiles, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        f = src.path / name
        if f.exists():
            shutil.copyfile(f, dst / name)


def copy_generation_config(src: ModelFiles, dst: Path) -> None:
    f = src.path / "generation_config.json"
    if f.exists():
        shutil.copyfile(f, dst / "generation_config.json")
