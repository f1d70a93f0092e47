"""What a merge method is: its parameters (names, defaults, search bounds), its sparsifier (what it
precomputes per expert for the engine's cache, the per-recipe keep rule and the per-element keep
test that the fused kernel inlines) and the function that merges one tensor."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import torch

if TYPE_CHECKING:
    from evomerge.merging.kernel.mix import ExpertTensor, KeepRules


@dataclass(frozen=True)
class Param:
    """One parameter of a method. ``default``: the value when a recipe omits it (mergekit's);
    ``bounds``: its search range when searched (None: never searched); ``searched``: searched
    unless the space fixes it; ``reference``: its value in the method's default recipe."""

    name: str
    default: Optional[float] = None
    bounds: Optional[tuple[float, float]] = None
    searched: bool = False
    unit: bool = False  # must lie in [0, 1]
    flag: bool = False  # a boolean switch
    reference: Optional[float] = None
    required: bool = False  # a recipe must set it
    summary: str = ""


class Sparsifier:
    """How a task vector is trimmed before mixing. Subclasses fill in what they need."""

    name = ""
    random = False  # draws from seeded streams; rescaling norms are fixed-point sums
    tie_cut = False  # thresholds with tie indices: the mix runs once per tie segment

    def prepare(self, state: "ExpertTensor", reuse: bool, cache_draws: bool) -> None:
        """Fill the expert's recipe-independent state (``state.delta`` and ``state.seed`` are set)."""

    def cache_bytes(self, numel: int, element_size: int, cuda: bool) -> int:
        """Bytes ``prepare(reuse=True)`` adds per expert beyond the task vector."""
        return 0

    def reseed(self, state: "ExpertTensor", stream: int, device: torch.device) -> None:
        """Switch a prepared state to another stream seed."""
        state.seed = stream

    def rules(self, experts: Sequence["ExpertTensor"], params: Sequence[dict]) -> "KeepRules":
        raise NotImplementedError

    # keep(i, d, r, offset, rank_norm, draws) -> bool mask: expert i's keep test on the segment d of
    # its task vector starting at flat index ``offset``; inlined into the compiled mix, so a
    # staticmethod of plain tensor operations
    keep: Callable

    def table_norm(self, state: "ExpertTensor", p: dict) -> float:
        """The kept L1 norm from a table built by ``prepare`` (sparsifiers that build one)."""
        raise NotImplementedError

    def check(self, p: dict, where: str) -> Optional[str]:
        """A problem with one expert's resolved parameters, or None."""
        return None


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method. ``merge(method, base, experts, model_params, global_params, out)``
    writes one merged tensor into ``out``; ``task_vectors``: experts enter as theta - base."""

    name: str
    merge: Callable
    model: tuple[Param, ...] = ()
    globals_: tuple[Param, ...] = ()
    sparsifier: Optional[Sparsifier] = None
    consensus: bool = False
    normalize: bool = False
    rescale: bool = False
    needs_base: bool = True
    task_vectors: bool = True
    experts: Optional[int] = None  # how many non-base models it takes (None: any)
    summary: str = ""
    params: dict[str, Param] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", {p.name: p for p in (*self.model, *self.globals_)})

    @property
    def model_params(self) -> frozenset[str]:
        return frozenset(p.name for p in self.model)

    @property
    def global_params(self) -> frozenset[str]:
        return frozenset(p.name for p in self.globals_)

    @property
    def is_random(self) -> bool:
        return self.sparsifier is not None and self.sparsifier.random

    def defaults(self) -> dict[str, float]:
        """Per-model parameters a recipe may omit, with their values."""
        return {p.name: p.default for p in self.model if p.default is not None}

    def reference_values(self, n_experts: int) -> dict[str, float]:
        """The recipe a user tries first: equal weights 1/n and each parameter's reference value."""
        out = {"weight": 1.0 / n_experts} if "weight" in self.params else {}
        out |= {p.name: p.reference for p in self.params.values() if p.reference is not None}
        return out


# Parameters shared by the task-arithmetic family (mergekit's generalized task arithmetic)
WEIGHT = Param("weight", bounds=(0.0, 1.0), searched=True)
LAMBDA = Param("lambda", bounds=(0.5, 1.5))
FLAGS = (Param("normalize", flag=True), Param("rescale", flag=True), Param("int8_mask", flag=True))
GTA_GLOBALS = (LAMBDA, *FLAGS)


def density(searched: bool) -> Param:
    """Share of each task vector kept; searched only where a sparsifier uses it."""
    if not searched:
        return Param("density", default=1.0, unit=True)
    return Param("density", default=1.0, bounds=(0.1, 1.0), searched=True, unit=True, reference=0.5)
