"""The search drivers by name, with what each can do, without importing them: the config and the
loop ask these, never a driver's name (as :data:`evomerge.fitness.base.BACKENDS` does for the
fitness backends). A driver is a pure ask/tell class (:class:`evomerge.search.drivers.Driver`)."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module

from evomerge.errors import EvomergeError


@dataclass(frozen=True)
class DriverEntry:
    name: str
    module: str
    cls: str
    samplers: bool = False  # takes driver.sampler, one of Optuna's samplers (search/samplers.py)
    restarts: bool = False  # takes driver.restarts
    multi_objective: bool = False  # searches several objectives (with a sampler that does)
    requeue: bool = False  # a lost candidate is re-queued and redone as proposed (else a lone process re-proposes)
    study: bool = False  # proposes through the run's Optuna study (given to it as ``study_of``)


DRIVERS: dict[str, DriverEntry] = {}


def register_driver(entry: DriverEntry) -> None:
    """Add a driver (a name given twice is refused)."""
    if entry.name in DRIVERS:
        raise EvomergeError(f"search drivers: two drivers are named {entry.name!r}")
    DRIVERS[entry.name] = entry


def driver_class(name: str) -> type:
    entry = DRIVERS[name]
    return getattr(import_module(entry.module), entry.cls)


for _entry in (
    DriverEntry("cma", "evomerge.search.drivers", "CmaDriver", restarts=True, requeue=True),
    DriverEntry("optuna", "evomerge.search.drivers", "OptunaDriver", samplers=True, multi_objective=True, study=True),
):
    register_driver(_entry)
