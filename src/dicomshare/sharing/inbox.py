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

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert, or_, select, update
from sqlalchemy.engine import Engine

from dicomshare import clock
from dicomshare.access.grants import Grants
from dicomshare.access.identity import Identities
from dicomshare.access.policy import Action, Principal, check, parse_permissions
from dicomshare.access.service import Access
from dicomshare.errors import Conflict, DicomshareError, Forbidden, InvalidInput, NotFound
from dicomshare.sharing.common import (
    Record,
    addressed_to,
    audit_details,
    find_recipient,
    of_organisation,
    with_names,
)
from dicomshare.sharing.notify import notify
from dicomshare.storage import schema as s

INBOX_PERMISSIONS = ("view", "download", "add-series")
STATES = ("pending", "accepted", "declined", "withdrawn")

i = s.inbox_item
_LISTED = with_names(
    i, {"from_org": i.c.from_organisation_pk, "to_org": i.c.to_organisation_pk},
    {"from_user": i.c.from_user_pk, "to_user": i.c.to_user_pk,
     "decider": i.c.decided_by_user_pk})


def _to_me(who: Principal) -> Any:
    return addressed_to(i.c.to_organisation_pk, i.c.to_user_pk, who)


def _from_me(who: Principal) -> Any:
    return of_organisation(i.c.from_organisation_pk, who)


@dataclass(frozen=True)
class Item(Record):
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
        with self._refusals("inbox.send", who, where):
            check(who, Action.SHARE)
            perms = parse_permissions(permissions or ["view", "download"])
            if not perms <= set(INBOX_PERMISSIONS):
                raise InvalidInput(f"an inbox send grants {', '.join(INBOX_PERMISSIONS)}")
            if (study_uid is None) == (patient is None):
                raise InvalidInput("send either a study (study_uid) or a patient")
            if message is not None and len(message) > 4000:
                raise InvalidInput("message is longer than 4000 characters")
            with self.engine.begin() as conn:
                org_pk, user_pk = find_recipient(conn, to_organisation, to_user)
                if org_pk == who.organisation_pk:
                    raise InvalidInput("your own organisation sees its studies already")
                # Exactly the check a grant gets: unknown and invisible studies alike are
                # NotFound; visible through a grant without re-share: Forbidden.
                self.grants.check_shareable(conn, who, study_uid, patient, perms)
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
        item = self.get(pk)
        self._record("inbox.send", who, "success", {"inbox_id": pk, **where,
                                                    "permissions": sorted(perms)}, item)
        return item

    # -- reading ---------------------------------------------------------------------------
    def get(self, item_id: int, *where: Any) -> Item:
        """The item, when it also meets ``where`` (a party predicate): anything else is
        NotFound, exactly like an item that does not exist."""
        with self.engine.connect() as conn:
            row = conn.execute(_LISTED.where(i.c.pk == item_id, *where)).first()
        if row is None:
            raise NotFound(f"no inbox item {item_id}")
        return Item(row)

    def visible(self, who: Principal, item_id: int) -> Item:
        """An item the caller sent or received; others answer NotFound like missing ones."""
        return self.get(item_id, or_(_to_me(who), _from_me(who)))

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
        """Accept: the sender makes the grant now, with the checks it would get now (see
        the module's docstring); if it may no longer share, the item cannot be accepted."""
        with self._refusals("inbox.accept", who, {"inbox_id": item_id}):
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
        done = self.get(item_id)
        self._record("inbox.accept", who, "success",
                     {"inbox_id": item_id, "grant_id": grant.id}, done)
        self.access.record("grant.create", sender, wait=True, **done.audit_facts(),
                           details={**grant.as_json(), "inbox_id": item_id})
        return done

    def decline(self, who: Principal, item_id: int, reason: str | None = None) -> Item:
        with self._refusals("inbox.decline", who, {"inbox_id": item_id}):
            item = self._pending_for_recipient(who, item_id)
            if not self._decide(who, item, "declined", None):
                raise Conflict(f"inbox item {item_id} was decided meanwhile")
        done = self.get(item_id)
        self._record("inbox.decline", who, "success",
                     {"inbox_id": item_id, "decline_reason": (reason or "")[:500]}, done)
        return done

    def withdraw(self, who: Principal, item_id: int) -> Item:
        with self._refusals("inbox.withdraw", who, {"inbox_id": item_id}):
            check(who, Action.SHARE)
            item = self.get(item_id, _from_me(who))
            row = item.row
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
        result = self.get(item_id)
        self._record("inbox.withdraw", who, "success", {"inbox_id": item_id}, result)
        return result

    def _pending_for_recipient(self, who: Principal, item_id: int) -> Item:
        check(who, Action.VIEW)
        item = self.get(item_id, _to_me(who))
        if item.state != "pending":
            raise Conflict(f"inbox item {item_id} is {item.state} already")
        return item

    def _sender(self, item: Item) -> Principal:
        row = item.row
        with self.engine.connect() as conn:
            user = conn.execute(select(s.user.c.name, s.user.c.disabled_at)
                                .where(s.user.c.pk == row.from_user_pk)).first()
        if user is None or user.disabled_at is not None:
            raise Conflict("the sender's account is disabled; ask them to send it again")
        return self.identities.principal_for_user(user.name, kind="inbox")

    def _decide(self, who: Principal, item: Item, state: str, grant_pk: int | None) -> bool:
        """Decide a pending item, only if it is still pending (two recipients deciding at
        once: one wins; False for the other), and tell the sender in the same transaction."""
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

    @contextmanager
    def _refusals(self, action: str, who: Principal, details: dict[str, Any]) -> Iterator[None]:
        """Every refusal of ``action`` is audited with its reason, then raised on: nothing
        about the item, which the caller may not see (the refusal may be that)."""
        try:
            yield
        except DicomshareError as exc:
            self._record(action, who, "denied", {**details, "reason": exc.reason}, None)
            raise

    def _record(self, action: str, who: Principal, outcome: str, details: dict[str, Any],
                item: Item | None) -> None:
        facts = item.audit_facts() if item is not None else {}
        self.access.record(action, who, outcome, wait=True, **facts,
                           details=audit_details(details))
