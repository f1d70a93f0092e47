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

A local JSONL line is ``{"id", "split": "search"|"heldout", "prompt", "answer"}`` plus
``"choices"`` (a list; ``answer`` is then the right choice's index) for multiple choice. The
held-out split is never used by the search; it is for checking winners. An lm-eval task's
documents are split in two by a seeded permutation: ``heldout_fraction`` of them are held out.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import EvomergeError

SUITES_DIR = Path(__file__).resolve().parent.parent.parent / "fitness"
SPLITS = ("search", "heldout")
METRICS = ("acc", "acc_norm", "exact_match", "margin")


class SuiteError(EvomergeError):
    """A suite or its data is malformed; the message names the suite, file and line."""


@dataclass(frozen=True)
class Item:
    id: str
    index: int  # the line's position in its file (lm-eval's doc_id)
    prompt: str
    answer: str | int
    choices: Optional[tuple[str, ...]] = None


class TaskSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    data: Optional[str] = None
    lm_eval: Optional[str] = None
    kind: Optional[Literal["multiple_choice", "generate"]] = None
    metric: Literal["acc", "acc_norm", "exact_match", "margin"] = "acc"
    weight: float = Field(1.0, ge=0)
    n: Optional[int] = Field(None, ge=1)
    n_heldout: Optional[int] = Field(None, ge=1)
    seed: int = 0
    stop: list[str] = Field(default_factory=lambda: ["\n"])
    answer_regex: Optional[str] = None
    max_new_tokens: int = Field(32, ge=1)
    ignore_case: bool = False
    heldout_fraction: float = Field(0.5, gt=0, lt=1)
    filter: str = "none"  # which of an lm-eval task's filters the metric is read from

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
        if self.data is not None:
            if self.kind is None:
                raise ValueError(f"task {self.name!r}: 'kind' (multiple_choice or generate) is required for local data")
            allowed = ("acc", "acc_norm", "margin") if self.kind == "multiple_choice" else ("exact_match", "margin")
            if self.metric not in allowed:
                raise ValueError(f"task {self.name!r}: metric {self.metric!r} does not apply to kind {self.kind!r} "
                                 f"(use one of {', '.join(allowed)})")
        return self


class SuiteSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Optional[str] = None
    description: str = ""
    tasks: list[TaskSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> "SuiteSpec":
        names = [t.name for t in self.tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"task names must be unique; repeated: {', '.join(dup)}")
        if sum(t.weight for t in self.tasks) <= 0:
            raise ValueError("the task weights sum to 0")
        return self


@dataclass
class Task:
    spec: TaskSpec
    suite: "Suite"
    path: Optional[Path] = None  # the local data file
    _items: Optional[list[tuple[str, Item]]] = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def local(self) -> bool:
        return self.spec.data is not None

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
        if n is not None and n < len(pool):
            rng = random.Random(self.spec.seed)
            pool = sorted(rng.sample(pool, n), key=lambda it: it.index)
        return pool

    def lm_eval_indices(self, n_docs: int, split: str) -> list[int]:
        """For an lm-eval task of ``n_docs`` documents: the sorted document indices of ``split``."""
        order = list(range(n_docs))
        random.Random(f"evomerge-split-{self.spec.seed}").shuffle(order)
        cut = n_docs - int(round(n_docs * self.spec.heldout_fraction))
        pool = sorted(order[:cut] if split == "search" else order[cut:])
        n = self.spec.n if split == "search" else self.spec.n_heldout
        if n is not None and n < len(pool):
            pool = sorted(random.Random(self.spec.seed).sample(pool, n))
        return pool


class Suite:
    """A loaded suite; tasks keep their parsed items (read once)."""

    def __init__(self, spec: SuiteSpec, source: Optional[Path] = None):
        self.spec = spec
        self.source = source
        self.name = spec.name or (source.stem if source else "suite")
        root = source.parent if source else Path.cwd()
        self.tasks = [Task(t, self, (root / t.data).resolve() if t.data else None) for t in spec.tasks]

    @classmethod
    def load(cls, name_or_path: str | Path) -> "Suite":
        """A suite file, or the name of one shipped in ``fitness/`` (``zoo`` -> ``fitness/zoo.yaml``)."""
        p = Path(name_or_path)
        if not p.exists() and p.suffix == "" and (SUITES_DIR / f"{p.name}.yaml").exists():
            p = SUITES_DIR / f"{p.name}.yaml"
        if not p.exists():
            shipped = sorted(q.stem for q in SUITES_DIR.glob("*.yaml"))
            raise SuiteError(f"suite {name_or_path}: no such file (shipped suites: {', '.join(shipped)})")
        try:
            raw = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise SuiteError(f"suite {p}: not valid YAML: {e}") from None
        return cls.from_dict(raw, source=p)

    @classmethod
    def from_dict(cls, raw: object, source: Optional[Path] = None) -> "Suite":
        where = source or "suite"
        if not isinstance(raw, dict):
            raise SuiteError(f"suite {where}: expected a mapping with 'tasks'")
        try:
            spec = SuiteSpec.model_validate(raw)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(str(x) for x in err['loc']) or 'suite'}: {err['msg']}"
                                 for err in e.errors())
            raise SuiteError(f"suite {where}: {problems}") from None
        suite = cls(spec, Path(source) if source else None)
        for t in suite.tasks:
            if t.local and not t.path.exists():
                raise SuiteError(f"suite {suite.name}, task {t.name}: data file {t.path} does not exist")
        return suite

    @cached_property
    def total_weight(self) -> float:
        return sum(t.spec.weight for t in self.tasks)

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
    with open(task.path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
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
