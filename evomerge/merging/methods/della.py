"""DELLA: keep each element with a probability that grows with its magnitude rank in its row
(``density`` +/- ``epsilon``), rescale to the task vector's L1 norm; with sign election
(normalized) or linear mixing. Per expert the engine keeps the per-row ranks (float32)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Optional, Sequence

from evomerge.merging.methods.base import GTA_GLOBALS, MIX_TASK_VECTORS, WEIGHT, MergeMethod, Param, density
from evomerge.merging.methods.dare import SeededSparsifier, SeededState

if TYPE_CHECKING:
    import torch

    from evomerge.merging.kernel.mix import ExpertTensor, KeepRules


@dataclass
class DellaState(SeededState):
    rank_norm: "Optional[torch.Tensor]" = None  # each element's magnitude rank in its row, in [0, 1]

    keep_input: ClassVar[Optional[str]] = "rank_norm"


class Della(SeededSparsifier):
    name = "della_magprune"

    def prepare(self, delta: "torch.Tensor", seed: int, reuse: bool, cache_draws: bool) -> DellaState:
        from evomerge.merging.kernel.sparsify import row_rank_norm

        return DellaState(*self.fixed_point(delta), rank_norm=row_rank_norm(delta))

    def cache_bytes(self, numel: int, element_size: int, cuda: bool) -> int:
        return 4 * numel  # float32 ranks

    def check(self, p: dict, where: str) -> Optional[str]:
        d, e = p["density"], p["epsilon"]
        if 0 < d < 1 and not (0 < d - e and d + e < 1):
            return f"della: density {d} +/- epsilon {e} must lie in (0, 1) ({where})"
        return None

    def rules(self, experts: Sequence["ExpertTensor"], params: Sequence[dict]) -> "KeepRules":
        import torch

        from evomerge.merging.kernel.mix import KeepRules

        lo, span = [], []
        for p in params:
            d, e = p["density"], p["epsilon"]
            if d >= 1:
                lo.append(2.0), span.append(0.0)  # every draw is below 2 * 31744
            elif d <= 0:
                lo.append(0.0), span.append(0.0)  # no draw is below 0
            else:
                lo.append(d - e), span.append(2 * e)
        dev = experts[0].delta.device
        return KeepRules(seed=self.seeds(experts), lo=torch.tensor(lo, dtype=torch.float32, device=dev),
                         span=torch.tensor(span, dtype=torch.float32, device=dev))

    @staticmethod
    def keep(i, d, r, offset, per_element):
        """The element's draw is below its keep probability, lo + rank * span (``per_element``:
        the ranks)."""
        import torch

        from evomerge.merging.kernel.sparsify import LEVELS, draws15

        u = draws15(torch.arange(d.numel(), device=d.device) + offset, r.seed[i])
        return u.float() < (r.lo[i] + per_element * r.span[i]) * LEVELS


EPSILON = Param("epsilon", default=0.15, bounds=(0.0, 0.2), unit=True)
_MODEL = (WEIGHT, density(searched=True), EPSILON)

METHODS = (
    MergeMethod("della", MIX_TASK_VECTORS, model=_MODEL, globals_=GTA_GLOBALS, sparsifier=Della(),
                consensus=True, normalize=True, rescale=True, summary="rank-weighted random drop, sign election"),
    MergeMethod("della_linear", MIX_TASK_VECTORS, model=_MODEL, globals_=GTA_GLOBALS, sparsifier=Della(),
                rescale=True, summary="rank-weighted random drop, weighted sum"),
)
