"""Search drivers: propose vectors in [0, 1]^d, learn from their fitness.

- ``cma``: pycma's ask/tell with bounds [0, 1], ``popsize``, ``sigma0``, a seed and optional IPOP
  restarts (popsize doubles, a new random start) when pycma's stop criteria fire; with none left it
  keeps proposing from its last distribution, and the budget ends the run. Its own random stream is part of its state,
  pickled into the run database after every tell; a generation's candidates are recorded with their
  generation and index, so after a crash the same generation is asked again, its completed
  candidates are reused and only the rest are evaluated.
- ``optuna``: an Optuna sampler (``tpe``, ``cmaes``, ``gp``, ``random``, ``nsga2``) on the same
  storage; the sampler (with its random state) is pickled after every tell.

Both maximize the fitness. With a fixed seed, a resumed run proposes the candidates an
uninterrupted run would have.
"""

from __future__ import annotations

import logging
import math
import pickle
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import optuna

from .config import DriverSpec
from .errors import EvomergeError
from .rundb import UNIT, RunDB

log = logging.getLogger(__name__)


@dataclass
class Proposal:
    number: Optional[int]  # the trial number in the run database (cma: known once recorded)
    vector: list[float]
    attrs: dict = field(default_factory=dict)


class Driver:
    """ask() -> Proposal, or None when the driver has nothing left; tell(proposal, values or None
    when the candidate failed, the record to keep) records the candidate and updates the driver.

    The state saved is always the one right after the last tell: asking advances random streams,
    and a run stopped between an ask and its tell must propose the same candidate again."""

    kind = ""

    def __init__(self, db: RunDB, names: Sequence[str], spec: DriverSpec, seed: int, x0: Sequence[float]):
        self.db = db
        self.names = list(names)
        self.spec = spec
        self.seed = seed
        self.x0 = [float(v) for v in x0]
        saved = db.load_state()
        if saved is not None and saved.get("driver") != self.kind:
            raise EvomergeError(f"the run database holds a {saved.get('driver')} driver's state, not {self.kind}'s; "
                                "the run was made with another driver")
        self.elapsed = saved["elapsed"] if saved else 0.0  # search seconds so far (for the wall-time budget)
        self._snapshot: Optional[bytes] = saved["blob"] if saved else None

    def restored(self):
        """The state object saved by the last tell, or None for a new run."""
        return None if self._snapshot is None else pickle.loads(self._snapshot)

    def checkpoint(self, state: object) -> None:
        """Snapshot the state right after a tell, and save it."""
        self._snapshot = pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
        self.save()

    def save(self) -> None:
        if self._snapshot is not None:
            self.db.save_state({"driver": self.kind, "blob": self._snapshot, "elapsed": self.elapsed})

    def ask(self) -> Optional[Proposal]:
        raise NotImplementedError

    def tell(self, proposal: Proposal, values: Optional[Sequence[float]], record: dict) -> None:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# pycma


@dataclass
class _CmaState:
    es: object  # cma.CMAEvolutionStrategy, carrying its own RandomState
    generation: int  # generations told so far, over all restarts
    restart: int


class CmaDriver(Driver):
    kind = "cma"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.state: _CmaState = self.restored() or self._new_es(0, self.spec.popsize, self.x0, generation=0)
        if self._snapshot is None:
            self.checkpoint(self.state)
        self._generation: Optional[list[list[float]]] = None
        self._results: dict[int, Optional[float]] = {}  # index -> -fitness (pycma minimizes), None if failed
        self._pending: set[int] = set()  # indices asked but not told
        self._check_db = True  # on the first generation of a process: reuse what a previous one recorded

    def _new_es(self, restart: int, popsize: Optional[int], x0: Sequence[float], generation: int) -> _CmaState:
        import cma

        rng = np.random.RandomState(self.seed * 1000 + restart + 1)
        opts = {"bounds": [0.0, 1.0], "seed": self.seed * 1000 + restart + 1, "verbose": -9, "randn": rng.randn}
        if popsize:
            opts["popsize"] = popsize
        es = cma.CMAEvolutionStrategy(list(x0), self.spec.sigma0, opts)
        return _CmaState(es, generation, restart)

    def _load_generation(self) -> None:
        """Ask the current generation (deterministic from the saved state) and match it with the
        candidates already recorded for it."""
        s = self.state
        self._generation = [list(map(float, x)) for x in s.es.ask()]
        self._results, self._pending = {}, set()
        if not self._check_db:
            return  # this process recorded every candidate since the last tell: none of this generation
        self._check_db = False
        for t in self.db.trials():
            a = (t.user_attrs.get("result") or {}).get("cma", {})
            if a.get("generation") != s.generation or t.user_attrs.get("interrupted"):
                continue
            i = a["index"]
            stored = [t.params[n] for n in self.names]
            if stored != self._generation[i]:
                raise EvomergeError(f"resume: candidate {t.number} (generation {s.generation}, index {i}) differs "
                                    "from what the restored driver proposes; the run database does not match")
            if t.state == optuna.trial.TrialState.COMPLETE:
                self._results[i] = -t.values[0]
            elif t.state == optuna.trial.TrialState.FAIL:
                self._results[i] = None

    def ask(self) -> Optional[Proposal]:
        if self._generation is None:
            self._load_generation()
        for i, x in enumerate(self._generation):
            if i not in self._results and i not in self._pending:
                self._pending.add(i)
                return Proposal(None, x, {"generation": self.state.generation, "index": i,
                                          "restart": self.state.restart})
        return None  # the whole generation is out; wait for tells (one worker never gets here)

    def tell(self, proposal: Proposal, values: Optional[Sequence[float]], record: dict) -> None:
        i = proposal.attrs["index"]
        self._pending.discard(i)
        proposal.number = self.db.record(dict(zip(self.names, proposal.vector)), record | {"cma": proposal.attrs},
                                         values)
        self._results[i] = None if values is None else -values[0]
        if len(self._results) == len(self._generation):
            self._tell_generation()

    def _tell_generation(self) -> None:
        s = self.state
        finite = [v for v in self._results.values() if v is not None and math.isfinite(v)]
        worst = max(finite) if finite else 0.0
        penalty = worst + 1.0 + abs(worst)  # failed candidates rank below every scored one
        fs = [self._results[i] if self._results[i] is not None else penalty for i in range(len(self._generation))]
        s.es.tell(self._generation, fs)
        s.generation += 1
        self._generation = None
        if s.es.stop() and s.restart < self.spec.restarts:
            restart = s.restart + 1
            x0 = np.random.RandomState(self.seed * 7919 + restart).uniform(0, 1, len(self.names))
            popsize = s.es.popsize * 2
            log.info("cma: stopped (%s); restart %d with popsize %d", dict(s.es.stop()), restart, popsize)
            self.state = self._new_es(restart, popsize, x0, s.generation)
        self.checkpoint(self.state)


# ---------------------------------------------------------------------------------------------
# Optuna samplers


def make_sampler(spec: DriverSpec, seed: int, x0: dict[str, float]):
    s = spec.sampler
    startup = spec.n_startup_trials
    if s == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True,
                                          **({"n_startup_trials": startup} if startup is not None else {}))
    if s == "cmaes":
        return optuna.samplers.CmaEsSampler(x0=x0, sigma0=spec.sigma0, seed=seed, popsize=spec.popsize,
                                            n_startup_trials=startup or 0, warn_independent_sampling=False)
    if s == "gp":
        return optuna.samplers.GPSampler(seed=seed, **({"n_startup_trials": startup} if startup is not None else {}))
    if s == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if s == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, **({"population_size": spec.popsize} if spec.popsize else {}))
    raise EvomergeError(f"driver.sampler: unknown sampler {s!r}")


class OptunaDriver(Driver):
    kind = "optuna"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sampler = self.restored() or make_sampler(self.spec, self.seed, dict(zip(self.names, self.x0)))
        if self._snapshot is None:
            self.checkpoint(self.sampler)
        self.study = self.db.study(self.sampler)
        self.distributions = {n: UNIT for n in self.names}

    def ask(self) -> Optional[Proposal]:
        trial = self.study.ask(self.distributions)
        return Proposal(trial.number, [float(trial.params[n]) for n in self.names])

    def tell(self, proposal: Proposal, values: Optional[Sequence[float]], record: dict) -> None:
        self.db.set_result(proposal.number, record)
        self.db.finish(self.study, proposal.number, values)
        self.checkpoint(self.sampler)


def make_driver(db: RunDB, names: Sequence[str], spec: DriverSpec, seed: int, x0: Sequence[float]) -> Driver:
    driver = CmaDriver if spec.name == "cma" else OptunaDriver
    return driver(db, names, spec, seed, x0)
