"""The in-place engine gives exactly the tensors evomerge merge writes, into the same storage."""

import pytest
import torch
from conftest import load_dir
from transformers import AutoModelForCausalLM

from evomerge.merging.engine import MergeEngine
from evomerge.errors import ModelError, RecipeError
from evomerge.merging.to_disk import merge_to_disk
from evomerge.merging.recipe import Recipe, per_kind

WEIGHT = per_kind({"attention": [0.3, 0.9], "mlp": 0.6}, default=0.5)


def recipe(method, fam, seed=0, scale=1.0, **params):
    if method == "slerp":
        return Recipe.from_dict({"merge_method": "slerp", "base_model": fam["base"], "random_seed": seed,
                                 "models": [{"model": fam["base"]}, {"model": fam["experts"][0]}],
                                 "parameters": {"t": [0.2 * scale, 0.7]}})
    if method == "linear":
        return Recipe.from_dict({"merge_method": "linear", "models": [
            {"model": m, "parameters": {"weight": w * scale}} for m, w in zip(fam["experts"], (0.2, 0.5, 0.3))]})
    return Recipe.from_dict({
        "merge_method": method, "base_model": fam["base"], "random_seed": seed,
        "models": [{"model": e, "parameters": {"weight": [{"filter": c.filter, "value": c.value} for c in WEIGHT]
                                               if i == 0 else -0.2 * scale, **params}}
                   for i, e in enumerate(fam["experts"])]})


def live(path, **kw):
    return AutoModelForCausalLM.from_pretrained(path, **kw)


def assert_model_equals_dir(model, out_dir):
    ref = load_dir(out_dir)
    sd = model.state_dict()
    for k, v in ref.items():
        assert torch.equal(sd[k], v), f"{k}: {(sd[k] != v).sum().item()} elements differ"


METHODS = {
    "task_arithmetic": {}, "ties": {"density": 0.4}, "dare_ties": {"density": 0.4}, "dare_linear": {"density": 0.7},
    "breadcrumbs": {"density": 0.5, "gamma": 0.05}, "breadcrumbs_ties": {"density": 0.3},
    "della": {"density": 0.5, "epsilon": 0.1}, "della_linear": {"density": 0.6}, "linear": {}, "slerp": {},
}


def test_every_registered_method_has_a_test_entry():
    """Adding a method to the registry means adding its entry here, so every test below covers it."""
    from evomerge.merging.methods import METHODS as REGISTERED

    assert set(METHODS) == set(REGISTERED)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_apply_equals_merge_to_disk(method, families, tmp_path):
    fam = families("bf16_small")
    r1 = recipe(method, fam, seed=1, **METHODS[method])
    r2 = recipe(method, fam, seed=1, scale=0.5, **METHODS[method])
    engine = MergeEngine(r1)
    model = live(fam["base"])
    ptrs = {k: p.data_ptr() for k, p in model.named_parameters()}
    for r in (r1, r2, r1):  # a later recipe leaves nothing behind
        engine.apply(r, model)
        out = merge_to_disk(r, tmp_path / "out", overwrite=True)
        assert_model_equals_dir(model, out)
    assert ptrs == {k: p.data_ptr() for k, p in model.named_parameters()}


def test_placements_agree_and_disk_keeps_nothing(families):
    fam = families("bf16")
    r = recipe("ties", fam, density=0.3)
    in_memory = MergeEngine(r, cache="device")
    from_disk = MergeEngine(r, cache="disk")
    assert in_memory.placement == "device" and in_memory.cache_bytes > 0
    assert from_disk.placement == "disk" and from_disk.cache_bytes == 0
    a, b = dict(in_memory.merged(r)), dict(from_disk.merged(r))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="pinned"):
        MergeEngine(r, cache="pinned")


def test_auto_placement_is_logged(families, caplog):
    fam = families("fp32")
    with caplog.at_level("INFO", logger="evomerge.merging.engine"):
        engine = MergeEngine(recipe("dare_ties", fam, density=0.5))
    assert engine.placement == "device"
    assert "cache placement device" in caplog.text and "available RAM" in caplog.text


def test_new_seed_redraws(families, tmp_path):
    fam = families("fp32")
    engine = MergeEngine(recipe("dare_ties", fam, seed=1, density=0.5))
    model = live(fam["base"])
    for seed in (2, 1):
        r = recipe("dare_ties", fam, seed=seed, density=0.5)
        engine.apply(r, model)
        assert_model_equals_dir(model, merge_to_disk(r, tmp_path / f"s{seed}"))


def test_recipe_must_match_the_engine(families):
    fam = families("fp32")
    engine = MergeEngine(recipe("ties", fam, density=0.5))
    with pytest.raises(RecipeError, match="does not match the engine"):
        engine.apply(recipe("dare_ties", fam, density=0.5), live(fam["base"]))


def test_vocabulary_aligned_engine(families, tmp_path):
    fam = families("vocab")
    r = Recipe.from_dict({**recipe("ties", fam, density=0.5).to_dict(), "tokenizer_source": "base"})
    out = merge_to_disk(r, tmp_path / "first")
    model = live(out)
    r2 = Recipe.from_dict({**recipe("ties", fam, scale=0.3, density=0.7).to_dict(), "tokenizer_source": "base"})
    MergeEngine(r).apply(r2, model)
    assert_model_equals_dir(model, merge_to_disk(r2, tmp_path / "second"))


def test_tied_live_model_refuses_a_merge_with_its_own_lm_head(families, tmp_path):
    fam = families("untied")
    r = recipe("ties", fam, density=0.5)
    engine = MergeEngine(r)
    with pytest.raises(ModelError, match="tie_word_embeddings=False"):
        engine.apply(r, live(fam["base"]))
    model = live(fam["base"], tie_word_embeddings=False)
    engine.apply(r, model)
    assert_model_equals_dir(model, merge_to_disk(r, tmp_path / "out"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
@pytest.mark.parametrize("method", ["dare_ties", "della", "dare_linear", "della_linear"])
def test_random_methods_bit_identical_on_cpu_and_gpu(method, families):
    fam = families("bf16")
    r = recipe(method, fam, seed=5, **METHODS[method])
    cpu = dict(MergeEngine(r, device="cpu").merged(r))
    gpu = dict(MergeEngine(r, device="cuda").merged(r))
    for k in cpu:
        assert torch.equal(cpu[k], gpu[k].cpu()), k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
@pytest.mark.parametrize("cache", ["device", "pinned", "disk"])
def test_gpu_apply_equals_gpu_merge(cache, families, tmp_path):
    fam = families("bf16")
    r = recipe("ties", fam, density=0.4)
    model = live(fam["base"]).cuda()
    MergeEngine(r, device="cuda", cache=cache).apply(r, model)
    assert_model_equals_dir(model.cpu(), merge_to_disk(r, tmp_path / "out", device="cuda"))


def cached_tensors(obj, name="expert"):
    """(path, tensor, stays on the host) for every tensor an expert's state holds, at any depth;
    an object declares its host-side lookups in its ``host`` attribute."""
    for key, value in vars(obj).items():
        path = f"{name}.{key}"
        if isinstance(value, torch.Tensor):
            yield path, value, key in getattr(obj, "host", ())
        elif hasattr(value, "__dict__") and not isinstance(value, type):
            yield from cached_tensors(value, path)


TARGETS = [pytest.param("meta", False, id="meta"),  # stands in for the GPU here
           pytest.param("cuda", False, id="cuda", marks=pytest.mark.skipif(
               not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")),
           pytest.param("cpu", True, id="pinned", marks=pytest.mark.skipif(
               not torch.cuda.is_available(), reason="pinned memory needs a CUDA GPU (none on this machine)"))]


@pytest.mark.parametrize("target,pin", TARGETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_cached_tensor_moves_with_its_state(name, dtype, target, pin):
    """An expert's cached state moved to another home (the engine's pinned host cache, or the GPU
    per apply) takes every tensor its sparsifier's state holds along, but for the small lookups the
    state declares host-side; the original stays where it was."""
    from evomerge.merging.kernel.mix import prepare_expert
    from evomerge.merging.methods import METHODS as REGISTERED

    method = REGISTERED[name]
    delta = torch.randn(64, 48, generator=torch.Generator().manual_seed(0)).to(dtype)
    expert = prepare_expert(delta, method, seed=1, tensor_name="w", expert_index=0, reuse=True, cache_draws=True)
    before = list(cached_tensors(expert))
    moved = expert.to(target, pin=pin)
    after = list(cached_tensors(moved))
    assert [p for p, _, _ in after] == [p for p, _, _ in before]
    where = {p: (t.device.type, t.is_pinned() if t.device.type == "cpu" and pin else False) for p, t, _ in after}
    assert where == {p: ("cpu", False) if host else (target, pin) for p, _, host in after}
    assert all(t.device.type == "cpu" for _, t, _ in before)
    # what each sparsifier keeps, beyond the task vector, is there to be moved
    kept = {p.split(".")[-1] for p, _, _ in after}
    expected = {"ties": {"l1", "_order" if dtype == torch.float32 else "_sampled"}, "dare_ties": {"draws", "kept_l1"},
                "della": {"rank_norm"}, "breadcrumbs": {"l1"}}
    assert {"delta"} | expected.get(name, set()) <= kept
    assert moved.nbytes == expert.nbytes


def test_a_method_name_given_twice_is_refused():
    from evomerge.merging.methods import METHODS, _registry

    ties = METHODS["ties"]
    with pytest.raises(RecipeError, match="two methods are named 'ties'"):
        _registry([ties, METHODS["linear"], ties])
