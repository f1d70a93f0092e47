"""The merge kernel: one output tensor from a base tensor and the experts' task vectors.

Everything that does not depend on the recipe lives in an :class:`ExpertTensor` (the task vector,
the magnitude order used by trimming, the seeded random draws of DARE and DELLA, the L1 norm used
by rescaling). The merge engine builds those once and reuses them for every recipe; ``evomerge
merge`` builds them per tensor and throws them away. Both then run the same functions here, so
they give the same tensors.

Numerics follow mergekit 0.1.5 operation by operation (dtypes, rounding points, defaults), with
three deliberate differences, all documented in the README:
- among elements of exactly equal magnitude at the trimming threshold, the lowest flat index is
  kept first (mergekit's unstable argsort keeps an arbitrary subset);
- DARE and DELLA draw from a seeded, device-independent stream (mergekit uses the global RNG);
- for DARE and DELLA, L1 norms for rescaling are accumulated in float64 so that they do not depend
  on a device's reduction order (deterministic methods sum in the tensor dtype, like mergekit).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import torch

from .methods import DELLA, MAGNITUDE, OUTLIERS, RANDOM, MethodSpec

_Q_LEVELS = 65536  # resolution of the seeded uniform draws (16 bits)
_Q_OFFSET = 32768


# ---------------------------------------------------------------------------------------------
# Recipe-independent state


class MagnitudeOrder:
    """Finds the k-th largest / smallest magnitude of a tensor and how many lie strictly beyond it.

    Built either as a table of distinct magnitudes with cumulative counts (one sort, then every
    density is a binary search: the engine's choice) or lazily by selection (``kthvalue`` per
    query: ``evomerge merge``'s choice, as each tensor is used once). Both are exact.
    """

    def __init__(self, magnitudes: torch.Tensor, table: bool):
        self.numel = magnitudes.numel()
        self._a = None if table else magnitudes
        self._values = self._cum_le = None
        if table:
            values, counts = torch.unique(magnitudes.reshape(-1), sorted=True, return_counts=True)
            self._values = values
            self._cum_le = torch.cumsum(counts, 0)

    @property
    def nbytes(self) -> int:
        if self._values is None:
            return 0
        return self._values.numel() * self._values.element_size() + self._cum_le.numel() * 8

    def to(self, device: torch.device | str) -> "MagnitudeOrder":
        if self._values is not None:
            self._values = self._values.to(device)
            self._cum_le = self._cum_le.to(device)
        return self

    def kth(self, k: int, descending: bool) -> tuple[torch.Tensor, int, int]:
        """(v, n_beyond, n_at): the k-th value (1-based) in the given order, the count of elements
        strictly before it in that order, and the count equal to it."""
        n = self.numel
        if self._values is None:
            a = self._a.reshape(-1)
            pos = n - k + 1 if descending else k
            v = torch.kthvalue(a, pos).values
            n_lt = int((a < v).sum())
            n_at = int((a == v).sum())
            n_beyond = n - n_lt - n_at if descending else n_lt
            return v, n_beyond, n_at
        cum = self._cum_le
        # ascending position (1-based) of the wanted element
        pos = n - k + 1 if descending else k
        j = int(torch.searchsorted(cum, torch.tensor([pos], device=cum.device)).item())
        n_le = int(cum[j])
        n_lt = int(cum[j - 1]) if j > 0 else 0
        v = self._values[j]
        n_at = n_le - n_lt
        return v, (n - n_le if descending else n_lt), n_at


def rank_mask(a: torch.Tensor, order: MagnitudeOrder, k: int, descending: bool) -> torch.Tensor:
    """Boolean mask of the k first elements of ``a`` ordered by value (ties: lowest index first)."""
    if k <= 0:
        return torch.zeros_like(a, dtype=torch.bool)
    if k >= a.numel():
        return torch.ones_like(a, dtype=torch.bool)
    v, n_beyond, n_at = order.kth(k, descending)
    mask = a > v if descending else a < v
    need = k - n_beyond
    tie = a == v
    if need >= n_at:
        return mask.logical_or_(tie)
    first = torch.cumsum(tie.reshape(-1), 0, dtype=torch.int32).reshape(a.shape) <= need
    return mask.logical_or_(tie.logical_and_(first))


def stream_seed(seed: int, tensor_name: str, expert_index: int) -> int:
    """A 63-bit seed for one expert's draws on one tensor, stable across runs and platforms."""
    h = hashlib.blake2b(f"{seed}\x00{tensor_name}\x00{expert_index}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") >> 1


def uniform_draws(seed: int, shape: torch.Size) -> torch.Tensor:
    """Seeded 16-bit uniform integers (stored as int16, offset by -32768), drawn on the CPU so
    every device sees the same values."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(-_Q_OFFSET, _Q_OFFSET, tuple(shape), dtype=torch.int16, generator=g)


def row_ranks(delta: torch.Tensor) -> torch.Tensor:
    """Per-row ascending magnitude rank (0-based) for DELLA; 1-D tensors form one row."""
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    ranks = torch.empty_like(order, dtype=torch.int32)
    ranks.scatter_(1, order, torch.arange(rows.shape[1], device=rows.device, dtype=torch.int32)
                   .expand_as(order).contiguous())
    return ranks


def l1_norm(t: torch.Tensor, device_exact: bool) -> torch.Tensor:
    """||t||_1 as a 0-dim tensor: summed in t's dtype (mergekit's numerics), or in float64 where
    the result must not depend on the device's reduction order."""
    if device_exact:
        return t.abs().sum(dtype=torch.float64)
    return t.abs().sum()


@dataclass
class ExpertTensor:
    """One expert's recipe-independent state for one tensor."""

    delta: torch.Tensor  # theta_expert - theta_base, in the merge dtype (or the expert tensor for linear/slerp)
    order: MagnitudeOrder | None = None
    draws: torch.Tensor | None = None  # int16 uniform draws (DARE, DELLA)
    ranks: torch.Tensor | None = None  # int32 per-row magnitude ranks (DELLA)
    l1: torch.Tensor | None = None  # ||delta||_1 (see l1_norm)

    @property
    def nbytes(self) -> int:
        n = self.delta.numel() * self.delta.element_size()
        for t in (self.draws, self.ranks):
            if t is not None:
                n += t.numel() * t.element_size()
        if self.order is not None:
            n += self.order.nbytes
        return n

    def to(self, device: torch.device | str, pin: bool = False) -> "ExpertTensor":
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            t = t.to(device)
            return t.pin_memory() if pin else t

        self.delta, self.draws, self.ranks = move(self.delta), move(self.draws), move(self.ranks)
        if self.order is not None:
            self.order.to(device if not pin else "cpu")
        return self


def prepare_expert(delta: torch.Tensor, method: MethodSpec, *, seed: int, tensor_name: str,
                   expert_index: int, table: bool) -> ExpertTensor:
    """Compute what trimming needs, once. ``table`` selects the reusable magnitude table."""
    state = ExpertTensor(delta=delta)
    sp = method.sparsifier
    if sp in (MAGNITUDE, OUTLIERS):
        mags = delta.abs()
        if mags.device.type == "cpu" and mags.dtype in (torch.float16, torch.bfloat16):
            mags = mags.float()  # CPU sort/select on half types is slow; the order is the same
        state.order = MagnitudeOrder(mags, table=table)
    if sp in (RANDOM, DELLA):
        state.draws = uniform_draws(stream_seed(seed, tensor_name, expert_index), delta.shape).to(delta.device)
    if sp == DELLA:
        state.ranks = row_ranks(delta)
    if sp is not None:
        state.l1 = l1_norm(delta, method.is_random)
    return state


# ---------------------------------------------------------------------------------------------
# Sparsifiers (per recipe)


def _rescaled(state: ExpertTensor, masked: torch.Tensor, rescale: bool, device_exact: bool) -> torch.Tensor:
    """Scale the kept values so that the tensor's L1 norm is unchanged."""
    if not rescale:
        return masked
    before = state.l1 if state.l1 is not None else l1_norm(state.delta, device_exact)
    after = l1_norm(masked, device_exact)
    if before < 1e-7 or after < 1e-7:
        return masked
    if device_exact:
        return masked * float(before / after)
    return masked * (before / after)


def _magnitude(state: ExpertTensor, density: float, rescale: bool) -> torch.Tensor:
    d = state.delta
    if density >= 1:
        return d
    if density <= 0 or d.numel() == 0:
        return torch.zeros_like(d)
    k = max(1, int(density * d.numel()))
    mask = rank_mask(_magnitudes(state), state.order, k, descending=True)
    return _rescaled(state, d * mask, rescale, False)


def _outliers(state: ExpertTensor, density: float, gamma: float, rescale: bool) -> torch.Tensor:
    d = state.delta
    if density >= 1:
        return d
    n = d.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    a = _magnitudes(state)
    keep = rank_mask(a, state.order, n_bot + target, descending=False)
    if n_bot > 0:
        keep.logical_and_(rank_mask(a, state.order, n_bot, descending=False).logical_not_())
    return _rescaled(state, d * keep, rescale, False)


def _magnitudes(state: ExpertTensor) -> torch.Tensor:
    a = state.delta.abs()
    if a.device.type == "cpu" and a.dtype in (torch.float16, torch.bfloat16):
        a = a.float()
    return a


def _random(state: ExpertTensor, density: float, rescale: bool) -> torch.Tensor:
    d = state.delta
    if density >= 1:
        return d
    threshold = min(max(round(density * _Q_LEVELS), 0), _Q_LEVELS) - _Q_OFFSET
    return _rescaled(state, d * (state.draws < threshold), rescale, True)


def _della(state: ExpertTensor, density: float, epsilon: float, rescale: bool) -> torch.Tensor:
    d = state.delta
    if density >= 1:
        return d
    if density <= 0:
        return torch.zeros_like(d)
    ranks = state.ranks
    cols = ranks.shape[1]
    rank_norm = ranks.float() / (cols - 1) if cols > 1 else torch.zeros_like(ranks, dtype=torch.float32)
    p = (density - epsilon) + rank_norm * (2 * epsilon)
    keep = (state.draws.reshape(ranks.shape).float() + _Q_OFFSET) < p * _Q_LEVELS
    return _rescaled(state, d * keep.reshape(d.shape), rescale, True)


def sparsify(state: ExpertTensor, method: MethodSpec, params: dict, rescale: bool) -> torch.Tensor:
    sp = method.sparsifier
    density = params.get("density", 1.0)
    if sp is None:
        return state.delta
    if sp == MAGNITUDE:
        return _magnitude(state, density, rescale)
    if sp == RANDOM:
        return _random(state, density, rescale)
    if sp == OUTLIERS:
        return _outliers(state, density, params.get("gamma", 0.01), rescale)
    if sp == DELLA:
        return _della(state, density, params.get("epsilon", 0.15), rescale)
    raise AssertionError(sp)


# ---------------------------------------------------------------------------------------------
# Methods


def _accumulate(parts: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Sum in a fixed order with float32 (float64) accumulation, like torch's CPU sum over dim 0,
    but identical on every device."""
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    acc = parts[0].to(acc_dtype, copy=True)
    for p in parts[1:]:
        acc.add_(p)
    return acc.to(dtype)


def merge_task_arithmetic(method: MethodSpec, base: torch.Tensor, experts: Sequence[ExpertTensor],
                          model_params: Sequence[dict], global_params: dict) -> torch.Tensor:
    """task_arithmetic, ties, dare_*, breadcrumbs*, della*: base + lambda * mix(trimmed deltas)."""
    if not experts:
        return base
    dtype = base.dtype
    rescale = bool(global_params.get("rescale", method.rescale))
    normalize = bool(global_params.get("normalize", method.normalize))
    lam = float(global_params.get("lambda", 1.0))
    trimmed = [sparsify(s, method, p, rescale) for s, p in zip(experts, model_params)]
    # weights round to the merge dtype, as in mergekit
    w = torch.tensor([float(p["weight"]) for p in model_params], dtype=dtype, device=base.device)
    weighted = [t * w[i] for i, t in enumerate(trimmed)]
    if method.consensus:
        majority = _accumulate(weighted, dtype) >= 0
        majority_sign = majority.to(dtype) * 2 - 1
        masks = [torch.sign(t) == majority_sign for t in weighted]
        mixed = _accumulate([t * m for t, m in zip(weighted, masks)], dtype)
        divisor = _accumulate([m * w[i] for i, m in enumerate(masks)], dtype)
        divisor[divisor == 0] = 1
    else:
        mixed = _accumulate(weighted, dtype)
        divisor = _accumulate([w[i:i + 1] for i in range(len(trimmed))], dtype)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lam != 1:
        mixed *= lam
    return (base + mixed).to(dtype)


def merge_linear(tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool) -> torch.Tensor:
    """Weighted average, computed in float32 (float64 for float64 inputs)."""
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


_SLERP_CHUNK = 1024 * 1024


def merge_slerp(v0: torch.Tensor, v1: torch.Tensor, t: float, dot_threshold: float = 0.9995,
                eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation over the whole flattened tensor; v0 (the base) is the t = 0 end.
    Nearly parallel (or antipodal) tensors fall back to linear interpolation."""
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
