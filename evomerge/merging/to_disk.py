"""``evomerge merge``: a recipe merged (or a layer path stacked) into a complete Hugging Face model
directory, streamed one tensor at a time, following its plan (:mod:`.plan`)."""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import torch

from evomerge.errors import ModelError
from evomerge.merging.layer_path import LayerPath
from evomerge.merging.layer_stack import materialize
from evomerge.merging.layout import build_layout
from evomerge.merging.model_io import ShardedWriter, TensorSpec, atomic_directory, copy_generation_config, copy_tokenizer
from evomerge.merging.plan import open_models, output_config, output_dtype, resolve_params, tensor_meta, work_dtype
from evomerge.merging.recipe import Recipe
from evomerge.merging.tensor import copied_tensor, merge_checked, read_inputs

log = logging.getLogger(__name__)


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
