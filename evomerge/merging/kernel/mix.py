"""The mix of the task-arithmetic family: base + lambda * mix(trimmed, weighted task vectors).

Everything that does not depend on the recipe lives in an :class:`ExpertTensor`: the task vector
and the state the method's sparsifier prepared (a class of its own: magnitude order, L1 norms,
draws, ranks). The merge engine builds those once and reuses them for every recipe; ``evomerge
merge`` builds them per tensor. Both then run :func:`merge_task_arithmetic`, so they give the same
tensors.

The per-recipe work (trim, rescale, weight, elect signs, mix, normalize) is one pointwise function,
:func:`_mix`, compiled into a single fused loop (see :mod:`.compile`); the sparsifier's per-element
keep test is inlined into it. Numerics follow mergekit 0.1.5 operation by operation (dtypes,
rounding points, defaults); the deliberate differences are listed in :mod:`.sparsify`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import torch

from evomerge.merging.kernel import compile as kc
from evomerge.merging.kernel.sparsify import stream_seed, to_fixed

if TYPE_CHECKING:
    from evomerge.merging.methods.base import CachedState, MergeMethod


@dataclass
class ExpertTensor:
    """One expert's recipe-independent state for one tensor: its task vector (the expert tensor
    itself for linear and slerp), its stream seed and what its method's sparsifier prepared."""

    delta: torch.Tensor  # theta_expert - theta_base in the merge dtype
    seed: int = 0  # DARE/DELLA stream seed
    state: Optional["CachedState"] = None

    @property
    def nbytes(self) -> int:
        return self.delta.numel() * self.delta.element_size() + (self.state.nbytes if self.state else 0)

    @property
    def per_element(self) -> Optional[torch.Tensor]:
        return self.state.per_element if self.state else None

    def to(self, device: torch.device | str, pin: bool = False) -> "ExpertTensor":
        """This expert on ``device`` (pinned host memory with ``pin``), all but the host-side
        lookups its state names."""
        delta = self.delta.to(device)
        return replace(self, delta=delta.pin_memory() if pin else delta,
                       state=self.state.to(device, pin) if self.state else None)


def prepare_expert(delta: torch.Tensor, method: "MergeMethod", *, seed: int, tensor_name: str,
                   expert_index: int, reuse: bool = False, cache_draws: bool = False) -> ExpertTensor:
    """Compute what trimming needs. ``reuse``: the state serves many recipes, so TIES/breadcrumbs
    keep a sampled magnitude order (a tie cut becomes a lookup) and DARE a table of L1 norm by
    draw level (rescaling becomes a lookup). ``cache_draws`` keeps DARE's draws, hashed once
    (2 bytes per element), with that table: faster on CPUs without fast 64-bit multiplication."""
    stream = stream_seed(seed, tensor_name, expert_index)
    sp = method.sparsifier
    return ExpertTensor(delta=delta, seed=stream,
                        state=sp.prepare(delta, stream, reuse, cache_draws) if sp is not None else None)


@dataclass
class KeepRules:
    """Per-expert parameters of the keep mask, stacked as tensors (inputs of the fused kernel)."""

    v: Optional[torch.Tensor] = None  # magnitude thresholds
    j: Optional[torch.Tensor] = None  # tie bounds: elements equal to v are kept up to this flat index
    v2: Optional[torch.Tensor] = None  # breadcrumbs: lower boundary
    j2: Optional[torch.Tensor] = None
    seed: Optional[torch.Tensor] = None  # DARE/DELLA stream seeds (int64 holding 32 bits)
    lo: Optional[torch.Tensor] = None  # DARE: draw level; DELLA: keep probability at rank 0
    span: Optional[torch.Tensor] = None  # DELLA: keep probability range across ranks


def kept_l1(d: torch.Tensor, per_element: Optional[torch.Tensor], r: KeepRules, factor: torch.Tensor,
            offset: torch.Tensor, keep_fn: Callable) -> torch.Tensor:
    """Fixed-point L1 norm of one trimmed task vector (an exact integer sum, so any summation
    order gives the same value). ``r`` holds this expert's rule only."""
    keep = keep_fn(0, d, r, offset, per_element)
    return torch.where(keep, to_fixed(d.abs(), factor), 0).sum()


def one_rule(r: KeepRules, i: int) -> KeepRules:
    """The ``i``-th expert's rule alone."""
    return KeepRules(*(None if t is None else t[i:i + 1] for t in
                       (r.v, r.j, r.v2, r.j2, r.seed, r.lo, r.span)))


def _mix(out: torch.Tensor, base: torch.Tensor, deltas: list[torch.Tensor],
         per_element: list[Optional[torch.Tensor]], w: torch.Tensor,
         scale: Optional[torch.Tensor], lam: torch.Tensor, r: KeepRules, offset: torch.Tensor,
         keep_fn: Optional[Callable], fused_scale: bool, consensus: bool, normalize: bool, use_lambda: bool) -> None:
    """out = base + lambda * mix(trim(deltas) * w), every step rounded to the merge dtype where
    mergekit materializes a tensor of that dtype. ``keep_fn``: the sparsifier's keep test (None:
    keep all), which reads the expert's ``per_element`` state. ``fused_scale`` (DARE, DELLA):
    ``scale`` already includes the weight and is applied with one rounding."""
    dt = base.dtype
    acc_dt = torch.float64 if dt == torch.float64 else torch.float32

    def rounded(t: torch.Tensor) -> torch.Tensor:
        # where mergekit holds a tensor of the merge dtype; held on in acc_dt, which is exact, so
        # that selects and sums do not round again (values and eager results are the same)
        return t.to(dt).to(acc_dt)

    wa = w.to(acc_dt)
    xs = []
    for i, d in enumerate(deltas):
        keep = None if keep_fn is None else keep_fn(i, d, r, offset, per_element[i])
        if fused_scale:
            x = rounded(d.to(acc_dt) * scale[i])
        else:
            t = d.to(acc_dt) if scale is None else rounded(d.to(acc_dt) * scale[i])
            x = rounded(t * wa[i])
        xs.append(x if keep is None else torch.where(keep, x, 0))
    total = xs[0]
    for x in xs[1:]:
        total = total + x
    if consensus:
        positive = total >= 0
        masks = [torch.where(positive, x > 0, x < 0) for x in xs]
        mixed = torch.where(masks[0], xs[0], 0)
        divisor = torch.where(masks[0], wa[0], 0)
        for i in range(1, len(xs)):
            mixed = mixed + torch.where(masks[i], xs[i], 0)
            divisor = divisor + torch.where(masks[i], wa[i], 0)
        mixed = rounded(mixed)
        divisor = divisor.to(dt)
        divisor = torch.where(divisor == 0, 1, divisor).to(acc_dt)
    else:
        mixed = rounded(total)
        divisor = wa[0]
        for i in range(1, len(xs)):
            divisor = divisor + wa[i]
        divisor = divisor.to(dt)
        divisor = torch.where(divisor.abs() < 1e-8, 1, divisor).to(acc_dt)
    if normalize:
        mixed = rounded(mixed / divisor)
    if use_lambda:  # in the accumulation dtype: eager PyTorch does not round the factor to dt
        mixed = rounded(mixed * lam)
    out.copy_((base.to(acc_dt) + mixed).to(dt))


def merge_task_arithmetic(method: "MergeMethod", base: torch.Tensor, experts: Sequence[ExpertTensor],
                          model_params: Sequence[dict], global_params: dict,
                          out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """task_arithmetic, ties, dare_*, breadcrumbs*, della*: base + lambda * mix(trimmed deltas).
    Written into ``out`` (any dtype, e.g. a live parameter) when given."""
    if out is None:
        out = torch.empty_like(base)
    if not experts:
        out.copy_(base)
        return out
    dtype, n, dev = base.dtype, base.numel(), base.device
    acc_dt = torch.float64 if dtype == torch.float64 else torch.float32
    sp = method.sparsifier
    rescale = bool(global_params.get("rescale", method.rescale)) and sp is not None
    normalize = bool(global_params.get("normalize", method.normalize))
    lam = float(global_params.get("lambda", 1.0))
    deltas = [s.delta.reshape(-1) for s in experts]
    per_element = [s.per_element for s in experts]
    rules = sp.rules(experts, model_params) if sp is not None else KeepRules()
    # weights round to the merge dtype, as in mergekit
    w = torch.tensor([float(p["weight"]) for p in model_params], dtype=dtype, device=dev)
    scale = None
    fused = False
    if rescale:
        ratios = [sp.norm_ratio(s, p, deltas[i], rules, i) for i, (s, p) in enumerate(zip(experts, model_params))]
        if sp.random:  # one factor, one rounding
            ratios = [r * float(wi) for r, wi in zip(ratios, w.tolist())]
            fused = True
        scale = torch.tensor(ratios, dtype=acc_dt, device=dev)
    lam_t = torch.tensor(lam, dtype=acc_dt, device=dev)
    zero = torch.zeros((), dtype=torch.int64, device=dev)
    flat_out, flat_base = out.reshape(-1), base.reshape(-1)
    statics = (sp.keep if sp is not None else None, fused, method.consensus, normalize, lam != 1)
    kc.run(_mix, kc.compiled(_mix), n, flat_out, flat_base, deltas, per_element, w, scale, lam_t, rules,
           zero, *statics, writes_first=True)
    return out
