"""A candidate's record: what scoring one candidate (or a reference model) found, typed for the
code that writes and reads it, and stored in the run database as opaque JSON, as Optuna keeps a
trial's user attributes. Every module that writes a record builds a :class:`CandidateRecord`;
every module that reads one gets it from :meth:`CandidateRecord.from_json`, never by key."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional, Sequence

Values = list[Optional[float]]  # a record's per-item values for one task, None where not scored


@dataclass(frozen=True)
class Fidelity:
    """How much of the suite a candidate was scored on (``fitness.estimate``): the level it
    stopped at (of ``levels``), the search items scored (of all of them), and the target that
    beat it there. A candidate scored on part of the items has an estimated fitness."""

    level: int
    levels: int
    items: int
    of: int
    beaten_by: Optional[str] = None

    @property
    def estimated(self) -> bool:
        return self.items != self.of

    def text(self) -> Optional[str]:
        """'estimated from N of M items' for an estimated fitness, else None."""
        return f"estimated from {self.items} of {self.of} items" if self.estimated else None

    def to_json(self) -> dict[str, Any]:
        out = {"level": self.level, "levels": self.levels, "items": self.items, "of": self.of}
        return out | ({"beaten_by": self.beaten_by} if self.beaten_by is not None else {})

    @classmethod
    def from_json(cls, d: Optional[dict]) -> Optional["Fidelity"]:
        """From a record's ``fidelity`` (None: scored on every item). Records written before
        ``estimated`` was derived carry it as a key; items < of says the same."""
        if d is None:
            return None
        return cls(int(d.get("level", 0)), int(d.get("levels", 1)), int(d["items"]), int(d["of"]), d.get("beaten_by"))


@dataclass(frozen=True)
class TaskRecord:
    """One task's result: its fitness metric, that metric's value (estimated where the fidelity
    says so), and every metric measured on the items scored."""

    metric: str
    value: float
    metrics: dict[str, Optional[float]]


_KNOWN = ("merge_s", "eval_s", "recipe", "error", "fitness", "objectives", "fidelity", "tasks", "items",
          "item_values", "model", "host")


@dataclass(frozen=True)
class CandidateRecord:
    """One candidate's (or reference model's) record. ``items[task]``: per-item correctness as a
    string of '1'/'0' in the order of the run's subsample ids, '-' for an item not scored;
    ``item_values[task]``: a margin task's item values where the racing compares items; ``extra``:
    keys others add (a driver's tag), kept as they are."""

    merge_s: float = 0.0
    eval_s: float = 0.0
    recipe: Optional[dict] = None
    error: Optional[str] = None
    fitness: Optional[float] = None
    objectives: Optional[dict[str, Optional[float]]] = None
    fidelity: Optional[Fidelity] = None
    tasks: dict[str, TaskRecord] = field(default_factory=dict)
    items: dict[str, str] = field(default_factory=dict)
    item_values: dict[str, Values] = field(default_factory=dict)
    model: Optional[str] = None  # a reference row's model directory
    host: Optional[str] = None  # the host that scored it
    extra: dict[str, Any] = field(default_factory=dict)

    # -- what readers ask -------------------------------------------------------------------

    def is_full(self) -> bool:
        """Whether it was scored on every search item (records without a fidelity always were)."""
        return self.fidelity is None or not self.fidelity.estimated

    def estimated_from(self) -> Optional[str]:
        """'estimated from N of M items' for a candidate scored on part of the items, else None."""
        return self.fidelity.text() if self.fidelity is not None else None

    def items_scored(self) -> int:
        """How many search items it was scored on."""
        if self.fidelity is not None:
            return self.fidelity.items
        return sum(len(v) for v in self.items.values())

    def values_of(self, task: str) -> Optional[Values]:
        """Its per-item values for ``task`` in the run's subsample order: the stored values
        (margin tasks) or the correctness marks as 1.0/0.0 (None: not scored)."""
        stored = self.item_values.get(task)
        if stored is not None:
            return list(stored)
        marks = self.items.get(task)
        return None if marks is None else [None if c == "-" else float(c) for c in marks]

    @property
    def task_values(self) -> dict[str, float]:
        return {k: t.value for k, t in self.tasks.items()}

    def fitness_given(self, values: Optional[Sequence[float]]) -> Optional[float]:
        """Its fitness where it has objective ``values`` (the first of them where it recorded none),
        else None."""
        if not values:
            return None
        return self.fitness if self.fitness is not None else values[0]

    def summary(self, values: Optional[Sequence[float]]) -> dict[str, Any]:
        """What a finished row's listing needs, small enough to read for every row of a long run:
        its fitness (None unless it has objective values), whether it was scored on every search
        item, and its item counts (scored, and of all its search items; 0 and 0 without per-item
        results)."""
        return {"fitness": self.fitness_given(values), "full": self.is_full(), "used": self.items_scored() if self.items else 0,
                "of": sum(len(v) for v in self.items.values())}

    def with_extra(self, **keys: Any) -> "CandidateRecord":
        return replace(self, extra=self.extra | keys)

    # -- stored form --------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The JSON kept in the run database (keys without a value left out)."""
        out: dict[str, Any] = {"merge_s": self.merge_s, "eval_s": self.eval_s}
        optional = {"recipe": self.recipe, "error": self.error, "fitness": self.fitness,
                    "objectives": self.objectives, "model": self.model, "host": self.host,
                    "fidelity": self.fidelity.to_json() if self.fidelity is not None else None}
        out |= {k: v for k, v in optional.items() if v is not None}
        if self.tasks or self.items:
            out["tasks"] = {k: {"metric": t.metric, "value": t.value, "metrics": t.metrics} for k, t in self.tasks.items()}
            out["items"] = dict(self.items)
        if self.item_values:
            out["item_values"] = {k: list(v) for k, v in self.item_values.items()}
        return out | self.extra

    @classmethod
    def from_json(cls, d: Optional[dict]) -> "CandidateRecord":
        """A stored record (``{}`` or None: a row without one)."""
        d = d or {}
        return cls(merge_s=float(d.get("merge_s", 0.0)), eval_s=float(d.get("eval_s", 0.0)), recipe=d.get("recipe"),
                   error=d.get("error"), fitness=d.get("fitness"), objectives=d.get("objectives"),
                   fidelity=Fidelity.from_json(d.get("fidelity")),
                   tasks={k: TaskRecord(t["metric"], t["value"], t.get("metrics", {}))
                          for k, t in (d.get("tasks") or {}).items()},
                   items=dict(d.get("items") or {}), item_values=dict(d.get("item_values") or {}),
                   model=d.get("model"), host=d.get("host"),
                   extra={k: v for k, v in d.items() if k not in _KNOWN})
