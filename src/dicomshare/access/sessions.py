"""Browser sessions: password login with lockout and throttling, CSRF tokens, logout.

A browser holds two secrets from a login: the session secret (an HttpOnly cookie, so
scripts cannot read it) and a CSRF token the front end sends back in ``X-CSRF-Token``
with every unsafe request. Only SHA-256 digests of both are stored, as for API tokens:
both are 256-bit random values, so a slow hash adds nothing.

Failed logins are rows in ``login_failure``. Every attempt is written *before* the
password is checked and removed again when it succeeds, so parallel guesses cannot slip
past the limit while the (deliberately slow) argon2 check runs: an attempt's place in
line is its primary key. Limits, within ``login_lockout_minutes``:

* a user name with ``login_max_failures`` failures since its last successful login is
  locked; even the right password is refused until enough failures age out. Unknown
  names lock the same way, so a lock tells nothing about whether an account exists.
* a source address with ``login_max_failures_per_source`` failures is throttled,
  whatever names it tried (a successful login does not reset this).

Refusals while locked are not recorded: they would push the end of the lock further
out for the legitimate user at every retry. Failure rows stay as evidence and are pruned
when older than a day.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, delete, func, insert, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from dicomshare.access.identity import Identities, principal_of
from dicomshare.access.policy import Principal
from dicomshare.config import Settings
from dicomshare.errors import Forbidden, TooManyRequests, Unauthenticated
from dicomshare.storage import schema as s

__all__ = ["LoginRefused", "SessionInfo", "Sessions", "TooManyAttempts"]

LOGIN_REFUSED = "wrong user name or password"
_KEEP_FAILURES = timedelta(days=1)
_PRUNE_EVERY = 600.0  # seconds between prunes, per process


class LoginRefused(Unauthenticated):
    """Wrong name or password (never says which), or a disabled account."""


class TooManyAttempts(TooManyRequests):
    """The user name is locked or the source throttled; ``retry_after`` is in seconds."""


@dataclass(frozen=True)
class SessionInfo:
    """What a login hands to the browser: only here are the secrets ever in clear."""

    principal: Principal
    secret: str
    csrf_token: str
    expires_at: datetime


def _now() -> datetime:
    return datetime.now(UTC)


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def _aware(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; everything is stored in UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


_USER = (s.user.c.pk, s.user.c.name, s.user.c.role, s.user.c.superuser, s.user.c.disabled_at,
         s.user.c.oidc_subject, s.organisation.c.name.label("organisation"),
         s.organisation.c.pk.label("organisation_pk"))

# Built once: every request with a session cookie runs it.
_BY_SECRET = (
    select(s.browser_session.c.pk.label("session_pk"), s.browser_session.c.csrf_hash,
           s.browser_session.c.expires_at, s.browser_session.c.revoked_at, *_USER)
    .join(s.user, s.browser_session.c.user_pk == s.user.c.pk)
    .join(s.organisation, s.user.c.organisation_pk == s.organisation.c.pk)
    .where(s.browser_session.c.secret_hash == bindparam("digest"))
)


class Sessions:
    """Logins, sessions and CSRF checks against the index database."""

    def __init__(self, engine: Engine, settings: Settings,
                 identities: Identities | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self.identities = identities or Identities(engine)
        self._pruned_at = 0.0
        self._prune_lock = threading.Lock()

    @property
    def lifetime(self) -> timedelta:
        return timedelta(hours=self.settings.session_hours)

    @property
    def window(self) -> timedelta:
        return timedelta(minutes=self.settings.login_lockout_minutes)

    # -- password login ------------------------------------------------------------------
    def login(self, name: str, password: str, source: str | None) -> tuple[Principal, str, str]:
        """(principal, session secret, CSRF token); LoginRefused or TooManyAttempts."""
        info = self.login_info(name, password, source)
        return info.principal, info.secret, info.csrf_token

    def login_info(self, name: str, password: str, source: str | None) -> SessionInfo:
        """Like :meth:`login`, with the session's expiry."""
        self._maybe_prune()
        user_key, source_key = name[:200], (source or "")[:255] or None
        attempt = self._record_attempt(user_key, source_key)
        try:
            self._check_limits(attempt, user_key, source_key)
        except TooManyAttempts:
            self._forget_attempt(attempt)
            raise
        who = self.identities.verify_password(name, password)
        if who is None:  # also a disabled or password-less account: the attempt stays
            raise LoginRefused(LOGIN_REFUSED)
        self._forget_attempt(attempt)
        return self._open(who, source)

    def _record_attempt(self, user_key: str, source_key: str | None) -> int:
        with self.engine.begin() as conn:
            result = conn.execute(insert(s.login_failure).values(
                at=_now(), user_name=user_key, source=source_key))
            return int(result.inserted_primary_key[0])  # type: ignore[index]

    def _forget_attempt(self, attempt: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(s.login_failure).where(s.login_failure.c.pk == attempt))

    def _check_limits(self, attempt: int, user_key: str, source_key: str | None) -> None:
        now = _now()
        window_start = now - self.window
        with self.engine.connect() as conn:
            last_login = conn.execute(
                select(func.max(s.browser_session.c.created_at))
                .join(s.user, s.browser_session.c.user_pk == s.user.c.pk)
                .where(s.user.c.name == user_key)).scalar()
            since = max(window_start, _aware(last_login) or window_start)
            wait = self._wait(conn, attempt, s.login_failure.c.user_name == user_key, since,
                              self.settings.login_max_failures, now)
            if wait is not None:
                raise TooManyAttempts(
                    f"too many failed logins for this user name; try again in "
                    f"{_minutes(wait)}", wait)
            if source_key is None:
                return
            wait = self._wait(conn, attempt, s.login_failure.c.source == source_key,
                              window_start, self.settings.login_max_failures_per_source, now)
            if wait is not None:
                raise TooManyAttempts(
                    f"too many failed logins from this address; try again in "
                    f"{_minutes(wait)}", wait)

    def _wait(self, conn: Connection, attempt: int, which: Any, since: datetime,
              limit: int, now: datetime) -> int | None:
        """Seconds until ``limit`` failures no longer precede this attempt; None: go on."""
        if limit <= 0:
            return None
        earlier = (s.login_failure.c.pk < attempt, s.login_failure.c.at >= since, which)
        # The lock ends when the oldest of the latest ``limit`` failures leaves the window.
        # One statement: concurrent attempts delete their rows, a count would go stale.
        pivot = conn.execute(select(s.login_failure.c.at).where(*earlier)
                             .order_by(s.login_failure.c.at.desc(), s.login_failure.c.pk.desc())
                             .offset(limit - 1).limit(1)).scalar()
        if pivot is None:
            return None
        first: datetime = _aware(pivot)  # type: ignore[assignment]
        return max(1, math.ceil((first + self.window - now).total_seconds()))

    def _maybe_prune(self) -> None:
        with self._prune_lock:
            if time.monotonic() - self._pruned_at < _PRUNE_EVERY:
                return
            self._pruned_at = time.monotonic()
        self.prune()

    def prune(self) -> None:
        """Drop failure rows older than a day (or the lockout window, if longer) and
        sessions that ended that long ago."""
        cutoff = _now() - max(_KEEP_FAILURES, self.window)
        with self.engine.begin() as conn:
            conn.execute(delete(s.login_failure).where(s.login_failure.c.at < cutoff))
            conn.execute(delete(s.browser_session)
                         .where(s.browser_session.c.expires_at < cutoff))

    # -- OpenID Connect ------------------------------------------------------------------
    def login_external(self, subject: str, username: str,
                       source: str | None) -> tuple[Principal, str, str]:
        """(principal, secret, CSRF token) for an identity the provider vouched for."""
        info = self.login_external_info(subject, username, source)
        return info.principal, info.secret, info.csrf_token

    def login_external_info(self, subject: str, username: str,
                            source: str | None) -> SessionInfo:
        """Links ``subject`` ("issuer|sub") to the local user ``username`` on first login.

        Accounts are provisioned by administrators, so an unknown user is refused, and so
        is a subject or user already linked elsewhere: a renamed account at the provider
        must not take over another local account.
        """
        if not subject or len(subject) > 255:
            raise Forbidden("the identity provider's subject is empty or too long")
        with self.engine.connect() as conn:
            row = self._user_row(conn, s.user.c.name == username) \
                if 0 < len(username) <= 200 else None
            other = self._user_row(conn, s.user.c.oidc_subject == subject)
        if row is None:
            raise Forbidden(f"there is no local account {username!r}; an administrator "
                            f"must create it before its first login")
        if row.disabled_at is not None:
            raise Forbidden(f"the account {username!r} is disabled")
        if other is not None and other.pk != row.pk:
            raise Forbidden("this identity is linked to another local account")
        if row.oidc_subject is None:
            try:
                with self.engine.begin() as conn:
                    conn.execute(update(s.user).where(
                        s.user.c.pk == row.pk, s.user.c.oidc_subject.is_(None))
                        .values(oidc_subject=subject))
            except IntegrityError:  # linked to another account meanwhile
                raise Forbidden("this identity is linked to another local account") from None
            with self.engine.connect() as conn:
                row = self._user_row(conn, s.user.c.pk == row.pk)
        if row.oidc_subject != subject:
            raise Forbidden(f"the account {username!r} is linked to another identity")
        return self._open(principal_of(row, "session"), source)

    # -- sessions ------------------------------------------------------------------------
    def _open(self, who: Principal, source: str | None) -> SessionInfo:
        secret, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        now = _now()
        expires = now + self.lifetime
        with self.engine.begin() as conn:
            conn.execute(insert(s.browser_session).values(
                user_pk=who.user_pk, secret_hash=_digest(secret), csrf_hash=_digest(csrf),
                created_at=now, expires_at=expires, source=(source or "")[:255] or None))
        return SessionInfo(who.with_source(source), secret, csrf, expires)

    def _user_row(self, conn: Connection, where: Any) -> Any:
        return conn.execute(
            select(*_USER).join(s.organisation, s.user.c.organisation_pk == s.organisation.c.pk)
            .where(where)).first()

    def _live(self, secret: str) -> Any:
        """The session's row if it is live: known, not revoked, not expired, user enabled."""
        if not secret or len(secret) > 100:
            return None
        with self.engine.connect() as conn:
            row = conn.execute(_BY_SECRET, {"digest": _digest(secret)}).first()
        if row is None or row.revoked_at is not None or row.disabled_at is not None:
            return None
        if _aware(row.expires_at) <= _now():  # type: ignore[operator]
            return None
        return row

    def authenticate(self, secret: str) -> Principal | None:
        """The principal a session cookie stands for, or None."""
        row = self._live(secret)
        return None if row is None else principal_of(row, "session")

    def authenticate_with_csrf(self, secret: str,
                               csrf_token: str | None) -> tuple[Principal | None, bool]:
        """(principal or None, whether ``csrf_token`` belongs to the session): one query
        for an unsafe request."""
        row = self._live(secret)
        if row is None:
            return None, False
        return principal_of(row, "session"), _csrf_matches(row.csrf_hash, csrf_token)

    def check_csrf(self, secret: str, csrf_token: str | None) -> bool:
        """Whether ``csrf_token`` is the one issued with this live session."""
        return self.authenticate_with_csrf(secret, csrf_token)[1]

    def expires_at(self, secret: str) -> datetime | None:
        row = self._live(secret)
        return None if row is None else _aware(row.expires_at)

    def logout(self, secret: str) -> bool:
        """Revoke the session; False if it was unknown or already revoked."""
        if not secret or len(secret) > 100:
            return False
        with self.engine.begin() as conn:
            done = conn.execute(update(s.browser_session).where(
                s.browser_session.c.secret_hash == _digest(secret),
                s.browser_session.c.revoked_at.is_(None)).values(revoked_at=_now()))
        return done.rowcount > 0

    def revoke_all(self, user_pk: int) -> int:
        """End every live session of a user (password change, disabling, compromise)."""
        with self.engine.begin() as conn:
            done = conn.execute(update(s.browser_session).where(
                s.browser_session.c.user_pk == user_pk,
                s.browser_session.c.revoked_at.is_(None)).values(revoked_at=_now()))
        return int(done.rowcount)


def _csrf_matches(stored_hash: str, csrf_token: str | None) -> bool:
    if not csrf_token or len(csrf_token) > 100:
        return False
    return hmac.compare_digest(stored_hash.encode(), _digest(csrf_token).encode())


def _minutes(seconds: int) -> str:
    minutes = math.ceil(seconds / 60)
    return "1 minute" if minutes == 1 else f"{minutes} minutes"
