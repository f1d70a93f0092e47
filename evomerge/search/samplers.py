"""The Optuna samplers the ``optuna`` driver can use, by name: each builds its sampler from the
driver settings, the seed and the start point. Optuna is imported only when one is built."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from evomerge.config import DriverSpec


def _startup(spec: "DriverSpec", key: str = "n_startup_trials") -> dict:
    return {key: spec.n_startup_trials} if spec.n_startup_trials is not None else {}


def _tpe(spec: "DriverSpec", seed: int, x0: dict[str, float]):
    import optuna

    return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True, **_startup(spec))


def _cmaes(spec: "DriverSpec", seed: int, x0: dict[str, float]):
    import optuna

    return optuna.samplers.CmaEsSampler(x0=x0, sigma0=spec.sigma0, seed=seed, popsize=spec.popsize,
                                        n_startup_trials=spec.n_startup_trials or 0, warn_independent_sampling=False)


def _gp(spec: "DriverSpec", seed: int, x0: dict[str, float]):
    import optuna

    return optuna.samplers.GPSampler(seed=seed, **_startup(spec))


def _random(spec: "DriverSpec", seed: int, x0: dict[str, float]):
    import optuna

    return optuna.samplers.RandomSampler(seed=seed)


def _nsga2(spec: "DriverSpec", seed: int, x0: dict[str, float]):
    import optuna

    return optuna.samplers.NSGAIISampler(seed=seed, **({"population_size": spec.popsize} if spec.popsize else {}))


SAMPLERS: dict[str, Callable] = {"tpe": _tpe, "cmaes": _cmaes, "gp": _gp, "random": _random, "nsga2": _nsga2}
DEFAULT_SAMPLER = "tpe"
SINGLE_OBJECTIVE = frozenset({"cmaes"})  # Optuna's CmaEsSampler searches one objective


def make_sampler(spec: "DriverSpec", seed: int, x0: dict[str, float]):
    return SAMPLERS[spec.sampler](spec, seed, x0)
