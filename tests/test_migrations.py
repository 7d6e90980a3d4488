"""The Alembic migrations build exactly the schema the code is written against
(storage/schema.py), on each backend: a column added to one and not the other fails here."""

from __future__ import annotations

from alembic.autogenerate import produce_migrations
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from dicomshare.storage import make_engine, migrate
from dicomshare.storage import schema as s


def test_migrations_match_the_schema(database_url: str) -> None:
    engine = make_engine(database_url, durable=False)
    migrate(engine)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            ops = produce_migrations(context, s.metadata).upgrade_ops
        assert ops is not None
        differences = [op.to_diff_tuple() for op in ops.ops]  # type: ignore[attr-defined]
        assert differences == [], differences
        # Every table of the schema exists after migrating (the check above is not vacuous).
        assert set(s.metadata.tables) <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
