"""PostgreSQL specifics: ON CONFLICT DO NOTHING; row locks serialise concurrent writers."""

from __future__ import annotations

from typing import Any

from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.sql import Insert

from dicomshare.storage.sql import SqlIndex


class PostgresIndex(SqlIndex):
    def _insert_ignore(self, table: Any, key: str | list[str]) -> Insert:
        return insert(table).on_conflict_do_nothing(
            index_elements=[key] if isinstance(key, str) else key)
