"""Live progress of a search: a tqdm bar on a terminal, plain log lines otherwise.

The per-candidate lines always go to the log (``search.log``); while the bar is shown they are
kept off the terminal's log handlers."""

from __future__ import annotations

import logging
import sys
import time
from typing import Optional

from evomerge.fitness.record import Fidelity

log = logging.getLogger("evomerge.search.candidates")


class _NotCandidates(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.name != log.name


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class Progress:
    """Candidates done / budget, best, last, rate and ETA (from the candidate or time budget,
    whichever ends first)."""

    def __init__(self, done: int, max_candidates: Optional[int], max_seconds: Optional[float],
                 elapsed: float, stream=None, live: Optional[bool] = None):
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.done = done
        self.start_done = done
        self.max_candidates = max_candidates
        self.max_seconds = max_seconds
        self.elapsed0 = elapsed
        self.t0 = time.perf_counter()
        self.best: Optional[float] = None
        self.best_number: Optional[int] = None
        self.bar = None
        self._muted: list[logging.Handler] = []
        if self.live:
            from tqdm import tqdm

            self.bar = tqdm(total=max_candidates, initial=done, unit="cand", file=self.stream,
                            dynamic_ncols=True, desc="search", disable=False)  # TQDM_DISABLE quiets only libraries
            self._filter = _NotCandidates()
            for h in logging.getLogger().handlers:
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                    h.addFilter(self._filter)
                    self._muted.append(h)

    def set_best(self, fitness: Optional[float], number: Optional[int]) -> None:
        self.best, self.best_number = fitness, number

    def rate(self) -> float:
        """Candidates per minute in this session."""
        dt = time.perf_counter() - self.t0
        return (self.done - self.start_done) / dt * 60 if dt > 0 else 0.0

    def eta(self) -> Optional[float]:
        rate = self.rate() / 60
        options = []
        if self.max_candidates is not None and rate > 0:
            options.append(max(self.max_candidates - self.done, 0) / rate)
        if self.max_seconds is not None:
            options.append(max(self.max_seconds - self.elapsed0 - (time.perf_counter() - self.t0), 0.0))
        return min(options) if options else None

    def update(self, number: int, fitness: Optional[float], error: Optional[str], merge_s: float,
               eval_s: float, tag: str = "", fidelity: Optional[Fidelity] = None) -> None:
        """``fidelity``: the candidate was scored on part of the items (fitness.estimate)."""
        self.done += 1
        estimated = fidelity.text() if fidelity is not None else None
        if fitness is not None and estimated is None and (self.best is None or fitness > self.best):
            self.best, self.best_number = fitness, number
        last = f"{fitness:.4f}" if fitness is not None else "failed"
        if estimated and fitness is not None:
            last += f" ({estimated})"
        best = f"{self.best:.4f} (#{self.best_number})" if self.best is not None else "-"
        eta = self.eta()
        if self.bar is not None:
            self.bar.set_postfix_str(f"best {best}, last {last}")
            self.bar.update(1)
        budget = f"/{self.max_candidates}" if self.max_candidates else ""
        log.info("%scandidate #%d (%d%s): %s%s; best %s; merge %.0f ms, eval %.0f ms; %.1f/min%s",
                 tag, number, self.done, budget, last, f" ({error})" if error else "", best, merge_s * 1e3,
                 eval_s * 1e3, self.rate(), f", ETA {_fmt_seconds(eta)}" if eta is not None else "")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            for h in self._muted:
                h.removeFilter(self._filter)
