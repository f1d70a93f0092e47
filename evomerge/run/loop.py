"""A run's search loop (:func:`run_search`), for one process of any number on one run.

Under the run's lock, reclaim candidates whose worker died and ask the driver (which claims a
candidate); then run the trial (:meth:`_Search.run_trial`): decode the vector into a recipe,
apply it into the live model, score it (a heartbeat thread keeps the claim alive), and under the
lock again tell the driver (which records it). Any number of processes may run this loop on one
run database (``evomerge worker``): there is no generation barrier, and the budget counts the
candidates of all of them. SIGINT / SIGTERM finish the candidate in flight, save the state and
print how to resume; a second signal abandons the candidate (it is redone). The run's directory
and database: :mod:`evomerge.run.rundir`.
"""

from __future__ import annotations

import datetime as _dt
import logging
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Optional

from evomerge.fitness.record import CandidateRecord
from evomerge.fitness.suite import Suite
from evomerge.machine import ThreadFit
from evomerge.procs import MACHINE
from evomerge.run.rundir import (BUDGET_KEY, Run, RunError, parents, reference_recipes, run_budget, run_identity, versions, x0_vector)
from evomerge.rundb.leases import Owner
from evomerge.rundb.secrets import redact
from evomerge.rundb.store import RunDB, best_row
from evomerge.rundb.trackers import Trackers
from evomerge.search.claims import DriverClaims, make_driver
from evomerge.search.drivers import Proposal
from evomerge.search.evaluator import Evaluation, Evaluator
from evomerge.search.fingerprint import (
    HASHES_FILE,
    RESUMABLE,
    FileHashes,
    compare,
    fingerprint,
)
from evomerge.search.progress import Progress
from evomerge.search.racing import Racer
from evomerge.search.registry import DRIVERS

log = logging.getLogger("evomerge.search")


@contextmanager
def _file_log(path: Path) -> Iterator[None]:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


class _Signals:
    """First SIGINT/SIGTERM: stop after the candidate in flight. Second: abandon it."""

    def __init__(self) -> None:
        self.requested = False
        self._event = threading.Event()
        self._old: dict = {}

    def wait(self, seconds: float) -> None:
        """Sleep, waking up early on a signal."""
        self._event.wait(seconds)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self._event.set()
        log.warning("%s received: finishing the candidate in flight, then stopping (again to abandon it)",
                    signal.Signals(signum).name)

    def __enter__(self) -> "_Signals":
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def run_search(run: Run, *, resume: bool = False, max_candidates: Optional[int] = None,
               max_minutes: Optional[float] = None, live: Optional[bool] = None, worker: bool = False,
               threads: Optional[int] = None) -> dict:
    """Run (or continue) the search until the budget is spent or a signal stops it. ``worker``:
    one of several processes on this run (its own sampler seed; the first worker to get there
    scores the references). ``threads``: torch's intra-op threads; by default they follow the
    cores other processes leave free (:class:`~evomerge.machine.ThreadFit`)."""
    with _file_log(run.run_dir / "search.log"):
        fit = ThreadFit(threads)
        log.info("%s", fit.describe())
        return _Search(run, resume, max_candidates, max_minutes, live, worker, fit).loop()


class _Heartbeat:
    """Records the heartbeat of the candidate in flight every ``interval`` seconds, from a thread."""

    def __init__(self, db: RunDB, interval: float):
        self.db = db
        self.interval = interval
        self.trial_id: Optional[int] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="evomerge-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            trial_id = self.trial_id
            if trial_id is not None:
                try:
                    self.db.leases.heartbeat(trial_id)
                except Exception as e:  # noqa: BLE001 - a lost beat is retried; the database may come back
                    log.warning("heartbeat for trial %d failed: %s", trial_id, e)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def same_failure(errors: list[Optional[str]], n: int) -> bool:
    """Whether the first ``n`` of a session's candidates (``errors``, in order, None where one was
    scored) all failed with one error: the cause is the run's, not the candidates'."""
    return n > 0 and len(errors) == n and errors[0] is not None and len(set(errors)) == 1


class _Search:
    def __init__(self, run: Run, resume: bool, max_candidates: Optional[int], max_minutes: Optional[float],
                 live: Optional[bool], worker: bool, threads: ThreadFit):
        self.run = run
        self.worker = worker
        self.threads = threads
        cfg = run.cfg
        budget = run_budget(run)
        given = {k: v for k, v in (("max_candidates", max_candidates), ("max_minutes", max_minutes)) if v is not None}
        if given:
            budget |= given
            run.db.metadata.set({BUDGET_KEY: budget})  # the run's budget from now on, for status and every worker
        self.max_candidates = budget.get("max_candidates")
        minutes = budget.get("max_minutes")
        self.max_seconds = minutes * 60 if minutes is not None else None
        self.live = live
        self.suite = Suite.resolve(cfg.fitness.suite)
        self.evaluator = Evaluator(cfg, self.suite)
        db = run.db
        if worker and not db.shareable:
            raise RunError(f"storage {redact(db.url)}: several workers need a SQLite file (one host) or PostgreSQL")
        items = self.evaluator.items()
        hashes = FileHashes(run.run_dir / HASHES_FILE)
        inputs = fingerprint(cfg, self.suite, hashes)  # outside the run's lock: hashing new weights takes a while
        hashes.save()
        with db.lock():
            self._retire_missing()
            meta = db.metadata.get()
            if "items" in meta and meta["items"] != items:
                raise RunError(f"suite {self.suite.name}: its search subsample differs from the one the run started "
                               "with (were the data files or the suite changed?); candidates would not be comparable")
            changed = compare(meta.get("fingerprint"), cfg, inputs)
            if changed:
                raise RunError(f"{run.run_dir}: the run's inputs changed since it started: {'; '.join(changed)}. "
                               "Candidates scored before and after would not be comparable: restore them, or "
                               "start a new run (what may change on resume: "
                               f"{', '.join(k for k in RESUMABLE if k != 'name')})")
            if "fingerprint" in meta and "version" not in meta["fingerprint"]:
                db.metadata.set({"fingerprint": inputs})  # an older run's: the full one from now on
            if "config" not in meta:
                db.metadata.set({"config": cfg.to_dict(), "coordinates": run.space.names, "items": items,
                                 "fingerprint": inputs, "objectives": self.suite.objective_names,
                                 "versions": versions(), "suite": self.suite.name,
                                 "started": _dt.datetime.now().isoformat(timespec="seconds")})
        self.items = items
        estimate = cfg.fitness.estimate
        self.racer = Racer(self.evaluator, self.suite, estimate, cfg.seed) if estimate else None
        if not worker:
            self._say_who_else_runs()
        me = Owner.this_process(device=cfg.device)
        mode = "worker" if worker else ("resume" if resume else "search")
        self.slot = db.registry.register(me.to_dict() | {"mode": mode})
        self.owner = replace(me, slot=self.slot)
        self.tag = f"w{self.slot} " if worker else ""
        self.trackers = Trackers.open(cfg, run.run_dir, run.name, db, run_identity(run))

    def _retire_missing(self) -> None:
        """Candidates deleted from the run database by hand keep their numbers: none is given again."""
        gone = self.run.db.leases.retire_missing()
        if gone:
            log.warning("run database: candidate(s) %s were deleted from it; their numbers are not given again",
                        ", ".join(f"#{n}" for n in gone))

    def _say_who_else_runs(self) -> None:
        """A search or resume started beside a live process of the same run becomes a second
        worker: say so, naming it."""
        others = []
        for w in self.run.db.registry.all():
            other = Owner(w.get("host", "?"), w.get("machine", ""), int(w.get("pid", 0)), w.get("started"))
            if "ended" in w or other.gone():
                continue
            where = "this host" if other.machine == MACHINE else f"{other.host} (unless it was killed)"
            others.append(f"process {other.pid} on {where}")
        if others:
            log.warning("this run is already being searched by %s: this process joins it as another worker, and "
                        "they share its budget (stop the other to run alone)", ", ".join(others))

    def _record(self, ev: Evaluation, recipe=None) -> CandidateRecord:
        return ev.record(self.items, recipe, item_values=self.racer is not None)

    def _references_are_mine(self) -> bool:
        """One process scores the references: a single search, or the first worker to ask."""
        if not self.worker:
            return True
        db = self.run.db
        with db.lock():
            by = db.metadata.get().get("references_by")
            if by is None:
                db.metadata.set({"references_by": self.slot})
                return True
            return by == self.slot

    def references(self) -> None:
        run, db = self.run, self.run.db
        if not run.cfg.references or not self._references_are_mine():
            return
        done = {r.name for r in db.references()}

        def add(name: str, ev: Evaluation, record: CandidateRecord) -> None:
            db.add_reference(name, record, ev.values)
            log.info("reference %s: %s", name, f"{ev.fitness:.4f}" if ev.fitness is not None else ev.error)

        for name, path in parents(run).items():
            if name not in done:
                ev = self.evaluator.score_model_dir(path)["search"]
                add(name, ev, replace(self._record(ev), model=path))
        for name, recipe in reference_recipes(run).items():
            if name not in done:
                ev = self.evaluator.score_recipe(recipe)
                add(name, ev, self._record(ev, recipe))

    def run_trial(self, driver: DriverClaims, current: Proposal, heartbeat: _Heartbeat
                  ) -> tuple[Evaluation, CandidateRecord, bool]:
        """One claimed candidate, as Optuna's ``_run_trial`` is to its ``_optimize``: decoded into
        a recipe, scored (raced level by level with ``fitness.estimate``) while the heartbeat keeps
        its claim, then told to the driver under the run's lock, which records it. Its evaluation,
        its record, and False when it was reclaimed meanwhile (the result is then dropped)."""
        heartbeat.trial_id = current.trial_id
        self.threads.check()
        recipe = self.run.space.decode(current.vector)
        if self.racer is not None:
            self.racer.refresh(self.run.db)
            ev = self.racer.score_recipe(recipe)
        else:
            ev = self.evaluator.score_recipe(recipe)
        record = self._record(ev, recipe)
        with self.run.db.lock():
            ok = driver.tell(current, ev.values, record)
        heartbeat.trial_id = None
        return ev, record, ok

    def loop(self) -> dict:
        run, db, cfg = self.run, self.run.db, self.run.cfg
        t_setup = time.perf_counter()
        self.references()
        if self.evaluator.engine is None:
            self.evaluator.prepare(next(iter(reference_recipes(run).values()), None) or run.space.decode(x0_vector(run)))
        if self.racer is not None:
            self.racer.refresh(db, force=True)
        driver = DriverClaims(db, make_driver(db, run.space.names, cfg.driver, cfg.seed, x0_vector(run),
                                              self.slot, solo=not self.worker), self.owner)
        # a lost candidate is re-queued and redone; one Optuna process instead re-proposes it from
        # its restored sampler (a re-queued trial would skip the draws the sampler made for it)
        retry = self.worker or DRIVERS[cfg.driver.name].requeue
        rows = db.scores()
        done = sum(r.counted for r in rows)
        elapsed0, session0 = db.metadata.elapsed(), time.perf_counter()
        setup_s = session0 - t_setup

        def elapsed() -> float:  # search seconds of the run (see RunDB.save_elapsed)
            return elapsed0 + time.perf_counter() - session0

        progress = Progress(done, self.max_candidates, self.max_seconds, elapsed0, live=self.live)
        best = best_row(rows)
        if best is not None:
            progress.set_best(best.fitness, best.number)
        stopped_by = "budget"
        current = None
        mine = busy = waited = 0.0
        own = dropped = 0
        errors: list[Optional[str]] = []  # this session's candidates' errors (None: scored)
        last_save = time.perf_counter()
        heartbeat = _Heartbeat(db, cfg.heartbeat.interval_s)
        poll = min(1.0, cfg.heartbeat.interval_s / 2)
        with _Signals() as signals:
            try:
                while True:
                    if self.max_seconds is not None and elapsed() >= self.max_seconds:
                        break
                    if signals.requested:
                        stopped_by = "signal"
                        break
                    with db.lock():
                        self._retire_missing()
                        gone = db.leases.reclaim(retry=retry)
                        if gone:
                            log.info("%scandidate(s) %s lost their worker; they are redone", self.tag,
                                     ", ".join(f"#{n}" for n in gone))
                        done, running = db.leases.counts()
                        full = self.max_candidates is not None and done + running >= self.max_candidates
                        current = None if full else driver.ask()
                    if current is None:
                        if self.max_candidates is not None and done >= self.max_candidates:
                            break
                        t0 = time.perf_counter()  # the budget is out, but a claimed candidate may yet be redone
                        signals.wait(poll)
                        waited += time.perf_counter() - t0
                        continue
                    ev, record, ok = self.run_trial(driver, current, heartbeat)
                    busy += ev.merge_seconds + ev.eval_seconds
                    number, trial_id, recipe_vector, current = current.number, current.trial_id, current.vector, None
                    if not ok:
                        dropped += 1
                        log.warning("%scandidate #%d was reclaimed while it ran (no heartbeat for %d s); its "
                                    "result is dropped, another worker redoes it", self.tag, number,
                                    cfg.heartbeat.grace_s)
                        continue
                    own += 1
                    errors.append(ev.error)
                    if same_failure(errors, cfg.fail_fast):
                        stopped_by = f"failures: the first {cfg.fail_fast} candidates all failed with: {ev.error}"
                        log.error("%sthe first %d candidates of this session all failed with the same error, so "
                                  "the search stops: %s. Fix the cause, then: evomerge resume %s (fail_fast in the "
                                  "config sets how many; 0 never stops)", self.tag, cfg.fail_fast, ev.error,
                                  run.run_dir)
                        break
                    self.trackers.candidate(number, record, dict(zip(run.space.names, recipe_vector)))
                    if self.racer is not None:
                        self.racer.add(trial_id, number, record)
                    progress.update(number, ev.fitness, ev.error, ev.merge_seconds, ev.eval_seconds,
                                    tag=self.tag, fidelity=ev.fidelity)
                    if time.perf_counter() - last_save > 5:
                        db.metadata.save_elapsed(elapsed())
                        last_save = time.perf_counter()
            except KeyboardInterrupt:
                stopped_by = "signal (candidate abandoned)"
                if current is not None:
                    db.leases.abandon(current.trial_id)
            finally:
                heartbeat.close()
                progress.close()
                self.trackers.close()
                mine = time.perf_counter() - session0
                db.metadata.save_elapsed(elapsed())
                done = db.leases.counts()[0]
        summary = {"evaluated": done, "stopped_by": stopped_by, "elapsed_s": db.metadata.elapsed(), "slot": self.slot,
                   "own": own, "dropped": dropped, "wall_s": round(mine, 3), "busy_s": round(busy, 3),
                   "waited_s": round(waited, 3), "setup_s": round(setup_s, 3), "threads": self.threads.threads,
                   "idle_share": round(1 - busy / mine, 4) if mine > 0 else None}
        db.registry.update(self.slot, {k: v for k, v in summary.items() if k not in ("evaluated", "slot")}
                         | {"ended": _dt.datetime.now().isoformat(timespec="seconds")})
        if stopped_by.startswith("signal"):
            print(f"stopped after {done} candidate(s); continue with: evomerge resume {run.run_dir}", file=sys.stderr)
        return summary
