"""Experiment trackers, as HF Trainer's ``report_to``: ``report_to: [mlflow, tensorboard, wandb]``
in the run config (none by default; each an optional extra, ``pip install 'evomerge[mlflow]'``).

One evomerge run is one tracker run, whichever process logs to it: its search, resumes, workers
and export.

- **MLflow**: ``MLFLOW_TRACKING_URI`` (default: ``sqlite:///RUN_DIR/mlflow.db``, its artifacts in
  ``RUN_DIR/mlflow-artifacts``) and
  ``MLFLOW_EXPERIMENT_NAME`` (default ``evomerge``); the run is found again by its tag
  ``evomerge.run_id``.
- **TensorBoard**: event files in ``RUN_DIR/tensorboard`` (one file per process, one run).
- **Weights & Biases**: ``WANDB_PROJECT`` (default ``evomerge``), ``WANDB_MODE`` and its other
  settings from the environment; the W&B run id is the evomerge run's id, its files go under
  ``RUN_DIR/wandb``. W&B steps only grow, so candidates are logged in the order they finish with
  their number as the ``candidate`` metric (plot against it).

The run's config is logged once, when the tracker run is created. Each candidate logs its
fitness (and objectives), ``failed``, each task's metrics, the items scored per task, merge and
scoring seconds and its recipe coordinates (``x/NAME``), at step = its number. An export logs its
winner. A tracker that fails (a bad URI, a server down) is warned about in one line and dropped;
the search goes on.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from evomerge.errors import one_line
from evomerge.fitness.record import CandidateRecord

log = logging.getLogger("evomerge.trackers")

TRACKERS = ("mlflow", "tensorboard", "wandb")
PACKAGES = {"mlflow": "mlflow", "tensorboard": "tensorboard", "wandb": "wandb"}
STARTED_KEY = "trackers"  # run database metadata: the trackers whose run exists (and its config logged)


def check_installed(names: list[str]) -> None:
    """Refuse ``report_to`` naming a tracker whose package is not installed, in one line."""
    from evomerge.config import ConfigError

    for name in names:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise ConfigError(f"report_to: {name} is not installed (pip install 'evomerge[{name}]')")


def flat(value: Any, prefix: str = "") -> dict[str, str]:
    """A nested config as ``a.b.c -> text`` (tracker parameters)."""
    if isinstance(value, dict) and value:
        return {k: v for key, sub in value.items() for k, v in flat(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): str(value)}


def candidate_metrics(number: int, record: CandidateRecord, coordinates: dict[str, float]) -> dict[str, float]:
    """What a candidate logs, from its run-database record and its recipe coordinates."""
    out: dict[str, float] = {"candidate": float(number), "failed": float(record.error is not None)}
    if record.fitness is not None:
        out["fitness"] = float(record.fitness)
    objectives = record.objectives or {}
    if len(objectives) > 1:
        out |= {f"objective/{k}": float(v) for k, v in objectives.items() if v is not None}
    for task, t in record.tasks.items():
        out |= {f"task/{task}/{m}": float(v) for m, v in t.metrics.items() if v is not None}
    for task, marks in record.items.items():
        out[f"items/{task}"] = float(sum(c != "-" for c in marks))
        out[f"items_of/{task}"] = float(len(marks))
    out |= {"merge_s": record.merge_s, "eval_s": record.eval_s}
    return out | {f"x/{k}": float(v) for k, v in coordinates.items()}


class _Mlflow:
    name = "mlflow"

    def __init__(self, run_dir: Path, run_id: str, run_name: str):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # a server down costs seconds, not minutes
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
        from mlflow.tracking import MlflowClient

        own = not os.environ.get("MLFLOW_TRACKING_URI")  # the default store, in the run directory
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
        self.client = MlflowClient(tracking_uri=uri)
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "evomerge"
        found = self.client.get_experiment_by_name(experiment)
        # artifacts of the default store go beside it (MLflow's default is ./mlruns in the working directory)
        where = (run_dir / "mlflow-artifacts").resolve().as_uri() if own else None
        exp_id = found.experiment_id if found else self.client.create_experiment(experiment, artifact_location=where)
        runs = self.client.search_runs([exp_id], filter_string=f"tags.`evomerge.run_id` = '{run_id}'", max_results=1)
        self.run_id = runs[0].info.run_id if runs else \
            self.client.create_run(exp_id, run_name=run_name, tags={"evomerge.run_id": run_id}).info.run_id

    def config(self, cfg: dict) -> None:
        from mlflow.entities import Param

        params = [Param(k, v[:6000]) for k, v in flat(cfg).items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(k.replace("/", "."), v, now, step) for k, v in metrics.items()]
        for i in range(0, len(rows), 1000):
            self.client.log_batch(self.run_id, metrics=rows[i:i + 1000])

    def text(self, name: str, body: str) -> None:
        self.client.log_text(self.run_id, body, f"export/{name}")

    def close(self) -> None:
        pass


class _Tensorboard:
    name = "tensorboard"

    def __init__(self, run_dir: Path, run_id: str, run_name: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), flush_secs=10)

    def config(self, cfg: dict) -> None:
        import yaml

        self.writer.add_text("config", "```yaml\n" + yaml.safe_dump(cfg, sort_keys=False) + "```")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)

    def text(self, name: str, body: str) -> None:
        self.writer.add_text(f"export/{name}", "```\n" + body + "\n```")

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    name = "wandb"

    def __init__(self, run_dir: Path, run_id: str, run_name: str):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "evomerge", id=run_id, name=run_name,
                              dir=str(run_dir), resume="allow",
                              settings=wandb.Settings(init_timeout=30, console="off", silent=True))

    def config(self, cfg: dict) -> None:
        self.run.config.update(cfg, allow_val_change=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics)  # W&B's own step: candidates finish out of order across workers

    def text(self, name: str, body: str) -> None:
        self.run.summary[f"export/{name}"] = body

    def close(self) -> None:
        self.run.finish()


CLASSES = {"mlflow": _Mlflow, "tensorboard": _Tensorboard, "wandb": _Wandb}


class Trackers:
    """The run's trackers: each call goes to every tracker still working; one that raises is
    warned about once and dropped."""

    def __init__(self, trackers: list):
        self.active = trackers

    @classmethod
    def open(cls, cfg, run_dir: Path, run_name: str, db, run_id: str) -> "Trackers":
        """The trackers ``cfg.report_to`` names, their runs found or created under the run
        database's lock (so workers share one); the config is logged by the process that
        created each."""
        if not cfg.report_to:
            return cls([])
        opened = []
        with db.lock():
            started = dict(db.metadata.get().get(STARTED_KEY) or {})
            for name in cfg.report_to:
                try:
                    t = CLASSES[name](run_dir, run_id, run_name)
                    if not started.get(name):
                        t.config(cfg.to_dict())
                        started[name] = True
                    opened.append(t)
                except Exception as e:  # noqa: BLE001 - a tracker never stops the search
                    _warn(name, e)
            db.metadata.set({STARTED_KEY: started})
        return cls(opened)

    def _each(self, method: str, *args) -> None:
        for t in list(self.active):
            try:
                getattr(t, method)(*args)
            except Exception as e:  # noqa: BLE001 - a tracker never stops the search
                _warn(t.name, e)
                self.active.remove(t)

    def candidate(self, number: int, record: CandidateRecord, coordinates: dict[str, float]) -> None:
        self._each("log", number, candidate_metrics(number, record, coordinates))

    def winner(self, report: dict, recipe_yaml: str) -> None:
        """An export: the winner's number and its search and held-out fitness, and its recipe."""
        row = report["table"][f"best #{report['candidate']}"]
        metrics = {"export/candidate": float(report["candidate"])}
        metrics |= {f"export/{split}_fitness": float(v["fitness"]) for split, v in row.items()
                    if v.get("fitness") is not None}
        self._each("log", report["candidate"], metrics)
        self._each("text", "recipe.yaml", recipe_yaml)

    def close(self) -> None:
        self._each("close")
        self.active = []


def _warn(name: str, e: BaseException) -> None:
    message = f"report_to: {name} failed ({one_line(e)}); the search goes on without it"
    log.warning(message)
    print(f"warning: {message}", file=sys.stderr)

