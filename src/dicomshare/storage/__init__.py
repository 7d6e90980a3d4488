"""Storage backends, chosen by URL. The only place that names concrete classes."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from dicomshare.storage.base import BlobStore, Index
from dicomshare.storage.filesystem import FilesystemBlobStore
from dicomshare.storage.sql import SqlIndex

MIGRATIONS = Path(__file__).parent / "migrations"


def make_engine(url: str, durable: bool = True) -> Engine:
    if url.startswith("sqlite"):
        from dicomshare.storage import sqlite

        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 60},
                               pool_size=8, max_overflow=16)
        sqlite.configure(engine, durable)
        return engine
    if url.startswith("postgresql"):
        return create_engine(url, pool_size=8, max_overflow=16, pool_pre_ping=True)
    raise SystemExit(f"unsupported database URL {url!r}: use sqlite:/// or postgresql+psycopg://")


def head_revision() -> str:
    """The newest migration: files are named by their revision (``0011_transfer_jobs.py``
    is revision "0011"; tests/test_migrations.py holds every file to it)."""
    return max(p.name[:4] for p in (MIGRATIONS / "versions").glob("[0-9][0-9][0-9][0-9]_*.py"))


def migrate(engine: Engine) -> None:
    """Create or upgrade the schema to the newest Alembic revision.

    A database already there is only read: every process that opens the archive (each
    server worker, each CLI command) would otherwise load Alembic and every migration
    script to learn that nothing is to be done (about 11 MiB and a fifth of a second)."""
    try:
        with engine.connect() as conn:
            current = conn.execute(text("SELECT version_num FROM alembic_version")).scalars()
            if list(current) == [head_revision()]:
                return
    except SQLAlchemyError:  # a new database: no version table yet
        pass
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def open_index(engine: Engine) -> SqlIndex:
    if engine.dialect.name == "sqlite":
        from dicomshare.storage.sqlite import SqliteIndex

        return SqliteIndex(engine)
    from dicomshare.storage.postgres import PostgresIndex

    return PostgresIndex(engine)


def open_blobs(root: Path, fsync: bool = True) -> FilesystemBlobStore:
    return FilesystemBlobStore(root, fsync=fsync)


__all__ = ["BlobStore", "Index", "make_engine", "migrate", "open_blobs", "open_index"]
