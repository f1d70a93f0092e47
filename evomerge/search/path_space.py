"""The data-flow search space: a vector in [0, 1]^d to a layer path (:mod:`evomerge.merging.layer_path`).

Sakana's form: the parents' decoder stacks are laid end to end (the base's layers, then each
expert's, in the config's order) and that sequence is repeated ``repeats`` times; each position is
a slot. A candidate keeps some slots, in slot order, each with a scale on its layer's residual
contributions.

The encoding is structured, one coordinate per slot: below ``threshold`` the slot is left out and
its coordinate means nothing else; from ``threshold`` to 1 the slot is in, and the coordinate is
its scale, mapped linearly onto ``[scale.low, scale.high]``. So a scale is searched only where its
slot is in, and the space has half the dimensions of an include bit plus a scale per slot. A path
is at most ``max_depth`` times as deep as the parents: when more slots are in, the ones with the
highest coordinates stay. The search starts from one parent's own stack at scale 1, every other
slot just below the threshold: by default the parent whose reference row scores best (the first
parent when references are off), or the one ``start`` names.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

from evomerge.merging.architecture import num_layers
from evomerge.merging.layer_path import LayerPath, Step, check_path, scale_filters
from evomerge.merging.recipe import PASSTHROUGH
from evomerge.search.space import Coordinate, CoordinateSpace, SpaceError, expert_labels

if TYPE_CHECKING:
    from evomerge.config import RunConfig


class ScaleRange(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    low: float = Field(0.5, gt=0)
    high: float = Field(1.5, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "ScaleRange":
        if not (math.isfinite(self.high) and self.low <= 1.0 <= self.high
                and (self.low < self.high or self.low == self.high == 1.0)):
            raise ValueError(f"scale: low ({self.low}) <= 1 <= high ({self.high}), low below high (or both 1: no scales)")
        return self


class PathSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["layer_path"]
    name: Optional[str] = None
    description: str = ""
    repeats: int = Field(2, ge=1, le=8)
    max_depth: float = Field(1.5, gt=0, le=8)
    threshold: float = Field(0.5, gt=0, lt=1)
    scale: ScaleRange = ScaleRange()
    start: str = "best"  # the parent whose stack the search starts from: "base", an expert's label, or "best"


class PathSpace(CoordinateSpace):
    """A :class:`PathSpec` bound to the run's parents (the base, if any, then the experts)."""

    def __init__(self, spec: PathSpec, *, base: Optional[str], experts: Sequence[str], configs: dict[str, dict],
                 num_layers: int, dtype: Optional[str] = None):
        self.spec = spec
        self.dtype = dtype
        self.experts = list(experts)
        self.labels = expert_labels(self.experts)
        self.models = ([base] if base else []) + self.experts
        self.model_labels = (["base"] if base else []) + self.labels
        self.num_layers = num_layers
        self.max_steps = max(1, math.floor(spec.max_depth * num_layers))
        scaled = spec.scale.low != 1.0 or spec.scale.high != 1.0
        self.ends = scale_filters(configs[self.models[0]], scaled)
        self.slots = [(r, m, layer) for r in range(spec.repeats) for m in range(len(self.models))
                      for layer in range(num_layers)]
        self.coordinates = [Coordinate(f"r{r}.{self.model_labels[m]}.L{layer}", "slot", self.model_labels[m], None,
                                       (layer, layer), 0.0, 1.0) for r, m, layer in self.slots]
        if spec.start != "best" and spec.start not in self.model_labels:
            raise SpaceError(f"space start: {spec.start!r} is not a parent (parents: {', '.join(self.model_labels)}, "
                             "or best)")
        check_path(self.decode(self.x0()), configs, self.max_steps)

    def _scale(self, g: float) -> float:
        t = (g - self.spec.threshold) / (1.0 - self.spec.threshold)
        return round(self.spec.scale.low + t * (self.spec.scale.high - self.spec.scale.low), 6)

    def _gene(self, scale: float) -> float:
        span = self.spec.scale.high - self.spec.scale.low
        t = (scale - self.spec.scale.low) / span if span else 0.5
        return self.spec.threshold + t * (1.0 - self.spec.threshold)

    def decode(self, x: Sequence[float]) -> LayerPath:
        if len(x) != self.dimension:
            raise SpaceError(f"space: a vector of {len(x)} values for a layer path of {self.dimension} slots")
        g = [min(max(float(v), 0.0), 1.0) for v in x]
        chosen = [i for i, v in enumerate(g) if v >= self.spec.threshold]
        if len(chosen) > self.max_steps:
            chosen = sorted(sorted(chosen, key=lambda i: (-g[i], i))[:self.max_steps])
        if not chosen:  # an empty stack is no model: the slot nearest to being in
            chosen = [max(range(len(g)), key=lambda i: (g[i], -i))]
        return LayerPath(tuple(Step(self.models[self.slots[i][1]], self.slots[i][2], self._scale(g[i])) for i in chosen),
                         self.ends, self.dtype)

    def start_label(self, scores: Optional[dict[str, float]] = None) -> str:
        """The parent the search starts from: ``start``, or with ``best`` the parent with the
        highest of ``scores`` (by label: the parents' search fitness), else the first parent."""
        if self.spec.start != "best":
            return self.spec.start
        known = {k: v for k, v in (scores or {}).items() if k in self.model_labels and v is not None}
        return max(known, key=known.get) if known else self.model_labels[0]

    def x0(self, scores: Optional[dict[str, float]] = None) -> list[float]:
        """The start: that parent's own stack at scale 1, every other slot just below the threshold."""
        start = self.model_labels.index(self.start_label(scores))
        below = self.spec.threshold / 2
        return [self._gene(1.0) if r == 0 and m == start else below for r, m, _ in self.slots]

    def describe(self) -> str:
        s = self.spec
        lines = [f"search space {s.name or 'inline'}: layer path over {len(self.models)} parents "
                 f"({', '.join(self.model_labels)}) x {self.num_layers} layers x {s.repeats} repeats = "
                 f"{self.dimension} slots (dimension {self.dimension})",
                 f"- a slot is in when its coordinate is >= {s.threshold:g}; its scale on the layer's residual "
                 f"contributions then maps [{s.threshold:g}, 1] onto [{s.scale.low:g}, {s.scale.high:g}]",
                 f"- at most {self.max_steps} steps ({s.max_depth:g} x {self.num_layers} layers); start: the stack of "
                 + ("the parent that scores best (the first one without references)" if s.start == "best"
                    else s.start)]
        return "\n".join(lines)

    def layer_table(self, values: dict[str, float]) -> tuple[list[str], list[str], list[list[float]]]:
        """The path as a grid: one row per parent, one column per step, the step's scale where it
        runs that parent's layer (0 elsewhere)."""
        path = self.decode([values[n] for n in self.names])
        grid = [[s.scale if s.model == m else 0.0 for s in path.steps] for m in self.models]
        cols = [f"{i}:L{s.layer}" for i, s in enumerate(path.steps)]
        return list(self.model_labels), cols, grid


def path_space_for(cfg: "RunConfig", spec: Any) -> PathSpace:
    """The config's layer-path space over its parents (their configs read from disk)."""
    from evomerge.merging.headers import ModelHeader

    if not isinstance(spec, PathSpec):
        raise SpaceError("merge_method passthrough: stacks layers; give it space: layer_path (or a space of kind "
                         "layer_path)")
    if cfg.merge_method != PASSTHROUGH:
        raise SpaceError(f"space {spec.name or 'inline'}: a layer path stacks the parents' layers and mixes none: "
                         f"set merge_method: passthrough (not {cfg.merge_method})")
    models = cfg.models.names()
    configs = {m: ModelHeader(m, allow_pickle=cfg.allow_pickle).config for m in models}
    depths = {m: num_layers(c) for m, c in configs.items()}
    if len(set(depths.values())) != 1:
        raise SpaceError("space: a layer path's parents must have one depth (got "
                         + ", ".join(f"{m}: {n}" for m, n in depths.items()) + ")")
    return PathSpace(spec, base=cfg.models.base, experts=cfg.models.experts, configs=configs,
                     num_layers=depths[models[0]], dtype=cfg.dtype)
