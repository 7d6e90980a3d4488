"""SQLite specifics: WAL, a busy timeout, and one writer at a time within the process."""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy.dialects.sqlite import insert
from sqlalchemy.engine import Engine
from sqlalchemy.sql import Insert

from dicomshare.storage.sql import SqlIndex


def configure(engine: Engine, durable: bool) -> None:
    """Pragmas on every new connection. synchronous=FULL makes a commit survive power loss."""

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=60000")
        # Match PostgreSQL: LIKE is case-sensitive, lower() folds non-ASCII letters too.
        cur.execute("PRAGMA case_sensitive_like=ON")
        cur.close()
        dbapi_conn.create_function("lower", 1, lambda v: v.lower() if isinstance(v, str) else v,
                                   deterministic=True)


class SqliteIndex(SqlIndex):
    """SQLite allows one writer. Writers queue on a lock instead of SQLite's busy handler,
    which polls with sleeps of up to 100 ms: a thread lock within the process and an
    ``flock`` on ``<database>.writelock`` between processes (worker processes, an
    import beside the server), both of which wake the next writer at once."""

    _lock = threading.Lock()

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        database = engine.url.database
        self._lock_path = f"{database}.writelock" if database and database != ":memory:" \
            else None

    @contextmanager
    def _write_lock(self) -> Iterator[None]:
        with self._lock:
            if self._lock_path is None:
                yield
                return
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # closing releases the flock

    def _insert_ignore(self, table: Any, key: str | list[str]) -> Insert:
        return insert(table).on_conflict_do_nothing(
            index_elements=[key] if isinstance(key, str) else key)
