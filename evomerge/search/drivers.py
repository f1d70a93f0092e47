"""Search drivers: propose vectors in [0, 1]^d and learn from their fitness, like pycma's ask/tell.

A driver neither claims nor records candidates, and keeps no budget: the search loop
(:mod:`.claims`) does, under the run's lock. A driver's state is plain data (numbers, lists,
strings), which the loop stores in the run database; nothing it reads back from there is
unpickled, so whoever can write the database cannot run code in a worker.

- ``cma``: pycma's ask/tell with bounds [0, 1], ``popsize``, ``sigma0``, a seed and optional IPOP
  restarts (popsize doubles, a new random start) when pycma's stop criteria fire; with none left it
  keeps proposing from its last distribution, and the budget ends the run. Its state is the seed,
  the current restart, and the fitness values told so far in it: the strategy is rebuilt by
  replaying those tells (each process replays only what it has not yet seen), which gives
  pycma's own state bit for bit. The candidates of a generation are numbered: 0..popsize-1 are
  pycma's ``ask()`` from the strategy, and when they are all taken a worker takes the next index,
  drawn by further ``ask()`` calls on the same distribution, instead of waiting. The first
  ``popsize`` candidates of a generation to finish are told; whoever finishes the last of them
  tells, and the next ask is from the new generation. Candidates that finish after their
  generation was told are kept (they count, and can be the best) but do not move the
  distribution. With one process, every generation is exactly pycma's ask and tell, so a resumed
  run proposes the candidates an uninterrupted one would have.
- ``optuna``: an Optuna sampler (``tpe`` with constant liar, ``cmaes``, ``gp``, ``random``,
  ``nsga2``) on the run's study; these read the shared trials themselves, and Optuna's ``ask``
  creates the trial the loop then claims. One process keeps the sampler's random streams as its
  state, so a resumed run continues them; each worker of a multi-worker run draws from its own
  seed instead. (GP's warm-start cache is not kept: a resumed GP run refits from scratch.)

Both maximize.
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from evomerge.config import DriverSpec
from evomerge.errors import EvomergeError
from evomerge.search.samplers import make_sampler

log = logging.getLogger(__name__)


class DriverStateError(EvomergeError):
    """The driver state in the run database is not one this driver wrote."""


@dataclass
class Proposal:
    vector: list[float]
    tag: dict = field(default_factory=dict)  # kept with the candidate (the driver's attr ``Driver.tag_key``)
    trial_id: Optional[int] = None  # set once claimed (Optuna creates its own trial in ``ask``)
    number: Optional[int] = None


class Driver:
    """``ask(rows)`` -> Proposal; ``tell(proposal, values, rows)`` -> the new state to save, or None.

    ``rows`` are the run's candidates tagged with ``tag_key`` since ``since`` (the loop reads
    them), for drivers whose proposals depend on what every worker has taken and finished."""

    kind = ""
    tag_key: Optional[str] = None
    shared = False  # one state for every process of the run (else each keeps its own)

    def __init__(self, names: Sequence[str], spec: DriverSpec, seed: int, x0: Sequence[float], slot: int = 0,
                 solo: bool = True):
        self.names = list(names)
        self.spec = spec
        self.seed = seed
        self.x0 = [float(v) for v in x0]
        self.slot = slot
        self.solo = solo

    @property
    def since(self) -> int:
        return 0

    def initial_state(self, last_trial_id: int) -> Optional[dict]:
        """The state a new run starts from (None: nothing to keep)."""
        return None

    def load(self, state: dict) -> None:
        """Take the state last saved (by this process or another)."""

    def ask(self, rows: list[dict]) -> Proposal:
        raise NotImplementedError

    def tell(self, proposal: Proposal, values: Optional[Sequence[float]], rows: list[dict],
             last_trial_id: int) -> Optional[dict]:
        raise NotImplementedError

    def _check(self, state: dict, keys: dict[str, type]) -> None:
        if not isinstance(state, dict) or state.get("driver") != self.kind:
            found = state.get("driver") if isinstance(state, dict) else type(state).__name__
            raise DriverStateError(f"run database: the driver state is {found!r}'s, not {self.kind}'s; the run was "
                                   "made with another driver")
        for key, kind in keys.items():
            if not isinstance(state.get(key), kind):
                raise DriverStateError(f"run database: {self.kind} driver state: {key!r} is missing or not a "
                                       f"{kind.__name__}")


# ---------------------------------------------------------------------------------------------
# pycma


class CmaDriver(Driver):
    kind = "cma"
    tag_key = "cma"
    shared = True

    def __init__(self, *args, opts: Optional[dict[str, Any]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.opts = dict(opts or {})  # extra pycma options (tests set maxiter)
        self.state: Optional[dict] = None
        self.es = None  # the strategy after the state's tells
        self._told = 0  # how many of the restart's tells ``es`` has seen
        self._told_by_me: Optional[tuple[dict, Any]] = None  # the state tell() returned, and its strategy
        # the current generation's draws: (restart, generation), the batches asked, the strategy asking them
        self._batches_of: Optional[tuple[int, int]] = None
        self._batches: list[list[list[float]]] = []
        self._asker = None

    def _new_es(self, restart: int, popsize: Optional[int], x0: Sequence[float]):
        import cma

        rng = np.random.RandomState(self.seed * 1000 + restart + 1)
        opts = {"bounds": [0.0, 1.0], "seed": self.seed * 1000 + restart + 1, "verbose": -9, "randn": rng.randn}
        if popsize:
            opts["popsize"] = popsize
        return cma.CMAEvolutionStrategy(list(x0), self.spec.sigma0, opts | self.opts)

    def initial_state(self, last_trial_id: int) -> dict:
        es = self._new_es(0, self.spec.popsize, self.x0)
        return {"driver": self.kind, "restart": 0, "generation": 0, "popsize": int(es.popsize),
                "x0": self.x0, "after_trial_id": last_trial_id, "tells": []}

    @property
    def since(self) -> int:
        return self.state["after_trial_id"]

    def load(self, state: dict) -> None:
        self._check(state, {"restart": int, "generation": int, "popsize": int, "x0": list,
                            "after_trial_id": int, "tells": list})
        if len(state["x0"]) != len(self.names):
            raise DriverStateError(f"run database: cma driver state: x0 has {len(state['x0'])} coordinates, the "
                                   f"space {len(self.names)}")
        old, told = self.state, self._told_by_me
        self._told_by_me = None
        if told is not None and told[0] is state:  # this process's own tell: its strategy is ready
            self.es, self._told = told[1], len(state["tells"])
        elif (self.es is None or old is None or old["restart"] != state["restart"]
                or old["tells"] != state["tells"][:len(old["tells"])]):
            self.es, self._told = self._new_es(state["restart"], state["popsize"], state["x0"]), 0
        for indices, fitness in state["tells"][self._told:]:
            self._replay(self.es, indices, fitness)
        self._told = len(state["tells"])
        self.state = state

    def _replay(self, es, indices: list, fitness: list) -> None:
        if not (isinstance(indices, list) and isinstance(fitness, list) and len(indices) == len(fitness) > 0
                and all(isinstance(i, int) and i >= 0 for i in indices)
                and all(isinstance(f, (int, float)) for f in fitness)):
            raise DriverStateError("run database: cma driver state: a told generation is not a list of "
                                   "candidate indices and their fitness values")
        ps = es.popsize
        batches = [es.ask() for _ in range(max(indices) // ps + 1)]
        es.tell([batches[i // ps][i % ps] for i in indices], [float(f) for f in fitness])

    def _candidate(self, index: int) -> list[float]:
        """Candidate ``index`` of the current generation: batch k = index // popsize is the
        (k+1)-th ask() on the strategy; deterministic, the same in every process."""
        st, ps = self.state, self.es.popsize
        if self._batches_of != (st["restart"], st["generation"]):
            self._batches_of, self._batches, self._asker = (st["restart"], st["generation"]), [], copy.deepcopy(self.es)
        while len(self._batches) <= index // ps:
            self._batches.append([list(map(float, x)) for x in self._asker.ask()])
        return self._batches[index // ps][index % ps]

    def _generation(self, rows: list[dict]) -> list[dict]:
        st = self.state
        return [r for r in rows if r["tag"].get("generation") == st["generation"]
                and r["tag"].get("restart") == st["restart"]]

    def ask(self, rows: list[dict]) -> Proposal:
        taken = {r["tag"]["index"] for r in self._generation(rows) if r["state"] != "interrupted"}
        index = next(i for i in range(len(taken) + 1) if i not in taken)
        return Proposal(self._candidate(index), {"generation": self.state["generation"], "index": index,
                                                 "restart": self.state["restart"]})

    def tell(self, proposal: Proposal, values: Optional[Sequence[float]], rows: list[dict],
             last_trial_id: int) -> Optional[dict]:
        """Once ``popsize`` candidates of the current generation have finished (this one with
        ``values``), tell the lowest indices; the new state, or None when there is nothing to tell."""
        st, ps = self.state, self.es.popsize
        mine = {"trial_id": proposal.trial_id, "tag": proposal.tag, "state": "failed" if values is None else
                "complete", "value": None if values is None else values[0]}
        rows = [r for r in rows if r["trial_id"] != proposal.trial_id] + [mine]
        finished = {r["tag"]["index"]: (None if r["state"] == "failed" else -r["value"])  # pycma minimizes
                    for r in self._generation(rows) if r["state"] in ("complete", "failed")}
        if len(finished) < ps:
            return None
        told = sorted(finished)[:ps]
        scored = [finished[i] for i in told if finished[i] is not None]
        worst = max(scored) if scored else 0.0
        penalty = worst + 1.0 + abs(worst)  # failed candidates rank below every scored one
        fitness = [finished[i] if finished[i] is not None else penalty for i in told]
        es = copy.deepcopy(self.es)  # a copy: the state is only ours once the loop has saved it
        self._replay(es, told, fitness)
        new = st | {"generation": st["generation"] + 1, "after_trial_id": last_trial_id,
                    "tells": st["tells"] + [[told, fitness]]}
        if es.stop() and st["restart"] < self.spec.restarts:
            restart = st["restart"] + 1
            x0 = np.random.RandomState(self.seed * 7919 + restart).uniform(0, 1, len(self.names))
            popsize = es.popsize * 2
            log.info("cma: stopped (%s); restart %d with popsize %d", dict(es.stop()), restart, popsize)
            new |= {"restart": restart, "popsize": popsize, "x0": [float(v) for v in x0], "tells": []}
        else:
            self._told_by_me = (new, es)  # taken by load() once the loop has saved ``new``
        return new


# ---------------------------------------------------------------------------------------------
# Optuna samplers


def _random_streams(obj: Any, path: str = "", seen: Optional[set] = None) -> dict[str, Any]:
    """Every numpy RandomState reachable from a sampler through its attributes, by path."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return {}
    seen.add(id(obj))
    if isinstance(obj, np.random.RandomState):
        return {path: obj}
    if type(obj).__name__ == "LazyRandomState":
        return {path: obj.rng}
    out: dict[str, Any] = {}
    if type(obj).__module__.startswith("optuna.") and hasattr(obj, "__dict__"):
        for k, v in vars(obj).items():
            out |= _random_streams(v, f"{path}.{k}", seen)
    return out


def _stream_state(rng: np.random.RandomState) -> list:
    kind, keys, pos, has_gauss, gauss = rng.get_state()
    return [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(gauss)]


class OptunaDriver(Driver):
    kind = "optuna"

    def __init__(self, *args, study_of=None, **kwargs):
        super().__init__(*args, **kwargs)
        x0 = dict(zip(self.names, self.x0))
        seed = self.seed if self.solo else self.seed + 7919 * (self.slot + 1)  # a worker: its own stream
        self.sampler = make_sampler(self.spec, seed, x0)
        self.study = study_of(self.sampler)
        from evomerge.rundb.optuna_sql import UNIT

        self.distributions = {n: UNIT for n in self.names}

    def _state(self) -> dict:
        return {"driver": self.kind, "sampler": self.spec.sampler,
                "streams": {p: _stream_state(r) for p, r in _random_streams(self.sampler).items()}}

    def initial_state(self, last_trial_id: int) -> Optional[dict]:
        return self._state() if self.solo else None

    def load(self, state: dict) -> None:
        if not self.solo:
            return
        self._check(state, {"sampler": str, "streams": dict})
        streams = _random_streams(self.sampler)
        if state["sampler"] != self.spec.sampler or set(state["streams"]) != set(streams):
            raise DriverStateError(f"run database: optuna driver state is for sampler {state['sampler']!r} "
                                   f"({', '.join(sorted(state['streams']))}), not {self.spec.sampler!r}")
        for path, rng in streams.items():
            try:
                kind, keys, pos, has_gauss, gauss = state["streams"][path]
                rng.set_state((str(kind), np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(gauss)))
            except (TypeError, ValueError) as e:
                raise DriverStateError(f"run database: optuna driver state: stream {path}: {e}") from None

    def ask(self, rows: list[dict]) -> Proposal:
        with warnings.catch_warnings():  # "heartbeat is supposed to be used with Study.optimize": we record it
            warnings.simplefilter("ignore", UserWarning)
            trial = self.study.ask(self.distributions)
        return Proposal([float(trial.params[n]) for n in self.names], trial_id=trial._trial_id, number=trial.number)

    def tell(self, proposal: Proposal, values: Optional[Sequence[float]], rows: list[dict],
             last_trial_id: int) -> Optional[dict]:
        from optuna.trial import TrialState

        frozen = self.study._storage.get_trial(proposal.trial_id)
        if frozen.state == TrialState.RUNNING:  # else it was reclaimed: nothing to learn from
            state = TrialState.FAIL if values is None else TrialState.COMPLETE
            self.sampler.after_trial(self.study, frozen, state, None if values is None else list(values))
        return self._state() if self.solo else None

