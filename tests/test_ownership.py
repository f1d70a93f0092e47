"""A run never touches what is not its own: a run directory is self-contained (copied and moved
runs open their own database, another run's database is refused, the environment never silently
replaces the run's storage); --overwrite replaces only evomerge's own outputs, never a run or an
input; run names are one safe path component. Commands run in this process (evomerge.cli.main)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from evomerge import cli
from evomerge.merging.model_io import OUTPUT_MARKER
from evomerge.run.rundir import open_run
from evomerge.zoo import family


def run_cli(capsys, *args) -> tuple[int, str]:
    """Exit code and stderr of one command."""
    code = cli.main([str(a) for a in args])
    return code, capsys.readouterr().err


def error_line(code: int, err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("evomerge: error: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def write_config(path: Path, zoo: dict, **over) -> Path:
    cfg = {"models": family(zoo), "merge_method": "ties",
           "space": "global", "fitness": {"suite": "zoo-smooth"}, "references": False,
           "driver": {"name": "cma", "popsize": 4}, "budget": {"max_candidates": 2}, "seed": 1} | over
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# my own notes, which evomerge must keep\n" + yaml.safe_dump(cfg))
    return path


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def template_run(tmp_path_factory, zoo):
    """A finished 2-candidate run named cfg; each test works on a copy of it."""
    root = tmp_path_factory.mktemp("owned")
    run_dir = root / "run"
    assert cli.main(["search", str(write_config(root / "cfg.yaml", zoo)), "--run-dir", str(run_dir)]) == 0
    return run_dir


@pytest.fixture
def finished_run(tmp_path, template_run):
    run_dir = tmp_path / "original"
    shutil.copytree(template_run, run_dir)
    return run_dir


def rows(run_dir: Path) -> int:
    run = open_run(run_dir)
    try:
        return len(run.db.rows())
    finally:
        run.db.close()


# -- 1. a run directory is self-contained ------------------------------------------------------------


def test_a_copied_run_resumes_into_its_own_database(tmp_path, finished_run, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    before = tree_hashes(finished_run)
    assert run_cli(capsys, "resume", copy, "--max-candidates", "4")[0] == 0
    assert tree_hashes(finished_run) == before  # (opening a database may checkpoint its log: hash first)
    assert rows(copy) == 4 and rows(finished_run) == 2


def test_a_moved_run_still_opens(tmp_path, finished_run, capsys):
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.copytree(finished_run, tmp_path / "run")
    (tmp_path / "run").rename(moved)
    assert run_cli(capsys, "status", moved, "--no-plots")[0] == 0
    assert run_cli(capsys, "resume", moved, "--max-candidates", "3")[0] == 0
    assert rows(moved) == 3
    assert run_cli(capsys, "export", moved, tmp_path / "out", "--no-heldout")[0] == 0


def test_a_run_directory_of_an_older_evomerge_opens_its_own_database_when_moved(tmp_path, finished_run, capsys,
                                                                                caplog):
    legacy = tmp_path / "legacy"
    shutil.copytree(finished_run, legacy)
    info = json.loads((legacy / "run.json").read_text())
    info = {k: v for k, v in info.items() if k not in ("run_id", "storage_in_run_dir")}
    info["storage"] = f"sqlite:///{finished_run.resolve()}/run.db"  # what older versions wrote
    (legacy / "run.json").write_text(json.dumps(info))
    before = tree_hashes(finished_run)
    assert run_cli(capsys, "resume", legacy, "--max-candidates", "3")[0] == 0
    assert "(moved or copied): using that" in caplog.text
    assert rows(legacy) == 3 and tree_hashes(finished_run) == before


def test_another_runs_database_is_refused(tmp_path, zoo, finished_run, capsys):
    other = tmp_path / "other"  # the same config, so the same run name, but another run
    assert cli.main(["search", str(write_config(tmp_path / "cfg.yaml", zoo)), "--run-dir", str(other)]) == 0
    line = error_line(*run_cli(capsys, "status", finished_run, "--storage", f"sqlite:///{other / 'run.db'}"))
    assert "is not the run of" in line and str(finished_run) in line
    # the other run's database under this run's name, in this run's place
    victim = tmp_path / "victim"
    shutil.copytree(finished_run, victim)
    shutil.copy(other / "run.db", victim / "run.db")
    assert "is not the run of" in error_line(*run_cli(capsys, "resume", victim, "--max-candidates", "3"))
    assert rows(other) == 2


def test_the_environment_never_silently_replaces_the_runs_storage(tmp_path, zoo, finished_run, capsys,
                                                                   monkeypatch, caplog):
    other = tmp_path / "other"
    assert cli.main(["search", str(write_config(tmp_path / "cfg.yaml", zoo, name="another")),
                     "--run-dir", str(other)]) == 0
    monkeypatch.setenv("EVOMERGE_STORAGE", f"sqlite:///{other / 'run.db'}")
    capsys.readouterr()
    code = cli.main(["status", str(finished_run), "--no-plots"])
    out = capsys.readouterr().out
    assert code == 0 and "is not this run's storage: using the run's own" in caplog.text
    assert "run cfg" in out and "another" not in out


def test_an_explicit_storage_of_the_same_run_is_used_and_said(tmp_path, finished_run, capsys, caplog):
    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    assert run_cli(capsys, "status", finished_run, "--no-plots", "--storage", f"sqlite:///{copy / 'run.db'}")[0] == 0
    assert "replaces the run's own storage" in caplog.text


# -- 2. never overwrite or delete what evomerge did not create ---------------------------------------


def test_export_onto_the_run_directory_is_refused(tmp_path, finished_run, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = tree_hashes(run)
    line = error_line(*run_cli(capsys, "export", run, run, "--overwrite", "--no-heldout"))
    assert "an input of this command" in line and "never replaces" in line
    assert tree_hashes(run) == before
    line = error_line(*run_cli(capsys, "export", run, tmp_path, "--overwrite", "--no-heldout"))
    assert f"holds {run.resolve()}" in line and tree_hashes(run) == before


def test_search_never_takes_over_a_users_directory(tmp_path, zoo, capsys):
    mine = tmp_path / "work"
    cfg = write_config(mine / "config.yaml", zoo, name="mine")
    (mine / "search.log").write_text("my log\n")
    before = tree_hashes(mine)
    line = error_line(*run_cli(capsys, "search", cfg, "--run-dir", mine))
    assert f"{mine}: exists and is not empty" in line
    assert tree_hashes(mine) == before


@pytest.mark.parametrize("name", ["..", "../../x", "a/b", "two\nlines", ".hidden", "", "x" * 101])
def test_run_names_are_one_safe_path_component(tmp_path, zoo, capsys, monkeypatch, name):
    cfg = write_config(tmp_path / "cfg.yaml", zoo, name=name)
    here = tmp_path / "a" / "b"
    here.mkdir(parents=True)
    monkeypatch.chdir(here)
    line = error_line(*run_cli(capsys, "search", cfg))
    assert "is not a run name" in line and f"{cfg}" in line
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["a", "a/b", "cfg.yaml"]


def test_a_config_files_name_must_make_a_safe_run_name(tmp_path, zoo, capsys):
    cfg = write_config(tmp_path / "my config.yaml", zoo)
    line = error_line(*run_cli(capsys, "search", cfg, "--run-dir", tmp_path / "run"))
    assert "set name: in the config" in line and not (tmp_path / "run").exists()


def test_merge_never_overwrites_its_own_input(tmp_path, zoo, capsys):
    expert = tmp_path / "expert"
    shutil.copytree(zoo["experts"]["rev"], expert)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": zoo["base"],
                                      "models": [{"model": str(expert), "parameters": {"weight": 0.5}}]}))
    before = tree_hashes(expert)
    line = error_line(*run_cli(capsys, "merge", recipe, expert, "--overwrite"))
    assert "an input of this command" in line and tree_hashes(expert) == before


def test_overwrite_replaces_only_evomerge_outputs(tmp_path, zoo, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": zoo["base"],
                                      "models": [{"model": zoo["experts"]["rev"], "parameters": {"weight": 0.5}}]}))
    users = tmp_path / "users"
    users.mkdir()
    (users / "notes.txt").write_text("mine\n")
    line = error_line(*run_cli(capsys, "merge", recipe, users, "--overwrite"))
    assert "was not written by evomerge" in line and (users / "notes.txt").read_text() == "mine\n"
    out = tmp_path / "merged"
    assert run_cli(capsys, "merge", recipe, out)[0] == 0 and (out / OUTPUT_MARKER).is_file()
    assert "exists and is not empty" in error_line(*run_cli(capsys, "merge", recipe, out))
    assert run_cli(capsys, "merge", recipe, out, "--overwrite")[0] == 0


# -- the property: no command changes a file it did not create ---------------------------------------


def test_no_command_rewrites_or_deletes_a_file_it_did_not_create(tmp_path, zoo, finished_run, capsys, monkeypatch):
    """Every command a user might point at a directory of their own, hostile or careless: the
    files that were there before are all there after, byte for byte."""
    # the commands start from a bare root logger; the handlers they add (the CLI's, on this test's
    # captured stderr) go with the test instead of echoing later tests' warnings to a closed stream
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    home = tmp_path / "home"
    cfg = write_config(home / "config.yaml", zoo, name="prop")
    (home / "search.log").write_text("my log\n")
    (home / "model").mkdir()
    (home / "model" / "config.json").write_text("{}\n")
    run = home / "run"
    shutil.copytree(finished_run, run)
    recipe = home / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": zoo["base"],
                                      "models": [{"model": zoo["experts"]["rev"], "parameters": {"weight": 0.5}}]}))
    user_files = {k: v for k, v in tree_hashes(home).items() if not k.startswith("run/")}
    run_db_rows = rows(run)
    commands = [
        ("search", cfg, "--run-dir", home),
        ("search", cfg, "--run-dir", home / "model"),
        ("search", cfg, "--run-dir", run),
        ("export", run, home, "--overwrite", "--no-heldout"),
        ("export", run, run, "--overwrite", "--no-heldout"),
        ("export", run, home / "model", "--overwrite", "--no-heldout"),
        ("merge", recipe, home, "--overwrite"),
        ("merge", recipe, home / "model", "--overwrite"),
        ("zoo", "build", home, "--size", "tiny", "--overwrite"),
        ("status", run, "--no-plots"),
        ("export", run, home / "exported", "--no-heldout"),
        ("export", run, home / "exported", "--overwrite", "--no-heldout"),
    ]
    for args in commands:
        run_cli(capsys, *args)
    after = tree_hashes(home)
    assert {k: after.get(k) for k in user_files} == user_files
    assert rows(run) == run_db_rows and (run / "run.json").is_file() and (run / "config.yaml").is_file()


# -- messages ------------------------------------------------------------------------------------------


def test_library_noise_stays_out_of_normal_output(zoo):
    quieting = ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY", "TQDM_DISABLE", "PYTHONWARNINGS")
    env = {k: v for k, v in os.environ.items() if k not in quieting}  # (in-process commands above set them)
    env |= {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "evomerge.cli", "eval", zoo["experts"]["rev"], "--suite", "zoo-smooth"]
    quiet = subprocess.run(cmd, capture_output=True, text=True, env=env)
    loud = subprocess.run(cmd[:3] + ["--debug"] + cmd[3:], capture_output=True, text=True, env=env)
    assert quiet.returncode == 0 and loud.returncode == 0, quiet.stderr + loud.stderr
    assert "Loading weights" in loud.stderr  # the check below could fail
    assert "Loading weights" not in quiet.stderr and "Warning" not in quiet.stderr, quiet.stderr


def test_status_shows_the_budget_a_resume_gave(tmp_path, finished_run, capsys):
    assert run_cli(capsys, "resume", finished_run, "--max-candidates", "3")[0] == 0
    capsys.readouterr()
    assert cli.main(["status", str(finished_run), "--no-plots"]) == 0
    assert "3/3 candidates" in capsys.readouterr().out
    assert run_cli(capsys, "resume", finished_run)[0] == 0  # the run's budget is now 3: nothing to do
    assert rows(finished_run) == 3


def test_a_second_resume_beside_a_live_process_says_it_becomes_a_worker(tmp_path, finished_run, capsys, caplog):
    from evomerge.rundb.leases import Owner

    run = open_run(finished_run)
    run.db.registry.register(Owner.this_process().to_dict() | {"mode": "search"})  # as a live search registers
    run.db.close()
    assert run_cli(capsys, "resume", finished_run, "--max-candidates", "3")[0] == 0
    assert f"already being searched by process {os.getpid()} on this host" in caplog.text


@pytest.mark.parametrize("where", [0, 4096])  # the header (not a database any more), or pages inside it
def test_a_damaged_run_database_is_named_with_how_to_recover(tmp_path, finished_run, capsys, where):
    db = finished_run / "run.db"
    with open(db, "r+b") as f:
        f.seek(where)
        f.write(bytes(range(256)) * 16)
    for command in (("status", finished_run, "--no-plots"), ("resume", finished_run, "--max-candidates", "3")):
        line = error_line(*run_cli(capsys, *command))
        assert f"run database {db.resolve()} is damaged" in line and ".recover" in line, line


@pytest.mark.parametrize("driver", [None, {"name": "optuna", "sampler": "random"}], ids=["cma", "optuna"])
def test_candidate_numbers_stay_unique_after_rows_are_deleted(tmp_path, zoo, finished_run, capsys, caplog, driver):
    """Rows deleted by hand (a middle one and the last one): their numbers are never given again,
    whether evomerge numbers the candidate (cma) or Optuna's ask does."""
    import sqlite3

    run_dir = finished_run
    if driver is not None:
        run_dir = tmp_path / "optuna"
        cfg = write_config(tmp_path / "cfg.yaml", zoo, driver=driver, budget={"max_candidates": 3})
        assert run_cli(capsys, "search", cfg, "--run-dir", run_dir)[0] == 0
    else:
        assert run_cli(capsys, "resume", run_dir, "--max-candidates", "3")[0] == 0
    con = sqlite3.connect(run_dir / "run.db")
    with con:
        study = con.execute("SELECT study_id FROM studies WHERE study_name = 'cfg'").fetchone()[0]
        doomed = [r[0] for r in con.execute("SELECT trial_id FROM trials WHERE study_id = ? AND number IN (1, 2)",
                                            (study,))]
        assert len(doomed) == 2
        for table in ("trial_values", "trial_params", "trial_user_attributes", "trial_system_attributes",
                      "trial_heartbeats", "trial_intermediate_values", "trials"):
            con.executemany(f"DELETE FROM {table} WHERE trial_id = ?", [(t,) for t in doomed])
    con.close()
    assert run_cli(capsys, "resume", run_dir, "--max-candidates", "4")[0] == 0
    assert "candidate(s) #1, #2 were deleted from it" in caplog.text
    run = open_run(run_dir)
    try:
        numbers = sorted(r.number for r in run.db.rows())
    finally:
        run.db.close()
    assert numbers == [0, 3, 4, 5], numbers  # deleted rows do not count: three new ones, after the deleted
    line = error_line(*run_cli(capsys, "export", run_dir, tmp_path / "out", "--trial", "2"))
    assert "no candidate #2" in line, line
