"""SQLite specifics: WAL, a busy timeout, and one writer at a time within the process."""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager
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
    # SQLite allows one writer; taking the lock here avoids busy retries between threads.
    # Other processes (an import beside the server) wait on busy_timeout instead.
    _lock = threading.Lock()

    def _insert_ignore(self, table: Any, values: dict[str, Any], key: str) -> Insert:
        return insert(table).values(**values).on_conflict_do_nothing(index_elements=[key])

    def _write_lock(self) -> AbstractContextManager[Any]:
        return self._lock
