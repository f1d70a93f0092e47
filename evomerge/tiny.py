"""Small, real Hugging Face model families built locally (no download): a base Llama and experts
that are the base plus task-vector-like perturbations. Used by the tests, the benchmark and the
demo until the trained model zoo arrives."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


def build_tokenizer(vocab_size: int, extra_tokens: int = 0):
    """A word-level tokenizer over ``vocab_size`` tokens (4 specials + ``w0``, ``w1``, ...), plus
    ``extra_tokens`` added tokens (``x0``, ...) for a larger vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIALS + [f"w{i}" for i in range(vocab_size - len(SPECIALS))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")
    if extra_tokens:
        fast.add_tokens([f"x{i}" for i in range(extra_tokens)])
    return fast


@dataclass
class TinySpec:
    vocab_size: int = 128
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2  # grouped-query attention
    tie_word_embeddings: bool = False
    dtype: torch.dtype = torch.float32


def llama_config(spec: TinySpec, vocab_size: Optional[int] = None):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size or spec.vocab_size, hidden_size=spec.hidden_size,
                       intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_hidden_layers,
                       num_attention_heads=spec.num_attention_heads, num_key_value_heads=spec.num_key_value_heads,
                       max_position_embeddings=256, tie_word_embeddings=spec.tie_word_embeddings,
                       bos_token_id=1, eos_token_id=2, pad_token_id=3)


def save_model(model, tokenizer, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_family(root: str | Path, spec: TinySpec = TinySpec(), n_experts: int = 3, seed: int = 0,
                 scale: float = 0.02, extra_vocab_expert: bool = False, untied_expert: bool = False) -> dict:
    """Write ``root/base`` and ``root/expert_i``; returns their paths.

    Experts are the base plus dense Gaussian perturbations of relative size ``scale`` with
    expert-specific sparse spikes, so trimming and sign election have something to do.
    ``extra_vocab_expert``: the last expert has 8 more tokens than the base.
    ``untied_expert``: the last expert has its own lm_head while the base ties it."""
    from transformers import LlamaForCausalLM

    root = Path(root)
    torch.manual_seed(seed)
    base = LlamaForCausalLM(llama_config(spec)).to(spec.dtype)
    tok = build_tokenizer(spec.vocab_size)
    paths = {"base": str(save_model(base, tok, root / "base")), "experts": []}
    base_sd = {k: v.float() for k, v in base.state_dict().items()}
    for i in range(n_experts):
        g = torch.Generator().manual_seed(seed * 1000 + i + 1)
        last = i == n_experts - 1
        extra = 8 if (extra_vocab_expert and last) else 0
        tie = spec.tie_word_embeddings and not (untied_expert and last)
        cfg = llama_config(spec, spec.vocab_size + extra)
        cfg.tie_word_embeddings = tie
        model = LlamaForCausalLM(cfg).to(spec.dtype)
        sd = {}
        for name, w in base_sd.items():
            noise = torch.randn(w.shape, generator=g) * scale * (w.std() if w.numel() > 1 and w.std() > 0 else 1.0)
            spikes = (torch.rand(w.shape, generator=g) < 0.01) * torch.randn(w.shape, generator=g) * 5 * scale
            sd[name] = w + noise + spikes * (w.abs().mean() + 1e-3)
        if extra:
            for name in ("model.embed_tokens.weight", "lm_head.weight"):
                if name in sd:
                    sd[name] = torch.cat([sd[name], torch.randn(extra, spec.hidden_size, generator=g) * 0.02])
        if not tie and "lm_head.weight" not in sd:
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"] + 0.01 * torch.randn(
                sd["model.embed_tokens.weight"].shape, generator=g)
        missing, unexpected = model.load_state_dict({k: v.to(spec.dtype) for k, v in sd.items()}, strict=False)
        if unexpected or [m for m in missing if m != "lm_head.weight"]:
            raise RuntimeError(f"tiny expert state mismatch: {missing} {unexpected}")
        etok = build_tokenizer(spec.vocab_size, extra)
        paths["experts"].append(str(save_model(model, etok, root / f"expert_{i}")))
    (root / "family.json").write_text(json.dumps(paths, indent=2))
    return paths
