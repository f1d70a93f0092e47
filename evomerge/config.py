"""A run's config file: models, merge method, search space, fitness, driver, budget.

Validated with pydantic; every error names the file and the key at fault. Model references and
file paths are resolved against the config file's directory, and :meth:`RunConfig.resolved` gives
the self-contained form a run directory keeps (absolute paths, inline suites with absolute data).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from evomerge.errors import EvomergeError, names_that
from evomerge.fitness.base import BACKENDS
from evomerge.inputs import load_yaml, validate
from evomerge.merging.methods import METHODS
from evomerge.merging.recipe import PASSTHROUGH, DtypeName, check_method
from evomerge.search.registry import DRIVERS
from evomerge.search.samplers import DEFAULT_SAMPLER, SAMPLERS, SINGLE_OBJECTIVE

class ConfigError(EvomergeError):
    """A run config is invalid."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelsSpec(_Strict):
    base: Optional[str] = None
    experts: list[str] = Field(min_length=1)

    def names(self) -> list[str]:
        """Every model, the base first."""
        return ([self.base] if self.base else []) + list(self.experts)


class VllmEngineSpec(_Strict):
    """Engine arguments of the vllm backend (vLLM's own names)."""
    max_model_len: Optional[int] = Field(None, ge=16)
    gpu_memory_utilization: Optional[float] = Field(None, gt=0, le=1)
    tensor_parallel_size: int = Field(1, ge=1)
    enforce_eager: bool = True


MAX_FEWSHOT = 256  # more examples than any benchmark prompt of a causal LM holds
MAX_GEN_TOKS = 32768


class GenKwargs(_Strict):
    """lm-eval's generation arguments of generate tasks, typed: a wrong type or range is refused
    when the run starts, not by every candidate."""
    model_config = ConfigDict(extra="forbid", strict=True)
    until: Optional[list[str]] = None  # stop sequences (one string is a list of one)
    max_gen_toks: Optional[int] = Field(None, ge=1, le=MAX_GEN_TOKS)
    do_sample: Optional[bool] = None
    temperature: Optional[float] = Field(None, ge=0, le=100)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=1)
    seed: Optional[int] = None

    @field_validator("until", mode="before")
    @classmethod
    def _one_stop(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class LmEvalOptions(_Strict):
    """How lm-eval builds the requests (the lm-eval and vllm backends): lm-eval's own names."""
    num_fewshot: Optional[int] = Field(None, ge=0, le=MAX_FEWSHOT)  # None: each task's default (0 for local tasks)
    fewshot_seed: int = 1234  # which examples are drawn: fixed, so every candidate sees the same prompts
    apply_chat_template: bool = False
    system_instruction: Optional[str] = None
    fewshot_as_multiturn: bool = False
    gen_kwargs: GenKwargs = GenKwargs()  # generate tasks

    @model_validator(mode="after")
    def _multiturn(self) -> "LmEvalOptions":
        if self.fewshot_as_multiturn and not self.apply_chat_template:
            raise ValueError("fewshot_as_multiturn needs apply_chat_template: true")
        return self


class RacingSpec(_Strict):
    """Multi-fidelity scoring: a candidate is scored on growing prefixes of each task's search
    items (``rungs``: fractions) and goes on only while it may still reach the top of the run."""
    rungs: list[float] = Field(default_factory=lambda: [0.1, 0.3], min_length=1)
    z: float = Field(0.25, ge=0, le=10)  # standard errors a candidate may trail the best and still go on

    @field_validator("rungs")
    @classmethod
    def _rungs(cls, v: list[float]) -> list[float]:
        if any(not 0 < f < 1 for f in v) or any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError(f"rungs must be increasing fractions between 0 and 1 (exclusive), got {v}")
        return v


class EstimateSpec(_Strict):
    """Cheaper fitness: anchor items and/or racing (see evomerge.fitness.estimate)."""
    anchors: Optional[int] = Field(None, ge=1)  # items per task, chosen by clustering, scored first
    calibration: Optional[int] = Field(None, ge=0)  # candidates scored in full before anchors are chosen
    racing: Optional[RacingSpec] = None

    @model_validator(mode="after")
    def _check(self) -> "EstimateSpec":
        if self.anchors is None and self.racing is None:
            raise ValueError("give anchors, racing or both")
        if self.calibration is not None and self.anchors is None:
            raise ValueError("calibration applies to anchors (the candidates their choice is fitted on)")
        if self.anchors is not None and self.calibration is None:
            self.calibration = 16
        return self


class FitnessSpec(_Strict):
    suite: Union[str, dict[str, Any]]
    backend: str = "native"
    batch_size: int = Field(32, ge=1)
    lm_eval: Optional[LmEvalOptions] = None  # the lm-eval and vllm backends' request options
    engine: Optional[VllmEngineSpec] = None  # the vllm backend's engine arguments
    estimate: Optional[EstimateSpec] = None  # score most candidates on part of the items

    @field_validator("backend")
    @classmethod
    def _backend(cls, v: str) -> str:
        return _registered(v, BACKENDS, "backend")

    @field_validator("lm_eval")
    @classmethod
    def _options_need_lm_eval(cls, v: Optional[LmEvalOptions], info: ValidationInfo) -> Optional[LmEvalOptions]:
        backend = info.data.get("backend")
        if v is not None and backend in BACKENDS and not BACKENDS[backend].lm_eval:
            raise ValueError(f"lm-eval options apply to the {names_that(BACKENDS, 'lm_eval')} backends, not {backend!r}")
        return v

    @field_validator("engine")
    @classmethod
    def _engine_needs_vllm(cls, v: Optional[VllmEngineSpec], info: ValidationInfo) -> Optional[VllmEngineSpec]:
        backend = info.data.get("backend")
        if v is not None and backend in BACKENDS and not BACKENDS[backend].needs_model_dir:
            names = names_that(BACKENDS, "needs_model_dir")
            raise ValueError(f"engine arguments apply to the {names} backend{'s' if ' and ' in names else ''}, "
                             f"not {backend!r}")
        return v


def _registered(v: Optional[str], registry: dict, what: str) -> Optional[str]:
    if v is not None and v not in registry:
        raise ValueError(f"unknown {what} {v!r}; known: {', '.join(registry)}")
    return v


class DriverSpec(_Strict):
    name: str = "cma"
    sampler: Optional[str] = None
    popsize: Optional[int] = Field(None, ge=2)
    sigma0: float = Field(1 / 6, gt=0, le=1)
    restarts: int = Field(0, ge=0)
    x0: Literal["default", "center"] = "default"
    n_startup_trials: Optional[int] = Field(None, ge=0)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _registered(v, DRIVERS, "driver")

    @field_validator("sampler")
    @classmethod
    def _sampler(cls, v: Optional[str]) -> Optional[str]:
        return _registered(v, SAMPLERS, "sampler")

    @model_validator(mode="after")
    def _check(self) -> "DriverSpec":
        entry = DRIVERS[self.name]
        if entry.samplers and self.sampler is None:
            self.sampler = DEFAULT_SAMPLER
        if not entry.samplers and self.sampler is not None:
            raise ValueError(f"sampler applies to driver {names_that(DRIVERS, 'samplers')} only, not {self.name}")
        if not entry.restarts and self.restarts:
            raise ValueError(f"restarts applies to driver {names_that(DRIVERS, 'restarts')} only, not {self.name}")
        return self


class BudgetSpec(_Strict):
    max_candidates: Optional[int] = Field(None, ge=1)
    max_minutes: Optional[float] = Field(None, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "BudgetSpec":
        if self.max_candidates is None and self.max_minutes is None:
            raise ValueError("give max_candidates, max_minutes or both")
        if self.max_minutes is not None and not math.isfinite(self.max_minutes):
            raise ValueError("max_minutes must be finite")
        return self


class HeartbeatSpec(_Strict):
    """How a candidate whose worker died is noticed: the worker records a heartbeat every
    ``interval_s``; a candidate with none for ``grace_s`` is failed and redone elsewhere."""
    interval_s: int = Field(10, ge=1)
    grace_s: int = Field(60, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "HeartbeatSpec":
        if self.grace_s <= self.interval_s:
            raise ValueError("grace_s must be longer than interval_s")
        return self


RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")


def run_name_problem(name: str) -> Optional[str]:
    """Why ``name`` cannot name a run (it names the run's directory under runs/ and its studies in
    the run database): one path component of letters, digits and ``._+-``; None if it can."""
    if RUN_NAME.fullmatch(name) and not name.endswith(".references"):
        return None
    return (f"{name!r} is not a run name: use 1 to 100 letters, digits, '.', '_', '+' or '-', starting with "
            "a letter or digit (one path component)")


def _run_method(v: str) -> str:
    return v if v == PASSTHROUGH else check_method(v)


class RunConfig(_Strict):
    name: Optional[str] = None
    models: ModelsSpec
    merge_method: Annotated[str, AfterValidator(_run_method)]
    space: Union[str, dict[str, Any]] = "global"
    fitness: FitnessSpec
    driver: DriverSpec = DriverSpec()
    budget: BudgetSpec
    heartbeat: HeartbeatSpec = HeartbeatSpec()
    references: bool = True
    fail_fast: int = Field(3, ge=0)  # stop when a session's first N candidates all fail with one error (0: never)
    default_parameters: dict[str, float] = {}
    fixed_parameters: dict[str, Union[float, bool]] = {}
    device: str = "cpu"
    dtype: DtypeName = None
    cache: Literal["auto", "device", "pinned", "disk"] = "auto"
    seed: int = 0
    allow_pickle: bool = False
    trust_remote_code: bool = False
    report_to: list[Literal["mlflow", "tensorboard", "wandb"]] = []  # experiment trackers (evomerge.run.trackers)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        return check_device(v)

    @field_validator("name")
    @classmethod
    def _name(cls, v: Optional[str]) -> Optional[str]:
        problem = v is not None and run_name_problem(v)
        if problem:
            raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _check(self) -> "RunConfig":
        if self.merge_method == PASSTHROUGH:
            if BACKENDS[self.fitness.backend].streams:
                live = " or ".join(n for n, e in BACKENDS.items() if not e.streams)
                raise ValueError(f"fitness.backend: a layer path is scored on live transformers models; "
                                 f"{self.fitness.backend} takes merged weights only: use {live}")
            return self
        method = METHODS[self.merge_method]
        if method.needs_base and not self.models.base:
            raise ValueError(f"models.base: method {self.merge_method!r} needs a base model")
        return self

    # -- loading -------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        return cls.from_dict(load_yaml(path, ConfigError, "config"), source=Path(path))

    @classmethod
    def from_dict(cls, raw: Any, source: Optional[Path] = None) -> "RunConfig":
        where = str(source) if source else "config"
        cfg = validate(cls, raw, ConfigError, where, "a run config")
        root = Path(source).resolve().parent if source else Path.cwd()
        return cfg._resolve_paths(root, where)

    def _resolve_paths(self, root: Path, where: str) -> "RunConfig":
        models = ModelsSpec(base=_model_ref(self.models.base, root, where) if self.models.base else None,
                            experts=[_model_ref(e, root, where) for e in self.models.experts])
        names = models.names()
        if len(set(names)) != len(names):
            raise ConfigError(f"{where}: models: a model is listed twice ({', '.join(names)})")
        suite: Union[str, dict] = self.fitness.suite
        if isinstance(suite, str):
            p = root / suite
            if suite.endswith((".yaml", ".yml")) or p.is_file():  # else a shipped name, even beside a folder of it
                if not p.exists():
                    raise ConfigError(f"{where}: fitness.suite: no such file {p}")
                suite = str(p.resolve())
        else:
            suite = dict(suite)
            tasks = suite.get("tasks")
            if isinstance(tasks, list):
                suite["tasks"] = [t | {"data": str((root / t["data"]).resolve())}
                                  if isinstance(t, dict) and isinstance(t.get("data"), str) else t for t in tasks]
        space: Union[str, dict] = self.space
        if isinstance(space, str) and (space.endswith((".yaml", ".yml")) or (root / space).is_file()):
            space = str((root / space).resolve())
        return self.model_copy(update={"models": models, "space": space,
                                       "fitness": self.fitness.model_copy(update={"suite": suite})})

    def to_dict(self) -> dict:
        return self.model_dump(mode="json", exclude_none=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    # -- pieces the run builds from it ---------------------------------------------------------

    def check_objectives(self, n_objectives: int, where: str = "config") -> None:
        """Refuse a driver that cannot search several objectives."""
        if n_objectives > 1 and (not DRIVERS[self.driver.name].multi_objective
                                 or self.driver.sampler in SINGLE_OBJECTIVE):
            used = self.driver.sampler if self.driver.sampler in SINGLE_OBJECTIVE else self.driver.name
            raise ConfigError(f"{where}: driver: the suite has {n_objectives} objectives; {used} searches one. "
                              "Use driver {name: optuna, sampler: nsga2} (or tpe, gp, random)")

    @property
    def reference_model(self) -> str:
        """The model whose tokenizer, config and architecture the live model takes: the base, or
        the first expert for a merge without one."""
        return self.models.base or self.models.experts[0]


def check_device(v: str) -> str:
    if v != "cpu" and not (v == "cuda" or (v.startswith("cuda:") and v[5:].isdigit())):
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {v!r}")
    return v


def _model_ref(ref: str, root: Path, where: str) -> str:
    """A local directory (resolved against the config's directory, then the working directory)
    as an absolute path; anything else is kept as a hub id."""
    p = Path(ref).expanduser()
    for candidate in ((p,) if p.is_absolute() else (root / p, p)):
        if candidate.exists():
            return str(candidate.resolve())
    if p.is_absolute() or ref.startswith((".", "~")):
        raise ConfigError(f"{where}: models: {ref}: no such directory")
    return ref
