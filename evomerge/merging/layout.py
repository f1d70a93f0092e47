"""The layout of a merge: which input tensors make each output tensor, at which depth, and how
vocabularies line up. A layout depends on the models and the recipe's structure (models or
slices, tokenizer source), never on parameter values, so the engine builds it once for a search.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

import torch

from evomerge.merging.architecture import family_of, is_vocab_tensor, layer_counts, layer_index, layer_t
from evomerge.errors import ModelError, RecipeError
from evomerge.merging.model_io import ModelFiles
from evomerge.merging.recipe import Recipe


@dataclass(frozen=True)
class TensorSource:
    name: str  # output tensor name
    inputs: tuple[str, ...]  # input tensor name, per model (in Layout.models order)
    t: float  # position across depth, for gradients (mergekit's convention)
    slice_index: int
    vocab: bool  # rows are tokens and vocabularies are aligned


@dataclass
class Layout:
    models: list[str]  # base first (when there is one), then experts
    base: Optional[str]
    experts: list[str]
    tensors: list[TensorSource]
    output_num_layers: Optional[int] = None
    vocab_perms: Optional[torch.Tensor] = None  # (n_models, out_vocab) row of each token, -1 if absent
    lm_head_added: bool = False  # base ties embeddings, but an expert has its own lm_head
    copied: list[TensorSource] = field(default_factory=list)  # non-floating buffers, copied from the reference


_LAYER_SUB = re.compile(r"((?:^|\.)(?:layers|h|blocks|block|layer)\.)(\d+)(\.)")


def _with_layer(name: str, idx: int) -> str:
    return _LAYER_SUB.sub(lambda m: f"{m.group(1)}{idx}{m.group(3)}", name, count=1)


def _depth_order(name: str) -> tuple:
    """Embeddings first, then the layers in numeric order, then everything else."""
    idx = layer_index(name)
    if idx is not None:
        return (1, idx, name)
    return (0 if is_vocab_tensor(name) and "lm_head" not in name else 2, 0, name)


def _embed_name(names: list[str]) -> Optional[str]:
    for n in names:
        if is_vocab_tensor(n) and "lm_head" not in n:
            return n
    return None


ALIGN_HINT = "set tokenizer_source (e.g. 'base') to align vocabularies"
SEARCH_HINT = ("a search needs models of one vocabulary: merge each expert onto one first (a recipe with "
               "tokenizer_source, 'evomerge merge')")


def build_layout(recipe: Recipe, files: dict[str, ModelFiles], trust_remote_code: bool = False,
                 vocab_hint: str = ALIGN_HINT) -> Layout:
    """Plan every output tensor and check the models are compatible; every mismatch is reported
    in one error."""
    models = recipe.model_names()
    experts = recipe.expert_names()
    base = recipe.base_model if recipe.method.needs_base else None
    ref = base or models[0]
    ref_files = files[ref]
    problems: list[str] = []

    archs = {m: tuple(files[m].config.get("architectures") or [files[m].config.get("model_type", "?")])
             for m in models}
    if len(set(archs.values())) > 1:
        problems.append("architectures differ: " + ", ".join(f"{m}: {'/'.join(a)}" for m, a in archs.items()))

    # lm_head of tied models: taken from their embeddings when another model has its own
    lm_heads = {m: "lm_head.weight" in files[m] for m in models}
    lm_head_added = any(lm_heads.values()) and not lm_heads[ref]

    ref_names = ref_files.names()
    if lm_head_added:
        ref_names = ref_names + ["lm_head.weight"]
    ref_names = sorted(ref_names, key=_depth_order)

    family = family_of(ref_files.config)

    def source_name(model: str, name: str) -> str:
        if name == "lm_head.weight" and not lm_heads[model]:
            emb = _embed_name(files[model].names())
            return emb or name
        if name not in files[model]:  # stored under the family's other spelling (GPT-2 without transformer.)
            return next((alias for alias in family.aliases(name) if alias in files[model]), name)
        return name

    vocab = recipe.tokenizer_source is not None
    tensors: list[TensorSource] = []
    n_out_layers = None
    counts = layer_counts(ref_names)
    if recipe.slices is not None and len(counts) > 1:
        raise ModelError(f"slices: {ref} has {len(counts)} layer stacks ({', '.join(sorted(counts))}); "
                         "slices work on models with one")
    if recipe.slices is None:
        for name in ref_names:
            t = layer_t(name, counts)
            tensors.append(TensorSource(name, tuple(source_name(m, name) for m in models), t, 0,
                                        vocab and is_vocab_tensor(name)))
    else:
        layer_templates: dict[int, list[str]] = {}
        others = []
        for name in ref_names:
            idx = layer_index(name)
            if idx is None:
                others.append(name)
            else:
                layer_templates.setdefault(idx, []).append(name)
        pre = [n for n in others if is_vocab_tensor(n) and "lm_head" not in n]
        post = [n for n in others if n not in pre]
        n_slices = len(recipe.slices)
        for n in pre:
            tensors.append(TensorSource(n, tuple(source_name(m, n) for m in models), 0.0, 0,
                                        vocab and is_vocab_tensor(n)))
        out_idx = 0
        available = sorted(layer_templates)
        for si, sl in enumerate(recipe.slices):
            lo, hi = sl.sources[0].layer_range
            if hi > len(available):
                problems.append(f"slices[{si}].layer_range: [{lo}, {hi}] exceeds the {len(available)} layers of {ref}")
                continue
            count = hi - lo
            for off in range(count):
                t = off / (count - 1) if count > 1 else 1.0
                for tmpl in layer_templates[lo + off]:
                    tensors.append(TensorSource(_with_layer(tmpl, out_idx),
                                                tuple(source_name(m, tmpl) for m in models), t, si, False))
                out_idx += 1
        for n in post:
            tensors.append(TensorSource(n, tuple(source_name(m, n) for m in models), 0.0, n_slices - 1,
                                        vocab and is_vocab_tensor(n)))
        n_out_layers = out_idx

    # names and shapes
    for ts in tensors:
        missing = [(m, name) for m, name in zip(models, ts.inputs) if name not in files[m]]
        problems += [f"tensor {name}: missing in {m}" for m, name in missing]
        if missing:
            continue
        shapes = {m: files[m].meta(name)[0] for m, name in zip(models, ts.inputs)}
        ref_shape = shapes[ref]
        for m, shape in shapes.items():
            if shape == ref_shape:
                continue
            if is_vocab_tensor(ts.name) and shape[1:] == ref_shape[1:]:
                if not vocab:
                    problems.append(f"tensor {ts.name}: {m} has {shape[0]} rows (vocabulary) but {ref} has "
                                    f"{ref_shape[0]}; {vocab_hint}")
            else:
                problems.append(f"tensor {ts.name}: shape {list(shape)} in {m} but {list(ref_shape)} in {ref}")
    extra = {m: sorted(set(files[m].names()) - {ts.inputs[i] for ts in tensors}) for i, m in enumerate(models)}
    for m, names in extra.items():
        if names and recipe.slices is None:
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            problems.append(f"{m} has tensors that {ref} lacks: {shown}")
    if problems:
        raise ModelError("models are not compatible:\n  " + "\n  ".join(problems))

    # non-floating buffers (masks, counters) are not merged: copied through, as mergekit does
    ref_at = models.index(ref)
    copied = [ts for ts in tensors if not files[ref].meta(ts.inputs[ref_at])[1].is_floating_point]
    tensors = [ts for ts in tensors if ts not in copied]
    layout = Layout(models=models, base=base, experts=experts, tensors=tensors,
                    output_num_layers=n_out_layers, lm_head_added=lm_head_added, copied=copied)
    if vocab:
        layout.vocab_perms = _vocab_permutations(recipe, files, models, trust_remote_code)
    return layout


def _vocab_permutations(recipe: Recipe, files: dict[str, ModelFiles], models: list[str],
                        trust_remote_code: bool) -> torch.Tensor:
    src = recipe.tokenizer_source
    src_model = recipe.base_model if src == "base" else src
    if src_model not in files:
        raise RecipeError(f"tokenizer_source: {src!r} is neither 'base' nor one of the recipe's models")
    out_vocab = files[src_model].vocabulary(trust_remote_code)
    ids = sorted(out_vocab.values())
    if ids != list(range(len(ids))):
        raise ModelError(f"model {src_model}: token ids of its tokenizer are not contiguous; cannot align vocabularies")
    by_id = sorted(out_vocab, key=out_vocab.__getitem__)
    perms = torch.full((len(models), len(by_id)), -1, dtype=torch.int64)
    for i, m in enumerate(models):
        v = out_vocab if m == src_model else files[m].vocabulary(trust_remote_code)
        perms[i] = torch.tensor([v.get(tok, -1) for tok in by_id], dtype=torch.int64)
    return perms


def align_vocab(tensors: list[torch.Tensor], perms: torch.Tensor, base_index: Optional[int]) -> list[torch.Tensor]:
    """Reorder each model's token rows into the output vocabulary. A token a model lacks takes
    mergekit's default: the only model that has it, else the base's row, else the mean of the
    models that have it, else zeros."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    device = tensors[0].device
    perms = perms.to(device)
    present = perms >= 0
    rows = [t.to(dtype)[p.clamp(min=0)] for t, p in zip(tensors, perms)]
    count = present.sum(0)
    incomplete = count < len(tensors)
    if not bool(incomplete.any()):
        return rows
    shape = rows[0].shape[1:]
    default = torch.zeros((int(incomplete.sum()), *shape), dtype=dtype, device=device)
    miss = present[:, incomplete]
    cnt = count[incomplete]
    # one donor
    for i, r in enumerate(rows):
        one = (cnt == 1) & miss[i]
        default[one] = r[incomplete][one]
    settled = cnt <= 1
    if base_index is not None:
        from_base = ~settled & miss[base_index]
        default[from_base] = rows[base_index][incomplete][from_base]
        settled = settled | from_base
    avg = ~settled
    if bool(avg.any()):
        acc = torch.zeros((int(avg.sum()), *shape), dtype=dtype, device=device)
        for i, r in enumerate(rows):
            has = miss[i][avg]
            acc[has] = acc[has] + r[incomplete][avg][has]
        acc /= cnt[avg].to(dtype).reshape(-1, *([1] * len(shape)))
        default[avg] = acc
    out = []
    for i, r in enumerate(rows):
        r = r.clone()
        sub = r[incomplete]
        lacking = ~miss[i]
        sub[lacking] = default[lacking]
        r[incomplete] = sub
        out.append(r)
    return out
