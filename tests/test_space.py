"""Search spaces and run configs: presets, decoding into mergekit recipes, bounds, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from evomerge.config import ConfigError, RunConfig
from evomerge.fitness.suite import Suite
from evomerge.merging.recipe import Recipe
from evomerge.search.space import SearchSpace, SpaceError, load_spec, preset_names, space_for
from evomerge.zoo import family

EXPERTS = ["/m/rev", "/m/enc"]


def space(spec, method="ties", layers=4, **kw) -> SearchSpace:
    return SearchSpace(load_spec(spec), method=method, base="/m/base", experts=EXPERTS, num_layers=layers, **kw)


def resolved(recipe: Recipe, model: str, tensor: str, t: float) -> dict:
    return recipe.model_params(model, tensor, t)


def test_presets_dimensions():
    assert {"global", "per_layer", "layer_groups", "per_layer_per_module", "smooth"} <= set(preset_names())
    dims = {name: space(name).dimension for name in preset_names() if name != "layer_path"}  # layer_path: test_layer_path
    # 2 experts x (weight, density)
    assert dims["global"] == 4
    assert dims["per_layer"] == 4 * 4
    assert dims["layer_groups"] == 4 * 2  # 2 layers per group
    assert dims["smooth"] == 4 * 3
    assert dims["per_layer_per_module"] == 4 * (2 * 4 + 3)  # attention+mlp per layer, embed, norm, lm_head
    assert space("per_layer_per_module", has_lm_head=False).dimension == 4 * (2 * 4 + 2)
    assert space("global", method="task_arithmetic").dimension == 2  # no density
    s = SearchSpace(load_spec("per_layer"), method="slerp", base="/m/base", experts=["/m/rev"], num_layers=4)
    assert s.names == ["t.L00", "t.L01", "t.L02", "t.L03"]


def test_per_layer_values_land_on_their_layers():
    s = space("per_layer")
    x = [i / (s.dimension - 1) for i in range(s.dimension)]
    recipe = s.decode(x)
    vals = s.values(x)
    for layer in range(4):
        t = layer / 3
        got = resolved(recipe, "/m/enc", f"model.layers.{layer}.mlp.up_proj.weight", t)
        assert got["weight"] == pytest.approx(vals[f"enc.weight.L{layer:02d}"], abs=1e-6)
        low, high = 0.1, 1.0
        assert low <= got["density"] <= high
    # what the recipe says survives the YAML round trip, i.e. what mergekit-yaml reads
    again = Recipe.from_dict(yaml.safe_load(recipe.to_yaml()))
    assert again.to_dict() == recipe.to_dict()


def test_modules_layer_groups_and_smooth():
    s = space({"granularity": "layer_groups", "layers_per_group": 3, "modules": True}, layers=5)
    x = [0.0] * s.dimension
    names = s.names
    x[names.index("rev.weight.attention.L03-04")] = 1.0
    x[names.index("rev.weight.embed")] = 0.5
    recipe = s.decode(x)
    assert resolved(recipe, "/m/rev", "model.layers.4.self_attn.q_proj.weight", 1.0)["weight"] == 1.0
    assert resolved(recipe, "/m/rev", "model.layers.2.self_attn.q_proj.weight", 0.5)["weight"] == 0.0
    assert resolved(recipe, "/m/rev", "model.layers.4.mlp.up_proj.weight", 1.0)["weight"] == 0.0
    assert resolved(recipe, "/m/rev", "model.embed_tokens.weight", 0.0)["weight"] == 0.5
    assert resolved(recipe, "/m/rev", "model.layers.4.input_layernorm.weight", 1.0)["weight"] == 0.0

    sm = space("smooth", layers=5)
    x = [0.0] * sm.dimension
    x[sm.names.index("rev.weight.K1")] = 1.0  # the middle knot: layer 2 of 5
    recipe = sm.decode(x)
    assert resolved(recipe, "/m/rev", "model.layers.2.mlp.up_proj.weight", 0.5)["weight"] == 1.0
    assert resolved(recipe, "/m/rev", "model.layers.1.mlp.up_proj.weight", 0.25)["weight"] == 0.5
    assert resolved(recipe, "/m/rev", "model.layers.0.mlp.up_proj.weight", 0.0)["weight"] == 0.0
    rows, cols, grid = sm.layer_table(sm.values(x))
    assert cols == ["0", "1", "2", "3", "4"] and grid[rows.index("rev.weight")] == [0.0, 0.5, 1.0, 0.5, 0.0]


def test_bounds_fixed_and_negative_weights():
    s = space({"parameters": {"weight": {"low": -0.5, "high": 1.5}, "density": {"fixed": 0.7}}})
    assert s.names == ["rev.weight", "enc.weight"]
    recipe = s.decode([0.0, 1.0])
    assert resolved(recipe, "/m/rev", "x.weight", 0)["weight"] == -0.5
    assert resolved(recipe, "/m/enc", "x.weight", 0) == {"weight": 1.5, "density": 0.7}
    neg = space({"allow_negative_weights": True})
    assert neg.coordinates[0].low == -1.0
    lam = space({"parameters": {"lambda": {"low": 0.5, "high": 2.0}}})
    assert "lambda" in lam.names
    assert lam.decode([1.0] * lam.dimension).global_params("x", 0)["lambda"] == 2.0
    # out-of-bounds vectors are clipped to the box, never produce invalid recipes
    assert resolved(s.decode([-3.0, 7.0]), "/m/rev", "x.weight", 0)["weight"] == -0.5


@pytest.mark.parametrize("spec, message", [
    ({"granularity": "per_layer", "knots": 3}, "knots only applies"),
    ({"granularity": "smooth"}, "smooth needs knots"),
    ({"granularity": "layer_groups"}, "layers_per_group"),
    ({"granularity": "per_lair"}, "granularity"),
    ({"bogus": 1}, "bogus: unknown key"),
    ({"parameters": {"weight": {"low": 1, "high": 0}}}, "low (1.0) must be below high"),
    ({"parameters": {"density": {"low": 0.5, "high": 1.5}}}, "parameters.density: bounds must lie in [0, 1]"),
    ({"parameters": {"epsilon": {"low": 0, "high": 0.1}}}, "parameters.epsilon: method 'ties' has no searchable"),
    ("no_such_preset", "no preset or file 'no_such_preset'"),
])
def test_bad_spaces(spec, message):
    with pytest.raises(SpaceError) as e:
        space(spec)
    assert message in str(e.value)


def test_vector_errors():
    s = space("global")
    with pytest.raises(SpaceError, match="has 3 coordinates; the space has 4"):
        s.decode([0.5] * 3)
    with pytest.raises(SpaceError, match=r"coordinate 1 \(enc.weight\) is not finite"):
        s.decode([0.5, float("nan"), 0.5, 0.5])


def write_config(tmp_path, zoo, **over) -> Path:
    cfg = {"models": family(zoo), "merge_method": "ties",
           "space": "global", "fitness": {"suite": "zoo-smooth"}, "budget": {"max_candidates": 4}} | over
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_config_relative_paths(tmp_path, zoo):
    root = Path(zoo["root"])
    rel = {"base": "zoo/" + Path(zoo["base"]).name, "experts": ["zoo/" + Path(p).name for p in zoo["experts"].values()]}
    (tmp_path / "zoo").symlink_to(root)
    cfg = RunConfig.load(write_config(tmp_path, zoo, models=rel))
    assert Path(cfg.models.base).is_absolute() and Path(cfg.models.base).exists()
    assert space_for(cfg).num_layers == 2
    # a folder named like a shipped suite or preset (the zoo in ./zoo) does not hide the shipped one
    (tmp_path / "per_layer").mkdir()
    cfg = RunConfig.load(write_config(tmp_path, zoo, models=rel, space="per_layer", fitness={"suite": "zoo"}))
    assert cfg.fitness.suite == "zoo" and Suite.load(cfg.fitness.suite).name == "zoo"
    assert space_for(cfg).dimension == 3 * 2 * 2  # experts x parameters x layers


@pytest.mark.parametrize("over, message", [
    ({"budget": {}}, "budget: give max_candidates, max_minutes or both"),
    ({"merge_method": "tie"}, "merge_method: unknown method 'tie'"),
    ({"driver": {"name": "cma", "sampler": "tpe"}}, "sampler applies to driver optuna only, not cma"),
    ({"driver": {"name": "optuna", "sampler": "annealing"}}, "driver.sampler"),
    ({"colour": "red"}, "colour: unknown key"),
    ({"models": {"base": "./nowhere", "experts": ["./nowhere2"]}}, "models: ./nowhere: no such directory"),
    ({"device": "gpu"}, "device must be cpu, cuda or cuda:N"),
    ({"budget": {"max_candidates": 0}}, "budget.max_candidates"),
])
def test_bad_configs(tmp_path, zoo, over, message):
    with pytest.raises(ConfigError) as e:
        RunConfig.load(write_config(tmp_path, zoo, **over))
    assert message in str(e.value) and "cfg.yaml" in str(e.value)
