"""Where a pure driver meets the run database: claiming its proposals and recording their results.

Call :meth:`DriverClaims.ask` and :meth:`DriverClaims.tell` under the run's lock. ``ask`` first
redoes a candidate whose worker died (re-queued with its vector and tag), then takes the driver's
state as last saved by any process, asks the driver and claims the proposal as a lease. ``tell``
finishes the lease and saves the driver's new state in one transaction, so a kill cannot land
between the two; it returns False when the candidate was reclaimed meanwhile (its worker was
presumed dead and another one redoes it): its result is then dropped, never recorded twice.
"""

from __future__ import annotations

from typing import Optional, Sequence

from evomerge.config import DriverSpec
from evomerge.fitness.record import CandidateRecord
from evomerge.rundb.leases import Owner
from evomerge.rundb.store import RunDB
from evomerge.search.drivers import Driver, Proposal
from evomerge.search.registry import DRIVERS, driver_class


def make_driver(db: RunDB, names: Sequence[str], spec: DriverSpec, seed: int, x0: Sequence[float], slot: int,
                solo: bool, **options) -> Driver:
    if DRIVERS[spec.name].study:
        options["study_of"] = db.study
    return driver_class(spec.name)(names, spec, seed, x0, slot=slot, solo=solo, **options)


class DriverClaims:
    def __init__(self, db: RunDB, driver: Driver, owner: Owner):
        self.db = db
        self.driver = driver
        self.owner = owner
        self._saved: Optional[dict] = None
        with db.lock():  # under the lock: another worker may be creating it right now
            state = db.metadata.driver_state()
            if state is None:
                state = driver.initial_state(db.leases.tables.last_trial_id())
                if state is not None:
                    db.metadata.save_driver_state(state)
            if state is not None:
                self._take(state)

    def _take(self, state: dict) -> None:
        if state is not self._saved:
            self.driver.load(state)
            self._saved = state

    def _rows(self) -> list[dict]:
        key = self.driver.tag_key
        return [] if key is None else self.db.leases.tables.tagged_since(self.driver.since, key)

    def ask(self) -> Proposal:
        queued = self.db.leases.pop_waiting(self.owner, self.driver.tag_key or "")
        if queued is not None:  # a candidate whose worker died: redo it first
            return Proposal([float(queued.params[n]) for n in self.driver.names], queued.attrs,
                            queued.trial_id, queued.number)
        if self.driver.shared:
            self._take(self.db.metadata.driver_state())
        proposal = self.driver.ask(self._rows())
        if proposal.trial_id is None:
            attrs = {self.driver.tag_key: proposal.tag} if self.driver.tag_key else {}
            lease = self.db.leases.claim(dict(zip(self.driver.names, proposal.vector)), self.owner, attrs)
            proposal.trial_id, proposal.number = lease.trial_id, lease.number
        else:  # the driver's library created the trial (Optuna's ask)
            self.db.leases.adopt(proposal.trial_id, proposal.number, self.owner)
        return proposal

    def tell(self, proposal: Proposal, values: Optional[Sequence[float]], record: CandidateRecord) -> bool:
        if self.driver.shared:
            self._take(self.db.metadata.driver_state())
        state = self.driver.tell(proposal, values, self._rows(), self.db.leases.tables.last_trial_id())
        if self.driver.tag_key:
            record = record.with_extra(**{self.driver.tag_key: proposal.tag})
        extra = {} if state is None else self.db.metadata.driver_state_attrs(state)
        ok = self.db.leases.finish(proposal.trial_id, values, record, extra)
        if state is not None and not ok and not self.driver.shared:
            self.db.metadata.save_driver_state(state)  # this process's own random streams moved on all the same
        if state is not None and (ok or not self.driver.shared):
            self._take(state)
        return ok
