"""The inbox: a study (or all studies of a patient) sent to another organisation or to
one of its users, who accepts or declines it. Accepting creates an ordinary grant
(access/grants.py), so what an accepted item opens is decided, listed and revoked like
any other grant.

The grant is made *by the sender*, at the moment of acceptance, through
:meth:`Grants.create`: the sender's organisation is the source, and the checks are the
ones a direct grant gets then (the sender still has a sharing role, its organisation
still owns the study or holds a re-share grant for it). A send is checked the same way
when it is made, so a send the sender could not turn into a grant is refused at once.

Until an item is accepted, its recipients see who sent it and the message, not which
study or patient it is about: the sender chose to share, the recipient has not yet chosen
to receive PHI.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, insert, or_, select, update
from sqlalchemy.engine import Engine

from dicomshare import clock
from dicomshare.access.grants import Grants
from dicomshare.access.identity import Identities
from dicomshare.access.policy import Action, Principal, check, parse_permissions
from dicomshare.access.service import Access
from dicomshare.errors import Conflict, DicomshareError, Forbidden, InvalidInput, NotFound
from dicomshare.sharing.notify import notify
from dicomshare.storage import schema as s

INBOX_PERMISSIONS = ("view", "download", "add-series")
STATES = ("pending", "accepted", "declined", "withdrawn")

i = s.inbox_item
_FROM_ORG = s.organisation.alias("from_org")
_TO_ORG = s.organisation.alias("to_org")
_FROM_USER = s.user.alias("from_user")
_TO_USER = s.user.alias("to_user")
_DECIDER = s.user.alias("decider")
_LISTED = (
    select(i, _FROM_ORG.c.name.label("from_org_name"), _TO_ORG.c.name.label("to_org_name"),
           _FROM_USER.c.name.label("from_user_name"), _TO_USER.c.name.label("to_user_name"),
           _DECIDER.c.name.label("decider_name"))
    .select_from(i.join(_FROM_ORG, i.c.from_organisation_pk == _FROM_ORG.c.pk)
                 .join(_TO_ORG, i.c.to_organisation_pk == _TO_ORG.c.pk)
                 .outerjoin(_FROM_USER, i.c.from_user_pk == _FROM_USER.c.pk)
                 .outerjoin(_TO_USER, i.c.to_user_pk == _TO_USER.c.pk)
                 .outerjoin(_DECIDER, i.c.decided_by_user_pk == _DECIDER.c.pk))
)


def _to_me(who: Principal) -> Any:
    if who.organisation_pk is None:
        return i.c.pk.is_(None)
    return and_(i.c.to_organisation_pk == who.organisation_pk,
                or_(i.c.to_user_pk.is_(None), i.c.to_user_pk == who.user_pk))


def _from_me(who: Principal) -> Any:
    if who.organisation_pk is None:
        return i.c.pk.is_(None)
    return i.c.from_organisation_pk == who.organisation_pk


@dataclass(frozen=True)
class Item:
    row: Any

    @property
    def id(self) -> int:
        return int(self.row.pk)

    @property
    def state(self) -> str:
        return str(self.row.state)

    def as_json(self, who: Principal) -> dict[str, Any]:
        r = self.row
        sender_side = r.from_organisation_pk == who.organisation_pk
        shows_data = sender_side or r.state == "accepted"
        return {
            "id": r.pk, "state": r.state,
            "from_organisation": r.from_org_name, "from_user": r.from_user_name,
            "to_organisation": r.to_org_name, "to_user": r.to_user_name,
            "study_uid": r.study_instance_uid if shows_data else None,
            "patient": ({"id": r.patient_id, "issuer": r.issuer_of_patient_id or ""}
                        if shows_data and r.patient_id is not None else None),
            "permissions": r.permissions.split(","), "message": r.message,
            "grant_id": r.grant_pk if shows_data else None,
            "created_at": clock.iso(clock.aware(r.created_at)),
            "decided_at": clock.iso(clock.aware(r.decided_at)),
            "decided_by": r.decider_name,
        }

    def audit_facts(self) -> dict[str, Any]:
        r = self.row
        return {"patient_ids": [r.patient_id] if r.patient_id else (),
                "study_uids": [r.study_instance_uid] if r.study_instance_uid else (),
                "data_organisations": [r.from_organisation_pk]}


class Inbox:
    def __init__(self, engine: Engine, grants: Grants, identities: Identities,
                 access: Access) -> None:
        self.engine = engine
        self.grants = grants
        self.identities = identities
        self.access = access

    # -- sending ---------------------------------------------------------------------------
    def send(self, who: Principal, *, study_uid: str | None,
             patient: tuple[str, str] | None, to_organisation: str, to_user: str | None,
             permissions: list[str] | None, message: str | None) -> Item:
        where = {"study": study_uid, "patient_id": patient[0] if patient else None,
                 "to_organisation": to_organisation, "to_user": to_user}
        try:
            check(who, Action.SHARE)
            perms = parse_permissions(permissions or ["view", "download"])
            if not perms <= set(INBOX_PERMISSIONS):
                raise InvalidInput(f"an inbox send grants {', '.join(INBOX_PERMISSIONS)}")
            if (study_uid is None) == (patient is None):
                raise InvalidInput("send either a study (study_uid) or a patient")
            if message is not None and len(message) > 4000:
                raise InvalidInput("message is longer than 4000 characters")
            with self.engine.begin() as conn:
                org_pk = conn.execute(select(s.organisation.c.pk).where(
                    s.organisation.c.name == to_organisation)).scalar()
                if org_pk is None:
                    raise NotFound(f"no organisation {to_organisation!r}")
                user_pk = None
                if to_user is not None:
                    user_pk = conn.execute(select(s.user.c.pk).where(
                        s.user.c.name == to_user, s.user.c.organisation_pk == org_pk)).scalar()
                    if user_pk is None:
                        raise NotFound(f"no user {to_user!r} in {to_organisation!r}")
                if org_pk == who.organisation_pk:
                    raise InvalidInput("your own organisation sees its studies already")
                # Exactly the check a grant gets: unknown and invisible studies alike are
                # NotFound; visible through a grant without re-share: Forbidden.
                self.grants._source(conn, who, study_uid, patient, perms)
                values = dict(
                    from_organisation_pk=who.organisation_pk, from_user_pk=who.user_pk,
                    to_organisation_pk=org_pk, to_user_pk=user_pk,
                    study_instance_uid=study_uid, patient_id=patient[0] if patient else None,
                    issuer_of_patient_id=(patient[1] or None) if patient else None,
                    permissions=",".join(p for p in INBOX_PERMISSIONS if p in perms),
                    message=message or None, state="pending", created_at=clock.now())
                pk = int(conn.execute(insert(i).values(**values))
                         .inserted_primary_key[0])  # type: ignore[index]
                notify(conn, org_pk, user_pk, "inbox-new",
                       f"New study sent to you by {who.organisation}",
                       {"inbox_id": pk, "from_organisation": who.organisation})
        except DicomshareError as exc:
            self._record("inbox.send", who, "denied", {"reason": exc.reason, **where}, None)
            raise
        item = self.get(pk)
        self._record("inbox.send", who, "success", {"inbox_id": pk, **where,
                                                    "permissions": sorted(perms)}, item)
        return item

    # -- reading ---------------------------------------------------------------------------
    def get(self, item_id: int) -> Item:
        with self.engine.connect() as conn:
            row = conn.execute(_LISTED.where(i.c.pk == item_id)).first()
        if row is None:
            raise NotFound(f"no inbox item {item_id}")
        return Item(row)

    def visible(self, who: Principal, item_id: int) -> Item:
        """An item the caller sent or received; others answer NotFound like missing ones."""
        with self.engine.connect() as conn:
            row = conn.execute(_LISTED.where(i.c.pk == item_id,
                                             or_(_to_me(who), _from_me(who)))).first()
        if row is None:
            raise NotFound(f"no inbox item {item_id}")
        return Item(row)

    def received(self, who: Principal, state: str | None = None) -> list[Item]:
        return self._list(_to_me(who), state)

    def sent(self, who: Principal, state: str | None = None) -> list[Item]:
        return self._list(_from_me(who), state)

    def _list(self, where: Any, state: str | None) -> list[Item]:
        stmt = _LISTED.where(where).order_by(i.c.pk.desc()).limit(1000)
        if state is not None:
            if state not in STATES:
                raise InvalidInput(f"state is one of {', '.join(STATES)}")
            stmt = stmt.where(i.c.state == state)
        with self.engine.connect() as conn:
            return [Item(r) for r in conn.execute(stmt)]

    # -- deciding --------------------------------------------------------------------------
    def accept(self, who: Principal, item_id: int) -> Item:
        try:
            item = self._pending_for_recipient(who, item_id)
            sender = self._sender(item)
            row = item.row
            try:
                grant = self.grants.create(
                    sender, study_uid=row.study_instance_uid,
                    patient=(row.patient_id, row.issuer_of_patient_id or "")
                    if row.patient_id is not None else None,
                    organisation=None if row.to_user_pk else row.to_org_name,
                    user=row.to_user_name if row.to_user_pk else None,
                    permissions=row.permissions)
            except (NotFound, Forbidden, InvalidInput):
                raise Conflict("the sender may no longer share this study; ask them to "
                               "send it again") from None
            if not self._decide(who, item, "accepted", grant.id):
                self.grants.revoke(sender, grant.id)
                raise Conflict(f"inbox item {item_id} was decided meanwhile")
        except DicomshareError as exc:
            self._record("inbox.accept", who, "denied",
                         {"inbox_id": item_id, "reason": exc.reason}, None)
            raise
        done = self.get(item_id)
        self._record("inbox.accept", who, "success",
                     {"inbox_id": item_id, "grant_id": grant.id}, done)
        self.access.record("grant.create", sender, wait=True, **done.audit_facts(),
                           details={**grant.as_json(), "inbox_id": item_id})
        return done

    def decline(self, who: Principal, item_id: int, reason: str | None = None) -> Item:
        try:
            item = self._pending_for_recipient(who, item_id)
            if not self._decide(who, item, "declined", None):
                raise Conflict(f"inbox item {item_id} was decided meanwhile")
        except DicomshareError as exc:
            self._record("inbox.decline", who, "denied",
                         {"inbox_id": item_id, "reason": exc.reason}, None)
            raise
        done = self.get(item_id)
        self._record("inbox.decline", who, "success",
                     {"inbox_id": item_id, "decline_reason": (reason or "")[:500]}, done)
        return done

    def withdraw(self, who: Principal, item_id: int) -> Item:
        try:
            check(who, Action.SHARE)
            with self.engine.connect() as conn:
                row = conn.execute(_LISTED.where(i.c.pk == item_id, _from_me(who))).first()
            if row is None:
                raise NotFound(f"no inbox item {item_id}")
            item = Item(row)
            if item.state != "pending":
                raise Conflict(f"inbox item {item_id} is {item.state}; only pending items "
                               "can be withdrawn (revoke the grant instead)")
            with self.engine.begin() as conn:
                done = conn.execute(update(i).where(i.c.pk == item_id, i.c.state == "pending")
                                    .values(state="withdrawn", decided_at=clock.now(),
                                            decided_by_user_pk=who.user_pk))
                if done.rowcount != 1:
                    raise Conflict(f"inbox item {item_id} was decided meanwhile")
                notify(conn, row.to_organisation_pk, row.to_user_pk, "inbox-decided",
                       f"{who.organisation} withdrew a study it sent you",
                       {"inbox_id": item_id, "state": "withdrawn",
                        "by_organisation": who.organisation})
        except DicomshareError as exc:
            self._record("inbox.withdraw", who, "denied",
                         {"inbox_id": item_id, "reason": exc.reason}, None)
            raise
        result = self.get(item_id)
        self._record("inbox.withdraw", who, "success", {"inbox_id": item_id}, result)
        return result

    def _pending_for_recipient(self, who: Principal, item_id: int) -> Item:
        check(who, Action.VIEW)
        with self.engine.connect() as conn:
            row = conn.execute(_LISTED.where(i.c.pk == item_id, _to_me(who))).first()
        if row is None:
            raise NotFound(f"no inbox item {item_id}")
        if row.state != "pending":
            raise Conflict(f"inbox item {item_id} is {row.state} already")
        return Item(row)

    def _sender(self, item: Item) -> Principal:
        row = item.row
        with self.engine.connect() as conn:
            user = conn.execute(select(s.user.c.name, s.user.c.disabled_at)
                                .where(s.user.c.pk == row.from_user_pk)).first()
        if user is None or user.disabled_at is not None:
            raise Conflict("the sender's account is disabled; ask them to send it again")
        return self.identities.principal_for_user(user.name, kind="inbox")

    def _decide(self, who: Principal, item: Item, state: str, grant_pk: int | None) -> bool:
        row = item.row
        with self.engine.begin() as conn:
            done = conn.execute(update(i).where(i.c.pk == item.id, i.c.state == "pending")
                                .values(state=state, grant_pk=grant_pk,
                                        decided_at=clock.now(), decided_by_user_pk=who.user_pk))
            if done.rowcount != 1:
                return False
            notify(conn, row.from_organisation_pk, row.from_user_pk, "inbox-decided",
                   f"{who.organisation} {state} the study you sent",
                   {"inbox_id": item.id, "state": state, "by_organisation": who.organisation})
        return True

    def _record(self, action: str, who: Principal, outcome: str, details: dict[str, Any],
                item: Item | None) -> None:
        facts = item.audit_facts() if item is not None else {}
        self.access.record(action, who, outcome, wait=True, **facts,
                           details={k: v for k, v in details.items() if v is not None})
