"""Grants: one organisation opens a study, or all studies of a patient, to another
organisation or to one user, with permissions and an optional expiry.

A grant opens the instances its *source* organisation owns, never more: an
organisation can only share what it stored. A re-share (a grantee with ``re-share``
passing access on) keeps the original source, never widens the permissions or the
expiry of the grant it came from, and dies with it: revoking a grant revokes every
re-share made from it. Revocation takes effect on the next request (grants are read
on every request, never cached).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, insert, or_, select, update
from sqlalchemy.engine import Connection, Engine

from dicomshare import clock
from dicomshare.access.policy import (
    GRANT_PERMISSIONS,
    Action,
    LiveGrant,
    Principal,
    Visibility,
    check,
    parse_permissions,
    visibility,
)
from dicomshare.errors import Forbidden, InvalidInput, NotFound
from dicomshare.storage import schema as s

g = s.access_grant


@dataclass(frozen=True)
class Grant:
    id: int
    source_organisation: str
    grantee_organisation: str | None
    grantee_user: str | None
    study_uid: str | None
    patient_id: str | None
    issuer_of_patient_id: str | None
    permissions: tuple[str, ...]
    parent_id: int | None
    created_by: str | None
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None

    @property
    def state(self) -> str:
        return clock.ended(self.revoked_at, self.expires_at) or "active"

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "state": self.state,
            "source_organisation": self.source_organisation,
            "grantee_organisation": self.grantee_organisation,
            "grantee_user": self.grantee_user, "study_uid": self.study_uid,
            "patient_id": self.patient_id, "issuer_of_patient_id": self.issuer_of_patient_id,
            "permissions": list(self.permissions), "parent_id": self.parent_id,
            "created_by": self.created_by, "created_at": clock.iso(self.created_at),
            "expires_at": clock.iso(self.expires_at), "revoked_at": clock.iso(self.revoked_at),
        }





def _live(now: datetime) -> Any:
    return and_(g.c.revoked_at.is_(None), or_(g.c.expires_at.is_(None), g.c.expires_at > now))


def _to_me(who: Principal) -> Any:
    parts = []
    if who.organisation_pk is not None:
        parts.append(g.c.grantee_organisation_pk == who.organisation_pk)
    if who.user_pk is not None:
        parts.append(g.c.grantee_user_pk == who.user_pk)
    return or_(*parts) if parts else g.c.pk.is_(None)


_SOURCE = s.organisation.alias("source_org")
_GRANTEE_ORG = s.organisation.alias("grantee_org")
_GRANTEE_USER = s.user.alias("grantee_user")
_CREATOR = s.user.alias("creator")
_LISTED = (
    select(g.c.pk, _SOURCE.c.name, _GRANTEE_ORG.c.name, _GRANTEE_USER.c.name,
           g.c.study_instance_uid, g.c.patient_id, g.c.issuer_of_patient_id, g.c.permissions,
           g.c.parent_pk, _CREATOR.c.name, g.c.created_at, g.c.expires_at, g.c.revoked_at)
    .select_from(g.join(_SOURCE, g.c.source_organisation_pk == _SOURCE.c.pk)
                 .outerjoin(_GRANTEE_ORG, g.c.grantee_organisation_pk == _GRANTEE_ORG.c.pk)
                 .outerjoin(_GRANTEE_USER, g.c.grantee_user_pk == _GRANTEE_USER.c.pk)
                 .outerjoin(_CREATOR, g.c.created_by_user_pk == _CREATOR.c.pk))
    .order_by(g.c.pk)
)


def live_grants(conn: Connection, who: Principal) -> list[LiveGrant]:
    """Grants to the caller or its organisation, neither revoked nor expired."""
    rows = conn.execute(
        select(g.c.pk, g.c.source_organisation_pk, g.c.permissions, g.c.study_instance_uid,
               g.c.patient_id, g.c.issuer_of_patient_id, g.c.expires_at)
        .where(_to_me(who), _live(clock.now()))).all()
    return [LiveGrant(r[0], r[1], frozenset(r[2].split(",")), r[3],
                      (r[4], r[5] or "") if r[3] is None and r[4] is not None else None,
                      clock.aware(r[6])) for r in rows]


def owns(conn: Connection, org: int | None, study_uid: str | None,
         patient: tuple[str, str] | None) -> bool:
    """Whether organisation ``org`` owns the study (by UID) or some study of the patient
    ((id, issuer)): owners may share without a grant (grants and share links alike)."""
    if org is None:
        return False
    stmt = select(s.study_owner.c.study_pk).join(
        s.study, s.study.c.pk == s.study_owner.c.study_pk).where(
        s.study_owner.c.organisation_pk == org)
    if study_uid:
        stmt = stmt.where(s.study.c.study_instance_uid == study_uid)
    else:
        assert patient is not None
        stmt = stmt.where(s.study.c.patient_id == patient[0],
                          func.coalesce(s.study.c.issuer_of_patient_id, "") == patient[1])
    return conn.execute(stmt.limit(1)).first() is not None


def resharing_grant(covering: list[LiveGrant], perms: frozenset[str], what: str,
                    too_much: str = "a re-share cannot add permissions") -> LiveGrant:
    """The grant among ``covering`` (those covering ``what``, which the caller does not own)
    that lets the caller share it on with ``perms``. Forbidden when they cover it without
    re-share or with fewer permissions; NotFound, like unknown data, when none does."""
    for grant in covering:
        if "re-share" in grant.permissions:
            if not perms <= grant.permissions:
                raise Forbidden(f"{too_much}: you hold {','.join(sorted(grant.permissions))}")
            return grant
    if covering:
        raise Forbidden(f"you may not share {what}: your grant has no re-share")
    raise NotFound(f"{what} not found")


def _grant(row: Any) -> Grant:
    return Grant(row[0], row[1], row[2], row[3], row[4], row[5], row[6],
                 tuple(p for p in GRANT_PERMISSIONS if p in row[7].split(",")), row[8], row[9],
                 clock.aware(row[10]), clock.aware(row[11]), clock.aware(row[12]))


class Grants:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # -- what the policy needs on every request --------------------------------------------
    def live_for(self, who: Principal) -> list[LiveGrant]:
        """The caller's live grants: read with its credentials in this request (see
        Identities.authenticate), or now."""
        if who.superuser:
            return []
        if who.grants is not None:
            return list(who.grants)
        with self.engine.connect() as conn:
            return live_grants(conn, who)

    def visibility(self, who: Principal, action: Action) -> Visibility:
        """Check the caller's role and scopes for ``action``, then say what data it opens."""
        check(who, action)
        return visibility(who, action, self.live_for(who))

    # -- managing grants -----------------------------------------------------------------
    def create(self, who: Principal, *, study_uid: str | None = None,
               patient: tuple[str, str] | None = None, organisation: str | None = None,
               user: str | None = None, permissions: Iterable[str] | str = ("view",),
               expires_at: datetime | None = None) -> Grant:
        """Open a study (or a patient's studies) the caller's organisation owns, or re-share
        one opened to the caller with ``re-share``. Unknown and invisible studies are
        answered alike (NotFound)."""
        check(who, Action.SHARE)
        perms = parse_permissions(permissions)
        if (study_uid is None) == (patient is None):
            raise InvalidInput("grant either a study (study_uid) or a patient (patient_id)")
        if (organisation is None) == (user is None):
            raise InvalidInput("grant to either an organisation or a user")
        if study_uid is not None and not 0 < len(study_uid) <= 64:
            raise InvalidInput("study_uid must have 1 to 64 characters")
        if patient is not None and not 0 < len(patient[0]) <= 64:
            raise InvalidInput("patient_id must have 1 to 64 characters")
        now = clock.now()
        if expires_at is not None:
            expires_at = clock.aware(expires_at)
            if expires_at <= now:
                raise InvalidInput("expires_at is in the past")
        with self.engine.begin() as conn:
            grantee_org, grantee_user = self._grantee(conn, organisation, user)
            if grantee_org is not None and grantee_org == who.organisation_pk:
                raise InvalidInput("your own organisation sees its studies already")
            source, parent = self._source(conn, who, study_uid, patient, perms)
            if parent is not None:
                if parent.expires_at is not None and (expires_at is None
                                                      or expires_at > parent.expires_at):
                    expires_at = parent.expires_at  # a re-share never outlives its origin
            result = conn.execute(insert(g).values(
                source_organisation_pk=source, grantee_organisation_pk=grantee_org,
                grantee_user_pk=grantee_user, study_instance_uid=study_uid,
                patient_id=patient[0] if patient else None,
                issuer_of_patient_id=(patient[1] or None) if patient else None,
                permissions=",".join(p for p in GRANT_PERMISSIONS if p in perms),
                parent_pk=parent.pk if parent else None, created_by_user_pk=who.user_pk,
                created_at=now, expires_at=expires_at))
            pk = int(result.inserted_primary_key[0])  # type: ignore[index]
        return self.get(pk)

    def _grantee(self, conn: Connection, organisation: str | None,
                 user: str | None) -> tuple[int | None, int | None]:
        if organisation is not None:
            pk = conn.execute(select(s.organisation.c.pk)
                              .where(s.organisation.c.name == organisation)).scalar()
            if pk is None:
                raise NotFound(f"no organisation {organisation!r}")
            return int(pk), None
        pk = conn.execute(select(s.user.c.pk).where(s.user.c.name == user)).scalar()
        if pk is None:
            raise NotFound(f"no user {user!r}")
        return None, int(pk)

    def check_shareable(self, conn: Connection, who: Principal, study_uid: str | None,
                        patient: tuple[str, str] | None, permissions: frozenset[str]) -> None:
        """Raise what :meth:`create` would if ``who`` shared this now (NotFound for a study
        it cannot see, like an unknown one; Forbidden for one held without re-share): for
        features that grant later (the inbox, on acceptance) or several studies at once."""
        self._source(conn, who, study_uid, patient, permissions)

    def _source(self, conn: Connection, who: Principal, study_uid: str | None,
                patient: tuple[str, str] | None,
                perms: frozenset[str]) -> tuple[int, LiveGrant | None]:
        what = f"study {study_uid}" if study_uid else f"patient {patient[0]}"  # type: ignore[index]
        if who.organisation_pk is not None and owns(conn, who.organisation_pk, study_uid,
                                                    patient):
            return who.organisation_pk, None
        covering = [lg for lg in self.live_for(who)
                    if (lg.study_uid == study_uid if study_uid else lg.patient == patient)]
        grant = resharing_grant(covering, perms, what)
        return grant.source, grant

    def get(self, grant_id: int) -> Grant:
        with self.engine.connect() as conn:
            row = conn.execute(_LISTED.where(g.c.pk == grant_id)).first()
        if row is None:
            raise NotFound(f"no grant {grant_id}")
        return _grant(row)

    def list_grants(self, who: Principal, study_uid: str | None = None,
             active_only: bool = False) -> list[Grant]:
        """Grants the caller may see: those opening its organisation's data, those its
        organisation made, and those made to it or its organisation (superusers: all)."""
        stmt = _LISTED
        if not who.superuser:
            mine = [_to_me(who)]
            if who.organisation_pk is not None:
                mine.append(g.c.source_organisation_pk == who.organisation_pk)
                mine.append(_CREATOR.c.organisation_pk == who.organisation_pk)
            stmt = stmt.where(or_(*mine))
        if study_uid:
            stmt = stmt.where(g.c.study_instance_uid == study_uid)
        if active_only:
            stmt = stmt.where(_live(clock.now()))
        with self.engine.connect() as conn:
            return [_grant(r) for r in conn.execute(stmt.limit(10000))]

    def revoke(self, who: Principal, grant_id: int) -> Grant:
        """Revoke a grant and every re-share made from it. Allowed to the source
        organisation's sharers, the grant's creator, and superusers."""
        check(who, Action.SHARE)
        with self.engine.begin() as conn:
            row = conn.execute(select(g.c.source_organisation_pk, g.c.created_by_user_pk,
                                      g.c.grantee_organisation_pk, g.c.grantee_user_pk)
                               .where(g.c.pk == grant_id)).first()
            visible = row is not None and (
                who.superuser or row[0] == who.organisation_pk or row[1] == who.user_pk
                or row[2] == who.organisation_pk or row[3] == who.user_pk)
            if not visible:
                raise NotFound(f"no grant {grant_id}")
            assert row is not None
            if not (who.superuser or row[0] == who.organisation_pk or row[1] == who.user_pk):
                raise Forbidden("only the organisation that shared, or the grant's creator, "
                                "may revoke it")
            _revoke_with_reshares(conn, [grant_id], clock.now())
        return self.get(grant_id)

    def end(self, grant_ids: list[int]) -> list[int]:
        """Revoke grants a feature made for its own purpose (a consult's, when it is
        declined or closed) and their re-shares, without a caller check: the feature
        decided who may end it. The ids that were still live."""
        if not grant_ids:
            return []
        with self.engine.begin() as conn:
            live = list(conn.execute(select(g.c.pk).where(g.c.pk.in_(grant_ids),
                                                          g.c.revoked_at.is_(None))).scalars())
            _revoke_with_reshares(conn, live, clock.now())
        return live

    def reply_to_additions(self, who: Principal, study_uid: str,
                           patient: tuple[str, str], store_access: Visibility) -> list[int]:
        """After ``who`` added series to a study under an add-series grant, open what it
        added to the grant's source (the second opinion goes back to the requester)."""
        if who.organisation_pk is None:
            return []
        made = []
        sources = {o.source for o in store_access.openings
                   if study_uid in o.studies or patient in o.patients}
        now = clock.now()
        with self.engine.begin() as conn:
            for source in sorted(sources - {who.organisation_pk}):
                pk = _open_back(conn, who, source, study_uid, now)
                if pk is not None:
                    made.append(pk)
        return made

    def open_back(self, who: Principal, organisation_pk: int, study_uid: str) -> int | None:
        """Open what ``who``'s organisation stored in ``study_uid`` (view, download) to
        another organisation, as :meth:`reply_to_additions` does for a grant's source: for
        a consult's requester that holds the study through a re-share. The new grant's id,
        or None when a live one exists already."""
        if who.organisation_pk is None:
            return None
        with self.engine.begin() as conn:
            return _open_back(conn, who, organisation_pk, study_uid, clock.now())


def _revoke_with_reshares(conn: Connection, grant_ids: list[int], now: datetime) -> None:
    """Revoke the grants and, level by level, every re-share made from them."""
    todo = grant_ids
    while todo:
        conn.execute(update(g).where(g.c.pk.in_(todo), g.c.revoked_at.is_(None))
                     .values(revoked_at=now))
        todo = list(conn.execute(select(g.c.pk).where(g.c.parent_pk.in_(todo),
                                                      g.c.revoked_at.is_(None))).scalars())


def _open_back(conn: Connection, who: Principal, organisation_pk: int, study_uid: str,
               now: datetime) -> int | None:
    exists = conn.execute(select(g.c.pk).where(
        g.c.source_organisation_pk == who.organisation_pk,
        g.c.grantee_organisation_pk == organisation_pk,
        g.c.study_instance_uid == study_uid, _live(now))).first()
    if exists is not None:
        return None
    result = conn.execute(insert(g).values(
        source_organisation_pk=who.organisation_pk, grantee_organisation_pk=organisation_pk,
        study_instance_uid=study_uid, permissions="view,download",
        created_by_user_pk=who.user_pk, created_at=now))
    return int(result.inserted_primary_key[0])  # type: ignore[index]
