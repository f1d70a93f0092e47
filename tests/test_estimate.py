"""Cheaper fitness (``fitness.estimate``): anchor items, the difference estimator, racing, and
their place in the run: records, resume, workers, Pareto runs, status and export."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from evomerge.config import ConfigError, RunConfig
from evomerge.fitness.base import get_backend
from evomerge.fitness.estimate import Target, choose_anchors, compare, make_plan
from evomerge.fitness.record import Fidelity
from evomerge.fitness.suite import Suite
from evomerge.merging.recipe import Recipe
from evomerge.run.report import export, export_pareto, status_text
from evomerge.rundb.store import best_row
from evomerge.search.evaluator import Evaluator
from evomerge.run.loop import run_search
from evomerge.run.rundir import create_run, open_run
from evomerge.search.racing import Racer
from evomerge.zoo import family
from test_search import ENV, config

RACING = {"racing": {"rungs": [0.1, 0.3], "z": 1.0}}


def _fitness(estimate: dict, suite: str = "zoo-smooth") -> dict:
    return {"suite": suite, "estimate": estimate}


@pytest.mark.parametrize("estimate, message", [
    ({}, "give anchors, racing or both"),
    ({"racing": {"rungs": [0.5, 0.3]}}, "rungs must be increasing fractions"),
    ({"racing": {"rungs": [1.0]}}, "rungs must be increasing fractions"),
    ({"racing": {"z": -1}}, "greater than or equal to 0"),
    ({"racing": {}, "calibration": 4}, "calibration applies to anchors"),
    ({"anchors": 0}, "greater than or equal to 1"),
    ({"anchor": 3}, "fitness.estimate.anchor: unknown key"),
])
def test_estimate_config_errors_name_the_key(tmp_path, zoo, estimate, message):
    raw = {"models": family(zoo), "merge_method": "ties",
           "fitness": _fitness(estimate), "budget": {"max_candidates": 2}}
    with pytest.raises(ConfigError, match="fitness.estimate") as e:
        RunConfig.from_dict(raw, source=tmp_path / "c.yaml")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_anchors_are_one_item_per_cluster_weighted_by_its_share():
    # 10 items in three groups that answer alike across 4 rows
    groups = {0: [1, 1, 0, 0], 1: [0, 0, 1, 1], 2: [1, 0, 1, 0]}
    labels = [0, 0, 0, 0, 0, 1, 1, 1, 2, 2]
    matrix = np.array([groups[g] for g in labels], dtype=float) + np.linspace(0, 0.01, 10)[:, None]
    chosen, weights = choose_anchors(matrix, 3, seed=0)
    assert sorted(labels[i] for i in chosen) == [0, 1, 2]
    assert {labels[i]: w for i, w in zip(chosen, weights)} == pytest.approx({0: 0.5, 1: 0.3, 2: 0.2})
    assert choose_anchors(matrix, 3, seed=0) == (chosen, weights)  # seeded
    assert choose_anchors(matrix, 12, seed=0) == (list(range(10)), [0.1] * 10)  # more anchors than items


def test_plan_levels_are_nested_prefixes_of_one_order():
    counts = {"a": 40, "b": 20}
    calib = [{"a": [float(i % 3 == k) for i in range(40)], "b": [float(i % 3 == k) for i in range(20)]}
             for k in range(3)]
    plan = make_plan(counts, anchors=3, rungs=[0.1, 0.5], z=1.5, calibration=calib, seed=0)
    assert plan.sizes[0] == {"a": 3, "b": 3} and plan.z == 1.5
    assert plan.sizes[1] == {"a": 4, "b": 3}  # b's 10% (2 items) is under its 3 anchors
    assert [plan.items_at(i) for i in range(plan.n_levels)] == [6, 7, 30, 60]
    # items that answer alike make one anchor: two patterns, two anchors
    two = make_plan({"b": 20}, 3, None, None, [{"b": [float(i % 2 == k) for i in range(20)]} for k in range(3)], 0)
    assert two.sizes[0] == {"b": 2} and two.anchor_weights["b"] == pytest.approx([0.5, 0.5])
    for task, n in counts.items():
        assert sorted(plan.order[task]) == list(range(n))
        new = [p for level in range(plan.n_levels) for p in plan.new_items(level).get(task, [])]
        assert sorted(new) == list(range(n)) and len(new) == n  # every item scored once, at one level
        assert sum(plan.weights(0, task).values()) == pytest.approx(1.0)
    assert make_plan(counts, None, [0.1], None, [], seed=0).sizes == [{"a": 4, "b": 2}, counts]
    assert make_plan(counts, 5, None, None, calib, seed=0).z == 0.0  # anchors alone: promote what beats the best
    blind = make_plan(counts, 5, None, None, [], seed=0)  # no calibration rows: seeded items, equal weights
    assert blind.sizes[0] == {"a": 5, "b": 5} and blind.anchor_weights["a"] == [0.2] * 5


def test_difference_estimate_and_the_racing_rule():
    plan = make_plan({"t": 4}, None, [0.5], 1.0, [], seed=0)
    first = sorted(plan.order["t"][:2])
    target = Target("#1", [0.6], {"t": 0.6}, {"t": [0.9, 0.5, 0.7, 0.3]})
    objectives = [("fitness", {"t": 1.0})]
    worse = {"t": {first[0]: target.items["t"][first[0]] - 0.5, first[1]: target.items["t"][first[1]] - 0.52}}
    verdict = compare(plan, 0, worse, [target], objectives)
    # the estimate is the target's value plus the mean paired difference on the items scored
    assert verdict.beaten_by == "#1" and verdict.estimate["t"] == pytest.approx(0.6 - 0.51)
    noisy = {"t": {first[0]: target.items["t"][first[0]] + 0.4, first[1]: target.items["t"][first[1]] - 0.5}}
    assert compare(plan, 0, noisy, [target], objectives).beaten_by is None  # may still reach the top
    assert compare(plan, 0, worse, [], objectives).beaten_by is None  # nothing to race against


def test_subset_scores_the_same_items_as_the_whole_suite(zoo_model):
    model, tok = zoo_model("rev")
    keep = {"rev": [0, 5, 39], "fact": [2, 3]}
    for name, backend in (("zoo-smooth", "native"), ("zoo", "native"), ("zoo", "lm-eval")):
        suite = Suite.load(name)
        sub = suite.subset(keep)
        whole = get_backend(backend).score(model, tok, suite)
        part = get_backend(backend).score(model, tok, sub)
        assert set(part.tasks) == {"rev", "fact"}
        for task, positions in keep.items():
            expected = [whole.tasks[task].items[p] for p in positions]
            got = part.tasks[task].items
            assert [i.id for i in got] == [i.id for i in expected]
            assert [i.value for i in got] == pytest.approx([i.value for i in expected], abs=1e-9)


def test_racing_search_records_estimates_it_can_justify(tmp_path, zoo):
    cfg = config(tmp_path, zoo, fitness=_fitness(RACING), budget={"max_candidates": 30})
    run = create_run(cfg, tmp_path / "run")
    run_search(run, live=False)
    rows = run.db.rows()
    refs = {r.name: r for r in run.db.references()}
    by_name = {f"#{r.number}": r for r in rows} | refs
    plan = run.db.metadata.get()["estimate_plan"]
    assert [sum(s.values()) for s in plan["sizes"]] == [10, 30, 100]
    stopped = [r for r in rows if not r.record.is_full()]
    assert len(stopped) >= 10 and any(r.record.fidelity.level == 0 for r in stopped)
    suite = Suite.load("zoo-smooth")
    scorer = Evaluator(run.cfg, suite)
    for r in stopped[:4]:
        f = r.record.fidelity
        assert f.estimated and f.beaten_by and f.of == 100 and f.items == sum(plan["sizes"][f.level].values())
        scored = {t: [i for i, v in enumerate(r.record.values_of(t)) if v is not None] for t in plan["order"]}
        assert sum(len(v) for v in scored.values()) == f.items
        assert all("".join(r.record.items[t]).count("-") == len(plan["order"][t]) - len(scored[t]) for t in scored)
        # the estimate: the target's value plus the mean paired difference on the items scored
        target = by_name[f.beaten_by]
        assert target.record.is_full()
        for t, positions in scored.items():
            mine, theirs = r.record.values_of(t), target.record.values_of(t)
            expected = target.tasks[t] + sum(mine[p] - theirs[p] for p in positions) / len(positions)
            assert r.tasks[t] == pytest.approx(expected, abs=1e-5)
        # the items it was scored on hold the values a full scoring of its recipe gives them
        full = scorer.score_recipe(Recipe.from_dict(r.recipe))
        for t, positions in scored.items():
            assert [r.record.values_of(t)[p] for p in positions] == pytest.approx(
                [full.result.tasks[t].items[p].value for p in positions], abs=1e-5)
        assert full.fitness < target.fitness  # it was rightly stopped
    # the best row, the references counted (a stopped candidate may lead the candidates when a
    # reference stopped it), was scored on every item
    leader = max([r for r in rows if r.fitness is not None] + list(refs.values()), key=lambda r: r.fitness)
    assert leader.record.is_full()
    best = best_row(rows)  # what status and export call the best candidate
    assert best.record.is_full()
    # the racer looks at new rows by their summaries and values, and those it has seen never again
    tables = run.db.leases.tables
    listed = tables.complete_summaries(set())
    assert [(n, summary["full"], values) for _, n, summary, values in listed] == [
        (r.number, r.record.is_full(), [r.fitness]) for r in rows]
    assert tables.complete_summaries({i for i, *_ in listed[:-1]}) == listed[-1:]
    # a resumed racer (the plan saved) reads the records of the fully scored rows that can lead,
    # not every record, and has the targets that reading every record gives
    reads = []
    results = tables.results
    tables.results = lambda ids: reads.append(list(ids)) or results(ids)
    racer = Racer(scorer, suite, run.cfg.fitness.estimate, run.cfg.seed)
    racer.refresh(run.db, force=True)
    tables.results = results
    full = [r for r in rows if r.record.is_full()]
    top = max(r.fitness for r in full)
    assert reads == [[r.trial_id for r in full]]  # no plan yet in this process: calibration reads them all
    assert [t.values for t in racer.targets] == [[max(top, *(x.fitness for x in refs.values() if x.record.is_full()))]]
    reads.clear()
    tables.results = lambda ids: reads.append(list(ids)) or results(ids)
    planned = Racer(scorer, suite, run.cfg.fitness.estimate, run.cfg.seed)
    planned.plan = racer.plan  # as a resumed racer has it once read (the run's saved plan)
    planned.refresh(run.db, force=True)
    tables.results = results
    assert reads == [[r.trial_id for r in full if r.fitness == top]]
    assert [t.values for t in planned.targets] == [t.values for t in racer.targets]
    status = status_text(run, recent=len(rows))
    assert "candidates stopped before all items" in status and "estimated from 10 of 100 items" in status
    assert "(estimated from 10 of 100 items)" in (tmp_path / "run" / "search.log").read_text()
    report = export(run, tmp_path / "best", heldout=False)
    recorded = Fidelity.from_json(report["fidelity_recorded"])
    assert report["candidate"] == best.number and (recorded is None or not recorded.estimated)
    assert report["fitness_recomputed_from_export"] == pytest.approx(best.fitness, abs=1e-6)
    est = report["estimates"]
    assert est["stopped"] == len(stopped) and est["items"] < est["full"] and len(est["checked"]) == 5
    assert all(c["truth"] is not None and c["items"] < c["of"] for c in est["checked"])
    assert "| candidate | items scored | estimate | truth |" in (tmp_path / "best" / "report.md").read_text()


def test_anchors_are_chosen_after_calibration_and_scored_first(tmp_path, zoo):
    cfg = config(tmp_path, zoo, fitness=_fitness({"anchors": 3, "calibration": 6}), budget={"max_candidates": 20})
    run = create_run(cfg, tmp_path / "run")
    run_search(run, live=False)
    rows = sorted(run.db.rows(), key=lambda r: r.number)
    assert all(r.record.is_full() for r in rows[:6])  # the calibration candidates
    plan = run.db.metadata.get()["estimate_plan"]
    assert plan["sizes"] == [{"rev": 3, "enc": 3, "fact": 3}, {"rev": 40, "enc": 40, "fact": 20}]
    assert plan["z"] == 0.0
    assert all(sum(w) == pytest.approx(1.0) for w in plan["anchor_weights"].values())
    later = [r for r in rows[6:] if not r.record.is_full()]
    assert later, "no candidate was stopped at the anchors"
    for r in later:
        assert r.record.fidelity.items == 9
        for t, order in plan["order"].items():
            scored = {i for i, v in enumerate(r.record.values_of(t)) if v is not None}
            assert scored == set(order[:3])


def test_racing_search_resumes_after_sigkill_with_the_same_candidates(tmp_path, zoo):
    from test_search import _kill_midway, candidates

    over = {"fitness": _fitness(RACING), "budget": {"max_candidates": 16}, "references": False}
    whole = create_run(config(tmp_path, zoo, "whole", **over), tmp_path / "whole")
    run_search(whole, live=False)
    expected = candidates(tmp_path / "whole")
    cmd = [sys.executable, "-m", "evomerge.cli", "search", str(config(tmp_path, zoo, "killed", **over)),
           "--run-dir", str(tmp_path / "killed")]
    _kill_midway(cmd, tmp_path / "killed" / "run.db", "killed", after=6)
    run = open_run(tmp_path / "killed")
    run_search(run, resume=True, live=False)
    got = candidates(tmp_path / "killed")
    assert [g[:2] for g in got] == [e[:2] for e in expected]
    assert [g[2] for g in got] == pytest.approx([e[2] for e in expected])
    fid = [r.record.fidelity for r in sorted(run.db.rows(), key=lambda r: r.number) if r.counted]
    assert any(f and f.estimated for f in fid)
    assert run.db.metadata.get()["estimate_plan"] == whole.db.metadata.get()["estimate_plan"]


def test_two_workers_race_on_one_plan(tmp_path, zoo):
    cfg = config(tmp_path, zoo, "node", fitness=_fitness(RACING), budget={"max_candidates": 24})
    out = subprocess.run([sys.executable, "-m", "evomerge.cli", "search", str(cfg), "--run-dir",
                          str(tmp_path / "run"), "--devices", "cpu,cpu"], env=ENV | {"OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    run = open_run(tmp_path / "run")
    rows = [r for r in run.db.rows() if r.counted]
    assert len(rows) == 24 and all(r.state == "complete" for r in rows)
    plan = run.db.metadata.get()["estimate_plan"]
    sizes = [sum(s.values()) for s in plan["sizes"]]
    assert all((r.record.fidelity.items if r.record.fidelity else 100) in sizes for r in rows)
    assert any(not r.record.is_full() for r in rows)
    assert all(w["own"] > 0 for w in run.db.registry.all())


def test_pareto_racing_keeps_a_front_of_fully_scored_candidates(tmp_path, zoo):
    cfg = config(tmp_path, zoo, "mo", fitness=_fitness(RACING, "zoo-pareto"), space="global",
                 driver={"name": "optuna", "sampler": "nsga2", "popsize": 6}, budget={"max_candidates": 24})
    run = create_run(cfg, tmp_path / "run")
    run_search(run, live=False)
    rows = run.db.rows()
    stopped = [r for r in rows if not r.record.is_full()]
    assert stopped and all(len(r.values) == 2 and all(math.isfinite(v) for v in r.values) for r in stopped)
    for r in stopped:  # below the target that stopped it on every objective
        target = next(x for x in rows + run.db.references()
                      if (x.name or f"#{x.number}") == r.record.fidelity.beaten_by)
        assert all(a < b for a, b in zip(r.values, target.values))
    report = export_pareto(run, tmp_path / "front", heldout=False)
    assert report["front"] and all(next(r for r in rows if r.number == m["candidate"]).record.is_full()
                                   for m in report["front"])
    json.dumps(report)
