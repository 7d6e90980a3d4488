"""Failed attempts per client address, counted in the database so that every server
process (``serve --workers N``) sees the same figure.

One table (``address_failure``) serves every secret a stranger can guess at: share-link
secrets and PINs (scope ``share-link``), upload-link secrets (``upload-link``). Login has
its own per-user lockout on top (access/sessions.py). After ``limit`` failures within
``window`` an address gets :class:`~dicomshare.errors.TooManyRequests` (429, with the
seconds until the oldest of those failures leaves the window) until it does.
"""

from __future__ import annotations

import time
from datetime import timedelta

from sqlalchemy import delete, insert, select
from sqlalchemy.engine import Engine

from dicomshare import clock
from dicomshare.errors import TooManyRequests
from dicomshare.storage import schema as s

_F = s.address_failure
_KEEP = timedelta(days=1)  # rows older than this are pruned (at most every 10 minutes)


class AddressThrottle:
    def __init__(self, engine: Engine, scope: str, limit: int, window_seconds: int) -> None:
        self.engine = engine
        self.scope = scope
        self.limit = max(1, limit)
        self.window = timedelta(seconds=window_seconds)
        self._pruned_at = 0.0

    def check(self, source: str | None, message: str) -> None:
        """TooManyRequests(``message`` + when to retry) if this address failed too often."""
        now = clock.now()
        with self.engine.connect() as conn:
            pivot = conn.execute(
                select(_F.c.at).where(_F.c.scope == self.scope, _F.c.source == _key(source),
                                      _F.c.at >= now - self.window)
                .order_by(_F.c.at.desc()).offset(self.limit - 1).limit(1)).scalar()
        if pivot is None:
            return
        wait = max(1, int((clock.aware(pivot) + self.window - now).total_seconds()) + 1)
        raise TooManyRequests(f"{message}; try again in {(wait + 59) // 60} minute(s)", wait)

    def failed(self, source: str | None) -> None:
        now = clock.now()
        with self.engine.begin() as conn:
            conn.execute(insert(_F).values(scope=self.scope, source=_key(source), at=now))
            if time.monotonic() - self._pruned_at > 600:
                self._pruned_at = time.monotonic()
                conn.execute(delete(_F).where(_F.c.at < now - _KEEP))


def _key(source: str | None) -> str:
    return (source or "-")[:255]
