"""Scoring candidates level by level (``fitness.estimate``): the loop's side of
:mod:`evomerge.fitness.estimate`.

:class:`Racer` keeps the run's plan (chosen once, under the run's lock, by the first process that
has enough full-fidelity rows, and kept in the run database's metadata, so resumed sessions and
workers score the same items) and its targets (the Pareto front of the fully scored rows: new
records are read from the database every few seconds, this process's own at once).
"""

from __future__ import annotations

import logging
import time
from typing import Optional

from evomerge.config import EstimateSpec
from evomerge.fitness.estimate import Plan, Target, compare, dominates, make_plan, pareto
from evomerge.fitness.record import CandidateRecord, Fidelity
from evomerge.fitness.result import FitnessResult, ItemResult, TaskResult, combine
from evomerge.fitness.suite import Suite
from evomerge.merging.recipe import Recipe
from evomerge.rundb.store import RunDB
from evomerge.search.evaluator import Evaluation, Evaluator

log = logging.getLogger("evomerge.search")

REFRESH_S = 10.0  # how often other processes' results are read


class Racer:
    def __init__(self, evaluator: Evaluator, suite: Suite, spec: EstimateSpec, seed: int):
        self.evaluator = evaluator
        self.suite = suite
        self.spec = spec
        self.seed = seed
        self.plan: Optional[Plan] = None
        self._subsets: dict[int, Suite] = {}
        self.targets: list[Target] = []  # the Pareto front of the fully scored rows read so far
        self._seen: set[int] = set()  # candidate trials read (or recorded here)
        self._refs: set[str] = set()  # reference rows read
        self._calibration: list[dict] = []  # fully scored records, until the plan is chosen
        self._calibrated = 0  # fully scored candidates among them
        self._read_at = -REFRESH_S

    # -- the run's plan and targets -----------------------------------------------------------

    def refresh(self, db: RunDB, force: bool = False) -> None:
        """Read the run's new fully scored rows (every ``REFRESH_S``), and its plan (chosen here,
        under the lock, once there are enough of them). New rows are looked at by their summaries
        and objective values first: until the plan exists every fully scored row's record is read
        (calibration), then only those that can join the targets' Pareto front, so a resume of a
        long run reads a handful of records, not every one."""
        if self.plan is not None and not force and time.perf_counter() - self._read_at < REFRESH_S:
            return
        self._read_at = time.perf_counter()
        new = []
        for r in db.references():  # a few rows
            if r.state == "complete" and r.name not in self._refs:
                self._refs.add(r.name)
                new.append((r.name, r.record))
        rows = db.leases.tables.complete_summaries(self._seen)
        self._seen.update(trial_id for trial_id, *_ in rows)
        full = [(i, n, values) for i, n, summary, values in rows if summary is None or summary["full"]]
        if self.plan is not None:
            front = [t.values for t in self.targets] + [values for *_, values in full]
            full = [(i, n, v) for i, n, v in full if not any(dominates(o, v) for o in front)]
        records = db.leases.tables.results([i for i, _, _ in full])
        new += [(f"#{n}", CandidateRecord.from_json(records[i])) for i, n, _ in full if i in records]
        self._take([(name, record) for name, record in new if record.is_full()])
        if self.plan is None:
            with db.lock():
                saved = db.metadata.get().get("estimate_plan")
                if saved is None:
                    plan = self._new_plan()
                    if plan is not None:
                        db.metadata.set({"estimate_plan": plan.to_dict()})
                        log.info("fitness estimate: levels of %s items%s", ", ".join(
                            str(plan.items_at(i)) for i in range(plan.n_levels)),
                                 " (anchors first)" if plan.anchor_weights else "")
                    saved = plan.to_dict() if plan is not None else None
            if saved is not None:
                self.plan = Plan.from_dict(saved)
                self._calibration = []

    def _take(self, rows: list[tuple[str, CandidateRecord]]) -> None:
        """Fully scored rows (name, record): targets, and calibration data until the plan exists."""
        fresh = []
        for name, record in rows:
            if record.objectives is None or not record.items:
                continue
            items = {t: record.values_of(t) for t in record.items}
            fresh.append(Target(name, list(record.objectives.values()), record.task_values, items))
            if self.plan is None:
                self._calibration.append(items)
                self._calibrated += name.startswith("#")
        if fresh:
            self.targets = pareto(self.targets + fresh)

    def _new_plan(self) -> Optional[Plan]:
        if not self._calibration or (self.spec.anchors and self._calibrated < (self.spec.calibration or 0)):
            return None
        counts = {k: len(v) for k, v in self._calibration[0].items()}
        racing = self.spec.racing
        return make_plan(counts, self.spec.anchors, racing.rungs if racing else None, racing.z if racing else None,
                         self._calibration, self.seed)

    def add(self, trial_id: int, number: int, record: CandidateRecord) -> None:
        """This process's own candidate, as soon as it is recorded."""
        self._seen.add(trial_id)
        if record.fitness is not None and record.is_full():
            self._take([(f"#{number}", record)])

    # -- scoring --------------------------------------------------------------------------------

    def _subset(self, level: int) -> Suite:
        if level not in self._subsets:
            self._subsets[level] = self.suite.subset(self.plan.new_items(level))
        return self._subsets[level]

    def score_recipe(self, recipe: Recipe) -> Evaluation:
        """Score ``recipe`` level by level until it is beaten or reaches the last level; every
        item before a rung until the plan exists (calibration) or without any target."""
        if self.plan is None or not self.targets:
            return self.evaluator.score_recipe(recipe)
        merged = self.evaluator.apply_recipe(recipe)
        if isinstance(merged, Evaluation):
            return merged
        plan = self.plan
        scored: dict[str, dict[int, ItemResult]] = {t: {} for t in plan.order}  # task -> position -> item
        eval_s = 0.0
        beaten = None
        for level in range(plan.n_levels):
            part = self._subset(level)
            ev = self.evaluator.score_model(self.evaluator.model, "search", suite=part)
            eval_s += ev.eval_seconds
            if ev.result is None or ev.error:
                ev.merge_seconds, ev.eval_seconds = merged, eval_s
                return ev
            for name, task in ev.result.tasks.items():
                scored[name].update(zip(part.task(name).keep, task.items))
            if level == plan.n_levels - 1:
                break
            seen = {t: {p: it.value for p, it in by_pos.items()} for t, by_pos in scored.items()}
            verdict = compare(plan, level, seen, self.targets, self.suite.objectives)
            if verdict.beaten_by is not None:
                beaten = verdict
                break
        results: dict[str, TaskResult] = {}
        for name, by_pos in scored.items():
            items = [by_pos[p] for p in sorted(by_pos)]
            spec = self.suite.task(name).spec
            measured = _means(items, spec)
            value = beaten.estimate[name] if beaten else measured[spec.metric]
            results[name] = TaskResult(name, spec.metric, value, spec.weight, measured, items)
        values = self.suite.objective_values({k: t.value for k, t in results.items()})
        fitness_all = combine(results)
        fidelity = Fidelity(level, plan.n_levels, sum(len(v) for v in scored.values()),
                            plan.items_at(plan.n_levels - 1), beaten.beaten_by if beaten else None)
        return Evaluation(fitness_all if len(values) > 1 else values[0],
                          FitnessResult(fitness_all, results, split="search", backend=self.evaluator.backend.name,
                                        seconds=eval_s),
                          merge_seconds=merged, eval_seconds=eval_s, values=values,
                          objective_names=self.suite.objective_names,
                          positions={name: sorted(by_pos) for name, by_pos in scored.items()},
                          counts={name: len(order) for name, order in plan.order.items()}, fidelity=fidelity)


def _means(items: list, spec) -> dict[str, float]:
    """The metric measured on the items scored (and, for margins, their accuracy)."""
    n = max(1, len(items))
    out = {spec.metric: sum(it.value for it in items) / n}
    if spec.metric == "margin":
        side = "acc" if spec.kind != "generate" else "greedy" if spec.teacher_forced else "exact_match"
        out[side] = sum(it.correct for it in items) / n
    return out
