"""What a backend returns for one candidate, and the metric helpers every backend shares."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

INVALID = "[invalid]"  # lm-eval's regex-filter fallback


@dataclass
class ItemResult:
    id: str
    correct: bool
    value: float  # the item's metric value (1/0 for acc and exact_match, the margin for margin)
    output: Optional[str] = None  # the filtered generation, for generate tasks


@dataclass
class TaskResult:
    name: str
    metric: str
    value: float
    weight: float
    metrics: dict[str, float]
    items: list[ItemResult]


@dataclass
class FitnessResult:
    """``fitness`` is the weighted mean of the tasks' metric values; ``None`` with ``failed`` set
    when the candidate could not be scored (non-finite logits, ...)."""
    fitness: Optional[float]
    tasks: dict[str, TaskResult] = field(default_factory=dict)
    failed: Optional[str] = None
    split: str = "search"
    backend: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


class CandidateFailed(Exception):
    """Raised inside a backend when a candidate cannot be scored; becomes ``FitnessResult.failed``."""


def combine(results: dict[str, TaskResult]) -> float:
    total = sum(r.weight for r in results.values())
    return sum(r.value * r.weight for r in results.values()) / total if total else 0.0


def regex_extract(pattern: Optional[re.Pattern], text: str) -> str:
    """lm-eval's ``regex`` filter (first match, first non-empty group, stripped) then ``take_first``."""
    if pattern is None:
        return text
    found = pattern.findall(text)
    if not found:
        return INVALID
    m = found[0]
    if isinstance(m, tuple):
        m = next((g for g in m if g), INVALID)
    return m.strip()


def exact_match(prediction: str, reference: str, ignore_case: bool = False) -> bool:
    """lm-eval's ``exact_match`` (HF evaluate's), with its ``ignore_case`` option."""
    if ignore_case:
        return prediction.lower() == reference.lower()
    return prediction == reference


def choose(lls: Sequence[float], choices: Sequence[str], answer: int) -> dict[str, float]:
    """Multiple-choice metrics from the choices' log-likelihoods, as lm-eval computes them:
    argmax (first on ties) of the sum, and of the sum over the choice's length in characters."""
    def argmax(xs: Sequence[float]) -> int:
        best = 0
        for i, x in enumerate(xs):
            if x > xs[best]:
                best = i
        return best

    norm = [ll / len(c) for ll, c in zip(lls, choices)]
    others = [ll for i, ll in enumerate(lls) if i != answer]
    return {"acc": float(argmax(lls) == answer), "acc_norm": float(argmax(norm) == answer),
            "margin": lls[answer] - max(others)}


def check_finite(x: float, what: str) -> float:
    if not math.isfinite(x):
        raise CandidateFailed(f"non-finite value in {what}")
    return x

