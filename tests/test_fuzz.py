"""Fuzzing the loaders of user files (recipes, run configs, suites and their JSONL data): whatever
the input, the answer is a valid object or one evomerge error on one line, never a traceback."""

from __future__ import annotations

import json

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evomerge.config import RunConfig
from evomerge.errors import EvomergeError
from evomerge.fitness.suite import Suite
from evomerge.merging.recipe import Recipe

KEYS = ["merge_method", "models", "model", "parameters", "base_model", "weight", "density", "filter", "value",
        "dtype", "out_dtype", "tokenizer_source", "slices", "sources", "layer_range", "random_seed", "epsilon",
        "lambda", "normalize", "rescale", "t", "experts", "base", "space", "fitness", "suite", "backend",
        "driver", "name", "popsize", "sampler", "budget", "max_candidates", "max_minutes", "seed", "tasks",
        "data", "kind", "metric", "n", "objectives", "lm_eval", "answer_regex", "heartbeat", "interval_s",
        "fixed_parameters", "default_parameters", "device", "prompt", "answer", "choices", "split", "id"]
VALUES = ["ties", "dare_ties", "slerp", "linear", "task_arithmetic", "della", "breadcrumbs", "bfloat16", "cma",
          "optuna", "tpe", "per_layer", "zoo", "generate", "multiple_choice", "acc", "exact_match", "margin",
          "search", "heldout", "self_attn", "mlp", "[", "(?P<", "nan", "inf", ""]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 70), 2 ** 70),
                    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(VALUES), st.text(max_size=8))
trees = st.recursive(scalars, lambda kids: st.one_of(
    st.lists(kids, max_size=4),
    st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=6)), kids, max_size=6)), max_leaves=25)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _one_line_or_object(load, *args) -> None:
    try:
        load(*args)
    except EvomergeError as e:
        assert "\n" not in str(e).strip() and str(e).strip(), repr(str(e))


@FUZZ
@given(trees)
def test_recipe_loader(raw):
    _one_line_or_object(Recipe.from_dict, raw)


@FUZZ
@given(trees)
def test_config_loader(raw):
    _one_line_or_object(RunConfig.from_dict, raw)


@FUZZ
@given(trees)
def test_suite_loader(raw):
    _one_line_or_object(Suite.from_dict, raw)


@FUZZ
@given(st.binary(max_size=200))
def test_yaml_files_of_any_bytes(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "file.yaml"
    path.write_bytes(data)
    for load in (Recipe.from_yaml, RunConfig.load, Suite.load):
        _one_line_or_object(load, path)


@FUZZ
@given(st.lists(st.one_of(trees.map(json.dumps), st.text(max_size=30)), min_size=1, max_size=6),
       st.sampled_from(["generate", "multiple_choice"]))
def test_suite_data_lines(tmp_path_factory, lines, kind):
    root = tmp_path_factory.mktemp("fuzz")
    (root / "d.jsonl").write_text("\n".join(lines))
    metric = "exact_match" if kind == "generate" else "acc"
    (root / "s.yaml").write_text(yaml.safe_dump({"tasks": [{"name": "t", "data": "d.jsonl", "kind": kind,
                                                             "metric": metric}]}))

    def load_items(path):
        suite = Suite.load(path)
        suite.check()

    _one_line_or_object(load_items, root / "s.yaml")


@pytest.mark.parametrize("content", [b"\xff\xfe not utf-8", None])
def test_a_file_that_is_not_text_or_is_a_directory(tmp_path, content):
    path = tmp_path / "recipe.yaml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    for load in (Recipe.from_yaml, RunConfig.load, Suite.load):
        with pytest.raises(EvomergeError, match=str(path)):
            load(path)
