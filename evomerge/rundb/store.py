"""The run database: an Optuna storage (SQLite in the run directory, or any SQLAlchemy URL).

Two studies per run, so ``optuna-dashboard`` shows both and samplers only see real candidates:

- ``NAME``: every candidate, one trial each. Params are the space's coordinates (FloatDistribution
  over [0, 1]); the user attr ``result`` holds the decoded recipe, per-task metrics, per-item
  correctness, merge and evaluation seconds, the error if it failed, and the host.
- ``NAME.references``: the reference rows (each parent alone, the method's default recipe).

Run-level facts (config, space coordinates, subsample ids, versions) are the search study's user
attrs; driver state (pycma or the Optuna sampler, pickled after every tell) is a system attr.
Many processes may share one run database (``evomerge worker``): SQLite on one host, PostgreSQL
across hosts. Each candidate is a RUNNING trial from the moment it is claimed; its worker records
a heartbeat for it (Optuna's ``trial_heartbeats``) and finishes it in one transaction that only
succeeds while it is still RUNNING. A candidate whose heartbeat is older than the grace period, or
whose process is gone from this machine, is failed without a result ("interrupted"), does not
count against the budget, and is redone. Claims, tells and budget checks happen under a run-wide
lock (a file lock next to a SQLite file, a PostgreSQL advisory lock), so no candidate is proposed
or counted twice.
"""

from __future__ import annotations

import base64
import datetime
import fcntl
import hashlib
import json
import math
import os
import pickle
import socket
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import optuna
from optuna.distributions import FloatDistribution, distribution_to_json
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState, create_trial

from evomerge.errors import EvomergeError

optuna.logging.set_verbosity(optuna.logging.WARNING)

UNIT = FloatDistribution(0.0, 1.0)
UNIT_JSON = distribution_to_json(UNIT)
STATE_KEY = "evomerge:driver_state"
ELAPSED_KEY = "evomerge:elapsed"
WORKERS_KEY = "evomerge:workers"
OWNER_KEY = "worker"  # trial user attr: who evaluates it



def _state_blob(state: Any) -> str:
    return base64.b64encode(pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)).decode()

class RunDBError(EvomergeError):
    """The run database is missing, or does not hold the run asked for."""


def sqlite_url(path) -> str:
    return f"sqlite:///{path}"


def open_storage(url: str, heartbeat_s: Optional[int] = None, grace_s: Optional[int] = None) -> RDBStorage:
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}
    try:
        with warnings.catch_warnings():  # heartbeat_interval is "experimental" in Optuna
            warnings.simplefilter("ignore")
            storage = RDBStorage(url, heartbeat_interval=heartbeat_s, grace_period=grace_s, **kwargs)
        if url.startswith("sqlite"):
            _sqlite_wal(storage.engine)
        return storage
    except Exception as e:  # SQLAlchemy raises many kinds; name the URL
        raise RunDBError(f"storage {redact(url)}: cannot open ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def _sqlite_wal(engine) -> None:
    """Write-ahead log: readers (status, other workers) never wait for a writer, and a commit
    needs no fsync (synchronous=NORMAL). A killed process loses nothing it committed; a power
    cut can lose the last commits, never the database's consistency."""
    import sqlalchemy as sa

    def on_connect(dbapi_conn, _record) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    sa.event.listen(engine, "connect", on_connect)
    engine.dispose()  # connections opened while Optuna created its tables reconnect with these settings


def redact(url: str) -> str:
    """The URL without its password."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}"
    return url


@dataclass
class Row:
    """A candidate or reference row, as status and export read it."""
    number: int
    state: str  # complete, failed, interrupted, running, waiting
    fitness: Optional[float]  # the suite's fitness (its weighted task mean)
    params: dict[str, float]
    recipe: Optional[dict]
    result: dict = field(default_factory=dict)
    name: str = ""  # reference rows: parent:LABEL or default
    values: Optional[list[float]] = None  # the objectives (one: the fitness)

    @property
    def tasks(self) -> dict[str, float]:
        return {k: v["value"] for k, v in self.result.get("tasks", {}).items()}

    @property
    def error(self) -> Optional[str]:
        return self.result.get("error")

    @property
    def counted(self) -> bool:
        """Whether it counts against the budget: completed, or failed on its own (not interrupted)."""
        return self.state in ("complete", "failed")


@dataclass(frozen=True)
class Owner:
    """The process evaluating a candidate. ``machine`` tells processes that can see each other's
    pids apart from those that cannot (same host name, boot and pid namespace)."""
    host: str
    machine: str
    pid: int
    started: Optional[int]  # the process's start time in clock ticks since boot (Linux), against pid reuse
    slot: int = 0
    device: str = ""

    @classmethod
    def this_process(cls, slot: int = 0, device: str = "") -> "Owner":
        return cls(HOST, MACHINE, os.getpid(), _process_start(os.getpid()), slot, device)

    def to_dict(self) -> dict:
        return {"host": self.host, "machine": self.machine, "pid": self.pid, "started": self.started,
                "slot": self.slot, "device": self.device}

    def gone(self) -> bool:
        """True only when this process can tell for sure that the owner process has ended."""
        if self.machine != MACHINE:
            return False
        return _process_start(self.pid) != self.started if self.started is not None else not _pid_exists(self.pid)


def _machine_key(host: str) -> str:
    """The host name, boot id and pid namespace: equal for processes that see each other's pids."""
    parts = [host]
    try:
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    except OSError:
        pass
    try:
        parts.append(os.readlink("/proc/self/ns/pid"))
    except OSError:
        pass
    return "|".join(parts)


HOST = os.environ.get("EVOMERGE_HOST") or socket.gethostname()
MACHINE = _machine_key(HOST)


def _process_start(pid: int) -> Optional[int]:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22, counted after the command name


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunDB:
    def __init__(self, url: str, name: str, *, create: bool, n_objectives: int = 1,
                 heartbeat_s: Optional[int] = None, grace_s: Optional[int] = None):
        self.url = url
        self.name = name
        self.storage = open_storage(url, heartbeat_s, grace_s)
        self.grace_s = grace_s or (2 * heartbeat_s if heartbeat_s else None)
        exists = name in {s.study_name for s in self.storage.get_all_studies()}
        if create and exists:
            raise RunDBError(f"storage {redact(url)} already holds a run named {name!r}; resume it with "
                             f"'evomerge resume', or pick another name")
        if not create and not exists:
            raise RunDBError(f"storage {redact(url)} holds no run named {name!r}")
        if create:
            optuna.create_study(storage=self.storage, study_name=name, directions=["maximize"] * n_objectives)
        self._study_id = self.storage.get_study_id_from_name(name)
        self.n_objectives = len(self.storage.get_study_directions(self._study_id))
        # created second, so a process joining right after the first may not see it yet
        optuna.create_study(storage=self.storage, study_name=self.references_name, load_if_exists=True,
                            directions=["maximize"] * self.n_objectives)
        self._ref_id = self.storage.get_study_id_from_name(self.references_name)
        self.host = HOST
        self._schema: Optional[dict] = None
        self._state_cache: Optional[tuple[str, Any]] = None
        self._thread_lock = threading.RLock()
        self._lock_depth = 0
        self._lock_conn = None
        self._lock_file = None

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
        db = self.storage.engine.url.database
        return db if self.dialect == "sqlite" and db and db != ":memory:" else None

    @property
    def shareable(self) -> bool:
        """Whether several processes can work on this run: a SQLite file (one host) or PostgreSQL."""
        return self.dialect == "postgresql" or self._sqlite_file is not None

    # -- the run-wide lock -----------------------------------------------------------------------

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Serialize claims, tells and budget checks across every process of the run. Re-entrant.
        The lock dies with its process (the kernel drops a file lock, PostgreSQL a session's
        advisory lock), so a killed worker never leaves the run locked."""
        with self._thread_lock:
            if self._lock_depth == 0:
                self._acquire()
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
                if self._lock_depth == 0:
                    self._release()

    def _lock_key(self) -> int:
        return int.from_bytes(hashlib.blake2b(f"evomerge:{self.name}".encode(), digest_size=8).digest(),
                              "big", signed=True)

    def _acquire(self) -> None:
        import sqlalchemy as sa

        if self._sqlite_file is not None:
            if self._lock_file is None:
                self._lock_file = open(f"{self._sqlite_file}.lock", "a+")
            fcntl.flock(self._lock_file, fcntl.LOCK_EX)
        elif self.dialect == "postgresql":
            if self._lock_conn is None:
                self._lock_conn = self.storage.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            self._lock_conn.execute(sa.select(sa.func.pg_advisory_lock(self._lock_key())))

    def _release(self) -> None:
        import sqlalchemy as sa

        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        elif self.dialect == "postgresql" and self._lock_conn is not None:
            self._lock_conn.execute(sa.select(sa.func.pg_advisory_unlock(self._lock_key())))

    def close(self) -> None:
        if self._lock_conn is not None:
            self._lock_conn.close()
            self._lock_conn = None
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None
        self.storage.engine.dispose()

    @property
    def references_name(self) -> str:
        return f"{self.name}.references"

    def study(self, sampler: Optional[optuna.samplers.BaseSampler] = None) -> optuna.Study:
        return optuna.load_study(study_name=self.name, storage=self.storage, sampler=sampler)

    # -- run-level facts ------------------------------------------------------------------------

    def set_meta(self, values: dict[str, Any]) -> None:
        for k, v in values.items():
            self.storage.set_study_user_attr(self._study_id, k, v)

    def meta(self) -> dict[str, Any]:
        return self.storage.get_study_user_attrs(self._study_id)

    def save_state(self, state: Any) -> None:
        """Pickled driver state (trusted: written by this run, read back by it)."""
        self.storage.set_study_system_attr(self._study_id, STATE_KEY, _state_blob(state))

    def load_state(self) -> Any:
        """The saved driver state; the same object as last time while nobody saved another."""
        raw = self._state_raw()
        if raw is None:
            return None
        if self._state_cache is None or self._state_cache[0] != raw:
            self._state_cache = (raw, pickle.loads(base64.b64decode(raw)))
        return self._state_cache[1]

    def _state_raw(self) -> Optional[str]:
        t = self._tables()
        if t is None:
            return self.storage.get_study_system_attrs(self._study_id).get(STATE_KEY)
        import sqlalchemy as sa

        a = t["study_system_attributes"]
        with self.storage.engine.connect() as conn:
            raw = conn.execute(sa.select(a.c.value_json).where(a.c.study_id == self._study_id,
                                                               a.c.key == STATE_KEY)).scalar()
        return None if raw is None else json.loads(raw)

    # -- candidates ----------------------------------------------------------------------------

    def claim(self, params: dict[str, float], owner: Owner, attrs: Optional[dict[str, Any]] = None) -> tuple[int, int]:
        """Create a RUNNING candidate with its params, owner and first heartbeat in one transaction
        (call under :meth:`lock`); returns (trial id, trial number).

        Optuna's own path costs one ORM query per param (about 100 ms for 66 params on this
        project's 2-core machine, a quarter of a demo candidate); the rows it would write (Optuna's
        schema, stable since 1.x and checked here by reflection) go in with a few bulk statements."""
        user_attrs = {OWNER_KEY: owner.to_dict()} | (attrs or {})
        t = self._tables()
        if t is None:
            template = create_trial(state=TrialState.RUNNING, params=params,
                                    distributions={k: UNIT for k in params}, user_attrs=user_attrs)
            trial_id = self.storage.create_new_trial(self._study_id, template_trial=template)
            self._heartbeat_now(trial_id)
            return trial_id, self.storage.get_trial_number_from_id(trial_id)
        import sqlalchemy as sa

        with self.storage.engine.begin() as conn:
            number = conn.execute(sa.select(sa.func.count()).select_from(t["trials"])
                                  .where(t["trials"].c.study_id == self._study_id)).scalar_one()
            trial_id = conn.execute(t["trials"].insert().values(
                number=number, study_id=self._study_id, state=TrialState.RUNNING.name,
                datetime_start=datetime.datetime.now())).inserted_primary_key[0]
            self._insert_attrs(conn, t, trial_id, user_attrs)
            conn.execute(t["trial_params"].insert(), [
                {"trial_id": trial_id, "param_name": k, "param_value": float(v), "distribution_json": UNIT_JSON}
                for k, v in params.items()])
            if self.storage.heartbeat_interval:
                conn.execute(t["trial_heartbeats"].insert().values(trial_id=trial_id, heartbeat=sa.func.now()))
        return trial_id, number

    def pop_waiting(self, owner: Owner) -> Optional[FrozenTrial]:
        """Claim a re-queued candidate (WAITING, with its params), as ``study.ask`` does; call under
        :meth:`lock`. Returns it as it was queued, or None when there is none."""
        if not self._has_waiting():
            return None
        for t in self.trials([TrialState.WAITING]):
            try:
                if self.storage.set_trial_state_values(t._trial_id, TrialState.RUNNING):
                    self.adopt(t._trial_id, owner)
                    return t
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
        return None

    def _has_waiting(self) -> bool:
        t = self._tables()
        if t is None:
            return True
        import sqlalchemy as sa

        tr = t["trials"]
        with self.storage.engine.connect() as conn:
            return conn.execute(sa.select(tr.c.trial_id).where(
                tr.c.study_id == self._study_id, tr.c.state == TrialState.WAITING.name).limit(1)).first() is not None

    def adopt(self, trial_id: int, owner: Owner) -> None:
        """Mark a trial Optuna created (``study.ask``) as this owner's, after its first heartbeat
        (so a trial with an owner always has a heartbeat; see :meth:`reclaim`)."""
        self._heartbeat_now(trial_id)
        self.storage.set_trial_user_attr(trial_id, OWNER_KEY, owner.to_dict())

    def heartbeat(self, trial_id: int) -> None:
        self.storage.record_heartbeat(trial_id)

    def _heartbeat_now(self, trial_id: int) -> None:
        if self.storage.heartbeat_interval:
            self.storage.record_heartbeat(trial_id)

    def finish(self, trial_id: int, values: Optional[Sequence[float]], record: dict[str, Any],
               driver_state: Any = None) -> bool:
        """Finish a claimed candidate in one transaction: COMPLETE with finite ``values``, else FAIL,
        with its ``result`` record and, when given, the driver state after it (so a kill cannot
        land between the two). Returns False (and writes nothing) when the candidate is no
        longer RUNNING: another process failed it as stale and it is being redone elsewhere."""
        if values is not None and not all(math.isfinite(v) for v in values):
            record = record | {"error": record.get("error") or f"non-finite objective values {list(values)}"}
            values = None
        record = record | {"host": self.host}
        state = TrialState.FAIL if values is None else TrialState.COMPLETE
        t = self._tables()
        if t is None:
            if self.storage.get_trial(trial_id).state != TrialState.RUNNING:
                return False
            self.storage.set_trial_user_attr(trial_id, "result", record)
            try:
                self.storage.set_trial_state_values(trial_id, state, None if values is None else list(values))
            except optuna.exceptions.UpdateFinishedTrialError:
                return False
            if driver_state is not None:
                self.save_state(driver_state)
            return True
        with self.storage.engine.begin() as conn:
            done = conn.execute(t["trials"].update()
                                .where(t["trials"].c.trial_id == trial_id,
                                       t["trials"].c.state == TrialState.RUNNING.name)
                                .values(state=state.name, datetime_complete=datetime.datetime.now()))
            if done.rowcount != 1:
                return False
            if values is not None:
                conn.execute(t["trial_values"].insert(), [
                    {"trial_id": trial_id, "objective": i, "value": float(v), "value_type": "FINITE"}
                    for i, v in enumerate(values)])
            conn.execute(t["trial_user_attributes"].delete().where(
                t["trial_user_attributes"].c.trial_id == trial_id, t["trial_user_attributes"].c.key == "result"))
            self._insert_attrs(conn, t, trial_id, {"result": record})
            if driver_state is not None:
                a = t["study_system_attributes"]
                conn.execute(a.delete().where(a.c.study_id == self._study_id, a.c.key == STATE_KEY))
                conn.execute(a.insert(), [{"study_id": self._study_id, "key": STATE_KEY,
                                           "value_json": json.dumps(_state_blob(driver_state))}])
        return True

    @staticmethod
    def _insert_attrs(conn, t: dict, trial_id: int, attrs: dict[str, Any]) -> None:
        conn.execute(t["trial_user_attributes"].insert(), [
            {"trial_id": trial_id, "key": k, "value_json": json.dumps(v)} for k, v in attrs.items()])

    def _tables(self) -> Optional[dict]:
        """Optuna's tables for a finished trial, when they have the columns written here."""
        if self._schema is None:
            import sqlalchemy as sa

            need = {"trials": {"trial_id", "number", "study_id", "state", "datetime_start", "datetime_complete"},
                    "trial_values": {"trial_id", "objective", "value", "value_type"},
                    "trial_user_attributes": {"trial_id", "key", "value_json"},
                    "trial_params": {"trial_id", "param_name", "param_value", "distribution_json"},
                    "trial_heartbeats": {"trial_id", "heartbeat"},
                    "study_system_attributes": {"study_id", "key", "value_json"}}
            try:
                meta = sa.MetaData()
                tables = {name: sa.Table(name, meta, autoload_with=self.storage.engine) for name in need}
                ok = all({c.name for c in tables[name].columns} >= cols for name, cols in need.items())
            except sa.exc.SQLAlchemyError:
                ok = False
            self._schema = tables if ok else {}
        return self._schema or None

    def tagged_since(self, after_trial_id: int, key: str) -> list[dict]:
        """Candidates created after ``after_trial_id`` with user attr ``key``: trial id, state
        (running, complete, failed, interrupted), the attr's value and the first objective value.
        A cheap read for drivers that look at the latest candidates only."""
        import sqlalchemy as sa

        t = self._tables()
        if t is None:
            return [{"trial_id": tr._trial_id, "state": _row(tr).state, "tag": tr.user_attrs[key],
                     "value": tr.values[0] if tr.values else None}
                    for tr in self.trials() if tr._trial_id > after_trial_id and key in tr.user_attrs]
        tr, ua, tv = t["trials"], t["trial_user_attributes"], t["trial_values"]
        res = ua.alias("res")
        q = (sa.select(tr.c.trial_id, tr.c.state, ua.c.value_json, tv.c.value, res.c.trial_id)
             .select_from(tr.join(ua, sa.and_(ua.c.trial_id == tr.c.trial_id, ua.c.key == key))
                          .outerjoin(tv, sa.and_(tv.c.trial_id == tr.c.trial_id, tv.c.objective == 0))
                          .outerjoin(res, sa.and_(res.c.trial_id == tr.c.trial_id, res.c.key == "result")))
             .where(tr.c.study_id == self._study_id, tr.c.trial_id > after_trial_id)
             .order_by(tr.c.trial_id))
        with self.storage.engine.connect() as conn:
            rows = conn.execute(q).all()
        states = {"COMPLETE": "complete", "RUNNING": "running", "WAITING": "waiting"}
        return [{"trial_id": i, "tag": json.loads(tag), "value": value,
                 "state": states.get(state) or ("failed" if has_result is not None else "interrupted")}
                for i, state, tag, value, has_result in rows]

    def last_trial_id(self) -> int:
        import sqlalchemy as sa

        t = self._tables()
        if t is None:
            return max((tr._trial_id for tr in self.trials()), default=0)
        with self.storage.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.max(t["trials"].c.trial_id))
                                .where(t["trials"].c.study_id == self._study_id)).scalar() or 0

    def trials(self, states: Optional[Sequence[TrialState]] = None) -> list[FrozenTrial]:
        return self.storage.get_all_trials(self._study_id, deepcopy=False,
                                           states=tuple(states) if states else None)

    def running(self) -> list[dict]:
        """The RUNNING candidates: trial id, number, owner (a dict or None), whether a heartbeat was
        recorded and the seconds since the last one by the database's clock (None when unknown:
        none recorded, or Optuna's schema is not the expected one)."""
        import sqlalchemy as sa

        t = self._tables()
        if t is None:
            return [{"trial_id": tr._trial_id, "number": tr.number, "owner": tr.user_attrs.get(OWNER_KEY),
                     "beat": True, "age": None} for tr in self.trials([TrialState.RUNNING])]
        tr, hb, ua = t["trials"], t["trial_heartbeats"], t["trial_user_attributes"]
        q = (sa.select(tr.c.trial_id, tr.c.number, hb.c.heartbeat, ua.c.value_json)
             .select_from(tr.outerjoin(hb, hb.c.trial_id == tr.c.trial_id)
                          .outerjoin(ua, sa.and_(ua.c.trial_id == tr.c.trial_id, ua.c.key == OWNER_KEY)))
             .where(tr.c.study_id == self._study_id, tr.c.state == TrialState.RUNNING.name))
        with self.storage.engine.connect() as conn:
            rows = conn.execute(q).all()
            now = conn.execute(sa.select(sa.func.now())).scalar_one() if rows else None
        out = []
        for trial_id, number, beat, owner in rows:
            age = None
            if beat is not None:
                age = (now.replace(tzinfo=None) - beat.replace(tzinfo=None)).total_seconds()
            out.append({"trial_id": trial_id, "number": number, "owner": json.loads(owner) if owner else None,
                        "beat": beat is not None, "age": age})
        return out

    def reclaim(self, retry: bool = False) -> list[int]:
        """Fail (as interrupted, without a result) the RUNNING candidates whose process is gone: its
        heartbeat is older than the grace period, its owner ran on this machine and has ended, or
        the claim is incomplete. A claim gets its first heartbeat and then its owner under the
        lock this runs under, so one without either is a process that died between Optuna's
        ``ask`` (or a re-queued trial's pop) and :meth:`adopt`. With ``retry``, each is re-queued
        (WAITING) with the same params and attrs (Optuna's RetryFailedTrialCallback), for the next
        ask to redo. Call under :meth:`lock`. Returns the failed trial numbers."""
        out = []
        for r in self.running():
            owner = Owner(**r["owner"]) if r["owner"] else None
            incomplete = owner is None or (self.storage.heartbeat_interval is not None and not r["beat"])
            stale = self.grace_s is not None and r["age"] is not None and r["age"] > self.grace_s
            if not (incomplete or stale or owner.gone()):
                continue
            if not self.abandon(r["trial_id"]):
                continue  # it finished, or another process failed it first
            out.append(r["number"])
            if retry:
                from optuna.storages import RetryFailedTrialCallback

                RetryFailedTrialCallback(max_retry=None)(self.study(), self.storage.get_trial(r["trial_id"]))
        return out

    def abandon(self, trial_id: int) -> bool:
        """Fail a RUNNING candidate as interrupted (without a result); False if it had finished."""
        try:
            self.storage.set_trial_state_values(trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            return False
        return True

    def counts(self) -> tuple[int, int]:
        """(candidates that count against the budget, candidates running now)."""
        import sqlalchemy as sa

        t = self._tables()
        if t is None:
            rows = self.rows()
            return sum(r.counted for r in rows), sum(r.state == "running" for r in rows)
        tr, ua = t["trials"], t["trial_user_attributes"]
        has_result = sa.exists().where(ua.c.trial_id == tr.c.trial_id, ua.c.key == "result")
        q = (sa.select(tr.c.state, has_result, sa.func.count()).where(tr.c.study_id == self._study_id)
             .group_by(tr.c.state, has_result))
        with self.storage.engine.connect() as conn:
            rows = conn.execute(q).all()
        counted = sum(n for state, res, n in rows if state == "COMPLETE" or (state == "FAIL" and res))
        return counted, sum(n for state, _, n in rows if state == "RUNNING")

    def evaluated_count(self) -> int:
        """Candidates that count against the budget: completed, or failed on their own."""
        return self.counts()[0]

    # -- shared run state --------------------------------------------------------------------------

    def elapsed(self) -> float:
        return float(self.storage.get_study_system_attrs(self._study_id).get(ELAPSED_KEY, 0.0))

    def save_elapsed(self, seconds: float) -> None:
        """The run's search time: the largest any process has reported (processes running side
        by side share the wall clock; sessions one after another add up through their start value)."""
        with self.lock():
            if seconds > self.elapsed():
                self.storage.set_study_system_attr(self._study_id, ELAPSED_KEY, seconds)

    def register_worker(self, owner_fields: dict) -> int:
        """Add a worker to the run's registry; returns its slot (0, 1, ...)."""
        with self.lock():
            workers = self.workers()
            slot = len(workers)
            workers.append(owner_fields | {"slot": slot, "joined": datetime.datetime.now().isoformat(timespec="seconds")})
            self.storage.set_study_system_attr(self._study_id, WORKERS_KEY, workers)
            return slot

    def update_worker(self, slot: int, fields: dict) -> None:
        with self.lock():
            workers = self.workers()
            if slot < len(workers):
                workers[slot] = workers[slot] | fields
                self.storage.set_study_system_attr(self._study_id, WORKERS_KEY, workers)

    def workers(self) -> list[dict]:
        return list(self.storage.get_study_system_attrs(self._study_id).get(WORKERS_KEY, []))

    def rows(self) -> list[Row]:
        return [_row(t) for t in self.trials()]

    # -- references ----------------------------------------------------------------------------

    def add_reference(self, name: str, record: dict, values: Optional[Sequence[float]]) -> None:
        state = TrialState.COMPLETE if values is not None else TrialState.FAIL
        trial = create_trial(state=state, values=None if values is None else list(values),
                             user_attrs={"name": name, "result": record | {"host": self.host}})
        self.storage.create_new_trial(self._ref_id, template_trial=trial)

    def references(self) -> list[Row]:
        return [_row(t) for t in self.storage.get_all_trials(self._ref_id, deepcopy=False)]


def _row(t: FrozenTrial) -> Row:
    result = t.user_attrs.get("result") or {}
    if t.state == TrialState.COMPLETE:
        state = "complete"
    elif t.state == TrialState.FAIL:
        state = "failed" if result else "interrupted"  # a candidate's own failure always has its record
    else:
        state = t.state.name.lower()
    values = list(t.values) if t.values else None
    fitness = result.get("fitness", values[0]) if values else None
    return Row(t.number, state, fitness, dict(t.params), result.get("recipe"), result, t.user_attrs.get("name", ""),
               values)


def best_row(rows: list[Row]) -> Optional[Row]:
    """The row with the highest fitness (the first one on ties), or None."""
    return max((r for r in rows if r.fitness is not None), key=lambda r: r.fitness, default=None)


def pareto_front(rows: list[Row]) -> list[Row]:
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
