"""The run database's parts on their own: the check of Optuna's schema, concurrent openers, the
driver state as data, and config as a leaf module."""

from __future__ import annotations

import subprocess
import sys

import pytest
import sqlalchemy as sa

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
    """Reading a config loads no suite, model or space code (and so none of their dependencies)."""
    code = ("import sys; import evomerge.config; "
            "print(sorted(m for m in sys.modules if m.startswith(('evomerge.fitness.suite', 'evomerge.merging.model_io', "
            "'evomerge.search.space', 'evomerge.rundb', 'transformers', 'optuna'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
