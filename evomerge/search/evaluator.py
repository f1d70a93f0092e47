"""Scoring candidates: one live model, recipes applied into it in place, then the fitness backend.

Nothing is written to disk per candidate. Any exception while merging or scoring (out of memory
included) and non-finite logits make a failed record with the reason; the live model is fully
rewritten by the next recipe, so a failure never leaks into the next candidate.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
from typing import Optional

import torch

from evomerge.config import RunConfig
from evomerge.errors import EvomergeError, ModelError, first_line
from evomerge.fitness.base import BACKENDS, get_backend
from evomerge.fitness.record import CandidateRecord, Fidelity, TaskRecord
from evomerge.fitness.result import FitnessResult
from evomerge.fitness.suite import Suite
from evomerge.merging.layer_path import LayerPath
from evomerge.merging.layer_stack import PathModel
from evomerge.merging.headers import resolve_model_path
from evomerge.merging.model_io import ModelFiles, load_causal_lm
from evomerge.merging.recipe import Recipe

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    """``fitness`` is the suite's fitness (with one declared objective, that objective);
    ``values`` the objectives the search maximizes, None when the candidate failed."""
    fitness: Optional[float]
    result: Optional[FitnessResult]
    merge_seconds: float = 0.0
    eval_seconds: float = 0.0
    error: Optional[str] = None
    values: Optional[list[float]] = None
    objective_names: Optional[list[str]] = None
    # scored on part of the search items (fitness.estimate): each task's item positions in the
    # subsample and its item count, and what was scored (level, items, of, target)
    positions: Optional[dict[str, list[int]]] = None
    counts: Optional[dict[str, int]] = None
    fidelity: Optional[Fidelity] = None

    def record(self, items: Optional[dict[str, list[str]]] = None, recipe: Optional[Recipe] = None,
               item_values: bool = False) -> CandidateRecord:
        """The record kept in the run database. Per-item correctness is a string of 0/1 in the
        order of ``items[task]`` (the run's subsample ids, stored once), '-' for an item not scored;
        with ``item_values`` (estimated fitness compares items), a margin task's item values too
        (None where not scored)."""
        tasks, marks, values = {}, {}, {}
        r = self.result
        for k, t in (r.tasks.items() if r is not None else ()):
            tasks[k] = TaskRecord(t.metric, t.value, t.metrics)
            ids = (items or {}).get(k)
            slots: list = [None] * (self.counts[k] if self.positions else len(t.items))
            for pos, it in zip(self.positions[k] if self.positions else range(len(t.items)), t.items):
                if ids is not None and (pos >= len(ids) or ids[pos] != it.id):
                    raise EvomergeError(f"task {k}: the scored items differ from the run's subsample")
                slots[pos] = it
            if ids is not None and len(slots) != len(ids):
                raise EvomergeError(f"task {k}: the scored items differ from the run's subsample")
            marks[k] = "".join("-" if it is None else "1" if it.correct else "0" for it in slots)
            if item_values and t.metric == "margin":
                values[k] = [None if it is None else round(it.value, 6) for it in slots]
        scored = self.values is not None
        return CandidateRecord(
            merge_s=round(self.merge_seconds, 4), eval_s=round(self.eval_seconds, 4),
            recipe=recipe.to_dict() if recipe is not None else None, error=self.error or None,
            fitness=self.fitness if scored else None,
            objectives=dict(zip(self.objective_names or [], self.values)) if scored else None,
            fidelity=self.fidelity, tasks=tasks, items=marks, item_values=values)


def _load_model(path: str, cfg: RunConfig):
    return load_causal_lm(path, device=cfg.device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                          allow_pickle=cfg.allow_pickle)


def _dump(spec) -> Optional[dict]:
    return None if spec is None else spec.model_dump(exclude_none=True)


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {first_line(e)}"[:500]


class Evaluator:
    """Scores recipes (applied in place) and whole models on the run's suite."""

    def __init__(self, cfg: RunConfig, suite: Suite):
        from transformers import AutoTokenizer

        self.cfg = cfg
        self.suite = suite
        ref = str(resolve_model_path(cfg.reference_model))
        self.tokenizer = AutoTokenizer.from_pretrained(ref, trust_remote_code=cfg.trust_remote_code)
        self.backend = get_backend(cfg.fitness.backend, model_dir=ref, batch_size=cfg.fitness.batch_size,
                                   dtype=cfg.dtype, engine=_dump(cfg.fitness.engine), options=_dump(cfg.fitness.lm_eval))
        # a backend with an engine of its own (vLLM) takes each candidate's merged tensors straight
        # into that engine: no live transformers model is kept beside it
        self.streams = BACKENDS[cfg.fitness.backend].streams
        self.engine = None
        self.model = None

    def items(self, split: str = "search") -> dict[str, list[str]]:
        """The ids a candidate is scored on, per task."""
        return {t.name: [it.id for it in t.items(split)] for t in self.suite.tasks if t.local}

    def score_model_dir(self, path: str, splits: tuple[str, ...] = ("search",)) -> dict[str, Evaluation]:
        """A saved model (a parent) scored as it is on each split; loaded once, then freed."""
        t0 = time.perf_counter()
        try:
            if self.streams:  # its stored tensors straight into the backend's engine
                files = ModelFiles(str(resolve_model_path(path)), allow_pickle=self.cfg.allow_pickle)
                self.backend.load_weights(files.stored_items(), self.tokenizer)
                model = None
            else:
                model = _load_model(path, self.cfg)
        except ModelError as e:
            return {s: Evaluation(None, None, error=str(e)) for s in splits}
        load = time.perf_counter() - t0
        out = {s: self.score_model(model, s) for s in splits}
        for ev in out.values():
            ev.merge_seconds = load
        del model
        self._free()
        return out

    def prepare(self, template: Recipe | LayerPath) -> None:
        """Build the merge engine and the live model (once per run); for a layer path, the parents
        that the stacked model wires together."""
        if isinstance(template, LayerPath):
            self.engine = PathModel(lambda m: _load_model(m, self.cfg))
            return
        from evomerge.merging.engine import MergeEngine

        self.engine = MergeEngine(template, device=self.cfg.device, cache=self.cfg.cache,
                                  allow_pickle=self.cfg.allow_pickle, trust_remote_code=self.cfg.trust_remote_code)
        if not self.streams:
            self.model = _load_model(self.cfg.reference_model, self.cfg)

    def _apply(self, recipe: Recipe | LayerPath) -> float:
        if isinstance(recipe, LayerPath):
            t0 = time.perf_counter()
            self.model = self.engine.apply(recipe)
            return time.perf_counter() - t0
        if not self.streams:
            return self.engine.apply(recipe, self.model)
        t0 = time.perf_counter()
        self.backend.load_weights(self.engine.merged_as_stored(recipe), self.tokenizer)
        return time.perf_counter() - t0

    def score_recipe(self, recipe: Recipe | LayerPath, split: str = "search") -> Evaluation:
        merged = self.apply_recipe(recipe)
        if isinstance(merged, Evaluation):
            return merged
        ev = self.score_model(self.model, split)
        ev.merge_seconds = merged
        return ev

    def apply_recipe(self, recipe: Recipe | LayerPath) -> float | Evaluation:
        """Merge ``recipe`` into the live model (or the backend's engine): its seconds, or the
        failed evaluation."""
        if self.engine is None:
            self.prepare(recipe)
        try:
            return self._apply(recipe)
        except torch.OutOfMemoryError as e:
            self._free()
            return Evaluation(None, None, error=_describe(e))
        except EvomergeError:
            raise  # a recipe that does not fit the engine is a bug in the run, not a bad candidate
        except Exception as e:  # noqa: BLE001 - any failure of one candidate is recorded, the search goes on
            log.warning("merge failed: %s", _describe(e))
            return Evaluation(None, None, error=_describe(e))

    def score_model(self, model, split: str = "search", suite: Optional[Suite] = None) -> Evaluation:
        """``model`` (None: the weights loaded into the backend's engine) on ``split`` of the run's
        suite, or of ``suite`` (a subset of it)."""
        t0 = time.perf_counter()
        try:
            result = self.backend.score(model, self.tokenizer, suite or self.suite, split=split)
        except torch.OutOfMemoryError as e:
            self._free()
            return Evaluation(None, None, eval_seconds=time.perf_counter() - t0, error=_describe(e))
        except EvomergeError:
            raise
        except Exception as e:  # noqa: BLE001
            log.warning("scoring failed: %s", _describe(e))
            return Evaluation(None, None, eval_seconds=time.perf_counter() - t0, error=_describe(e))
        seconds = time.perf_counter() - t0
        if result.failed:
            return Evaluation(None, result, eval_seconds=seconds, error=result.failed)
        if suite is not None:  # a subset: the caller makes the objectives
            return Evaluation(result.fitness, result, eval_seconds=seconds)
        values = self.suite.objective_values({k: t.value for k, t in result.tasks.items()})
        fitness = result.fitness if len(values) > 1 else values[0]
        return Evaluation(fitness, result, eval_seconds=seconds, values=values,
                          objective_names=self.suite.objective_names)

    def _free(self) -> None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
