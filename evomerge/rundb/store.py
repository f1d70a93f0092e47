"""The run database: an Optuna storage (SQLite in the run directory, or any SQLAlchemy URL).

Two studies per run, so ``optuna-dashboard`` shows both and samplers only see real candidates:

- ``NAME``: every candidate, one trial each. Params are the space's coordinates (FloatDistribution
  over [0, 1]); the user attr ``result`` holds its :class:`~evomerge.fitness.record.CandidateRecord`
  as JSON: the decoded recipe, per-task metrics, per-item correctness, merge and evaluation
  seconds, the error if it failed, and the host.
- ``NAME.references``: the reference rows (each parent alone, the method's default recipe).

Many processes may share one run database (``evomerge worker``): SQLite on one host, PostgreSQL
across hosts. :class:`RunDB` opens it and hands out its parts, one per role: the run-wide lock
(:mod:`.lock`), candidate leases (:mod:`.leases`), the worker registry (:mod:`.registry`) and run
metadata with the driver's state (:mod:`.meta`); :mod:`.optuna_sql` is the one module that writes
SQL against Optuna's tables.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Optional, Sequence

import optuna
import sqlalchemy as sa
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState, create_trial

from evomerge.errors import EvomergeError, first_line
from evomerge.fitness.record import CandidateRecord
from evomerge.rundb.leases import HOST, Leases
from evomerge.rundb.lock import RunLock
from evomerge.rundb.meta import RunMeta
from evomerge.rundb.optuna_sql import RETIRED_KEY, OptunaTables, row_state
from evomerge.rundb.registry import WorkerRegistry
from evomerge.rundb.secrets import redact, scrub

optuna.logging.set_verbosity(optuna.logging.WARNING)


class RunDBError(EvomergeError):
    """The run database is missing, or does not hold the run asked for."""


def sqlite_url(path) -> str:
    return f"sqlite:///{path}"


def sqlite_path(url: str) -> Optional[str]:
    """The file of a SQLite database URL; None for another database, an in-memory one or a URL
    that does not parse."""
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        return None
    db = parsed.database
    return db if parsed.get_backend_name() == "sqlite" and db and db != ":memory:" else None


def sqlite_damage(url: str) -> Optional[str]:
    """For a SQLite URL whose file SQLite's own check finds damaged: what to tell the user (the
    file, and how to recover what it holds); None otherwise."""
    import sqlite3

    path = sqlite_path(url)
    if path is None or not os.path.isfile(path):
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)) as con:
            verdict = con.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.DatabaseError as e:
        verdict = str(e)
    if verdict == "ok":
        return None
    return (f"run database {path} is damaged (SQLite: {first_line(verdict)}). Keep a copy of it and of the "
            f"{os.path.basename(path)}-wal file beside it, then recover what it holds with: sqlite3 {path} .recover "
            f"| sqlite3 {path}.recovered (and replace it with that file), or start a new run")


def _creation_race(e: Exception) -> bool:
    """Another process created the same tables at the same moment (SQLite, PostgreSQL)."""
    text = str(e).lower()
    return isinstance(e, sa.exc.SQLAlchemyError) and any(
        k in text for k in ("already exists", "duplicate", "unique constraint"))


def open_storage(url: str, heartbeat_s: Optional[int] = None, grace_s: Optional[int] = None) -> RDBStorage:
    """Optuna's storage at ``url``; safe for any number of processes opening (and creating) it at once."""
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}
    for attempt in range(8):
        try:
            with warnings.catch_warnings():  # heartbeat_interval is "experimental" in Optuna
                warnings.simplefilter("ignore")
                storage = RDBStorage(url, heartbeat_interval=heartbeat_s, grace_period=grace_s, **kwargs)
            if url.startswith("sqlite"):
                _sqlite_wal(storage.engine)
            return storage
        except Exception as e:  # SQLAlchemy raises many kinds; name the URL
            if _creation_race(e) and attempt < 7:
                time.sleep(0.05 * (attempt + 1))  # the other process finishes creating the tables
                continue
            damage = sqlite_damage(url)
            if damage:
                raise RunDBError(damage) from None
            raise RunDBError(f"storage {redact(url)}: cannot open ({type(e).__name__}: "
                             f"{scrub(first_line(e), url)})") from None
    raise AssertionError("unreachable")


def _sqlite_wal(engine) -> None:
    """Write-ahead log: readers (status, other workers) never wait for a writer, and a commit
    needs no fsync (synchronous=NORMAL). A killed process loses nothing it committed; a power
    cut can lose the last commits, never the database's consistency."""

    def on_connect(dbapi_conn, _record) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    sa.event.listen(engine, "connect", on_connect)
    engine.dispose()  # connections opened while Optuna created its tables reconnect with these settings


COUNTED = ("complete", "failed")  # the states that count against the budget (failed on its own, not interrupted)


@dataclass
class Row:
    """A candidate or reference row, as status and export read it."""
    number: int
    state: str  # complete, failed, interrupted, running, waiting
    fitness: Optional[float]  # the suite's fitness (its weighted task mean)
    params: dict[str, float]
    record: CandidateRecord = field(default_factory=CandidateRecord)
    name: str = ""  # reference rows: parent:LABEL or default
    values: Optional[list[float]] = None  # the objectives (one: the fitness)

    @property
    def recipe(self) -> Optional[dict]:
        return self.record.recipe

    @property
    def tasks(self) -> dict[str, float]:
        return self.record.task_values

    @property
    def error(self) -> Optional[str]:
        return self.record.error

    trial_id: int = -1

    @property
    def counted(self) -> bool:
        return self.state in COUNTED

    @property
    def full(self) -> bool:
        """Whether it was scored on every search item."""
        return self.record.is_full()


@dataclass(frozen=True)
class Score:
    """A candidate without its record: what listings read for every row of a run (status, plots,
    export's choice, the loop's start), from one light query whatever the run's size.
    :meth:`RunDB.row` reads one candidate's whole :class:`Row`."""
    trial_id: int
    number: int
    state: str  # as Row.state
    fitness: Optional[float]
    values: Optional[list[float]]
    summary: dict  # CandidateRecord.summary of its record ({} without one)

    @property
    def counted(self) -> bool:
        return self.state in COUNTED

    @property
    def full(self) -> bool:
        return self.summary.get("full", True)


class RunDB:
    """One run in a storage, with its parts: ``lock()``, ``leases``, ``registry``, ``metadata``."""

    def __init__(self, url: str, name: str, *, create: bool, objectives: Sequence[str] = ("fitness",),
                 heartbeat_s: Optional[int] = None, grace_s: Optional[int] = None):
        """``objectives``: a new run's objective names (what optuna-dashboard labels its plots with)."""
        self.url = url
        self.name = name
        self.storage = open_storage(url, heartbeat_s, grace_s)
        exists = name in {s.study_name for s in self.storage.get_all_studies()}
        if create and exists:
            raise RunDBError(f"storage {redact(url)} already holds a run named {name!r}; resume it with "
                             f"'evomerge resume', or pick another name")
        if not create and not exists:
            raise RunDBError(f"storage {redact(url)} holds no run named {name!r}")
        if create:
            try:
                study = optuna.create_study(storage=self.storage, study_name=name,
                                            directions=["maximize"] * len(objectives))
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    study.set_metric_names(list(objectives))
            except optuna.exceptions.DuplicatedStudyError:
                raise RunDBError(f"storage {redact(url)}: another process has just created a run named {name!r}; "
                                 "resume it with 'evomerge resume', or pick another name") from None
        self._study_id = self.storage.get_study_id_from_name(name)
        self.n_objectives = len(self.storage.get_study_directions(self._study_id))
        # created second, so a process joining right after the first may not see it yet
        optuna.create_study(storage=self.storage, study_name=self.references_name, load_if_exists=True,
                            directions=["maximize"] * self.n_objectives)
        self._ref_id = self.storage.get_study_id_from_name(self.references_name)
        self.host = HOST
        tables = OptunaTables(self.storage.engine, self._study_id)
        self._lock = RunLock(self.storage.engine, name, self._sqlite_file)
        self.leases = Leases(self.storage, tables, grace_s or (2 * heartbeat_s if heartbeat_s else None))
        self.registry = WorkerRegistry(self.storage, self._study_id, self._lock)
        self.metadata = RunMeta(self.storage, tables, self._lock)

    @classmethod
    def join(cls, url: str, name: str, **kwargs) -> "RunDB":
        """Open the run, creating it if no process has yet (for workers started together)."""
        try:
            return cls(url, name, create=False, **kwargs)
        except RunDBError:
            pass
        try:
            return cls(url, name, create=True, **kwargs)
        except (RunDBError, optuna.exceptions.DuplicatedStudyError):
            return cls(url, name, create=False, **kwargs)  # another worker created it meanwhile

    @property
    def dialect(self) -> str:
        return self.storage.engine.dialect.name

    @property
    def _sqlite_file(self) -> Optional[str]:
        return sqlite_path(self.url)

    @property
    def shareable(self) -> bool:
        """Whether several processes can work on this run: a SQLite file (one host) or PostgreSQL."""
        return self.dialect == "postgresql" or self._sqlite_file is not None

    @contextmanager
    def lock(self) -> Iterator[None]:
        """The run-wide lock (re-entrant): claims, tells and budget checks of every process."""
        with self._lock.held():
            yield

    def delete_run(self) -> None:
        """Remove this run's studies (a run whose start failed) and close."""
        for study in (self.name, self.references_name):
            optuna.delete_study(study_name=study, storage=self.storage)
        self.close()

    def close(self) -> None:
        self._lock.close()
        self.storage.engine.dispose()

    @property
    def references_name(self) -> str:
        return f"{self.name}.references"

    def study(self, sampler: Optional[optuna.samplers.BaseSampler] = None) -> optuna.Study:
        return optuna.load_study(study_name=self.name, storage=self.storage, sampler=sampler)

    def trials(self, states: Optional[Sequence[TrialState]] = None) -> list[FrozenTrial]:
        return self.storage.get_all_trials(self._study_id, deepcopy=False,
                                           states=tuple(states) if states else None)

    def rows(self) -> list[Row]:
        """The candidates; rows that only hold a deleted candidate's number are left out."""
        return [_row(t) for t in self.trials() if not t.user_attrs.get(RETIRED_KEY)]

    def scores(self) -> list[Score]:
        """Every candidate as a :class:`Score`, in the order they were claimed (retired rows left
        out). Rows written before summaries existed have theirs worked out from their records."""
        listing = [r for r in self.leases.tables.listing() if not r["retired"]]
        old = self.leases.tables.results([r["trial_id"] for r in listing if r["has_result"] and r["summary"] is None])
        out = []
        for r in listing:
            summary = r["summary"]
            if summary is None:
                stored = old.get(r["trial_id"])
                summary = CandidateRecord.from_json(stored).summary(r["values"]) if stored is not None else {}
            out.append(Score(r["trial_id"], r["number"], row_state(r["state"], r["has_result"]),
                             summary.get("fitness") if r["values"] else None, r["values"], summary))
        return out

    def row(self, trial_id: int) -> Row:
        """One candidate with its record."""
        return _row(self.storage.get_trial(trial_id))

    def add_reference(self, name: str, record: CandidateRecord, values: Optional[Sequence[float]]) -> None:
        state = TrialState.COMPLETE if values is not None else TrialState.FAIL
        trial = create_trial(state=state, values=None if values is None else list(values),
                             user_attrs={"name": name, "result": replace(record, host=self.host).to_json()})
        self.storage.create_new_trial(self._ref_id, template_trial=trial)

    def references(self) -> list[Row]:
        return [_row(t) for t in self.storage.get_all_trials(self._ref_id, deepcopy=False)]


def _row(t: FrozenTrial) -> Row:
    stored = t.user_attrs.get("result")
    record = CandidateRecord.from_json(stored)
    values = list(t.values) if t.values else None
    return Row(t.number, row_state(t.state.name, bool(stored)), record.fitness_given(values), dict(t.params), record,
               t.user_attrs.get("name", ""), values, t._trial_id)


def best_row(rows: Sequence[Row | Score]) -> Optional[Row | Score]:
    """The row with the highest fitness (the first one on ties) among those scored on every search
    item, or among all when none was; None when no row has a fitness. An estimated row can lead the
    candidates only when a reference stopped it, and its estimate is the less certain figure."""
    scored = [r for r in rows if r.fitness is not None]
    full = [r for r in scored if r.full]
    return max(full or scored, key=lambda r: r.fitness, default=None)


def pareto_front(rows: Sequence[Row | Score]) -> list[Row | Score]:
    """The completed rows no other completed row dominates (every objective maximized): at least
    as good on all objectives and better on one. Ordered by the first objective, best first."""
    import numpy as np

    done = [r for r in rows if r.state == "complete" and r.values]
    if not done:
        return []
    v = np.array([r.values for r in done], dtype=float)
    keep = []
    for i in range(len(done)):
        dominated = np.any(np.all(v >= v[i], axis=1) & np.any(v > v[i], axis=1))
        if not dominated:
            keep.append(done[i])
    return sorted(keep, key=lambda r: [-x for x in r.values])
