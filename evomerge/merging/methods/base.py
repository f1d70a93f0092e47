"""What a merge method is: its parameters (names, defaults, search bounds), its sparsifier (the
state it precomputes per expert for the engine's cache, the per-recipe keep rule and the
per-element keep test that the fused kernel inlines) and the function that merges one tensor.

A method module declares its method at import without loading torch, so that the configuration,
``--help`` and ``status`` stay light: torch and the kernel are imported inside the functions that
compute (``torch.compile`` traces such imports like module globals)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from functools import cached_property
from importlib import import_module
from typing import TYPE_CHECKING, Callable, ClassVar, Iterator, Optional, Sequence

if TYPE_CHECKING:
    import torch

    from evomerge.merging.kernel.mix import ExpertTensor, KeepRules


@dataclass
class CachedState:
    """A sparsifier's recipe-independent state for one expert's tensor, kept by the engine for every
    recipe. Each sparsifier declares its own as a subclass. Its tensor fields move with ``to()``,
    except the small lookups named in ``host``, read on the host; a field holding an object with
    its own ``to(device, pin)`` and ``nbytes`` (a magnitude order) moves itself."""

    host: ClassVar[frozenset[str]] = frozenset()
    keep_input: ClassVar[Optional[str]] = None  # the per-element tensor the keep test reads

    def parts(self) -> Iterator[tuple[str, object]]:
        """(field name, value) of every field that holds a tensor or a movable object."""
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and hasattr(value, "to"):
                yield f.name, value

    def to(self, device: "torch.device | str", pin: bool = False) -> "CachedState":
        """This state with its device-side parts on ``device`` (pinned host memory with ``pin``)."""
        import torch

        moved = {}
        for name, value in self.parts():
            if not isinstance(value, torch.Tensor):
                moved[name] = value.to(device, pin)
            elif name not in self.host:
                value = value.to(device)
                moved[name] = value.pin_memory() if pin else value
        return replace(self, **moved)

    @property
    def nbytes(self) -> int:
        import torch

        return sum(v.numel() * v.element_size() if isinstance(v, torch.Tensor) else v.nbytes
                   for _, v in self.parts())

    @property
    def per_element(self) -> "Optional[torch.Tensor]":
        """What the keep test reads element by element (DELLA's ranks, DARE's cached draws)."""
        return getattr(self, self.keep_input) if self.keep_input else None


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

    def prepare(self, delta: "torch.Tensor", seed: int, reuse: bool, cache_draws: bool) -> Optional[CachedState]:
        """The expert's recipe-independent state, from its task vector and its stream seed."""
        return None

    def cache_bytes(self, numel: int, element_size: int, cuda: bool) -> int:
        """Bytes ``prepare(reuse=True)`` adds per expert beyond the task vector."""
        return 0

    def reseed(self, expert: "ExpertTensor", stream: int, device: "torch.device") -> None:
        """Switch a prepared expert to another stream seed."""
        expert.seed = stream

    def rules(self, experts: Sequence["ExpertTensor"], params: Sequence[dict]) -> "KeepRules":
        raise NotImplementedError

    # keep(i, d, r, offset, rank_norm, draws) -> bool mask: expert i's keep test on the segment d of
    # its task vector starting at flat index ``offset``; inlined into the compiled mix, so a
    # staticmethod of plain tensor operations
    keep: Callable

    def norm_ratio(self, expert: "ExpertTensor", p: dict, delta: "torch.Tensor", rules: "KeepRules",
                   index: int) -> float:
        """Rescaling: the L1 norm of the expert's task vector (flat ``delta``) over that of its kept
        part, under the ``index``-th of the stacked ``rules`` (1 where either is about 0)."""
        raise NotImplementedError

    def check(self, p: dict, where: str) -> Optional[str]:
        """A problem with one expert's resolved parameters, or None."""
        return None


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method. ``merge(method, base, experts, model_params, global_params, out)``
    writes one merged tensor into ``out`` (a function, or "module:function" to import it when first
    used: see :attr:`merge_function`); ``task_vectors``: experts enter as theta - base."""

    name: str
    merge: Callable | str
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

    @cached_property
    def merge_function(self) -> Callable:
        """``merge``, imported on first use where it is named as "module:function"."""
        if callable(self.merge):
            return self.merge
        module, function = self.merge.split(":")
        return getattr(import_module(module), function)

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


# The task-arithmetic family's merge, imported when first used (it needs torch)
MIX_TASK_VECTORS = "evomerge.merging.kernel.mix:merge_task_arithmetic"


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
