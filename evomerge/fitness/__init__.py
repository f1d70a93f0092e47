"""Fitness: suites of tasks and the backends that score a live model on them (see :mod:`.base`)."""

from __future__ import annotations

from evomerge.fitness.base import BACKENDS, FitnessBackend, get_backend
from evomerge.fitness.result import FitnessResult, ItemResult, TaskResult
from evomerge.fitness.suite import Suite, SuiteError

__all__ = ["BACKENDS", "FitnessBackend", "FitnessResult", "ItemResult", "Suite", "SuiteError", "TaskResult",
           "get_backend"]
