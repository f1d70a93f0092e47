"""A search run: its directory, its references, its loop, its resume.

A run directory holds ``config.yaml`` (the resolved config: absolute paths), ``run.json`` (the
run's name and storage URL, without any password), ``run.db`` (the SQLite run database unless
``--storage`` points elsewhere), ``search.log`` and the plots ``evomerge status`` writes.

The loop: ask the driver, decode the vector into a recipe, apply it into the live model, score it,
record it, tell the driver. SIGINT / SIGTERM finish the candidate in flight, save the state and
print how to resume; a second signal abandons the candidate (resume redoes it).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Iterator, Optional

from .config import RunConfig
from .drivers import make_driver
from .errors import EvomergeError
from .evaluator import Evaluation, Evaluator
from .progress import Progress
from .rundb import RunDB, best_row, redact, sqlite_url
from .space import SearchSpace, method_defaults

log = logging.getLogger("evomerge.search")

PACKAGES = ("evomerge", "torch", "transformers", "safetensors", "optuna", "cma", "lm_eval", "numpy")


class RunError(EvomergeError):
    """A run directory is missing, incomplete or does not match its database."""


def versions() -> dict[str, str]:
    out = {}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p.replace("_", "-"))
        except metadata.PackageNotFoundError:
            out[p] = "not installed"
    out["python"] = sys.version.split()[0]
    return out


@dataclass
class Run:
    """An opened run: its directory, config, database and search space."""
    run_dir: Path
    cfg: RunConfig
    db: RunDB
    space: SearchSpace
    name: str


def create_run(config_path: str | Path, run_dir: Optional[str | Path] = None, storage: Optional[str] = None) -> Run:
    cfg = RunConfig.load(config_path)
    name = cfg.name or Path(config_path).stem
    run_dir = Path(run_dir) if run_dir else Path("runs") / name
    if (run_dir / "run.json").exists():
        raise RunError(f"{run_dir}: a run already lives here; continue it with: evomerge resume {run_dir}")
    space = cfg.build_space()  # validates the space against the models before anything is written
    cfg.suite()
    run_dir.mkdir(parents=True, exist_ok=True)
    url = storage or sqlite_url((run_dir / "run.db").resolve())
    db = RunDB(url, name, create=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    info = {"name": name, "storage": redact(url), "storage_has_password": redact(url) != url,
            "created": _dt.datetime.now().isoformat(timespec="seconds")}
    tmp = run_dir / "run.json.tmp"
    tmp.write_text(json.dumps(info, indent=2))
    tmp.replace(run_dir / "run.json")
    return Run(run_dir, cfg, db, space, name)


def open_run(run_dir: str | Path, storage: Optional[str] = None) -> Run:
    run_dir = Path(run_dir)
    info_path = run_dir / "run.json"
    if not info_path.exists():
        raise RunError(f"{run_dir}: not a run directory (no run.json); start one with: evomerge search CONFIG.yaml")
    info = json.loads(info_path.read_text())
    url = storage or info["storage"]
    if storage is None and info.get("storage_has_password"):
        raise RunError(f"{run_dir}: the run's storage needs a password; pass --storage with the full URL")
    cfg = RunConfig.load(run_dir / "config.yaml")
    db = RunDB(url, info["name"], create=False)
    space = cfg.build_space()
    meta = db.meta()
    if meta.get("coordinates") not in (None, space.names):
        raise RunError(f"{run_dir}/config.yaml: its search space no longer matches the run database's "
                       "coordinates; restore the config the run was started with")
    return Run(run_dir, cfg, db, space, info["name"])


@contextmanager
def _file_log(path: Path) -> Iterator[None]:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


class _Signals:
    """First SIGINT/SIGTERM: stop after the candidate in flight. Second: abandon it."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("%s received: finishing the candidate in flight, then stopping (again to abandon it)",
                    signal.Signals(signum).name)

    def __enter__(self) -> "_Signals":
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def default_values(run: Run) -> dict[str, float]:
    """Parameter values of the method's default recipe, with the config's default_parameters."""
    return method_defaults(run.cfg.merge_method, len(run.cfg.models.experts)) | dict(run.cfg.default_parameters)


def reference_recipes(run: Run) -> dict:
    """The method's default recipe, with the config's default_parameters and fixed_parameters."""
    return {"default": run.space.recipe_from(default_values(run) | dict(run.cfg.fixed_parameters))}


def parents(run: Run) -> dict[str, str]:
    """Reference name -> model directory of every parent."""
    out = {}
    if run.cfg.models.base:
        out["base"] = run.cfg.models.base
    for path, label in zip(run.space.experts, run.space.labels):
        out[f"parent:{label}"] = path
    return out


def x0_vector(run: Run) -> list[float]:
    if run.cfg.driver.x0 == "center":
        return [0.5] * run.space.dimension
    values = default_values(run)
    return run.space.default_vector({c.param: values.get(c.param, 0.5 * (c.low + c.high))
                                     for c in run.space.coordinates})


def run_search(run: Run, *, resume: bool = False, max_candidates: Optional[int] = None,
               max_minutes: Optional[float] = None, live: Optional[bool] = None) -> dict:
    """Run (or continue) the search until the budget is spent or a signal stops it."""
    with _file_log(run.run_dir / "search.log"):
        return _Search(run, resume, max_candidates, max_minutes, live).loop()


class _Search:
    def __init__(self, run: Run, resume: bool, max_candidates: Optional[int], max_minutes: Optional[float],
                 live: Optional[bool]):
        self.run = run
        cfg = run.cfg
        self.max_candidates = max_candidates if max_candidates is not None else cfg.budget.max_candidates
        minutes = max_minutes if max_minutes is not None else cfg.budget.max_minutes
        self.max_seconds = minutes * 60 if minutes is not None else None
        self.live = live
        self.suite = cfg.suite()
        self.evaluator = Evaluator(cfg, self.suite)
        db = run.db
        items = self.evaluator.items()
        meta = db.meta()
        if "items" in meta and meta["items"] != items:
            raise RunError(f"suite {self.suite.name}: its search subsample differs from the one the run started "
                           "with (were the data files or the suite changed?); candidates would not be comparable")
        if not meta:
            db.set_meta({"config": cfg.to_dict(), "coordinates": run.space.names, "items": items,
                         "versions": versions(), "suite": self.suite.name,
                         "started": _dt.datetime.now().isoformat(timespec="seconds")})
        self.items = items
        if resume:
            gone = db.mark_interrupted()
            if gone:
                log.info("resume: candidate(s) %s were running when the run stopped; they are redone",
                         ", ".join(f"#{n}" for n in gone))

    def _record(self, ev: Evaluation, recipe=None) -> dict:
        return ev.record(self.items, recipe)

    def references(self) -> None:
        run, db = self.run, self.run.db
        if not run.cfg.references:
            return
        done = {r.name for r in db.references()}

        def add(name: str, ev: Evaluation, record: dict) -> None:
            db.add_reference(name, record, ev.fitness)
            log.info("reference %s: %s", name, f"{ev.fitness:.4f}" if ev.fitness is not None else ev.error)

        for name, path in parents(run).items():
            if name not in done:
                ev = self.evaluator.score_model_dir(path)["search"]
                add(name, ev, self._record(ev) | {"model": path})
        for name, recipe in reference_recipes(run).items():
            if name not in done:
                ev = self.evaluator.score_recipe(recipe)
                add(name, ev, self._record(ev, recipe))

    def loop(self) -> dict:
        run, db = self.run, self.run.db
        self.references()
        if self.evaluator.engine is None:
            self.evaluator.prepare(next(iter(reference_recipes(run).values())))
        driver = make_driver(db, run.space.names, run.cfg.driver, run.cfg.seed, x0_vector(run))
        rows = db.rows()
        done = sum(r.counted for r in rows)
        elapsed0, session0 = driver.elapsed, time.perf_counter()

        def elapsed() -> float:  # search seconds over all sessions
            return elapsed0 + time.perf_counter() - session0

        progress = Progress(done, self.max_candidates, self.max_seconds, elapsed0, live=self.live)
        best = best_row(rows)
        if best is not None:
            progress.set_best(best.fitness, best.number)
        stopped_by = "budget"
        current = None
        with _Signals() as signals:
            try:
                while True:
                    if self.max_candidates is not None and done >= self.max_candidates:
                        break
                    if self.max_seconds is not None and elapsed() >= self.max_seconds:
                        break
                    if signals.requested:
                        stopped_by = "signal"
                        break
                    current = driver.ask()
                    if current is None:
                        stopped_by = "driver finished"
                        break
                    recipe = run.space.decode(current.vector)
                    ev = self.evaluator.score_recipe(recipe)
                    driver.elapsed = elapsed()
                    driver.tell(current, None if ev.fitness is None else [ev.fitness], self._record(ev, recipe))
                    number, current = current.number, None
                    done += 1
                    progress.update(number, ev.fitness, ev.error, ev.merge_seconds, ev.eval_seconds)
            except KeyboardInterrupt:
                stopped_by = "signal (candidate abandoned)"
                if current is not None and current.number is not None:
                    db.mark_interrupted([current.number])
            finally:
                progress.close()
                driver.elapsed = elapsed()
                driver.save()
        summary = {"evaluated": done, "stopped_by": stopped_by, "elapsed_s": driver.elapsed}
        if stopped_by.startswith("signal"):
            print(f"stopped after {done} candidate(s); continue with: evomerge resume {run.run_dir}", file=sys.stderr)
        return summary
