"""Model breadcrumbs: drop each task vector's largest ``gamma`` share of magnitudes (outliers) and
its smallest, so that ``density`` remains; with or without TIES's sign election."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from evomerge.merging.methods.base import GTA_GLOBALS, MIX_TASK_VECTORS, WEIGHT, MergeMethod, Param, density
from evomerge.merging.methods.ties import MagnitudeSparsifier

if TYPE_CHECKING:
    from evomerge.merging.kernel.mix import ExpertTensor, KeepRules


class Outliers(MagnitudeSparsifier):
    name = "magnitude_outliers"

    def rules(self, experts: Sequence["ExpertTensor"], params: Sequence[dict]) -> "KeepRules":
        import torch

        from evomerge.merging.kernel.mix import KeepRules
        from evomerge.merging.kernel.sparsify import first_k_rule

        v_hi, j_hi, v_lo, j_lo = [], [], [], []
        for s, p in zip(experts, params):
            d, n = p["density"], s.delta.numel()
            if d >= 1:
                bot, top = 0, n
            else:
                target = int(d * n)
                bot = max(0, n - target - int(p["gamma"] * n))
                top = bot + target
            v, j = first_k_rule(s.delta, s.state.order, top, descending=False)
            v_hi.append(v)
            j_hi.append(j)
            v, j = first_k_rule(s.delta, s.state.order, bot, descending=False)
            v_lo.append(v)
            j_lo.append(j)
        dtype, dev = experts[0].delta.dtype, experts[0].delta.device
        return KeepRules(v=torch.stack(v_hi).to(dtype), j=torch.tensor(j_hi, device=dev),
                         v2=torch.stack(v_lo).to(dtype), j2=torch.tensor(j_lo, device=dev))

    @staticmethod
    def keep(i, d, r, offset, per_element):
        """Among the first ``top`` magnitudes in ascending order but not the first ``bot``."""
        import torch

        a = d.abs()
        index = torch.arange(d.numel(), device=d.device) + offset
        below_hi = (a < r.v[i]) | ((a == r.v[i]) & (index <= r.j[i]))
        below_lo = (a < r.v2[i]) | ((a == r.v2[i]) & (index <= r.j2[i]))
        return below_hi & ~below_lo


GAMMA = Param("gamma", default=0.01, bounds=(0.0, 0.1), unit=True)
_MODEL = (WEIGHT, density(searched=True), GAMMA)

METHODS = (
    MergeMethod("breadcrumbs", MIX_TASK_VECTORS, model=_MODEL, globals_=GTA_GLOBALS, sparsifier=Outliers(),
                summary="drop the largest gamma and the smallest magnitudes"),
    MergeMethod("breadcrumbs_ties", MIX_TASK_VECTORS, model=_MODEL, globals_=GTA_GLOBALS,
                sparsifier=Outliers(), consensus=True, summary="breadcrumbs with sign election"),
)
