"""Notifications: rows in ``notification`` (an outbox), read in the API and, when SMTP is
configured, delivered by e-mail. Producers only insert rows, in their own transaction, so
a notification exists exactly when the event it describes was committed."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import insert
from sqlalchemy.engine import Connection

from dicomshare import clock
from dicomshare.storage import schema as s

KINDS = ("share-used", "inbox-new", "inbox-decided", "consult-updated", "upload-received")


def notify(conn: Connection, organisation_pk: int, user_pk: int | None, kind: str,
           subject: str, details: dict[str, Any]) -> int:
    """Queue a notification for one user (or every user of the organisation when
    ``user_pk`` is None); return its id. ``details`` must hold no PHI the recipient may
    not see."""
    if kind not in KINDS:
        raise ValueError(f"unknown notification kind {kind!r}")
    result = conn.execute(insert(s.notification).values(
        organisation_pk=organisation_pk, user_pk=user_pk, kind=kind, subject=subject[:500],
        details=json.dumps(details, sort_keys=True), created_at=clock.now()))
    return int(result.inserted_primary_key[0])  # type: ignore[index]
