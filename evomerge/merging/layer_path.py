"""A layer path (the data-flow space): a stack of decoder layers drawn from the parents' stacks,
in any order and with repeats, each with a scale on its residual contributions.

A step names a model, one of its decoder layers and a scale ``a``. The step adds ``a`` times its
attention output and ``a`` times its MLP output to the residual stream; everything else in the
layer is the parent's. This is Sakana's per-transition input scale in another form: on a pre-norm
layer (its sublayers see the stream only through an RMS norm, which ignores scale), scaling the
stream entering step ``t`` by ``s_t`` and leaving the rest alone computes, up to one overall factor
that the final norm removes, what scaling the residual contributions of step ``t`` by
``a_t = 1 / (s_1 ... s_t)`` computes (norm epsilons aside). evomerge searches ``a`` directly: the
exported model then holds the same arithmetic as the candidate that was scored, with no epsilon
left between them.

The embeddings come from the first step's model and the final norm and output head from the last
step's (the tied head with the embeddings), as mergekit's ``passthrough`` takes its pre- and
post-layer tensors from the first and last slice. :meth:`LayerPath.to_dict` writes the
``passthrough`` recipe that rebuilds the stack, each scale a mergekit ``scale`` on the tensors
that end the sublayers (``o_proj`` and ``down_proj`` in Llama-like families). This module is the
path alone, without torch; :mod:`evomerge.merging.layer_stack` writes the same model itself
(``materialize``) and wires it in place for scoring (``PathModel``), without copying a weight.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from evomerge.errors import EvomergeError
from evomerge.merging.architecture import family_of, num_layers
from evomerge.merging.recipe import DTYPES, PASSTHROUGH

# the tensors whose outputs a layer adds to the residual stream (mergekit filters), per model_type;
# a model_type not here is Llama-like. Families with norms after their sublayers (Gemma 2 and 3,
# OLMo 2) and mixtures of experts take paths without scales (see scale_filters).
LLAMA_ENDS = ("o_proj", "down_proj")
_ENDS: dict[str, tuple[str, ...]] = {"starcoder2": ("o_proj", "c_proj")}
_UNSCALED = ("gemma2", "gemma3", "gemma3_text", "olmo2", "mixtral", "qwen2_moe", "qwen3_moe")
_NO_STACK = ("gpt2", "gpt_neox", "bloom", "falcon", "opt")


class LayerPathError(EvomergeError):
    """A layer path does not fit its models."""


@dataclass(frozen=True)
class Step:
    model: str
    layer: int
    scale: float = 1.0


@dataclass(frozen=True)
class LayerPath:
    """The steps, the family's sublayer-ending tensors a scale goes on (:func:`scale_filters`) and
    the dtype the stacked model is written in (None: the parents')."""
    steps: tuple[Step, ...]
    ends: tuple[str, ...] = LLAMA_ENDS
    dtype: Optional[str] = None

    def runs(self) -> list[tuple[str, int, int, float]]:
        """(model, first layer, end layer, scale) of each maximal run of consecutive layers of one
        model at one scale: the slices of the mergekit recipe."""
        out: list[list] = []
        for s in self.steps:
            if out and out[-1][0] == s.model and out[-1][2] == s.layer and out[-1][3] == s.scale:
                out[-1][2] += 1
            else:
                out.append([s.model, s.layer, s.layer + 1, s.scale])
        return [tuple(r) for r in out]

    def to_dict(self) -> dict:
        """The mergekit ``passthrough`` recipe that builds this stack."""
        slices = []
        for model, lo, hi, scale in self.runs():
            source: dict[str, Any] = {"model": model, "layer_range": [lo, hi]}
            if scale != 1.0:
                source["parameters"] = {"scale": [{"filter": f, "value": scale} for f in self.ends]}
            slices.append({"sources": [source]})
        out: dict[str, Any] = {"merge_method": PASSTHROUGH, "slices": slices}
        if self.dtype:
            out["dtype"] = self.dtype
        return out

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def model_names(self) -> list[str]:
        """Every model the path reads, in order of first use."""
        return list(dict.fromkeys(s.model for s in self.steps))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "recipe") -> "LayerPath":
        """The stack a ``passthrough`` recipe of single-source slices builds (as :meth:`to_dict`
        writes them: a scale, if any, one value on the family's sublayer ends)."""
        if not isinstance(data, Mapping) or data.get("merge_method") != PASSTHROUGH \
                or not isinstance(data.get("slices"), list) or not data["slices"]:
            raise LayerPathError(f"{source}: a layer path is a passthrough recipe with slices")
        unknown = set(data) - {"merge_method", "slices", "dtype"}
        if unknown:
            raise LayerPathError(f"{source}: {sorted(unknown)[0]}: not a key of a layer path's passthrough recipe")
        dtype = data.get("dtype")
        if dtype is not None and dtype not in DTYPES:
            raise LayerPathError(f"{source}: dtype: unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
        ends: set[tuple[str, ...]] = set()
        steps = []
        for i, sl in enumerate(data["slices"]):
            where = f"{source}: slices[{i}]"
            sources = sl.get("sources") if isinstance(sl, Mapping) else None
            if not isinstance(sources, list) or len(sources) != 1 or not isinstance(sources[0], Mapping):
                raise LayerPathError(f"{where}.sources: a layer path takes exactly one source per slice")
            src = sources[0]
            rng = src.get("layer_range")
            if not (isinstance(rng, (list, tuple)) and len(rng) == 2 and all(isinstance(x, int) for x in rng)
                    and 0 <= rng[0] < rng[1]):
                raise LayerPathError(f"{where}.sources[0].layer_range: two layer indices [first, end), got {rng!r}")
            if set(src) - {"model", "layer_range", "parameters"} or not isinstance(src.get("model"), str):
                raise LayerPathError(f"{where}.sources[0]: a source is a model, a layer_range and parameters")
            scale, filters = _scale_of(src.get("parameters"), f"{where}.sources[0].parameters")
            if filters:
                ends.add(filters)
            steps += [Step(src["model"], layer, scale) for layer in range(rng[0], rng[1])]
        if len(ends) > 1:
            raise LayerPathError(f"{source}: slices: every scale must be on the same tensors (got "
                                 f"{' and '.join(str(list(e)) for e in sorted(ends))})")
        return cls(tuple(steps), next(iter(ends), LLAMA_ENDS), DTYPES[dtype] if dtype else None)


def _scale_of(params: Any, where: str) -> tuple[float, tuple[str, ...]]:
    """A slice source's scale and the filters it is on (none for 1)."""
    if params is None:
        return 1.0, ()
    if not isinstance(params, Mapping) or set(params) - {"scale"}:
        raise LayerPathError(f"{where}: a layer path's slices take only 'scale'")
    entries = params.get("scale")
    if isinstance(entries, (int, float)) and not isinstance(entries, bool):
        raise LayerPathError(f"{where}.scale: give it per sublayer end ({{filter, value}} entries), not on "
                             "every tensor of the layer")
    values = {e.get("value") for e in entries} if isinstance(entries, list) and all(
        isinstance(e, Mapping) and set(e) == {"filter", "value"} for e in entries) else None
    value = next(iter(values)) if values and len(values) == 1 else None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise LayerPathError(f"{where}.scale: one value on the sublayer ends as {{filter, value}} entries")
    return float(value), tuple(e["filter"] for e in entries)


def scale_filters(config: Mapping[str, Any], scaled: bool) -> tuple[str, ...]:
    """The tensors that end a layer's sublayers in this family (mergekit filters); a family whose
    decoder layers cannot be re-stacked is refused, and one whose residual contributions are not
    the output of one linear map per sublayer when the path has a scale."""
    kind = str(config.get("model_type"))
    if kind in _NO_STACK or family_of(config).name in _NO_STACK:
        raise LayerPathError(f"model_type {kind}: its decoder layers cannot be re-stacked into a layer path "
                             "(Llama-like families only)")
    if scaled and kind in _UNSCALED:
        raise LayerPathError(f"model_type {kind}: a layer path's scales are only for Llama-like dense layers "
                             "(no norm after a sublayer, no experts): use scale 1 on every step")
    return _ENDS.get(kind, LLAMA_ENDS)


def check_path(path: LayerPath, configs: Mapping[str, Mapping[str, Any]], max_layers: Optional[int] = None) -> None:
    """Every step names a model given, a layer it has, a finite positive scale; the models share
    one architecture; at most ``max_layers`` steps."""
    if not path.steps:
        raise LayerPathError("layer path: no step")
    if max_layers is not None and len(path.steps) > max_layers:
        raise LayerPathError(f"layer path: {len(path.steps)} steps, more than the {max_layers} allowed")
    for i, s in enumerate(path.steps):
        if s.model not in configs:
            raise LayerPathError(f"layer path: step {i}: model {s.model!r} is not one of the parents")
        n = num_layers(configs[s.model])
        if not 0 <= s.layer < n:
            raise LayerPathError(f"layer path: step {i}: {s.model} has layers 0..{n - 1}, not {s.layer}")
        if not (s.scale > 0 and s.scale < float("inf")):
            raise LayerPathError(f"layer path: step {i}: scale {s.scale} must be positive and finite")
    shapes = {m: _shape(c) for m, c in configs.items()}
    first = next(iter(shapes))
    for m, shape in shapes.items():
        if shape != shapes[first]:
            raise LayerPathError(f"layer path: {m} is not the architecture of {first} "
                                 f"({shape} against {shapes[first]})")
    scale_filters(configs[first], any(s.scale != 1.0 for s in path.steps))


_SHAPE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
               "head_dim", "vocab_size", "rope_theta", "rope_scaling", "rope_parameters", "sliding_window",
               "tie_word_embeddings")


def _shape(config: Mapping[str, Any]) -> tuple:
    return tuple((k, json.dumps(config.get(k), sort_keys=True)) for k in _SHAPE_KEYS)


def path_config(path: LayerPath, configs: Mapping[str, Mapping[str, Any]]) -> dict:
    """The Hugging Face config of the stacked model: the first step's model's, with the path's
    depth and each layer's type (full or sliding attention) from its origin."""
    out = copy.deepcopy(dict(configs[path.steps[0].model]))
    out["num_hidden_layers"] = len(path.steps)
    if isinstance(out.get("layer_types"), list):
        out["layer_types"] = [configs[s.model]["layer_types"][s.layer] for s in path.steps]
    for key in ("max_window_layers",):  # Qwen2: sliding window from this layer on, a depth in the base
        if key in out and out[key] >= num_layers(configs[path.steps[0].model]):
            out[key] = len(path.steps)
    return out
