"""Many workers on one search through a real PostgreSQL server: no generation barrier, a worker
killed with SIGKILL mid-candidate loses nothing, no candidate is recorded twice, and the count of
completed candidates equals the budget. Also several workers on one node sharing the SQLite file
(``search --devices``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from evomerge.run.rundir import open_run
from evomerge.zoo import family

ENV = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                    "OMP_NUM_THREADS": "1"}


def _config(tmp_path: Path, zoo: dict, name: str, **over) -> Path:
    cfg = {"name": name, "models": family(zoo),
           "merge_method": "ties", "space": "per_layer", "fitness": {"suite": "zoo-smooth"},
           "driver": {"name": "cma", "popsize": 6}, "budget": {"max_candidates": 36}, "seed": 3,
           "references": False, "heartbeat": {"interval_s": 1, "grace_s": 3}} | over
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _worker(cfg: Path, url: str, run_dir: Path, host: str) -> subprocess.Popen:
    # EVOMERGE_HOST: each worker poses as its own host, so a dead one is found by its heartbeat
    # alone (the pid check only applies to processes on the same machine)
    return subprocess.Popen([sys.executable, "-m", "evomerge.cli", "worker", str(cfg), "--storage", url,
                             "--run-dir", str(run_dir), "--threads", "1"],
                            env=ENV | {"EVOMERGE_HOST": host}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _running_of(db, pid: int) -> list[int]:
    return [r["number"] for r in db.leases.running() if r["owner"] and r["owner"]["pid"] == pid]


@pytest.mark.parametrize("driver", [{"name": "cma", "popsize": 6},
                                    {"name": "optuna", "sampler": "tpe", "n_startup_trials": 6}],
                         ids=["cma", "optuna-tpe"])
def test_three_workers_one_killed(tmp_path, zoo, pg_url, driver):
    cfg = _config(tmp_path, zoo, "shared", driver=driver)
    procs = [_worker(cfg, pg_url, tmp_path / f"host{i}", f"host{i}") for i in range(3)]
    victim = procs[1]
    from evomerge.rundb.store import RunDB, RunDBError

    db = None
    deadline = time.monotonic() + 300
    killed_numbers: list[int] = []
    while time.monotonic() < deadline and victim.poll() is None:
        if db is None:  # a cheap poll: the run's database only (a tiny-zoo candidate takes ~0.1 s)
            try:
                db = RunDB(pg_url, "shared", create=False)
            except RunDBError:
                time.sleep(0.05)
                continue
        if _running_of(db, victim.pid) and db.leases.counts()[0] >= 3:
            # freeze it first, so what it holds cannot change between the look and the kill (it may
            # finish its candidate meanwhile; a commit already sent lands during the pause)
            victim.send_signal(signal.SIGSTOP)
            time.sleep(0.2)
            killed_numbers = _running_of(db, victim.pid)
            if killed_numbers:
                victim.send_signal(signal.SIGKILL)
                break
            victim.send_signal(signal.SIGCONT)
        time.sleep(0.01)
    assert killed_numbers, "the victim never held a candidate:\n" + (victim.communicate()[0] or "")
    victim.wait(30)
    outs = [p.communicate(timeout=600)[0] for p in (procs[0], procs[2])]
    assert [p.returncode for p in (procs[0], procs[2])] == [0, 0], "\n".join(outs)
    db.close()
    from evomerge.run.rundir import join_run

    run = join_run(tmp_path / "host0", pg_url)

    rows = run.db.rows()
    counted = [r for r in rows if r.counted]
    assert len(counted) == 36 and run.db.leases.counts() == (36, 0)
    by_number = {r.number: r for r in rows}
    assert all(by_number[n].state == "interrupted" for n in killed_numbers)
    assert "lost their worker" in "".join(outs)
    vectors = [tuple(r.params[n] for n in run.space.names) for r in counted]
    assert len(set(vectors)) == len(vectors)  # no candidate recorded twice
    for n in killed_numbers:  # the killed worker's candidate was redone by another worker
        lost = by_number[n]
        redo = [r for r in counted if r.params == lost.params]
        assert len(redo) == 1 and redo[0].record.host != "host1"
    if driver["name"] == "cma":
        positions = Counter((r.record.extra["cma"]["restart"], r.record.extra["cma"]["generation"], r.record.extra["cma"]["index"])
                            for r in counted)
        assert max(positions.values()) == 1
        assert {r.record.extra["cma"]["generation"] for r in counted} >= {0, 1, 2}
    hosts = Counter(r.record.host for r in counted)
    assert hosts["host0"] > 0 and hosts["host2"] > 0
    workers = run.db.registry.all()
    assert len(workers) == 3 and sum(1 for w in workers if "ended" in w) == 2
    run.db.close()


def test_devices_share_the_sqlite_file(tmp_path, zoo):
    cfg = _config(tmp_path, zoo, "node", budget={"max_candidates": 10})
    out = subprocess.run([sys.executable, "-m", "evomerge.cli", "search", str(cfg), "--run-dir",
                          str(tmp_path / "run"), "--devices", "cpu,cpu"], env=ENV, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    run = open_run(tmp_path / "run")
    assert run.db.leases.counts() == (10, 0)
    rows = [r for r in run.db.rows() if r.counted]
    positions = Counter((r.record.extra["cma"]["restart"], r.record.extra["cma"]["generation"], r.record.extra["cma"]["index"])
                        for r in rows)
    assert len(rows) == 10 and max(positions.values()) == 1  # no CMA position evaluated by both devices
    workers = run.db.registry.all()
    assert [w["device"] for w in workers] == ["cpu", "cpu"] and all(w["own"] > 0 for w in workers)
    assert (tmp_path / "run" / "worker-0.log").read_text() and (tmp_path / "run" / "worker-1.log").read_text()
    assert "10/10 candidates" in out.stdout
