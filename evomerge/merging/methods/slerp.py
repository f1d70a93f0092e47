"""SLERP: spherical interpolation of the base (t = 0) and one other model (t = 1), over each whole
flattened tensor, falling back to linear interpolation for nearly parallel tensors."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

from evomerge.merging.methods.base import MergeMethod, Param

if TYPE_CHECKING:
    import torch

_SLERP_CHUNK = 1024 * 1024


def merge_slerp(v0: torch.Tensor, v1: torch.Tensor, t: float, dot_threshold: float = 0.9995,
                eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation over the whole flattened tensor; v0 (the base) is the t = 0 end.
    Nearly parallel (or antipodal) tensors fall back to linear interpolation."""
    import torch

    work = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    tt = torch.tensor([[t]], dtype=work, device=v0.device)
    if a.shape[1] == 0:
        return v0.clone()
    chunks = range(0, a.shape[1], _SLERP_CHUNK)

    def chunk(x: torch.Tensor, s: int) -> torch.Tensor:
        return x[:, s:s + _SLERP_CHUNK].to(work)

    norm_a = torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(chunk(a, s), dim=1, keepdim=True) for s in chunks]), dim=0)
    norm_b = torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(chunk(b, s), dim=1, keepdim=True) for s in chunks]), dim=0)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot = torch.stack([((chunk(a, s) / norm_a) * (chunk(b, s) / norm_b)).sum(dim=1, keepdim=True)
                       for s in chunks]).sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(linear, tt, torch.sin(tt * theta) / sin_theta)
    out = torch.empty_like(a)
    for s in chunks:
        out[:, s:s + _SLERP_CHUNK] = coef_a * chunk(a, s) + coef_b * chunk(b, s)
    return out.reshape(v0.shape)


def merge(method: MergeMethod, base: Optional[torch.Tensor], experts: Sequence, model_params: Sequence[dict],
          global_params: dict, out: torch.Tensor) -> torch.Tensor:
    return out.copy_(merge_slerp(base, experts[0].delta, float(global_params["t"])))


METHODS = (
    MergeMethod("slerp", merge, globals_=(Param("t", bounds=(0.0, 1.0), searched=True, unit=True, reference=0.5, required=True,
                                     summary="0 = base model, 1 = the other"),),
                task_vectors=False, experts=1, summary="spherical interpolation of two models"),
)
