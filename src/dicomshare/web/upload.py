"""Upload links: ``/api/upload-links`` for the specialist, ``/upload/{secret}`` for the sender.

The specialist's side needs Action.SHARE (a link hands a capability to someone outside the
organisation, as a grant does) and, to create one, Action.STORE too (what the link does
is store into the organisation). The sender's side needs only the secret; its resumable
protocol is described in docs/upload-links.md.
"""

from __future__ import annotations

import html
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from dicomshare import clock
from dicomshare.access.policy import Action, Principal
from dicomshare.errors import (
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    TooManyRequests,
    UnsupportedMediaType,
)
from dicomshare.sharing.common import app_service
from dicomshare.sharing.uploads import (
    MAX_EXPIRY_DAYS,
    PROCESSING,
    RECEIVING,
    LinkGone,
    UploadFile,
    UploadLink,
    Uploads,
    locked,
)
from dicomshare.web.app import client_of, error_response, require, requires
from dicomshare.web.dicomweb import root_url

router = APIRouter(tags=["upload links"])
Sharer = Annotated[Principal, Depends(requires(Action.SHARE))]
_STATIC = Path(__file__).parent / "static" / "upload"
CHUNK_SIZE = 4 << 20  # what the page sends per PATCH (any size is accepted)
OFFSET_TYPE = "application/offset+octet-stream"
# The page and the public answers: no referrer (the secret is in the URL), no framing,
# nothing from elsewhere, nothing cached.
_PUBLIC_HEADERS = {
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'; form-action 'none'; base-uri 'none'",
}


def uploads_of(app: FastAPI) -> Uploads:
    """The app's Uploads service, made on first use."""
    state = app.state
    return app_service(state, "uploads", lambda: Uploads(
        state.archive.index.engine, state.access, state.settings))


def public_base(request: Request) -> str:
    """The server's base URL as the client reached it, for the link and Location URLs: the
    DICOMweb root without its suffix (``public_url`` when set, else the port put back)."""
    root = root_url(request)
    suffix = request.app.state.settings.dicomweb_root
    return root[: -len(suffix)] if suffix and root.endswith(suffix) else root


# -- the specialist's API --------------------------------------------------------------------
class UploadLinkCreate(BaseModel):
    label: str | None = Field(None, max_length=200,
                              description="shown to the sender, e.g. the patient or clinic")
    expires_in_days: int = Field(7, ge=1, le=MAX_EXPIRY_DAYS)
    max_bytes: int | None = Field(None, ge=1, description="default: upload_max_bytes")
    notify: bool = Field(False, description="notify me when files arrive")


async def _own_link(uploads: Uploads, action: str, who: Principal, link_id: int,
                    call: Callable[[Principal, int], UploadLink]) -> UploadLink:
    """``call`` on one of the caller's organisation's links; asking for another's (or a
    missing one) is answered NotFound and audited as a refused ``action``."""
    try:
        return await run_in_threadpool(call, who, link_id)
    except NotFound as exc:
        await run_in_threadpool(uploads.access.record, action, who, "denied",
                                details={"upload_link": link_id, "reason": exc.reason})
        raise


@router.post("/api/upload-links", status_code=201,
             responses={201: {"description": "the link; its secret is shown only here"}})
async def create_upload_link(request: Request, body: UploadLinkCreate,
                             who: Sharer) -> dict[str, Any]:
    """Create a link through which someone without an account can upload a study into
    your organisation."""
    require(request, Action.STORE)
    uploads = uploads_of(request.app)
    link, secret = await run_in_threadpool(lambda: uploads.create(
        who, label=body.label, expires_in_days=body.expires_in_days,
        max_bytes=body.max_bytes, notify_me=body.notify))
    return {**link.as_json(), "secret": secret,
            "url": f"{public_base(request)}/upload/{secret}"}


@router.get("/api/upload-links")
async def list_upload_links(request: Request, who: Sharer) -> list[dict[str, Any]]:
    """Your organisation's upload links, newest first."""
    links = await run_in_threadpool(uploads_of(request.app).links, who)
    return [link.as_json() for link in links]


@router.get("/api/upload-links/{link_id}")
async def read_upload_link(request: Request, link_id: int, who: Sharer) -> dict[str, Any]:
    """One link and what it received: files, per-instance results, studies."""
    uploads = uploads_of(request.app)
    link = await _own_link(uploads, "upload-link.read", who, link_id, uploads.link)
    received = await run_in_threadpool(uploads.received, link)
    await run_in_threadpool(lambda: uploads.audit(
        "upload-link.read", who, link, study_uids=[s["study"] for s in received["studies"]]))
    return {**link.as_json(), **received}


@router.delete("/api/upload-links/{link_id}")
async def revoke_upload_link(request: Request, link_id: int, who: Sharer) -> dict[str, Any]:
    """Revoke a link: it refuses every request from now on; partial files are dropped."""
    uploads = uploads_of(request.app)
    link = await _own_link(uploads, "upload-link.revoke", who, link_id, uploads.revoke)
    return link.as_json()


# -- the sender's side ------------------------------------------------------------------------
def _page(status: int, title: str, message: str) -> HTMLResponse:
    body = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>{html.escape(title)}</title>
<link rel="stylesheet" href="/static/upload/upload.css"></head>
<body><main class="card" data-testid="link-problem" data-status="{status}">
<h1>{html.escape(title)}</h1><p data-testid="problem-message">{html.escape(message)}</p>
<p class="muted">Ask the person who sent you this link for a new one.</p>
</main></body></html>"""
    return HTMLResponse(body, status_code=status, headers=_PUBLIC_HEADERS)


@router.get("/upload/{secret}", response_class=HTMLResponse, include_in_schema=False)
async def upload_page(request: Request, secret: str) -> Response:
    """The upload page, or a page saying why the link cannot be used."""
    uploads = uploads_of(request.app)
    try:
        link = await run_in_threadpool(uploads.resolve, secret, client_of(request), "page")
    except TooManyRequests as exc:
        page = _page(429, "Too many attempts", exc.reason)
        page.headers["Retry-After"] = str(exc.retry_after)
        return page
    except NotFound:
        return _page(404, "Upload link not found",
                     "This upload link does not exist. Check that you copied all of it.")
    except LinkGone as exc:
        title = "Upload link revoked" if exc.why == "revoked" else "Upload link expired"
        return _page(410, title, exc.reason + "; it no longer accepts files.")
    await run_in_threadpool(uploads.opened, link, client_of(request))
    if link.state() == "full":
        return _page(413, "Upload limit reached",
                     f"This upload link has reached its size limit of {link.max_bytes} bytes; "
                     "it accepts no more files.")
    return HTMLResponse((_STATIC / "upload.html").read_text(), headers=_PUBLIC_HEADERS)


def _json(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(content, status_code=status,
                        headers={**_PUBLIC_HEADERS, **(headers or {})})


@router.get("/upload/{secret}/info")
async def upload_info(request: Request, secret: str) -> Response:
    """What the page shows: who receives, how much still fits, until when."""
    link = await run_in_threadpool(uploads_of(request.app).resolve, secret,
                                   client_of(request), "info")
    return _json({"label": link.label, "organisation": link.organisation,
                  "state": link.state(), "max_bytes": link.max_bytes,
                  "bytes_left": link.bytes_left, "expires_at": clock.iso(link.expires_at),
                  "chunk_size": CHUNK_SIZE})


class FileCreate(BaseModel):
    name: str = Field(min_length=1, max_length=2000,
                      description="the file's name (or path in a folder), for the results")
    size: int = Field(ge=1, description="bytes; reserved against the link's limit")


@router.post("/upload/{secret}/files", status_code=201)
async def begin_file(request: Request, secret: str, body: FileCreate) -> Response:
    """Declare a file; upload its bytes with PATCH. 413 when it does not fit."""
    uploads = uploads_of(request.app)
    source = client_of(request)
    link = await run_in_threadpool(uploads.resolve, secret, source, "begin")
    f = await run_in_threadpool(uploads.begin, link, body.name, body.size, source)
    location = f"{public_base(request)}/upload/{secret}/files/{f.id}"
    return _json({"upload_id": f.id, "offset": 0, "size": f.size, "location": location},
                 201, {"Location": location, "Upload-Offset": "0",
                       "Upload-Length": str(f.size)})


async def _file(request: Request, secret: str, upload_id: str,
                purpose: str) -> tuple[Uploads, UploadLink, UploadFile]:
    uploads = uploads_of(request.app)
    link = await run_in_threadpool(uploads.resolve, secret, client_of(request), purpose)
    f = await run_in_threadpool(uploads.file, link, upload_id)
    if f.state == PROCESSING:  # left so by a server that stopped? then ingest it now
        f = await run_in_threadpool(uploads.recover, link, f, client_of(request))
    return uploads, link, f


@router.head("/upload/{secret}/files/{upload_id}")
async def file_offset(request: Request, secret: str, upload_id: str) -> Response:
    """How many bytes of the file the server holds (``Upload-Offset``): resume from there."""
    uploads, _, f = await _file(request, secret, upload_id, "head")
    offset = await run_in_threadpool(uploads.offset, f)
    return Response(status_code=200, headers={**_PUBLIC_HEADERS, "Upload-Offset": str(offset),
                                              "Upload-Length": str(f.size)})


@router.get("/upload/{secret}/files/{upload_id}")
async def file_state(request: Request, secret: str, upload_id: str) -> Response:
    """A file's state and, once ingested, each instance's fate."""
    uploads, _, f = await _file(request, secret, upload_id, "status")
    out = f.as_json()
    out["offset"] = await run_in_threadpool(uploads.offset, f)
    return _json(out, headers={"Upload-Offset": str(out["offset"])})


@router.delete("/upload/{secret}/files/{upload_id}", status_code=204)
async def cancel_file(request: Request, secret: str, upload_id: str) -> Response:
    """Abandon a file being received; its share of the limit is given back."""
    uploads, link, f = await _file(request, secret, upload_id, "cancel")
    await run_in_threadpool(uploads.cancel, link, f, client_of(request))
    return Response(status_code=204, headers=_PUBLIC_HEADERS)


def _offset_conflict(reason: str, offset: int) -> Response:
    response = error_response(409, reason, {"Upload-Offset": str(offset)})
    response.headers.update(_PUBLIC_HEADERS)
    return response


@router.patch("/upload/{secret}/files/{upload_id}", status_code=204,
              responses={409: {"description": "offset mismatch; see Upload-Offset"},
                         413: {"description": "the chunk passes the declared size"}})
async def append_chunk(request: Request, secret: str, upload_id: str) -> Response:
    """Append the body at ``Upload-Offset``. When the file is complete it is ingested
    before the answer (204, with the new ``Upload-Offset``)."""
    uploads, link, f = await _file(request, secret, upload_id, "patch")
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != OFFSET_TYPE:
        raise UnsupportedMediaType(f"send chunks as {OFFSET_TYPE}, not {media or 'nothing'}")
    raw = request.headers.get("upload-offset", "").strip()
    if not raw.isdigit() or len(raw) > 18:
        raise InvalidInput("the Upload-Offset header must give the offset of this chunk")
    offset = int(raw)
    if f.state != RECEIVING:
        if offset == f.received == f.size:  # a repeated last chunk: already done
            return Response(status_code=204, headers={
                **_PUBLIC_HEADERS, "Upload-Offset": str(f.size)})
        return _offset_conflict(f"this upload is {f.state}", f.received)
    declared = request.headers.get("content-length", "")
    source = client_of(request)
    if declared.isdigit() and offset + int(declared) > f.size:
        too_big = PayloadTooLarge(f"the chunk ends at byte {offset + int(declared)}, past "
                                  f"the file's declared size of {f.size} bytes")
        await run_in_threadpool(uploads.refused_chunk, link, f, source, too_big)
        raise too_big
    with locked(uploads.part_path(link.id, f.id)) as fd:
        if fd is None:
            offset_now = await run_in_threadpool(uploads.offset, f)
            return _offset_conflict("another transfer of this file is in progress",
                                    offset_now)
        f = await run_in_threadpool(uploads.file, link, upload_id)  # under the lock
        current = os.fstat(fd).st_size
        if f.state != RECEIVING:
            if f.state != PROCESSING:  # finished meanwhile: the lock made an empty file
                uploads.part_path(link.id, f.id).unlink(missing_ok=True)
            return _offset_conflict(f"this upload is {f.state}", f.received)
        if current != offset:
            return _offset_conflict(f"the server holds {current} bytes of this file, not "
                                    f"{offset}; continue from there", current)
        try:
            written = await _receive(request, fd, offset, f.size)
        except PayloadTooLarge as exc:
            await run_in_threadpool(uploads.refused_chunk, link, f, source, exc)
            raise
        await run_in_threadpool(uploads.note_received, f, written)
        if written == f.size:
            await run_in_threadpool(uploads.finish, link, f, source)
    return Response(status_code=204, headers={**_PUBLIC_HEADERS,
                                              "Upload-Offset": str(written)})


async def _receive(request: Request, fd: int, offset: int, size: int) -> int:
    """Stream the body to the part file at ``offset``; the new end. Past ``size``: the
    chunk is dropped and 413 raised. A dropped connection keeps what arrived."""
    os.lseek(fd, offset, os.SEEK_SET)
    written = offset
    try:
        async for chunk in request.stream():
            if written + len(chunk) > size:
                os.ftruncate(fd, offset)
                raise PayloadTooLarge(f"the chunk passes the file's declared size of {size} "
                                      "bytes; it was dropped")
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
            written += len(chunk)
    except ClientDisconnect:
        pass
    return written


@router.post("/upload/{secret}/done", status_code=204)
async def batch_done(request: Request, secret: str) -> Response:
    """The sender finished a batch: its recipient is notified now (if they asked)."""
    uploads = uploads_of(request.app)
    source = client_of(request)
    link = await run_in_threadpool(uploads.resolve, secret, source, "done")
    await run_in_threadpool(uploads.done, link, source)
    return Response(status_code=204, headers=_PUBLIC_HEADERS)
