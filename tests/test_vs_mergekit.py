"""evomerge merge against mergekit 0.1.5, the tool users already run: same recipe, same tensors."""

import pytest
import torch
from conftest import load_dir, mergekit_merge

from evomerge.merging.to_disk import merge_to_disk
from evomerge.merging.recipe import Recipe
from evomerge.merging.architecture import layer_index
from evomerge.merging.kernel.sparsify import MagnitudeOrder

W = [0.5, -0.3, 0.8]  # a negative weight: task negation


def gta(method, fam, params=None, glob=None, **extra):
    models = [{"model": e, "parameters": dict(weight=w, **(params or {}))} for e, w in zip(fam["experts"], W)]
    r = {"merge_method": method, "base_model": fam["base"], "models": models, **extra}
    if glob:
        r["parameters"] = glob
    return r


def both(recipe: dict, tmp_path):
    ref = mergekit_merge(recipe, tmp_path / "mergekit")
    ours = load_dir(merge_to_disk(Recipe.from_dict(recipe), tmp_path / "evomerge"))
    assert set(ref) == set(ours)
    for k in ref:
        assert ours[k].dtype == ref[k].dtype, k
        assert ours[k].shape == ref[k].shape, k
    return ref, ours


def assert_identical(ref, ours):
    for k in ref:
        assert torch.equal(ref[k], ours[k]), f"{k}: {(ref[k] != ours[k]).sum().item()} elements differ"


PER_KIND_WEIGHT = [{"filter": "self_attn", "value": [0.2, 0.9]}, {"filter": "mlp", "value": 0.7}, {"value": 0.4}]

DETERMINISTIC = {
    "task_arithmetic": lambda f: gta("task_arithmetic", f, glob={"lambda": 0.7}),
    "task_arithmetic_normalized": lambda f: gta("task_arithmetic", f, glob={"normalize": True}),
    "ties": lambda f: gta("ties", f, params={"density": [0.2, 0.8]}),
    "ties_unnormalized_per_kind": lambda f: {
        **gta("ties", f, params={"density": 0.4}, glob={"normalize": False}),
        "models": [{"model": e, "parameters": {"weight": PER_KIND_WEIGHT, "density": 0.4}} for e in f["experts"]],
    },
    "ties_rescaled": lambda f: gta("ties", f, params={"density": 0.3}, glob={"rescale": True}),
    "breadcrumbs": lambda f: gta("breadcrumbs", f, params={"density": 0.6, "gamma": 0.05}),
    "breadcrumbs_ties": lambda f: gta("breadcrumbs_ties", f, params={"density": 0.5, "gamma": 0.02}),
    "linear": lambda f: {"merge_method": "linear", "models": [
        {"model": m, "parameters": {"weight": w}} for m, w in zip([f["base"], *f["experts"]], [0.2, 0.5, 0.3, 0.8])]},
    "linear_unnormalized": lambda f: {"merge_method": "linear", "parameters": {"normalize": False}, "models": [
        {"model": m, "parameters": {"weight": w}} for m, w in zip(f["experts"], [0.2, 0.5, 0.3])]},
    "slerp": lambda f: {"merge_method": "slerp", "base_model": f["base"],
                        "models": [{"model": f["base"]}, {"model": f["experts"][0]}],
                        "parameters": {"t": [{"filter": "mlp", "value": [0, 0.3, 1]}, {"value": 0.6}]}},
}


TRIMMING = ("ties", "breadcrumbs")  # methods whose result depends on the order among equal magnitudes


@pytest.mark.parametrize("name", sorted(DETERMINISTIC))
def test_fp32_bit_identical(name, families, tmp_path):
    fam = families("fp32")
    recipe = DETERMINISTIC[name](fam)
    ref, ours = both(recipe, tmp_path)
    if name.startswith(TRIMMING):
        # fp32 task vectors rarely hold two equal magnitudes, but they can
        assert_identical_except_ties(recipe, fam, ref, ours, max_fraction=1e-4)
    else:
        assert_identical(ref, ours)


@pytest.mark.parametrize("name", ["task_arithmetic", "task_arithmetic_normalized", "linear", "slerp"])
def test_bf16_bit_identical(name, families, tmp_path):
    ref, ours = both(DETERMINISTIC[name](families("bf16")), tmp_path)
    assert_identical(ref, ours)


def tie_positions(recipe: dict, fam: dict) -> dict[str, torch.Tensor]:
    """Elements whose |task vector| equals a trimming threshold for some expert: there mergekit's
    unstable argsort keeps an arbitrary subset of the tied elements."""
    base = load_dir(fam["base"])
    r = Recipe.from_dict(recipe)
    out = {}
    for name, b in base.items():
        ties = torch.zeros(b.shape, dtype=torch.bool)
        for e in fam["experts"]:
            d = (load_dir(e)[name] - b).abs().float()
            layer = layer_index(name)
            p = r.model_params(e, name, 0.0 if layer is None else layer / 3)
            n = d.numel()
            order = MagnitudeOrder(d)
            if recipe["merge_method"] == "ties":
                ks = [(max(1, int(p["density"] * n)), True)]
            else:
                target, top = int(p["density"] * n), int(p["gamma"] * n)
                bot = max(0, n - target - top)
                ks = [(k, False) for k in (bot, bot + target) if 0 < k < n]
            for k, desc in ks:
                v, _, _ = order.kth(d, k, desc)  # d holds magnitudes: |d| = d
                ties |= d == v
        out[name] = ties
    return out


@pytest.mark.parametrize("name", ["ties", "breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("fam_name", ["bf16", "bf16_small"])
def test_bf16_trimming_identical_except_ties(name, fam_name, families, tmp_path):
    fam = families(fam_name)
    recipe = DETERMINISTIC[name](fam)
    recipe["models"] = [{**m, "parameters": {**m["parameters"], "density": 0.5}} for m in recipe["models"]]
    ref, ours = both(recipe, tmp_path)
    assert_identical_except_ties(recipe, fam, ref, ours, max_fraction=0.02 if fam_name == "bf16" else 1.0)


def assert_identical_except_ties(recipe, fam, ref, ours, max_fraction):
    ties = tie_positions(recipe, fam)
    differing = total = 0
    for k in ref:
        diff = ref[k] != ours[k]
        assert not (diff & ~ties[k]).any(), f"{k}: differs outside tied magnitudes"
        differing += int(diff.sum())
        total += diff.numel()
    assert differing <= max_fraction * total


def test_dtype_override_and_out_dtype(families, tmp_path):
    recipe = gta("task_arithmetic", families("bf16"), glob={"lambda": 0.9}, dtype="float32", out_dtype="bfloat16")
    ref, ours = both(recipe, tmp_path)
    assert_identical(ref, ours)


def test_larger_expert_vocabulary_aligned_to_base(families, tmp_path):
    fam = families("vocab")
    recipe = gta("task_arithmetic", fam, tokenizer_source="base")
    ref, ours = both(recipe, tmp_path)
    assert_identical(ref, ours)


def test_tied_base_with_untied_expert(families, tmp_path):
    fam = families("untied")
    ref, ours = both(gta("ties", fam, params={"density": 0.5}), tmp_path)
    assert "lm_head.weight" in ours
    assert_identical(ref, ours)


def test_slices_with_per_slice_parameters(families, tmp_path):
    fam = families("fp32")
    recipe = {"merge_method": "task_arithmetic", "base_model": fam["base"], "slices": [
        {"sources": [{"model": fam["base"], "layer_range": [0, 2]}] + [
            {"model": e, "layer_range": [0, 2], "parameters": {"weight": w}} for e, w in zip(fam["experts"], W)]},
        {"sources": [{"model": fam["base"], "layer_range": [2, 4]}] + [
            {"model": e, "layer_range": [2, 4], "parameters": {"weight": [0.1, 0.9]}} for e in fam["experts"]]},
    ]}
    ref, ours = both(recipe, tmp_path)
    assert_identical(ref, ours)
