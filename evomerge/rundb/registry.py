"""The worker registry: every process that joined the run, its slot, and its summary when it ended."""

from __future__ import annotations

import datetime

from optuna.storages import RDBStorage

from evomerge.rundb.lock import RunLock

WORKERS_KEY = "evomerge:workers"


class WorkerRegistry:
    def __init__(self, storage: RDBStorage, study_id: int, lock: RunLock):
        self.storage = storage
        self.study_id = study_id
        self.lock = lock

    def register(self, fields: dict) -> int:
        """Add a worker; returns its slot (0, 1, ...)."""
        with self.lock.held():
            workers = self.all()
            slot = len(workers)
            joined = datetime.datetime.now().isoformat(timespec="seconds")
            workers.append(fields | {"slot": slot, "joined": joined})
            self.storage.set_study_system_attr(self.study_id, WORKERS_KEY, workers)
            return slot

    def update(self, slot: int, fields: dict) -> None:
        with self.lock.held():
            workers = self.all()
            if slot < len(workers):
                workers[slot] = workers[slot] | fields
                self.storage.set_study_system_attr(self.study_id, WORKERS_KEY, workers)

    def all(self) -> list[dict]:
        return list(self.storage.get_study_system_attrs(self.study_id).get(WORKERS_KEY, []))
