"""The merge of one tensor: its inputs read as stored, brought to the merge dtype and device (with
vocabularies aligned), each expert's recipe-independent state prepared, the method applied, and
the result checked. Shared by the merge to disk and the in-place engine."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from evomerge.errors import ModelError
from evomerge.merging.kernel.mix import ExpertTensor, prepare_expert
from evomerge.merging.layout import Layout, TensorSource, align_vocab
from evomerge.merging.model_io import ModelFiles, all_finite
from evomerge.merging.plan import TensorParams, work_dtype
from evomerge.merging.recipe import Recipe


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
    return method.merge_function(method, base, states, params.model_params, params.global_params, out)


def copied_tensor(files: dict[str, ModelFiles], layout: Layout, ts: TensorSource) -> torch.Tensor:
    """A non-floating buffer, as the reference model holds it; every model must hold the same."""
    raw = read_inputs(files, layout, ts)
    ref = layout.models.index(layout.base or layout.models[0])
    differ = [m for m, t in zip(layout.models, raw) if t.dtype != raw[ref].dtype or not torch.equal(t, raw[ref])]
    if differ:
        raise ModelError(f"tensor {ts.name}: a non-floating buffer (not merged, copied through) that differs "
                         f"between {layout.models[ref]} and {', '.join(differ)}")
    return raw[ref]
