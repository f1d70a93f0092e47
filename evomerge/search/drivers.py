"""Search drivers: propose vectors in [0, 1]^d, learn from their fitness.

Every ask claims a candidate in the run database (a RUNNING trial) and every tell finishes it, both
under the run's lock, so any number of processes can drive one search with no generation barrier:
a worker asks for its next candidate as soon as it has told its last.

- ``cma``: pycma's ask/tell with bounds [0, 1], ``popsize``, ``sigma0``, a seed and optional IPOP
  restarts (popsize doubles, a new random start) when pycma's stop criteria fire; with none left it
  keeps proposing from its last distribution, and the budget ends the run. The strategy (with its
  own random stream) lives in the run database and is shared by every worker. The candidates of a
  generation are numbered: 0..popsize-1 are pycma's ``ask()`` from the saved strategy, and when
  they are all taken a worker takes the next index, drawn by further ``ask()`` calls on the same
  distribution, instead of waiting. A candidate whose worker died is re-queued and redone first,
  with its vector and position. The first ``popsize`` candidates of a generation to finish
  are told; whoever finishes the last of them tells, and the next ask is from the new
  generation. Candidates that finish after their generation was told are kept (they count, and
  can be the best) but do not move the distribution. With one process, every generation is
  exactly pycma's ask and tell, so a resumed run proposes the candidates an uninterrupted one
  would have.
- ``optuna``: an Optuna sampler (``tpe`` with constant liar, ``cmaes``, ``gp``, ``random``,
  ``nsga2``) on the same storage; these read the shared trials themselves. One process pickles
  its sampler (with its random state) after every tell and a resumed run restores it; each
  worker of a multi-worker run draws from its own seed instead. A killed worker's candidate is
  re-queued with the same params (Optuna's RetryFailedTrialCallback).

Both maximize. ``tell`` returns False when the candidate was reclaimed meanwhile (its worker was
presumed dead and another one redoes it); its result is then dropped, never recorded twice.
"""

from __future__ import annotations

import copy
import logging
import pickle
import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
from optuna.trial import TrialState

from evomerge.config import DriverSpec
from evomerge.errors import EvomergeError
from evomerge.search.samplers import make_sampler
from evomerge.rundb.store import UNIT, Owner, RunDB

log = logging.getLogger(__name__)


@dataclass
class Proposal:
    trial_id: int
    number: int
    vector: list[float]
    attrs: dict = field(default_factory=dict)


class Driver:
    """ask() -> Proposal (claims it); tell(proposal, values or None when the candidate failed, the
    record to keep) -> whether it was recorded. Call both under ``db.lock()``."""

    kind = ""

    def __init__(self, db: RunDB, names: Sequence[str], spec: DriverSpec, seed: int, x0: Sequence[float],
                 owner: Owner, solo: bool = True):
        self.db = db
        self.names = list(names)
        self.spec = spec
        self.seed = seed
        self.x0 = [float(v) for v in x0]
        self.owner = owner
        self.solo = solo
        saved = db.load_state()
        if saved is not None and saved.get("driver") != self.kind:
            raise EvomergeError(f"the run database holds a {saved.get('driver')} driver's state, not {self.kind}'s; "
                                "the run was made with another driver")
        self._saved_blob: Optional[bytes] = saved["blob"] if saved else None

    def _restore(self):
        """The state object last saved, or None."""
        return None if self._saved_blob is None else pickle.loads(self._saved_blob)

    def _save(self, state: object) -> None:
        self._saved_blob = pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
        self.db.save_state({"driver": self.kind, "blob": self._saved_blob})

    def ask(self) -> Proposal:
        raise NotImplementedError

    def tell(self, proposal: Proposal, values: Optional[Sequence[float]], record: dict) -> bool:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# pycma


@dataclass
class _CmaState:
    es: object  # cma.CMAEvolutionStrategy, carrying its own RandomState
    generation: int  # generations told so far, over all restarts
    restart: int
    after_trial_id: int = 0  # every candidate of this generation has a larger trial id


class CmaDriver(Driver):
    kind = "cma"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        with self.db.lock():  # again under the lock: another worker may have created it meanwhile
            if self.db.load_state() is None:
                self._save(self._new_es(0, self.spec.popsize, self.x0, generation=0,
                                        after=self.db.last_trial_id()))
        self._cached: Optional[_CmaState] = None
        # the current generation's draws: (restart, generation), the batches asked, the strategy asking them
        self._batches_of: Optional[tuple[int, int]] = None
        self._batches: list[list[list[float]]] = []
        self._asker = None

    def _new_es(self, restart: int, popsize: Optional[int], x0: Sequence[float], generation: int,
                after: int) -> _CmaState:
        import cma

        rng = np.random.RandomState(self.seed * 1000 + restart + 1)
        opts = {"bounds": [0.0, 1.0], "seed": self.seed * 1000 + restart + 1, "verbose": -9, "randn": rng.randn}
        if popsize:
            opts["popsize"] = popsize
        es = cma.CMAEvolutionStrategy(list(x0), self.spec.sigma0, opts)
        return _CmaState(es, generation, restart, after)

    def _state(self) -> _CmaState:
        """The shared strategy, unpickled again only when another tell saved a new one. Read-only:
        a tell works on its own copy."""
        saved = self.db.load_state()
        if saved["blob"] is not self._saved_blob or self._cached is None:
            self._saved_blob = saved["blob"]
            self._cached = pickle.loads(self._saved_blob)
        return self._cached

    def _candidate(self, st: _CmaState, index: int) -> list[float]:
        """Candidate ``index`` of the current generation: batch k = index // popsize is the
        (k+1)-th ask() on the saved strategy; deterministic, the same in every process."""
        ps = st.es.popsize
        if self._batches_of != (st.restart, st.generation):
            self._batches_of, self._batches, self._asker = (st.restart, st.generation), [], copy.deepcopy(st.es)
        while len(self._batches) <= index // ps:
            self._batches.append([list(map(float, x)) for x in self._asker.ask()])
        return self._batches[index // ps][index % ps]

    def _generation_rows(self, st: _CmaState) -> list[dict]:
        return [r for r in self.db.tagged_since(st.after_trial_id, "cma")
                if r["tag"]["generation"] == st.generation and r["tag"]["restart"] == st.restart]

    def ask(self) -> Proposal:
        queued = self.db.pop_waiting(self.owner)  # a candidate whose worker died: redo it first
        if queued is not None:
            return Proposal(queued._trial_id, queued.number, [float(queued.params[n]) for n in self.names],
                            dict(queued.user_attrs["cma"]))
        st = self._state()
        rows = self._generation_rows(st)
        told = self._advance(st, rows)  # only after a crash between a finish and its tell
        if told is not st:
            st, rows = told, self._generation_rows(told)
        taken = {r["tag"]["index"] for r in rows if r["state"] != "interrupted"}
        index = next(i for i in range(len(taken) + 1) if i not in taken)
        x = self._candidate(st, index)
        attrs = {"generation": st.generation, "index": index, "restart": st.restart}
        trial_id, number = self.db.claim(dict(zip(self.names, x)), self.owner, {"cma": attrs})
        return Proposal(trial_id, number, x, attrs)

    def tell(self, proposal: Proposal, values: Optional[Sequence[float]], record: dict) -> bool:
        ok = self.db.finish(proposal.trial_id, values, record | {"cma": proposal.attrs})
        self._advance(self._state())
        return ok

    def _advance(self, st: _CmaState, rows: Optional[list[dict]] = None) -> _CmaState:
        """Tell the current generation once ``popsize`` of its candidates have finished (the
        lowest indices, when a crash let more finish before anyone told); save and return the new
        state (``st`` itself when there is nothing to tell)."""
        ps = st.es.popsize
        finished = {r["tag"]["index"]: (None if r["state"] == "failed" else -r["value"])  # pycma minimizes
                    for r in (self._generation_rows(st) if rows is None else rows)
                    if r["state"] in ("complete", "failed")}
        if len(finished) < ps:
            return st
        told = sorted(finished)[:ps]
        st = pickle.loads(self._saved_blob)  # a copy to tell; the cached state stays as saved
        es = st.es
        batches = [es.ask() for _ in range(told[-1] // ps + 1)]
        xs = [batches[i // ps][i % ps] for i in told]
        scored = [finished[i] for i in told if finished[i] is not None]
        worst = max(scored) if scored else 0.0
        penalty = worst + 1.0 + abs(worst)  # failed candidates rank below every scored one
        es.tell(xs, [finished[i] if finished[i] is not None else penalty for i in told])
        st.generation += 1
        st.after_trial_id = self.db.last_trial_id()
        if es.stop() and st.restart < self.spec.restarts:
            restart = st.restart + 1
            x0 = np.random.RandomState(self.seed * 7919 + restart).uniform(0, 1, len(self.names))
            popsize = es.popsize * 2
            log.info("cma: stopped (%s); restart %d with popsize %d", dict(es.stop()), restart, popsize)
            st = self._new_es(restart, popsize, x0, st.generation, st.after_trial_id)
        self._save(st)
        return st


# ---------------------------------------------------------------------------------------------
# Optuna samplers


class OptunaDriver(Driver):
    kind = "optuna"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        x0 = dict(zip(self.names, self.x0))
        if self.solo:
            self.sampler = self._restore() or make_sampler(self.spec, self.seed, x0)
        else:  # a worker among others: its own random stream, nothing restored or saved
            self.sampler = make_sampler(self.spec, self.seed + 7919 * (self.owner.slot + 1), x0)
        self.study = self.db.study(self.sampler)
        self.distributions = {n: UNIT for n in self.names}
        if self.solo and self._saved_blob is None:
            self._save(self.sampler)

    def ask(self) -> Proposal:
        with warnings.catch_warnings():  # "heartbeat is supposed to be used with Study.optimize": we record it
            warnings.simplefilter("ignore", UserWarning)
            trial = self.study.ask(self.distributions)
        self.db.adopt(trial._trial_id, self.owner)
        return Proposal(trial._trial_id, trial.number, [float(trial.params[n]) for n in self.names])

    def tell(self, proposal: Proposal, values: Optional[Sequence[float]], record: dict) -> bool:
        frozen = self.db.storage.get_trial(proposal.trial_id)
        if frozen.state != TrialState.RUNNING:
            return False
        state = TrialState.FAIL if values is None else TrialState.COMPLETE
        self.sampler.after_trial(self.study, frozen, state, None if values is None else list(values))
        if not self.solo:
            return self.db.finish(proposal.trial_id, values, record)
        saved = {"driver": self.kind, "blob": pickle.dumps(self.sampler, protocol=pickle.HIGHEST_PROTOCOL)}
        ok = self.db.finish(proposal.trial_id, values, record, driver_state=saved)  # one transaction
        if not ok:
            self.db.save_state(saved)
        self._saved_blob = saved["blob"]
        return ok


def make_driver(db: RunDB, names: Sequence[str], spec: DriverSpec, seed: int, x0: Sequence[float],
                owner: Owner, solo: bool = True) -> Driver:
    driver = CmaDriver if spec.name == "cma" else OptunaDriver
    return driver(db, names, spec, seed, x0, owner, solo)
