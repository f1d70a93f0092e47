"""Multi-objective search: suites with several objectives, the Pareto front in the run
database, status with the front and pareto.png, export --pareto."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from evomerge.config import ConfigError
from evomerge.fitness.suite import Suite
from evomerge.fitness.suite import SuiteError
from evomerge.run.report import export_pareto, status_text, write_plots
from evomerge.rundb.store import Row, pareto_front
from evomerge.run.loop import run_search
from evomerge.run.rundir import create_run
from test_search import ENV, config


def _row(n: int, values, state="complete") -> Row:
    return Row(n, state, sum(values), {}, None, values=list(values))


def test_pareto_front_is_the_non_dominated_set():
    rows = [_row(0, [1, 1]), _row(1, [2, 0]), _row(2, [0, 2]), _row(3, [1, 0.5]), _row(4, [2, 0]),
            _row(5, [3, 3], state="failed"), _row(6, [1.5, 1.5])]
    front = pareto_front(rows)
    # 0 and 3 are dominated by 6; the tie 1/4 are both kept; a failed row never counts
    assert [r.number for r in front] == [1, 4, 6, 2]


def test_suite_objectives_are_checked():
    base = {"tasks": [{"name": "a", "data": "x.jsonl", "kind": "generate", "metric": "exact_match"}]}
    with pytest.raises(SuiteError, match="objectives: o: no task named b"):
        Suite.from_dict(base | {"objectives": [{"name": "o", "tasks": ["b"]}]})
    with pytest.raises(SuiteError, match="names must be unique"):
        Suite.from_dict(base | {"objectives": [{"name": "o", "tasks": ["a"]}, {"name": "o", "tasks": ["a"]}]})
    suite = Suite.load("zoo-pareto")
    assert suite.objective_names == ["sequence", "facts"]
    assert suite.objective_values({"rev": -2.0, "enc": -4.0, "fact": 1.5}) == [-3.0, 1.5]
    assert Suite.load("zoo-smooth").objective_names == ["fitness"]


def test_cma_refuses_several_objectives(tmp_path, zoo):
    with pytest.raises(ConfigError, match="2 objectives; cma searches one"):
        create_run(config(tmp_path, zoo, fitness={"suite": "zoo-pareto"}), tmp_path / "run")


def test_nsga2_keeps_and_exports_the_front(tmp_path, zoo):
    cfg = config(tmp_path, zoo, "mo", fitness={"suite": "zoo-pareto"}, space="global",
                 driver={"name": "optuna", "sampler": "nsga2", "popsize": 6}, budget={"max_candidates": 18})
    run = create_run(cfg, tmp_path / "run")
    run_search(run, live=False)
    assert run.db.n_objectives == 2
    rows = run.db.rows()
    assert len(rows) == 18 and all(len(r.values) == 2 for r in rows)
    r = rows[0]
    # the values are the suite's objectives, recomputed from the per-task metrics kept in the record
    assert r.values == pytest.approx([(r.tasks["rev"] + r.tasks["enc"]) / 2, r.tasks["fact"]])
    assert r.record.objectives == {"sequence": r.values[0], "facts": r.values[1]}
    front = pareto_front(rows)
    assert front and all(not (o.values[0] >= f.values[0] and o.values[1] >= f.values[1] and o.values != f.values)
                         for f in front for o in rows)
    text = status_text(run)
    assert f"Pareto front: {len(front)} of 18 completed candidates" in text and "parent:expert_fact" in text
    plots = write_plots(run)
    assert "pareto.png" in [p.name for p in plots]

    out = subprocess.run([sys.executable, "-m", "evomerge.cli", "export", str(tmp_path / "run"),
                          str(tmp_path / "front"), "--pareto"], env=ENV, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "front" / "pareto.json").read_text())
    assert [m["candidate"] for m in report["front"]] == [f.number for f in front]
    for m, f in zip(report["front"], front):
        assert list(m["search"].values()) == pytest.approx(f.values)
        assert set(m["heldout"]) == {"sequence", "facts"}
        recipe = yaml.safe_load((tmp_path / "front" / m["recipe"]).read_text())
        assert recipe == f.recipe
    assert "| #" in (tmp_path / "front" / "pareto.md").read_text()
    with pytest.raises(Exception, match="exists"):
        export_pareto(run, tmp_path / "front", heldout=False)
