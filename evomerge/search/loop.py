"""A search run: its directory, its references, its loop, its resume.

A run directory holds ``config.yaml`` (the resolved config: absolute paths), ``run.json`` (the
run's name, its id and its storage), ``run.db`` (the SQLite run database unless ``--storage``
points elsewhere), ``search.log`` and the plots ``evomerge status`` writes.

A run directory is self-contained: ``run.json`` names a database inside it by its path relative
to the directory, so a copied or moved run opens its own ``run.db``. An external storage
(PostgreSQL, or a SQLite file elsewhere) is named by its URL, without any password. Either way
the database must hold the run of the same id: a database of another run is refused. An
explicit ``--storage`` replaces the run's own storage, saying so; ``$EVOMERGE_STORAGE`` never
does (it only supplies the password of the run's own storage).

The loop: under the run's lock, reclaim candidates whose worker died and ask the driver (which
claims a candidate); then decode the vector into a recipe, apply it into the live model, score
it (a heartbeat thread keeps the claim alive), and under the lock again tell the driver (which
records it). Any number of processes may run this loop on one run database (``evomerge
worker``): there is no generation barrier, and the budget counts the candidates of all of them.
SIGINT / SIGTERM finish the candidate in flight, save the state and print how to resume; a
second signal abandons the candidate (it is redone).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import signal
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Iterator, Optional

from evomerge.config import RunConfig, run_name_problem
from evomerge.errors import EvomergeError
from evomerge.fitness.base import preflight
from evomerge.fitness.suite import Suite, SuiteError
from evomerge.machine import ThreadFit
from evomerge.procs import MACHINE
from evomerge.merging.model_io import hub_commits, resolve_model_path
from evomerge.search.evaluator import Evaluation, Evaluator
from evomerge.search.fingerprint import HASHES_FILE, RESUMABLE, FileHashes, compare, fingerprint
from evomerge.search.progress import Progress
from evomerge.search.racing import Racer
from evomerge.rundb.leases import Owner
from evomerge.rundb.secrets import has_secret, redact
from evomerge.rundb.store import RunDB, best_row, sqlite_path, sqlite_url
from evomerge.rundb.trackers import Trackers, check_installed
from evomerge.search.claims import DriverClaims, make_driver
from evomerge.search.registry import DRIVERS
from evomerge.search.path_space import PathSpace
from evomerge.search.space import SearchSpace, checked_space, method_defaults, space_for

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
    space: SearchSpace | PathSpace
    name: str


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
    _dry_score(cfg, suite)


def _dry_score(cfg: RunConfig, suite: Suite) -> None:
    """Score the reference model on the first search item of each task with the run's backend and
    options: what the backend rejects (an lm-eval option, a prompt too long for the engine) stops
    the run before it exists, not every candidate. A vLLM engine started here serves the run."""
    ref = str(resolve_model_path(cfg.reference_model))
    ev = Evaluator(cfg, suite.subset({t.name: [0] for t in suite.tasks})).score_model_dir(ref)["search"]
    if ev.error:
        raise SuiteError(f"fitness: the {cfg.fitness.backend} backend failed to score {ref} on one item of each "
                         f"task, so every candidate would fail: {ev.error}")


def _new_run_place(config_path: str | Path, run_dir: Optional[str | Path], storage: Optional[str]):
    """A config checked against its models, with the run's name, directory (created; default
    runs/NAME) and storage URL (default: SQLite in that directory), and its objectives' names."""
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
    return Run(run_dir, cfg, db, space, name)


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


def open_run(run_dir: str | Path, storage: Optional[str] = None, env: Optional[str] = None) -> Run:
    """An existing run directory's run. ``storage`` replaces the run's own storage (a database
    of the same run, see :func:`_run_storage`); ``env`` is ``$EVOMERGE_STORAGE``."""
    run_dir = Path(run_dir)
    info_path = run_dir / "run.json"
    if not info_path.exists():
        raise RunError(f"{run_dir}: not a run directory (no run.json); start one with: evomerge search CONFIG.yaml")
    info = json.loads(info_path.read_text())
    url = _run_storage(run_dir, info, storage, env)
    cfg = RunConfig.load(run_dir / "config.yaml")
    db = RunDB(url, info["name"], create=False, **_heartbeat_options(cfg))
    _check_identity(db, info, run_dir)
    return _checked_run(run_dir, cfg, space_for(cfg), db, info["name"], run_dir / "config.yaml")


def _checked_run(run_dir: Path, cfg: RunConfig, space: SearchSpace, db: RunDB, name: str, where: Path) -> Run:
    if db.metadata.get().get("coordinates") not in (None, space.names):
        raise RunError(f"{where}: its search space no longer matches the run database's coordinates; use "
                       "the config the run was started with")
    return Run(run_dir, cfg, db, space, name)


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
    return _checked_run(run_dir, cfg, space, db, name, target)


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
        self._event = threading.Event()
        self._old: dict = {}

    def wait(self, seconds: float) -> None:
        """Sleep, waking up early on a signal."""
        self._event.wait(seconds)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self._event.set()
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
    """The method's default recipe, with the config's default_parameters and fixed_parameters; a
    layer path has none (its references are the parents)."""
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
    if isinstance(run.space, PathSpace):  # from the best parent so far: its reference row's fitness
        return run.space.x0({r.name.removeprefix("parent:"): r.fitness for r in run.db.references()})
    values = default_values(run)
    return run.space.default_vector({c.param: values.get(c.param, 0.5 * (c.low + c.high))
                                     for c in run.space.coordinates})


def run_search(run: Run, *, resume: bool = False, max_candidates: Optional[int] = None,
               max_minutes: Optional[float] = None, live: Optional[bool] = None, worker: bool = False,
               threads: Optional[int] = None) -> dict:
    """Run (or continue) the search until the budget is spent or a signal stops it. ``worker``:
    one of several processes on this run (its own sampler seed; the first worker to get there
    scores the references). ``threads``: torch's intra-op threads; by default they follow the
    cores other processes leave free (:class:`~evomerge.machine.ThreadFit`)."""
    with _file_log(run.run_dir / "search.log"):
        fit = ThreadFit(threads)
        log.info("%s", fit.describe())
        return _Search(run, resume, max_candidates, max_minutes, live, worker, fit).loop()


class _Heartbeat:
    """Records the heartbeat of the candidate in flight every ``interval`` seconds, from a thread."""

    def __init__(self, db: RunDB, interval: float):
        self.db = db
        self.interval = interval
        self.trial_id: Optional[int] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="evomerge-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            trial_id = self.trial_id
            if trial_id is not None:
                try:
                    self.db.leases.heartbeat(trial_id)
                except Exception as e:  # noqa: BLE001 - a lost beat is retried; the database may come back
                    log.warning("heartbeat for trial %d failed: %s", trial_id, e)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def same_failure(errors: list[Optional[str]], n: int) -> bool:
    """Whether the first ``n`` of a session's candidates (``errors``, in order, None where one was
    scored) all failed with one error: the cause is the run's, not the candidates'."""
    return n > 0 and len(errors) == n and errors[0] is not None and len(set(errors)) == 1


BUDGET_KEY = "budget"  # run metadata: the budget last given on a command line (resume, worker)


def run_budget(run: Run) -> dict:
    """The run's budget: its config's, replaced key by key by the last one given on a command line."""
    given = run.db.metadata.get().get(BUDGET_KEY)
    return run.cfg.budget.model_dump(exclude_none=True) | (given if isinstance(given, dict) else {})


class _Search:
    def __init__(self, run: Run, resume: bool, max_candidates: Optional[int], max_minutes: Optional[float],
                 live: Optional[bool], worker: bool, threads: ThreadFit):
        self.run = run
        self.worker = worker
        self.threads = threads
        cfg = run.cfg
        budget = run_budget(run)
        given = {k: v for k, v in (("max_candidates", max_candidates), ("max_minutes", max_minutes)) if v is not None}
        if given:
            budget |= given
            run.db.metadata.set({BUDGET_KEY: budget})  # the run's budget from now on, for status and every worker
        self.max_candidates = budget.get("max_candidates")
        minutes = budget.get("max_minutes")
        self.max_seconds = minutes * 60 if minutes is not None else None
        self.live = live
        self.suite = Suite.resolve(cfg.fitness.suite)
        self.evaluator = Evaluator(cfg, self.suite)
        db = run.db
        if worker and not db.shareable:
            raise RunError(f"storage {redact(db.url)}: several workers need a SQLite file (one host) or PostgreSQL")
        items = self.evaluator.items()
        hashes = FileHashes(run.run_dir / HASHES_FILE)
        inputs = fingerprint(cfg, self.suite, hashes)  # outside the run's lock: hashing new weights takes a while
        hashes.save()
        with db.lock():
            self._retire_missing()
            meta = db.metadata.get()
            if "items" in meta and meta["items"] != items:
                raise RunError(f"suite {self.suite.name}: its search subsample differs from the one the run started "
                               "with (were the data files or the suite changed?); candidates would not be comparable")
            changed = compare(meta.get("fingerprint"), cfg, inputs)
            if changed:
                raise RunError(f"{run.run_dir}: the run's inputs changed since it started: {'; '.join(changed)}. "
                               "Candidates scored before and after would not be comparable: restore them, or "
                               "start a new run (what may change on resume: "
                               f"{', '.join(k for k in RESUMABLE if k != 'name')})")
            if "fingerprint" in meta and "version" not in meta["fingerprint"]:
                db.metadata.set({"fingerprint": inputs})  # an older run's: the full one from now on
            if "config" not in meta:
                db.metadata.set({"config": cfg.to_dict(), "coordinates": run.space.names, "items": items,
                                 "fingerprint": inputs, "objectives": self.suite.objective_names,
                                 "versions": versions(), "suite": self.suite.name,
                                 "started": _dt.datetime.now().isoformat(timespec="seconds")})
        self.items = items
        estimate = cfg.fitness.estimate
        self.racer = Racer(self.evaluator, self.suite, estimate, cfg.seed) if estimate else None
        if not worker:
            self._say_who_else_runs()
        me = Owner.this_process(device=cfg.device)
        mode = "worker" if worker else ("resume" if resume else "search")
        self.slot = db.registry.register(me.to_dict() | {"mode": mode})
        self.owner = replace(me, slot=self.slot)
        self.tag = f"w{self.slot} " if worker else ""
        self.trackers = Trackers.open(cfg, run.run_dir, run.name, db, run_identity(run))

    def _retire_missing(self) -> None:
        """Candidates deleted from the run database by hand keep their numbers: none is given again."""
        gone = self.run.db.leases.retire_missing()
        if gone:
            log.warning("run database: candidate(s) %s were deleted from it; their numbers are not given again",
                        ", ".join(f"#{n}" for n in gone))

    def _say_who_else_runs(self) -> None:
        """A search or resume started beside a live process of the same run becomes a second
        worker: say so, naming it."""
        others = []
        for w in self.run.db.registry.all():
            other = Owner(w.get("host", "?"), w.get("machine", ""), int(w.get("pid", 0)), w.get("started"))
            if "ended" in w or other.gone():
                continue
            where = "this host" if other.machine == MACHINE else f"{other.host} (unless it was killed)"
            others.append(f"process {other.pid} on {where}")
        if others:
            log.warning("this run is already being searched by %s: this process joins it as another worker, and "
                        "they share its budget (stop the other to run alone)", ", ".join(others))

    def _record(self, ev: Evaluation, recipe=None) -> dict:
        return ev.record(self.items, recipe, item_values=self.racer is not None)

    def _references_are_mine(self) -> bool:
        """One process scores the references: a single search, or the first worker to ask."""
        if not self.worker:
            return True
        db = self.run.db
        with db.lock():
            by = db.metadata.get().get("references_by")
            if by is None:
                db.metadata.set({"references_by": self.slot})
                return True
            return by == self.slot

    def references(self) -> None:
        run, db = self.run, self.run.db
        if not run.cfg.references or not self._references_are_mine():
            return
        done = {r.name for r in db.references()}

        def add(name: str, ev: Evaluation, record: dict) -> None:
            db.add_reference(name, record, ev.values)
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
        run, db, cfg = self.run, self.run.db, self.run.cfg
        t_setup = time.perf_counter()
        self.references()
        if self.evaluator.engine is None:
            self.evaluator.prepare(next(iter(reference_recipes(run).values()), None) or run.space.decode(x0_vector(run)))
        if self.racer is not None:
            self.racer.refresh(db, force=True)
        driver = DriverClaims(db, make_driver(db, run.space.names, cfg.driver, cfg.seed, x0_vector(run),
                                              self.slot, solo=not self.worker), self.owner)
        # a lost candidate is re-queued and redone; one Optuna process instead re-proposes it from
        # its restored sampler (a re-queued trial would skip the draws the sampler made for it)
        retry = self.worker or DRIVERS[cfg.driver.name].requeue
        rows = db.scores()
        done = sum(r.counted for r in rows)
        elapsed0, session0 = db.metadata.elapsed(), time.perf_counter()
        setup_s = session0 - t_setup

        def elapsed() -> float:  # search seconds of the run (see RunDB.save_elapsed)
            return elapsed0 + time.perf_counter() - session0

        progress = Progress(done, self.max_candidates, self.max_seconds, elapsed0, live=self.live)
        best = best_row(rows)
        if best is not None:
            progress.set_best(best.fitness, best.number)
        stopped_by = "budget"
        current = None
        mine = busy = waited = 0.0
        own = dropped = 0
        errors: list[Optional[str]] = []  # this session's candidates' errors (None: scored)
        last_save = time.perf_counter()
        heartbeat = _Heartbeat(db, cfg.heartbeat.interval_s)
        poll = min(1.0, cfg.heartbeat.interval_s / 2)
        with _Signals() as signals:
            try:
                while True:
                    if self.max_seconds is not None and elapsed() >= self.max_seconds:
                        break
                    if signals.requested:
                        stopped_by = "signal"
                        break
                    with db.lock():
                        self._retire_missing()
                        gone = db.leases.reclaim(retry=retry)
                        if gone:
                            log.info("%scandidate(s) %s lost their worker; they are redone", self.tag,
                                     ", ".join(f"#{n}" for n in gone))
                        done, running = db.leases.counts()
                        full = self.max_candidates is not None and done + running >= self.max_candidates
                        current = None if full else driver.ask()
                    if current is None:
                        if self.max_candidates is not None and done >= self.max_candidates:
                            break
                        t0 = time.perf_counter()  # the budget is out, but a claimed candidate may yet be redone
                        signals.wait(poll)
                        waited += time.perf_counter() - t0
                        continue
                    heartbeat.trial_id = current.trial_id
                    self.threads.check()
                    recipe = run.space.decode(current.vector)
                    if self.racer is not None:
                        self.racer.refresh(db)
                        ev = self.racer.score_recipe(recipe)
                    else:
                        ev = self.evaluator.score_recipe(recipe)
                    busy += ev.merge_seconds + ev.eval_seconds
                    record = self._record(ev, recipe)
                    with db.lock():
                        ok = driver.tell(current, ev.values, record)
                    heartbeat.trial_id = None
                    number, trial_id, recipe_vector, current = current.number, current.trial_id, current.vector, None
                    if not ok:
                        dropped += 1
                        log.warning("%scandidate #%d was reclaimed while it ran (no heartbeat for %d s); its "
                                    "result is dropped, another worker redoes it", self.tag, number,
                                    cfg.heartbeat.grace_s)
                        continue
                    own += 1
                    errors.append(ev.error)
                    if same_failure(errors, cfg.fail_fast):
                        stopped_by = f"failures: the first {cfg.fail_fast} candidates all failed with: {ev.error}"
                        log.error("%sthe first %d candidates of this session all failed with the same error, so "
                                  "the search stops: %s. Fix the cause, then: evomerge resume %s (fail_fast in the "
                                  "config sets how many; 0 never stops)", self.tag, cfg.fail_fast, ev.error,
                                  run.run_dir)
                        break
                    self.trackers.candidate(number, record, dict(zip(run.space.names, recipe_vector)))
                    if self.racer is not None:
                        self.racer.add(trial_id, number, record)
                    progress.update(number, ev.fitness, ev.error, ev.merge_seconds, ev.eval_seconds,
                                    tag=self.tag, fidelity=ev.fidelity)
                    if time.perf_counter() - last_save > 5:
                        db.metadata.save_elapsed(elapsed())
                        last_save = time.perf_counter()
            except KeyboardInterrupt:
                stopped_by = "signal (candidate abandoned)"
                if current is not None:
                    db.leases.abandon(current.trial_id)
            finally:
                heartbeat.close()
                progress.close()
                self.trackers.close()
                mine = time.perf_counter() - session0
                db.metadata.save_elapsed(elapsed())
                done = db.leases.counts()[0]
        summary = {"evaluated": done, "stopped_by": stopped_by, "elapsed_s": db.metadata.elapsed(), "slot": self.slot,
                   "own": own, "dropped": dropped, "wall_s": round(mine, 3), "busy_s": round(busy, 3),
                   "waited_s": round(waited, 3), "setup_s": round(setup_s, 3), "threads": self.threads.threads,
                   "idle_share": round(1 - busy / mine, 4) if mine > 0 else None}
        db.registry.update(self.slot, {k: v for k, v in summary.items() if k not in ("evaluated", "slot")}
                         | {"ended": _dt.datetime.now().isoformat(timespec="seconds")})
        if stopped_by.startswith("signal"):
            print(f"stopped after {done} candidate(s); continue with: evomerge resume {run.run_dir}", file=sys.stderr)
        return summary
