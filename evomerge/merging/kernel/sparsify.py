"""Sparsification primitives shared by the merge methods: exact k-th magnitudes and tie cuts
(TIES, breadcrumbs), seeded counter-based draws (DARE, DELLA), fixed-point L1 sums (exact in any
summation order), and DELLA's per-row magnitude ranks.

Deliberate differences from mergekit 0.1.5, documented in the README:
- among elements of exactly equal magnitude at a trimming threshold, the lowest flat index is
  kept first (mergekit's unstable argsort keeps an arbitrary subset);
- draws come from a seeded hash of the element index (mergekit uses the global RNG), with a
  resolution of 1/31744, so the same seed gives the same tensors on every run and device;
- L1 norms for DARE/DELLA rescaling are sums of fixed-point integers held exactly in float64.
"""

from __future__ import annotations

import copy
import hashlib
import math

import torch

from evomerge.merging.kernel import compile as kc

LEVELS = 31744  # draws are integers in [0, 0x7C00): as float16 bit patterns they are finite and ordered
_BLOCK = 65536
_SAMPLE = 64  # stride of the sampled magnitude order kept by the engine

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

    host = frozenset({"_cum", "_sampled", "_first"})  # lookups read on the host; they never move

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

    def to(self, device: torch.device | str, pin: bool = False) -> "MagnitudeOrder":
        """This order with its sorted magnitudes (its one device-side part, kept for wide floats)
        on ``device``, in pinned host memory with ``pin``; the histogram lookups stay on the host."""
        if self._sorted is None:
            return self
        moved = copy.copy(self)
        moved._sorted = self._sorted.to(device)
        if pin:
            moved._sorted = moved._sorted.pin_memory()
        return moved

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
        counts = kc.run(_block_ties, kc.compiled(_block_ties), m * _BLOCK, flat[:m * _BLOCK].view(m, _BLOCK), v)
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
    return (uniform16(index, seed) * LEVELS) >> 16


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
    top = float(kc.run(_max_abs, kc.compiled(_max_abs), delta.numel(), delta)) if delta.numel() else 0.0
    if top == 0.0 or not math.isfinite(top):
        return 0
    return 52 - max(1, delta.numel().bit_length()) - math.frexp(top)[1]


def to_fixed(magnitudes: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """Magnitudes as integer-valued float64 (``factor`` = 2**shift, so the scaling is exact)."""
    return torch.round(magnitudes.to(torch.float64) * factor)


def fixed_and_draws(d: torch.Tensor, factor: torch.Tensor, seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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


def fixed_l1(d: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return to_fixed(d.abs(), factor).sum()
