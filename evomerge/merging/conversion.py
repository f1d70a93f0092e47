"""Checkpoint names against the names of the model transformers builds, through transformers' own
conversion registry (``transformers.conversion_mapping``).

Two kinds of families need it:

- **Fusing families** (Mixtral, Qwen2-MoE, Qwen3-MoE and every model type transformers routes to
  their conversions): their expert matrices ``experts.N.w1`` / ``w3`` / ``w2`` (or
  ``gate_proj`` / ``up_proj`` / ``down_proj``) are stacked and concatenated into 3-D
  ``mlp.experts.gate_up_proj`` / ``down_proj`` when transformers loads them. mergekit 0.1.5 merges
  those fused tensors as wholes (one TIES threshold, one DARE draw stream, one SLERP angle per
  fused tensor) and writes them under the fused names, which transformers loads as they are. So
  evomerge reads such a checkpoint in its model layout (:class:`ConvertedView`) for the merge to
  disk and for the engine alike.
- **Renaming families** (GPT-NeoX's ``embed_out`` loads as ``lm_head``; Gemma 3's
  ``language_model.model.*`` as ``model.language_model.*``): the checkpoint's names are kept
  (mergekit keeps them); :func:`live_name` finds the live parameter of each.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch


def conversion_key(config: Mapping[str, Any]) -> Optional[str]:
    """What transformers looks conversions up by: the model class, else the ``model_type``."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    for key in [*(config.get("architectures") or []), config.get("model_type")]:
        if key and get_checkpoint_conversion_mapping(key):
            return key
    return None


def _transforms(key: Optional[str]) -> list:
    """A fresh copy of transformers' conversion list for ``key`` (its objects are stateful)."""
    if not key:
        return []
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    return get_checkpoint_conversion_mapping(key) or []


def _is_renaming(transform) -> bool:
    from transformers.core_model_loading import WeightRenaming

    return isinstance(transform, WeightRenaming)


def _natural(key: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key))


@dataclass
class _Fused:
    """A tensor that one converter builds from others: the converter's index in the list, the
    layer name it keys on, and its sources per source pattern (in checkpoint order)."""
    transform: int
    layer: str
    sources: dict[str, list["Origin"]] = field(default_factory=dict)


Origin = Union[str, _Fused]  # a checkpoint tensor name, or a fused tensor


def plan(key: Optional[str], names: Sequence[str]) -> Optional[dict[str, Origin]]:
    """Model-layout name -> where it comes from, when transformers fuses some of these tensors;
    None when it fuses none (renamings alone do not count: those checkpoints keep their names)."""
    transforms = _transforms(key)
    current: dict[str, Origin] = {n: n for n in names}
    fused_any = False
    for i, tr in enumerate(transforms):
        renamed: dict[str, Origin] = {}
        groups: dict[str, _Fused] = {}
        for key in sorted(current, key=_natural):
            new_key, pattern = tr.rename_source_key(key)
            if pattern is None:
                renamed[key] = current[key]
            elif _is_renaming(tr):
                renamed[new_key] = current[key]
            else:
                group = groups.setdefault(new_key, _Fused(i, new_key))
                group.sources.setdefault(pattern, []).append(current[key])
        for layer, group in groups.items():
            fused_any = True
            first = tr.target_patterns[0]
            head, _, tail = layer.partition(first)
            for target in tr.target_patterns:
                renamed[head + target + tail] = group
        current = renamed
    return current if fused_any else None


def materialize(key: Optional[str], target: str, origin: Origin,
                read: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """The tensor ``target`` of the model layout; ``read`` gives a checkpoint tensor by name."""
    if isinstance(origin, str):
        return read(origin)
    converter = _transforms(key)[origin.transform]
    for pattern in converter.source_patterns:
        for j, source in enumerate(origin.sources.get(pattern, [])):
            converter.add_tensor(origin.layer, f"{origin.layer}#{pattern}#{j}", pattern,
                                 lambda s=source: materialize(key, "", s, read))
    out = converter.convert(origin.layer)
    if target not in out:
        raise KeyError(f"transformers' conversion of {origin.layer} gave {sorted(out)}, not {target}")
    return out[target]


def unfuse(key: Optional[str], target: str, origin: _Fused, tensor: torch.Tensor,
           stored_shape: Callable[[str], tuple[int, ...]]) -> list[tuple[str, torch.Tensor]]:
    """A fused tensor split back into the stored tensors it was built from (for loaders that take
    checkpoint names, such as vLLM's): each expert's slice of ``tensor`` is its source tensors,
    one per source pattern in the converter's order, concatenated along their first axis, which
    is how transformers' MoE converters (stack the experts, concatenate gate and up) build it."""
    converter = _transforms(key)[origin.transform]
    if len(converter.target_patterns) != 1:
        raise KeyError(f"{target}: transformers' converter makes {len(converter.target_patterns)} tensors")
    sources = [origin.sources.get(p, []) for p in converter.source_patterns]
    if any(not isinstance(n, str) for names in sources for n in names) or len({len(n) for n in sources}) != 1:
        raise KeyError(f"{target}: its sources are not one stored tensor per expert and pattern")
    experts = len(sources[0])
    if tensor.shape[0] != experts:
        raise KeyError(f"{target}: {tensor.shape[0]} rows along the expert axis for {experts} experts")
    out = []
    for e in range(experts):
        names = [names[e] for names in sources]
        shapes = [stored_shape(n) for n in names]
        if sum(s[0] for s in shapes) != tensor.shape[1] or any(tuple(s[1:]) != tuple(tensor.shape[2:]) for s in shapes):
            raise KeyError(f"{target}: shape {list(tensor.shape)} is not its sources {shapes} stacked and joined")
        out += zip(names, torch.split(tensor[e], [s[0] for s in shapes], dim=0))
    return out


def renamings(module: torch.nn.Module) -> list:
    """The renamings transformers applies when it loads a checkpoint into ``module``: the root
    model's and each sub-model's (Gemma 3's language model and vision tower), scoped as
    transformers scopes them."""
    from transformers.conversion_mapping import get_model_conversion_mapping

    return [tr for tr in get_model_conversion_mapping(module) if _is_renaming(tr)]


def live_name(name: str, live: Union[set, dict], renames: Sequence) -> Optional[str]:
    """The live model's parameter for a checkpoint tensor name: the same name, or the name
    ``renames`` (from :func:`renamings`) give it (GPT-NeoX: embed_out -> lm_head; Gemma 3:
    language_model.model.layers -> model.language_model.layers); None if neither exists."""
    if name in live:
        return name
    renamed = name
    for tr in renames:
        renamed, _ = tr.rename_source_key(renamed)
    return renamed if renamed in live else None
