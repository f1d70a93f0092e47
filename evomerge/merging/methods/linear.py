"""Linear (model soup): sum_i w_i * theta_i / sum_i w_i (``normalize``, the default), no base."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

from evomerge.merging.methods.base import WEIGHT, MergeMethod, Param

if TYPE_CHECKING:
    import torch


def merge_linear(tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool) -> torch.Tensor:
    """Weighted average, computed in float32 (float64 for float64 inputs)."""
    import torch

    first = tensors[0]
    work = torch.float64 if first.dtype == torch.float64 else torch.float32
    w = torch.tensor([float(x) for x in weights], dtype=work, device=first.device)
    out = torch.zeros_like(first, dtype=work)
    for t, c in zip(tensors, w.unbind(0)):
        out.addcmul_(t, c)
    if normalize:
        total = w.sum()
        if total.abs() >= 1e-8:  # all weights summing to 0: the plain sum, instead of inf/nan
            out.div_(total)
    return out.to(first.dtype)


def merge(method: MergeMethod, base: Optional[torch.Tensor], experts: Sequence, model_params: Sequence[dict],
          global_params: dict, out: torch.Tensor) -> torch.Tensor:
    merged = merge_linear([s.delta for s in experts], [p["weight"] for p in model_params],
                          bool(global_params.get("normalize", method.normalize)))
    return out.copy_(merged)


METHODS = (
    MergeMethod("linear", merge, model=(WEIGHT,), globals_=(Param("normalize", flag=True),), normalize=True,
                needs_base=False, task_vectors=False, summary="weighted average of the models"),
)
