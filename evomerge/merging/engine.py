"""The in-place merge engine: built once for a base and its experts, then applies any number of
recipes straight into a live ``torch.nn.Module``'s parameters, with no disk I/O and no new
parameter storage per recipe.

What does not depend on the recipe is computed once and kept: the task vectors, the magnitude
histograms with a sampled magnitude order (16-bit floats) or the whole order (wider floats) that
make a TIES/breadcrumbs density and its tie cut lookups instead of a sort and a scan, DELLA's
per-row ranks, DARE's L1-norm-by-draw-level tables (rescaling becomes a lookup) and, on the CPU,
DARE's hashed draws (on a GPU they are re-hashed inside the fused kernel). Where that cache lives
is chosen from the memory available (``cache="auto"``) or forced:

- ``device``: on the merge device (GPU memory on CUDA, RAM on the CPU);
- ``pinned``: pinned host memory, copied to the GPU tensor by tensor (CUDA only);
- ``disk``: nothing kept; tensors are re-read from the model files for each recipe.

Applying a recipe runs the same kernel as ``evomerge merge``, so the parameters equal the tensors
that ``evomerge merge`` writes for that recipe.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from evomerge.errors import ModelError, RecipeError
from evomerge.merging.architecture import family_of
from evomerge.merging.conversion import live_name, renamings
from evomerge.merging.kernel.mix import ExpertTensor
from evomerge.merging.kernel.sparsify import stream_seed
from evomerge.merging.layout import build_layout
from evomerge.merging.plan import open_models, output_dtype, resolve_params, tensor_meta, work_dtype
from evomerge.merging.recipe import Recipe
from evomerge.merging.tensor import merge_one, prepare_inputs, read_inputs

log = logging.getLogger(__name__)

PLACEMENTS = ("auto", "device", "pinned", "disk")


def available_host_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


@dataclass
class _Entry:
    base: Optional[torch.Tensor]
    experts: list[ExpertTensor]
    dtype: torch.dtype  # merge dtype of this tensor


class MergeEngine:
    """Merge any recipe over a fixed set of models, in place.

    ``template`` fixes what every applied recipe shares: its models, base, method, slices and
    tokenizer source. Recipes differ only in parameter values (and the random seed)."""

    def __init__(self, template: Recipe, *, device: str = "cpu", cache: str = "auto",
                 allow_pickle: bool = False, trust_remote_code: bool = False,
                 memory_fraction: float = 0.8):
        if cache not in PLACEMENTS:
            raise ValueError(f"cache must be one of {PLACEMENTS}, got {cache!r}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ModelError(f"device {device}: no CUDA device is available")
        if self.device.type == "cuda" and self.device.index is None:  # "cuda" means the current one
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.template = template
        self.method = template.method
        t0 = time.perf_counter()
        self.files = open_models(template, allow_pickle)
        self.layout = build_layout(template, self.files, trust_remote_code)
        self.shapes = {ts.name: tensor_meta(self.layout, self.files, ts) for ts in self.layout.tensors}
        self._seed: Optional[int] = None
        self._live_names: dict[str, Optional[str]] = {}  # merged tensor -> live parameter name (see apply)
        self.placement = self._choose_placement(cache, memory_fraction)
        self._entries: list[_Entry] = []
        if self.placement != "disk":
            self._build(template.random_seed)
        self.build_seconds = time.perf_counter() - t0
        log.info("merge engine: %d tensors, %d experts, cache %s (%.2f GiB), built in %.1f s",
                 len(self.layout.tensors), len(self.layout.experts), self.placement,
                 self.cache_bytes / 2**30, self.build_seconds)

    # -- cache ------------------------------------------------------------------------------

    def _estimate_bytes(self) -> int:
        """Bytes the cache will take: base + per-expert task vectors and trimming state."""
        sp = self.method.sparsifier
        cuda = self.device.type == "cuda"
        total = 0
        for ts in self.layout.tensors:
            shape, dtypes = self.shapes[ts.name]
            numel = 1
            for s in shape:
                numel *= s
            dt = work_dtype(self.template, dtypes)
            esize = torch.empty((), dtype=dt).element_size()
            total += numel * esize * (1 + len(self.layout.experts))
            if sp is not None:  # what the sparsifier precomputes per expert
                total += sp.cache_bytes(numel, esize, cuda) * len(self.layout.experts)
        return total

    def _choose_placement(self, cache: str, fraction: float) -> str:
        need = self._estimate_bytes()
        cuda = self.device.type == "cuda"
        if cache != "auto":
            if cache == "pinned" and not cuda:
                raise ValueError("cache='pinned' only applies to a CUDA device")
            log.info("merge engine: cache placement %s (forced; about %.2f GiB)", cache, need / 2**30)
            return cache
        host = available_host_bytes()
        if cuda:
            free, _ = torch.cuda.mem_get_info(self.device)
            if need < free * fraction:
                choice, why = "device", f"fits in {free / 2**30:.1f} GiB free GPU memory"
            elif need < host * fraction:
                choice, why = "pinned", f"does not fit in {free / 2**30:.1f} GiB free GPU memory; fits in host RAM"
            else:
                choice, why = "disk", "fits neither GPU memory nor host RAM"
        elif need < host * fraction:
            choice, why = "device", f"fits in {host / 2**30:.1f} GiB available RAM"
        else:
            choice, why = "disk", f"does not fit in {host / 2**30:.1f} GiB available RAM"
        log.info("merge engine: cache placement %s: %.2f GiB %s", choice, need / 2**30, why)
        return choice

    def _build(self, seed: int) -> None:
        home = self.device if self.placement == "device" else torch.device("cpu")
        pin = self.placement == "pinned"
        entries = []
        for ts in self.layout.tensors:
            # build on the merge device (fast sorts on the GPU), then move to the cache's home
            base, states, dtype = prepare_inputs(self.template, self.layout, ts,
                                                 read_inputs(self.files, self.layout, ts, check=True), self.device,
                                                 reuse=True)
            if base is not None:
                base = base.to(home)
                base = base.pin_memory() if pin else base
            entries.append(_Entry(base, [s.to(home, pin=pin) for s in states], dtype))
        self._entries = entries
        self._seed = seed

    def _reseed(self, seed: int) -> None:
        """Switch DARE/DELLA to another random seed: new stream seeds, and whatever the sparsifier
        derived from them (DARE's draws and L1-by-draw-level tables)."""
        for ts, entry in zip(self.layout.tensors, self._entries):
            for i, s in enumerate(entry.experts):
                self.method.sparsifier.reseed(s, stream_seed(seed, ts.name, i), self.device)
        self._seed = seed

    @property
    def cache_bytes(self) -> int:
        total = 0
        for e in self._entries:
            if e.base is not None:
                total += e.base.numel() * e.base.element_size()
            total += sum(s.nbytes for s in e.experts)
        return total

    # -- applying -----------------------------------------------------------------------------

    def _check(self, recipe: Recipe) -> None:
        t = self.template
        same = (recipe.merge_method == t.merge_method and recipe.model_names() == t.model_names()
                and recipe.base_model == t.base_model and recipe.tokenizer_source == t.tokenizer_source
                and recipe.dtype == t.dtype and recipe.out_dtype == t.out_dtype
                and [s.sources[0].layer_range for s in recipe.slices or []]
                == [s.sources[0].layer_range for s in t.slices or []])
        if not same:
            raise RecipeError("recipe does not match the engine: method, models, base, slices, dtypes and "
                              "tokenizer_source must be those the engine was built for")

    def merged(self, recipe: Recipe, into: Optional[dict[str, torch.Tensor]] = None
               ) -> Iterator[tuple[str, torch.Tensor]]:
        """Each merged tensor, one at a time: written into ``into[name]`` when given (in place),
        else into a new tensor on the merge device in the output dtype."""
        self._check(recipe)
        params = resolve_params(recipe, self.layout)
        if self.method.is_random and recipe.random_seed != self._seed and self.placement != "disk":
            self._reseed(recipe.random_seed)
        for i, (ts, p) in enumerate(zip(self.layout.tensors, params)):
            if self.placement == "disk":
                base, states, dtype = prepare_inputs(recipe, self.layout, ts,
                                                     read_inputs(self.files, self.layout, ts, check=True),
                                                     self.device)
            else:
                entry = self._entries[i]
                base, states, dtype = entry.base, entry.experts, entry.dtype
                if self.placement == "pinned":
                    base = base.to(self.device, non_blocking=True) if base is not None else None
                    states = [s.to(self.device) for s in states]
            out = into[ts.name] if into is not None else torch.empty(
                self.shapes[ts.name][0], dtype=output_dtype(recipe, dtype), device=self.device)
            yield ts.name, merge_one(recipe, base, states, p, out)

    def merged_as_stored(self, recipe: Recipe) -> Iterator[tuple[str, torch.Tensor]]:
        """Each merged tensor under the reference checkpoint's names (fused MoE experts split back
        into per-expert tensors), one at a time: for loaders that map checkpoint names themselves."""
        ref = self.files[self.layout.models[0]]
        for name, t in self.merged(recipe):
            yield from ref.as_stored(name, t)

    def _live_name(self, name: str, live: dict, renames: Callable[[], list]) -> Optional[str]:
        """The live model's name of a merged tensor: the same, the family's alias (GPT-2 stored
        without ``transformer.``), or the name transformers' renamings for the live model give
        it; None if none exists."""
        ref = self.files[self.layout.models[0]]
        alias = next((n for n in (name, *family_of(ref.config).aliases(name)) if n in live), None)
        return alias or live_name(name, live, renames())

    @torch.no_grad()
    def apply(self, recipe: Recipe, module: torch.nn.Module) -> float:
        """Write the recipe's merged weights into ``module``'s parameters in place; returns seconds."""
        t0 = time.perf_counter()
        live = dict(module.named_parameters(remove_duplicate=False))
        live.update(dict(module.named_buffers(remove_duplicate=False)))
        targets = {}
        renames = functools.cache(lambda: renamings(module))
        for ts in self.layout.tensors:
            name = self._live_names.get(ts.name)
            if name not in live:  # first apply (or another model): work the live name out once
                name = self._live_names[ts.name] = self._live_name(ts.name, live, renames)
            if name is not None:
                targets[ts.name] = live[name]
        if "lm_head.weight" in live:
            targets["lm_head.weight"] = live["lm_head.weight"]
        missing = [ts.name for ts in self.layout.tensors if ts.name not in targets]
        if missing:
            raise ModelError(f"the live model has no parameter for merged tensors: {', '.join(missing[:5])}"
                             + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        if self.layout.lm_head_added:
            head = targets["lm_head.weight"].data_ptr()
            if any(targets[ts.name].data_ptr() == head for ts in self.layout.tensors if ts.name != "lm_head.weight"):
                raise ModelError("the merge has its own lm_head but the live model ties it to the embeddings; "
                                 "load the model with tie_word_embeddings=False")
        for ts in self.layout.tensors:
            target, shape = targets[ts.name], self.shapes[ts.name][0]
            if tuple(target.shape) != shape:
                raise ModelError(f"tensor {ts.name}: merged shape {list(shape)} but the live model's is "
                                 f"{list(target.shape)}")
            if target.device != self.device:
                raise ModelError(f"tensor {ts.name}: the live model is on {target.device}, the engine on {self.device}")
        into = {ts.name: targets[ts.name].data for ts in self.layout.tensors}
        for _ in self.merged(recipe, into=into):
            pass
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

