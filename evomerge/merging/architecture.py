"""What a tensor name says: its decoder layer and its kind (attention, MLP, norm, embeddings, lm_head).

evomerge is architecture-agnostic: any tensor present in every model is merged. Layer-dependent
parameters (gradients across depth) use the layer index found in the name, as mergekit does for the
decoder layers of the architectures it knows; tensors outside the layers get t = 0.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")
_EMBED_MARKERS = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings")
_LM_HEAD_MARKERS = ("lm_head", "embed_out", "output.weight")

TENSOR_KINDS = ("embed", "lm_head", "attention", "mlp", "norm", "other")


def layer_index(name: str) -> int | None:
    """The decoder-layer index in a tensor name (``model.layers.7.mlp...`` -> 7), or None."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def tensor_kind(name: str) -> str:
    """Classify a tensor name into one of TENSOR_KINDS."""
    if any(k in name for k in _EMBED_MARKERS):
        return "embed"
    if any(k in name for k in _LM_HEAD_MARKERS):
        return "lm_head"
    if "norm" in name or name.endswith("ln_f.weight") or ".ln_" in name:
        return "norm"
    if "attn" in name or "attention" in name:
        return "attention"
    if "mlp" in name or "feed_forward" in name or "ffn" in name:
        return "mlp"
    return "other"


def is_vocab_tensor(name: str) -> bool:
    """Whether the tensor is indexed by token along axis 0 (input embeddings or output head)."""
    return tensor_kind(name) in ("embed", "lm_head")


def num_layers(config: Mapping[str, Any]) -> int:
    """The number of decoder layers in a Hugging Face config dict."""
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if key in config:
            return int(config[key])
    text = config.get("text_config")
    if isinstance(text, Mapping):
        return num_layers(text)
    raise KeyError("config has no num_hidden_layers / n_layer / num_layers")


def layer_t(name: str, n_layers: int) -> float:
    """mergekit's interpolation position: idx / (n_layers - 1) inside the layers, 0 outside."""
    idx = layer_index(name)
    if idx is None:
        return 0.0
    return idx / (n_layers - 1) if n_layers > 1 else 1.0
