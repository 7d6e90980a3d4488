"""Time as the database keeps it: UTC, timezone-aware (SQLite hands back naive values)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import overload


def now() -> datetime:
    return datetime.now(UTC)


@overload
def aware(value: datetime) -> datetime: ...
@overload
def aware(value: None) -> None: ...
def aware(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def ended(revoked_at: datetime | None, expires_at: datetime | None,
          at: datetime | None = None) -> str | None:
    """"revoked" or "expired" (revocation first), or None while it lasts: the one rule for
    grants, share links and upload links."""
    if revoked_at is not None:
        return "revoked"
    if expires_at is not None and expires_at <= (at or now()):
        return "expired"
    return None
