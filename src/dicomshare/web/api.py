"""JSON API under ``/api``: the registered DICOM peers, and sending to, querying and
retrieving from them (coordination of care with other archives).

Every route needs a bearer token. A peer belongs to one organisation: its clinicians
and admins list, query, retrieve from and send to it (what is retrieved belongs to the
organisation; what is sent must be downloadable by the caller), its admins register
and remove it; other organisations' peers answer 404. By default a send or retrieve runs
synchronously in the threadpool and the response comes when it is done, which suits small
studies. With ``Prefer: respond-async`` (RFC 7240) or ``"background": true`` the same
checks run, then a background job (dimse/jobs.py, web/jobs_api.py) does the transfer:
202 with ``Location: /api/jobs/{id}`` to poll for progress and the same report. Unknown
peer or study: 404; a peer we cannot associate with, or that fails a query: 502.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from dicomshare.access.identity import Principal
from dicomshare.access.policy import Action
from dicomshare.access.service import Access
from dicomshare.archive import Archive
from dicomshare.config import Settings
from dicomshare.dimse import scu
from dicomshare.dimse.aes import AERegistry, RemoteAE
from dicomshare.dimse.jobs import retrieve_result, send_result
from dicomshare.errors import Conflict, Forbidden
from dicomshare.web.app import principal, requires
from dicomshare.web.jobs_api import JobModel, start_job, wants_async

router = APIRouter(tags=["DICOM peers"])
_ASYNC: dict[int | str, dict[str, Any]] = {202: {
    "model": JobModel, "description": "with `Prefer: respond-async` or `\"background\": "
    "true`: the job, started (Location: /api/jobs/{id})"}}

Caller = Annotated[Principal, Depends(principal)]
RemoteUser = Annotated[Principal, Depends(requires(Action.REMOTE))]
Manager = Annotated[Principal, Depends(requires(Action.MANAGE_ORGANISATION))]


class RemoteAEModel(BaseModel):
    ae_title: str
    host: str
    port: int
    description: str | None = None
    organisation: str | None = None
    scopes: list[str] = Field(description="what the peer may do when it calls us: read "
                              "(C-FIND, C-MOVE, C-GET), write (C-STORE)")
    tls: bool = Field(False, description="we call it over DICOM TLS only (port: its TLS port)")


class RemoteAEUpdate(BaseModel):
    host: str = Field(min_length=1, max_length=255)
    port: int = Field(ge=1, le=65535)
    description: str | None = Field(None, max_length=1000)
    organisation: str | None = Field(None, description="superusers only: the organisation "
                                     "the peer acts for (default: the caller's)")
    scopes: list[Literal["read", "write"]] = ["read", "write"]
    tls: bool = Field(False, description="call it over DICOM TLS only (PS3.15 Annex B); "
                      "port is then its TLS port")


class FindRequest(BaseModel):
    level: Literal["patient", "study", "series", "image"] = "study"
    model: Literal["study", "patient"] | None = Field(
        None, description="information model; default patient for level patient, else study")
    keys: dict[str, str] = Field(
        default_factory=dict, description="keyword or 8-digit tag -> matching value "
        "(wildcards, ranges); an empty value asks for the attribute",
        examples=[{"PatientName": "DOE*", "StudyDate": "20240101-"}])
    limit: int = Field(1000, ge=1, le=10_000,
                       description="matches to return; then the query is cancelled "
                       "(C-CANCEL) and a Warning header says so")


class RetrieveRequest(BaseModel):
    study_uids: list[str] = Field(min_length=1)
    method: Literal["move", "get"] = Field(
        "move", description="move: the peer sends to our AE title and must know it; get: "
        "the instances come back on the same association")
    background: bool = Field(False, description="run as a background job: 202 and the job "
                             "(like the header Prefer: respond-async)")


class SendRequest(BaseModel):
    destination: str = Field(min_length=1, description="registered AE title")
    study_uids: list[str] = Field(min_length=1)
    background: bool = Field(False, description="run as a background job: 202 and the job "
                             "(like the header Prefer: respond-async)")


class InstanceResultModel(BaseModel):
    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax_uid: str = Field(description="as stored")
    sent_as: str | None = Field(description="transfer syntax on the wire; null if not sent")
    outcome: str = Field(description="success, warning or failure")
    status: int | None = Field(description="the peer's C-STORE status; null if none")
    comment: str = Field(description="the peer's ErrorComment, or why it was not sent")


class SendResponse(BaseModel):
    destination: str
    succeeded: int
    warnings: int
    failed: int
    error: str | None = Field(description="why the association ended early, if it did")
    instances: list[InstanceResultModel]


class RefusedModel(BaseModel):
    sop_instance_uid: str
    reason: str


class StudyRetrieveModel(BaseModel):
    study_uid: str
    method: Literal["move", "get"]
    outcome: str
    status: int | None = Field(description="the peer's final status; null if none came")
    comment: str
    completed: int
    failed: int
    warning: int
    stored: int = Field(description="get: instances new to this archive")
    already_present: int = Field(description="get: identical instances stored before")
    refused: list[RefusedModel] = Field(description="get: instances this archive refused")


class RetrieveResponse(BaseModel):
    source: str
    studies: list[StudyRetrieveModel]


def _context(request: Request) -> tuple[Archive, Settings, AERegistry]:
    archive: Archive = request.app.state.archive
    return archive, request.app.state.settings, AERegistry(archive.index.engine)


def _model(ae: RemoteAE) -> RemoteAEModel:
    return RemoteAEModel(ae_title=ae.ae_title, host=ae.host, port=ae.port,
                         description=ae.description, organisation=ae.organisation,
                         scopes=list(ae.scopes), tls=ae.tls)


@router.get("/remote-aes", response_model=list[RemoteAEModel])
async def list_remote_aes(request: Request, who: RemoteUser) -> list[RemoteAEModel]:
    """The caller's organisation's peers (all of them, for superusers)."""
    _, _, registry = _context(request)
    return [_model(ae) for ae in await run_in_threadpool(
        registry.all, None if who.superuser else who.organisation_pk)]


@router.put("/remote-aes/{title}", response_model=RemoteAEModel)
async def put_remote_ae(request: Request, title: str, body: RemoteAEUpdate,
                        who: Manager) -> RemoteAEModel:
    """Register a peer for the caller's organisation, or change one (its admins)."""
    _, _, registry = _context(request)
    existing = await run_in_threadpool(registry.get, title)
    if existing is not None and not who.superuser \
            and existing.organisation_pk != who.organisation_pk:
        raise Conflict(f"AE title {title.strip()} is taken")
    if body.organisation is not None and not who.superuser \
            and body.organisation != who.organisation:
        raise Forbidden("only superusers register peers for other organisations")
    ae = await run_in_threadpool(registry.add, title, body.host, body.port, body.description,
                                 True, body.organisation or who.organisation, body.scopes,
                                 body.tls)
    await _audit(request, "config.remote-ae", who, {"ae_title": ae.ae_title, "host": ae.host,
                                             "port": ae.port, "scopes": list(ae.scopes),
                                             "tls": ae.tls})
    return _model(ae)


@router.delete("/remote-aes/{title}", status_code=204)
async def delete_remote_ae(request: Request, title: str, who: Manager) -> Response:
    """Forget a peer (its organisation's admins)."""
    _, _, registry = _context(request)
    await run_in_threadpool(registry.usable_by, who, title)
    await run_in_threadpool(registry.remove, title)
    await _audit(request, "config.remote-ae", who, {"ae_title": title, "removed": True})
    return Response(status_code=204)


async def _audit(request: Request, action: str, who: Principal, details: dict[str, Any]) -> None:
    access: Access = request.app.state.access
    await run_in_threadpool(lambda: access.record(action, who, wait=True, details=details))


@router.post("/remote-aes/{title}/find", response_model=list[dict[str, Any]])
async def remote_find(request: Request, response: Response, title: str, body: FindRequest,
                      who: RemoteUser) -> list[dict[str, Any]]:
    """C-FIND on the peer; each match as DICOM JSON (PS3.18 F.2)."""
    _, settings, registry = _context(request)
    peer = await run_in_threadpool(registry.usable_by, who, title)
    found = await run_in_threadpool(scu.find, settings, peer, body.level, body.keys,
                                    body.model, body.limit)
    await _audit(request, "remote.find", who, {"ae_title": peer.ae_title, "level": body.level,
                                        "keys": body.keys, "matches": len(found),
                                        "truncated": found.truncated})
    if found.truncated:
        response.headers["Warning"] = (f'299 dicomshare "stopped at limit {body.limit}: '
                                       'there are more matches; narrow the query"')
    return list(found)


@router.post("/remote-aes/{title}/retrieve", response_model=RetrieveResponse,
             responses=_ASYNC)
async def remote_retrieve(request: Request, title: str, body: RetrieveRequest,
                          who: RemoteUser) -> RetrieveResponse | Response:
    """C-MOVE (to our AE title) or C-GET studies into this archive; 200 with a report per
    study, whatever each study's outcome. What arrives belongs to the caller's
    organisation (C-MOVE: to the peer's, which is the same). Asynchronously: 202 and
    the job."""
    if wants_async(request, body.background):  # the job makes the same checks first
        return await start_job(request, who, "retrieve", title, body.study_uids, body.method)
    archive, settings, registry = _context(request)
    access: Access = request.app.state.access
    peer = await run_in_threadpool(registry.usable_by, who, title)
    await run_in_threadpool(access.store_access, who)
    reports = await run_in_threadpool(scu.retrieve, archive, settings, peer, body.study_uids,
                                      body.method, who, access)
    await _audit(request, "remote.retrieve", who, {"ae_title": peer.ae_title,
                                            "study_uids": body.study_uids[:100],
                                            "method": body.method})
    return RetrieveResponse.model_validate(retrieve_result(peer.ae_title, reports))


@router.post("/send", response_model=SendResponse, responses=_ASYNC)
async def send(request: Request, body: SendRequest, who: RemoteUser) -> SendResponse | Response:
    """C-STORE every instance of the studies to one of the organisation's peers, as
    stored; 200 with a result per instance, whatever each outcome. Studies the caller
    may not download answer 404. Asynchronously (the same checks first): 202 and the
    job."""
    if wants_async(request, body.background):  # the job makes the same checks first
        return await start_job(request, who, "send", body.destination, body.study_uids)
    archive, settings, registry = _context(request)
    peer = await run_in_threadpool(registry.usable_by, who, body.destination)
    access: Access = request.app.state.access
    report = await run_in_threadpool(scu.send, archive, settings, peer, body.study_uids,
                                     who, access)
    return SendResponse.model_validate(send_result(report))
