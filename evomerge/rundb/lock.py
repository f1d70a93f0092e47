"""The run-wide lock: claims, tells and budget checks of every process on one run go through it."""

from __future__ import annotations

import fcntl
import hashlib
import threading
from contextlib import contextmanager
from typing import Iterator, Optional

import sqlalchemy as sa


class RunLock:
    """A re-entrant lock shared by every process of a run: a file lock beside a SQLite file, a
    PostgreSQL advisory lock keyed by the run's name; nothing for other databases (one process).
    It dies with its process (the kernel drops a file lock, PostgreSQL a session's advisory lock),
    so a killed worker never leaves the run locked."""

    def __init__(self, engine: sa.engine.Engine, run_name: str, sqlite_file: Optional[str]):
        self.engine = engine
        self.sqlite_file = sqlite_file
        self.postgres = engine.dialect.name == "postgresql"
        self.key = int.from_bytes(hashlib.blake2b(f"evomerge:{run_name}".encode(), digest_size=8).digest(),
                                  "big", signed=True)
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._conn: Optional[sa.Connection] = None
        self._file = None

    @contextmanager
    def held(self) -> Iterator[None]:
        with self._thread_lock:
            if self._depth == 0:
                self._acquire()
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self._release()

    def _acquire(self) -> None:
        if self.sqlite_file is not None:
            if self._file is None:
                self._file = open(f"{self.sqlite_file}.lock", "a+")
            fcntl.flock(self._file, fcntl.LOCK_EX)
        elif self.postgres:
            if self._conn is None:
                self._conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            self._conn.execute(sa.select(sa.func.pg_advisory_lock(self.key)))

    def _release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
        elif self._conn is not None:
            self._conn.execute(sa.select(sa.func.pg_advisory_unlock(self.key)))

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._file is not None:
            self._file.close()
            self._file = None
