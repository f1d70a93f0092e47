"""What a tensor name says: its decoder layer, and its kind in one vocabulary for every family.

The kinds are ``attention``, ``mlp``, ``norm``, ``embed`` and ``lm_head``, and ``vision`` (a vision
tower and its projector) in multimodal families. Each family (a group of
``model_type`` values whose checkpoints name their tensors alike) is one :class:`Family` entry:
for each kind, the substrings of checkpoint tensor names that mark it, tried in the entry's order
(first match wins). They are mergekit ``filter`` strings, so a recipe the search space writes
reaches the same tensors in ``mergekit-yaml``. A new family is one entry in ``FAMILIES``; a
``model_type`` with no entry is read as Llama-like. Names are those of the model layout
(:mod:`.conversion`): Mixtral's ``block_sparse_moe`` experts are ``mlp.experts`` there, as in
mergekit.

evomerge merges any tensor present in every model. Layer-dependent parameters (gradients across
depth) use the layer index found in the name, as mergekit does; tensors outside the layers get t = 0.
A multimodal checkpoint has one layer stack per tower (Gemma 3: ``language_model.model.layers`` and
``vision_tower.vision_model.encoder.layers``); a layer's position is taken within its own stack, as
mergekit's modular architectures do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")

KINDS = ("attention", "mlp", "norm", "embed", "lm_head", "vision")
CORE_KINDS = KINDS[:5]  # every family has these; the others only where the family says so


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    filters: dict[str, tuple[str, ...]]  # kind -> name substrings, in match order
    vocab: tuple[str, ...] = ()  # tensors indexed by token along axis 0 (default: embed + lm_head filters)
    prefix: str = ""  # a wrapper prefix some checkpoints of the family are stored without (GPT-2: transformer.)

    def kind_of(self, name: str) -> Optional[str]:
        """The tensor's kind, or None for a tensor of no known kind (it follows the MLP's values)."""
        for kind, marks in self.filters.items():
            if any(m in name for m in marks):
                return kind
        return None

    def is_vocab(self, name: str) -> bool:
        marks = self.vocab or self.filters.get("embed", ()) + self.filters.get("lm_head", ())
        return any(m in name for m in marks)


    def aliases(self, name: str) -> tuple[str, ...]:
        """Other names the same tensor has in checkpoints of this family (with or without the prefix)."""
        if not self.prefix:
            return ()
        return (name.removeprefix(self.prefix),) if name.startswith(self.prefix) else (self.prefix + name,)


def _family(name: str, model_types: tuple[str, ...], vocab: tuple[str, ...] = (), prefix: str = "",
            **filters: tuple[str, ...]) -> Family:
    assert set(CORE_KINDS) <= set(filters) <= set(KINDS), name
    return Family(name, model_types, dict(filters), vocab, prefix)


LLAMA = _family("llama", (), attention=("self_attn",), mlp=("mlp",), norm=("norm",), embed=("embed_tokens",),
                lm_head=("lm_head",))

FAMILIES: dict[str, Family] = {f.name: f for f in (
    LLAMA,
    _family("gpt2", ("gpt2",), vocab=("wte", "lm_head"), prefix="transformer.", attention=(".attn.",), mlp=(".mlp.",), norm=("ln_",),
            embed=("wte", "wpe"), lm_head=("lm_head",)),
    _family("gpt_neox", ("gpt_neox",), attention=(".attention.",), mlp=(".mlp.",),
            norm=("layernorm", "layer_norm"), embed=("embed_in",), lm_head=("embed_out",)),
    _family("bloom", ("bloom", "falcon"), norm=("layernorm", "ln_"), attention=("self_attention",), mlp=(".mlp.",),
            embed=("word_embeddings",), lm_head=("lm_head",)),
    # Gemma3ForConditionalGeneration: the vision tower and projector first, then the language model
    _family("gemma3", ("gemma3",), vision=("vision_tower", "multi_modal_projector"),
            **LLAMA.filters),
    _family("opt", ("opt",), vocab=("embed_tokens", "lm_head"), norm=("layer_norm",), attention=("self_attn",),
            mlp=("fc1", "fc2"), embed=("embed_tokens", "embed_positions"), lm_head=("lm_head",)),
)}


def family_of(config: Mapping[str, Any]) -> Family:
    """The family of a Hugging Face config dict (by ``model_type``; Llama-like when unknown)."""
    types = [config.get("model_type")]
    text = config.get("text_config")
    if isinstance(text, Mapping):
        types.append(text.get("model_type"))
    for family in FAMILIES.values():
        if any(t in family.model_types for t in types if t):
            return family
    return LLAMA


def layer_index(name: str) -> int | None:
    """The decoder-layer index in a tensor name (``model.layers.7.mlp...`` -> 7), or None."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def is_vocab_tensor(name: str) -> bool:
    """Whether the tensor is indexed by token along axis 0 (input embeddings or output head), in
    any family."""
    return any(f.is_vocab(name) for f in FAMILIES.values())


def num_layers(config: Mapping[str, Any]) -> int:
    """The number of decoder layers in a Hugging Face config dict."""
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if key in config:
            return int(config[key])
    text = config.get("text_config")
    if isinstance(text, Mapping):
        return num_layers(text)
    raise KeyError("config has no num_hidden_layers / n_layer / num_layers")


def layer_counts(names: Iterable[str]) -> dict[str, int]:
    """The number of layers of each layer stack among ``names`` (one stack in a text model)."""
    counts: dict[str, int] = {}
    for name in names:
        m = _LAYER_RE.search(name)
        if m:
            stack = name[:m.start(1)]
            counts[stack] = max(counts.get(stack, 0), int(m.group(1)) + 1)
    return counts


def layer_t(name: str, counts: Mapping[str, int]) -> float:
    """mergekit's interpolation position: idx / (n - 1) inside a stack of n layers, 0 outside."""
    m = _LAYER_RE.search(name)
    if m is None:
        return 0.0
    n = counts[name[:m.start(1)]]
    return int(m.group(1)) / (n - 1) if n > 1 else 1.0
