"""Candidate leases: claim, heartbeat, finish, reclaim.

Each candidate is a RUNNING trial from the moment it is claimed. Its owner records a heartbeat for
it (Optuna's ``trial_heartbeats``) and finishes it in one transaction that only succeeds while it
is still RUNNING. A candidate whose heartbeat is older than the grace period, or whose process is
gone from this machine, is failed without a result ("interrupted"), does not count against the
budget, and is redone. Claims and reclaims run under the run lock (:mod:`.lock`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

import optuna
from optuna.storages import RDBStorage
from optuna.trial import TrialState, create_trial

from evomerge.fitness.record import CandidateRecord
from evomerge.procs import HOST, MACHINE, ended, process_start
from evomerge.rundb.optuna_sql import OptunaTables

OWNER_KEY = "worker"  # trial user attr: who evaluates it


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
        return cls(HOST, MACHINE, os.getpid(), process_start(os.getpid()), slot, device)

    def to_dict(self) -> dict:
        return {"host": self.host, "machine": self.machine, "pid": self.pid, "started": self.started,
                "slot": self.slot, "device": self.device}

    def gone(self) -> bool:
        """True only when this process can tell for sure that the owner process has ended."""
        if self.machine != MACHINE:
            return False
        return ended(self.pid, self.started)


@dataclass(frozen=True)
class Lease:
    """A claimed candidate."""
    trial_id: int
    number: int
    params: dict[str, float]
    attrs: dict


class Leases:
    def __init__(self, storage: RDBStorage, tables: OptunaTables, grace_s: Optional[int]):
        self.storage = storage
        self.tables = tables
        self.grace_s = grace_s

    @property
    def heartbeats(self) -> bool:
        return bool(self.storage.heartbeat_interval)

    def claim(self, params: dict[str, float], owner: Owner, attrs: Optional[dict[str, Any]] = None) -> Lease:
        """A RUNNING candidate with its params, owner and first heartbeat, in one transaction."""
        attrs = attrs or {}
        with self.storage.engine.begin() as conn:
            trial_id, number = self.tables.insert_running(conn, params, {OWNER_KEY: owner.to_dict()} | attrs,
                                                          self.heartbeats)
        return Lease(trial_id, number, dict(params), attrs)

    def pop_waiting(self, owner: Owner, attr: str) -> Optional[Lease]:
        """Claim a re-queued candidate (WAITING, with its params and ``attr``), as ``study.ask``
        does; None when there is none."""
        if not self.tables.has_waiting():
            return None
        for t in self.storage.get_all_trials(self.tables.study_id, deepcopy=False, states=(TrialState.WAITING,)):
            try:
                if self.storage.set_trial_state_values(t._trial_id, TrialState.RUNNING):
                    self.adopt(t._trial_id, t.number, owner)
                    return Lease(t._trial_id, t.number, dict(t.params), dict(t.user_attrs.get(attr) or {}))
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
        return None

    def adopt(self, trial_id: int, number: int, owner: Owner) -> None:
        """Mark a trial Optuna created (``study.ask``) as this owner's, after its first heartbeat
        (so a trial with an owner always has a heartbeat; see :meth:`reclaim`)."""
        if self.heartbeats:
            self.storage.record_heartbeat(trial_id)
        self.storage.set_trial_user_attr(trial_id, OWNER_KEY, owner.to_dict())
        self._numbered(number)

    def retire_missing(self) -> list[int]:
        """Keep the numbers of candidates deleted by hand from being given again; the numbers
        retired now (see :meth:`OptunaTables.retire_missing`). Call under the run lock."""
        with self.storage.engine.begin() as conn:
            return self.tables.retire_missing(conn)

    def _numbered(self, number: int) -> None:
        with self.storage.engine.begin() as conn:
            self.tables.note_number(conn, number)

    def heartbeat(self, trial_id: int) -> None:
        self.storage.record_heartbeat(trial_id)

    def finish(self, trial_id: int, values: Optional[Sequence[float]], record: CandidateRecord,
               system_attrs: Optional[dict[str, Any]] = None) -> bool:
        """Finish a claimed candidate in one transaction: COMPLETE with finite ``values``, else FAIL,
        with its ``result`` record and the study ``system_attrs`` given (the driver's state after
        it, so a kill cannot land between the two). Returns False, writing nothing, when the
        candidate is no longer RUNNING: it was reclaimed and is being redone elsewhere."""
        if values is not None and not all(math.isfinite(v) for v in values):
            record = replace(record, error=record.error or f"non-finite objective values {list(values)}")
            values = None
        record = replace(record, host=HOST)
        with self.storage.engine.begin() as conn:
            if not self.tables.finish(conn, trial_id, values, record.to_json(), record.summary(values)):
                return False  # nothing was written
            for key, value in (system_attrs or {}).items():
                self.tables.set_system_attr(conn, key, value)
        return True

    def abandon(self, trial_id: int) -> bool:
        """Fail a RUNNING candidate as interrupted (without a result); False if it had finished."""
        try:
            self.storage.set_trial_state_values(trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            return False
        return True

    def reclaim(self, retry: bool = False) -> list[int]:
        """Fail (as interrupted, without a result) the RUNNING candidates whose process is gone: its
        heartbeat is older than the grace period, its owner ran on this machine and has ended, or
        the claim is incomplete. A claim gets its first heartbeat and then its owner under the run
        lock this runs under, so one without either is a process that died between Optuna's
        ``ask`` (or a re-queued trial's pop) and :meth:`adopt`. With ``retry``, each is re-queued
        (WAITING) with the same params and attrs for the next claim to redo. Returns the failed trial numbers."""
        out = []
        for r in self.running():
            owner = Owner(**r["owner"]) if r["owner"] else None
            incomplete = owner is None or (self.heartbeats and not r["beat"])
            stale = self.grace_s is not None and r["age"] is not None and r["age"] > self.grace_s
            if not (incomplete or stale or owner.gone()):
                continue
            if not self.abandon(r["trial_id"]):
                continue  # it finished, or another process failed it first
            self._numbered(r["number"])  # a claim that died before adopt() noted its number
            out.append(r["number"])
            if retry:
                self._requeue(self.storage.get_trial(r["trial_id"]))
        return out

    def _requeue(self, lost) -> None:
        """A WAITING copy of a lost candidate (its params and attrs), which the next claim redoes;
        what Optuna's RetryFailedTrialCallback does, with the retry history it keeps."""
        history = list(lost.system_attrs.get("retry_history", [])) + [lost.number]
        copy = self.storage.create_new_trial(self.tables.study_id, template_trial=create_trial(
            state=TrialState.WAITING, params=lost.params, distributions=lost.distributions,
            user_attrs=lost.user_attrs,
            system_attrs=lost.system_attrs | {"failed_trial": lost.number, "retry_history": history}))
        self._numbered(self.storage.get_trial(copy).number)

    def running(self) -> list[dict]:
        """The RUNNING candidates: trial id, number, owner (a dict or None), whether a heartbeat was
        recorded and the seconds since the last one by the database's clock (None if none)."""
        return self.tables.running(OWNER_KEY)

    def counts(self) -> tuple[int, int]:
        """(candidates that count against the budget: completed, or failed on their own; running now)."""
        return self.tables.counts()
