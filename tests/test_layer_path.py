"""The layer path (data-flow space): the stack wired in place equals the stack written to disk,
which equals what mergekit builds from the exported passthrough recipe; generation with a KV
cache keeps one cache slot per step even where a layer repeats."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
import torch

from conftest import cli_without_torch, load_dir, mergekit_merge, write_run_config
from evomerge.merging.layer_path import LayerPath, LayerPathError, Step, check_path, scale_filters
from evomerge.merging.layer_stack import PathModel, materialize
from evomerge.merging.model_io import load_causal_lm

IDS = torch.tensor([[5, 9, 14, 3, 22, 7, 31, 2, 18, 11]])


def _path(fam: dict) -> LayerPath:
    """Four models, out of order, a layer used twice (at two scales), first and last from experts."""
    e0, e1, e2 = fam["experts"]
    return LayerPath((Step(e0, 0), Step(e0, 1, 0.8), Step(fam["base"], 1), Step(e1, 2, 1.25), Step(e0, 1, 0.6),
                      Step(e1, 3), Step(e2, 3, 0.9)))


@pytest.fixture(scope="module")
def wired(families):
    fam = families("fp32")
    pm = PathModel(load_causal_lm)
    yield fam, pm
    pm.close()


def test_the_stack_in_place_equals_the_stack_on_disk_and_mergekit(tmp_path, wired):
    fam, pm = wired
    path = _path(fam)
    with torch.no_grad():
        live = pm.apply(path)(IDS).logits
    out = materialize(path, tmp_path / "stack")
    written = load_causal_lm(str(out))
    assert written.config.num_hidden_layers == 7
    with torch.no_grad():
        torch.testing.assert_close(written(IDS).logits, live, atol=1e-5, rtol=0)
    assert path.ends == scale_filters(written.config.to_dict(), True)
    ours, theirs = load_dir(out), mergekit_merge(path.to_dict(), tmp_path / "mergekit")
    assert set(ours) == set(theirs)
    for name, t in ours.items():
        torch.testing.assert_close(theirs[name], t, atol=0, rtol=0, msg=name)
    # the parents are untouched: a parent scored after the stack gives its own logits
    base = pm.parents[fam["base"]]
    with torch.no_grad():
        torch.testing.assert_close(base(IDS).logits, load_causal_lm(fam["base"])(IDS).logits, atol=0, rtol=0)


def test_generation_with_a_cache_keeps_one_slot_per_step(tmp_path, wired):
    fam, pm = wired
    path = _path(fam)
    written = load_causal_lm(str(materialize(path, tmp_path / "stack")))
    stacked = pm.apply(path)
    kw = dict(max_new_tokens=12, do_sample=False, return_dict_in_generate=True, output_logits=True, pad_token_id=0)
    with torch.no_grad():
        live, disk = stacked.generate(IDS, **kw), written.generate(IDS, **kw)
        # without a cache: every step recomputes the whole prefix, so a shared cache slot could not hide
        full = stacked(live.sequences[:, :-1], use_cache=False).logits[:, IDS.shape[1] - 1:]
    assert torch.equal(live.sequences, disk.sequences)
    for a, b in zip(live.logits, disk.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.stack(live.logits, 1), full, atol=1e-5, rtol=0)


def test_a_path_round_trips_through_its_mergekit_recipe(families):
    fam = families("fp32")
    path = _path(fam)
    recipe = replace(path, dtype="float32").to_dict()
    assert [s["sources"][0]["layer_range"] for s in recipe["slices"]] == [[0, 1], [1, 2], [1, 2], [2, 3], [1, 2],
                                                                         [3, 4], [3, 4]]
    assert LayerPath.from_dict(recipe) == replace(path, dtype="float32")
    merged = LayerPath((Step("a", 0), Step("a", 1), Step("a", 2, 0.5), Step("a", 3, 0.5)), ("o_proj", "c_proj"))
    assert [s["sources"][0]["layer_range"] for s in merged.to_dict()["slices"]] == [[0, 2], [2, 4]]
    assert LayerPath.from_dict(merged.to_dict()) == merged


@pytest.mark.parametrize("recipe, message", [
    ({"merge_method": "ties", "models": []}, "a layer path is a passthrough recipe with slices"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [2, 2]}]}]},
     "slices[0].sources[0].layer_range"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [0, 1]},
                                                             {"model": "b", "layer_range": [0, 1]}]}]},
     "exactly one source per slice"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [0, 1],
                                                              "parameters": {"scale": 0.5}}]}]},
     "per sublayer end"),
])
def test_a_recipe_that_is_no_layer_path_is_refused_naming_the_key(recipe, message):
    with pytest.raises(LayerPathError, match=None) as e:
        LayerPath.from_dict(recipe, "r.yaml")
    assert message in str(e.value) and str(e.value).startswith("r.yaml")


def test_steps_that_do_not_fit_the_parents_are_refused(families):
    fam = families("fp32")
    configs = {m: load_causal_lm(m).config.to_dict() for m in (fam["base"], fam["experts"][0])}
    with pytest.raises(LayerPathError, match="has layers 0..3, not 4"):
        check_path(LayerPath((Step(fam["base"], 4),)), configs)
    with pytest.raises(LayerPathError, match="is not one of the parents"):
        check_path(LayerPath((Step("elsewhere", 0),)), configs)
    with pytest.raises(LayerPathError, match="more than the 2 allowed"):
        check_path(LayerPath((Step(fam["base"], 0),) * 3), configs, max_layers=2)
    with pytest.raises(LayerPathError, match="cannot be re-stacked"):
        scale_filters({"model_type": "gpt2"}, False)
    with pytest.raises(LayerPathError, match="use scale 1 on every step"):
        scale_filters({"model_type": "gemma2"}, True)


# -- the layer_path space and a search over it -------------------------------------------------------


def _config(tmp_path: Path, zoo: dict, **over) -> Path:
    return write_run_config(tmp_path / "dfs.yaml", zoo, **({"merge_method": "passthrough", "space": "layer_path",
                                                          "references": True, "budget": {"max_candidates": 6},
                                                          "seed": 3} | over))


def test_the_structured_encoding(tmp_path, zoo):
    from evomerge.config import RunConfig
    from evomerge.search.space import space_for

    space = space_for(RunConfig.load(_config(tmp_path, zoo)))
    n, models = space.num_layers, 4
    assert space.dimension == 2 * models * n and space.max_steps == int(1.5 * n)
    start = space.decode(space.x0())
    assert start.steps == tuple(Step(zoo["base"], i, 1.0) for i in range(n))  # the first parent's own stack
    best = space.decode(space.x0({"base": -3.0, "expert_enc": -1.0, "expert_rev": None}))
    assert best.steps == tuple(Step(zoo["experts"]["enc"], i, 1.0) for i in range(n))  # the best-scoring parent's
    x = [0.2] * space.dimension
    x[5], x[1] = 0.5, 1.0  # in at the threshold (lowest scale) and at the top (highest)
    path = space.decode(x)
    assert [(s.layer, s.scale) for s in path.steps] == [(1 % n, 1.5), (5 % n, 0.5)]
    y = list(x)
    y[0], y[7] = 0.49, 0.01  # a slot left out: its coordinate changes nothing
    assert space.decode(y) == path
    full = [0.6] * space.dimension
    full[-1] = 0.9
    capped = space.decode(full)
    assert len(capped.steps) == space.max_steps and capped.steps[-1].scale == pytest.approx(1.3)
    assert len(space.decode([0.0] * space.dimension).steps) == 1  # never an empty stack
    unscaled = space_for(RunConfig.load(_config(tmp_path, zoo, space={"kind": "layer_path",
                                                                      "scale": {"low": 1, "high": 1}})))
    assert {s.scale for s in unscaled.decode(full).steps} == {1.0}  # for families whose scales cannot be exported
    assert unscaled.decode(unscaled.x0()) == start


def test_a_layer_path_search_exports_what_it_scored(tmp_path, zoo, capsys):
    import json

    from evomerge import cli

    run_dir, out = tmp_path / "run", tmp_path / "out"
    assert cli.main(["search", str(_config(tmp_path, zoo)), "--run-dir", str(run_dir)]) == 0
    assert cli.main(["resume", str(run_dir), "--max-candidates", "8"]) == 0
    # status, with the plot of the best path, reads the run database and the parents' headers only
    status = cli_without_torch("status", str(run_dir), env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert status.returncode == 0 and (run_dir / "best_recipe.png").exists(), status.stderr
    assert "8/8 candidates" in status.stdout and "torch loaded: False" in status.stdout
    assert cli.main(["export", str(run_dir), str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["table"]) >= {"base", "parent:expert_rev", "parent:expert_enc", "parent:expert_fact"}
    assert "default" not in report["table"]  # a layer path has no default merge
    # the stack written to disk scores what the stack wired in place scored
    assert report["fitness_recomputed_from_export"] == pytest.approx(report["fitness_recorded"], abs=1e-4)
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["merge_method"] == "passthrough"
    theirs, ours = mergekit_merge(recipe, tmp_path / "mergekit"), load_dir(out / "model")
    assert set(theirs) == set(ours)
    for name, t in ours.items():
        torch.testing.assert_close(theirs[name], t, atol=0, rtol=0, msg=name)
    # evomerge merge rebuilds it from the recipe too
    assert cli.main(["merge", str(out / "recipe.yaml"), str(tmp_path / "again")]) == 0
    for name, t in load_dir(tmp_path / "again").items():
        assert torch.equal(t, ours[name]), name


@pytest.mark.parametrize("over, message", [
    ({"space": "global"}, "merge_method passthrough: stacks layers; give it space: layer_path"),
    ({"merge_method": "ties"}, "set merge_method: passthrough (not ties)"),
    ({"fitness": {"suite": "zoo-smooth", "backend": "vllm"}}, "fitness.backend: a layer path is scored on live"),
    ({"space": {"kind": "layer_path", "scale": {"low": 1.2, "high": 2}}}, "low (1.2) <= 1 <= high (2.0)"),
    ({"space": {"kind": "layer_path", "start": "nobody"}}, "space start: 'nobody' is not a parent"),
])
def test_a_layer_path_config_that_cannot_run_gets_one_line(tmp_path, zoo, capsys, over, message):
    from evomerge import cli

    code = cli.main(["space", str(_config(tmp_path, zoo, **over))])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("evomerge: error: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert message in lines[0], lines[0]


def test_a_hybrid_export_holds_the_recipe_chain_that_rebuilds_it(tmp_path, zoo, capsys):
    """A parameter-space run, then a layer path over its export and two experts: the second export
    keeps the first recipe in chain/, and the chain rebuilds the same model."""
    import json

    from evomerge import cli
    from evomerge.run.rundir import open_run

    ps = write_run_config(tmp_path / "ps.yaml", zoo)
    assert cli.main(["search", str(ps), "--run-dir", str(tmp_path / "ps")]) == 0
    assert cli.main(["export", str(tmp_path / "ps"), str(tmp_path / "ps-out"), "--no-heldout"]) == 0
    merged = str(tmp_path / "ps-out" / "model")
    dfs = _config(tmp_path, zoo, models={"base": merged, "experts": [zoo["experts"]["rev"], zoo["experts"]["enc"]]},
                  references=False, budget={"max_candidates": 4})
    assert cli.main(["search", str(dfs), "--run-dir", str(tmp_path / "dfs")]) == 0
    run = open_run(tmp_path / "dfs")
    try:  # a candidate that runs layers of the merge (the start's stack is the merge's: most do)
        trial = next(r.number for r in run.db.rows() if r.recipe and merged in json.dumps(r.recipe))
    finally:
        run.db.close()
    out = tmp_path / "dfs-out"
    assert cli.main(["export", str(tmp_path / "dfs"), str(out), "--no-heldout", "--trial", str(trial)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["chain"] == {merged: "chain/0-ps-out.yaml"}
    assert "## Recipe chain" in (out / "report.md").read_text()
    # rebuild from the original models: the chain's merge first, then the path over it
    assert cli.main(["merge", str(out / "chain" / "0-ps-out.yaml"), str(tmp_path / "rebuilt-ps")]) == 0
    recipe = (out / "recipe.yaml").read_text().replace(merged, str(tmp_path / "rebuilt-ps"))
    (tmp_path / "path.yaml").write_text(recipe)
    assert cli.main(["merge", str(tmp_path / "path.yaml"), str(tmp_path / "rebuilt")]) == 0
    ours = load_dir(out / "model")
    for name, t in load_dir(tmp_path / "rebuilt").items():
        assert torch.equal(t, ours[name]), name
