"""The run database: an Optuna storage (SQLite in the run directory, or any SQLAlchemy URL).

Two studies per run, so ``optuna-dashboard`` shows both and samplers only see real candidates:

- ``NAME``: every candidate, one trial each. Params are the space's coordinates (FloatDistribution
  over [0, 1]); the user attr ``result`` holds the decoded recipe, per-task metrics, per-item
  correctness, merge and evaluation seconds, the error if it failed, and the host.
- ``NAME.references``: the reference rows (each parent alone, the method's default recipe).

Run-level facts (config, space coordinates, subsample ids, versions) are the search study's user
attrs; driver state (pycma or the Optuna sampler, pickled after every tell) is a system attr.
A candidate still RUNNING when its process died is marked failed with ``interrupted`` on resume
and does not count as evaluated.
"""

from __future__ import annotations

import base64
import datetime
import json
import math
import pickle
import socket
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import optuna
from optuna.distributions import FloatDistribution, distribution_to_json
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState, create_trial

from .errors import EvomergeError

optuna.logging.set_verbosity(optuna.logging.WARNING)

UNIT = FloatDistribution(0.0, 1.0)
UNIT_JSON = distribution_to_json(UNIT)
STATE_KEY = "evomerge:driver_state"


class RunDBError(EvomergeError):
    """The run database is missing, or does not hold the run asked for."""


def sqlite_url(path) -> str:
    return f"sqlite:///{path}"


def open_storage(url: str) -> RDBStorage:
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    try:
        return RDBStorage(url, **kwargs)
    except Exception as e:  # SQLAlchemy raises many kinds; name the URL
        raise RunDBError(f"storage {redact(url)}: cannot open ({type(e).__name__}: {str(e).splitlines()[0]})") from None


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
    state: str  # complete, failed, interrupted, running
    fitness: Optional[float]
    params: dict[str, float]
    recipe: Optional[dict]
    result: dict = field(default_factory=dict)
    name: str = ""  # reference rows: parent:LABEL or default

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


class RunDB:
    def __init__(self, url: str, name: str, *, create: bool):
        self.url = url
        self.name = name
        self.storage = open_storage(url)
        exists = name in {s.study_name for s in self.storage.get_all_studies()}
        if create and exists:
            raise RunDBError(f"storage {redact(url)} already holds a run named {name!r}; resume it with "
                             f"'evomerge resume', or pick another name")
        if not create and not exists:
            raise RunDBError(f"storage {redact(url)} holds no run named {name!r}")
        if create:
            optuna.create_study(storage=self.storage, study_name=name, direction="maximize")
            optuna.create_study(storage=self.storage, study_name=self.references_name, direction="maximize")
        self._study_id = self.storage.get_study_id_from_name(name)
        self._ref_id = self.storage.get_study_id_from_name(self.references_name)
        self.host = socket.gethostname()
        self._schema: Optional[dict] = None

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
        blob = base64.b64encode(pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)).decode()
        self.storage.set_study_system_attr(self._study_id, STATE_KEY, blob)

    def load_state(self) -> Any:
        blob = self.storage.get_study_system_attrs(self._study_id).get(STATE_KEY)
        return None if blob is None else pickle.loads(base64.b64decode(blob))

    # -- candidates ----------------------------------------------------------------------------

    def record(self, params: dict[str, float], record: dict[str, Any], values: Optional[Sequence[float]]) -> int:
        """Record a finished candidate (COMPLETE with finite ``values``, or FAIL when None) in one
        transaction; returns its trial number.

        Optuna's own path (``create_new_trial`` with a template) costs one ORM query per param and
        per attribute: about 100 ms for 66 params on this project's 2-core machine, a quarter of a
        demo candidate. The rows it would write (Optuna's schema, stable since 1.x) are written
        here with a few bulk statements instead; where the schema is not the expected one, Optuna's
        path is taken."""
        user_attrs = {"result": record | {"host": self.host}}
        state = TrialState.FAIL if values is None else TrialState.COMPLETE
        t = self._tables()
        if t is None or (values is not None and not all(math.isfinite(v) for v in values)):
            template = create_trial(state=state, values=None if values is None else list(values), params=params,
                                    distributions={k: UNIT for k in params}, user_attrs=user_attrs)
            return self.storage.get_trial_number_from_id(
                self.storage.create_new_trial(self._study_id, template_trial=template))
        import sqlalchemy as sa

        now = datetime.datetime.now()
        with self.storage.engine.begin() as conn:
            number = conn.execute(sa.select(sa.func.count()).select_from(t["trials"])
                                  .where(t["trials"].c.study_id == self._study_id)).scalar_one()
            trial_id = conn.execute(t["trials"].insert().values(
                number=number, study_id=self._study_id, state=state.name, datetime_start=now,
                datetime_complete=now)).inserted_primary_key[0]
            if values is not None:
                conn.execute(t["trial_values"].insert(), [
                    {"trial_id": trial_id, "objective": i, "value": float(v), "value_type": "FINITE"}
                    for i, v in enumerate(values)])
            conn.execute(t["trial_user_attributes"].insert(), [
                {"trial_id": trial_id, "key": k, "value_json": json.dumps(v)} for k, v in user_attrs.items()])
            conn.execute(t["trial_params"].insert(), [
                {"trial_id": trial_id, "param_name": k, "param_value": float(v), "distribution_json": UNIT_JSON}
                for k, v in params.items()])
        return number

    def _tables(self) -> Optional[dict]:
        """Optuna's tables for a finished trial, when they have the columns written here."""
        if self._schema is None:
            import sqlalchemy as sa

            need = {"trials": {"trial_id", "number", "study_id", "state", "datetime_start", "datetime_complete"},
                    "trial_values": {"trial_id", "objective", "value", "value_type"},
                    "trial_user_attributes": {"trial_id", "key", "value_json"},
                    "trial_params": {"trial_id", "param_name", "param_value", "distribution_json"}}
            try:
                meta = sa.MetaData()
                tables = {name: sa.Table(name, meta, autoload_with=self.storage.engine) for name in need}
                ok = all({c.name for c in tables[name].columns} >= cols for name, cols in need.items())
            except sa.exc.SQLAlchemyError:
                ok = False
            self._schema = tables if ok else {}
        return self._schema or None

    def trial_id(self, number: int) -> int:
        return self.storage.get_trial_id_from_study_id_trial_number(self._study_id, number)

    def set_result(self, number: int, record: dict[str, Any]) -> None:
        self.storage.set_trial_user_attr(self.trial_id(number), "result", record | {"host": self.host})

    def finish(self, study: optuna.Study, number: int, values: Optional[Sequence[float]]) -> None:
        """Tell the study: COMPLETE with values, or FAIL when ``values`` is None."""
        if values is None:
            study.tell(number, state=TrialState.FAIL)
        else:
            study.tell(number, list(values))

    def trials(self, states: Optional[Sequence[TrialState]] = None) -> list[FrozenTrial]:
        return self.storage.get_all_trials(self._study_id, deepcopy=False,
                                           states=tuple(states) if states else None)

    def mark_interrupted(self, numbers: Optional[Sequence[int]] = None) -> list[int]:
        """Fail the running candidates (all of them, or those numbered): their process is gone."""
        out = []
        for t in self.trials([TrialState.RUNNING]):
            if numbers is not None and t.number not in numbers:
                continue
            self.storage.set_trial_user_attr(t._trial_id, "interrupted", True)
            self.storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            out.append(t.number)
        return out

    def evaluated_count(self) -> int:
        """Candidates that count against the budget: completed, or failed on their own."""
        return sum(_row(t).counted for t in self.trials([TrialState.COMPLETE, TrialState.FAIL]))

    def rows(self) -> list[Row]:
        return [_row(t) for t in self.trials()]

    # -- references ----------------------------------------------------------------------------

    def add_reference(self, name: str, record: dict, fitness: Optional[float]) -> None:
        state = TrialState.COMPLETE if fitness is not None else TrialState.FAIL
        trial = create_trial(state=state, value=fitness,
                             user_attrs={"name": name, "result": record | {"host": self.host}})
        self.storage.create_new_trial(self._ref_id, template_trial=trial)

    def references(self) -> list[Row]:
        return [_row(t) for t in self.storage.get_all_trials(self._ref_id, deepcopy=False)]


def _row(t: FrozenTrial) -> Row:
    if t.state == TrialState.COMPLETE:
        state = "complete"
    elif t.state == TrialState.FAIL:
        state = "interrupted" if t.user_attrs.get("interrupted") else "failed"
    else:
        state = t.state.name.lower()
    fitness = t.values[0] if t.values else None
    result = t.user_attrs.get("result") or {}
    return Row(t.number, state, fitness, dict(t.params), result.get("recipe"), result, t.user_attrs.get("name", ""))


def best_row(rows: list[Row]) -> Optional[Row]:
    """The row with the highest fitness (the first one on ties), or None."""
    return max((r for r in rows if r.fitness is not None), key=lambda r: r.fitness, default=None)
