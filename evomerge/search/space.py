"""Search spaces: a map from a vector in [0, 1]^d to a merge recipe.

A space is described by a small spec (a preset in ``search_spaces/`` or inline in the run config):

- ``granularity``: ``global`` (one value per expert and parameter), ``per_layer`` (one per decoder
  layer), ``layer_groups`` (one per ``layers_per_group`` consecutive layers) or ``smooth`` (values at
  ``knots`` points interpolated linearly across depth, as mergekit interpolates a gradient);
- ``modules``: when true, attention and MLP tensors get their own values, and embeddings, norms and
  the LM head one value each (per expert and parameter);
- ``parameters``: bounds of each searched parameter (``{low, high}``) or a fixed value
  (``{fixed: v}``). Weights may go negative (``low < 0``, or ``allow_negative_weights``).

Coordinate ``x`` maps to ``low + x * (high - low)``. Every recipe a space decodes is plain mergekit
syntax (scalars, per-layer lists and ``{filter, value}`` conditions), so it exports as is.
Tensors outside the decoder layers take the first layer slot's value unless ``modules`` gives
them their own (mergekit evaluates gradients at t = 0 there).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional, Sequence

from pydantic import BaseModel, ConfigDict, model_validator

from evomerge.errors import EvomergeError
from evomerge.inputs import load_yaml, validate
from evomerge.merging.methods import MergeMethod, get_method
from evomerge.resources import presets_dir, shipped
from evomerge.merging.architecture import LLAMA, Family
from evomerge.merging.recipe import PASSTHROUGH, Condition, Recipe, build, kind_conditions

if TYPE_CHECKING:
    from evomerge.config import RunConfig

SPACES_DIR = presets_dir()

log = logging.getLogger(__name__)

MODULE_KINDS = ("attention", "mlp")  # per-slot kinds when modules is on
SCALAR_KINDS = ("embed", "norm", "lm_head", "vision")  # one value each when modules is on


class SpaceError(EvomergeError):
    """A search-space spec is invalid."""


class ParamRange(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    low: Optional[float] = None
    high: Optional[float] = None
    fixed: Optional[float] = None

    @model_validator(mode="after")
    def _check(self) -> "ParamRange":
        if self.fixed is not None and (self.low is not None or self.high is not None):
            raise ValueError("give either fixed or low/high, not both")
        for v in (self.low, self.high, self.fixed):
            if v is not None and not math.isfinite(v):
                raise ValueError("values must be finite")
        if self.low is not None and self.high is not None and not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self


class SpaceSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Optional[str] = None
    description: str = ""
    granularity: Literal["global", "per_layer", "layer_groups", "smooth"] = "global"
    layers_per_group: Optional[int] = None
    knots: Optional[int] = None
    modules: bool = False
    allow_negative_weights: bool = False
    parameters: dict[str, ParamRange] = {}

    @model_validator(mode="after")
    def _check(self) -> "SpaceSpec":
        if self.granularity == "layer_groups":
            if self.layers_per_group is None or self.layers_per_group < 1:
                raise ValueError("layer_groups needs layers_per_group >= 1")
        elif self.layers_per_group is not None:
            raise ValueError("layers_per_group only applies to granularity layer_groups")
        if self.granularity == "smooth":
            if self.knots is None or self.knots < 2:
                raise ValueError("smooth needs knots >= 2")
        elif self.knots is not None:
            raise ValueError("knots only applies to granularity smooth")
        return self


def load_spec(ref: Any, where: str = "space") -> Any:
    """A spec from a preset name (``search_spaces/NAME.yaml``), a YAML file path, or a mapping: a
    :class:`SpaceSpec`, or a :class:`~evomerge.search.path_space.PathSpec` (``kind: layer_path``)."""
    source = where
    if isinstance(ref, str):
        path = Path(ref)
        if not path.is_file() and (SPACES_DIR / f"{ref}.yaml").exists():
            path = SPACES_DIR / f"{ref}.yaml"
        if not path.exists():
            presets = ", ".join(preset_names())
            raise SpaceError(f"{where}: no preset or file {ref!r} (presets: {presets})")
        source = str(path)
        ref = load_yaml(path, SpaceError, "search space")
        if isinstance(ref, dict):
            ref.setdefault("name", path.stem)
    if not isinstance(ref, dict):
        raise SpaceError(f"{source}: a search space must be a mapping or a preset name")
    if ref.get("kind") == "layer_path":
        from evomerge.search.path_space import PathSpec

        return validate(PathSpec, ref, SpaceError, source, "a layer-path space")
    return validate(SpaceSpec, ref, SpaceError, source, "a search space")


def preset_names() -> list[str]:
    return shipped(SPACES_DIR)


@dataclass(frozen=True)
class Coordinate:
    """One dimension of the space: which parameter of which expert, where, and its bounds."""
    name: str
    param: str
    expert: Optional[str]  # None for global parameters (t, lambda)
    kind: Optional[str]  # attention, mlp, embed, norm, lm_head; None when modules is off
    layers: Optional[tuple[int, int]]  # first and last layer of the slot (inclusive); None for scalar kinds
    low: float
    high: float

    def value(self, x: float) -> float:
        return self.low + min(max(x, 0.0), 1.0) * (self.high - self.low)

    def coordinate(self, value: float) -> float:
        return min(max((value - self.low) / (self.high - self.low), 0.0), 1.0)

    def describe(self) -> str:
        who = f"expert {self.expert}" if self.expert else "all experts"
        where = ("all layers" if self.layers is None and self.kind is None else
                 f"{self.kind} tensors" if self.layers is None else
                 f"layer {self.layers[0]}" if self.layers[0] == self.layers[1] else
                 f"layers {self.layers[0]}-{self.layers[1]}")
        if self.kind in MODULE_KINDS:
            where = f"{self.kind}, {where}"
        return f"{self.param} of {who}, {where}, in [{self.low:g}, {self.high:g}]"


class CoordinateSpace:
    """What every search space offers the driver: its named coordinates in [0, 1]."""

    coordinates: list[Coordinate]

    @property
    def dimension(self) -> int:
        return len(self.coordinates)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.coordinates]


class SearchSpace(CoordinateSpace):
    """A spec bound to a merge: its method, base, experts and number of layers."""

    def __init__(self, spec: SpaceSpec, *, method: str, base: Optional[str], experts: Sequence[str],
                 num_layers: int, has_lm_head: bool = True, fixed_parameters: Optional[dict] = None,
                 dtype: Optional[str] = None, random_seed: int = 0, family: Family = LLAMA,
                 tensor_names: Optional[Sequence[str]] = None):
        """``tensor_names`` (the reference model's): coordinates are made only for the kinds they
        have, and the LM head is detected from them (``has_lm_head`` is then ignored)."""
        self.spec = spec
        self.family = family
        kinds = set(family.filters) if tensor_names is None else {family.kind_of(n) for n in tensor_names}
        self.kinds = [k for k in MODULE_KINDS + SCALAR_KINDS if k in kinds]
        if tensor_names is not None:
            has_lm_head = "lm_head" in kinds
        self.reach: Optional[list[int]] = None  # tensors each coordinate changes (see coordinate_reach)
        self.method: MergeMethod = get_method(method)
        self.base = base
        self.experts = list(experts)
        self.labels = expert_labels(self.experts)
        self.num_layers = num_layers
        self.has_lm_head = has_lm_head
        self.dtype = dtype
        self.random_seed = random_seed
        if self.method.experts is not None and len(self.experts) != self.method.experts:
            raise SpaceError(f"{self.method.name} merges the base with exactly {self.method.experts} expert(s) "
                             f"(got {len(self.experts)})")
        self.fixed: dict[str, float] = {}
        self.bounds: dict[str, tuple[float, float]] = {}
        self._resolve_parameters(fixed_parameters or {})
        self.slots = self._slots()
        self.coordinates = self._coordinates()

    # -- construction --------------------------------------------------------------------------

    def _resolve_parameters(self, fixed: dict) -> None:
        allowed = self._searchable()
        for key, r in self.spec.parameters.items():
            if key not in allowed:
                raise SpaceError(f"space parameters.{key}: method {self.method.name!r} has no searchable "
                                 f"parameter {key!r} (it has: {', '.join(sorted(allowed)) or 'none'})")
            if r.fixed is not None:
                self.fixed[key] = r.fixed
            else:
                low, high = self._default_bounds(key)
                low = r.low if r.low is not None else low
                high = r.high if r.high is not None else high
                if not low < high:
                    raise SpaceError(f"space parameters.{key}: low ({low}) must be below high ({high})")
                if self.method.params[key].unit and not (0 <= low and high <= 1):
                    raise SpaceError(f"space parameters.{key}: bounds must lie in [0, 1]")
                self.bounds[key] = (low, high)
        for key in (p.name for p in self.method.params.values() if p.searched):
            if key not in self.fixed and key not in self.bounds:
                self.bounds[key] = self._default_bounds(key)
        for key, value in fixed.items():
            if key in self.bounds:
                continue
            self.fixed.setdefault(key, value)

    def _default_bounds(self, key: str) -> tuple[float, float]:
        low, high = self.method.params[key].bounds
        if key == "weight" and self.spec.allow_negative_weights:
            low = -high
        return low, high

    def _searchable(self) -> set[str]:
        return {p.name for p in self.method.params.values() if p.bounds is not None}

    def _slots(self) -> list[tuple[str, tuple[int, int]]]:
        n, s = self.num_layers, self.spec
        if s.granularity == "global":
            return [("", (0, n - 1))]
        if s.granularity == "per_layer":
            return [(f"L{i:02d}", (i, i)) for i in range(n)]
        if s.granularity == "layer_groups":
            k = s.layers_per_group
            return [(f"L{lo:02d}-{min(lo + k, n) - 1:02d}", (lo, min(lo + k, n) - 1)) for lo in range(0, n, k)]
        positions = [round(j * (n - 1) / (s.knots - 1), 2) for j in range(s.knots)]
        return [(f"K{j}", (math.floor(p), math.ceil(p))) for j, p in enumerate(positions)]

    def _coordinates(self) -> list[Coordinate]:
        out: list[Coordinate] = []
        global_slots = self.spec.granularity == "global"
        for param, (low, high) in self.bounds.items():
            owners = [None] if param in self.method.global_params else list(zip(self.experts, self.labels))
            for owner in owners:
                expert, label = owner if owner else (None, None)
                prefix = f"{label}.{param}" if label else param
                kinds = [k for k in MODULE_KINDS if k in self.kinds] if self.spec.modules else [None]
                for kind in kinds:
                    for slot, layers in self.slots:
                        parts = [prefix] + ([kind] if kind else []) + ([slot] if slot else [])
                        out.append(Coordinate(".".join(parts), param, expert, kind,
                                              None if global_slots and kind is None else layers, low, high))
                if self.spec.modules:
                    for kind in SCALAR_KINDS:
                        if kind not in self.kinds or (kind == "lm_head" and not self.has_lm_head):
                            continue
                        out.append(Coordinate(f"{prefix}.{kind}", param, expert, kind, None, low, high))
        names = [c.name for c in out]
        if len(set(names)) != len(names):
            raise SpaceError("two coordinates got the same name; give the experts distinct directory names")
        return out

    # -- queries --------------------------------------------------------------------------------

    def describe(self) -> str:
        s = self.spec
        head = [f"search space {s.name or '(inline)'}: {s.granularity}"
                + (f", {s.layers_per_group} layers per group" if s.layers_per_group else "")
                + (f", {s.knots} knots" if s.knots else "") + (", attention/MLP separately" if s.modules else "")
                + f"; method {self.method.name}, {len(self.experts)} expert(s), {self.num_layers} layers, "
                f"family {self.family.name}",
                f"dimension {self.dimension}" + ("; fixed: " + ", ".join(f"{k}={v:g}" for k, v in self.fixed.items())
                                                 if self.fixed else "")]
        width = max((len(c.name) for c in self.coordinates), default=4)
        reach = self.reach or [None] * self.dimension
        rows = [f"  {i:4d}  {c.name:{width}s}  {c.describe()}" + (f"; {n} tensor(s)" if n is not None else "")
                for i, (c, n) in enumerate(zip(self.coordinates, reach))]
        labels = [f"  expert {lab}: {e}" for e, lab in zip(self.experts, self.labels)]
        return "\n".join(head + labels + rows)

    def default_vector(self, values: dict[str, float]) -> list[float]:
        """The coordinates of a recipe that sets every parameter to ``values[param]`` everywhere."""
        return [c.coordinate(values[c.param]) for c in self.coordinates]

    # -- decoding -----------------------------------------------------------------------------

    def values(self, x: Sequence[float]) -> dict[str, float]:
        """Coordinate name -> parameter value."""
        if len(x) != self.dimension:
            raise SpaceError(f"vector has {len(x)} coordinates; the space has {self.dimension}")
        bad = [i for i, v in enumerate(x) if not math.isfinite(v)]
        if bad:
            raise SpaceError(f"vector coordinate {bad[0]} ({self.coordinates[bad[0]].name}) is not finite")
        return {c.name: c.value(float(v)) for c, v in zip(self.coordinates, x)}

    def _layer_list(self, per_slot: list[float]) -> Any:
        """A parameter value across depth, in mergekit syntax."""
        g = self.spec.granularity
        if g == "global":
            return per_slot[0]
        if g in ("per_layer", "smooth"):
            return list(per_slot)
        out = []
        for value, (_, (lo, hi)) in zip(per_slot, self.slots):
            out += [value] * (hi - lo + 1)
        return out

    def _param_value(self, vals: dict[str, float], prefix: str) -> Any:
        slot_names = [slot for slot, _ in self.slots]

        def across(kind: Optional[str]) -> Any:
            keys = [".".join([prefix] + ([kind] if kind else []) + ([s] if s else [])) for s in slot_names]
            return self._layer_list([_round(vals[k]) for k in keys])

        if not self.spec.modules:
            return across(None)
        conds = {kind: across(kind) for kind in MODULE_KINDS if kind in self.kinds}
        for kind in SCALAR_KINDS:
            key = f"{prefix}.{kind}"
            if key in vals:
                conds[kind] = _round(vals[key])
        ordered = kind_conditions(conds, self.family)
        rest = conds.get("mlp", next(iter(conds.values())))
        ordered.append(Condition(value=rest))  # tensors of no known kind follow the MLP values
        return ordered

    def decode(self, x: Sequence[float]) -> Recipe:
        vals = self.values(x)
        per_model: dict[str, dict] = {}
        for expert, label in zip(self.experts, self.labels):
            params: dict[str, Any] = {}
            for param in self.bounds:
                if param not in self.method.global_params:
                    params[param] = self._param_value(vals, f"{label}.{param}")
            for param, value in self.fixed.items():
                if param in self.method.model_params:
                    params[param] = value
            per_model[expert] = params
        glob: dict[str, Any] = {p: self._param_value(vals, p) for p in self.bounds if p in self.method.global_params}
        glob |= {p: v for p, v in self.fixed.items() if p in self.method.global_params and p not in glob}
        return self._build(per_model, glob)

    def recipe_from(self, values: dict[str, float]) -> Recipe:
        """The recipe that sets each parameter to one value everywhere (a reference recipe), built
        outside the space's bounds when needed."""
        per_model = {e: {p: v for p, v in values.items() if p in self.method.model_params} for e in self.experts}
        glob = {p: v for p, v in values.items() if p in self.method.global_params}
        return self._build(per_model, glob)

    def _build(self, per_model: dict[str, dict], glob: dict[str, Any]) -> Recipe:
        if not self.method.model:  # no per-model parameters (slerp): the base is listed beside the others
            per_model = {self.base: {}, **{e: {} for e in self.experts}}
        return build(self.method.name, self.base, per_model, parameters=glob or None, dtype=self.dtype,
                     random_seed=self.random_seed)

    def layer_table(self, recipe_values: dict[str, float]) -> tuple[list[str], list[str], list[list[float]]]:
        """For plotting: rows (expert.param[.kind]), columns (layers) and values across depth."""
        rows, grid = [], []
        cols = [f"{i}" for i in range(self.num_layers)]
        groups: dict[str, list[Coordinate]] = {}
        for c in self.coordinates:
            if c.layers is None and c.kind in SCALAR_KINDS:
                continue
            key = ".".join(x for x in (c.expert and self._label(c.expert), c.param, c.kind) if x)
            groups.setdefault(key, []).append(c)
        for key, coords in groups.items():
            per_slot = [recipe_values[c.name] for c in coords]
            across = self._layer_list(per_slot)
            if not isinstance(across, list):
                across = [across] * self.num_layers
            rows.append(key)
            grid.append([_at_layer(across, i, self.num_layers) for i in range(self.num_layers)])
        return rows, cols, grid

    def _label(self, expert: str) -> str:
        return self.labels[self.experts.index(expert)]


def space_for(cfg: "RunConfig") -> Any:
    """The config's search space for its models' family and tensors (the reference model's header
    is read); see :func:`checked_space` for the check that every coordinate reaches a tensor."""
    from evomerge.merging.architecture import family_of, num_layers
    from evomerge.merging.headers import ModelHeader

    spec = load_spec(cfg.space, where="space")
    if not isinstance(spec, SpaceSpec) or cfg.merge_method == PASSTHROUGH:
        from evomerge.search.path_space import path_space_for

        return path_space_for(cfg, spec)
    ref = ModelHeader(cfg.reference_model, allow_pickle=cfg.allow_pickle)
    return SearchSpace(spec, method=cfg.merge_method, base=cfg.models.base,
                       experts=cfg.models.experts, num_layers=num_layers(ref.config),
                       fixed_parameters=cfg.fixed_parameters, dtype=cfg.dtype, random_seed=cfg.seed,
                       family=family_of(ref.config), tensor_names=ref.names())


def checked_space(cfg: "RunConfig") -> Any:
    """:func:`space_for`, checked against every model (their compatibility) and with each
    coordinate's reach (how many tensors it changes): a user-written coordinate that changes none
    is an error, a preset's a warning. For starting a run and ``evomerge space``; a run that is
    opened again was checked when it started."""
    from evomerge.merging.layout import SEARCH_HINT, build_layout
    from evomerge.merging.plan import open_models

    space = space_for(cfg)
    if not isinstance(space, SearchSpace):
        return space  # a layer path: checked against every parent as it was built
    recipe = space.recipe_from(method_defaults(cfg.merge_method, len(cfg.models.experts)))
    space.reach = coordinate_reach(space, build_layout(recipe, open_models(recipe, cfg.allow_pickle),
                                                       cfg.trust_remote_code, vocab_hint=SEARCH_HINT))
    dead = [c.name for c, n in zip(space.coordinates, space.reach) if n == 0]
    if dead:
        text = (f"space: coordinate(s) {', '.join(dead)} change no tensor of these models (family "
                f"{space.family.name}, {space.num_layers} layers)")
        if not (isinstance(cfg.space, str) and cfg.space in preset_names()):
            raise SpaceError(f"{text}; remove them from the space")
        log.warning("%s; the search will spend effort on them (a finer or coarser preset may fit better)", text)
    return space


def coordinate_reach(space: SearchSpace, layout) -> list[int]:
    """For each coordinate, the number of tensors whose merge parameters change with it."""
    def resolved(x: list[float]) -> list[tuple]:
        recipe = space.decode(x)
        return [(tuple(tuple(sorted(recipe.model_params(m, ts.name, ts.t, ts.slice_index).items()))
                       for m in layout.experts),
                 tuple(sorted(recipe.global_params(ts.name, ts.t, ts.slice_index).items())))
                for ts in layout.tensors]

    x0 = [0.25] * space.dimension
    at = resolved(x0)
    out = []
    for i in range(space.dimension):
        x = list(x0)
        x[i] = 0.75
        out.append(sum(a != b for a, b in zip(at, resolved(x))))
    return out


def _at_layer(values: list[float], i: int, n: int) -> float:
    """mergekit's gradient value at layer i."""
    if len(values) == 1 or n == 1:
        return values[0]
    scaled = i / (n - 1) * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def _round(v: float) -> float:
    """Recipe values keep 6 decimals: exported YAML stays readable and decodes to the same bits."""
    return round(float(v), 6)


def expert_labels(paths: Sequence[str]) -> list[str]:
    """Short, distinct, name-safe labels for the experts (their directory names)."""
    out: list[str] = []
    for i, p in enumerate(paths):
        stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(str(p).rstrip("/")).name) or f"expert{i}"
        label = stem
        k = 1
        while label in out:
            k += 1
            label = f"{stem}_{k}"
        out.append(label)
    return out


def method_defaults(method: str, n_experts: int) -> dict[str, float]:
    """The recipe a user tries first (the reference row 'default'): equal weights 1/n and each
    parameter's reference value (density 0.5 where a sparsifier uses it, SLERP t = 0.5)."""
    return get_method(method).reference_values(n_experts)


__all__ = ["Coordinate", "SearchSpace", "SpaceError", "SpaceSpec", "load_spec",
           "method_defaults", "preset_names"]
