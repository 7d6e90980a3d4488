"""Storage backends, chosen by URL. The only place that names concrete classes."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine

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


def migrate(engine: Engine) -> None:
    """Create or upgrade the schema to the newest Alembic revision."""
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
