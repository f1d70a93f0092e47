"""Recipe parsing, validation and parameter resolution."""

import itertools

import pytest
import yaml
from mergekit.config import ConditionalParameter, evaluate_setting

from evomerge.errors import RecipeError
from evomerge.merging.recipe import Condition, Recipe, build, evaluate, gradient, per_kind


def base_recipe(**over):
    r = {"merge_method": "ties", "base_model": "b",
         "models": [{"model": "e1", "parameters": {"weight": 0.5, "density": 0.5}},
                    {"model": "e2", "parameters": {"weight": 0.5, "density": 0.5}}]}
    r.update(over)
    return r


SETTINGS = [
    0.3,
    [0.1, 0.9],
    [0.0, 0.25, 1.0, 0.5],
    list(range(12)),
    [{"filter": "self_attn", "value": [0.2, 0.8]}, {"filter": "mlp", "value": 0.1}, {"value": [1, 0]}],
    {"filter": "norm", "value": 0.7},
]
NAMES = ["model.layers.3.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight",
         "model.norm.weight", "model.embed_tokens.weight", "lm_head.weight"]


@pytest.mark.parametrize("setting", SETTINGS)
def test_resolution_matches_mergekit(setting):
    """Gradients and filters resolve exactly as mergekit resolves them, at every depth."""
    if isinstance(setting, dict):
        ours_setting, mk_setting = Condition(**setting), ConditionalParameter(**setting)
    elif isinstance(setting, list) and setting and isinstance(setting[0], dict):
        ours_setting = [Condition(**c) for c in setting]
        mk_setting = [ConditionalParameter(**c) for c in setting]
    else:
        ours_setting = mk_setting = setting
    for name, layer in itertools.product(NAMES, range(12)):
        t = layer / 11
        assert evaluate(name, ours_setting, t, float) == evaluate_setting(name, mk_setting, t, validate=float)


def test_gradient_with_one_value_per_layer_hits_each_value():
    values = [0.1 * i for i in range(12)]
    for i in range(12):
        assert evaluate("x", gradient(values), i / 11, float) == pytest.approx(values[i], abs=1e-12)


@pytest.mark.parametrize("bad, message", [
    (base_recipe(merge_method="nope"), "merge_method: unknown method 'nope'"),
    (base_recipe(colour="red"), "colour: unknown key"),
    (base_recipe(base_model=None), "base_model: method 'ties' needs a base model"),
    (base_recipe(parameters={"density": 1.5}), "parameters.density: 1.5 is out of range [0, 1]"),
    (base_recipe(parameters={"gamma": 0.1}), "parameters.gamma: not a parameter of 'ties'"),
    (base_recipe(models=[{"model": "e1", "parameters": {"weight": 1, "normalize": True}}]),
     "models[0].parameters.normalize: not a per-model parameter of 'ties'"),
    (base_recipe(models=[{"model": "e1", "parameters": {"density": 0.5}}]), "models[0].parameters.weight: missing"),
    (base_recipe(models=[{"model": "e1", "parameters": {"weight": "heavy"}}]),
     "models[0].parameters.weight: 'heavy' is not a valid value"),
    (base_recipe(models=[{"model": "e1", "parameters": {"weight": [1, float("nan")]}}]), "is not finite"),
    (base_recipe(models=[{"model": "e1", "parameters": {"weight": 1}, "extra": 2}]), "models.0.extra: unknown key"),
    (base_recipe(dtype="int4"), "dtype: unknown dtype 'int4'"),
    (base_recipe(tokenizer_source="union"), "'union' is not supported"),
    ({"merge_method": "slerp", "base_model": "b", "models": [{"model": "b"}, {"model": "e1"}, {"model": "e2"}],
      "parameters": {"t": 0.5}}, "slerp needs the base model and exactly one other model"),
    ({"merge_method": "slerp", "base_model": "b", "models": [{"model": "b"}, {"model": "e1"}]}, "parameters.t"),
    ({"merge_method": "linear", "base_model": "b", "models": [{"model": "e1", "parameters": {"weight": 1}}]},
     "linear does not use a base model"),
    (base_recipe(slices=[{"sources": [{"model": "e1", "layer_range": [0, 2]}]}]), "exactly one of 'models' or 'slices'"),
    ({"merge_method": "ties", "base_model": "b", "slices": [{"sources": [
        {"model": "b", "layer_range": [0, 2]}, {"model": "e1", "layer_range": [1, 3], "parameters": {"weight": 1}}]}]},
     "slices[0]: every source must have the same layer_range"),
    ([1, 2], "a recipe must be a mapping"),
])
def test_bad_recipes_name_the_key(bad, message):
    with pytest.raises(RecipeError) as e:
        Recipe.from_dict(bad, source="r.yaml")
    assert message in str(e.value)
    assert str(e.value).startswith("r.yaml:")


def test_yaml_file_errors(tmp_path):
    with pytest.raises(RecipeError, match="no such recipe file"):
        Recipe.from_yaml(tmp_path / "missing.yaml")
    f = tmp_path / "bad.yaml"
    f.write_text("merge_method: [ties\n")
    with pytest.raises(RecipeError, match=f"{f}: not valid YAML"):
        Recipe.from_yaml(f)


def test_python_api_roundtrips_through_yaml_and_mergekit(tmp_path):
    weight = per_kind({"attention": gradient([0.1, 0.5, 0.9, 0.3]), "mlp": 0.7, "embed": 0.2, "lm_head": 0.3},
                      default=0.5)
    recipe = build("dare_ties", "base", {"e1": {"weight": weight, "density": 0.4}, "e2": {"weight": -0.2}},
                   parameters={"lambda": 1.1}, dtype="bfloat16", random_seed=7)
    text = recipe.to_yaml()
    again = Recipe.from_dict(yaml.safe_load(text))
    assert again == recipe
    # mergekit reads the same recipe and resolves the same values
    from mergekit.config import MergeConfiguration
    mk = MergeConfiguration.model_validate(yaml.safe_load(text))
    mk_weight = mk.models[0].parameters["weight"]
    for name, layer in itertools.product(NAMES, range(4)):
        t = layer / 3
        assert recipe.model_params("e1", name, t)["weight"] == evaluate_setting(name, mk_weight, t, validate=float)
    assert recipe.model_params("e2", NAMES[0], 0.0) == {"weight": -0.2, "density": 1.0}
    assert recipe.global_params(NAMES[0], 0.0) == {"lambda": 1.1}


def test_model_parameter_precedence_and_defaults():
    r = Recipe.from_dict(base_recipe(merge_method="breadcrumbs", parameters={"weight": 0.9, "gamma": 0.05},
                                     models=[{"model": "e1", "parameters": {"weight": 0.1}}, {"model": "e2"}]))
    assert r.model_params("e1", "x", 0) == {"weight": 0.1, "density": 1.0, "gamma": 0.05}
    assert r.model_params("e2", "x", 0) == {"weight": 0.9, "density": 1.0, "gamma": 0.05}
    assert r.expert_names() == ["e1", "e2"]
    assert r.model_names() == ["b", "e1", "e2"]


def test_per_kind_rejects_unknown_kind():
    with pytest.raises(RecipeError, match="unknown tensor kinds"):
        per_kind({"attn": 1.0})


def test_readme_methods_table_is_the_registry():
    """The README's table of methods is generated from the registry and kept in sync."""
    from pathlib import Path

    from evomerge.merging.methods import methods_table

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert methods_table() in readme
