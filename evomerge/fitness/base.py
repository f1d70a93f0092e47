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
    lm_eval: bool = False  # builds its requests through lm-eval (takes lm-eval's request options)


BACKENDS: dict[str, BackendEntry] = {e.name: e for e in (
    BackendEntry("native", "evomerge.fitness.native", "NativeBackend"),
    BackendEntry("lm-eval", "evomerge.fitness.lmeval", "LmEvalBackend", lm_eval=True),
    BackendEntry("vllm", "evomerge.fitness.vllm", "VllmBackend", needs_model_dir=True, lm_eval=True),
)}


def get_backend(name: str, *, model_dir: Optional[str] = None, batch_size: int = 32, dtype: Optional[str] = None,
                engine: Optional[dict] = None, options: Optional[dict] = None) -> FitnessBackend:
    """A backend by name. ``model_dir`` (the reference model's directory) is needed by those that
    start an engine of their own, which also take the weights' ``dtype`` and ``engine`` arguments;
    ``options`` are lm-eval's request options (lm-eval and vllm backends)."""
    entry = BACKENDS.get(name)
    if entry is None:
        raise SuiteError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    cls = getattr(import_module(entry.module), entry.cls)
    kwargs: dict = {"batch_size": max(batch_size, 1)}
    if entry.needs_model_dir:
        if model_dir is None:
            raise SuiteError(f"the {name} backend needs the base model's directory")
        kwargs |= {"model_dir": model_dir, "dtype": dtype, "engine": engine}
    if entry.lm_eval:
        kwargs["options"] = options
    elif options:
        raise SuiteError(f"lm-eval options apply to the lm-eval and vllm backends, not {name!r}")
    return cls(**kwargs)
