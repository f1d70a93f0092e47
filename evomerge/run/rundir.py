"""A run's directory and database: created, opened, joined by workers, checked before it starts.

A run directory holds ``config.yaml`` (the resolved config: absolute paths), ``run.json`` (the
run's name, its id and its storage), ``run.db`` (the SQLite run database unless ``--storage``
points elsewhere), ``search.log`` and the plots ``evomerge status`` writes.

A run directory is self-contained: ``run.json`` names a database inside it by its path relative
to the directory, so a copied or moved run opens its own ``run.db``. An external storage
(PostgreSQL, or a SQLite file elsewhere) is named by its URL, without any password. Either way
the database must hold the run of the same id: a database of another run is refused. An
explicit ``--storage`` replaces the run's own storage, saying so; ``$EVOMERGE_STORAGE`` never
does (it only supplies the password of the run's own storage). The search itself:
:mod:`evomerge.run.loop`.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import sys
import threading
import uuid
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from evomerge.config import RunConfig, run_name_problem
from evomerge.errors import EvomergeError
from evomerge.fitness.base import preflight
from evomerge.fitness.suite import Suite, SuiteError
from evomerge.rundb.secrets import has_secret, redact
from evomerge.rundb.store import RunDB, sqlite_path, sqlite_url
from evomerge.rundb.trackers import check_installed

if TYPE_CHECKING:
    from evomerge.search.path_space import PathSpace
    from evomerge.search.space import SearchSpace

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
    """An opened run: its directory, config, database and search space. The space is built from
    the models' headers when first used (``evomerge status`` needs none, so loads no torch) and
    checked then against the coordinates the run database recorded."""
    run_dir: Path
    cfg: RunConfig
    db: RunDB
    name: str
    where: Path  # the config the run was opened from, for messages
    _space: "Optional[SearchSpace | PathSpace]" = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self._space is not None:
            self._check(self._space)

    @property
    def space(self) -> "SearchSpace | PathSpace":
        if self._space is None:
            from evomerge.search.space import space_for

            self._space = self._check(space_for(self.cfg))
        return self._space

    def _check(self, space: "SearchSpace | PathSpace") -> "SearchSpace | PathSpace":
        if self.db.metadata.get().get("coordinates") not in (None, space.names):
            raise RunError(f"{self.where}: its search space no longer matches the run database's coordinates; "
                           "use the config the run was started with")
        return space

    def space_summary(self) -> str:
        """The space's name and dimension, from the recorded coordinates where the run has them."""
        coordinates = self.db.metadata.get().get("coordinates")
        dimension = len(coordinates) if coordinates is not None else self.space.dimension
        from evomerge.search.space import load_spec

        spec = self._space.spec if self._space is not None else load_spec(self.cfg.space)
        return f"space {spec.name or 'inline'} (dimension {dimension})"


def run_identity(run: Run) -> str:
    """The run's identity (a run from before identities were kept: its name)."""
    return run.db.metadata.get().get(RUN_ID_KEY) or run.name


def _heartbeat_options(cfg: RunConfig) -> dict:
    return {"heartbeat_s": cfg.heartbeat.interval_s, "grace_s": cfg.heartbeat.grace_s}


RUN_ID_KEY = "run_id"  # run.json's and the run database's metadata key of the run's identity


def _local_database(run_dir: Path, url: str) -> Optional[str]:
    """The path relative to ``run_dir`` of a SQLite database ``url`` inside it; None otherwise."""
    path = sqlite_path(url)
    if path is None:
        return None
    try:
        return Path(path).resolve().relative_to(run_dir.resolve()).as_posix()
    except ValueError:
        return None


def _write_run_dir(run_dir: Path, cfg: RunConfig, name: str, url: str, run_id: str) -> None:
    from evomerge.merging.headers import hub_commits

    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    local = _local_database(run_dir, url)
    info = {"name": name, RUN_ID_KEY: run_id, "storage": local or redact(url), "storage_in_run_dir": local is not None,
            "storage_has_password": has_secret(url), "created": _dt.datetime.now().isoformat(timespec="seconds"),
            "hub_commits": hub_commits(cfg.models.names())}
    tmp = run_dir / f"run.json.{threading.get_native_id()}.tmp"
    tmp.write_text(json.dumps(info, indent=2))
    tmp.replace(run_dir / "run.json")


def _preflight(cfg: RunConfig, suite: Suite) -> None:
    """Check what a run needs before anything is written, beyond what ``checked_space`` checked (the
    models' compatibility): the suite's data (both splits), its lm-eval tasks (with a warning for
    each searched on its test split), that the backend can score every task, and that a chat
    template asked for exists."""
    from evomerge.merging.headers import resolve_model_path

    suite.check()
    check_installed(cfg.report_to)
    backend = cfg.fitness.backend
    options = cfg.fitness.lm_eval
    ref = str(resolve_model_path(cfg.reference_model))
    if any(not t.local for t in suite.tasks):
        from evomerge.fitness.lmeval_tasks import check_tasks

        for warning in check_tasks(suite):
            log.warning(warning)
            print(f"warning: {warning}", file=sys.stderr)
    preflight(backend, ref, suite)
    if options is not None and options.apply_chat_template:
        from transformers import AutoTokenizer

        if not AutoTokenizer.from_pretrained(ref, trust_remote_code=cfg.trust_remote_code).chat_template:
            raise SuiteError(f"fitness.lm_eval.apply_chat_template: the tokenizer of {ref} has no chat template")
    _dry_score(cfg, suite, ref)


def _dry_score(cfg: RunConfig, suite: Suite, ref: str) -> None:
    """Score the reference model (its directory ``ref``) on the first search item of each task with
    the run's backend and options: what the backend rejects (an lm-eval option, a prompt too long
    for the engine) stops the run before it exists, not every candidate. A vLLM engine started
    here serves the run."""
    from evomerge.search.evaluator import Evaluator

    ev = Evaluator(cfg, suite.subset({t.name: [0] for t in suite.tasks})).score_model_dir(ref)["search"]
    if ev.error:
        raise SuiteError(f"fitness: the {cfg.fitness.backend} backend failed to score {ref} on one item of each "
                         f"task, so every candidate would fail: {ev.error}")


def _new_run_place(config_path: str | Path, run_dir: Optional[str | Path], storage: Optional[str]):
    """A config checked against its models, with the run's name, directory (created; default
    runs/NAME) and storage URL (default: SQLite in that directory), and its objectives' names."""
    from evomerge.search.space import checked_space

    cfg = RunConfig.load(config_path)
    space = checked_space(cfg)
    suite = Suite.resolve(cfg.fitness.suite)
    objectives = suite.objective_names
    cfg.check_objectives(len(objectives), str(config_path))
    _preflight(cfg, suite)
    name = cfg.name or Path(config_path).stem
    problem = run_name_problem(name)
    if problem:
        raise RunError(f"{config_path}: no name given, and its file name {problem}; set name: in the config")
    run_dir = Path(run_dir) if run_dir else Path("runs") / name
    url = storage or sqlite_url((run_dir / "run.db").resolve())
    return cfg, space, objectives, name, run_dir, url


def _claim_run_dir(run_dir: Path) -> bool:
    """Make ``run_dir`` a new run's directory: it must not exist, or be empty. Returns whether it
    was created here (so a failed start may remove it)."""
    if (run_dir / "run.json").exists():
        raise RunError(f"{run_dir}: a run already lives here; continue it with: evomerge resume {run_dir}")
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise RunError(f"{run_dir}: exists and is not empty; a run directory must be new (pick another --run-dir "
                       "or name)")
    fresh = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    return fresh


def create_run(config_path: str | Path, run_dir: Optional[str | Path] = None, storage: Optional[str] = None) -> Run:
    cfg, space, objectives, name, run_dir, url = _new_run_place(config_path, run_dir, storage)
    fresh = _claim_run_dir(run_dir)
    run_id = uuid.uuid4().hex
    try:
        db = RunDB(url, name, create=True, objectives=objectives, **_heartbeat_options(cfg))
        db.metadata.set({RUN_ID_KEY: run_id})
    except BaseException:
        if fresh and not any(run_dir.iterdir()):
            run_dir.rmdir()  # ours and empty: nothing may block the corrected command
        raise
    try:
        _write_run_dir(run_dir, cfg, name, url, run_id)
    except BaseException:
        db.delete_run()  # the run is ours: without its run directory it could never be resumed
        raise
    return Run(run_dir, cfg, db, name, run_dir / "config.yaml", space)


def _run_storage(run_dir: Path, info: dict, storage: Optional[str], env: Optional[str]) -> str:
    """The URL of a run's database: its own (run.json), or an explicit ``storage`` (said in the log).
    ``env`` ($EVOMERGE_STORAGE) only supplies the password of the run's own external storage."""
    own = info["storage"]
    if info.get("storage_in_run_dir"):
        own = sqlite_url((run_dir / own).resolve())
    elif RUN_ID_KEY not in info and _local_database(run_dir, own) is None and (run_dir / "run.db").exists():
        # a run directory of an older evomerge (an absolute SQLite URL), since moved or copied
        log.warning("%s/run.json names %s, but the directory holds its own run.db (moved or copied): using that",
                    run_dir, own)
        own = sqlite_url((run_dir / "run.db").resolve())
    if storage is not None:
        if redact(storage) != redact(own):
            log.warning("--storage %s replaces the run's own storage %s", redact(storage), redact(own))
        return storage
    if env is not None and redact(env) == redact(own) and info.get("storage_has_password"):
        return env
    if env is not None and redact(env) != redact(own):
        log.warning("EVOMERGE_STORAGE (%s) is not this run's storage: using the run's own, %s (pass --storage to "
                    "use another)", redact(env), redact(own))
    if info.get("storage_has_password"):
        raise RunError(f"{run_dir}: the run's storage {own} needs a password; pass --storage with the full URL "
                       "(or set EVOMERGE_STORAGE to it)")
    return own


def _check_identity(db: RunDB, info: dict, run_dir: Path) -> None:
    """Refuse a database that holds a run of the same name but not this run."""
    mine, theirs = info.get(RUN_ID_KEY), db.metadata.get().get(RUN_ID_KEY)
    if mine is not None and theirs != mine:
        raise RunError(f"storage {redact(db.url)}: its run {db.name!r} is not the run of {run_dir} (run id "
                       f"{theirs or 'none'}, not {mine}): pass that run's own --storage")


def open_run(run_dir: str | Path, storage: Optional[str] = None, env: Optional[str] = None,
             space: bool = True) -> Run:
    """An existing run directory's run. ``storage`` replaces the run's own storage (a database
    of the same run, see :func:`_run_storage`); ``env`` is ``$EVOMERGE_STORAGE``. ``space``:
    build and check its search space now (False: when first used; ``status`` never does)."""
    run_dir = Path(run_dir)
    info_path = run_dir / "run.json"
    if not info_path.exists():
        raise RunError(f"{run_dir}: not a run directory (no run.json); start one with: evomerge search CONFIG.yaml")
    info = json.loads(info_path.read_text())
    url = _run_storage(run_dir, info, storage, env)
    cfg = RunConfig.load(run_dir / "config.yaml")
    db = RunDB(url, info["name"], create=False, **_heartbeat_options(cfg))
    _check_identity(db, info, run_dir)
    run = Run(run_dir, cfg, db, info["name"], run_dir / "config.yaml")
    if space:
        run.space  # noqa: B018 - built and checked now, before anything is written
    return run


def join_run(target: str | Path, storage: Optional[str] = None, run_dir: Optional[str | Path] = None,
             env: Optional[str] = None) -> Run:
    """A worker's view of a run: an existing run directory, or a config file (the run named in it
    is joined in ``storage`` (default ``env``), or created there if no worker has yet; ``run_dir``,
    by default runs/NAME, keeps this host's copy of the config and the logs)."""
    target = Path(target)
    if target.is_dir():
        return open_run(target, storage, env)
    cfg, space, objectives, name, run_dir, url = _new_run_place(target, run_dir, storage or env)
    info_path = run_dir / "run.json"
    if not info_path.exists():
        _claim_run_dir(run_dir)
    db = RunDB.join(url, name, objectives=objectives, **_heartbeat_options(cfg))
    with db.lock():
        run_id = db.metadata.get().get(RUN_ID_KEY)
        if run_id is None:
            run_id = uuid.uuid4().hex
            db.metadata.set({RUN_ID_KEY: run_id})
    if info_path.exists():
        _check_identity(db, json.loads(info_path.read_text()), run_dir)
    else:
        _write_run_dir(run_dir, cfg, name, url, run_id)
    return Run(run_dir, cfg, db, name, target, space)


def default_values(run: Run) -> dict[str, float]:
    """Parameter values of the method's default recipe, with the config's default_parameters."""
    from evomerge.search.space import method_defaults

    return method_defaults(run.cfg.merge_method, len(run.cfg.models.experts)) | dict(run.cfg.default_parameters)


def reference_recipes(run: Run) -> dict:
    """The method's default recipe, with the config's default_parameters and fixed_parameters; a
    layer path has none (its references are the parents)."""
    from evomerge.search.path_space import PathSpace

    if isinstance(run.space, PathSpace):
        return {}
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
    from evomerge.search.path_space import PathSpace

    if isinstance(run.space, PathSpace):  # from the best parent so far: its reference row's fitness
        return run.space.x0({r.name.removeprefix("parent:"): r.fitness for r in run.db.references()})
    values = default_values(run)
    return run.space.default_vector({c.param: values.get(c.param, 0.5 * (c.low + c.high))
                                     for c in run.space.coordinates})


BUDGET_KEY = "budget"  # run metadata: the budget last given on a command line (resume, worker)


def run_budget(run: Run) -> dict:
    """The run's budget: its config's, replaced key by key by the last one given on a command line."""
    given = run.db.metadata.get().get(BUDGET_KEY)
    return run.cfg.budget.model_dump(exclude_none=True) | (given if isinstance(given, dict) else {})
