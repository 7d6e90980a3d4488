"""Organisations, users and API tokens: who a caller is.

Passwords are hashed with argon2; API tokens are 256-bit random secrets of which only a
SHA-256 digest is stored (a slow hash adds nothing to a secret that long, and every
request checks one). Revocation and expiry take effect on the next request: tokens are
looked up every time, never cached.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import VerificationError
from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.engine import Engine

from dicomshare.errors import Conflict, InvalidInput, NotFound
from dicomshare.storage import schema as s

ROLES = ("admin", "member")
TOKEN_PREFIX = "dsh_"
_hasher = PasswordHasher()


@dataclass(frozen=True)
class Principal:
    """The caller of a request, whatever the way in."""

    user: str
    organisation: str
    role: str
    token_id: int | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True)
class TokenInfo:
    id: int
    user: str
    name: str | None
    prefix: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None


def _now() -> datetime:
    return datetime.now(UTC)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _aware(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; everything is stored in UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


# Built once: every request runs it.
_BY_DIGEST = (
    select(s.token.c.pk, s.token.c.expires_at, s.token.c.revoked_at,
           s.user.c.name, s.user.c.role, s.organisation.c.name)
    .join(s.user, s.token.c.user_pk == s.user.c.pk)
    .join(s.organisation, s.user.c.organisation_pk == s.organisation.c.pk)
    .where(s.token.c.secret_hash == bindparam("digest"))
)


class Identities:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def ensure_organisation(self, name: str) -> int:
        name = name.strip()
        if not name:
            raise InvalidInput("organisation name is empty")
        with self.engine.begin() as conn:
            pk = conn.execute(select(s.organisation.c.pk)
                              .where(s.organisation.c.name == name)).scalar_one_or_none()
            if pk is None:
                result = conn.execute(insert(s.organisation).values(name=name, created_at=_now()))
                pk = result.inserted_primary_key[0]  # type: ignore[index]
            return int(pk)

    def create_user(self, name: str, organisation: str, role: str,
                    password: str | None) -> None:
        if role not in ROLES:
            raise InvalidInput(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        if not name.strip():
            raise InvalidInput("user name is empty")
        if password is not None and len(password) < 8:
            raise InvalidInput("password must have at least 8 characters")
        org_pk = self.ensure_organisation(organisation)
        with self.engine.begin() as conn:
            if conn.execute(select(s.user.c.pk).where(s.user.c.name == name)).first():
                raise Conflict(f"user {name!r} already exists")
            conn.execute(insert(s.user).values(
                name=name, organisation_pk=org_pk, role=role, created_at=_now(),
                password_hash=_hasher.hash(password) if password else None))

    def has_users(self) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(select(s.user.c.pk).limit(1)).first() is not None

    def verify_password(self, name: str, password: str) -> Principal | None:
        row = self._user(name)
        if row is None or not row.password_hash:
            return None
        try:
            _hasher.verify(row.password_hash, password)
        except VerificationError:
            return None
        return Principal(row.name, row.organisation, row.role)

    def _user(self, name: str) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(
                select(s.user.c.pk, s.user.c.name, s.user.c.role, s.user.c.password_hash,
                       s.organisation.c.name.label("organisation"))
                .join(s.organisation, s.user.c.organisation_pk == s.organisation.c.pk)
                .where(s.user.c.name == name)).first()

    def create_token(self, user: str, name: str | None = None,
                     expires_at: datetime | None = None) -> tuple[int, str]:
        """Return (id, secret). The secret is shown once and never stored."""
        row = self._user(user)
        if row is None:
            raise NotFound(f"no user {user!r}")
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self.engine.begin() as conn:
            result = conn.execute(insert(s.token).values(
                user_pk=row.pk, name=name, prefix=secret[:10], secret_hash=_digest(secret),
                created_at=_now(), expires_at=expires_at))
            pk = result.inserted_primary_key[0]  # type: ignore[index]
        return int(pk), secret

    def revoke_token(self, token_id: int) -> None:
        with self.engine.begin() as conn:
            done = conn.execute(update(s.token).where(s.token.c.pk == token_id,
                                                      s.token.c.revoked_at.is_(None))
                                .values(revoked_at=_now()))
            if done.rowcount == 0:
                exists = conn.execute(select(s.token.c.pk)
                                      .where(s.token.c.pk == token_id)).first()
                if exists is None:
                    raise NotFound(f"no token with id {token_id}")

    def list_tokens(self) -> list[TokenInfo]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(s.token.c.pk, s.user.c.name, s.token.c.name, s.token.c.prefix,
                       s.token.c.created_at, s.token.c.expires_at, s.token.c.revoked_at)
                .join(s.user, s.token.c.user_pk == s.user.c.pk).order_by(s.token.c.pk)).all()
        return [TokenInfo(r[0], r[1], r[2], r[3], _aware(r[4]),  # type: ignore[arg-type]
                          _aware(r[5]), _aware(r[6])) for r in rows]

    def authenticate(self, secret: str) -> Principal | None:
        """The principal a bearer token stands for, or None (unknown, revoked, expired)."""
        if not secret.startswith(TOKEN_PREFIX) or len(secret) > 100:
            return None
        with self.engine.connect() as conn:
            row = conn.execute(_BY_DIGEST, {"digest": _digest(secret)}).first()
        if row is None or row.revoked_at is not None:
            return None
        expires = _aware(row.expires_at)
        if expires is not None and expires <= _now():
            return None
        return Principal(row[3], row[5], row[4], token_id=row[0])

    def bootstrap(self) -> str | None:
        """On an archive without users, create `admin` and return its first token, once."""
        if self.has_users():
            return None
        self.create_user("admin", "local", "admin", None)
        return self.create_token("admin", "first-start")[1]
