"""The one module that speaks SQL to Optuna's schema.

Optuna's own storage API costs one ORM round trip per parameter and per attribute (about 100 ms
to create a 66-parameter trial on a 2-core machine, a quarter of a demo candidate), and it cannot
finish a trial and save a study attribute in one transaction. The statements here write the rows
Optuna itself would write, in bulk and atomically. They are written for the tables and columns in
``SCHEMA`` (Optuna's schema since 3.x, still so in 4.x); :class:`OptunaTables` checks them when a
run database opens and refuses, naming the table and column, when the installed Optuna differs.
"""

from __future__ import annotations

import datetime
import json
from typing import Any, Optional, Sequence

import sqlalchemy as sa
from optuna.distributions import FloatDistribution, distribution_to_json
from optuna.trial import TrialState

from evomerge.errors import EvomergeError

UNIT = FloatDistribution(0.0, 1.0)
UNIT_JSON = distribution_to_json(UNIT)

SCHEMA: dict[str, set[str]] = {
    "trials": {"trial_id", "number", "study_id", "state", "datetime_start", "datetime_complete"},
    "trial_values": {"trial_id", "objective", "value", "value_type"},
    "trial_user_attributes": {"trial_id", "key", "value_json"},
    "trial_params": {"trial_id", "param_name", "param_value", "distribution_json"},
    "trial_heartbeats": {"trial_id", "heartbeat"},
    "study_system_attributes": {"study_id", "key", "value_json"},
}

NUMBERS_KEY = "evomerge:numbers"  # study system attr: one past the highest candidate number ever given
RETIRED_KEY = "retired"  # user attr of a row that only holds the number of a candidate deleted by hand
SUMMARY_KEY = "summary"  # user attr: the few figures of a finished row that listings read (store.Score)


def row_state(optuna_state: str, has_result: bool) -> str:
    """A row's state as evomerge names it (complete, running, waiting, failed, interrupted), from
    Optuna's state name and whether the row holds a result record."""
    if optuna_state == TrialState.FAIL.name:
        return "failed" if has_result else "interrupted"  # a candidate's own failure always has its record
    return optuna_state.lower()


class SchemaError(EvomergeError):
    """The installed Optuna's database schema is not the one evomerge writes to."""


class OptunaTables:
    """Bulk reads and writes of one study's rows, in Optuna's own tables."""

    def __init__(self, engine: sa.engine.Engine, study_id: int):
        import optuna

        self.engine = engine
        self.study_id = study_id
        meta = sa.MetaData()
        self.t: dict[str, sa.Table] = {}
        for name, columns in SCHEMA.items():
            try:
                table = sa.Table(name, meta, autoload_with=engine)
            except sa.exc.NoSuchTableError:
                raise SchemaError(f"run database: Optuna {optuna.__version__} has no table {name!r}; evomerge "
                                  "was written for Optuna 3.x-4.x's schema") from None
            missing = columns - {c.name for c in table.columns}
            if missing:
                raise SchemaError(f"run database: table {name!r} of Optuna {optuna.__version__} lacks column(s) "
                                  f"{', '.join(sorted(missing))}; evomerge was written for Optuna 3.x-4.x's schema")
            self.t[name] = table

    # -- writes (each in the caller's transaction) -------------------------------------------------

    def insert_running(self, conn: sa.Connection, params: dict[str, float], user_attrs: dict[str, Any],
                       heartbeat: bool) -> tuple[int, int]:
        """A RUNNING trial with its params, user attrs and (optionally) first heartbeat; (id, number)."""
        trials = self.t["trials"]
        number = self._mark(conn)
        if number is None:  # a run database no evomerge with number marks has written to: count, as Optuna does
            number = conn.execute(sa.select(sa.func.count()).select_from(trials)
                                  .where(trials.c.study_id == self.study_id)).scalar_one()
        trial_id = conn.execute(trials.insert().values(
            number=number, study_id=self.study_id, state=TrialState.RUNNING.name,
            datetime_start=datetime.datetime.now())).inserted_primary_key[0]
        self.insert_user_attrs(conn, trial_id, user_attrs)
        if params:
            conn.execute(self.t["trial_params"].insert(), [
                {"trial_id": trial_id, "param_name": k, "param_value": float(v), "distribution_json": UNIT_JSON}
                for k, v in params.items()])
        if heartbeat:
            conn.execute(self.t["trial_heartbeats"].insert().values(trial_id=trial_id, heartbeat=sa.func.now()))
        self.set_system_attr(conn, NUMBERS_KEY, number + 1)  # the mark was number (or absent): raise it
        return trial_id, number

    def note_number(self, conn: sa.Connection, number: int) -> None:
        """Raise the run's number mark past ``number`` (the mark never goes down)."""
        if number + 1 > (self._mark(conn) or 0):
            self.set_system_attr(conn, NUMBERS_KEY, number + 1)

    def retire_missing(self, conn: sa.Connection) -> list[int]:
        """Candidate numbers below the mark that no row holds (rows deleted by hand), each given a
        FAIL row with the user attr ``RETIRED_KEY``, so the number is never given again: Optuna
        numbers a new trial by counting the study's trials (``insert_running`` gives the mark,
        which costs one lookup however long the run). Returns the numbers retired now (none in
        the usual case, at the cost of one count)."""
        tr = self.t["trials"]
        count = conn.execute(sa.select(sa.func.count()).where(tr.c.study_id == self.study_id)).scalar_one()
        mark = self._mark(conn)
        if mark is None:  # no evomerge with number marks has written here yet
            top = conn.execute(sa.select(sa.func.max(tr.c.number)).where(tr.c.study_id == self.study_id)).scalar()
            mark = 0 if top is None else top + 1
        if count >= mark:
            return []
        held = set(conn.execute(sa.select(tr.c.number).where(tr.c.study_id == self.study_id)).scalars())
        missing = [n for n in range(mark) if n not in held]
        now = datetime.datetime.now()
        for number in missing:
            trial_id = conn.execute(tr.insert().values(
                number=number, study_id=self.study_id, state=TrialState.FAIL.name, datetime_start=now,
                datetime_complete=now)).inserted_primary_key[0]
            self.insert_user_attrs(conn, trial_id, {RETIRED_KEY: True})
        self.note_number(conn, mark - 1)
        return missing

    def _mark(self, conn: sa.Connection) -> Optional[int]:
        """One past the highest number given (None before any evomerge with marks numbered here)."""
        a = self.t["study_system_attributes"]
        text = conn.execute(sa.select(a.c.value_json).where(a.c.study_id == self.study_id,
                                                            a.c.key == NUMBERS_KEY)).scalar()
        return None if text is None else int(json.loads(text))

    def finish(self, conn: sa.Connection, trial_id: int, values: Optional[Sequence[float]],
               result: dict[str, Any], summary: dict[str, Any]) -> bool:
        """COMPLETE with ``values`` (FAIL without), the ``result`` user attr and its ``summary``,
        only while RUNNING."""
        trials = self.t["trials"]
        state = TrialState.FAIL if values is None else TrialState.COMPLETE
        done = conn.execute(trials.update()
                            .where(trials.c.trial_id == trial_id, trials.c.state == TrialState.RUNNING.name)
                            .values(state=state.name, datetime_complete=datetime.datetime.now()))
        if done.rowcount != 1:
            return False
        if values is not None:
            conn.execute(self.t["trial_values"].insert(), [
                {"trial_id": trial_id, "objective": i, "value": float(v), "value_type": "FINITE"}
                for i, v in enumerate(values)])
        ua = self.t["trial_user_attributes"]
        conn.execute(ua.delete().where(ua.c.trial_id == trial_id, ua.c.key.in_(("result", SUMMARY_KEY))))
        self.insert_user_attrs(conn, trial_id, {"result": result, SUMMARY_KEY: summary})
        return True

    def insert_user_attrs(self, conn: sa.Connection, trial_id: int, attrs: dict[str, Any]) -> None:
        if attrs:
            conn.execute(self.t["trial_user_attributes"].insert(), [
                {"trial_id": trial_id, "key": k, "value_json": json.dumps(v)} for k, v in attrs.items()])

    def set_system_attr(self, conn: sa.Connection, key: str, value: Any) -> None:
        a = self.t["study_system_attributes"]
        conn.execute(a.delete().where(a.c.study_id == self.study_id, a.c.key == key))
        conn.execute(a.insert(), [{"study_id": self.study_id, "key": key, "value_json": json.dumps(value)}])

    # -- reads ---------------------------------------------------------------------------------------

    def system_attr_json(self, key: str) -> Optional[str]:
        """A study system attr as the JSON text stored (None if unset)."""
        a = self.t["study_system_attributes"]
        with self.engine.connect() as conn:
            return conn.execute(sa.select(a.c.value_json).where(a.c.study_id == self.study_id,
                                                                a.c.key == key)).scalar()

    def tagged_since(self, after_trial_id: int, key: str) -> list[dict]:
        """Trials after ``after_trial_id`` with user attr ``key``: trial id, state (running,
        complete, failed, interrupted, waiting), the attr's value and the first objective value."""
        tr, ua, tv = self.t["trials"], self.t["trial_user_attributes"], self.t["trial_values"]
        res = ua.alias("res")
        q = (sa.select(tr.c.trial_id, tr.c.state, ua.c.value_json, tv.c.value, res.c.trial_id)
             .select_from(tr.join(ua, sa.and_(ua.c.trial_id == tr.c.trial_id, ua.c.key == key))
                          .outerjoin(tv, sa.and_(tv.c.trial_id == tr.c.trial_id, tv.c.objective == 0))
                          .outerjoin(res, sa.and_(res.c.trial_id == tr.c.trial_id, res.c.key == "result")))
             .where(tr.c.study_id == self.study_id, tr.c.trial_id > after_trial_id)
             .order_by(tr.c.trial_id))
        with self.engine.connect() as conn:
            rows = conn.execute(q).all()
        return [{"trial_id": i, "tag": json.loads(tag), "value": value,
                 "state": row_state(state, has_result is not None)}
                for i, state, tag, value, has_result in rows]

    def listing(self) -> list[dict]:
        """Every trial of the study without its records, in trial id order: id, number, Optuna's
        state, whether it has a result record, its summary (None if it has none: a row written
        before summaries, or one without a result), whether it is retired, and its objective values
        (None without). Two queries, whatever the run's size."""
        tr, ua, tv = self.t["trials"], self.t["trial_user_attributes"], self.t["trial_values"]
        summ, res, ret = ua.alias("summ"), ua.alias("res"), ua.alias("ret")
        q = (sa.select(tr.c.trial_id, tr.c.number, tr.c.state, summ.c.value_json, res.c.trial_id, ret.c.trial_id)
             .select_from(tr.outerjoin(summ, sa.and_(summ.c.trial_id == tr.c.trial_id, summ.c.key == SUMMARY_KEY))
                          .outerjoin(res, sa.and_(res.c.trial_id == tr.c.trial_id, res.c.key == "result"))
                          .outerjoin(ret, sa.and_(ret.c.trial_id == tr.c.trial_id, ret.c.key == RETIRED_KEY)))
             .where(tr.c.study_id == self.study_id).order_by(tr.c.trial_id))
        vq = (sa.select(tv.c.trial_id, tv.c.objective, tv.c.value).select_from(tv.join(tr, tr.c.trial_id == tv.c.trial_id))
              .where(tr.c.study_id == self.study_id).order_by(tv.c.trial_id, tv.c.objective))
        with self.engine.connect() as conn:
            rows = conn.execute(q).all()
            values: dict[int, list[float]] = {}
            for trial_id, _, value in conn.execute(vq):
                values.setdefault(trial_id, []).append(value)
        return [{"trial_id": i, "number": n, "state": state, "has_result": res is not None,
                 "summary": json.loads(summ) if summ is not None else None, "retired": ret is not None,
                 "values": values.get(i)} for i, n, state, summ, res, ret in rows]

    def results(self, trial_ids: Sequence[int]) -> dict[int, dict]:
        """The result records of ``trial_ids`` (those that have one), read 500 at a time."""
        ua = self.t["trial_user_attributes"]
        out = {}
        with self.engine.connect() as conn:
            for start in range(0, len(trial_ids), 500):
                q = sa.select(ua.c.trial_id, ua.c.value_json).where(
                    ua.c.trial_id.in_(trial_ids[start:start + 500]), ua.c.key == "result")
                out |= {i: json.loads(v) for i, v in conn.execute(q).all()}
        return out

    def complete_summaries(self, seen: set[int]) -> list[tuple[int, int, Optional[dict], list[float]]]:
        """(trial id, number, summary, objective values) of the study's COMPLETE trials not in
        ``seen``, without their records: the ids are read first, then only the new rows' summaries
        (None for a row written before summaries) and values."""
        tr, ua, tv = self.t["trials"], self.t["trial_user_attributes"], self.t["trial_values"]
        out: dict[int, list] = {}
        with self.engine.connect() as conn:
            ids = conn.execute(sa.select(tr.c.trial_id).where(
                tr.c.study_id == self.study_id, tr.c.state == TrialState.COMPLETE.name)).scalars().all()
            new = sorted(set(ids) - seen)
            for start in range(0, len(new), 500):
                part = new[start:start + 500]
                q = (sa.select(tr.c.trial_id, tr.c.number, ua.c.value_json)
                     .select_from(tr.outerjoin(ua, sa.and_(ua.c.trial_id == tr.c.trial_id, ua.c.key == SUMMARY_KEY)))
                     .where(tr.c.trial_id.in_(part)))
                for i, n, summary in conn.execute(q).all():
                    out[i] = [i, n, json.loads(summary) if summary is not None else None, []]
                vq = (sa.select(tv.c.trial_id, tv.c.value).where(tv.c.trial_id.in_(part))
                      .order_by(tv.c.trial_id, tv.c.objective))
                for i, value in conn.execute(vq).all():
                    out[i][3].append(value)
        return [tuple(out[i]) for i in sorted(out)]

    def last_trial_id(self) -> int:
        trials = self.t["trials"]
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.max(trials.c.trial_id))
                                .where(trials.c.study_id == self.study_id)).scalar() or 0

    def has_waiting(self) -> bool:
        tr = self.t["trials"]
        with self.engine.connect() as conn:
            return conn.execute(sa.select(tr.c.trial_id).where(
                tr.c.study_id == self.study_id, tr.c.state == TrialState.WAITING.name).limit(1)).first() is not None

    def running(self, owner_key: str) -> list[dict]:
        """RUNNING trials: id, number, the ``owner_key`` attr (or None), whether a heartbeat was
        recorded and the seconds since the last one by the database's clock (None if none)."""
        tr, hb, ua = self.t["trials"], self.t["trial_heartbeats"], self.t["trial_user_attributes"]
        q = (sa.select(tr.c.trial_id, tr.c.number, hb.c.heartbeat, ua.c.value_json)
             .select_from(tr.outerjoin(hb, hb.c.trial_id == tr.c.trial_id)
                          .outerjoin(ua, sa.and_(ua.c.trial_id == tr.c.trial_id, ua.c.key == owner_key)))
             .where(tr.c.study_id == self.study_id, tr.c.state == TrialState.RUNNING.name))
        with self.engine.connect() as conn:
            rows = conn.execute(q).all()
            now = conn.execute(sa.select(sa.func.now())).scalar_one() if rows else None
        out = []
        for trial_id, number, beat, owner in rows:
            age = None if beat is None else (now.replace(tzinfo=None) - beat.replace(tzinfo=None)).total_seconds()
            out.append({"trial_id": trial_id, "number": number, "owner": json.loads(owner) if owner else None,
                        "beat": beat is not None, "age": age})
        return out

    def counts(self) -> tuple[int, int]:
        """(trials COMPLETE or FAILED with a result, trials RUNNING)."""
        tr, ua = self.t["trials"], self.t["trial_user_attributes"]
        has_result = sa.exists().where(ua.c.trial_id == tr.c.trial_id, ua.c.key == "result")
        q = (sa.select(tr.c.state, has_result, sa.func.count()).where(tr.c.study_id == self.study_id)
             .group_by(tr.c.state, has_result))
        with self.engine.connect() as conn:
            rows = conn.execute(q).all()
        counted = sum(n for state, res, n in rows if state == "COMPLETE" or (state == "FAIL" and res))
        return counted, sum(n for state, _, n in rows if state == "RUNNING")
