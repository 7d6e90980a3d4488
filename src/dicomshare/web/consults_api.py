"""/api/inbox, /api/consults and /api/notifications (sharing/inbox.py, consults.py, notify.py).

- inbox: sharers (clinicians, admins) send a study or a patient's studies to another
  organisation or one of its users; the recipients accept (a grant is made) or decline;
  the sender may withdraw what is still pending;
- consults: a clinician asks a specialist organisation (or user) for a second opinion;
  the parties discuss, the specialist answers with a DICOM report stored in the study;
- notifications: every user's own and their organisation's; e-mailed when SMTP is set.

Whatever the caller is no party to answers 404, exactly like what does not exist.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import Annotated, Any, Literal, Protocol

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from dicomshare.access.policy import Action, Principal
from dicomshare.errors import InvalidInput
from dicomshare.sharing import notify as notifications
from dicomshare.sharing.common import app_service
from dicomshare.sharing.consults import Consults
from dicomshare.sharing.inbox import Inbox
from dicomshare.web.app import principal, requires


def _start_mailer(request: Request) -> None:
    """The e-mail worker of this process starts with its first request here (and runs only
    when SMTP is configured)."""
    notifications.start_mailer(request.app.state.archive.index.engine,
                               request.app.state.settings)


router = APIRouter(dependencies=[Depends(_start_mailer)])
Caller = Annotated[Principal, Depends(principal)]
Viewer = Annotated[Principal, Depends(requires(Action.VIEW))]
Sharer = Annotated[Principal, Depends(requires(Action.SHARE))]


def _inbox(request: Request) -> Inbox:
    state = request.app.state
    return app_service(state, "inbox", lambda: Inbox(
        state.archive.index.engine, state.grants, state.identities, state.access))


def _consults(request: Request) -> Consults:
    state = request.app.state
    return app_service(state, "consults", lambda: Consults(
        state.archive.index.engine, state.grants, state.access))


class _Shown(Protocol):
    def as_json(self, who: Principal) -> dict[str, Any]: ...


async def _one(who: Principal, call: Callable[..., _Shown], *args: Any) -> dict[str, Any]:
    """Run a service call off the event loop (it blocks on the database) and show its
    result as the caller may see it (an inbox item hides its study until accepted)."""
    found = await run_in_threadpool(call, who, *args)
    return found.as_json(who)


async def _many(who: Principal, call: Callable[..., Iterable[_Shown]],
                *args: Any) -> list[dict[str, Any]]:
    """:func:`_one` for a listing."""
    found = await run_in_threadpool(call, who, *args)
    return [x.as_json(who) for x in found]


# -- inbox ---------------------------------------------------------------------------------
class PatientRef(BaseModel):
    id: str = Field(min_length=1, max_length=64)
    issuer: str = Field("", max_length=64)


class SendCreate(BaseModel):
    study_uid: str | None = Field(None, min_length=1, max_length=64)
    patient: PatientRef | None = None
    to_organisation: str = Field(min_length=1, max_length=200)
    to_user: str | None = Field(None, min_length=1, max_length=200)
    permissions: list[Literal["view", "download", "add-series"]] = Field(
        ["view", "download"], max_length=3)
    message: str | None = Field(None, max_length=4000)


class Reason(BaseModel):
    reason: str | None = Field(None, max_length=4000)


StateFilter = Annotated[str | None, Query(max_length=20)]


@router.post("/inbox/sends", status_code=201, tags=["inbox"])
async def send(request: Request, body: SendCreate, who: Sharer) -> dict[str, Any]:
    """Send a study (``study_uid``) or all studies of a patient (``patient``) to another
    organisation, or one of its users; they find it in their inbox."""
    return await _one(who, partial(
        _inbox(request).send, study_uid=body.study_uid,
        patient=(body.patient.id, body.patient.issuer) if body.patient else None,
        to_organisation=body.to_organisation, to_user=body.to_user,
        permissions=list(body.permissions), message=body.message))


@router.get("/inbox", tags=["inbox"])
async def inbox(request: Request, who: Viewer,
                state: StateFilter = None) -> list[dict[str, Any]]:
    """Items sent to the caller's organisation or to the caller, newest first. Until an
    item is accepted it does not say which study or patient it is about."""
    return await _many(who, _inbox(request).received, state)


@router.get("/inbox/sent", tags=["inbox"])
async def sent(request: Request, who: Sharer,
               state: StateFilter = None) -> list[dict[str, Any]]:
    """Items the caller's organisation sent, newest first."""
    return await _many(who, _inbox(request).sent, state)


@router.get("/inbox/{item_id}", tags=["inbox"])
async def inbox_item(request: Request, item_id: int, who: Caller) -> dict[str, Any]:
    return await _one(who, _inbox(request).visible, item_id)


@router.post("/inbox/{item_id}/accept", tags=["inbox"])
async def accept_item(request: Request, item_id: int, who: Caller) -> dict[str, Any]:
    """Accept: a grant from the sender's organisation opens the study to the recipient
    (it is listed in /api/grants; its id is ``grant_id``)."""
    return await _one(who, _inbox(request).accept, item_id)


@router.post("/inbox/{item_id}/decline", tags=["inbox"])
async def decline_item(request: Request, item_id: int, who: Caller,
                       body: Reason | None = None) -> dict[str, Any]:
    return await _one(who, _inbox(request).decline, item_id, body.reason if body else None)


@router.post("/inbox/{item_id}/withdraw", tags=["inbox"])
async def withdraw_item(request: Request, item_id: int, who: Caller) -> dict[str, Any]:
    """The sender takes back an item still pending (an accepted one: revoke its grant)."""
    return await _one(who, _inbox(request).withdraw, item_id)


# -- consults ------------------------------------------------------------------------------
class ConsultCreate(BaseModel):
    studies: list[str] = Field(min_length=1, max_length=50)
    question: str = Field(min_length=1, max_length=20000)
    urgency: Literal["routine", "urgent", "emergency"] = "routine"
    specialist_organisation: str = Field(min_length=1, max_length=200)
    specialist_user: str | None = Field(None, min_length=1, max_length=200)


class CommentCreate(BaseModel):
    body: str = Field(min_length=1, max_length=20000)


class OpinionCreate(BaseModel):
    text: str = Field(min_length=1, max_length=60000)
    format: Literal["sr", "pdf"] = "sr"
    study_uid: str | None = Field(None, min_length=1, max_length=64,
                                  description="which of the consult's studies it goes into "
                                  "(needed when there are several)")


@router.post("/consults", status_code=201, tags=["consults"])
async def request_consult(request: Request, body: ConsultCreate, who: Sharer) -> dict[str, Any]:
    """Ask for a second opinion. The specialist organisation (or user) is granted view,
    download and add-series on the studies at once, until the consult is declined or
    closed."""
    for uid in body.studies:
        if not 0 < len(uid) <= 64:
            raise InvalidInput("study UIDs have 1 to 64 characters")
    return await _one(who, partial(
        _consults(request).request, studies=body.studies, question=body.question,
        urgency=body.urgency, specialist_organisation=body.specialist_organisation,
        specialist_user=body.specialist_user))


@router.get("/consults", tags=["consults"])
async def list_consults(
        request: Request, who: Viewer,
        role: Annotated[Literal["requester", "specialist"] | None, Query()] = None,
        state: StateFilter = None) -> list[dict[str, Any]]:
    """Consults the caller is a party to, as requester or specialist, newest first."""
    return await _many(who, _consults(request).find, role, state)


@router.get("/consults/{consult_id}", tags=["consults"])
async def get_consult(request: Request, consult_id: int, who: Caller) -> dict[str, Any]:
    return await _one(who, _consults(request).get, consult_id)


@router.post("/consults/{consult_id}/accept", tags=["consults"])
async def accept_consult(request: Request, consult_id: int, who: Caller) -> dict[str, Any]:
    return await _one(who, _consults(request).accept, consult_id)


@router.post("/consults/{consult_id}/decline", tags=["consults"])
async def decline_consult(request: Request, consult_id: int, who: Caller,
                          body: Reason | None = None) -> dict[str, Any]:
    return await _one(who, _consults(request).decline, consult_id,
                      body.reason if body else None)


@router.post("/consults/{consult_id}/close", tags=["consults"])
async def close_consult(request: Request, consult_id: int, who: Caller) -> dict[str, Any]:
    return await _one(who, _consults(request).close, consult_id)


@router.get("/consults/{consult_id}/comments", tags=["consults"])
async def list_comments(request: Request, consult_id: int,
                        who: Caller) -> list[dict[str, Any]]:
    return await run_in_threadpool(_consults(request).comments, who, consult_id)


@router.post("/consults/{consult_id}/comments", status_code=201, tags=["consults"])
async def add_comment(request: Request, consult_id: int, body: CommentCreate,
                      who: Caller) -> dict[str, Any]:
    return await run_in_threadpool(_consults(request).comment, who, consult_id, body.body)


@router.post("/consults/{consult_id}/opinion", status_code=201, tags=["consults"])
async def give_opinion(request: Request, consult_id: int, body: OpinionCreate,
                       who: Caller) -> dict[str, Any]:
    """The specialist's answer, stored in the study as a Basic Text SR (``sr``) or an
    Encapsulated PDF (``pdf``) in a new series, readable by the requester over DICOMweb."""
    return await _one(who, _consults(request).opinion, consult_id, body.text, body.format,
                      body.study_uid)


# -- notifications -------------------------------------------------------------------------
@router.get("/notifications", tags=["notifications"])
async def list_notifications(
        request: Request, who: Caller, unread: bool = False,
        kind: Annotated[str | None, Query(max_length=40)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[dict[str, Any]]:
    """The caller's notifications and its organisation's, newest first."""
    engine = request.app.state.archive.index.engine
    return await run_in_threadpool(lambda: notifications.list_notifications(
        engine, who, unread, kind, limit))


@router.post("/notifications/{notification_id}/read", tags=["notifications"])
async def read_notification(request: Request, notification_id: int,
                            who: Caller) -> dict[str, Any]:
    engine = request.app.state.archive.index.engine
    return await run_in_threadpool(notifications.mark_read, engine, who, notification_id)
