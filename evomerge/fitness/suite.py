"""Fitness suites: which tasks score a candidate, how, and on which fixed items.

A suite is a YAML file::

    name: zoo
    tasks:
      - name: rev
        data: data/zoo/rev.jsonl     # a local JSONL file (relative to the suite file) ...
        kind: generate               # ... or multiple_choice
        metric: exact_match          # acc | acc_norm | exact_match | margin
        stop: ["."]
        answer_regex: "([a-l](?: [a-l])*)"
        max_new_tokens: 8
        weight: 1.0
        n: 40                        # items drawn with `seed` from the search split, the same for every candidate
        seed: 0
      - name: arc
        lm_eval: arc_challenge       # or any task lm-eval knows (lm-eval / vllm backends)
        metric: acc_norm
        n: 200
        search_split: validation     # optional: search on this split, hold out the test split
      - name: mine
        lm_eval: my_task             # a task of your own lm-eval YAML:
        include: tasks/              # a directory of task YAML or one file (relative to the suite file)
    objectives:                      # optional: several objectives make a multi-objective search
      - {name: skill, tasks: [rev]}            # a list: equal weights; a mapping: task -> weight
      - {name: retention, tasks: {arc: 1.0}}
    # or  objectives: per_task       (one objective per task)

``metric: margin`` on a generate task scores the mean log-probability per token of the reference
answer (native scorer only); the item also counts as right or wrong by generating and matching
its output (``exact_match``), unless ``teacher_forced: true``: then an item is right when every
reference token is the greedy choice given the ones before (lm-eval's ``is_greedy``; the side
metric is ``greedy``), and nothing is generated, which on a large vocabulary is most of the cost.
``metric: greedy`` (with ``teacher_forced: true``) scores that share itself: greedy exact match
without generating. A margin rewards keeping a little of every skill (a lost skill costs its
whole log-probability); ``greedy`` counts a skill kept or lost, as exact match does.

Without ``objectives`` the suite has one objective, its fitness: the weighted mean of the tasks'
metric values. Each objective is the weighted mean of its tasks' values; all are maximized.

A local JSONL line is ``{"id", "split": "search"|"heldout", "prompt", "answer"}`` plus
``"choices"`` (a list; ``answer`` is then the right choice's index) for multiple choice. The
held-out split is never used by the search; it is for checking winners. An lm-eval task's
evaluation documents (its test split when it has one) are split in two by a seeded permutation:
``heldout_fraction`` of them are held out. With ``search_split`` the search draws from the task's
validation or training split and the held-out check from its whole test split instead (see
:mod:`evomerge.fitness.lmeval_tasks`, which also says how ``include`` is read).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evomerge.errors import SuiteError
from evomerge.inputs import key_text, load_yaml, read_text
from evomerge.resources import shipped, suites_dir

SUITES_DIR = suites_dir()
SPLITS = ("search", "heldout")
METRICS = ("acc", "acc_norm", "exact_match", "margin", "greedy")
REFERENCE_METRICS = ("margin", "greedy")  # a generate task's metrics read from the reference's log-likelihood


@dataclass(frozen=True)
class Item:
    id: str
    index: int  # the line's position in its file (lm-eval's doc_id)
    prompt: str
    answer: str | int
    choices: Optional[tuple[str, ...]] = None
    delimiter: str = " "  # between the prompt and a choice (or the reference answer)


@dataclass(frozen=True)
class Scoring:
    """How the native scorer scores a task's items (a local task's from its spec; an lm-eval
    task's from its config, see :func:`evomerge.fitness.lmeval_tasks.native_items`)."""
    kind: Literal["multiple_choice", "generate"]
    metric: str
    stop: tuple[str, ...] = ("\n",)
    max_new_tokens: int = 32
    answer_regex: Optional[str] = None
    ignore_case: bool = False
    teacher_forced: bool = False


class TaskSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    data: Optional[str] = None
    lm_eval: Optional[str] = None
    include: Optional[str] = None  # the lm-eval task's own YAML: a directory or a file
    search_split: Optional[Literal["validation", "train"]] = None  # an lm-eval task's split to search on
    kind: Optional[Literal["multiple_choice", "generate"]] = None
    metric: str = Field("acc", min_length=1)  # local tasks: one of METRICS; lm-eval tasks: any metric it reports
    weight: float = Field(1.0, ge=0)
    n: Optional[int] = Field(None, ge=1)
    n_heldout: Optional[int] = Field(None, ge=1)
    seed: int = 0
    subsample: Literal["seeded", "first"] = "seeded"  # first: the split's first n items (lm-eval's limit)
    stop: list[str] = Field(default_factory=lambda: ["\n"])
    answer_regex: Optional[str] = None
    max_new_tokens: int = Field(32, ge=1)
    ignore_case: bool = False
    heldout_fraction: float = Field(0.5, gt=0, lt=1)
    filter: str = "none"  # which of an lm-eval task's filters the metric is read from
    teacher_forced: bool = False  # margin or greedy on a generate task: no generation (see the module's docstring)

    @field_validator("answer_regex")
    @classmethod
    def _regex_compiles(cls, v: Optional[str]) -> Optional[str]:
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"answer_regex {v!r} does not compile: {e}") from None
        return v

    @model_validator(mode="after")
    def _one_source(self) -> "TaskSpec":
        if (self.data is None) == (self.lm_eval is None):
            raise ValueError(f"task {self.name!r}: give exactly one of 'data' (a local JSONL file) or 'lm_eval'")
        for key in ("include", "search_split"):
            if getattr(self, key) is not None and self.lm_eval is None:
                raise ValueError(f"task {self.name!r}: {key!r} applies to an lm-eval task")
        if self.data is not None:
            if self.metric not in METRICS:
                raise ValueError(f"task {self.name!r}: metric {self.metric!r} is not one of {', '.join(METRICS)}")
            if self.kind is None:
                raise ValueError(f"task {self.name!r}: 'kind' (multiple_choice or generate) is required for local data")
            allowed = ("acc", "acc_norm", "margin") if self.kind == "multiple_choice" else \
                ("exact_match", "margin", "greedy")
            if self.metric not in allowed:
                raise ValueError(f"task {self.name!r}: metric {self.metric!r} does not apply to kind {self.kind!r} "
                                 f"(use one of {', '.join(allowed)})")
        if self.teacher_forced and (self.kind != "generate" or self.metric not in REFERENCE_METRICS):
            raise ValueError(f"task {self.name!r}: teacher_forced applies to metric margin or greedy on a generate task")
        if self.metric == "greedy" and not self.teacher_forced:
            raise ValueError(f"task {self.name!r}: metric greedy is read teacher-forced: set teacher_forced: true")
        return self


class ObjectiveSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    tasks: Union[list[str], dict[str, float]] = Field(min_length=1)

    @property
    def weights(self) -> dict[str, float]:
        return dict.fromkeys(self.tasks, 1.0) if isinstance(self.tasks, list) else dict(self.tasks)


class SuiteSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Optional[str] = None
    description: str = ""
    tasks: list[TaskSpec] = Field(min_length=1)
    objectives: Optional[Union[Literal["per_task"], list[ObjectiveSpec]]] = None

    @model_validator(mode="after")
    def _unique(self) -> "SuiteSpec":
        names = [t.name for t in self.tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"task names must be unique; repeated: {', '.join(dup)}")
        if sum(t.weight for t in self.tasks) <= 0:
            raise ValueError("the task weights sum to 0")
        if isinstance(self.objectives, list):
            if not self.objectives:
                raise ValueError("objectives: give at least one (or leave the key out)")
            onames = [o.name for o in self.objectives]
            if len(set(onames)) != len(onames):
                raise ValueError(f"objectives: names must be unique ({', '.join(onames)})")
            for o in self.objectives:
                unknown = sorted(set(o.weights) - set(names))
                if unknown:
                    raise ValueError(f"objectives: {o.name}: no task named {', '.join(unknown)} "
                                     f"(tasks: {', '.join(names)})")
                if any(w < 0 for w in o.weights.values()) or sum(o.weights.values()) <= 0:
                    raise ValueError(f"objectives: {o.name}: task weights must be >= 0 and not all 0")
        return self


@dataclass
class Task:
    spec: TaskSpec
    suite: "Suite"
    path: Optional[Path] = None  # the local data file
    include: Optional[Path] = None  # the lm-eval task's own YAML (a directory or a file)
    _items: Optional[list[tuple[str, Item]]] = field(default=None, repr=False)
    keep: Optional[tuple[int, ...]] = None  # positions of the search items kept (a subset's task)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def local(self) -> bool:
        return self.spec.data is not None

    @property
    def scoring(self) -> Scoring:
        """A local task's scoring, from its spec."""
        s = self.spec
        return Scoring(s.kind, s.metric, tuple(s.stop), s.max_new_tokens, s.answer_regex, s.ignore_case,
                       s.teacher_forced)

    def _load(self) -> list[tuple[str, Item]]:
        if self._items is None:
            self._items = _read_jsonl(self)
        return self._items

    def all_items(self) -> list[Item]:
        """Every item of the file in order (index = line position), for backends that need doc ids."""
        return [it for _, it in self._load()]

    def items(self, split: str) -> list[Item]:
        """The items a candidate is scored on: the seeded subsample of the search split (sorted by
        position, the same for every candidate), or the held-out split."""
        if split not in SPLITS:
            raise SuiteError(f"suite {self.suite.name}: unknown split {split!r} (use search or heldout)")
        pool = [it for s, it in self._load() if s == split]
        n = self.spec.n if split == "search" else self.spec.n_heldout
        if not pool:
            raise SuiteError(f"suite {self.suite.name}, task {self.name}: {self.path} has no {split!r} items")
        return self._kept(self._sized(pool, n, split, str(self.path)), split)

    def _sized(self, pool: list, n: Optional[int], split: str, where: str) -> list:
        """The subsample of ``n`` of ``pool`` (all of it for None); more than it holds is an error."""
        if n is None or n == len(pool):
            return pool
        if n > len(pool):
            key = "n" if split == "search" else "n_heldout"
            raise SuiteError(f"suite {self.suite.name}, task {self.name}: {key} {n} is more than the {len(pool)} "
                             f"items of its {split} split ({where})")
        return self._subsample(pool, n)

    def _kept(self, pool: list, split: str) -> list:
        return [pool[i] for i in self.keep] if self.keep is not None and split == "search" else pool

    def _subsample(self, pool: list, n: int) -> list:
        if self.spec.subsample == "first":
            return pool[:n]
        return sorted(random.Random(self.spec.seed).sample(pool, n), key=lambda it: getattr(it, "index", it))

    def lm_eval_indices(self, n_docs: int, split: str) -> list[int]:
        """For an lm-eval task of ``n_docs`` documents: the sorted document indices of ``split``
        (with ``search_split``, ``n_docs`` counts the documents of that split alone)."""
        if self.spec.search_split is not None:  # the documents are the split's own
            pool = list(range(n_docs))
        else:
            order = list(range(n_docs))
            random.Random(f"evomerge-split-{self.spec.seed}").shuffle(order)
            cut = n_docs - int(round(n_docs * self.spec.heldout_fraction))
            pool = sorted(order[:cut] if split == "search" else order[cut:])
        n = self.spec.n if split == "search" else self.spec.n_heldout
        return self._kept(self._sized(pool, n, split, f"lm-eval task {self.spec.lm_eval}"), split)


class Suite:
    """A loaded suite; tasks keep their parsed items (read once)."""

    def __init__(self, spec: SuiteSpec, source: Optional[Path] = None):
        self.spec = spec
        self.source = source
        self.name = spec.name or (source.stem if source else "suite")
        root = source.parent if source else Path.cwd()
        self.tasks = [Task(t, self, (root / t.data).resolve() if t.data else None,
                           (root / t.include).resolve() if t.include else None) for t in spec.tasks]

    def subset(self, keep: dict[str, list[int]]) -> "Suite":
        """This suite scoring only some of each task's search items: ``keep[task]`` lists their
        positions (ascending) in the task's search subsample; a task not named is left out."""
        sub = Suite(self.spec.model_copy(update={"tasks": [t.spec for t in self.tasks if t.name in keep]}), self.source)
        for t in sub.tasks:
            full = self.task(t.name)
            t._items = full._load() if full.local else None
            t.keep = tuple(keep[t.name])
        return sub

    def check(self) -> None:
        """Read every local task's data and both splits now, so bad data fails before a run starts."""
        for t in self.tasks:
            if t.local:
                for split in SPLITS:
                    t.items(split)

    @classmethod
    def resolve(cls, ref: "str | dict") -> "Suite":
        """A config's ``fitness.suite``: a shipped suite's name or a file, or the suite inline."""
        return cls.load(ref) if isinstance(ref, str) else cls.from_dict(ref, source=None)

    @classmethod
    def load(cls, name_or_path: str | Path) -> "Suite":
        """A suite file, or the name of one shipped in ``fitness/`` (``zoo`` -> ``fitness/zoo.yaml``)."""
        p = Path(name_or_path)
        if not p.is_file() and p.suffix == "" and (SUITES_DIR / f"{p.name}.yaml").exists():
            p = SUITES_DIR / f"{p.name}.yaml"
        if not p.exists():
            raise SuiteError(f"suite {name_or_path}: no such file (shipped suites: {', '.join(shipped(SUITES_DIR))})")
        return cls.from_dict(load_yaml(p, SuiteError, "suite"), source=p)

    @classmethod
    def from_dict(cls, raw: object, source: Optional[Path] = None) -> "Suite":
        where = source or "suite"
        if not isinstance(raw, dict):
            raise SuiteError(f"suite {where}: expected a mapping with 'tasks'")
        try:
            spec = SuiteSpec.model_validate(raw)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(key_text(x) for x in err['loc']) or 'suite'}: "
                                 f"{' '.join(str(err['msg']).split())}" for err in e.errors())
            raise SuiteError(f"suite {where}: {problems}") from None
        suite = cls(spec, Path(source) if source else None)
        for t in suite.tasks:
            if t.local and not t.path.exists():
                raise SuiteError(f"suite {suite.name}, task {t.name}: data file {t.path} does not exist")
            if t.include is not None and not t.include.exists():
                raise SuiteError(f"suite {suite.name}, task {t.name}: include {t.include} does not exist")
        return suite

    @cached_property
    def total_weight(self) -> float:
        return sum(t.spec.weight for t in self.tasks)

    @cached_property
    def objectives(self) -> list[tuple[str, dict[str, float]]]:
        """(name, task -> weight) of each objective; one, the fitness, unless the suite declares more."""
        o = self.spec.objectives
        if o is None:
            return [("fitness", {t.name: t.spec.weight for t in self.tasks})]
        if o == "per_task":
            return [(t.name, {t.name: 1.0}) for t in self.tasks]
        return [(x.name, x.weights) for x in o]

    @property
    def objective_names(self) -> list[str]:
        return [name for name, _ in self.objectives]

    def objective_values(self, task_values: dict[str, float]) -> list[float]:
        """Each objective's weighted mean of the tasks' metric values."""
        return [sum(task_values[t] * w for t, w in weights.items()) / sum(weights.values())
                for _, weights in self.objectives]

    def task(self, name: str) -> Task:
        for t in self.tasks:
            if t.name == name:
                return t
        raise SuiteError(f"suite {self.name}: no task {name!r}")


def _read_jsonl(task: Task) -> list[tuple[str, Item]]:
    where = f"suite {task.suite.name}, task {task.name}: {task.path}"
    out: list[tuple[str, Item]] = []
    mc = task.spec.kind == "multiple_choice"
    ids: set[str] = set()
    for lineno, line in enumerate(read_text(task.path, SuiteError, "suite data").split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SuiteError(f"{where}, line {lineno}: not valid JSON ({e.msg})") from None

        def bad(msg: str) -> SuiteError:
            return SuiteError(f"{where}, line {lineno}: {msg}")

        if not isinstance(row, dict):
            raise bad("expected a JSON object")
        missing = [k for k in ("split", "prompt", "answer") + (("choices",) if mc else ()) if k not in row]
        if missing:
            raise bad(f"missing key(s) {', '.join(missing)}")
        if row["split"] not in SPLITS:
            raise bad(f"split {row['split']!r} is not one of {', '.join(SPLITS)}")
        if not isinstance(row["prompt"], str) or not row["prompt"]:
            raise bad("prompt must be a non-empty string")
        choices = None
        if mc:
            choices = row["choices"]
            if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) for c in choices)):
                raise bad("choices must be a list of at least two strings")
            if not (isinstance(row["answer"], int) and 0 <= row["answer"] < len(choices)):
                raise bad(f"answer must be the index of the right choice (0..{len(choices) - 1})")
        elif not isinstance(row["answer"], str):
            raise bad("answer must be a string for a generate task")
        item_id = str(row.get("id", f"{task.name}-{len(out)}"))
        if item_id in ids:
            raise bad(f"duplicate id {item_id!r}")
        ids.add(item_id)
        out.append((row["split"], Item(item_id, len(out), row["prompt"], row["answer"],
                                       tuple(choices) if choices else None)))
    if not out:
        raise SuiteError(f"{where}: the file has no items")
    return out
