"""Merging recipes: parameter resolution per tensor, and ``evomerge merge`` (streamed to disk)."""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch

from evomerge.errors import ModelError, RecipeError
from evomerge.merging.kernel.mix import ExpertTensor, prepare_expert
from evomerge.merging.model_io import (ModelFiles, ShardedWriter, TensorSpec, all_finite, atomic_directory,
                                       copy_generation_config, copy_tokenizer, dtype_from_name)
from evomerge.merging.layout import Layout, TensorSource, align_vocab, build_layout
from evomerge.merging.layer_path import LayerPath, materialize
from evomerge.merging.recipe import PASSTHROUGH, Recipe

log = logging.getLogger(__name__)


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


def gather_inputs(layout: Layout, ts: TensorSource, raw: Sequence[torch.Tensor], dtype: torch.dtype,
                  device: torch.device) -> list[torch.Tensor]:
    """Inputs of one tensor on the device, in the merge dtype, vocabularies aligned."""
    tensors = [t.to(device=device, dtype=dtype) for t in raw]
    if ts.vocab:
        base_index = layout.models.index(layout.base) if layout.base else None
        tensors = align_vocab(tensors, layout.vocab_perms, base_index)
    return tensors


def expert_states(recipe: Recipe, layout: Layout, ts: TensorSource, tensors: list[torch.Tensor],
                  reuse: bool = False) -> tuple[Optional[torch.Tensor], list[ExpertTensor]]:
    """The base tensor and each expert's recipe-independent state (task vectors for the task
    arithmetic family, the raw tensors for linear and slerp). ``reuse``: kept for many recipes;
    on the CPU DARE's draws are then hashed once and kept with their rescaling table. A single use
    hashes them in the kernels instead (about 2.5x faster than building the table for one recipe)."""
    method = recipe.method
    by_model = dict(zip(layout.models, tensors))
    base = by_model[layout.base] if layout.base else None
    states = []
    for i, m in enumerate(layout.experts):
        if method.task_vectors:
            delta = by_model[m] - base
            states.append(prepare_expert(delta, method, seed=recipe.random_seed, tensor_name=ts.name,
                                         expert_index=i, reuse=reuse,
                                         cache_draws=reuse and delta.device.type == "cpu"))
        else:
            states.append(ExpertTensor(delta=by_model[m]))
    return base, states


def read_inputs(files: dict[str, ModelFiles], layout: Layout, ts: TensorSource,
                check: bool = False) -> list[torch.Tensor]:
    """One output tensor's input tensors as stored, one per model; with ``check``, refused when one
    holds NaN or inf."""
    out = [files[m].get(n) for m, n in zip(layout.models, ts.inputs)]
    if check:
        for m, n, t in zip(layout.models, ts.inputs, out):
            files[m].check_finite(n, t)
    return out


def merge_checked(recipe: Recipe, files: dict[str, ModelFiles], layout: Layout, ts: TensorSource,
                  raw: list[torch.Tensor], params: TensorParams, out: torch.Tensor,
                  device: torch.device) -> torch.Tensor:
    """One merged tensor. Its inputs are checked for NaN and inf only when the merge fails or its
    result is not finite (one check of the output instead of one per input), naming the culprit."""
    try:
        base, states, _ = prepare_inputs(recipe, layout, ts, raw, device)
        merged = merge_one(recipe, base, states, params, out)
    except Exception:
        read_inputs(files, layout, ts, check=True)
        raise
    if merged.is_floating_point() and not all_finite(merged):
        read_inputs(files, layout, ts, check=True)
        raise ModelError(f"tensor {ts.name}: the merge gave NaN or inf values from finite inputs "
                         "(weights too large for the dtype?)")
    return merged


def prepare_inputs(recipe: Recipe, layout: Layout, ts: TensorSource, raw: Sequence[torch.Tensor],
                   device: torch.device, reuse: bool = False
                   ) -> tuple[Optional[torch.Tensor], list[ExpertTensor], torch.dtype]:
    """The base tensor, each expert's state and the merge dtype of one output tensor."""
    dtype = work_dtype(recipe, [t.dtype for t in raw])
    tensors = gather_inputs(layout, ts, raw, dtype, device)
    base, states = expert_states(recipe, layout, ts, tensors, reuse)
    return base, states, dtype


def merge_one(recipe: Recipe, base: Optional[torch.Tensor], states: Sequence[ExpertTensor],
              params: TensorParams, out: torch.Tensor) -> torch.Tensor:
    """Merge one tensor into ``out`` (its dtype is the output dtype)."""
    method = recipe.method
    return method.merge(method, base, states, params.model_params, params.global_params, out)


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


def tensor_meta(layout: Layout, files: dict[str, ModelFiles], ts: TensorSource
                ) -> tuple[tuple[int, ...], list[torch.dtype]]:
    """An output tensor's shape and its inputs' dtypes, without reading data."""
    metas = [files[m].meta(n) for m, n in zip(layout.models, ts.inputs)]
    ref = layout.models.index(layout.base) if layout.base else 0
    shape = metas[ref][0]
    if ts.vocab:
        shape = (int(layout.vocab_perms.shape[1]), *shape[1:])
    return shape, [d for _, d in metas]


def copied_tensor(files: dict[str, ModelFiles], layout: Layout, ts: TensorSource) -> torch.Tensor:
    """A non-floating buffer, as the reference model holds it; every model must hold the same."""
    raw = read_inputs(files, layout, ts)
    ref = layout.models.index(layout.base or layout.models[0])
    differ = [m for m, t in zip(layout.models, raw) if t.dtype != raw[ref].dtype or not torch.equal(t, raw[ref])]
    if differ:
        raise ModelError(f"tensor {ts.name}: a non-floating buffer (not merged, copied through) that differs "
                         f"between {layout.models[ref]} and {', '.join(differ)}")
    return raw[ref]


def open_models(recipe: Recipe, allow_pickle: bool = False) -> dict[str, ModelFiles]:
    return {m: ModelFiles(m, allow_pickle=allow_pickle) for m in recipe.model_names()}


def read_recipe(data: Any, source: str = "recipe") -> Recipe | LayerPath:
    """A recipe dict as a merge :class:`Recipe`, or a :class:`LayerPath` (``merge_method: passthrough``)."""
    if isinstance(data, Mapping) and data.get("merge_method") == PASSTHROUGH:
        return LayerPath.from_dict(data, source)
    return Recipe.from_dict(data, source)


def merge_to_disk(recipe: Recipe | LayerPath, out_dir: str | Path, *, device: str = "cpu", allow_pickle: bool = False,
                  trust_remote_code: bool = False, overwrite: bool = False,
                  max_shard_bytes: int = 2 << 30) -> Path:
    """Merge a recipe (or stack a layer path) and write a complete Hugging Face model directory,
    one tensor at a time."""
    if isinstance(recipe, LayerPath):
        return materialize(recipe, out_dir, allow_pickle=allow_pickle, overwrite=overwrite,
                           max_shard_bytes=max_shard_bytes)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda: no CUDA device is available")
    t0 = time.perf_counter()
    files = open_models(recipe, allow_pickle)
    layout = build_layout(recipe, files, trust_remote_code)
    params = resolve_params(recipe, layout)

    specs = []
    for ts in layout.tensors:
        shape, dtypes = tensor_meta(layout, files, ts)
        specs.append(TensorSpec(ts.name, shape, output_dtype(recipe, work_dtype(recipe, dtypes))))
    for ts in layout.copied:
        shape, dtypes = tensor_meta(layout, files, ts)
        specs.append(TensorSpec(ts.name, shape, dtypes[layout.models.index(layout.base or layout.models[0])]))
    tok_src = layout.base or layout.models[0]
    if recipe.tokenizer_source and recipe.tokenizer_source != "base":
        tok_src = recipe.tokenizer_source

    out = Path(out_dir)
    with atomic_directory(out, overwrite=overwrite, protected=[f.path for f in files.values()]) as tmp, \
            ThreadPoolExecutor(1) as pool:
        writer = ShardedWriter(tmp, specs, max_shard_bytes)
        try:
            pending = pool.submit(read_inputs, files, layout, layout.tensors[0])
            for i, (ts, p, spec) in enumerate(zip(layout.tensors, params, specs)):
                raw = pending.result()
                if i + 1 < len(layout.tensors):
                    pending = pool.submit(read_inputs, files, layout, layout.tensors[i + 1])
                merged = merge_checked(recipe, files, layout, ts, raw, p,
                                       torch.empty(spec.shape, dtype=spec.dtype, device=dev), dev)
                del raw
                writer.write(ts.name, merged)
            for ts in layout.copied:
                writer.write(ts.name, copied_tensor(files, layout, ts))
            writer.finish()
        finally:
            writer.close()
        config = output_config(recipe, layout, files, specs[0].dtype if specs else torch.float32)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        copy_tokenizer(files[tok_src], tmp)
        copy_generation_config(files[layout.base or layout.models[0]], tmp)
        (tmp / "evomerge_recipe.yaml").write_text(recipe.to_yaml())
    log.info("merged %d tensors into %s in %.1f s", len(specs), out, time.perf_counter() - t0)
    return out


def merged_tensors(recipe: Recipe, *, device: str = "cpu", allow_pickle: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """The merged tensors one at a time, without writing anything (for inspection and tests)."""
    files = open_models(recipe, allow_pickle)
    layout = build_layout(recipe, files)
    for ts, p in zip(layout.tensors, resolve_params(recipe, layout)):
        shape, dtypes = tensor_meta(layout, files, ts)
        out = torch.empty(shape, dtype=output_dtype(recipe, work_dtype(recipe, dtypes)), device=device)
        yield ts.name, merge_checked(recipe, files, layout, ts, read_inputs(files, layout, ts), p, out,
                                     torch.device(device))
    for ts in layout.copied:
        yield ts.name, copied_tensor(files, layout, ts).to(device)
