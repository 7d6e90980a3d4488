"""The Alembic migrations build exactly the schema the code is written against
(storage/schema.py), on each backend: a column added to one and not the other fails here."""

from __future__ import annotations

import re
import subprocess
import sys

from alembic.autogenerate import produce_migrations
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from dicomshare.storage import MIGRATIONS, head_revision, make_engine, migrate
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


def test_every_migration_is_named_by_its_revision() -> None:
    """``migrate`` finds the newest revision from the file names without Alembic."""
    files = sorted((MIGRATIONS / "versions").glob("[0-9][0-9][0-9][0-9]_*.py"))
    assert len(files) >= 11
    previous = None
    for path in files:
        text = path.read_text()
        revision = re.search(r'^revision = "([^"]+)"', text, re.M)
        down = re.search(r'^down_revision = (None|"[^"]+")', text, re.M)
        assert revision and revision.group(1) == path.name[:4], path.name
        assert down and down.group(1) == (f'"{previous}"' if previous else "None"), path.name
        previous = revision.group(1)
    assert head_revision() == previous


def test_an_up_to_date_archive_opens_without_alembic(database_url: str) -> None:
    """Each worker and CLI command opens the archive; when the schema is current that
    costs one query, not Alembic and every migration script."""
    engine = make_engine(database_url, durable=False)
    try:
        migrate(engine)
    finally:
        engine.dispose()
    probe = ("import sys\n"
             "from dicomshare.storage import make_engine, migrate\n"
             f"engine = make_engine({database_url!r}, durable=False)\n"
             "migrate(engine)\n"
             "engine.dispose()\n"
             "print(sorted(m for m in sys.modules if m.split('.')[0] == 'alembic'))\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout
