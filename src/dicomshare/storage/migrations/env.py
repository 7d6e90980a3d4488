"""Alembic environment: run against the connection dicomshare hands over."""

from __future__ import annotations

from alembic import context

from dicomshare.storage.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise SystemExit("run migrations through dicomshare (storage.migrate), not alembic directly")
context.configure(connection=connection, target_metadata=metadata,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
