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
from typing import Optional

import torch

from evomerge.merging.kernel import compile as kc

LEVELS = 31744  # draws are integers in [0, 0x7C00): as float16 bit patterns they are finite and ordered
_BLOCK = 65536
_SAMPLE = 64  # stride of the sampled magnitude order kept by the engine (16-bit floats)
_GATHER = 4096  # most magnitudes a wide-float bucket refinement gathers at once

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
    pass. For 16-bit floats the histogram is exact; for wider floats a query refines its bucket.
    Every answer is exact.

    With ``positions`` (an engine's state, serving many queries) a tie cut is a lookup, not a scan
    of the tensor: 16-bit floats keep every ``_SAMPLE``-th flat index in (magnitude, index) order
    and each magnitude's first; wider floats keep the whole order (4 bytes an element), in which a
    bucket is refined by gathering at most ``_GATHER`` magnitudes at a time."""

    host = frozenset({"_cum", "_sampled", "_first"})  # lookups read on the host; they never move

    def __init__(self, magnitudes: torch.Tensor, positions: bool = False):
        flat = magnitudes.reshape(-1)
        keys, self._shift = _sort_keys(flat)
        self.numel = magnitudes.numel()
        self.dtype = magnitudes.dtype
        self._sampled = self._first = self._order = None
        counts = torch.bincount(keys, minlength=32768 if self._shift == 0 else 65536)
        self._cum = torch.cumsum(counts, 0).cpu()
        if not positions:
            return
        if self._shift != 0:  # (magnitude, index) order: equal magnitudes stay in index order
            order = torch.sort(flat, stable=True).indices
            self._order = order.to(torch.int32) if self.numel < 2**31 else order
            return
        order = torch.sort(keys, stable=True).indices
        self._sampled = order[::_SAMPLE].to(torch.int32).cpu()
        starts = (self._cum.to(keys.device) - counts).clamp(max=self.numel - 1)
        self._first = order[starts].to(torch.int32).cpu()

    def to(self, device: torch.device | str, pin: bool = False) -> "MagnitudeOrder":
        """This order with its one device-side part (the full order, kept for wide floats) on
        ``device``, in pinned host memory with ``pin``; the histogram lookups stay on the host."""
        if self._order is None:
            return self
        moved = copy.copy(self)
        moved._order = self._order.to(device)
        if pin:
            moved._order = moved._order.pin_memory()
        return moved

    @property
    def nbytes(self) -> int:
        extra = sum(t.numel() * t.element_size() for t in (self._sampled, self._first, self._order) if t is not None)
        return self._cum.numel() * 8 + extra

    def _bucket(self, j: int) -> tuple[int, int]:
        """Ascending positions [lo, hi) of histogram bucket ``j``."""
        cum = self._cum.numpy()  # a view: host lookups without torch's per-call cost
        return (int(cum[j - 1]) if j > 0 else 0), int(cum[j])

    def _search(self, flat: torch.Tensor, lo: int, hi: int, v: torch.Tensor, right: bool) -> int:
        """``searchsorted`` over the ascending magnitudes at order positions [lo, hi), gathering
        at most ``_GATHER`` of them at a time: the first position whose magnitude is >= v (> v
        with ``right``)."""
        while True:
            step = max(1, -(-(hi - lo) // _GATHER))
            probe = flat[self._order[lo:hi:step]].abs()
            i = int(torch.searchsorted(probe, v.reshape(1), right=right)[0])
            if step == 1:
                return lo + i
            # the answer is after the (i-1)-th probe and at or before the i-th
            lo, hi = (lo + (i - 1) * step + 1 if i else lo), min(hi, lo + i * step)

    def _unique_at(self, d: torch.Tensor, pos: int) -> Optional[torch.Tensor]:
        """The magnitude at ascending position ``pos`` (1-based) where its neighbours in the order
        differ from it (no tie: the common case of wide floats), read in one gather of three."""
        a, b = max(pos - 2, 0), min(pos + 1, self.numel)
        near = d.reshape(-1)[self._order[a:b]].abs()
        vals, i = near.tolist(), pos - 1 - a
        if (i == 0 or vals[i - 1] < vals[i]) and (i == len(vals) - 1 or vals[i] < vals[i + 1]):
            return near[i]
        return None

    def nth_equal(self, d: torch.Tensor, v: torch.Tensor, nth: int, n_lt: Optional[int] = None) -> int:
        """Flat index of the ``nth`` (1-based) element of ``d`` whose magnitude is ``v`` (``n_lt``:
        how many magnitudes are below v, where the caller knows)."""
        flat = d.reshape(-1)
        if self._order is not None:
            if n_lt is None:
                lo, hi = self._bucket(int(_sort_keys(v.reshape(1))[0]))
                n_lt = self._search(flat, lo, hi, v, right=False)
            return int(self._order[n_lt + nth - 1])
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
        j = int(self._cum.numpy().searchsorted(pos))
        lo, hi = self._bucket(j)
        if self._shift == 0:
            v = torch.tensor(j, dtype=torch.int16).view(self.dtype).to(d.device)
            n_lt, n_at = lo, hi - lo
        elif self._order is not None and (unique := self._unique_at(d, pos)) is not None:
            v, n_lt, n_at = unique, pos - 1, 1
        elif self._order is not None and hi - lo <= _GATHER:  # the bucket in one gather
            bucket = d.reshape(-1)[self._order[lo:hi]].abs()
            v = bucket[pos - lo - 1]
            n_lt = lo + int(torch.searchsorted(bucket, v.reshape(1))[0])
            n_at = lo + int(torch.searchsorted(bucket, v.reshape(1), right=True)[0]) - n_lt
        elif self._order is not None:
            flat = d.reshape(-1)
            v = flat[self._order[pos - 1]].abs()
            n_lt = self._search(flat, lo, hi, v, right=False)
            n_at = self._search(flat, lo, hi, v, right=True) - n_lt
        else:
            flat = d.reshape(-1).abs()
            keys, _ = _sort_keys(flat)
            bucket = torch.sort(flat[keys == j]).values
            v = bucket[pos - lo - 1]
            n_at = int((bucket == v).sum())
            n_lt = lo + int((bucket < v).sum())
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
    if need >= n_at:
        return v, d.numel()
    n_lt = d.numel() - n_before - n_at if descending else n_before
    return v, order.nth_equal(d, v, need, n_lt)


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
