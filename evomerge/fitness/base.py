"""The fitness backend interface and its registry.

A backend scores a live model (weights changed in place between calls) on a suite's fixed items.
Each entry names the module and class that implement it, imported only when the backend is used
(lm-eval and vLLM are heavy), so configs and the CLI can take the names from here cheaply."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import TYPE_CHECKING, Optional, Protocol

from evomerge.errors import SuiteError, names_that

if TYPE_CHECKING:
    from evomerge.fitness.result import FitnessResult
    from evomerge.fitness.suite import Suite


class FitnessBackend(Protocol):
    name: str

    def score(self, model, tokenizer, suite: "Suite", split: str = "search") -> "FitnessResult":
        """Score ``model`` on the split's items; a failed candidate is a result, not an exception."""


@dataclass(frozen=True)
class BackendEntry:
    """A backend by name, with what it can do; the config, the run's start and the evaluator ask
    these, never the name."""

    name: str
    module: str
    cls: str
    needs_model_dir: bool = False  # started from the base model's directory (an engine of its own: dtype, engine args)
    lm_eval: bool = False  # builds its requests through lm-eval (takes lm-eval's request options)
    streams: bool = False  # takes merged tensors through ``load_weights(items, tokenizer)``, no live model
    check: Optional[str] = None  # "module:function" run on the reference model's directory before a run
    check_suite: Optional[str] = None  # "module:function" run on the suite before a run: what it cannot score


BACKENDS: dict[str, BackendEntry] = {}


def register_backend(entry: BackendEntry) -> None:
    """Add a backend (a name given twice is refused)."""
    if entry.name in BACKENDS:
        raise SuiteError(f"fitness backends: two backends are named {entry.name!r}")
    BACKENDS[entry.name] = entry


for _entry in (
    BackendEntry("native", "evomerge.fitness.native", "NativeBackend",
                 check_suite="evomerge.fitness.native:check_suite"),
    BackendEntry("lm-eval", "evomerge.fitness.lmeval", "LmEvalBackend", lm_eval=True,
                 check_suite="evomerge.fitness.lmeval:check_margin_tasks"),
    BackendEntry("vllm", "evomerge.fitness.vllm", "VllmBackend", needs_model_dir=True, lm_eval=True, streams=True,
                 check="evomerge.fitness.vllm:check_model", check_suite="evomerge.fitness.lmeval:check_margin_tasks"),
):
    register_backend(_entry)


def preflight(name: str, model_dir: str, suite: "Suite") -> None:
    """The backend's own checks before a run: of the reference model's directory, and of the suite
    (what it cannot score), each refused in one line."""
    entry = BACKENDS[name]
    for check, arg in ((entry.check, model_dir), (entry.check_suite, suite)):
        if check:
            module, function = check.split(":")
            getattr(import_module(module), function)(arg)


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
        raise SuiteError(f"lm-eval options apply to the {names_that(BACKENDS, 'lm_eval')} backends, not {name!r}")
    return cls(**kwargs)
