"""Share links: capability records kept on the server (see docs/share-links.md).

A link opens a study, several studies, or all studies of one patient to whoever holds its
secret: no account needed. Only a SHA-256 digest of the secret is stored (a 256-bit
random value needs no slow hash); the optional PIN is hashed with argon2 and locks the
link after ``share_pin_max_failures`` wrong tries. Revocation and expiry take effect on
the next request: a link is read from the database on every request, never cached.

What a link shows is decided when it is used, not when it was made: the instances its
creator may still share (owned by the creator's organisation, plus sources of the
creator's live grants that carry ``re-share``), as :class:`LiveGrant` openings of a
:class:`Principal` that has no organisation of its own. The DICOMweb layer, the index and
the audit trail then treat a link like any other caller.

Browser sessions of a link are HMAC-signed cookies bound to the link (its id and secret
digest) with their own expiry; every request still reads the link, so a revoked, expired
or locked link ends its sessions at once.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import and_, insert, or_, select, update
from sqlalchemy.engine import Connection, Engine

from dicomshare import clock
from dicomshare.access.grants import live_grants, owns, resharing_grant
from dicomshare.access.policy import Action, LiveGrant, Principal, check
from dicomshare.access.throttle import AddressThrottle
from dicomshare.config import Settings
from dicomshare.errors import (
    DicomshareError,
    Forbidden,
    Gone,
    InvalidInput,
    Locked,
    NotFound,
)
from dicomshare.keys import load_or_create_key
from dicomshare.monitoring.events import emit
from dicomshare.sharing.common import new_secret, secret_digest
from dicomshare.sharing.notify import notify
from dicomshare.storage import schema as s

if TYPE_CHECKING:
    from dicomshare.access.service import Access

__all__ = ["LINK_PERMISSIONS", "Link", "LinkGone", "LinkLocked", "LinkStore", "PinRequired"]

LINK_PERMISSIONS = ("view", "download", "upload")
MAX_DAYS = 365
DEFAULT_DAYS = 30
MAX_STUDIES = 500
SESSION_HOURS = 12
USE_WINDOW_SECONDS = 30 * 60  # a session-less client counts one use per address per window
# Per client address, failures (unknown secrets, wrong PINs) within the window before
# further attempts are refused with 429 (access/throttle.py; the PIN lock is per link).
ADDRESS_MAX_FAILURES = 30
ADDRESS_WINDOW_SECONDS = 600

_hasher = PasswordHasher()
# Verified against when a PIN-less link is asked for a PIN, so the answer takes as long.
_DUMMY_HASH = _hasher.hash(secrets.token_hex(16))
_L = s.share_link
_LS = s.share_link_study


class LinkGone(Gone):
    """Expired, revoked or used up (410)."""


class LinkLocked(Locked):
    """Too many wrong PINs (423)."""


class PinRequired(DicomshareError):
    """The link has a PIN and the request carries neither a link session nor the PIN."""

    http_status = 401




@dataclass(frozen=True)
class Link:
    id: int
    organisation_pk: int
    organisation: str
    created_by_user_pk: int | None
    created_by: str | None
    secret_hash: str
    label: str | None
    studies: tuple[str, ...]
    patient: tuple[str, str] | None  # (PatientID, Issuer or "")
    permissions: tuple[str, ...]
    pin_hash: str | None
    pin_failures: int
    locked_at: datetime | None
    max_uses: int | None
    uses: int
    last_used_at: datetime | None
    notify: bool
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    # Served through the de-identification engine with this research project's key and
    # options (sharing/deid_view.py); never the originals.
    deidentified: bool = False
    project_id: int | None = None

    @property
    def has_pin(self) -> bool:
        return self.pin_hash is not None

    @property
    def state(self) -> str:
        """revoked | expired | locked | exhausted | active (the first that applies)."""
        gone = clock.ended(self.revoked_at, self.expires_at)
        if gone:
            return gone
        if self.locked_at is not None:
            return "locked"
        if self.max_uses is not None and self.uses >= self.max_uses:
            return "exhausted"
        return "active"

    def as_json(self) -> dict[str, Any]:
        """The listing fields: never the secret, its digest or the PIN's hash."""
        return {
            "id": self.id, "label": self.label, "organisation": self.organisation,
            "created_by": self.created_by, "studies": list(self.studies),
            "patient": ({"id": self.patient[0], "issuer": self.patient[1] or None}
                        if self.patient else None),
            "permissions": list(self.permissions), "created_at": clock.iso(self.created_at),
            "expires_at": clock.iso(self.expires_at), "revoked_at": clock.iso(self.revoked_at),
            "state": self.state, "uses": self.uses, "max_uses": self.max_uses,
            "last_used_at": clock.iso(self.last_used_at), "has_pin": self.has_pin,
            "notify": self.notify, "deidentified": self.deidentified,
            "project_id": self.project_id,
        }


_CREATOR = s.user.alias("link_creator")
_SELECT = (
    select(_L.c.pk, _L.c.organisation_pk, s.organisation.c.name, _L.c.created_by_user_pk,
           _CREATOR.c.name, _L.c.secret_hash, _L.c.label, _L.c.patient_id,
           _L.c.issuer_of_patient_id, _L.c.permissions, _L.c.pin_hash, _L.c.pin_failures,
           _L.c.locked_at, _L.c.max_uses, _L.c.uses, _L.c.last_used_at, _L.c.notify,
           _L.c.created_at, _L.c.expires_at, _L.c.revoked_at, _L.c.deidentified,
           _L.c.project_pk)
    .select_from(_L.join(s.organisation, _L.c.organisation_pk == s.organisation.c.pk)
                 .outerjoin(_CREATOR, _L.c.created_by_user_pk == _CREATOR.c.pk))
)


def _studies_of(conn: Connection, pks: list[int]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {pk: [] for pk in pks}
    for start in range(0, len(pks), 500):
        for pk, uid in conn.execute(select(_LS.c.link_pk, _LS.c.study_instance_uid).where(
                _LS.c.link_pk.in_(pks[start:start + 500])).order_by(_LS.c.study_instance_uid)):
            out[pk].append(uid)
    return out


def _link(row: Any, studies: list[str]) -> Link:
    perms = row[9].split(",")
    return Link(
        id=row[0], organisation_pk=row[1], organisation=row[2], created_by_user_pk=row[3],
        created_by=row[4], secret_hash=row[5], label=row[6], studies=tuple(studies),
        patient=(row[7], row[8] or "") if row[7] is not None else None,
        permissions=tuple(p for p in LINK_PERMISSIONS if p in perms), pin_hash=row[10],
        pin_failures=int(row[11] or 0), locked_at=clock.aware(row[12]), max_uses=row[13],
        uses=int(row[14] or 0), last_used_at=clock.aware(row[15]), notify=bool(row[16]),
        created_at=clock.aware(row[17]), expires_at=clock.aware(row[18]),
        revoked_at=clock.aware(row[19]), deidentified=bool(row[20]), project_id=row[21])


def parse_link_permissions(items: Iterable[str]) -> tuple[str, ...]:
    perms = {p.strip().lower() for p in items if p.strip()}
    unknown = perms - set(LINK_PERMISSIONS)
    if unknown or not perms:
        raise InvalidInput(f"link permissions are {', '.join(LINK_PERMISSIONS)}; got "
                           f"{','.join(sorted(perms)) or 'none'}")
    perms.add("view")  # download and upload imply view
    return tuple(p for p in LINK_PERMISSIONS if p in perms)


def _grant_permissions(link_perms: Iterable[str]) -> frozenset[str]:
    """A link's permissions as grant permissions (access/policy.py GRANT_ACTIONS)."""
    out = {"view"}
    if "download" in link_perms:
        out.add("download")
    if "upload" in link_perms:
        out.add("add-series")
    return frozenset(out)


class LinkStore:
    """Create, list, revoke and use share links."""

    def __init__(self, engine: Engine, settings: Settings, access: Access | None = None,
                 key: bytes | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self.access = access
        self._key = key or load_or_create_key(Path(settings.data_dir) / "secrets"
                                               / "share-links.key")
        self._throttle = AddressThrottle(engine, "share-link", ADDRESS_MAX_FAILURES,
                                         ADDRESS_WINDOW_SECONDS)
        self._counted: dict[tuple[int, str], float] = {}
        self._counted_lock = threading.Lock()
        self._pin_ok: dict[tuple[int, str], float] = {}  # (link, HMAC of PIN) -> verified at

    # -- audit -------------------------------------------------------------------------------
    def record(self, action: str, who: Principal | None, outcome: str = "success",
               link: Link | None = None, wait: bool = False, **details: Any) -> None:
        if self.access is None:
            return
        studies = list(link.studies) if link else []
        patients = [link.patient[0]] if link and link.patient else []
        if link is not None and link.deidentified:
            details = {"deidentified": True, "project": link.project_id, **details}
        self.access.record(action, who, outcome, wait=wait, patient_ids=patients,
                           study_uids=studies,
                           data_organisations=[link.organisation_pk] if link else (),
                           details={"link": link.id if link else None, **details})

    # -- managing links ----------------------------------------------------------------------
    def create(self, who: Principal, *, studies: list[str] | None = None,
               patient: tuple[str, str] | None = None,
               permissions: Iterable[str] = ("view",), expires_at: datetime | None = None,
               pin: str | None = None, max_uses: int | None = None, notify: bool = False,
               label: str | None = None, deidentified: bool = False,
               project_id: int | None = None) -> tuple[Link, str]:
        """A new link and its secret (the only time it is in clear). Studies the caller
        may not share answer like unknown ones (NotFound). ``deidentified``: served with
        the pseudonyms of ``project_id``, a research project of the caller's organisation
        (any member who may share may use its key this way: docs/share-links.md)."""
        check(who, Action.SHARE)
        perms = parse_link_permissions(permissions)
        if deidentified and project_id is None:
            raise InvalidInput("a de-identified link needs project_id: the research project "
                               "whose pseudonyms and options it uses")
        if project_id is not None and not deidentified:
            raise InvalidInput("project_id is for de-identified links (deidentified: true)")
        if deidentified and "upload" in perms:
            raise InvalidInput("a de-identified link cannot allow uploads: what it shows is "
                               "not what is stored")
        if (not studies) == (patient is None):
            raise InvalidInput("share either studies (a list of StudyInstanceUIDs) or a "
                               "patient ({id, issuer})")
        uids = list(dict.fromkeys(u.strip() for u in studies or []))
        if len(uids) > MAX_STUDIES:
            raise InvalidInput(f"at most {MAX_STUDIES} studies per link")
        for uid in uids:
            if not 0 < len(uid) <= 64:
                raise InvalidInput("a StudyInstanceUID has 1 to 64 characters")
        if patient is not None and not 0 < len(patient[0]) <= 64:
            raise InvalidInput("patient id must have 1 to 64 characters")
        now = clock.now()
        if expires_at is None:
            expires_at = now + timedelta(days=DEFAULT_DAYS)
        expires_at = clock.aware(expires_at)
        if expires_at <= now:
            raise InvalidInput("expires_at is in the past")
        if expires_at > now + timedelta(days=MAX_DAYS, minutes=5):
            raise InvalidInput(f"a link lasts at most {MAX_DAYS} days")
        if pin is not None and not 4 <= len(pin) <= 128:
            raise InvalidInput("a PIN or password has 4 to 128 characters")
        if max_uses is not None and not 0 < max_uses <= 1_000_000:
            raise InvalidInput("max_uses must be a positive number (at most 1000000)")
        if who.organisation_pk is None:
            raise Forbidden("only members of an organisation may create share links")
        secret = new_secret()
        pin_hash = _hasher.hash(pin) if pin is not None else None
        grant_perms = _grant_permissions(perms)
        with self.engine.begin() as conn:
            if project_id is not None:
                owner = conn.execute(select(s.research_project.c.organisation_pk).where(
                    s.research_project.c.pk == project_id)).scalar()
                if owner is None or owner != who.organisation_pk:
                    raise NotFound(f"no project {project_id}")
            mine = live_grants(conn, who)
            if patient is not None:
                self._may_share(conn, who, mine, None, patient, grant_perms)
            for uid in uids:
                self._may_share(conn, who, mine, uid, None, grant_perms)
            result = conn.execute(insert(_L).values(
                organisation_pk=who.organisation_pk, created_by_user_pk=who.user_pk,
                secret_hash=secret_digest(secret), label=(label or None),
                patient_id=patient[0] if patient else None,
                issuer_of_patient_id=(patient[1] or None) if patient else None,
                permissions=",".join(perms), pin_hash=pin_hash, max_uses=max_uses,
                notify=notify, created_at=now, expires_at=expires_at,
                deidentified=deidentified, project_pk=project_id))
            pk = int(result.inserted_primary_key[0])  # type: ignore[index]
            if uids:
                conn.execute(insert(_LS), [{"link_pk": pk, "study_instance_uid": u}
                                           for u in uids])
        return self.get_by_id(pk), secret

    def _may_share(self, conn: Connection, who: Principal, mine: list[LiveGrant],
                   study_uid: str | None, patient: tuple[str, str] | None,
                   perms: frozenset[str]) -> None:
        """NotFound unless the caller's organisation owns the data or a re-share grant
        covers it; Forbidden when a grant covers it without re-share or with fewer
        permissions (as access/grants.py decides for grants)."""
        what = f"study {study_uid}" if study_uid else f"patient {patient[0]}"  # type: ignore[index]
        if owns(conn, who.organisation_pk, study_uid, patient):
            return
        study_patient = _patient_of(conn, study_uid) if study_uid else None
        covering = [g for g in mine if (study_uid and g.study_uid == study_uid)
                    or (g.patient is not None and g.patient in (patient, study_patient))]
        resharing_grant(covering, perms, what,
                        f"a link cannot add permissions to your grant on {what}")

    def get_by_id(self, link_id: int) -> Link:
        with self.engine.connect() as conn:
            row = conn.execute(_SELECT.where(_L.c.pk == link_id)).first()
            if row is None:
                raise NotFound(f"no share link {link_id}")
            return _link(row, _studies_of(conn, [link_id])[link_id])

    def _mine(self, who: Principal) -> Any:
        if who.superuser:
            return None
        if who.is_admin:
            return _L.c.organisation_pk == who.organisation_pk
        return and_(_L.c.organisation_pk == who.organisation_pk,
                    _L.c.created_by_user_pk == who.user_pk)

    def get(self, who: Principal, link_id: int) -> Link:
        """A link the caller may manage: admins their organisation's, clinicians their own;
        any other answers like a missing one."""
        check(who, Action.SHARE)
        link = None
        try:
            link = self.get_by_id(link_id)
        except NotFound:
            pass
        if link is None or not (who.superuser or (
                link.organisation_pk == who.organisation_pk
                and (who.is_admin or link.created_by_user_pk == who.user_pk))):
            raise NotFound(f"no share link {link_id}")
        return link

    def list_links(self, who: Principal, limit: int = 1000) -> list[Link]:
        check(who, Action.SHARE)
        stmt = _SELECT.order_by(_L.c.pk.desc()).limit(limit)
        where = self._mine(who)
        if where is not None:
            stmt = stmt.where(where)
        with self.engine.connect() as conn:
            rows = conn.execute(stmt).all()
            studies = _studies_of(conn, [r[0] for r in rows])
        return [_link(r, studies[r[0]]) for r in rows]

    def revoke(self, who: Principal, link_id: int) -> Link:
        link = self.get(who, link_id)
        with self.engine.begin() as conn:
            conn.execute(update(_L).where(_L.c.pk == link.id, _L.c.revoked_at.is_(None))
                         .values(revoked_at=clock.now()))
        return self.get_by_id(link.id)

    # -- using links -------------------------------------------------------------------------
    def find(self, secret: str) -> Link | None:
        """The link with this secret (any state), or None."""
        if not 20 <= len(secret) <= 128:
            return None
        with self.engine.connect() as conn:
            row = conn.execute(_SELECT.where(_L.c.secret_hash == secret_digest(secret))).first()
            if row is None:
                return None
            return _link(row, _studies_of(conn, [row[0]])[row[0]])

    def principal(self, link: Link, source: str | None, store: bool = False) -> Principal:
        """The caller a link stands for, with its openings read now. ``store``: for an
        upload (STOW-RS), the principal stores as the creator's organisation, so what is
        added is owned by it."""
        perms = _grant_permissions(link.permissions)
        grants = self._openings(link, perms)
        scopes = {"read"} | ({"write"} if "upload" in link.permissions else set())
        return Principal(user=f"link:{link.id}", organisation=link.organisation,
                         role="clinician",
                         organisation_pk=link.organisation_pk if store else None,
                         kind="link", scopes=frozenset(scopes), source=source,
                         grants=tuple(grants))

    def _openings(self, link: Link, perms: frozenset[str]) -> list[LiveGrant]:
        with self.engine.connect() as conn:
            creator = None
            if link.created_by_user_pk is not None:
                creator = conn.execute(select(s.user.c.pk, s.user.c.organisation_pk,
                                              s.user.c.disabled_at, s.user.c.role,
                                              s.user.c.superuser)
                                       .where(s.user.c.pk == link.created_by_user_pk)).first()
            if creator is not None and (creator[2] is not None
                                        or creator[1] != link.organisation_pk):
                return []  # a disabled or moved creator shares nothing any more
            owner = Principal(user="", organisation=link.organisation, role="clinician",
                              user_pk=creator[0] if creator else None,
                              organisation_pk=link.organisation_pk)
            theirs = [g for g in live_grants(conn, owner) if "re-share" in g.permissions]
            out: list[LiveGrant] = []
            expires = link.expires_at
            if link.patient is not None:
                out.append(LiveGrant(-link.id, link.organisation_pk, perms, None,
                                     link.patient, expires))
                for g in theirs:
                    if g.patient == link.patient:
                        out.append(LiveGrant(-link.id, g.source, perms & g.permissions, None,
                                             link.patient, expires))
                    elif g.study_uid and _patient_of(conn, g.study_uid) == link.patient:
                        out.append(LiveGrant(-link.id, g.source, perms & g.permissions,
                                             g.study_uid, None, expires))
                return out
            for uid in link.studies:
                out.append(LiveGrant(-link.id, link.organisation_pk, perms, uid, None,
                                     expires))
                patient = None
                for g in theirs:
                    if g.patient is not None and patient is None:
                        patient = _patient_of(conn, uid) or ("", "")
                    if g.study_uid == uid or (g.patient is not None and g.patient == patient):
                        out.append(LiveGrant(-link.id, g.source, perms & g.permissions, uid,
                                             None, expires))
            return out

    # -- PINs, uses, rate limits ---------------------------------------------------------------
    def throttled(self, source: str | None) -> None:
        """TooManyRequests when this address failed too often lately (every server
        process counts alike)."""
        self._throttle.check(source, "too many failed attempts from this address")

    def failed(self, source: str | None) -> None:
        self._throttle.failed(source)

    def check_pin(self, link: Link, pin: str) -> int | None:
        """None when the PIN is right; otherwise the attempts left (0: now locked).
        LinkLocked when the link was locked already. An attempt is counted before the
        (slow) check, so parallel guesses cannot pass the limit."""
        limit = max(1, self.settings.share_pin_max_failures)
        if link.pin_hash is None:
            _verify(_DUMMY_HASH, pin)
            return None
        with self.engine.begin() as conn:
            counted = conn.execute(update(_L).where(
                _L.c.pk == link.id, _L.c.locked_at.is_(None), _L.c.pin_failures < limit)
                .values(pin_failures=_L.c.pin_failures + 1)).rowcount
        if not counted:
            raise LinkLocked("this link is locked after too many wrong PINs; ask the person "
                             "who sent it for a new one")
        if _verify(link.pin_hash, pin):
            with self.engine.begin() as conn:
                conn.execute(update(_L).where(_L.c.pk == link.id, _L.c.pin_failures > 0)
                             .values(pin_failures=_L.c.pin_failures - 1))
            return None
        with self.engine.begin() as conn:
            failures = conn.execute(select(_L.c.pin_failures).where(_L.c.pk == link.id)
                                    ).scalar_one()
            if failures >= limit:
                conn.execute(update(_L).where(_L.c.pk == link.id, _L.c.locked_at.is_(None))
                             .values(locked_at=clock.now()))
        return max(0, limit - int(failures))

    def check_pin_cached(self, link: Link, pin: str) -> int | None:
        """check_pin for clients that send the PIN with every request (HTTP Basic): a PIN
        verified in the last ten minutes is not hashed again."""
        key = (link.id, hmac.new(self._key, pin.encode(), "sha256").hexdigest())
        now = time.monotonic()
        with self._counted_lock:
            seen = self._pin_ok.get(key)
        if seen is not None and now - seen < 600:
            return None
        left = self.check_pin(link, pin)
        if left is None:
            with self._counted_lock:
                if len(self._pin_ok) > 10000:
                    self._pin_ok.clear()
                self._pin_ok[key] = now
        return left

    def count_use(self, link: Link, source: str | None, what: str) -> bool:
        """Count one use; False when the link is used up (or no longer usable)."""
        now = clock.now()
        with self.engine.begin() as conn:
            done = conn.execute(update(_L).where(
                _L.c.pk == link.id, _L.c.revoked_at.is_(None), _L.c.locked_at.is_(None),
                or_(_L.c.max_uses.is_(None), _L.c.uses < _L.c.max_uses))
                .values(uses=_L.c.uses + 1, last_used_at=now)).rowcount
            if done and link.notify and link.created_by_user_pk is not None:
                label = link.label or f"share link {link.id}"
                notify(conn, link.organisation_pk, link.created_by_user_pk, "share-used",
                       f"Your share link \"{label}\" was used",
                       {"link": link.id, "label": link.label, "what": what,
                        "source": source, "at": clock.iso(now)})
            if done:
                emit(conn, "share-used", [link.organisation_pk],
                     {"link_id": link.id, "what": what, "at": clock.iso(now)})
        return bool(done)

    def count_use_coalesced(self, link: Link, source: str | None, what: str) -> bool | None:
        """A session-less request: one use per client address per 30 minutes. True: a
        new use was counted; None: this address was counted lately; False: used up."""
        key = (link.id, source or "-")
        now = time.monotonic()
        with self._counted_lock:
            last = self._counted.get(key)
            if last is not None and now - last < USE_WINDOW_SECONDS:
                return None
        if not self.count_use(link, source, what):
            return False
        with self._counted_lock:
            if len(self._counted) > 10000:
                self._counted = {k: t for k, t in self._counted.items()
                                 if now - t < USE_WINDOW_SECONDS}
            self._counted[key] = now
        return True

    # -- link sessions (signed cookies) ----------------------------------------------------------
    def new_session(self, link: Link) -> tuple[str, int]:
        """A cookie value for a new link session, and its lifetime in seconds."""
        until = int(time.time()) + SESSION_HOURS * 3600
        if link.expires_at is not None:
            until = min(until, int(link.expires_at.timestamp()))
        nonce = secrets.token_urlsafe(9)
        return f"{link.id}.{until}.{nonce}.{self._sign(link, until, nonce)}", \
            max(1, until - int(time.time()))

    def session_valid(self, link: Link, value: str | None) -> bool:
        if not value or len(value) > 300:
            return False
        parts = value.split(".")
        if len(parts) != 4 or not parts[0].isdigit() or not parts[1].isdigit():
            return False
        link_id, until, nonce, sig = int(parts[0]), int(parts[1]), parts[2], parts[3]
        if link_id != link.id or until <= time.time():
            return False
        return hmac.compare_digest(sig, self._sign(link, until, nonce))

    def _sign(self, link: Link, until: int, nonce: str) -> str:
        message = f"share-link-session|{link.id}|{link.secret_hash}|{until}|{nonce}"
        return hmac.new(self._key, message.encode(), "sha256").hexdigest()


def _verify(pin_hash: str, pin: str) -> bool:
    try:
        return bool(_hasher.verify(pin_hash, pin))
    except (VerificationError, InvalidHashError):
        return False


def _patient_of(conn: Connection, study_uid: str) -> tuple[str, str] | None:
    row = conn.execute(select(s.study.c.patient_id, s.study.c.issuer_of_patient_id)
                       .where(s.study.c.study_instance_uid == study_uid)).first()
    return (row[0] or "", row[1] or "") if row is not None else None
