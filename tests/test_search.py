"""The search: runs on the tiny zoo, the run database, crash-safe resume (SIGKILL), signals,
failed candidates, status and plots, export (checked against mergekit)."""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Optional

import pytest
import torch
import yaml
from conftest import cli_without_torch, load_dir, mergekit_merge

from evomerge.errors import EvomergeError
from evomerge.fitness.record import CandidateRecord
from evomerge.run.report import export, status_text, write_plots
from evomerge.rundb.store import RunDB, sqlite_url
from evomerge.run.loop import run_search
from evomerge.run.rundir import RunError, create_run, open_run
from evomerge.zoo import family

ENV = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def config(tmp_path: Path, zoo: dict, name: str = "cfg", **over) -> Path:
    cfg = {"models": family(zoo), "merge_method": "ties",
           "space": "per_layer", "fitness": {"suite": "zoo-smooth"},
           "driver": {"name": "cma", "popsize": 6}, "budget": {"max_candidates": 12}, "seed": 3} | over
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def candidates(run_dir: Path) -> list[tuple]:
    """(position, vector, fitness) of every counted candidate, in the order they were proposed."""
    run = open_run(run_dir)
    out = []
    counted = [r for r in run.db.rows() if r.state in ("complete", "failed")]
    for i, r in enumerate(counted):  # optuna: the order they were asked in
        pos = r.record.extra.get("cma")
        key = (pos["restart"], pos["generation"], pos["index"]) if pos else (i,)
        out.append((key, tuple(r.params[n] for n in run.space.names), r.fitness))
    return sorted(out)


def test_search_records_everything(tmp_path, zoo, monkeypatch):
    run = create_run(config(tmp_path, zoo), tmp_path / "run")
    summary = run_search(run, live=False)
    assert summary["evaluated"] == 12 and summary["stopped_by"] == "budget"
    rows = run.db.rows()
    assert len(rows) == 12 and all(r.state == "complete" for r in rows)
    r = rows[0]
    assert set(r.params) == set(run.space.names)
    assert r.recipe["merge_method"] == "ties" and r.record.host
    assert set(r.record.tasks) == {"rev", "enc", "fact"}
    assert r.record.merge_s > 0 and r.record.eval_s > 0
    items = run.db.metadata.get()["items"]
    assert {k: len(v) for k, v in items.items()} == {"rev": 40, "enc": 40, "fact": 20}
    assert all(len(r.record.items[k]) == len(items[k]) for k in items)
    refs = {x.name: x for x in run.db.references()}
    assert set(refs) == {"base", "parent:expert_rev", "parent:expert_enc", "parent:expert_fact", "default"}
    # the decoded recipe is what was merged: re-decoding the vector gives it back
    assert run.space.decode([r.params[n] for n in run.space.names]).to_dict() == r.recipe
    # a second search into the same run directory is refused
    with pytest.raises(RunError, match="a run already lives here"):
        create_run(config(tmp_path, zoo), tmp_path / "run")

    # status reads every candidate's score, and the records of only the rows it shows
    read = []
    row = run.db.row
    monkeypatch.setattr(run.db, "row", lambda trial_id: read.append(trial_id) or row(trial_id))
    monkeypatch.setattr(run.db, "rows", lambda: pytest.fail("status read every candidate's record"))
    text = status_text(run, recent=3)
    assert "12/12 candidates" in text and "parent:expert_fact" in text and "best - default" in text
    assert text.count("\n  #") == 3 and len(read) == 4  # the best and the 3 recent
    plots = write_plots(run)
    assert [p.name for p in plots] == ["fitness.png", "best_recipe.png"]
    assert all(p.stat().st_size > 1000 for p in plots)
    assert len(read) == 5  # and the best again, for its recipe


def _kill_midway(cmd: list[str], db_path: Path, name: str, after: int, sig=signal.SIGKILL) -> subprocess.CompletedProcess:
    """Start the search, wait until `after` candidates are recorded, send `sig`."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    db = None
    while time.monotonic() < deadline and proc.poll() is None:
        if db is None and db_path.exists():
            try:  # opened once: each poll is then one query, so the signal lands soon after `after`
                db = RunDB(sqlite_url(db_path), name, create=False)
            except EvomergeError:
                pass  # the run is still being created
        if db is not None and db.leases.counts()[0] >= after:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the search finished before it could be interrupted:\n" + proc.stdout.read()
    proc.send_signal(sig)
    if db is not None:
        db.close()
    out, _ = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, out)


@pytest.mark.parametrize("driver", [{"name": "cma", "popsize": 6}, {"name": "optuna", "sampler": "tpe", "n_startup_trials": 4}],
                         ids=["cma", "optuna-tpe"])
def test_resume_after_sigkill_proposes_the_same_candidates(tmp_path, zoo, driver):
    budget = {"max_candidates": 14}
    whole = create_run(config(tmp_path, zoo, "whole", driver=driver, budget=budget, references=False), tmp_path / "whole")
    run_search(whole, live=False)
    expected = candidates(tmp_path / "whole")
    assert len(expected) == 14

    cfg = config(tmp_path, zoo, "killed", driver=driver, budget=budget, references=False)
    cmd = [sys.executable, "-m", "evomerge.cli", "search", str(cfg), "--run-dir", str(tmp_path / "killed")]
    killed = _kill_midway(cmd, tmp_path / "killed" / "run.db", "killed", after=5)
    assert killed.returncode == -signal.SIGKILL
    partial = candidates(tmp_path / "killed")
    assert 5 <= len(partial) < 14
    run = open_run(tmp_path / "killed")
    run_search(run, resume=True, live=False)
    got = candidates(tmp_path / "killed")
    assert [g[:2] for g in got] == [e[:2] for e in expected]  # same positions, same vectors
    assert [g[2] for g in got] == pytest.approx([e[2] for e in expected])
    assert got[:len(partial)] == partial  # completed candidates were kept, not evaluated again
    rows = run.db.rows()
    assert sum(r.state in ("complete", "failed") for r in rows) == 14
    assert all(r.state != "running" for r in rows)


def test_sigint_stops_cleanly_and_resumes(tmp_path, zoo):
    cfg = config(tmp_path, zoo, budget={"max_candidates": 400}, references=False)
    cmd = [sys.executable, "-m", "evomerge.cli", "search", str(cfg), "--run-dir", str(tmp_path / "run")]
    out = _kill_midway(cmd, tmp_path / "run" / "run.db", "cfg", after=3, sig=signal.SIGINT)
    assert out.returncode == 130, out.stdout
    assert f"continue with: evomerge resume {tmp_path / 'run'}" in out.stdout
    run = open_run(tmp_path / "run")
    done = run.db.leases.counts()[0]
    assert all(r.state != "running" for r in run.db.rows())
    summary = run_search(run, resume=True, max_candidates=done + 4, live=False)
    assert summary["evaluated"] == done + 4


@pytest.mark.parametrize("sampler", ["tpe", "cmaes", "gp", "random", "nsga2"])
def test_optuna_samplers(tmp_path, zoo, sampler):
    driver = {"name": "optuna", "sampler": sampler, "n_startup_trials": 2}
    if sampler == "nsga2":
        driver = {"name": "optuna", "sampler": sampler, "popsize": 2}
    run = create_run(config(tmp_path, zoo, space="global", driver=driver, references=False,
                            budget={"max_candidates": 4}), tmp_path / "run")
    assert run_search(run, live=False)["evaluated"] == 4
    rows = run.db.rows()
    assert len(rows) == 4 and all(r.state == "complete" and len(r.params) == run.space.dimension for r in rows)
    assert len({tuple(r.params.values()) for r in rows}) == 4


def test_failed_candidates_are_recorded_and_the_search_goes_on(tmp_path, zoo):
    # task arithmetic with weights up to 1e38: most candidates overflow to inf/NaN and fail
    space = {"granularity": "global", "parameters": {"weight": {"low": 0.0, "high": 1e38}}}
    run = create_run(config(tmp_path, zoo, merge_method="task_arithmetic", space=space, references=False,
                            budget={"max_candidates": 8}, fail_fast=0), tmp_path / "run")  # 0: never stop
    summary = run_search(run, live=False)
    assert summary["evaluated"] == 8
    rows = run.db.rows()
    failed = [r for r in rows if r.state == "failed"]
    assert failed and all("non-finite" in r.error for r in failed)
    assert len(rows) == 8 and run.db.leases.counts()[0] == 8


def test_wall_time_budget(tmp_path, zoo):
    run = create_run(config(tmp_path, zoo, references=False, budget={"max_minutes": 0.0001}), tmp_path / "run")
    summary = run_search(run, live=False)
    assert summary["stopped_by"] == "budget" and summary["evaluated"] == 1  # one candidate outlasts 6 ms
    # the elapsed time is kept with the driver state: a resumed run does not start the clock again
    assert run_search(open_run(tmp_path / "run"), resume=True, live=False)["evaluated"] == 1


def test_resume_refuses_a_changed_config(tmp_path, zoo):
    run = create_run(config(tmp_path, zoo, budget={"max_candidates": 2}, references=False), tmp_path / "run")
    run_search(run, live=False)
    cfg = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    cfg["space"] = "global"
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(RunError, match="no longer matches the run database"):
        open_run(tmp_path / "run")
    with pytest.raises(RunError, match="not a run directory"):
        open_run(tmp_path)


def test_export_is_what_mergekit_builds(tmp_path, zoo):
    run = create_run(config(tmp_path, zoo, space="per_layer_per_module", budget={"max_candidates": 6}), tmp_path / "run")
    run_search(run, live=False)
    out = tmp_path / "best"
    report = export(run, out)
    assert sorted(p.name for p in out.iterdir()) == [".evomerge-output", "model", "recipe.yaml", "report.json",
                                                     "report.md"]
    assert report["fitness_recomputed_from_export"] == pytest.approx(report["fitness_recorded"], abs=1e-9)
    table = report["table"]
    assert set(table) == {"base", "parent:expert_rev", "parent:expert_enc", "parent:expert_fact", "default",
                          f"best #{report['candidate']}"}
    assert all(set(v) == {"search", "heldout"} for v in table.values())
    prov = json.loads((out / "report.json").read_text())["provenance"]
    assert prov["versions"]["torch"] == metadata.version("torch") and prov["versions"]["python"] == platform.python_version()
    assert {k: len(v) for k, v in prov["subsample_ids"].items()} == {"rev": 40, "enc": 40, "fact": 20}
    assert "| default |" in (out / "report.md").read_text()
    # the model card, as the Hub reads it
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "model" / "README.md")
    assert card.data.base_model == [zoo["base"], *zoo["experts"].values()]
    assert card.data.tags == ["merge", "evomerge", "mergekit"] and card.data.library_name == "transformers"
    assert f"| best #{report['candidate']} |" in card.text and "| parent:expert_rev |" in card.text
    assert "mergekit-yaml recipe.yaml OUT_DIR" in card.text
    assert yaml.safe_load(card.text.split("```yaml\n")[1].split("```")[0]) == \
        yaml.safe_load((out / "recipe.yaml").read_text())
    # mergekit-yaml on the exported recipe gives the exported model
    ours = load_dir(out / "model")
    theirs = mergekit_merge(yaml.safe_load((out / "recipe.yaml").read_text()), tmp_path / "mergekit")
    assert set(ours) == set(theirs)
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    with pytest.raises(EvomergeError, match="exists and is not empty"):
        export(run, out)
    with pytest.raises(EvomergeError, match="no candidate #99"):
        export(run, tmp_path / "other", trial=99)


def test_cli_space_status_export(tmp_path, zoo):
    cfg = config(tmp_path, zoo, budget={"max_candidates": 3}, references=False)

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "evomerge.cli", *args], env=ENV, capture_output=True, text=True)

    space = cli("space", str(cfg))
    assert space.returncode == 0 and "dimension 12" in space.stdout and "expert_rev.weight.L01" in space.stdout
    search = cli("search", str(cfg), "--run-dir", str(tmp_path / "run"))
    assert search.returncode == 0, search.stderr
    assert "3/3 candidates" in search.stdout and "export the best recipe with" in search.stdout
    # status reads the run database only: no torch, no model header, no search space built
    status = cli_without_torch("status", str(tmp_path / "run"), env=ENV)
    assert status.returncode == 0 and "recent candidates" in status.stdout, status.stderr
    assert "space per_layer (dimension 12)" in status.stdout and "torch loaded: False" in status.stdout
    assert (tmp_path / "run" / "fitness.png").exists()
    read, write = os.pipe()  # a reader that stopped (evomerge status | head): no error, exit 141 as a shell's
    os.close(read)
    piped = subprocess.run([sys.executable, "-m", "evomerge.cli", "status", str(tmp_path / "run"), "--no-plots"],
                           env=ENV, stdout=write, stderr=subprocess.PIPE, text=True)
    os.close(write)
    assert piped.returncode == 141 and piped.stderr == ""
    bad = cli("status", str(tmp_path / "nowhere"))
    assert bad.returncode == 2 and "not a run directory" in bad.stderr


def test_the_thread_choice_is_logged_and_threads_fix_it(tmp_path, zoo, monkeypatch):
    """By default the threads follow the free cores, and search.log says so; --threads N fixes them
    (the worker registry keeps the count); a count that is not a positive number is refused."""
    cfg = config(tmp_path, zoo, budget={"max_candidates": 2}, references=False)
    env = {k: v for k, v in ENV.items() if k != "OMP_NUM_THREADS"}
    fixed = subprocess.run([sys.executable, "-m", "evomerge.cli", "search", str(cfg), "--run-dir", str(tmp_path / "a"),
                            "--threads", "1"], env=env, capture_output=True, text=True)
    assert fixed.returncode == 0, fixed.stderr
    assert "torch threads: 1 (--threads)" in (tmp_path / "a" / "search.log").read_text()
    assert [w["threads"] for w in open_run(tmp_path / "a").db.registry.all()] == [1]
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(torch, "set_num_threads", torch._C.set_num_threads)  # an in-process vLLM test replaces it
    before = torch.get_num_threads()
    try:
        summary = run_search(create_run(cfg, tmp_path / "b"), live=False)
    finally:
        torch.set_num_threads(before)
    logged = (tmp_path / "b" / "search.log").read_text()
    assert f"torch threads: {summary['threads']} of " in logged and "it follows the load" in logged
    bad = subprocess.run([sys.executable, "-m", "evomerge.cli", "resume", str(tmp_path / "a"), "--threads", "0"],
                         env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "--threads: '0' is not a positive whole number" in bad.stderr


def test_progress_bar_keeps_candidate_lines_in_the_log_file(tmp_path):
    import io
    import logging

    from evomerge.search.progress import Progress

    root = logging.getLogger()
    console, file = logging.StreamHandler(io.StringIO()), logging.FileHandler(tmp_path / "search.log")
    old_level = root.level
    root.setLevel(logging.INFO)
    root.addHandler(console)
    root.addHandler(file)
    try:
        bar = io.StringIO()
        p = Progress(0, 2, None, 0.0, stream=bar, live=True)
        p.update(0, 0.5, None, 0.01, 0.2)
        p.update(1, None, "NaN logits", 0.01, 0.2)
        p.close()
    finally:
        root.removeHandler(console)
        root.removeHandler(file)
        file.close()
        root.setLevel(old_level)
    assert "best 0.5000 (#0), last failed" in bar.getvalue() and "2/2" in bar.getvalue()
    assert "candidate #" not in console.stream.getvalue()
    logged = (tmp_path / "search.log").read_text()
    assert "candidate #0 (1/2): 0.5000" in logged and "failed (NaN logits)" in logged


class _CmaView:
    """A CMA driver bound to a run database as the search loop binds it, with its state at hand."""

    def __init__(self, db: RunDB, slot: int, popsize: int, restarts: int, opts: dict):
        from evomerge.config import DriverSpec
        from evomerge.rundb.leases import Owner
        from evomerge.search.claims import DriverClaims
        from evomerge.search.drivers import CmaDriver

        self.driver = CmaDriver(["a", "b"], DriverSpec(name="cma", popsize=popsize, restarts=restarts), 0,
                                [0.5, 0.5], slot=slot, solo=False, opts=opts)
        self.claims = DriverClaims(db, self.driver, Owner.this_process(slot))
        self.db = db

    def ask(self):
        return self.claims.ask()

    def tell(self, proposal, values, record):
        return self.claims.tell(proposal, values, record)

    def state(self):
        """The saved state, and the strategy it rebuilds."""
        self.claims._take(self.db.metadata.driver_state())
        return self.driver.state, self.driver.es


def _cma(db: RunDB, slot: int = 0, popsize: int = 4, restarts: int = 0, opts: Optional[dict] = None) -> _CmaView:
    return _CmaView(db, slot, popsize, restarts, opts or {})


@pytest.mark.parametrize("restarts", [0, 1])
def test_cma_stop_restarts_or_samples_on(tmp_path, restarts):
    db = RunDB(sqlite_url(tmp_path / "run.db"), "x", create=True)
    driver = _cma(db, restarts=restarts, opts={"maxiter": 1})  # pycma stops after one generation
    for i in range(4):
        p = driver.ask()
        driver.tell(p, [float(i)], CandidateRecord())
    st, es = driver.state()
    assert es.stop()["maxiter"] if restarts == 0 else not es.stop()
    nxt = driver.ask()
    if restarts == 0:  # no restart left: the budget decides; the stopped ES keeps proposing
        assert nxt.tag == {"generation": 1, "index": 0, "restart": 0} and driver.state()[1].popsize == 4
    else:  # IPOP: a new ES with twice the population, numbered as restart 1
        assert nxt.tag == {"generation": 1, "index": 0, "restart": 1} and driver.state()[1].popsize == 8


def test_cma_workers_interleave_without_a_barrier(tmp_path):
    """Two workers on one generation (popsize 4): when the four are out, the next ask is a fifth
    draw of the same generation instead of a wait; the first four to finish are told, whoever
    finishes the fourth tells, and a late candidate is recorded without moving the distribution."""
    import copy

    db = RunDB(sqlite_url(tmp_path / "run.db"), "x", create=True)
    a, b = _cma(db, 0), _cma(db, 1)
    initial = copy.deepcopy(a.state()[1])
    saved = copy.deepcopy(initial)
    expected = [list(map(float, x)) for x in saved.ask()] + [list(map(float, x)) for x in saved.ask()]
    p = [a.ask(), b.ask(), a.ask(), b.ask(), a.ask()]
    assert [q.tag["index"] for q in p] == [0, 1, 2, 3, 4]
    assert [q.vector for q in p] == expected[:5]  # the same draws in every process
    for q, v in zip([p[4], p[0], p[1]], [4.0, 0.0, 1.0]):
        assert a.tell(q, [v], CandidateRecord()) if q is not p[1] else b.tell(q, [v], CandidateRecord())
    assert a.state()[0]["generation"] == 0  # three finished, one short of popsize
    assert b.tell(p[2], [2.0], CandidateRecord())  # the fourth to finish: told by b
    assert a.state()[0]["generation"] == 1
    nxt = b.ask()
    assert nxt.tag == {"generation": 1, "index": 0, "restart": 0}
    assert b.tell(p[3], [3.0], CandidateRecord())  # late: recorded, generation unchanged
    assert b.state()[0]["generation"] == 1
    # the told distribution is exactly pycma's tell of candidates 0, 1, 2 and 4
    batches = [initial.ask(), initial.ask()]
    initial.tell([batches[0][0], batches[0][1], batches[0][2], batches[1][0]], [-0.0, -1.0, -2.0, -4.0])
    assert list(initial.mean) == pytest.approx(list(a.state()[1].mean))
    counted, running = db.leases.counts()
    assert (counted, running) == (5, 1)


def test_reclaim_fails_dead_and_silent_candidates(tmp_path):
    """A candidate whose process ended on this machine is reclaimed at once; one owned by another
    machine only when its heartbeat is older than the grace period. Its slot is then taken again,
    and the owner that comes back late cannot record it."""
    import dataclasses

    import sqlalchemy as sa

    from evomerge.rundb.leases import Owner
    from evomerge.rundb.optuna_sql import UNIT

    db = RunDB(sqlite_url(tmp_path / "run.db"), "x", create=True, heartbeat_s=1, grace_s=5)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = dataclasses.replace(Owner.this_process(0), pid=int(dead.stdout), started=-1)
    remote = dataclasses.replace(Owner.this_process(1), machine="elsewhere")
    with db.lock():
        db.leases.claim({"a": 0.1}, gone, {"cma": {"generation": 0, "index": 0, "restart": 0}}).trial_id
        t_remote = db.leases.claim({"a": 0.2}, remote).trial_id
        t_alive = db.leases.claim({"a": 0.3}, Owner.this_process(2)).trial_id
        assert db.leases.reclaim() == [0]  # the dead process's candidate only
    assert db.leases.counts() == (0, 2)
    with db.storage.engine.begin() as conn:  # the remote worker went silent 10 s ago
        conn.execute(sa.text("UPDATE trial_heartbeats SET heartbeat = datetime('now', '-10 seconds') "
                             "WHERE trial_id = :t"), {"t": t_remote})
    with db.lock():
        assert db.leases.reclaim() == [1]
    with db.lock():  # a process killed between Optuna's ask and taking ownership: reclaimed at once
        orphan = db.study().ask({"a": UNIT}).number
        assert db.leases.reclaim() == [orphan]
    assert not db.leases.finish(t_remote, [1.0], CandidateRecord())  # it came back: too late, nothing recorded
    assert db.leases.finish(t_alive, [1.0], CandidateRecord())
    states = {r.number: r.state for r in db.rows()}
    assert states == {0: "interrupted", 1: "interrupted", 2: "complete", 3: "interrupted"}
    assert db.leases.counts() == (1, 0)


def test_a_vllm_search_resumes_after_sigkill_and_exports(tmp_path, vllm_family):
    """fitness backend vllm: one engine per process, each candidate streamed into it."""
    fam = {"base": vllm_family["base"], "experts": vllm_family["experts"]}
    fitness = {"suite": "zoo", "backend": "vllm", "engine": {"max_model_len": 256}}
    cfg = config(tmp_path, {"base": fam["base"], "experts": dict(enumerate(fam["experts"]))}, fitness=fitness, references=False, budget={"max_candidates": 8},
                 driver={"name": "cma", "popsize": 4})
    cmd = [sys.executable, "-m", "evomerge.cli", "search", str(cfg), "--run-dir", str(tmp_path / "run")]
    killed = _kill_midway(cmd, tmp_path / "run" / "run.db", "cfg", after=2)
    assert killed.returncode == -signal.SIGKILL
    resumed = subprocess.run([sys.executable, "-m", "evomerge.cli", "resume", str(tmp_path / "run")], env=ENV,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    run = open_run(tmp_path / "run")
    rows = run.db.rows()
    assert sum(r.state == "complete" for r in rows) == 8, [r.error for r in rows]
    assert all(r.state != "running" for r in rows)
    report = export(run, tmp_path / "best", heldout=False)
    assert report["fitness_recomputed_from_export"] == pytest.approx(report["fitness_recorded"], abs=1e-4)
