"""Run metadata: the run's facts (config, coordinates, subsample, versions), the driver's state and
the run's search time. The driver state is JSON, never pickle: nothing read back from a run
database can construct objects or run code."""

from __future__ import annotations

import json
from typing import Any, Optional

from optuna.storages import RDBStorage

from evomerge.errors import EvomergeError
from evomerge.rundb.lock import RunLock
from evomerge.rundb.optuna_sql import OptunaTables

STATE_KEY = "evomerge:driver_state"
ELAPSED_KEY = "evomerge:elapsed"


class RunMeta:
    def __init__(self, storage: RDBStorage, tables: OptunaTables, lock: RunLock):
        self.storage = storage
        self.tables = tables
        self.study_id = tables.study_id
        self.lock = lock
        self._state_cache: tuple[Optional[str], Any] = (None, None)

    def set(self, values: dict[str, Any]) -> None:
        for k, v in values.items():
            self.storage.set_study_user_attr(self.study_id, k, v)

    def get(self) -> dict[str, Any]:
        return self.storage.get_study_user_attrs(self.study_id)

    # -- the driver's state ------------------------------------------------------------------------

    def driver_state(self) -> Optional[dict]:
        """The driver state last saved; the same object while nobody saved another."""
        text = self.tables.system_attr_json(STATE_KEY)
        if text is None:
            return None
        if self._state_cache[0] != text:
            try:
                state = json.loads(text)
            except ValueError:
                state = None
            if not isinstance(state, dict):
                raise EvomergeError("run database: its driver state is not a JSON object (a run of an older "
                                    "evomerge pickled it; a pickle is never loaded, it could run code): start a "
                                    "new run")
            self._state_cache = (text, state)
        return self._state_cache[1]

    @staticmethod
    def driver_state_attrs(state: dict) -> dict[str, Any]:
        """The study system attrs that hold ``state`` (to write in another transaction)."""
        return {STATE_KEY: state}

    def save_driver_state(self, state: dict) -> None:
        self.storage.set_study_system_attr(self.study_id, STATE_KEY, state)

    # -- search time -------------------------------------------------------------------------------

    def elapsed(self) -> float:
        return float(self.storage.get_study_system_attrs(self.study_id).get(ELAPSED_KEY, 0.0))

    def save_elapsed(self, seconds: float) -> None:
        """The run's search time: the largest any process has reported (processes running side
        by side share the wall clock; sessions one after another add up through their start value)."""
        with self.lock.held():
            if seconds > self.elapsed():
                self.storage.set_study_system_attr(self.study_id, ELAPSED_KEY, seconds)
