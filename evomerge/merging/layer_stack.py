"""A layer path's stacked model (:mod:`evomerge.merging.layer_path` holds the path itself, without
torch): :class:`PathModel` wires it in place for scoring, on the loaded parents' own layer modules
without copying a weight, and :func:`materialize` writes it to disk as a model directory."""

from __future__ import annotations

import copy
import json
import logging
import re
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence

import torch

from evomerge.merging.architecture import family_of
from evomerge.merging.layer_path import LayerPath, LayerPathError, check_path, path_config, scale_filters
from evomerge.merging.model_io import (ModelFiles, ShardedWriter, TensorSpec, atomic_directory, copy_generation_config,
                                       copy_tokenizer, dtype_from_name)

log = logging.getLogger(__name__)

_LAYER = re.compile(r"^(?P<stack>(?:model\.)?layers\.)(?P<idx>\d+)\.(?P<rest>.+)$")  # a decoder layer's tensor


# -- the stacked model in place -----------------------------------------------------------------


class _Scale:
    """The scale of the step running now, read by the hooks on the shared sublayers."""
    value = 1.0


class _StepModule(torch.nn.Module):
    """One step: the shared layer, run with this step's cache index and scale."""

    def __init__(self, layer: torch.nn.Module, index: int, scale: float, cell: _Scale):
        super().__init__()
        self.layer = layer
        self.index = index
        self.scale = scale
        self.cell = cell
        for key in ("attention_type", "layer_type", "is_sliding"):  # read by some models' loops
            if hasattr(layer, key):
                setattr(self, key, getattr(layer, key))

    def forward(self, *args, **kwargs):
        attn = self.layer.self_attn
        saved = attn.layer_idx
        attn.layer_idx = self.index  # its own slot in the KV cache, even when the layer repeats
        self.cell.value = self.scale
        try:
            return self.layer(*args, **kwargs)
        finally:
            attn.layer_idx = saved
            self.cell.value = 1.0


def _scaled_output(cell: _Scale):
    def hook(_module, _inputs, output):
        if cell.value == 1.0:
            return output
        if isinstance(output, tuple):
            return (output[0] * cell.value,) + output[1:]
        return output * cell.value
    return hook


class PathModel:
    """Live parents wired into one stacked causal LM per path, sharing every weight.

    ``load`` gives a parent's loaded model by the name steps use; each is loaded once, when a path
    first uses it. The stacked model (:attr:`model`) is built once, with no weights of its own;
    :meth:`apply` points its layer list, embeddings, final norm and head at the parents' modules.
    Forward hooks on each parent layer's attention and MLP apply the running step's scale (1
    outside a step, so a parent used on its own is unchanged) until :meth:`close`.
    """

    def __init__(self, load: Callable[[str], torch.nn.Module]):
        self.load = load
        self.parents: dict[str, torch.nn.Module] = {}
        self.configs: dict[str, dict] = {}
        self.cell = _Scale()
        self.model: Optional[torch.nn.Module] = None
        self._hooks: list = []

    def _parent(self, name: str) -> torch.nn.Module:
        if name not in self.parents:
            model = self.load(name)
            if not hasattr(getattr(model, "model", None), "layers"):
                raise LayerPathError(f"{name}: model_type {model.config.model_type}: its decoder layers cannot be "
                                     "re-stacked into a layer path (Llama-like families only)")
            self._hooks += [module.register_forward_hook(_scaled_output(self.cell))
                            for layer in model.model.layers for module in (layer.self_attn, layer.mlp)]
            self.parents[name], self.configs[name] = model, model.config.to_dict()
        return self.parents[name]

    def _shell(self, like: torch.nn.Module) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        if self.model is None:
            with torch.device("meta"):
                self.model = AutoModelForCausalLM.from_config(copy.deepcopy(like.config), dtype=like.dtype)
            self.model.generation_config = copy.deepcopy(like.generation_config)
            self.model.eval()
        return self.model

    def apply(self, path: LayerPath, max_layers: Optional[int] = None) -> torch.nn.Module:
        """Wire the stacked model to ``path`` (no weight is copied) and return it."""
        for m in path.model_names():
            self._parent(m)
        check_path(path, {m: self.configs[m] for m in path.model_names()}, max_layers)
        first, last = self.parents[path.steps[0].model], self.parents[path.steps[-1].model]
        shell = self._shell(first)
        for name, _ in list(shell.model.named_children()):
            if name != "layers":  # embeddings and rotary from the first step's model, the final norm from the last's
                setattr(shell.model, name, getattr((last if name == "norm" else first).model, name))
        tied = bool(self.configs[path.steps[0].model].get("tie_word_embeddings"))
        shell.lm_head = (first if tied else last).lm_head
        shell.model.layers = torch.nn.ModuleList(
            _StepModule(self.parents[s.model].model.layers[s.layer], i, s.scale, self.cell)
            for i, s in enumerate(path.steps))
        cfg = path_config(path, self.configs)
        config = type(shell.config).from_dict(cfg)  # depth and layer types agree at once
        config._attn_implementation = first.config._attn_implementation  # the masks the layers' attention reads
        shell.config = shell.model.config = config
        for t in list(shell.parameters()) + list(shell.buffers()):
            if t.is_meta:
                raise LayerPathError(f"layer path: model_type {cfg.get('model_type')}: the stacked model has a "
                                     "part no parent provides")
        return shell

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


# -- the stacked model on disk ------------------------------------------------------------------


def _layer_tensors(files: ModelFiles, layer: int) -> list[tuple[str, str]]:
    """(stored name, name inside the layer) of one decoder layer's tensors."""
    out = []
    for name in files.names():
        m = _LAYER.match(name)
        if m and int(m["idx"]) == layer:
            out.append((name, m["rest"]))
    return out


def _plan(path: LayerPath, files: Mapping[str, ModelFiles], ends: Sequence[str]) -> Iterator[tuple[str, str, str, float]]:
    """(output name, model, stored name, scale) of every tensor of the stacked model, in order."""
    first, last = path.steps[0].model, path.steps[-1].model
    tied = files[first].tied_embeddings
    outside = [n for n in files[first].names() if not _LAYER.match(n)]
    family = family_of(files[first].config)
    pre = [n for n in outside if family.kind_of(n) == "embed"]
    for n in pre:
        yield n, first, n, 1.0
    for i, s in enumerate(path.steps):
        tensors = _layer_tensors(files[s.model], s.layer)
        if not tensors:
            raise LayerPathError(f"{s.model}: no tensor of decoder layer {s.layer} under model.layers: its layers "
                                 "cannot be re-stacked into a layer path (Llama-like families only)")
        for name, rest in tensors:
            stack = _LAYER.match(name)["stack"]
            scale = s.scale if any(e in rest for e in ends) else 1.0
            yield f"{stack}{i}.{rest}", s.model, name, scale
    for n in outside:
        if n in pre or (tied and family.kind_of(n) == "lm_head"):
            continue
        if n not in files[last]:
            raise LayerPathError(f"{last}: has no tensor {n} (the stacked model's final tensors come from the "
                                 "last step's model)")
        yield n, last, n, 1.0


def materialize(path: LayerPath, out_dir: str | Path, *, allow_pickle: bool = False, overwrite: bool = False,
                protected: Sequence[Path] = (), max_shard_bytes: int = 2 << 30) -> Path:
    """Write the stacked model as a Hugging Face directory (one tensor at a time), with the
    mergekit recipe that rebuilds it as ``evomerge_recipe.yaml``."""
    models = path.model_names()
    files = {m: ModelFiles(m, allow_pickle=allow_pickle) for m in models}
    configs = {m: f.config for m, f in files.items()}
    check_path(path, configs)
    ends = scale_filters(configs[models[0]], any(s.scale != 1.0 for s in path.steps))
    if any(s.scale != 1.0 for s in path.steps) and tuple(path.ends) != tuple(ends):
        raise LayerPathError(f"layer path: its scales are on {list(path.ends)}; model_type "
                             f"{configs[models[0]].get('model_type')} ends its sublayers with {list(ends)}")
    plan = list(_plan(path, files, ends))
    out_dtype = dtype_from_name(path.dtype) if path.dtype else None
    specs = []
    for out, m, name, _ in plan:
        shape, dtype = files[m].meta(name)
        specs.append(TensorSpec(out, shape, out_dtype if out_dtype is not None and dtype.is_floating_point else dtype))
    with atomic_directory(out_dir, overwrite=overwrite, protected=[*protected, *(f.path for f in files.values())]) as tmp:
        writer = ShardedWriter(tmp, specs, max_shard_bytes)
        try:
            for (out, m, name, scale), spec in zip(plan, specs):
                t = files[m].get(name).to(spec.dtype)
                writer.write(out, t if scale == 1.0 else t * scale)
            writer.finish()
        finally:
            writer.close()
        config = path_config(path, configs)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        copy_tokenizer(files[models[0]], tmp)
        copy_generation_config(files[models[0]], tmp)
        (tmp / "evomerge_recipe.yaml").write_text(path.to_yaml())
    log.info("wrote a stack of %d layers from %d models into %s", len(path.steps), len(models), out_dir)
    return Path(out_dir)
