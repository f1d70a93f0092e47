"""A matrix of model families built from transformers configs (tiny, random; a base and two experts
each, built once per test run): no dead search coordinate, every merge method against mergekit
0.1.5 on the parameters transformers loads, and a short search with export."""

from __future__ import annotations

import functools
import re

import pytest
import torch
import yaml
from conftest import mergekit_merge, noisy_family

from evomerge.config import RunConfig
from evomerge.merging.recipe import Recipe
from evomerge.merging.to_disk import merge_to_disk
from evomerge.search.space import checked_space

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
             vocab_size=64, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=3)
GEMMA3 = dict(text_config=dict(SMALL, head_dim=16), mm_tokens_per_image=4,
              vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                 image_size=28, patch_size=14, vision_use_head=False))
MOE = dict(SMALL, moe_intermediate_size=24, num_experts=3, num_experts_per_tok=2, decoder_sparse_step=1)

FAMILIES = {  # name: (model_type, config overrides, dtype)
    "llama": ("llama", SMALL, torch.float32),
    "llama-bf16": ("llama", SMALL, torch.bfloat16),
    "mistral": ("mistral", SMALL, torch.float32),
    "qwen2-untied": ("qwen2", dict(SMALL, vocab_size=260, tie_word_embeddings=False), torch.float32),
    "qwen2-tied": ("qwen2", dict(SMALL, vocab_size=260, tie_word_embeddings=True), torch.float32),
    "qwen3": ("qwen3", dict(SMALL, head_dim=16), torch.float32),
    "gemma2": ("gemma2", dict(SMALL, head_dim=16), torch.float32),
    "gemma3-text": ("gemma3_text", dict(SMALL, head_dim=16), torch.float32),
    "gemma3-multimodal": ("gemma3", GEMMA3, torch.float32),
    "phi3": ("phi3", SMALL, torch.float32),
    "olmo2": ("olmo2", SMALL, torch.float32),
    "stablelm": ("stablelm", SMALL, torch.float32),
    "starcoder2": ("starcoder2", SMALL, torch.float32),
    "gpt2": ("gpt2", dict(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=64, bos_token_id=1,
                          eos_token_id=2), torch.float32),
    "falcon": ("falcon", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=64,
                              new_decoder_architecture=True, num_kv_heads=1, tie_word_embeddings=False,
                              bos_token_id=1, eos_token_id=2), torch.float32),
    "bloom": ("bloom", dict(hidden_size=32, n_layer=2, n_head=2, vocab_size=64, bos_token_id=1, eos_token_id=2,
                            pad_token_id=3), torch.float32),
    "opt": ("opt", dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=64,
                        max_position_embeddings=64, word_embed_proj_dim=32, bos_token_id=1, eos_token_id=2,
                        pad_token_id=3), torch.float32),
    "gpt-neox": ("gpt_neox", {k: v for k, v in SMALL.items() if k != "num_key_value_heads"}, torch.float32),
    "mixtral": ("mixtral", dict(SMALL, num_local_experts=3), torch.float32),
    "mixtral-bf16": ("mixtral", dict(SMALL, num_local_experts=3), torch.bfloat16),
    "qwen2-moe": ("qwen2_moe", dict(MOE, shared_expert_intermediate_size=48), torch.float32),
    "qwen3-moe": ("qwen3_moe", dict(MOE, head_dim=16), torch.float32),
}

# (recipe parameters, whether the result is deterministic: seeded methods draw differently from mergekit)
METHODS = {
    "linear": ({"weight": 0.5}, True),
    "task_arithmetic": ({"weight": 0.6}, True),
    "ties": ({"weight": 0.6, "density": 0.4}, True),
    "breadcrumbs_ties": ({"weight": 0.6, "density": 0.6, "gamma": 0.05}, True),
    "slerp": ({}, True),
    "dare_ties": ({"weight": 0.6, "density": 0.5}, False),
    "della": ({"weight": 0.6, "density": 0.5, "epsilon": 0.1}, False),
}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    root = tmp_path_factory.mktemp("families-matrix")

    @functools.cache
    def get(name: str) -> dict:
        model_type, overrides, dtype = FAMILIES[name]
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(CONFIG_MAPPING[model_type](**overrides)).to(dtype)
        paths = noisy_family(model, root / name, scale=0.05, seed=0, tokenizer=model_type != "qwen2")
        if model_type == "qwen2":  # transformers 5 loads any tokenizer of a qwen2 model as Qwen2's (byte-level)
            for path in [paths["base"], *paths["experts"]]:
                _byte_level_tokenizer().save_pretrained(path)
        if model_type == "gemma3":
            for path in [paths["base"], *paths["experts"]]:
                _hub_names(path)
        return paths

    return get


def _byte_level_tokenizer():
    """A byte-level tokenizer with no merges (257 tokens): what Qwen2's tokenizer class reads back."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def _hub_names(path: str) -> None:
    """Rename a Gemma 3 checkpoint's vision tower as the published checkpoints have it
    (transformers 5 saves ``vision_tower.*``, the hub and mergekit have ``vision_tower.vision_model.*``;
    transformers loads both)."""
    from safetensors.torch import load_file, save_file

    file = f"{path}/model.safetensors"
    tensors = {re.sub(r"^vision_tower\.", "vision_tower.vision_model.", k): v for k, v in load_file(file).items()}
    save_file(tensors, file, metadata={"format": "pt"})


def _recipe(method: str, fam: dict) -> dict:
    params, _ = METHODS[method]
    if method == "slerp":
        return {"merge_method": "slerp", "base_model": fam["base"], "parameters": {"t": [0.2, 0.7]},
                "models": [{"model": fam["base"]}, {"model": fam["experts"][0]}]}
    if method == "linear":
        return {"merge_method": "linear", "models": [{"model": m, "parameters": params} for m in fam["experts"]]}
    return {"merge_method": method, "base_model": fam["base"], "random_seed": 1,
            "models": [{"model": m, "parameters": params} for m in fam["experts"]]}


def _loaded(path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return {k: v.detach() for k, v in AutoModelForCausalLM.from_pretrained(str(path)).state_dict().items()}


@pytest.mark.parametrize("name", FAMILIES)
def test_no_dead_coordinate(tmp_path, family, name):
    cfg = RunConfig.from_dict({"models": family(name), "merge_method": "ties", "space": "per_layer_per_module",
                               "fitness": {"suite": "zoo"}, "budget": {"max_candidates": 1}},
                              source=tmp_path / "cfg.yaml")
    space = checked_space(cfg)
    assert min(space.reach) > 0, [n for n, r in zip(space.names, space.reach) if r == 0]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", [n for n in FAMILIES if n != "gpt-neox"])  # see test_architectures: masked_bias
def test_methods_match_mergekit_on_loaded_parameters(tmp_path, family, name, method):
    raw = _recipe(method, family(name))
    ours = _loaded(merge_to_disk(Recipe.from_dict(raw), tmp_path / "ours"))
    mergekit_merge(raw, tmp_path / "mergekit")
    theirs = _loaded(tmp_path / "mergekit")
    assert set(ours) == set(theirs)
    for k in ours:
        assert ours[k].shape == theirs[k].shape and ours[k].dtype == theirs[k].dtype, k
    if not METHODS[method][1]:
        return  # seeded draws: the same tensors, shapes and dtypes; values differ from mergekit's global RNG
    if FAMILIES[name][2] == torch.float32:
        for k in ours:
            assert torch.allclose(ours[k], theirs[k], atol=1e-6, rtol=0), k
    else:  # bf16 task vectors tie in magnitude at the trimming threshold, where mergekit's unstable sort
        # keeps an arbitrary subset (README, numerics): a few elements differ, all others are equal
        differ = sum(int((ours[k] != theirs[k]).sum()) for k in ours)
        assert differ <= 0.02 * sum(t.numel() for t in ours.values()), differ


@pytest.mark.parametrize("name", [n for n in FAMILIES if FAMILIES[n][2] == torch.float32 and n != "gpt-neox"])
def test_searched_recipes_reach_the_same_tensors_in_mergekit(tmp_path, family, name):
    """A per-layer, per-kind recipe as the search writes it (every coordinate a different value)."""
    cfg = RunConfig.from_dict({"models": family(name), "merge_method": "ties", "space": "per_layer_per_module",
                               "fitness": {"suite": "zoo"}, "budget": {"max_candidates": 1}},
                              source=tmp_path / "cfg.yaml")
    space = checked_space(cfg)
    raw = yaml.safe_load(space.decode(torch.linspace(0.1, 0.9, space.dimension).tolist()).to_yaml())
    ours = _loaded(merge_to_disk(Recipe.from_dict(raw), tmp_path / "ours"))
    mergekit_merge(raw, tmp_path / "mergekit")
    theirs = _loaded(tmp_path / "mergekit")
    assert set(ours) == set(theirs)
    for k in ours:
        assert torch.allclose(ours[k], theirs[k], atol=1e-6, rtol=0), k


@pytest.mark.parametrize("name", FAMILIES)
def test_short_search_and_export(tmp_path, family, name):
    from evomerge.run.report import export
    from evomerge.run.loop import run_search
    from evomerge.run.rundir import create_run

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"models": family(name), "merge_method": "ties", "space": "per_layer",
                                   "fitness": {"suite": "zoo-smooth"}, "references": False,
                                   "driver": {"name": "cma", "popsize": 2}, "budget": {"max_candidates": 2}}))
    run = create_run(cfg, tmp_path / "run")
    run_search(run, live=False)
    assert all(r.state == "complete" for r in run.db.rows()), [r.error for r in run.db.rows()]
    report = export(run, tmp_path / "best", heldout=False)
    assert report["fitness_recomputed_from_export"] == pytest.approx(report["fitness_recorded"], abs=1e-4)


def test_slices_are_refused_on_a_model_with_two_layer_stacks(tmp_path, family):
    from evomerge.errors import ModelError

    fam = family("gemma3-multimodal")
    raw = {"merge_method": "linear", "slices": [{"sources": [{"model": fam["base"], "layer_range": [0, 2],
                                                                 "parameters": {"weight": 1.0}}]}]}
    with pytest.raises(ModelError, match=r"slices: .* has 2 layer stacks \(language_model.model.layers., "
                                         r"vision_tower.vision_model.encoder.layers.\)"):
        merge_to_disk(Recipe.from_dict(raw), tmp_path / "out")
    assert not (tmp_path / "out").exists()


LAYER_STACKS = ("gpt2", "gpt_neox", "bloom", "falcon", "opt")  # no model.layers: a layer path is refused


@pytest.mark.parametrize("name", FAMILIES)
def test_layer_paths_restack_llama_like_families(tmp_path, family, name):
    """A layer path over each family: wired in place, written to disk and built by mergekit, the
    same model (scales where the family's sublayers end in one linear map; refused where the
    decoder layers cannot be re-stacked)."""
    from evomerge.errors import EvomergeError
    from evomerge.merging.layer_path import _UNSCALED, LayerPath, Step, scale_filters
    from evomerge.merging.layer_stack import PathModel, materialize
    from evomerge.merging.headers import read_config
    from evomerge.merging.model_io import load_causal_lm

    model_type, _, dtype = FAMILIES[name]
    paths = family(name)
    base, (e0, e1) = paths["base"], paths["experts"]
    config = read_config(__import__("pathlib").Path(base), base)
    scaled = model_type not in _UNSCALED
    a, b = (0.7, 1.2) if scaled else (1.0, 1.0)
    pm = PathModel(load_causal_lm)
    try:
        if model_type in LAYER_STACKS or name == "gemma3-multimodal":
            path = LayerPath((Step(e0, 0), Step(base, 1)))
            with pytest.raises(EvomergeError, match="cannot be re-stacked"):
                pm.apply(path)
            with pytest.raises(EvomergeError, match="cannot be re-stacked|no tensor"):
                materialize(path, tmp_path / "stack")
            return
        path = LayerPath((Step(e0, 0), Step(base, 1, a), Step(e1, 1), Step(e0, 1, b)), scale_filters(config, scaled))
        ids = torch.tensor([[5, 9, 14, 3, 22, 7, 31, 2]])
        with torch.no_grad():
            live = pm.apply(path)(ids).logits.float()
            written = load_causal_lm(str(materialize(path, tmp_path / "stack")))
            assert written.config.num_hidden_layers == 4
            disk = written(ids).logits.float()
        tol = 1e-5 if dtype == torch.float32 else 2e-2 * float(live.abs().max())
        torch.testing.assert_close(disk, live, atol=tol, rtol=0)
    finally:
        pm.close()
    # mergekit 0.1.5 keeps the parents' layer_types in a deeper stack's config, which transformers 5 refuses
    if dtype == torch.float32 and "layer_types" not in config and model_type not in ("mixtral", "qwen2_moe", "qwen3_moe"):
        from conftest import load_dir

        ours, theirs = load_dir(tmp_path / "stack"), mergekit_merge(path.to_dict(), tmp_path / "mergekit")
        assert set(ours) == set(theirs)
        for k, t in ours.items():
            torch.testing.assert_close(theirs[k], t, atol=0, rtol=0, msg=k)
