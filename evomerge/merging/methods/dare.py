"""DARE: keep each task vector's elements with probability ``density`` (seeded draws), rescale the
kept ones so the task vector's L1 norm is unchanged; with TIES's sign election or linear mixing.

Draws come from a counter-based hash of (seed, tensor, expert, element), so a seed gives the same
tensors on every run and device. Per expert the engine keeps, for each draw level, the L1 norm of
the elements kept at that level (rescaling is a lookup) and, on the CPU, the draws themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Optional, Sequence

from evomerge.merging.methods.base import (GTA_GLOBALS, MIX_TASK_VECTORS, WEIGHT, CachedState, MergeMethod, Sparsifier,
                                           density)
from evomerge.merging.methods.ties import HISTOGRAM_BYTES

if TYPE_CHECKING:
    import torch

    from evomerge.merging.kernel.mix import ExpertTensor, KeepRules


@dataclass
class SeededState(CachedState):
    shift: int  # fixed-point scale of the L1 sums
    l1_fixed: float  # ||delta||_1 in fixed point (an integer)


class SeededSparsifier(Sparsifier):
    """Shared by the methods that draw (DARE, DELLA): L1 norms as exact fixed-point sums."""

    random = True

    @staticmethod
    def fixed_scale(flat: "torch.Tensor") -> tuple[int, "torch.Tensor"]:
        """The fixed-point scale of a flat task vector's L1 sums: its shift, and 2**shift."""
        import torch

        from evomerge.merging.kernel.sparsify import fixed_shift

        shift = fixed_shift(flat)
        return shift, torch.tensor(2.0 ** shift, dtype=torch.float64, device=flat.device)

    def fixed_point(self, delta: "torch.Tensor") -> tuple[int, float]:
        """The fixed-point scale of the task vector's L1 sums, and its L1 norm in it."""
        from evomerge.merging.kernel import compile as kc
        from evomerge.merging.kernel.sparsify import fixed_l1

        flat = delta.reshape(-1)
        shift, factor = self.fixed_scale(flat)
        return shift, float(kc.run(fixed_l1, kc.compiled(fixed_l1), flat.numel(), flat, factor))

    def seeds(self, experts: Sequence["ExpertTensor"]) -> "torch.Tensor":
        import torch

        return torch.tensor([s.seed for s in experts], dtype=torch.int64, device=experts[0].delta.device)

    def kept_norm(self, expert: "ExpertTensor", p: dict, delta: "torch.Tensor", rules: "KeepRules",
                  index: int) -> float:
        """The kept part's L1 norm in fixed point, summed by the kernel."""
        import torch

        from evomerge.merging.kernel import compile as kc
        from evomerge.merging.kernel.mix import kept_l1, one_rule

        factor = torch.tensor(2.0 ** expert.state.shift, dtype=torch.float64, device=delta.device)
        zero = torch.zeros((), dtype=torch.int64, device=delta.device)
        return float(kc.run(kept_l1, kc.compiled(kept_l1), delta.numel(), delta, expert.state.per_element,
                            one_rule(rules, index), factor, zero, self.keep))

    def norm_ratio(self, expert: "ExpertTensor", p: dict, delta: "torch.Tensor", rules: "KeepRules",
                   index: int) -> float:
        state = expert.state
        after = self.kept_norm(expert, p, delta, rules, index)
        tiny = 1e-7 * 2.0 ** state.shift
        return 1.0 if (state.l1_fixed < tiny or after < tiny) else state.l1_fixed / after


def dare_levels(params: Sequence[dict]) -> list[int]:
    """DARE keeps an element when its draw is below round(density * 31744)."""
    from evomerge.merging.kernel.sparsify import LEVELS

    return [min(max(round(p["density"] * LEVELS), 0), LEVELS) for p in params]


@dataclass
class RandomState(SeededState):
    kept_l1: "Optional[torch.Tensor]" = None  # fixed-point L1 of the elements whose draw is < level, per level
    draws: "Optional[torch.Tensor]" = None  # cached draws (float16 patterns); None: hashed in the kernel

    host: ClassVar[frozenset[str]] = frozenset({"kept_l1"})
    keep_input: ClassVar[Optional[str]] = "draws"


class Random(SeededSparsifier):
    name = "random"

    def prepare(self, delta: "torch.Tensor", seed: int, reuse: bool, cache_draws: bool) -> RandomState:
        if not (reuse or cache_draws):  # one recipe: the draws are hashed inside the kernels
            return RandomState(*self.fixed_point(delta))
        import torch

        from evomerge.merging.kernel import compile as kc
        from evomerge.merging.kernel.sparsify import LEVELS, draws_as_half, fixed_and_draws

        flat = delta.reshape(-1)
        shift, factor = self.fixed_scale(flat)
        fixed, draws = kc.run(fixed_and_draws, kc.compiled(fixed_and_draws), flat.numel(), flat, factor,
                              torch.tensor(seed, device=flat.device))
        kept = torch.cumsum(torch.bincount(draws, weights=fixed, minlength=LEVELS), 0).cpu()
        return RandomState(shift, float(kept[-1]), kept_l1=kept, draws=draws_as_half(draws) if cache_draws else None)

    def cache_bytes(self, numel: int, element_size: int, cuda: bool) -> int:
        # float16-coded draws on the CPU (a GPU re-hashes them in the kernel), the L1-by-level table
        return (0 if cuda else 2 * numel) + HISTOGRAM_BYTES

    def reseed(self, expert: "ExpertTensor", stream: int, device: "torch.device") -> None:
        """New draws and L1-by-level table for the new stream."""
        fresh = self.prepare(expert.delta.to(device), stream, reuse=True, cache_draws=expert.state.draws is not None)
        if fresh.draws is not None:
            fresh.draws = fresh.draws.to(expert.delta.device)
        expert.state = fresh
        expert.seed = stream

    def kept_norm(self, expert: "ExpertTensor", p: dict, delta: "torch.Tensor", rules: "KeepRules",
                  index: int) -> float:
        """A lookup in the L1-by-level table where ``prepare`` built one."""
        table = expert.state.kept_l1
        if table is None:
            return super().kept_norm(expert, p, delta, rules, index)
        level = dare_levels([p])[0]
        return float(table[level - 1]) if level > 0 else 0.0

    def rules(self, experts: Sequence["ExpertTensor"], params: Sequence[dict]) -> "KeepRules":
        import torch

        from evomerge.merging.kernel.mix import KeepRules
        from evomerge.merging.kernel.sparsify import half_threshold

        dev = experts[0].delta.device
        levels = dare_levels(params)
        return KeepRules(seed=self.seeds(experts), lo=torch.tensor(levels, dtype=torch.int64, device=dev),
                         v=torch.stack([half_threshold(x, dev) for x in levels]))

    @staticmethod
    def keep(i, d, r, offset, per_element):
        """The element's draw is below the density's level (cached draws compare as float16)."""
        if per_element is not None:
            return per_element < r.v[i]
        import torch

        from evomerge.merging.kernel.sparsify import draws15

        return draws15(torch.arange(d.numel(), device=d.device) + offset, r.seed[i]) < r.lo[i]


_MODEL = (WEIGHT, density(searched=True))

METHODS = (
    MergeMethod("dare_ties", MIX_TASK_VECTORS, model=_MODEL, globals_=GTA_GLOBALS, sparsifier=Random(),
                consensus=True, rescale=True, summary="random drop and rescale, sign election"),
    MergeMethod("dare_linear", MIX_TASK_VECTORS, model=_MODEL, globals_=GTA_GLOBALS, sparsifier=Random(),
                rescale=True, summary="random drop and rescale, weighted sum"),
)
