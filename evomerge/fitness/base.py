"""The fitness backend interface and its registry.

A backend scores a live model (weights changed in place between calls) on a suite's fixed items.
Each entry names the module and class that implement it, imported only when the backend is used
(lm-eval and vLLM are heavy), so configs and the CLI can take the names from here cheaply."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import TYPE_CHECKING, Optional, Protocol

from evomerge.errors import SuiteError

if TYPE_CHECKING:
    from evomerge.fitness.result import FitnessResult
    from evomerge.fitness.suite import Suite


class FitnessBackend(Protocol):
    name: str

    def score(self, model, tokenizer, suite: "Suite", split: str = "search") -> "FitnessResult":
        """Score ``model`` on the split's items; a failed candidate is a result, not an exception."""


@dataclass(frozen=True)
class BackendEntry:
    name: str
    module: str
    cls: str
    needs_model_dir: bool = False  # started from the base model's directory (an engine of its own)


BACKENDS: dict[str, BackendEntry] = {e.name: e for e in (
    BackendEntry("native", "evomerge.fitness.native", "NativeBackend"),
    BackendEntry("lm-eval", "evomerge.fitness.lmeval", "LmEvalBackend"),
    BackendEntry("vllm", "evomerge.fitness.lmeval", "VllmBackend", needs_model_dir=True),
)}


def get_backend(name: str, *, model_dir: Optional[str] = None, batch_size: int = 32) -> FitnessBackend:
    """A backend by name; ``model_dir`` (the base model's directory) is needed by those that start
    an engine of their own."""
    entry = BACKENDS.get(name)
    if entry is None:
        raise SuiteError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    cls = getattr(import_module(entry.module), entry.cls)
    if entry.needs_model_dir:
        if model_dir is None:
            raise SuiteError(f"the {name} backend needs the base model's directory")
        return cls(model_dir)
    return cls(batch_size=max(batch_size, 1))
