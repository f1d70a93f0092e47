"""The plan of a merge: which tensors, from which models' files, with which parameters, in which
dtypes. The merge to disk (:mod:`.to_disk`) and the in-place engine (:mod:`.engine`) both follow
it, and merge each tensor with :mod:`.tensor`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from evomerge.errors import RecipeError
from evomerge.merging.layer_path import LayerPath
from evomerge.merging.layout import Layout, TensorSource
from evomerge.merging.model_io import ModelFiles, dtype_from_name
from evomerge.merging.recipe import PASSTHROUGH, Recipe


@dataclass
class TensorParams:
    model_params: list[dict]  # per expert, in Layout.experts order
    global_params: dict


def resolve_params(recipe: Recipe, layout: Layout) -> list[TensorParams]:
    """Every tensor's parameters, resolved before any work so that a bad value fails early,
    naming the tensor and model."""
    method = recipe.method
    out = []
    for ts in layout.tensors:
        per_model = []
        for m in layout.experts:
            p = recipe.model_params(m, ts.name, ts.t, ts.slice_index)
            if "weight" in method.model_params and "weight" not in p:
                raise RecipeError(f"parameter weight of model {m}: no value applies to tensor {ts.name}")
            problem = method.sparsifier.check(p, f"model {m}, tensor {ts.name}") if method.sparsifier else None
            if problem:
                raise RecipeError(problem)
            per_model.append(p)
        g = recipe.global_params(ts.name, ts.t, ts.slice_index)
        for param in method.globals_:
            if param.required and param.name not in g:
                raise RecipeError(f"parameter {param.name}: no value applies to tensor {ts.name}")
        out.append(TensorParams(per_model, g))
    return out


def work_dtype(recipe: Recipe, input_dtypes: Sequence[torch.dtype]) -> torch.dtype:
    """The merge's compute dtype: the recipe's ``dtype``, else the inputs' promoted dtype."""
    if recipe.dtype:
        return dtype_from_name(recipe.dtype)
    dt = input_dtypes[0]
    for d in input_dtypes[1:]:
        dt = torch.promote_types(dt, d)
    return dt


def output_dtype(recipe: Recipe, merged: torch.dtype) -> torch.dtype:
    return dtype_from_name(recipe.out_dtype) if recipe.out_dtype else merged


def tensor_meta(layout: Layout, files: dict[str, ModelFiles], ts: TensorSource
                ) -> tuple[tuple[int, ...], list[torch.dtype]]:
    """An output tensor's shape and its inputs' dtypes, without reading data."""
    metas = [files[m].meta(n) for m, n in zip(layout.models, ts.inputs)]
    ref = layout.models.index(layout.base) if layout.base else 0
    shape = metas[ref][0]
    if ts.vocab:
        shape = (int(layout.vocab_perms.shape[1]), *shape[1:])
    return shape, [d for _, d in metas]


def output_config(recipe: Recipe, layout: Layout, files: dict[str, ModelFiles], out_dtype: torch.dtype) -> dict:
    ref = layout.base or layout.models[0]
    config = json.loads(json.dumps(files[ref].config))
    dtype_name = str(out_dtype).removeprefix("torch.")
    config["dtype" if "dtype" in config or "torch_dtype" not in config else "torch_dtype"] = dtype_name
    if layout.output_num_layers is not None:  # every key that holds the layer count (GPT-2: n_layer)
        keys = [k for k in ("num_hidden_layers", "n_layer", "num_layers") if k in config] or ["num_hidden_layers"]
        for key in keys:
            config[key] = layout.output_num_layers
    if layout.vocab_perms is not None:
        config["vocab_size"] = int(layout.vocab_perms.shape[1])
    if layout.lm_head_added:
        config["tie_word_embeddings"] = False
    return config


def open_models(recipe: Recipe, allow_pickle: bool = False) -> dict[str, ModelFiles]:
    return {m: ModelFiles(m, allow_pickle=allow_pickle) for m in recipe.model_names()}


def read_recipe(data: Any, source: str = "recipe") -> Recipe | LayerPath:
    """A recipe dict as a merge :class:`Recipe`, or a :class:`LayerPath` (``merge_method: passthrough``)."""
    if isinstance(data, Mapping) and data.get("merge_method") == PASSTHROUGH:
        return LayerPath.from_dict(data, source)
    return Recipe.from_dict(data, source)
