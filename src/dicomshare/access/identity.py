"""Organisations, users and API tokens: who a caller is.

Passwords are hashed with argon2; API tokens are 256-bit random secrets of which only a
SHA-256 digest is stored (a slow hash adds nothing to a secret that long, and every
request checks one). Revocation and expiry take effect on the next request: tokens are
looked up every time, never cached. What a caller may do is decided in access/policy.py.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.engine import Engine

from dicomshare import clock
from dicomshare.access.policy import ROLES, SCOPES, Principal, parse_scopes
from dicomshare.errors import Conflict, Forbidden, InvalidInput, NotFound
from dicomshare.storage import schema as s

TOKEN_PREFIX = "dsh_"
_hasher = PasswordHasher()
# Verified against when the user does not exist, so a wrong name costs as long as a
# wrong password (no user enumeration by timing).
_DUMMY_HASH = _hasher.hash(secrets.token_hex(16))

__all__ = ["ROLES", "Identities", "OrganisationInfo", "Principal", "TokenInfo", "UserInfo"]


@dataclass(frozen=True)
class TokenInfo:
    id: int
    user: str
    name: str | None
    prefix: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    scopes: tuple[str, ...] = SCOPES
    organisation: str | None = None

    @property
    def state(self) -> str:
        if self.revoked_at:
            return "revoked"
        if self.expires_at and self.expires_at <= clock.now():
            return "expired"
        return "active"


@dataclass(frozen=True)
class UserInfo:
    id: int
    name: str
    organisation: str
    role: str
    superuser: bool
    disabled: bool
    created_at: datetime


@dataclass(frozen=True)
class OrganisationInfo:
    id: int
    name: str
    created_at: datetime



def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()



_USER_COLUMNS = (s.user.c.pk, s.user.c.name, s.user.c.role, s.user.c.password_hash,
                 s.user.c.superuser, s.user.c.disabled_at, s.user.c.created_at,
                 s.organisation.c.name.label("organisation"),
                 s.organisation.c.pk.label("organisation_pk"))

# Built once: every request runs it.
_BY_DIGEST = (
    select(s.token.c.pk, s.token.c.expires_at, s.token.c.revoked_at,
           s.user.c.name, s.user.c.role, s.organisation.c.name, s.token.c.scopes,
           s.user.c.pk.label("user_pk"), s.organisation.c.pk.label("organisation_pk"),
           s.user.c.superuser, s.user.c.disabled_at)
    .join(s.user, s.token.c.user_pk == s.user.c.pk)
    .join(s.organisation, s.user.c.organisation_pk == s.organisation.c.pk)
    .where(s.token.c.secret_hash == bindparam("digest"))
)


def principal_of(row: Any, kind: str, scopes: frozenset[str] = frozenset(SCOPES),
                 token_id: int | None = None) -> Principal:
    """A Principal from a row carrying the _USER_COLUMNS."""
    return Principal(row.name, row.organisation, row.role, token_id=token_id,
                     user_pk=row.pk, organisation_pk=row.organisation_pk,
                     superuser=bool(row.superuser), scopes=scopes, kind=kind)


class Identities:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # -- organisations -------------------------------------------------------------------
    def ensure_organisation(self, name: str) -> int:
        name = _clean_name(name, "organisation")
        with self.engine.begin() as conn:
            pk = conn.execute(select(s.organisation.c.pk)
                              .where(s.organisation.c.name == name)).scalar_one_or_none()
            if pk is None:
                result = conn.execute(insert(s.organisation).values(name=name,
                                                                    created_at=clock.now()))
                pk = result.inserted_primary_key[0]  # type: ignore[index]
            return int(pk)

    def create_organisation(self, name: str) -> OrganisationInfo:
        name = _clean_name(name, "organisation")
        if self.organisation(name, missing_ok=True) is not None:
            raise Conflict(f"organisation {name!r} already exists")
        self.ensure_organisation(name)
        found = self.organisation(name)
        assert found is not None
        return found

    def organisation(self, name: str, missing_ok: bool = False) -> OrganisationInfo | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(s.organisation.c.pk, s.organisation.c.name,
                                      s.organisation.c.created_at)
                               .where(s.organisation.c.name == name)).first()
        if row is None:
            if missing_ok:
                return None
            raise NotFound(f"no organisation {name!r}")
        return OrganisationInfo(row[0], row[1], clock.aware(row[2]))

    def organisations(self) -> list[OrganisationInfo]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(s.organisation.c.pk, s.organisation.c.name,
                                       s.organisation.c.created_at)
                                .order_by(s.organisation.c.name)).all()
        return [OrganisationInfo(r[0], r[1], clock.aware(r[2])) for r in rows]

    def organisation_names(self) -> dict[int, str]:
        return {o.id: o.name for o in self.organisations()}

    # -- users ---------------------------------------------------------------------------
    def create_user(self, name: str, organisation: str, role: str,
                    password: str | None, superuser: bool = False,
                    create_organisation: bool = True) -> UserInfo:
        if role not in ROLES:
            raise InvalidInput(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        name = _clean_name(name, "user")
        if password is not None and len(password) < 8:
            raise InvalidInput("password must have at least 8 characters")
        if len(password or "") > 1000:
            raise InvalidInput("password is longer than 1000 characters")
        if not create_organisation:
            self.organisation(organisation)  # NotFound unless it exists
        org_pk = self.ensure_organisation(organisation)
        with self.engine.begin() as conn:
            if conn.execute(select(s.user.c.pk).where(s.user.c.name == name)).first():
                raise Conflict(f"user {name!r} already exists")
            conn.execute(insert(s.user).values(
                name=name, organisation_pk=org_pk, role=role, created_at=clock.now(),
                superuser=superuser,
                password_hash=_hasher.hash(password) if password else None))
        return self.user(name)

    def user(self, name: str) -> UserInfo:
        row = self._user(name)
        if row is None:
            raise NotFound(f"no user {name!r}")
        return _user_info(row)

    def users(self, organisation_pk: int | None = None) -> list[UserInfo]:
        stmt = (select(*_USER_COLUMNS)
                .join(s.organisation, s.user.c.organisation_pk == s.organisation.c.pk)
                .order_by(s.user.c.name))
        if organisation_pk is not None:
            stmt = stmt.where(s.user.c.organisation_pk == organisation_pk)
        with self.engine.connect() as conn:
            return [_user_info(r) for r in conn.execute(stmt)]

    def update_user(self, name: str, role: str | None = None, disabled: bool | None = None,
                    password: str | None = None) -> UserInfo:
        values: dict[str, Any] = {}
        if role is not None:
            if role not in ROLES:
                raise InvalidInput(f"role must be one of {', '.join(ROLES)}, not {role!r}")
            values["role"] = role
        if disabled is not None:
            values["disabled_at"] = clock.now() if disabled else None
        if password is not None:
            if not 8 <= len(password) <= 1000:
                raise InvalidInput("password must have 8 to 1000 characters")
            values["password_hash"] = _hasher.hash(password)
        self.user(name)
        if values:
            with self.engine.begin() as conn:
                conn.execute(update(s.user).where(s.user.c.name == name).values(**values))
        return self.user(name)

    def has_users(self) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(select(s.user.c.pk).limit(1)).first() is not None

    def verify_password(self, name: str, password: str) -> Principal | None:
        """The user's principal when the password is right (and the user enabled)."""
        row = self._user(name) if len(name) <= 200 else None
        stored = row.password_hash if row is not None and row.password_hash else _DUMMY_HASH
        try:
            _hasher.verify(stored, password[:1000])
        except (VerificationError, InvalidHashError):
            return None
        if row is None or not row.password_hash or row.disabled_at is not None:
            return None
        return principal_of(row, "session")

    def principal_for_user(self, name: str, kind: str = "cli") -> Principal:
        row = self._user(name)
        if row is None:
            raise NotFound(f"no user {name!r}")
        return principal_of(row, kind)

    def active_user(self, user_pk: int, kind: str, scopes: frozenset[str]) -> Principal:
        """A user as they are now (background work they started); Forbidden when they
        are gone or disabled."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(*_USER_COLUMNS)
                .join(s.organisation, s.user.c.organisation_pk == s.organisation.c.pk)
                .where(s.user.c.pk == user_pk)).first()
        if row is None:
            raise Forbidden("the user no longer exists")
        if row.disabled_at is not None:
            raise Forbidden(f"user {row.name} was disabled")
        return principal_of(row, kind, scopes)

    def _user(self, name: str) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(
                select(*_USER_COLUMNS)
                .join(s.organisation, s.user.c.organisation_pk == s.organisation.c.pk)
                .where(s.user.c.name == name)).first()

    # -- tokens --------------------------------------------------------------------------
    def create_token(self, user: str, name: str | None = None,
                     expires_at: datetime | None = None,
                     scopes: frozenset[str] | None = None) -> tuple[int, str]:
        """Return (id, secret). The secret is shown once and never stored."""
        row = self._user(user)
        if row is None:
            raise NotFound(f"no user {user!r}")
        scopes = parse_scopes(scopes if scopes is not None else SCOPES)
        if not scopes:
            raise InvalidInput("a token needs at least one scope")
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self.engine.begin() as conn:
            result = conn.execute(insert(s.token).values(
                user_pk=row.pk, name=name, prefix=secret[:10], secret_hash=_digest(secret),
                created_at=clock.now(), expires_at=expires_at,
                scopes=",".join(sc for sc in SCOPES if sc in scopes)))
            pk = result.inserted_primary_key[0]  # type: ignore[index]
        return int(pk), secret

    def token(self, token_id: int) -> TokenInfo:
        found = [t for t in self.list_tokens(token_id=token_id)]
        if not found:
            raise NotFound(f"no token with id {token_id}")
        return found[0]

    def revoke_token(self, token_id: int) -> None:
        with self.engine.begin() as conn:
            done = conn.execute(update(s.token).where(s.token.c.pk == token_id,
                                                      s.token.c.revoked_at.is_(None))
                                .values(revoked_at=clock.now()))
            if done.rowcount == 0:
                exists = conn.execute(select(s.token.c.pk)
                                      .where(s.token.c.pk == token_id)).first()
                if exists is None:
                    raise NotFound(f"no token with id {token_id}")

    def list_tokens(self, organisation_pk: int | None = None, user: str | None = None,
                    token_id: int | None = None) -> list[TokenInfo]:
        stmt = (select(s.token.c.pk, s.user.c.name, s.token.c.name, s.token.c.prefix,
                       s.token.c.created_at, s.token.c.expires_at, s.token.c.revoked_at,
                       s.token.c.scopes, s.organisation.c.name)
                .join(s.user, s.token.c.user_pk == s.user.c.pk)
                .join(s.organisation, s.user.c.organisation_pk == s.organisation.c.pk)
                .order_by(s.token.c.pk))
        if organisation_pk is not None:
            stmt = stmt.where(s.user.c.organisation_pk == organisation_pk)
        if user is not None:
            stmt = stmt.where(s.user.c.name == user)
        if token_id is not None:
            stmt = stmt.where(s.token.c.pk == token_id)
        with self.engine.connect() as conn:
            rows = conn.execute(stmt).all()
        return [TokenInfo(r[0], r[1], r[2], r[3], clock.aware(r[4]),
                          clock.aware(r[5]), clock.aware(r[6]), tuple(r[7].split(",")), r[8])
                for r in rows]

    def authenticate(self, secret: str) -> Principal | None:
        """The principal a bearer token stands for, or None (unknown, revoked, expired)."""
        if not secret.startswith(TOKEN_PREFIX) or len(secret) > 100:
            return None
        from dicomshare.access.grants import live_grants

        with self.engine.connect() as conn:
            row = conn.execute(_BY_DIGEST, {"digest": _digest(secret)}).first()
            if row is None or row.revoked_at is not None or row.disabled_at is not None:
                return None
            expires = clock.aware(row.expires_at)
            if expires is not None and expires <= clock.now():
                return None
            who = Principal(row[3], row[5], row[4], token_id=row[0], user_pk=row.user_pk,
                            organisation_pk=row.organisation_pk,
                            superuser=bool(row.superuser), scopes=parse_scopes(row.scopes),
                            kind="token")
            # The grants of this request, on the same connection: one round trip less.
            return who if who.superuser else replace(who, grants=tuple(live_grants(conn, who)))

    def bootstrap(self) -> str | None:
        """On an archive without users, create the superuser `admin` and return its first
        token, once."""
        if self.has_users():
            return None
        self.create_user("admin", "local", "admin", None, superuser=True)
        return self.create_token("admin", "first-start")[1]


def _clean_name(name: str, what: str) -> str:
    name = name.strip()
    if not name:
        raise InvalidInput(f"{what} name is empty")
    if len(name) > 200 or any(ord(c) < 32 for c in name):
        raise InvalidInput(f"{what} name must be at most 200 printable characters")
    return name


def _user_info(row: Any) -> UserInfo:
    return UserInfo(row.pk, row.name, row.organisation, row.role, bool(row.superuser),
                    row.disabled_at is not None, clock.aware(row.created_at))
