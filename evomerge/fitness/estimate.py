"""Cheaper fitness: anchor items, estimated fitness and racing (config ``fitness.estimate``).

**Levels.** Each task's search items are put in one fixed order and scored in nested prefixes,
the same for every candidate (common random numbers): level 0 is the task's anchors when
``anchors`` is set, then one level per racing rung (a fraction of the items), then all items.

**Anchors** are chosen once, after ``calibration`` candidates have been scored on every item: the
items of a task are clustered (k-means) on their values across those candidates and the
reference rows (parents, default merge), and the item nearest each centre is an anchor, weighted
by its cluster's share of the items. The other items follow in a seeded random order.

**Estimate** (a difference estimator): a candidate scored on the items S of a level gets, per task,

    estimate = T + sum_i w_i (v_i - T_i)

where T is the task's value of the target (the row scored on every item that beats it, see
racing; references included), T_i its item values and w the items' weights (the anchors' cluster shares at level 0,
1/|S| otherwise). The items' difficulty cancels against the target's, so the estimate is
unbiased where the plain mean of a few items is not. Objectives are the suite's weighted means.

**Racing.** After each level but the last, a candidate goes on only while it may still reach the
top of the run: it stops when some target (the best full-fidelity row; with several objectives,
each row of their Pareto front) beats it on every objective by more than ``z`` standard errors of
the paired item differences. Without ``racing``, the levels are the anchors and all items, and
``z`` is 0: a candidate is promoted when its estimate beats the best. A candidate that reaches
the last level has its true fitness. Without a target yet (no reference rows), a candidate is
scored on every item.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from evomerge.fitness.record import Values


def usage(summaries: Sequence[dict]) -> Optional[dict]:
    """Item evaluations of scored rows (their records' ``summary``) against scoring each on
    every search item; None when no row was scored on part of them."""
    rows = [s for s in summaries if s["of"]]
    stopped = sum(not s["full"] for s in rows)
    if not stopped:
        return None
    used, full = sum(s["used"] for s in rows), sum(s["of"] for s in rows)
    return {"items": used, "full": full, "share": used / full, "stopped": stopped}


def choose_anchors(matrix: np.ndarray, k: int, seed: int) -> tuple[list[int], list[float]]:
    """Anchor items of one task: ``matrix`` is items x rows (each item's values across the
    calibration rows). k-means (k-means++ start, seeded); the item nearest each centre is an anchor,
    weighted by its cluster's share. Returns positions (ascending) and their weights."""
    n = matrix.shape[0]
    if k >= n:
        return list(range(n)), [1.0 / n] * n
    x = matrix.astype(np.float64)
    scale = x.std(axis=0)
    x = (x - x.mean(axis=0)) / np.where(scale > 0, scale, 1.0)  # each row counts alike
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(n)]]
    for _ in range(1, k):
        d2 = np.min([((x - c) ** 2).sum(1) for c in centres], axis=0)
        total = d2.sum()
        centres.append(x[rng.choice(n, p=d2 / total)] if total > 0 else x[rng.integers(n)])
    c = np.array(centres)
    for _ in range(100):
        label = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
        new = np.array([x[label == j].mean(0) if (label == j).any() else c[j] for j in range(k)])
        if np.allclose(new, c):
            break
        c = new
    label = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
    chosen: dict[int, float] = {}
    for j in range(k):
        members = np.flatnonzero(label == j)
        if members.size == 0:
            continue
        nearest = int(members[((x[members] - c[j]) ** 2).sum(1).argmin()])
        chosen[nearest] = chosen.get(nearest, 0.0) + members.size / n
    order = sorted(chosen)
    return order, [chosen[i] for i in order]


@dataclass
class Plan:
    """The levels of a run, fixed once (kept in the run database's metadata)."""
    order: dict[str, list[int]]  # per task: positions in the search subsample, in scoring order
    sizes: list[dict[str, int]]  # per level: how many of ``order`` are scored by then
    anchor_weights: Optional[dict[str, list[float]]]  # level 0's weights, in ``order``'s order
    z: float

    @property
    def n_levels(self) -> int:
        return len(self.sizes)

    def to_dict(self) -> dict:
        return {"order": self.order, "sizes": self.sizes, "anchor_weights": self.anchor_weights, "z": self.z}

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        return cls(d["order"], d["sizes"], d["anchor_weights"], d["z"])

    def new_items(self, level: int) -> dict[str, list[int]]:
        """Positions first scored at ``level`` (ascending), per task that has any."""
        lo = self.sizes[level - 1] if level else dict.fromkeys(self.order, 0)
        out = {t: sorted(self.order[t][lo[t]:self.sizes[level][t]]) for t in self.order}
        return {t: p for t, p in out.items() if p}

    def weights(self, level: int, task: str) -> dict[int, float]:
        """Position -> weight of the items scored by ``level``."""
        seen = self.order[task][:self.sizes[level][task]]
        if level == 0 and self.anchor_weights is not None:
            return dict(zip(seen, self.anchor_weights[task]))
        return dict.fromkeys(seen, 1.0 / len(seen))

    def items_at(self, level: int) -> int:
        return sum(self.sizes[level].values())


def make_plan(counts: dict[str, int], anchors: Optional[int], rungs: Optional[Sequence[float]], z: Optional[float],
              calibration: Sequence[dict[str, Values]], seed: int) -> Plan:
    """The levels for tasks of ``counts`` search items; ``calibration`` holds the full rows' item
    values the anchors are chosen on (unused without anchors)."""
    order: dict[str, list[int]] = {}
    weights: Optional[dict[str, list[float]]] = {} if anchors else None
    first: dict[str, int] = {}
    for task, n in counts.items():
        rest = list(range(n))
        random.Random(f"evomerge-estimate-{seed}-{task}").shuffle(rest)
        if anchors:
            rows = [r[task] for r in calibration if r.get(task) is not None and None not in r[task]]
            if rows:
                chosen, w = choose_anchors(np.array(rows, dtype=np.float64).T, anchors, seed)
            else:  # nothing to cluster on: the first items of the seeded order, alike
                chosen = sorted(rest[:anchors])
                w = [1.0 / len(chosen)] * len(chosen)
            weights[task] = w
            rest = chosen + [i for i in rest if i not in set(chosen)]
            first[task] = len(chosen)
        order[task] = rest
    sizes: list[dict[str, int]] = [first] if anchors else []
    for f in rungs or ():
        level = {t: max(1, round(f * n)) for t, n in counts.items()}
        if sizes:
            level = {t: max(v, sizes[-1][t]) for t, v in level.items()}
            if level == sizes[-1]:
                continue
        sizes.append(level)
    full = dict(counts)
    if not sizes or sizes[-1] != full:
        sizes.append(full)
    return Plan(order, sizes, weights, 0.0 if z is None else z)


@dataclass
class Target:
    """A row scored on every item, that candidates race against."""
    name: str  # "#12" for a candidate, the reference's name otherwise
    values: list[float]  # its objectives
    tasks: dict[str, float]  # its task values
    items: dict[str, Values]


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` is no worse than ``b`` on every objective and better on one (all maximized)."""
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def pareto(targets: list[Target]) -> list[Target]:
    """Targets no other one dominates (all objectives maximized); best first objective first."""
    keep = [t for t in targets if not any(dominates(o.values, t.values) for o in targets)]
    return sorted(keep, key=lambda t: [-v for v in t.values])


@dataclass
class Comparison:
    estimate: dict[str, float]  # task -> estimated value (against the target that beats it, or the best)
    beaten_by: Optional[str]  # the target that beats it confidently on every objective


def compare(plan: Plan, level: int, seen: dict[str, dict[int, float]], targets: list[Target],
            objectives: list[tuple[str, dict[str, float]]]) -> Comparison:
    """The estimate of a candidate scored on ``seen`` (task -> position -> value) by ``level``,
    and whether a target beats it (see the module's docstring). ``targets``: the Pareto front."""
    def diffs(t: Target, task: str) -> tuple[float, float]:
        w = plan.weights(level, task)
        d = {i: seen[task][i] - t.items[task][i] for i in w}
        mean = sum(w[i] * d[i] for i in w)
        if len(d) < 2:
            return mean, math.inf
        m = sum(d.values()) / len(d)
        s2 = sum((x - m) ** 2 for x in d.values()) / (len(d) - 1)
        return mean, sum(x * x for x in w.values()) * s2

    if not targets:
        return Comparison({task: sum(plan.weights(level, task)[i] * v for i, v in seen[task].items()
                                     if i in plan.weights(level, task)) for task in seen}, None)
    per = [{task: diffs(t, task) for task in seen} for t in targets]
    for t, dv in zip(targets, per):
        beaten = True
        for _, w in objectives:
            total = sum(w.values())
            d = sum(w[k] / total * dv[k][0] for k in w)
            var = sum((w[k] / total) ** 2 * dv[k][1] for k in w)
            if not math.isfinite(var) or d + plan.z * math.sqrt(var) >= 0:
                beaten = False
                break
        if beaten:  # estimated against the target that beats it: below it on every objective
            return Comparison({task: t.tasks[task] + dv[task][0] for task in seen}, t.name)
    return Comparison({task: targets[0].tasks[task] + per[0][task][0] for task in seen}, None)
