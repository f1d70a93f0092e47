"""Fitness: suites of tasks and the backends that score a live model on them.

Every backend has ``score(model, tokenizer, suite, split="search") -> FitnessResult``.
"""

from __future__ import annotations

from evomerge.fitness.result import FitnessResult, ItemResult, TaskResult
from evomerge.fitness.suite import Suite, SuiteError

BACKENDS = ("native", "lm-eval", "vllm")


def get_backend(name: str, *, model_dir: str | None = None, batch_size: int = 32):
    """A backend by name; ``model_dir`` (the base model's directory) is needed by vllm."""
    if name == "native":
        from evomerge.fitness.native import NativeBackend

        return NativeBackend(batch_size=max(batch_size, 1))
    if name == "lm-eval":
        from evomerge.fitness.lmeval import LmEvalBackend

        return LmEvalBackend(batch_size=batch_size)
    if name == "vllm":
        from evomerge.fitness.lmeval import VllmBackend

        if model_dir is None:
            raise SuiteError("the vllm backend needs the base model's directory")
        return VllmBackend(model_dir)
    raise SuiteError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "FitnessResult", "ItemResult", "Suite", "SuiteError", "TaskResult", "get_backend"]
