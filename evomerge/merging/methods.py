"""The merge methods evomerge supports, with mergekit 0.1.5's parameters and defaults."""

from __future__ import annotations

from dataclasses import dataclass, field

from evomerge.errors import RecipeError

# Sparsifiers (how each task vector is trimmed before mixing).
MAGNITUDE = "magnitude"  # keep the largest |delta| (TIES)
RANDOM = "random"  # Bernoulli keep mask (DARE)
OUTLIERS = "magnitude_outliers"  # drop the largest gamma and the smallest (breadcrumbs)
DELLA = "della_magprune"  # keep probability grows with per-row magnitude rank (DELLA)


@dataclass(frozen=True)
class MethodSpec:
    name: str
    family: str  # "task_arithmetic" (generalized), "linear" or "slerp"
    consensus: bool = False
    sparsifier: str | None = None
    normalize: bool = False
    rescale: bool = False
    needs_base: bool = True
    model_params: frozenset[str] = field(default_factory=frozenset)
    global_params: frozenset[str] = field(default_factory=frozenset)

    @property
    def is_random(self) -> bool:
        return self.sparsifier in (RANDOM, DELLA)


_GTA_GLOBALS = frozenset({"normalize", "lambda", "rescale", "int8_mask"})


def _gta(name: str, consensus: bool, sparsifier: str | None, normalize: bool, rescale: bool) -> MethodSpec:
    params = {"weight", "density"}
    if sparsifier == OUTLIERS:
        params.add("gamma")
    if sparsifier == DELLA:
        params.add("epsilon")
    return MethodSpec(name, "task_arithmetic", consensus, sparsifier, normalize, rescale, True,
                      frozenset(params), _GTA_GLOBALS)


METHODS: dict[str, MethodSpec] = {
    m.name: m
    for m in (
        _gta("task_arithmetic", False, None, False, False),
        _gta("ties", True, MAGNITUDE, True, False),
        _gta("dare_ties", True, RANDOM, False, True),
        _gta("dare_linear", False, RANDOM, False, True),
        _gta("breadcrumbs", False, OUTLIERS, False, False),
        _gta("breadcrumbs_ties", True, OUTLIERS, False, False),
        _gta("della", True, DELLA, True, True),
        _gta("della_linear", False, DELLA, False, True),
        MethodSpec("linear", "linear", normalize=True, needs_base=False,
                   model_params=frozenset({"weight"}), global_params=frozenset({"normalize"})),
        MethodSpec("slerp", "slerp", model_params=frozenset(), global_params=frozenset({"t"})),
    )
}

# Defaults of per-model parameters that may be omitted.
MODEL_PARAM_DEFAULTS = {"density": 1.0, "gamma": 0.01, "epsilon": 0.15}


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise RecipeError(
            f"merge_method: unknown method {name!r}; known: {', '.join(sorted(METHODS))}"
        ) from None
