"""TIES: keep each task vector's largest magnitudes (``density`` of them), elect signs, and mix the
agreeing values (normalized by their weights).

Per expert the engine keeps a magnitude histogram (16-bit floats: exact; wider floats: sorted
magnitudes), so a density is a lookup, not a sort, and the task vector's L1 norm for rescaling.
"""

from __future__ import annotations

from typing import Sequence

import torch

from evomerge.merging.kernel.mix import ExpertTensor, KeepRules, merge_task_arithmetic
from evomerge.merging.kernel.sparsify import MagnitudeOrder, first_k_rule
from evomerge.merging.methods.base import GTA_GLOBALS, WEIGHT, MergeMethod, Sparsifier, density

HISTOGRAM_BYTES = 65536 * 8  # a magnitude histogram's cumulative counts, on the host


class MagnitudeSparsifier(Sparsifier):
    """Shared by every method that trims by magnitude rank (TIES, breadcrumbs)."""

    tie_cut = True

    def prepare(self, state: ExpertTensor, reuse: bool, cache_draws: bool) -> None:
        magnitudes = state.delta.abs()
        state.order = MagnitudeOrder(magnitudes, positions=reuse)
        state.l1 = magnitudes.sum()

    def cache_bytes(self, numel: int, element_size: int, cuda: bool) -> int:
        sorted_magnitudes = numel * element_size if element_size > 2 else 0  # 32/64-bit floats
        return sorted_magnitudes + HISTOGRAM_BYTES


class Magnitude(MagnitudeSparsifier):
    name = "magnitude"

    def rules(self, experts: Sequence[ExpertTensor], params: Sequence[dict]) -> KeepRules:
        vs, js = [], []
        for s, p in zip(experts, params):
            d, n = p["density"], s.delta.numel()
            k = n if d >= 1 else (0 if d <= 0 else max(1, int(d * n)))
            v, j = first_k_rule(s.delta, s.order, k, descending=True)
            vs.append(v)
            js.append(j)
        return KeepRules(v=torch.stack(vs).to(experts[0].delta.dtype),
                         j=torch.tensor(js, device=experts[0].delta.device))

    @staticmethod
    def keep(i, d, r, offset, rank_norm, draws):
        """Beyond the threshold, or equal to it in a segment where ties are kept."""
        a = d.abs()
        return (a > r.v[i]) | ((a == r.v[i]) & r.j[i])


METHODS = (
    MergeMethod("ties", merge_task_arithmetic, model=(WEIGHT, density(searched=True)), globals_=GTA_GLOBALS,
                sparsifier=Magnitude(), consensus=True, normalize=True,
                summary="magnitude trim, sign election, normalized"),
)
