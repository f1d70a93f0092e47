"""Merge recipes: mergekit's YAML (the subset evomerge reads and writes) and a Python API.

A recipe holds parameters exactly as mergekit spells them: a scalar, a list (a gradient across the
layers) or a list of ``{filter, value}`` conditions matched by substring against tensor names. The
search builds recipes through :func:`per_kind` and :func:`gradient` without touching YAML, and
whatever it builds serializes to YAML that ``mergekit-yaml`` reads the same way.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Optional, Sequence, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, field_validator

from evomerge.errors import RecipeError
from evomerge.merging.architecture import KINDS, LLAMA, Family
from evomerge.inputs import load_yaml, validate
from evomerge.merging.methods import METHODS, MergeMethod, get_method

Scalar = Union[bool, int, float, str]
ScalarOrGradient = Union[Scalar, list[Scalar]]


class Condition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    filter: Optional[str] = None
    value: ScalarOrGradient


ParamValue = Union[Scalar, list[Scalar], Condition, list[Condition]]
ParamDict = dict[str, ParamValue]


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: Optional[ParamDict] = None


class SliceSource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    layer_range: tuple[int, int]
    parameters: Optional[ParamDict] = None


class Slice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sources: list[SliceSource]
    parameters: Optional[ParamDict] = None


PASSTHROUGH = "passthrough"  # a layer path's method (merging/layer_path.py): it stacks layers, it mixes none
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16", "float64": "float64"}
BOOL_PARAMS = {p.name for m in METHODS.values() for p in m.params.values() if p.flag}
UNIT_PARAMS = {p.name for m in METHODS.values() for p in m.params.values() if p.unit}  # must lie in [0, 1]


def check_method(v: str) -> str:
    if v not in METHODS:
        raise ValueError(f"unknown method {v!r}; known: {', '.join(sorted(METHODS))}")
    return v


def _check_dtype(v: Optional[str]) -> Optional[str]:
    if v is not None and v not in DTYPES:
        raise ValueError(f"unknown dtype {v!r}; known: {', '.join(DTYPES)}")
    return v


MethodName = Annotated[str, AfterValidator(check_method)]
DtypeName = Annotated[Optional[str], AfterValidator(_check_dtype)]


class Recipe(BaseModel):
    """A merge recipe. ``random_seed`` is evomerge's (mergekit ignores it): it seeds DARE/DELLA."""

    model_config = ConfigDict(extra="forbid")
    merge_method: MethodName
    models: Optional[list[ModelEntry]] = None
    slices: Optional[list[Slice]] = None
    base_model: Optional[str] = None
    parameters: Optional[ParamDict] = None
    dtype: DtypeName = None
    out_dtype: DtypeName = None
    tokenizer_source: Optional[str] = None
    random_seed: int = 0

    @field_validator("tokenizer_source")
    @classmethod
    def _tok(cls, v: Optional[str]) -> Optional[str]:
        if v == "union":
            raise ValueError("'union' is not supported; use 'base' or a model reference")
        return v

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Any, source: str = "recipe") -> "Recipe":
        recipe = validate(cls, data, RecipeError, source, "a recipe")
        recipe.validate_semantics(source)
        return recipe

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Recipe":
        return cls.from_dict(load_yaml(path, RecipeError, "recipe"), source=str(path))

    def to_dict(self) -> dict:
        return self.model_dump(mode="json", exclude_none=True, exclude_defaults=True) | {
            "merge_method": self.merge_method}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    # -- semantics ---------------------------------------------------------------------------

    @property
    def method(self) -> MergeMethod:
        return get_method(self.merge_method)

    def sources(self) -> list[tuple[str, str, Optional[ParamDict]]]:
        """(key path, model, parameters) of every model entry, for validation and listing."""
        if self.models is not None:
            return [(f"models[{i}]", m.model, m.parameters) for i, m in enumerate(self.models)]
        out = []
        for si, s in enumerate(self.slices or []):
            out += [(f"slices[{si}].sources[{j}]", src.model, src.parameters) for j, src in enumerate(s.sources)]
        return out

    def model_names(self) -> list[str]:
        """Every model the recipe reads, base first, each once."""
        names = [self.base_model] if self.base_model else []
        for _, m, _ in self.sources():
            if m not in names:
                names.append(m)
        return names

    def expert_names(self) -> list[str]:
        """The models whose task vectors are mixed (every model but the base)."""
        if not self.method.needs_base:  # a base named here is one more model with a weight
            return [m for m in self.model_names() if m in {s[1] for s in self.sources()}]
        return [m for m in self.model_names() if m != self.base_model]

    def validate_semantics(self, source: str = "recipe") -> None:
        m = self.method
        if (self.models is None) == (self.slices is None):
            raise RecipeError(f"{source}: exactly one of 'models' or 'slices' must be given")
        if self.slices is not None:
            if not self.slices or any(not s.sources for s in self.slices):
                raise RecipeError(f"{source}: slices: every slice needs at least one source")
            for si, s in enumerate(self.slices):
                ranges = {src.layer_range for src in s.sources}
                if len(ranges) != 1:
                    raise RecipeError(f"{source}: slices[{si}]: every source must have the same layer_range "
                                      f"(got {sorted(ranges)})")
                lo, hi = next(iter(ranges))
                if not 0 <= lo < hi:
                    raise RecipeError(f"{source}: slices[{si}].layer_range: [{lo}, {hi}] is empty or negative")
            models = [tuple(src.model for src in s.sources) for s in self.slices]
            if len(set(models)) != 1:
                raise RecipeError(f"{source}: slices: every slice must name the same models in the same order")
        if m.needs_base and not self.base_model:
            raise RecipeError(f"{source}: base_model: method {m.name!r} needs a base model")
        if not m.needs_base and self.base_model and self.base_model not in {s[1] for s in self.sources()}:
            raise RecipeError(f"{source}: base_model: {m.name} does not use a base model; list "
                              f"{self.base_model!r} under models with a weight, or remove base_model")
        experts = self.expert_names()
        if m.experts is not None and len(experts) != m.experts:
            count = "one other model" if m.experts == 1 else f"{m.experts} other models"
            raise RecipeError(f"{source}: models: {m.name} needs the base model and exactly {count} "
                              f"(got {len(experts)} others)")
        if not experts:
            raise RecipeError(f"{source}: models: no model to merge besides the base")
        allowed_global = m.global_params | m.model_params
        for key, value in (self.parameters or {}).items():
            if key not in allowed_global:
                raise RecipeError(f"{source}: parameters.{key}: not a parameter of {m.name!r} "
                                  f"(allowed: {', '.join(sorted(allowed_global)) or 'none'})")
            _check_values(f"{source}: parameters.{key}", key, value)
        for path, model, params in self.sources():
            for key, value in (params or {}).items():
                if key not in m.model_params:
                    raise RecipeError(f"{source}: {path}.parameters.{key}: not a per-model parameter of "
                                      f"{m.name!r} (allowed: {', '.join(sorted(m.model_params)) or 'none'})")
                _check_values(f"{source}: {path}.parameters.{key}", key, value)
        for p in m.globals_:
            if p.required and p.name not in (self.parameters or {}):
                raise RecipeError(f"{source}: parameters.{p.name}: {m.name} needs {p.name} ({p.summary})")
        if "weight" in m.model_params:
            for path, model, params in self.sources():
                if model == self.base_model and m.needs_base:
                    continue
                if "weight" not in (params or {}) and "weight" not in (self.parameters or {}):
                    raise RecipeError(f"{source}: {path}.parameters.weight: missing ({model})")

    # -- resolution ------------------------------------------------------------------------------

    def model_params(self, model: str, tensor_name: str, t: float,
                     slice_index: int = 0) -> dict[str, Any]:
        """Per-model parameters for one tensor, with mergekit's precedence and defaults."""
        out = self._resolve(self.method.model_params, model, tensor_name, t, slice_index)
        return out | {k: v for k, v in self.method.defaults().items() if k not in out}

    def global_params(self, tensor_name: str, t: float, slice_index: int = 0) -> dict[str, Any]:
        return self._resolve(self.method.global_params, None, tensor_name, t, slice_index)

    def _resolve(self, keys: Iterable[str], model: Optional[str], tensor_name: str, t: float,
                 slice_index: int) -> dict[str, Any]:
        """The first setting of each key that applies to the tensor, most specific source first."""
        out: dict[str, Any] = {}
        for key in sorted(keys):
            for settings in self._param_sources(model, slice_index):
                if settings and key in settings:
                    value = evaluate(tensor_name, settings[key], t, _validator(key))
                    if value is not None:
                        out[key] = value
                        break
        return out

    def _param_sources(self, model: Optional[str], slice_index: int) -> Iterable[Optional[ParamDict]]:
        if self.models is not None:
            if model is not None:
                for e in self.models:
                    if e.model == model:
                        yield e.parameters
        else:
            s = self.slices[slice_index]
            if model is not None:
                for src in s.sources:
                    if src.model == model:
                        yield src.parameters
            yield s.parameters
        yield self.parameters


def _validator(key: str) -> Callable[[Any], Any]:
    if key in BOOL_PARAMS:
        return _to_bool
    return float


def _to_bool(v: Any) -> bool:
    if isinstance(v, str):
        if v.lower() in ("true", "yes", "1"):
            return True
        if v.lower() in ("false", "no", "0"):
            return False
        raise ValueError(f"not a boolean: {v!r}")
    return bool(v)


def _leaves(value: ParamValue) -> Iterable[Any]:
    if isinstance(value, Condition):
        value = [value]
    if isinstance(value, list):
        for v in value:
            if isinstance(v, Condition):
                yield from _leaves(v.value)
            else:
                yield v
    else:
        yield value


def _check_values(where: str, key: str, value: ParamValue) -> None:
    if isinstance(value, list) and not value:
        raise RecipeError(f"{where}: an empty list")
    for leaf in _leaves(value):
        try:
            v = _validator(key)(leaf)
        except (TypeError, ValueError):
            raise RecipeError(f"{where}: {leaf!r} is not a valid value") from None
        if isinstance(v, float):
            if not math.isfinite(v):
                raise RecipeError(f"{where}: {leaf!r} is not finite")
            if key in UNIT_PARAMS and not 0 <= v <= 1:
                raise RecipeError(f"{where}: {v} is out of range [0, 1]")


def evaluate(tensor_name: str, setting: ParamValue, t: float, validate: Callable[[Any], Any]) -> Any:
    """Resolve filters and gradients like mergekit 0.1.5 (same arithmetic, same precedence)."""
    if isinstance(setting, Condition):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return validate(setting)
    if not setting:
        return None
    if all(isinstance(e, (bool, int, float, str)) for e in setting):
        values = [validate(e) for e in setting]
        if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return validate((1 - frac) * values[i0] + frac * values[i1])
    for cond in setting:
        if not isinstance(cond, Condition):
            cond = Condition(value=cond)
        if cond.filter is None or cond.filter == "*" or (tensor_name and cond.filter in tensor_name):
            return evaluate(tensor_name, cond.value, t, validate)
    return None


# -- Python API for building recipes ------------------------------------------------------------

def gradient(values: Sequence[float]) -> list[float]:
    """Per-layer values: with one value per layer, layer i gets values[i] exactly."""
    return [float(v) for v in values]


def per_kind(values: dict[str, Any], default: Any = None, family: Family = LLAMA) -> ParamValue:
    """A parameter that differs by tensor kind (see :mod:`.architecture`: attention, mlp, norm,
    embed, lm_head), written as the family's mergekit filters; each value may be a scalar or a
    per-layer list. ``default`` covers tensors matching no kind."""
    unknown = set(values) - set(KINDS)
    if unknown:
        raise RecipeError(f"per_kind: unknown tensor kinds {sorted(unknown)}; known: {list(KINDS)}")
    conds = kind_conditions(values, family)
    if default is not None:
        conds.append(Condition(value=default))
    return conds


def kind_conditions(values: dict[str, Any], family: Family) -> list[Condition]:
    """One condition per filter of each kind given, in the family's match order."""
    return [Condition(filter=mark, value=values[kind]) for kind, marks in family.filters.items() if kind in values
            for mark in marks]


def build(method: str, base_model: Optional[str], experts: dict[str, ParamDict], *,
          parameters: Optional[ParamDict] = None, dtype: Optional[str] = None,
          out_dtype: Optional[str] = None, tokenizer_source: Optional[str] = None,
          random_seed: int = 0) -> Recipe:
    """Build and validate a recipe from Python values."""
    data: dict[str, Any] = {
        "merge_method": method,
        "models": [{"model": name, "parameters": params} for name, params in experts.items()],
        "random_seed": random_seed,
    }
    for key, value in (("base_model", base_model), ("parameters", parameters), ("dtype", dtype),
                       ("out_dtype", out_dtype), ("tokenizer_source", tokenizer_source)):
        if value is not None:
            data[key] = value
    return Recipe.from_dict(_plain(data), source="recipe")


def _plain(value: Any) -> Any:
    if isinstance(value, Condition):
        return value.model_dump(exclude_none=True)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
