"""The run database's parts on their own: the check of Optuna's schema, concurrent openers, the
driver state as data, and config as a leaf module."""

from __future__ import annotations

import subprocess
import sys

import pytest
import sqlalchemy as sa

from evomerge.fitness.record import CandidateRecord, Fidelity
from evomerge.rundb.optuna_sql import SchemaError
from evomerge.rundb.store import RunDB, sqlite_url


def test_a_changed_optuna_schema_is_refused_naming_the_table(tmp_path):
    url = sqlite_url(tmp_path / "run.db")
    RunDB(url, "x", create=True).close()
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE trial_heartbeats RENAME COLUMN heartbeat TO beat"))
    engine.dispose()
    with pytest.raises(SchemaError, match=r"table 'trial_heartbeats' .* lacks column\(s\) heartbeat"):
        RunDB(url, "x", create=False)


def test_many_processes_create_one_run_database_at_once(tmp_path):
    """Eight processes open (and so create) the same new SQLite run database at the same moment:
    Optuna's table creation races between them, and every one of them must get the run."""
    url = sqlite_url(tmp_path / "run.db")
    go = tmp_path / "go"
    code = ("import os, sys; from evomerge.rundb.store import RunDB; "
            f"open({str(tmp_path)!r} + f'/ready-{{os.getpid()}}', 'w').close()\n"
            f"while not os.path.exists({str(go)!r}): pass\n"
            f"print(RunDB.join({url!r}, 'x').name)")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(8)]
    while len(list(tmp_path.glob("ready-*"))) < 8 and all(p.poll() is None for p in procs):
        pass  # every process imported: start them together
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, [err.splitlines()[-1:] for _, err in outs]
    assert all(out.strip() == "x" for out, _ in outs)


def test_config_is_a_leaf():
    """Reading a config, and ``evomerge --help``, load no suite, model or space code and no torch
    (the method registry declares its methods without their tensor code)."""
    heavy = ("'evomerge.fitness.suite', 'evomerge.merging.model_io', 'evomerge.search.space', 'evomerge.rundb', "
             "'transformers', 'optuna', 'torch'")
    code = ("import sys; import evomerge.config; from evomerge.config import RunConfig; "
            "from evomerge.merging.methods import METHODS; assert len(METHODS) == 10; "
            f"print(sorted(m for m in sys.modules if m.startswith(({heavy})) or m == 'torch'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    code = ("import sys; from evomerge.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "print('torch' in sys.modules, 'evomerge.merging.kernel.mix' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "usage: evomerge" in out and out.strip().endswith("False False")


def _filled(url: str) -> RunDB:
    """A run database with every kind of candidate row: complete (full and estimated, one and two
    values), failed with its record, interrupted, retired, running."""
    from evomerge.rundb.leases import Owner

    db = RunDB(url, "x", create=True, objectives=("a", "b"))
    owner = Owner.this_process()
    items = {"a": "1011", "b": "10"}
    records = [(CandidateRecord(fitness=0.7, items=items), [0.6, 0.8]),
               (CandidateRecord(fitness=0.9, items=items, fidelity=Fidelity(0, 2, 3, 6, "default")), [0.9, 0.9]),
               (CandidateRecord(fitness=0.8, items=items), [0.8, 0.7]),
               (CandidateRecord(error="out of memory"), None),
               (CandidateRecord(items=items), [0.5, 0.1])]  # fitness from the first value
    for record, values in records:
        lease = db.leases.claim({"p": 0.5}, owner)
        assert db.leases.finish(lease.trial_id, values, record)
    db.leases.abandon(db.leases.claim({"p": 0.5}, owner).trial_id)  # interrupted
    with db.storage.engine.begin() as conn:  # a row deleted by hand, then its number retired
        db.leases.tables.insert_running(conn, {}, {}, False)
    trials = db.leases.tables.t["trials"]
    with db.storage.engine.begin() as conn:
        conn.execute(trials.delete().where(trials.c.number == 6))
        assert db.leases.tables.retire_missing(conn) == [6]
    db.leases.claim({"p": 0.5}, owner)  # running
    return db


def _same_listing(db: RunDB) -> None:
    from evomerge.fitness.estimate import usage
    from evomerge.rundb.store import best_row, pareto_front

    rows, scores = db.rows(), db.scores()
    assert [(s.trial_id, s.number, s.state, s.fitness, s.values, s.full) for s in scores] == \
        [(r.trial_id, r.number, r.state, r.fitness, r.values, r.record.is_full()) for r in rows]
    assert [s.state for s in scores] == ["complete"] * 3 + ["failed", "complete", "interrupted", "running"]
    assert best_row(scores).number == best_row(rows).number == 2  # the estimated 0.9 does not lead
    assert [r.number for r in pareto_front(scores)] == [r.number for r in pareto_front(rows)] == [1]
    assert usage([s.summary for s in scores if s.counted]) == usage(
        [r.record.summary(r.values) for r in rows if r.counted]) == \
        {"items": 3 + 6 * 3, "full": 6 * 4, "share": 21 / 24, "stopped": 1}
    assert db.row(scores[1].trial_id).record.fidelity.items == 3


def test_scores_list_what_the_records_say_without_reading_them(tmp_path):
    """The listing status, plots, export and the loop's start read (one light query) agrees with
    the full rows on every kind of row, and on rows written before summaries existed."""
    from evomerge.rundb.optuna_sql import SUMMARY_KEY

    db = _filled(sqlite_url(tmp_path / "run.db"))
    _same_listing(db)
    ua = db.leases.tables.t["trial_user_attributes"]
    with db.storage.engine.begin() as conn:  # an older evomerge's rows: no summaries
        assert conn.execute(ua.delete().where(ua.c.key == SUMMARY_KEY)).rowcount == 5
    _same_listing(db)
    db.close()


def test_scores_on_postgresql(pg_url):
    db = _filled(pg_url)
    _same_listing(db)
    db.close()


def test_a_candidate_record_round_trips_and_reads_older_records():
    """The typed record is stored as JSON and read back equal; a record written by an older
    version (an 'estimated' flag in its fidelity, a driver's tag) reads with one meaning of
    'estimated' (items < of), and its unknown keys are kept as they were."""
    from evomerge.fitness.record import TaskRecord

    full = CandidateRecord(merge_s=0.01, eval_s=0.2, recipe={"merge_method": "ties"}, fitness=0.5,
                           objectives={"a": 0.5, "b": 0.25}, fidelity=Fidelity(2, 3, 6, 6),
                           tasks={"a": TaskRecord("margin", 0.5, {"margin": 0.5, "acc": 1.0})},
                           items={"a": "1-0"}, item_values={"a": [0.5, None, -0.1]}, host="h",
                           extra={"cma": {"generation": 1}})
    assert CandidateRecord.from_json(full.to_json()) == full
    assert full.is_full() and full.values_of("a") == [0.5, None, -0.1] and full.items_scored() == 6
    old = {"merge_s": 0.1, "eval_s": 0.3, "fitness": 0.4, "objectives": {"fitness": 0.4}, "host": "h",
           "tasks": {"a": {"metric": "acc", "value": 0.4, "metrics": {"acc": 0.4}}}, "items": {"a": "10-0-"},
           "fidelity": {"level": 0, "levels": 3, "items": 3, "of": 5, "estimated": True, "beaten_by": "default"},
           "cma": {"restart": 0, "generation": 2, "index": 1}}
    record = CandidateRecord.from_json(old)
    assert not record.is_full() and record.estimated_from() == "estimated from 3 of 5 items"
    assert record.values_of("a") == [1.0, 0.0, None, 0.0, None] and record.task_values == {"a": 0.4}
    assert record.summary([0.4]) == {"fitness": 0.4, "full": False, "used": 3, "of": 5}
    again = record.to_json()
    assert again["cma"] == old["cma"] and again["fidelity"] == {k: v for k, v in old["fidelity"].items()
                                                                 if k != "estimated"}
    assert {k: v for k, v in again.items() if k != "fidelity"} == {k: v for k, v in old.items() if k != "fidelity"}
    assert CandidateRecord.from_json(None) == CandidateRecord() and CandidateRecord().summary(None)["fitness"] is None
