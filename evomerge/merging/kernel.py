"""The merge kernel: one output tensor from a base tensor and the experts' task vectors.

Everything that does not depend on the recipe lives in an :class:`ExpertTensor` (the task vector,
its magnitude histogram, the L1 norm used by rescaling, DELLA's per-row ranks). The merge engine
builds those once and reuses them for every recipe; ``evomerge merge`` builds them per tensor.
Both then run the same functions here, so they give the same tensors.

The per-recipe work (trim, rescale, weight, elect signs, mix, normalize) is one pointwise
function, :func:`_mix`, compiled with ``torch.compile`` into a single fused loop (C++ on the CPU,
Triton on CUDA). Compilation keeps eager PyTorch's rounding (``emulate_precision_casts``); the
first call of every compiled variant is checked bit for bit against eager PyTorch (on the first
128Ki elements of a larger call), and a variant that differs (older compilers, FMA contraction)
runs eagerly. Set ``EVOMERGE_COMPILE=0`` to run eagerly throughout.

Numerics follow mergekit 0.1.5 operation by operation (dtypes, rounding points, defaults), with
deliberate differences, all documented in the README:
- among elements of exactly equal magnitude at a trimming threshold, the lowest flat index is
  kept first (mergekit's unstable argsort keeps an arbitrary subset);
- DARE and DELLA draw from a seeded counter-based hash of the element index (mergekit uses the
  global RNG), with a resolution of 1/31744, so the same seed gives the same tensors on every run
  and device;
- for DARE and DELLA, L1 norms for rescaling are sums of fixed-point integers held exactly in
  float64 (independent of summation order).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import warnings
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Callable, Optional, Sequence

import torch

from evomerge.merging.methods import DELLA, MAGNITUDE, OUTLIERS, RANDOM, MethodSpec

log = logging.getLogger(__name__)

_LEVELS = 31744  # draws are integers in [0, 0x7C00): as float16 bit patterns they are finite and ordered
_COMPILE_MIN_NUMEL = 2048  # smaller tensors run eagerly (same results, no compile per tiny shape)
_VERIFY_NUMEL = 1 << 17  # a compiled variant is checked against eager on at most this many elements
_BLOCK = 65536
_SAMPLE = 64  # stride of the sampled magnitude order kept by the engine


# ---------------------------------------------------------------------------------------------
# Compilation


def _compile_enabled() -> bool:
    return os.environ.get("EVOMERGE_COMPILE", "1") != "0"


_compile_failed = False
# per compiled variant (function, argument dtypes, flags): whether its first result equalled eager's
_verified: dict[tuple, bool] = {}


def _signature(fn: Callable, args: tuple) -> tuple:
    def sig(a):
        if isinstance(a, torch.Tensor):
            return ("T", a.dtype, a.device.type, a.dim())
        if isinstance(a, (list, tuple)):
            return tuple(sig(x) for x in a)
        if a is None or isinstance(a, (bool, int, str)):
            return a
        if isinstance(a, KeepRules):
            return tuple(sig(t) for t in (a.v, a.j, a.v2, a.j2, a.seed, a.lo, a.span))
        return type(a).__name__
    return (fn.__qualname__, *(sig(a) for a in args))


def _bits_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.dtype.is_floating_point:  # NaNs compare by bit pattern
            ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
            return torch.equal(a.view(ints), b.view(ints))
        return torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_bits_equal(x, y) for x, y in zip(a, b))
    return a == b


def _prefix(a, numel: int, k: int):
    """``a`` cut to the first ``k`` of ``numel`` elements: every tensor of ``numel`` elements (1-D,
    or rows of a 2-D view) in ``a``, which may be a list; everything else as it is. A cut is a
    view only where the tensor is one (the compiled graph's guards tell views from tensors)."""
    if isinstance(a, torch.Tensor) and a.dim() and a.numel() == numel:
        cut = a[:max(1, k // max(1, a[0].numel()))]
        return cut if a._base is not None else cut.clone()
    if isinstance(a, list):
        return [_prefix(x, numel, k) for x in a]
    return a


_FAILED = object()


def _try_compiled(compiled: Callable, args: tuple):
    """``compiled(*args)``, or ``_FAILED`` (logged) where compilation is impossible here."""
    global _compile_failed
    try:
        return compiled(*args)
    except Exception as e:  # no C++ compiler, unsupported device...: same results, eagerly
        _compile_failed = True
        log.warning("torch.compile failed (%s: %s); the merge kernel runs eagerly from now on",
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return _FAILED


def _run(fn: Callable, compiled: Callable, numel: int, *args, writes_first: bool = False):
    """Run the compiled version of ``fn`` for large tensors, the eager one otherwise.

    The first call of each variant is also run eagerly, on its first ``_VERIFY_NUMEL`` elements
    (``fn`` is elementwise, or reduces exactly: integer counts, maxima, fixed-point sums), and
    the bit patterns are compared: a compiler that does not keep eager rounding (an older
    inductor, FMA contraction) is caught there, logged, and that variant runs eagerly from then
    on. ``writes_first``: ``fn`` returns nothing and writes its result into ``args[0]``."""
    if numel < _COMPILE_MIN_NUMEL or _compile_failed or not _compile_enabled():
        return fn(*args)
    key = _signature(fn, args)
    if _verified.get(key) is False:
        return fn(*args)
    if key not in _verified:
        sample = tuple(_prefix(a, numel, _VERIFY_NUMEL) for a in args)
        got = _try_compiled(compiled, sample)
        if got is _FAILED:
            return fn(*args)
        if writes_first:
            got, ref = sample[0], torch.empty_like(sample[0])
            fn(ref, *sample[1:])
        else:
            ref = fn(*sample)
        _verified[key] = _bits_equal(got, ref)
        if not _verified[key]:
            log.warning("the compiled %s rounds differently from eager PyTorch on %s (torch %s); "
                        "this variant runs eagerly from now on", fn.__name__, key[1:], torch.__version__)
            return fn(*args)
    result = _try_compiled(compiled, args)
    return fn(*args) if result is _FAILED else result


@lru_cache(maxsize=None)
def _compiled(fn: Callable) -> Callable:
    import torch._dynamo.config as dynamo_config

    # one compiled graph per method variant, dtype and expert count: allow more than the default 8
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 128))
    # the engine's DARE draws are float16 beside bfloat16 tensors; inductor warns of the mix but
    # still emits one vectorized loop
    warnings.filterwarnings("ignore", message="bf16 and fp16 are mixed in the scheduler node")
    return torch.compile(fn, dynamic=True, options={"emulate_precision_casts": True})


# ---------------------------------------------------------------------------------------------
# Magnitude order (TIES, breadcrumbs)


def _sort_keys(a: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Integer keys ordered like the non-negative floats in ``a``: the 16-bit pattern for 16-bit
    floats, the top 16 bits of the magnitude for 32/64-bit floats (a bucket, refined on query)."""
    if a.element_size() == 2:
        return a.view(torch.int16).to(torch.int32), 0
    if a.dtype == torch.float32:
        return a.view(torch.int32) >> 15, 15
    return (a.view(torch.int64) >> 47).to(torch.int32), 47


class MagnitudeOrder:
    """The k-th largest / smallest magnitude of a tensor, from a 16-bit histogram built in one
    pass. For 16-bit floats the histogram is exact; for wider floats a query refines its bucket
    with one selection pass. Every answer is exact."""

    def __init__(self, magnitudes: torch.Tensor, positions: bool = False):
        keys, self._shift = _sort_keys(magnitudes.reshape(-1))
        self.numel = magnitudes.numel()
        self.dtype = magnitudes.dtype
        self._sampled = self._first = self._sorted = None
        if positions and self._shift != 0:
            # serving many queries: keep the sorted magnitudes, so a query is a lookup
            self._sorted = torch.sort(magnitudes.reshape(-1)).values
            self._cum = torch.zeros(0, dtype=torch.int64)
            return
        counts = torch.bincount(keys, minlength=32768 if self._shift == 0 else 65536)
        self._cum = torch.cumsum(counts, 0).cpu()
        if positions and self._shift == 0:
            # every _SAMPLE-th flat index in (magnitude, index) order, and each magnitude's first
            order = torch.sort(keys, stable=True).indices
            self._sampled = order[::_SAMPLE].to(torch.int32).cpu()
            starts = (self._cum.to(keys.device) - counts).clamp(max=self.numel - 1)
            self._first = order[starts].to(torch.int32).cpu()

    @property
    def nbytes(self) -> int:
        extra = sum(t.numel() * t.element_size() for t in (self._sampled, self._first, self._sorted) if t is not None)
        return self._cum.numel() * 8 + extra

    def nth_equal(self, d: torch.Tensor, v: torch.Tensor, nth: int) -> int:
        """Flat index of the ``nth`` (1-based) element of ``d`` whose magnitude is ``v``."""
        if self._sampled is None:
            return nth_equal_index(d, v, nth)
        j = int(v.view(torch.int16))
        group = int(self._cum[j - 1]) if j > 0 else 0  # position of v's first element in the order
        pos = group + nth - 1
        sample = pos - pos % _SAMPLE
        if sample >= group:
            start, rest = int(self._sampled[pos // _SAMPLE]), pos - sample
        else:
            start, rest = int(self._first[j]), pos - group
        if rest == 0:
            return start
        flat = d.reshape(-1)
        window = 4096
        while True:  # the next `rest` elements equal to v after `start`
            hits = torch.nonzero(flat[start + 1:start + 1 + window].abs() == v).reshape(-1)
            if hits.numel() >= rest or start + 1 + window >= flat.numel():
                return start + 1 + int(hits[rest - 1])
            window *= 8

    def kth(self, d: torch.Tensor, k: int, descending: bool) -> tuple[torch.Tensor, int, int]:
        """(v, n_before, n_at) for 1 <= k <= numel: the k-th magnitude of ``d`` in the given
        order, how many elements come strictly before it in that order, and how many equal it."""
        n = self.numel
        pos = n - k + 1 if descending else k  # ascending position, 1-based
        if self._sorted is not None:
            v = self._sorted[pos - 1]
            n_lt = int(torch.searchsorted(self._sorted, v.reshape(1))[0])
            n_at = int(torch.searchsorted(self._sorted, v.reshape(1), right=True)[0]) - n_lt
            n_before = n - n_lt - n_at if descending else n_lt
            return v.to(d.device), n_before, n_at
        cum = self._cum
        j = int(torch.searchsorted(cum, torch.tensor([pos])).item())
        n_lt = int(cum[j - 1]) if j > 0 else 0
        if self._shift == 0:
            v = torch.tensor(j, dtype=torch.int16).view(self.dtype).to(d.device)
            n_at = int(cum[j]) - n_lt
        else:
            flat = d.reshape(-1).abs()
            keys, _ = _sort_keys(flat)
            bucket = torch.sort(flat[keys == j]).values
            v = bucket[pos - n_lt - 1]
            n_at = int((bucket == v).sum())
            n_lt += int((bucket < v).sum())
        n_before = n - n_lt - n_at if descending else n_lt
        return v, n_before, n_at


def _block_ties(d: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (d.abs() == v).sum(1, dtype=torch.int64)


def nth_equal_index(d: torch.Tensor, v: torch.Tensor, nth: int) -> int:
    """Flat index of the ``nth`` (1-based) element of ``d`` whose magnitude equals ``v``."""
    flat = d.reshape(-1)
    m = flat.numel() // _BLOCK
    base = 0
    if m:
        counts = _run(_block_ties, _compiled(_block_ties), m * _BLOCK, flat[:m * _BLOCK].view(m, _BLOCK), v)
        cum = torch.cumsum(counts, 0).cpu()
        b = int(torch.searchsorted(cum, torch.tensor([nth])).item())
        if b < m:
            before = int(cum[b - 1]) if b > 0 else 0
            hits = torch.nonzero(flat[b * _BLOCK:(b + 1) * _BLOCK].abs() == v).reshape(-1)
            return b * _BLOCK + int(hits[nth - before - 1])
        base, nth = m * _BLOCK, nth - int(cum[-1])
    hits = torch.nonzero(flat[base:].abs() == v).reshape(-1)
    return base + int(hits[nth - 1])


def first_k_rule(d: torch.Tensor, order: MagnitudeOrder, k: int, descending: bool) -> tuple[torch.Tensor, int]:
    """(v, J) such that the first k elements of ``d`` by magnitude in the order (ties broken by
    lowest index) are those strictly beyond v plus those equal to v with index <= J."""
    if k <= 0:  # nothing: no element is beyond +inf, none equals it at index <= -1
        return torch.tensor(float("inf") if descending else -1.0, dtype=d.dtype, device=d.device), -1
    if k >= d.numel():  # everything: every magnitude is beyond -1 (descending) / below +inf
        return torch.tensor(-1.0 if descending else float("inf"), dtype=d.dtype, device=d.device), -1
    v, n_before, n_at = order.kth(d, k, descending)
    need = k - n_before
    return v, (d.numel() if need >= n_at else order.nth_equal(d, v, need))


# ---------------------------------------------------------------------------------------------
# Seeded draws (DARE, DELLA)


def stream_seed(seed: int, tensor_name: str, expert_index: int) -> int:
    """A 32-bit seed for one expert's draws on one tensor, stable across runs and platforms."""
    h = hashlib.blake2b(f"{seed}\x00{tensor_name}\x00{expert_index}".encode(), digest_size=4)
    return int.from_bytes(h.digest(), "little")


_M32 = 0xFFFFFFFF


def uniform16(index: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """16-bit uniform integers from a counter-based hash of (index, seed). int64 arithmetic on
    values below 2**32 with multipliers below 2**31 never overflows, so every device computes
    the same bits (no reliance on wrapping, which compilers may assume away)."""
    x = (index * 0x61C88647 + seed) & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _M32
    x = x ^ (x >> 16)
    return x & 0xFFFF


def draws15(index: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """Seeded uniform integers in [0, 31744) (int64)."""
    return (uniform16(index, seed) * _LEVELS) >> 16


def draws_as_half(draws: torch.Tensor) -> torch.Tensor:
    """Draws stored as float16 bit patterns: 2 bytes each, compared as floats (fast everywhere)."""
    return draws.to(torch.int16).view(torch.float16)


def half_threshold(level: int, device: torch.device) -> torch.Tensor:
    """The float16 whose bit pattern is ``level``: draws below it are the draws below ``level``
    (level 31744 is +inf: every draw)."""
    return torch.tensor(level, dtype=torch.int16).view(torch.float16).to(device)


def _max_abs(d: torch.Tensor) -> torch.Tensor:
    return d.abs().amax()


def fixed_shift(delta: torch.Tensor) -> int:
    """Binary scale of the fixed-point L1 sums: every partial sum is an integer below 2**53, so
    float64 holds it exactly and any summation order gives the same value."""
    top = float(_run(_max_abs, _compiled(_max_abs), delta.numel(), delta)) if delta.numel() else 0.0
    if top == 0.0 or not math.isfinite(top):
        return 0
    return 52 - max(1, delta.numel().bit_length()) - math.frexp(top)[1]


def to_fixed(magnitudes: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """Magnitudes as integer-valued float64 (``factor`` = 2**shift, so the scaling is exact)."""
    return torch.round(magnitudes.to(torch.float64) * factor)


def _fixed_and_draws(d: torch.Tensor, factor: torch.Tensor, seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return to_fixed(d.abs(), factor), draws15(torch.arange(d.numel(), device=d.device), seed)


def row_rank_norm(delta: torch.Tensor) -> torch.Tensor:
    """DELLA's per-row magnitude rank scaled to [0, 1] (1-D tensors form one row), float32."""
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    cols = rows.shape[1]
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    ranks = torch.empty(rows.shape, dtype=torch.float32, device=rows.device)
    ranks.scatter_(1, order, torch.arange(cols, dtype=torch.float32, device=rows.device).expand_as(order).contiguous())
    if cols > 1:
        ranks /= cols - 1
    return ranks.reshape(-1)


# ---------------------------------------------------------------------------------------------
# Recipe-independent state


@dataclass
class ExpertTensor:
    """One expert's recipe-independent state for one tensor."""

    delta: torch.Tensor  # theta_expert - theta_base in the merge dtype (the expert tensor for linear/slerp)
    order: Optional[MagnitudeOrder] = None
    rank_norm: Optional[torch.Tensor] = None  # DELLA
    l1: Optional[torch.Tensor] = None  # ||delta||_1 in the merge dtype (deterministic methods, like mergekit)
    seed: int = 0  # DARE/DELLA stream seed
    shift: int = 0  # DARE/DELLA: fixed-point scale of the L1 sums
    l1_fixed: float = 0.0  # DARE/DELLA: ||delta||_1 in fixed point (an integer)
    kept_l1: Optional[torch.Tensor] = None  # DARE: fixed-point L1 of the elements whose draw is < level, per level
    draws: Optional[torch.Tensor] = None  # DARE: cached draws (float16 patterns); None: hashed in the kernel

    @property
    def nbytes(self) -> int:
        n = self.delta.numel() * self.delta.element_size()
        for t in (self.rank_norm, self.draws, self.kept_l1):
            if t is not None:
                n += t.numel() * t.element_size()
        return n + (self.order.nbytes if self.order is not None else 0)

    def to(self, device: torch.device | str, pin: bool = False) -> "ExpertTensor":
        def move(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            if t is None:
                return None
            t = t.to(device)
            return t.pin_memory() if pin else t

        return replace(self, delta=move(self.delta), rank_norm=move(self.rank_norm), draws=move(self.draws),
                       l1=self.l1.to(device) if self.l1 is not None else None)


def prepare_expert(delta: torch.Tensor, method: MethodSpec, *, seed: int, tensor_name: str,
                   expert_index: int, reuse: bool = False, cache_draws: bool = False) -> ExpertTensor:
    """Compute what trimming needs. ``reuse``: the state serves many recipes, so TIES/breadcrumbs
    keep a sampled magnitude order (a tie cut becomes a lookup) and DARE a table of L1 norm by
    draw level (rescaling becomes a lookup). ``cache_draws`` keeps DARE's draws, hashed once
    (2 bytes per element), with that table: faster on CPUs without fast 64-bit multiplication."""
    state = ExpertTensor(delta=delta, seed=stream_seed(seed, tensor_name, expert_index))
    sp = method.sparsifier
    if sp in (MAGNITUDE, OUTLIERS):
        magnitudes = delta.abs()
        state.order = MagnitudeOrder(magnitudes, positions=reuse)
        state.l1 = magnitudes.sum()
    if sp in (RANDOM, DELLA):
        flat = delta.reshape(-1)
        state.shift = fixed_shift(flat)
        factor = torch.tensor(2.0 ** state.shift, dtype=torch.float64, device=flat.device)
        if sp == RANDOM and (reuse or cache_draws):
            fixed, draws = _run(_fixed_and_draws, _compiled(_fixed_and_draws), flat.numel(), flat, factor,
                                torch.tensor(state.seed, device=flat.device))
            state.kept_l1 = torch.cumsum(torch.bincount(draws, weights=fixed, minlength=_LEVELS), 0).cpu()
            state.l1_fixed = float(state.kept_l1[-1])
            if cache_draws:
                state.draws = draws_as_half(draws)
        else:
            state.l1_fixed = float(_run(_fixed_l1, _compiled(_fixed_l1), flat.numel(), flat, factor))
    if sp == DELLA:
        state.rank_norm = row_rank_norm(delta)
    return state


# ---------------------------------------------------------------------------------------------
# Per-recipe trimming rules


@dataclass
class KeepRules:
    """Per-expert parameters of the keep mask, stacked as tensors (inputs of the fused kernel)."""

    v: Optional[torch.Tensor] = None  # magnitude thresholds
    j: Optional[torch.Tensor] = None  # tie index bounds
    v2: Optional[torch.Tensor] = None  # breadcrumbs: lower boundary
    j2: Optional[torch.Tensor] = None
    seed: Optional[torch.Tensor] = None  # DARE/DELLA stream seeds (int64 holding 32 bits)
    lo: Optional[torch.Tensor] = None  # DARE: draw level; DELLA: keep probability at rank 0
    span: Optional[torch.Tensor] = None  # DELLA: keep probability range across ranks


def keep_rules(method: MethodSpec, experts: Sequence[ExpertTensor], params: Sequence[dict]) -> KeepRules:
    sp = method.sparsifier
    dev = experts[0].delta.device
    dtype = experts[0].delta.dtype
    if sp == MAGNITUDE:
        vs, js = [], []
        for s, p in zip(experts, params):
            d, n = p["density"], s.delta.numel()
            k = n if d >= 1 else (0 if d <= 0 else max(1, int(d * n)))
            v, j = first_k_rule(s.delta, s.order, k, descending=True)
            vs.append(v)
            js.append(j)
        return KeepRules(v=torch.stack(vs).to(dtype), j=torch.tensor(js, device=dev))
    if sp == OUTLIERS:
        v_hi, j_hi, v_lo, j_lo = [], [], [], []
        for s, p in zip(experts, params):
            d, n = p["density"], s.delta.numel()
            if d >= 1:
                bot, top = 0, n
            else:
                target = int(d * n)
                bot = max(0, n - target - int(p["gamma"] * n))
                top = bot + target
            v, j = first_k_rule(s.delta, s.order, top, descending=False)
            v_hi.append(v)
            j_hi.append(j)
            v, j = first_k_rule(s.delta, s.order, bot, descending=False)
            v_lo.append(v)
            j_lo.append(j)
        return KeepRules(v=torch.stack(v_hi).to(dtype), j=torch.tensor(j_hi, device=dev),
                         v2=torch.stack(v_lo).to(dtype), j2=torch.tensor(j_lo, device=dev))
    seeds = torch.tensor([s.seed for s in experts], dtype=torch.int64, device=dev)
    if sp == RANDOM:
        levels = dare_levels(params)
        return KeepRules(seed=seeds, lo=torch.tensor(levels, dtype=torch.int64, device=dev),
                         v=torch.stack([half_threshold(x, dev) for x in levels]))
    if sp == DELLA:
        lo, span = [], []
        for p in params:
            d, e = p["density"], p["epsilon"]
            if d >= 1:
                lo.append(2.0), span.append(0.0)  # every draw is below 2 * 31744
            elif d <= 0:
                lo.append(0.0), span.append(0.0)  # no draw is below 0
            else:
                lo.append(d - e), span.append(2 * e)
        return KeepRules(seed=seeds, lo=torch.tensor(lo, dtype=torch.float32, device=dev),
                         span=torch.tensor(span, dtype=torch.float32, device=dev))
    return KeepRules()


def dare_levels(params: Sequence[dict]) -> list[int]:
    """DARE keeps an element when its draw is below round(density * 31744)."""
    return [min(max(round(p["density"] * _LEVELS), 0), _LEVELS) for p in params]


def _keep(sp: Optional[str], i: int, d: torch.Tensor, r: KeepRules, offset: torch.Tensor,
          rank_norm: Optional[torch.Tensor], draws: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Expert i's keep mask on a segment starting at flat index ``offset``. For TIES and
    breadcrumbs, ``r.j``/``r.j2`` say whether elements equal to the threshold are kept in this
    segment (segments are cut at the tie indices, so no per-element index test is needed)."""
    if sp == MAGNITUDE:
        a = d.abs()
        return (a > r.v[i]) | ((a == r.v[i]) & r.j[i])
    if sp == OUTLIERS:
        a = d.abs()
        below_hi = (a < r.v[i]) | ((a == r.v[i]) & r.j[i])
        below_lo = (a < r.v2[i]) | ((a == r.v2[i]) & r.j2[i])
        return below_hi & ~below_lo
    if sp == RANDOM and draws is not None:
        return draws < r.v[i]
    if sp in (RANDOM, DELLA):
        u = draws15(torch.arange(d.numel(), device=d.device) + offset, r.seed[i])
        if sp == RANDOM:
            return u < r.lo[i]
        return u.float() < (r.lo[i] + rank_norm * r.span[i]) * _LEVELS
    return None


def _fixed_l1(d: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return to_fixed(d.abs(), factor).sum()


def _kept_l1(d: torch.Tensor, rank_norm: Optional[torch.Tensor], r: KeepRules, factor: torch.Tensor,
             offset: torch.Tensor, sp: str) -> torch.Tensor:
    """Fixed-point L1 norm of one trimmed task vector (an exact integer sum, so any summation
    order gives the same value). ``r`` holds this expert's rule only."""
    keep = _keep(sp, 0, d, r, offset, rank_norm, None)
    return torch.where(keep, to_fixed(d.abs(), factor), 0).sum()


def _one(r: KeepRules, i: int) -> KeepRules:
    return KeepRules(*(None if t is None else t[i:i + 1] for t in
                       (r.v, r.j, r.v2, r.j2, r.seed, r.lo, r.span)))


def _mix(out: torch.Tensor, base: torch.Tensor, deltas: list[torch.Tensor],
         rank_norms: list[Optional[torch.Tensor]], draws: list[Optional[torch.Tensor]], w: torch.Tensor,
         scale: Optional[torch.Tensor], lam: torch.Tensor, r: KeepRules, offset: torch.Tensor,
         sp: Optional[str], fused_scale: bool, consensus: bool, normalize: bool, use_lambda: bool) -> None:
    """out = base + lambda * mix(trim(deltas) * w), every step rounded to the merge dtype where
    mergekit materializes a tensor of that dtype. ``fused_scale`` (DARE, DELLA): ``scale`` already
    includes the weight and is applied with one rounding."""
    dt = base.dtype
    acc_dt = torch.float64 if dt == torch.float64 else torch.float32

    def rounded(t: torch.Tensor) -> torch.Tensor:
        # where mergekit holds a tensor of the merge dtype; held on in acc_dt, which is exact, so
        # that selects and sums do not round again (values and eager results are the same)
        return t.to(dt).to(acc_dt)

    wa = w.to(acc_dt)
    xs = []
    for i, d in enumerate(deltas):
        keep = _keep(sp, i, d, r, offset, rank_norms[i], draws[i])
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


# ---------------------------------------------------------------------------------------------
# Methods


def _tie_segments(n: int, rules: KeepRules) -> list[tuple[int, int, KeepRules]]:
    """Cut [0, n) at every tie index so that within a segment each expert either keeps or drops
    all elements equal to its threshold; the rules' ``j``/``j2`` become those per-segment flags."""
    cuts = {0, n}
    lists = [rules.j.tolist()] + ([rules.j2.tolist()] if rules.j2 is not None else [])
    for js in lists:
        cuts.update(j + 1 for j in js if 0 < j + 1 < n)
    bounds = sorted(cuts)
    out = []
    for s, e in zip(bounds, bounds[1:]):
        flags = [torch.tensor([s <= j for j in js], device=rules.v.device) for js in lists]
        out.append((s, e, KeepRules(v=rules.v, j=flags[0], v2=rules.v2, j2=flags[1] if len(flags) > 1 else None)))
    return out


def merge_task_arithmetic(method: MethodSpec, base: torch.Tensor, experts: Sequence[ExpertTensor],
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
    ranks = [s.rank_norm for s in experts]
    draws = [s.draws for s in experts]
    rules = keep_rules(method, experts, model_params)
    zero = torch.zeros((), dtype=torch.int64, device=dev)
    # weights round to the merge dtype, as in mergekit
    w = torch.tensor([float(p["weight"]) for p in model_params], dtype=dtype, device=dev)
    scale = None
    fused = False
    if rescale:
        ratios = []
        for i, (s, p) in enumerate(zip(experts, model_params)):
            if method.is_random:
                if s.kept_l1 is not None:
                    level = dare_levels([p])[0]
                    after = float(s.kept_l1[level - 1]) if level > 0 else 0.0
                else:
                    factor = torch.tensor(2.0 ** s.shift, dtype=torch.float64, device=dev)
                    after = float(_run(_kept_l1, _compiled(_kept_l1), n, deltas[i], ranks[i], _one(rules, i),
                                       factor, zero, sp))
                tiny = 1e-7 * 2.0 ** s.shift
                ratios.append(1.0 if (s.l1_fixed < tiny or after < tiny) else s.l1_fixed / after)
            else:  # mergekit's numerics: norms and their ratio in the merge dtype
                mask = torch.cat([_keep(sp, i, deltas[i][a:b], r, zero, None, None)
                                  for a, b, r in _tie_segments(n, rules)])
                after = (deltas[i] * mask).abs().sum()
                ratios.append(1.0 if (s.l1 < 1e-7 or after < 1e-7) else float(s.l1 / after))
        if method.is_random:  # one factor, one rounding
            ratios = [r * float(wi) for r, wi in zip(ratios, w.tolist())]
            fused = True
        scale = torch.tensor(ratios, dtype=acc_dt, device=dev)
    lam_t = torch.tensor(lam, dtype=acc_dt, device=dev)
    flat_out, flat_base = out.reshape(-1), base.reshape(-1)
    statics = (sp, fused, method.consensus, normalize, lam != 1)
    if sp in (MAGNITUDE, OUTLIERS):
        for a, b, r in _tie_segments(n, rules):
            _run(_mix, _compiled(_mix), b - a, flat_out[a:b], flat_base[a:b], [d[a:b] for d in deltas],
                 ranks, draws, w, scale, lam_t, r, zero, *statics, writes_first=True)
    else:
        _run(_mix, _compiled(_mix), n, flat_out, flat_base, deltas, ranks, draws, w, scale, lam_t, rules,
             zero, *statics, writes_first=True)
    return out


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
