"""Families other than Llama: one architecture description each, search spaces whose coordinates
all reach tensors, and exported recipes that mergekit reads the same way."""

from __future__ import annotations

import functools

import pytest
import torch
import yaml
from conftest import load_dir, mergekit_merge, noisy_family

from evomerge.config import RunConfig
from evomerge.errors import EvomergeError
from evomerge.merging.architecture import FAMILIES, family_of
from evomerge.merging.to_disk import merged_tensors
from evomerge.search.space import checked_space


def _model(kind: str):
    from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, MixtralConfig,
                              MixtralForCausalLM, Qwen3Config, Qwen3ForCausalLM)

    small = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=64, num_hidden_layers=2)
    return {
        "gpt2": lambda: GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=64,
                                                   bos_token_id=0, eos_token_id=0)),
        "gpt_neox": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(**small)),
        "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**small, num_key_value_heads=1, head_dim=16)),
        "mixtral": lambda: MixtralForCausalLM(MixtralConfig(**small, num_key_value_heads=1, num_local_experts=2)),
    }[kind]()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A base and two experts (base + noise) per family, saved as transformers saves them."""
    root = tmp_path_factory.mktemp("archs")

    @functools.cache
    def get(kind: str) -> dict:
        torch.manual_seed(0)
        return noisy_family(_model(kind), root / kind, scale=0.02, seed=0, tokenizer=False)

    return get


def _config(tmp_path, fam: dict, space="per_layer_per_module") -> RunConfig:
    return RunConfig.from_dict({"models": fam, "merge_method": "ties", "space": space,
                                "fitness": {"suite": "zoo"}, "budget": {"max_candidates": 1}},
                               source=tmp_path / "cfg.yaml")


@pytest.mark.parametrize("kind, family, lm_head", [("gpt2", "gpt2", False), ("gpt_neox", "gpt_neox", True),
                                                   ("qwen3", "llama", True), ("mixtral", "llama", True)])
def test_every_coordinate_reaches_tensors(tmp_path, tiny, kind, family, lm_head):
    space = checked_space(_config(tmp_path, tiny(kind)))
    assert space.family is FAMILIES[family]
    assert space.reach and min(space.reach) > 0, dict(zip(space.names, space.reach))
    # 2 experts x (weight, density) x ((attention, mlp) x 2 layers, embed, norm, and the LM head when untied)
    assert space.dimension == 2 * 2 * (2 * 2 + 2 + (1 if lm_head else 0))
    assert any(n.endswith(".lm_head") for n in space.names) == lm_head  # from the files, not the config
    assert "tensor(s)" in space.describe()


def test_per_layer_norms_belong_to_their_attention(tmp_path, tiny):
    fam = tiny("qwen3")
    assert family_of({"model_type": "qwen3"}).kind_of("model.layers.0.self_attn.q_norm.weight") == "attention"
    space = checked_space(_config(tmp_path, fam))
    reach = dict(zip(space.names, space.reach))
    assert reach["expert_0.weight.attention.L00"] == 6  # q, k, v, o and the q/k norms
    assert reach["expert_0.weight.norm"] == 5  # two per layer and the final norm


def test_an_inline_coordinate_that_reaches_nothing_is_an_error(tmp_path, tiny):
    # 9 knots over 2 layers: mergekit reads only the first and last value of a 9-value gradient
    with pytest.raises(EvomergeError, match=r"K1, .*change no tensor"):
        checked_space(_config(tmp_path, tiny("gpt2"), space={"granularity": "smooth", "knots": 9}))


@pytest.mark.parametrize("kind", ["gpt2", "qwen3"])  # mergekit 0.1.5 wants GPT-NeoX's old masked_bias buffers
def test_exported_recipes_reach_the_same_tensors_in_mergekit(tmp_path, tiny, kind):
    space = checked_space(_config(tmp_path, tiny(kind)))
    x = torch.linspace(0.1, 0.9, space.dimension).tolist()
    recipe = space.decode(x)
    ours = dict(merged_tensors(recipe))
    theirs = mergekit_merge(yaml.safe_load(recipe.to_yaml()), tmp_path / "mergekit")
    for name, t in ours.items():
        assert torch.allclose(t.float(), theirs[name].float(), atol=1e-6), name
    assert set(ours) <= set(theirs) | set(load_dir(tiny(kind)["base"]))


def test_non_floating_buffers_are_copied_through(tmp_path, families):
    """Older GPT-NeoX checkpoints carry a bool causal mask: it is copied, not merged, by the merge
    to disk (no dtype given) and left alone by the in-place engine; models that disagree on it are
    refused naming the tensor."""
    import shutil

    from safetensors.torch import load_file, save_file

    from evomerge.merging.engine import MergeEngine
    from evomerge.merging.recipe import Recipe
    from evomerge.merging.to_disk import merge_to_disk

    fam = families("fp32")
    mask = torch.tril(torch.ones(8, 8, dtype=torch.bool))
    models = {}
    for name in ["base", "e0", "e1"]:
        src = fam["base"] if name == "base" else fam["experts"][int(name[1])]
        shutil.copytree(src, tmp_path / name)
        f = tmp_path / name / "model.safetensors"
        save_file(load_file(f) | {"model.layers.0.self_attn.causal_mask": mask}, f)
        models[name] = str(tmp_path / name)
    raw = {"merge_method": "ties", "base_model": models["base"],
           "models": [{"model": models[e], "parameters": {"weight": 0.5, "density": 0.5}} for e in ("e0", "e1")]}
    out = merge_to_disk(Recipe.from_dict(raw), tmp_path / "out")
    merged = load_file(out / "model.safetensors")
    assert merged["model.layers.0.self_attn.causal_mask"].dtype == torch.bool
    assert torch.equal(merged["model.layers.0.self_attn.causal_mask"], mask)
    engine = MergeEngine(Recipe.from_dict(raw))
    assert "model.layers.0.self_attn.causal_mask" not in {ts.name for ts in engine.layout.tensors}
    f = tmp_path / "e1" / "model.safetensors"
    save_file(load_file(f) | {"model.layers.0.self_attn.causal_mask": ~mask}, f)
    with pytest.raises(EvomergeError, match="tensor model.layers.0.self_attn.causal_mask: a non-floating buffer"):
        merge_to_disk(Recipe.from_dict(raw), tmp_path / "out2")


def test_a_gpt2_base_stored_without_its_prefix(tmp_path, tiny):
    """mergekit accepts a GPT-2 checkpoint whose names lack ``transformer.``; so does evomerge, in the
    merge to disk and in the in-place engine."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from evomerge.merging.engine import MergeEngine
    from evomerge.merging.recipe import Recipe

    fam = tiny("gpt2")
    bare = tmp_path / "bare-base"
    shutil.copytree(fam["base"], bare)
    f = bare / "model.safetensors"
    save_file({k.removeprefix("transformer."): v for k, v in load_file(f).items()}, f, metadata={"format": "pt"})

    def recipe(base: str) -> Recipe:
        return Recipe.from_dict({"merge_method": "ties", "base_model": base, "models": [
            {"model": e, "parameters": {"weight": 0.6, "density": 0.5}} for e in fam["experts"]]})

    expected = dict(merged_tensors(recipe(fam["base"])))
    got = dict(merged_tensors(recipe(str(bare))))
    assert {"transformer." + k for k in got} == set(expected)
    assert all(torch.equal(v, expected["transformer." + k]) for k, v in got.items())
    live = AutoModelForCausalLM.from_pretrained(str(bare))
    MergeEngine(recipe(str(bare))).apply(recipe(str(bare)), live)
    params = dict(live.named_parameters())
    assert all(torch.equal(params[k], v) for k, v in expected.items() if k in params)


# -- MoE and renamed checkpoints, through transformers' conversions ----------------------------------


def _moe(kind: str):
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    small = dict(hidden_size=32, num_attention_heads=2, num_key_value_heads=1, vocab_size=64, num_hidden_layers=2,
                 bos_token_id=1, eos_token_id=2, pad_token_id=3)
    if kind == "mixtral":
        return MixtralForCausalLM(MixtralConfig(**small, intermediate_size=48, num_local_experts=3))
    if kind == "qwen3_moe":
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        return Qwen3MoeForCausalLM(Qwen3MoeConfig(**small, head_dim=16, moe_intermediate_size=24, num_experts=3,
                                                  num_experts_per_tok=2, decoder_sparse_step=1))
    return Qwen2MoeForCausalLM(Qwen2MoeConfig(**small, moe_intermediate_size=24, shared_expert_intermediate_size=48,
                                              num_experts=3, num_experts_per_tok=2, decoder_sparse_step=1))


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """Tiny MoE (and GPT-NeoX) families with a tokenizer, so that they can also be searched."""
    root = tmp_path_factory.mktemp("moe")

    @functools.cache
    def get(kind: str) -> dict:
        torch.manual_seed(1)
        return noisy_family(_model(kind) if kind == "gpt_neox" else _moe(kind), root / kind, scale=0.05, seed=1)

    return get


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "qwen3_moe"])
@pytest.mark.parametrize("method", ["ties", "dare_ties", "slerp"])
def test_moe_merges_are_mergekits(tmp_path, moe, kind, method):
    """mergekit 0.1.5 merges the fused 3-D expert tensors transformers builds as wholes; so does
    evomerge, and both write them under the fused names."""
    from evomerge.merging.recipe import Recipe

    fam = moe(kind)
    if method == "slerp":
        raw = {"merge_method": "slerp", "base_model": fam["experts"][0], "parameters": {"t": 0.3},
               "models": [{"model": fam["experts"][0]}, {"model": fam["experts"][1]}]}
    else:
        raw = {"merge_method": method, "base_model": fam["base"], "random_seed": 3, "models": [
            {"model": e, "parameters": {"weight": 0.6, "density": 0.5}} for e in fam["experts"]]}
    ours = dict(merged_tensors(Recipe.from_dict(raw)))
    theirs = mergekit_merge(raw, tmp_path / "mergekit")
    assert any(n.endswith("mlp.experts.gate_up_proj") for n in ours)
    assert set(ours) == set(theirs)
    assert all(ours[n].shape == theirs[n].shape for n in ours)
    if method != "dare_ties":  # DARE's draws are seeded, mergekit's come from its global RNG (README)
        for name in ours:
            assert torch.allclose(ours[name], theirs[name], atol=1e-6), name


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "gpt_neox"])
def test_moe_and_renamed_checkpoints_search_resume_and_export(tmp_path, moe, kind):
    from evomerge.run.report import export
    from evomerge.run.loop import run_search
    from evomerge.run.rundir import create_run, open_run

    fam = moe(kind)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"models": fam, "merge_method": "ties", "space": "per_layer_per_module",
                                   "fitness": {"suite": "zoo-smooth"}, "references": False,
                                   "driver": {"name": "cma", "popsize": 4}, "budget": {"max_candidates": 3}}))
    run = create_run(cfg, tmp_path / "run")
    assert min(run.space.reach) > 0  # every coordinate reaches tensors, fused experts included
    run_search(run, live=False)
    run_search(open_run(tmp_path / "run"), resume=True, max_candidates=5, live=False)
    rows = open_run(tmp_path / "run").db.rows()
    assert len(rows) == 5 and all(r.state == "complete" for r in rows), [r.error for r in rows]
    report = export(open_run(tmp_path / "run"), tmp_path / "best", heldout=False)
    assert report["fitness_recomputed_from_export"] == pytest.approx(report["fitness_recorded"], abs=1e-6)
    if kind == "gpt_neox":
        return  # mergekit 0.1.5 requires GPT-NeoX's old masked_bias buffers, which transformers 5 does not save
    ours = load_dir(tmp_path / "best" / "model")
    theirs = mergekit_merge(yaml.safe_load((tmp_path / "best" / "recipe.yaml").read_text()), tmp_path / "mk")
    assert set(ours) == set(theirs)
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in ours)


def test_slices_rewrite_every_layer_count_key(tmp_path, tiny):
    import json

    from evomerge.merging.recipe import Recipe
    from evomerge.merging.to_disk import merge_to_disk

    fam = tiny("gpt2")
    recipe = Recipe.from_dict({"merge_method": "linear", "slices": [
        {"sources": [{"model": fam["experts"][0], "layer_range": [0, 1], "parameters": {"weight": 1.0}}]},
        {"sources": [{"model": fam["experts"][0], "layer_range": [0, 2], "parameters": {"weight": 1.0}}]}]})
    out = merge_to_disk(recipe, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["n_layer"] == 3 and "num_hidden_layers" not in config


def test_the_vllm_backend_refuses_a_mixture_of_experts_on_cpu(tmp_path, moe, vllm_available):
    """vLLM 0.32's CPU build does not rebuild its packed expert layout on an in-place reload."""
    from evomerge.fitness.suite import SuiteError
    from evomerge.run.rundir import create_run

    if torch.cuda.is_available():
        pytest.skip("the refusal is for vLLM's CPU build")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"models": moe("mixtral"), "merge_method": "ties", "space": "global",
                                   "fitness": {"suite": "zoo", "backend": "vllm"}, "budget": {"max_candidates": 1}}))
    with pytest.raises(SuiteError, match="fitness.backend vllm: .* is a mixture of experts"):
        create_run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_fused_experts_split_back_into_the_stored_tensors(moe, kind):
    """What loaders that take checkpoint names (vLLM's) receive from a merge: exactly the stored tensors."""
    from evomerge.merging.model_io import ModelFiles

    files = ModelFiles(moe(kind)["experts"][0])
    fused = [n for n in files.names() if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert fused
    back = dict(x for n in files.names() for x in files.as_stored(n, files.get(n)))
    assert back.keys() == set(files.weight_map)
    assert all(torch.equal(t, files._stored(n)) for n, t in back.items())
