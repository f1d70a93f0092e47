"""DARE: keep each task vector's elements with probability ``density`` (seeded draws), rescale the
kept ones so the task vector's L1 norm is unchanged; with TIES's sign election or linear mixing.

Draws come from a counter-based hash of (seed, tensor, expert, element), so a seed gives the same
tensors on every run and device. Per expert the engine keeps, for each draw level, the L1 norm of
the elements kept at that level (rescaling is a lookup) and, on the CPU, the draws themselves.
"""

from __future__ import annotations

from typing import Sequence

import torch

from evomerge.merging.kernel import compile as kc
from evomerge.merging.kernel.mix import ExpertTensor, KeepRules, merge_task_arithmetic
from evomerge.merging.kernel.sparsify import (LEVELS, draws15, draws_as_half, fixed_and_draws, fixed_l1, fixed_shift,
                                              half_threshold)
from evomerge.merging.methods.base import GTA_GLOBALS, WEIGHT, MergeMethod, Sparsifier, density
from evomerge.merging.methods.ties import HISTOGRAM_BYTES


class SeededSparsifier(Sparsifier):
    """Shared by the methods that draw (DARE, DELLA): L1 norms as exact fixed-point sums."""

    random = True

    def prepare(self, state: ExpertTensor, reuse: bool, cache_draws: bool) -> None:
        flat = state.delta.reshape(-1)
        state.shift = fixed_shift(flat)
        factor = torch.tensor(2.0 ** state.shift, dtype=torch.float64, device=flat.device)
        self._prepare_norms(state, flat, factor, reuse, cache_draws)

    def _prepare_norms(self, state: ExpertTensor, flat: torch.Tensor, factor: torch.Tensor, reuse: bool,
                       cache_draws: bool) -> None:
        state.l1_fixed = float(kc.run(fixed_l1, kc.compiled(fixed_l1), flat.numel(), flat, factor))

    def seeds(self, experts: Sequence[ExpertTensor]) -> torch.Tensor:
        return torch.tensor([s.seed for s in experts], dtype=torch.int64, device=experts[0].delta.device)


def dare_levels(params: Sequence[dict]) -> list[int]:
    """DARE keeps an element when its draw is below round(density * 31744)."""
    return [min(max(round(p["density"] * LEVELS), 0), LEVELS) for p in params]


class Random(SeededSparsifier):
    name = "random"

    def _prepare_norms(self, state: ExpertTensor, flat: torch.Tensor, factor: torch.Tensor, reuse: bool,
                       cache_draws: bool) -> None:
        if not (reuse or cache_draws):  # one recipe: the draws are hashed inside the kernels
            super()._prepare_norms(state, flat, factor, reuse, cache_draws)
            return
        fixed, draws = kc.run(fixed_and_draws, kc.compiled(fixed_and_draws), flat.numel(), flat, factor,
                              torch.tensor(state.seed, device=flat.device))
        state.kept_l1 = torch.cumsum(torch.bincount(draws, weights=fixed, minlength=LEVELS), 0).cpu()
        state.l1_fixed = float(state.kept_l1[-1])
        if cache_draws:
            state.draws = draws_as_half(draws)

    def cache_bytes(self, numel: int, element_size: int, cuda: bool) -> int:
        # float16-coded draws on the CPU (a GPU re-hashes them in the kernel), the L1-by-level table
        return (0 if cuda else 2 * numel) + HISTOGRAM_BYTES

    def reseed(self, state: ExpertTensor, stream: int, device: torch.device) -> None:
        """New draws and L1-by-level table for the new stream."""
        fresh = ExpertTensor(delta=state.delta.to(device), seed=stream)
        self.prepare(fresh, reuse=True, cache_draws=state.draws is not None)
        state.kept_l1 = fresh.kept_l1
        if fresh.draws is not None:
            state.draws = fresh.draws.to(state.delta.device)
        state.seed = stream

    def table_norm(self, state: ExpertTensor, p: dict) -> float:
        level = dare_levels([p])[0]
        return float(state.kept_l1[level - 1]) if level > 0 else 0.0

    def rules(self, experts: Sequence[ExpertTensor], params: Sequence[dict]) -> KeepRules:
        dev = experts[0].delta.device
        levels = dare_levels(params)
        return KeepRules(seed=self.seeds(experts), lo=torch.tensor(levels, dtype=torch.int64, device=dev),
                         v=torch.stack([half_threshold(x, dev) for x in levels]))

    @staticmethod
    def keep(i, d, r, offset, rank_norm, draws):
        """The element's draw is below the density's level (cached draws compare as float16)."""
        if draws is not None:
            return draws < r.v[i]
        return draws15(torch.arange(d.numel(), device=d.device) + offset, r.seed[i]) < r.lo[i]


_MODEL = (WEIGHT, density(searched=True))

METHODS = (
    MergeMethod("dare_ties", merge_task_arithmetic, model=_MODEL, globals_=GTA_GLOBALS, sparsifier=Random(),
                consensus=True, rescale=True, summary="random drop and rescale, sign election"),
    MergeMethod("dare_linear", merge_task_arithmetic, model=_MODEL, globals_=GTA_GLOBALS, sparsifier=Random(),
                rescale=True, summary="random drop and rescale, weighted sum"),
)
