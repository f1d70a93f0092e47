"""TIES: keep each task vector's largest magnitudes (``density`` of them), elect signs, and mix the
agreeing values (normalized by their weights).

Per expert the engine keeps a magnitude histogram (16-bit floats: exact; wider floats: with the
magnitude order), so a density is a lookup, not a sort, and the task vector's L1 norm for rescaling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from evomerge.merging.methods.base import (GTA_GLOBALS, MIX_TASK_VECTORS, WEIGHT, CachedState, MergeMethod, Sparsifier,
                                           density)

if TYPE_CHECKING:
    import torch

    from evomerge.merging.kernel.mix import ExpertTensor, KeepRules
    from evomerge.merging.kernel.sparsify import MagnitudeOrder

HISTOGRAM_BYTES = 65536 * 8  # a magnitude histogram's cumulative counts, on the host


@dataclass
class MagnitudeState(CachedState):
    order: "MagnitudeOrder"
    l1: "torch.Tensor"  # ||delta||_1 in the merge dtype, as mergekit computes it


class MagnitudeSparsifier(Sparsifier):
    """Shared by every method that trims by magnitude rank (TIES, breadcrumbs)."""

    def prepare(self, delta: "torch.Tensor", seed: int, reuse: bool, cache_draws: bool) -> MagnitudeState:
        from evomerge.merging.kernel.sparsify import MagnitudeOrder

        magnitudes = delta.abs()
        return MagnitudeState(order=MagnitudeOrder(magnitudes, positions=reuse), l1=magnitudes.sum())

    def cache_bytes(self, numel: int, element_size: int, cuda: bool) -> int:
        order = numel * (4 if numel < 2**31 else 8) if element_size > 2 else 0  # 32/64-bit floats
        return order + HISTOGRAM_BYTES

    def norm_ratio(self, expert: "ExpertTensor", p: dict, delta: "torch.Tensor", rules: "KeepRules",
                   index: int) -> float:
        """mergekit's numerics: both norms and their ratio in the merge dtype."""
        import torch

        zero = torch.zeros((), dtype=torch.int64, device=delta.device)
        mask = self.keep(index, delta, rules, zero, None)
        after = (delta * mask).abs().sum()
        before = expert.state.l1
        return 1.0 if (before < 1e-7 or after < 1e-7) else float(before / after)


class Magnitude(MagnitudeSparsifier):
    name = "magnitude"

    def rules(self, experts: Sequence["ExpertTensor"], params: Sequence[dict]) -> "KeepRules":
        import torch

        from evomerge.merging.kernel.mix import KeepRules
        from evomerge.merging.kernel.sparsify import first_k_rule

        vs, js = [], []
        for s, p in zip(experts, params):
            d, n = p["density"], s.delta.numel()
            k = n if d >= 1 else (0 if d <= 0 else max(1, int(d * n)))
            v, j = first_k_rule(s.delta, s.state.order, k, descending=True)
            vs.append(v)
            js.append(j)
        return KeepRules(v=torch.stack(vs).to(experts[0].delta.dtype),
                         j=torch.tensor(js, device=experts[0].delta.device))

    @staticmethod
    def keep(i, d, r, offset, per_element):
        """Beyond the threshold, or equal to it at a flat index up to the tie bound."""
        import torch

        a = d.abs()
        index = torch.arange(d.numel(), device=d.device) + offset
        return (a > r.v[i]) | ((a == r.v[i]) & (index <= r.j[i]))


METHODS = (
    MergeMethod("ties", MIX_TASK_VECTORS, model=(WEIGHT, density(searched=True)), globals_=GTA_GLOBALS,
                sparsifier=Magnitude(), consensus=True, normalize=True,
                summary="magnitude trim, sign election, normalized"),
)
