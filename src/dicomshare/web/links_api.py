"""/api/links: create, list and revoke share links (sharing/links.py).

Clinicians manage their own links, admins every link of their organisation; a link of
another organisation answers like a missing one. The secret is in the answer to the
POST only. Every creation and revocation, and every refusal, is audited.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from dicomshare import clock
from dicomshare.access.policy import Action, Principal
from dicomshare.errors import DicomshareError, InvalidInput
from dicomshare.sharing.common import app_service
from dicomshare.sharing.links import DEFAULT_DAYS, MAX_DAYS, Link, LinkStore
from dicomshare.web.app import requires

router = APIRouter(tags=["share links"])
Sharer = Annotated[Principal, Depends(requires(Action.SHARE))]


def links_of(app: FastAPI) -> LinkStore:
    """The app's LinkStore, made on first use."""
    state = app.state
    return app_service(state, "links", lambda: LinkStore(
        state.archive.index.engine, state.settings, state.access))


def public_base(request: Request) -> str:
    """The server's base URL as users reach it (``public_url`` when set)."""
    settings = request.app.state.settings
    if settings.public_url:
        return str(settings.public_url).rstrip("/")
    return str(request.base_url).rstrip("/")


class PatientRef(BaseModel):
    id: str = Field(min_length=1, max_length=64)
    issuer: str | None = Field(None, max_length=64)


class LinkCreate(BaseModel):
    studies: list[Annotated[str, Field(min_length=1, max_length=64)]] | None = Field(
        None, max_length=500, description="StudyInstanceUIDs (or give a patient)")
    patient: PatientRef | None = Field(None, description="every study of this patient")
    permissions: list[str] = Field(["view"], max_length=3,
                                   description="view, download, upload (into the studies)")
    expires_in_days: int | None = Field(None, ge=1, le=MAX_DAYS,
                                        description=f"default {DEFAULT_DAYS}")
    expires_at: datetime | None = None
    pin: str | None = Field(None, min_length=4, max_length=128,
                            description="a PIN or password the recipient must enter")
    max_uses: int | None = Field(None, ge=1, le=1_000_000)
    notify: bool = False
    label: str | None = Field(None, max_length=200)
    deidentified: bool = Field(False, description="serve only de-identified data, with the "
                               "pseudonyms and options of the research project project_id")
    project_id: int | None = Field(None, description="research project of your organisation "
                                   "(required with deidentified)")


def link_json(link: Link) -> dict[str, Any]:
    return link.as_json()


@router.post("/links", status_code=201)
async def create_link(request: Request, body: LinkCreate, who: Sharer) -> dict[str, Any]:
    """Create a share link. The answer's ``secret`` and ``url`` are shown only once."""
    store = links_of(request.app)
    try:
        if body.expires_in_days is not None and body.expires_at is not None:
            raise InvalidInput("give expires_in_days or expires_at, not both")
        expires_at = body.expires_at
        if body.expires_in_days is not None:
            expires_at = clock.now() + timedelta(days=body.expires_in_days)
        patient = (body.patient.id, body.patient.issuer or "") if body.patient else None
        link, secret = await run_in_threadpool(lambda: store.create(
            who, studies=body.studies, patient=patient, permissions=body.permissions,
            expires_at=expires_at, pin=body.pin, max_uses=body.max_uses, notify=body.notify,
            label=body.label, deidentified=body.deidentified, project_id=body.project_id))
    except DicomshareError as exc:
        reason = exc.reason
        await run_in_threadpool(lambda: store.record(
            "link.create", who, "denied", reason=reason, studies=body.studies,
            patient=body.patient.id if body.patient else None,
            deidentified=body.deidentified, project_id=body.project_id))
        raise
    await run_in_threadpool(lambda: store.record("link.create", who, link=link, wait=True,
                                                 **_audited(link)))
    base = public_base(request)
    return {**link.as_json(), "secret": secret, "url": f"{base}/share/{secret}",
            "dicomweb_url": f"{base}/share/{secret}/dicomweb"}


def _audited(link: Link) -> dict[str, Any]:
    data = link.as_json()
    return {k: data[k] for k in ("label", "permissions", "expires_at", "has_pin", "max_uses",
                                 "notify", "state", "deidentified", "project_id")}


@router.get("/links")
async def list_links(request: Request, who: Sharer) -> list[dict[str, Any]]:
    """The caller's links (admins: every link of their organisation), newest first."""
    links = await run_in_threadpool(links_of(request.app).list_links, who)
    return [link.as_json() for link in links]


@router.get("/links/{link_id}")
async def get_link(request: Request, link_id: int, who: Sharer) -> dict[str, Any]:
    link = await run_in_threadpool(links_of(request.app).get, who, link_id)
    return link.as_json()


@router.delete("/links/{link_id}")
async def revoke_link(request: Request, link_id: int, who: Sharer) -> dict[str, Any]:
    """Revoke a link: its next request, and every open session of it, is refused."""
    store = links_of(request.app)
    try:
        link = await run_in_threadpool(store.revoke, who, link_id)
    except DicomshareError as exc:
        reason = exc.reason
        await run_in_threadpool(lambda: store.record("link.revoke", who, "denied",
                                                     reason=reason, link_id=link_id))
        raise
    await run_in_threadpool(lambda: store.record("link.revoke", who, link=link, wait=True,
                                                 **_audited(link)))
    return link.as_json()
