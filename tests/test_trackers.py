"""Experiment trackers for real, offline: a search of two worker processes and its export report to
MLflow (its default SQLite store in the run directory, read back with mlflow.search_runs),
TensorBoard (event files read back with EventAccumulator) and W&B (WANDB_MODE=offline; its run
files parsed here), all into one tracker run; a tracker that fails is warned about and dropped."""

import glob
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from evomerge.run.loop import run_search
from evomerge.run.rundir import create_run, open_run, run_identity
from evomerge.zoo import family

ENV = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
                    "WANDB_SILENT": "true"}


def _config(tmp_path: Path, zoo: dict, **over) -> Path:
    cfg = {"models": family(zoo), "merge_method": "ties",
           "space": "global", "fitness": {"suite": "zoo"}, "driver": {"name": "cma", "popsize": 4},
           "budget": {"max_candidates": 6}, "seed": 1, "report_to": ["mlflow", "tensorboard", "wandb"]} | over
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def wandb_records(path: Path):
    """The protobuf records of a W&B run file (``run-ID.wandb``): W&B's LevelDB-style log of
    32 KiB blocks, each record a 7-byte header (crc, length, type) and its bytes."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, part = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (n == 0 and kind == 0):  # the block's zero padding
            pos += left
            continue
        part += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(part)
            part = b""
            yield record


def wandb_history(run_dir: Path) -> tuple[set[str], list[dict]]:
    ids, rows = set(), []
    for f in glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb")):
        for r in wandb_records(Path(f)):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                ids.add(r.run.run_id)
            elif kind == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
    return ids, rows


def test_workers_and_export_report_to_one_run_of_each_tracker(tmp_path, zoo, monkeypatch):
    from evomerge.run.report import export

    for key in ("WANDB_MODE", "WANDB_SILENT"):
        monkeypatch.setenv(key, ENV[key])  # the export runs in this process
    elsewhere = tmp_path / "cwd"  # nothing may be written where the commands run, only in the run
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = _config(tmp_path, zoo, budget={"max_candidates": 10})
    out = subprocess.run([sys.executable, "-m", "evomerge.cli", "search", str(cfg), "--run-dir",
                          str(tmp_path / "run"), "--devices", "cpu,cpu"], env=ENV, capture_output=True, text=True,
                         timeout=900, cwd=elsewhere)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "report_to" not in out.stderr  # no tracker failed
    run = open_run(tmp_path / "run")
    rows = {r.number: r for r in run.db.rows() if r.counted}
    assert len(rows) == 10 and all(w["own"] > 0 for w in run.db.registry.all())  # both workers logged
    fitness = {n: r.fitness for n, r in rows.items()}
    report = export(run, tmp_path / "export")
    recipe = (tmp_path / "export" / "recipe.yaml").read_text()

    # MLflow: one run, found by the evomerge run's id, the config once, every candidate at its number
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    found = mlflow.search_runs(experiment_names=["evomerge"])
    assert len(found) == 1 and found["tags.evomerge.run_id"][0] == run_identity(run)
    assert found["params.merge_method"][0] == "ties" and found["params.fitness.suite"][0] == "zoo"
    client, run_id = MlflowClient(uri), found["run_id"][0]
    history = {m.step: m.value for m in client.get_metric_history(run_id, "fitness")}
    assert history == pytest.approx(fitness, abs=1e-12)
    assert {m.step for m in client.get_metric_history(run_id, "items.rev")} == set(rows)
    x = run.space.names[0]
    assert {m.step: m.value for m in client.get_metric_history(run_id, f"x.{x}")} == \
        pytest.approx({n: r.params[x] for n, r in rows.items()})
    assert client.get_metric_history(run_id, "export.candidate")[0].value == report["candidate"]
    assert mlflow.artifacts.load_text(f"runs:/{run_id}/export/recipe.yaml") == recipe
    assert (tmp_path / "run" / "mlflow-artifacts").is_dir() and not list(elsewhere.iterdir())

    # TensorBoard: the two workers' event files are one run
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    assert len(list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))) >= 2
    assert {e.step: e.value for e in acc.Scalars("fitness")} == pytest.approx(fitness, abs=1e-6)
    assert {e.step for e in acc.Scalars("task/rev/exact_match")} == set(rows)
    assert [e.step for e in acc.Scalars("export/candidate")] == [report["candidate"]]

    # W&B: every process's offline files carry the evomerge run's id; each candidate logged once
    ids, logged = wandb_history(tmp_path / "run")
    assert ids == {run_identity(run)}
    by_number = {int(h["candidate"]): h for h in logged if "candidate" in h}
    assert sorted(by_number) == sorted(rows) and len([h for h in logged if "candidate" in h]) == 10
    assert {n: h.get("fitness") for n, h in by_number.items()} == pytest.approx(fitness, abs=1e-12)
    assert any(h.get("export/candidate") == report["candidate"] for h in logged)


def test_a_failing_tracker_is_warned_about_and_the_search_goes_on(tmp_path, zoo, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens there
    run = create_run(_config(tmp_path, zoo, report_to=["mlflow", "tensorboard"], budget={"max_candidates": 2}),
                     tmp_path / "run")
    summary = run_search(run, live=False)
    assert summary["evaluated"] == 2
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: report_to")]
    assert len(warned) == 1 and warned[0].startswith("warning: report_to: mlflow failed (")
    assert warned[0].endswith("the search goes on without it")
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))  # the other tracker logged


def test_a_tracker_not_installed_is_refused_in_one_line(tmp_path, zoo, monkeypatch):
    from evomerge.config import ConfigError
    from evomerge.rundb import trackers

    monkeypatch.setitem(trackers.PACKAGES, "wandb", "evomerge_no_such_package")
    with pytest.raises(ConfigError, match=r"report_to: wandb is not installed \(pip install 'evomerge\[wandb\]'\)"):
        create_run(_config(tmp_path, zoo), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_mlflow_with_a_local_file_store(tmp_path, zoo, monkeypatch):
    """MLflow's file store (which MLflow 3 keeps behind MLFLOW_ALLOW_FILE_STORE) outside the run
    directory, named by MLFLOW_TRACKING_URI and an experiment of the user's, read back with
    mlflow.search_runs."""
    import mlflow

    uri = (tmp_path / "mlruns").as_uri()
    for key, value in (("MLFLOW_TRACKING_URI", uri), ("MLFLOW_ALLOW_FILE_STORE", "true"),
                       ("MLFLOW_EXPERIMENT_NAME", "merges")):
        monkeypatch.setenv(key, value)
    run = create_run(_config(tmp_path, zoo, report_to=["mlflow"], budget={"max_candidates": 3}), tmp_path / "run")
    run_search(run, live=False)
    mlflow.set_tracking_uri(uri)
    found = mlflow.search_runs(experiment_names=["merges"])
    assert len(found) == 1 and found["tags.evomerge.run_id"][0] == run_identity(run)
    fitness = {r.number: r.fitness for r in run.db.rows() if r.counted}
    history = mlflow.MlflowClient(uri).get_metric_history(found["run_id"][0], "fitness")
    assert {m.step: m.value for m in history} == pytest.approx(fitness, abs=1e-12) and len(fitness) == 3
    assert not (tmp_path / "run" / "mlflow.db").exists()
