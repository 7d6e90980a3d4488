"""The public side of share links: landing page, PIN, viewer, zip download, and a
DICOMweb root per link (``/share/{secret}/dicomweb``, mounted in web/app.py with
:func:`link_dicomweb` as its dependency). No account is needed; see docs/share-links.md.

A de-identified link never reaches those DICOMweb routes: :class:`_DeidentifiedRoute`
takes every request under its root (any method, any path) before them, and serves it
through sharing/deid_view.py; :func:`link_dicomweb` refuses such a link as well, should a
request ever get there.

A browser gets a link session (the ``dicomshare_link`` cookie, scoped to the link's path)
when it opens the link, or when it enters the PIN. Clients that are not browsers send the
PIN as the password of HTTP Basic authentication. Every refusal is audited, and answers
with a page (or JSON under the DICOMweb root) that says only what is wrong with the link.
"""

from __future__ import annotations

import base64
import binascii
import html
import os
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pydicom
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from fastapi.routing import APIRoute
from pydicom.dataset import Dataset
from starlette.concurrency import run_in_threadpool
from starlette.routing import Match
from starlette.types import Scope

from dicomshare.access.policy import Action, Principal
from dicomshare.access.service import Access
from dicomshare.archive import Archive
from dicomshare.dicom.attributes import Level
from dicomshare.dicom.matching import parse_qido
from dicomshare.errors import Forbidden, InvalidInput, NotFound, TooManyRequests
from dicomshare.sharing import deid_view
from dicomshare.sharing.common import app_service
from dicomshare.sharing.deid_view import DeidViews
from dicomshare.sharing.links import (
    Link,
    LinkGone,
    LinkLocked,
    LinkStore,
    PinRequired,
)
from dicomshare.storage.base import StoredInstance
from dicomshare.web.app import client_of
from dicomshare.web.links_api import links_of

router = APIRouter(include_in_schema=False)
COOKIE = "dicomshare_link"
VIEWER = Path(__file__).parent / "static" / "share" / "viewer.html"
MAX_FORM_BYTES = 4096
_HEADERS = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer",
            "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff"}
_MESSAGES = {
    "expired": (410, "This link has expired",
                "The link has passed its expiry date. Ask the person who sent it for a "
                "new one."),
    "revoked": (410, "This link has been revoked",
                "The sender has withdrawn this link. Ask them for a new one if you still "
                "need the images."),
    "exhausted": (410, "This link has been used up",
                  "The link has been opened as many times as its sender allowed. Ask them "
                  "for a new one."),
    "locked": (423, "This link is locked",
               "Too many wrong PINs were entered. The link is locked: ask the person who "
               "sent it for a new one."),
}


# -- shared pieces -----------------------------------------------------------------------------
def _actor(link: Link, source: str | None) -> Principal:
    """Who a link is in the audit trail (without reading its openings)."""
    return Principal(user=f"link:{link.id}", organisation=link.organisation, role="clinician",
                     organisation_pk=None, kind="link", scopes=frozenset({"read"}),
                     source=source, grants=())


def _record(store: LinkStore, action: str, link: Link | None, source: str | None,
            outcome: str = "success", **details: Any) -> None:
    who = _actor(link, source) if link is not None else None
    if who is None:
        details = {"source": source, **details}
    store.record(action, who, outcome, link=link, **details)


def _page(status: int, title: str, body: str, headers: dict[str, str] | None = None
          ) -> HTMLResponse:
    text = (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<meta name=\"referrer\" content=\"no-referrer\">"
            f"<title>{html.escape(title)}</title><style>body{{font-family:system-ui,sans-serif;"
            f"max-width:32rem;margin:4rem auto;padding:0 1rem;color:#222}}"
            f"input,button{{font-size:1rem;padding:.4rem}}.error{{color:#a00}}</style>"
            f"</head><body><h1>{html.escape(title)}</h1>{body}</body></html>")
    return HTMLResponse(text, status_code=status, headers={**_HEADERS, **(headers or {})})


def _not_found_page() -> HTMLResponse:
    return _page(404, "This link does not exist",
                 "<p>This link does not exist.</p>")


def _state_page(state: str) -> HTMLResponse:
    status, title, text = _MESSAGES[state]
    return _page(status, title, f"<p>{html.escape(text)}</p>")


def _pin_page(secret: str, status: int = 200, error: str | None = None) -> HTMLResponse:
    action = f"/share/{html.escape(secret)}/unlock"
    err = f"<p class=\"error\" role=\"alert\">{html.escape(error)}</p>" if error else ""
    return _page(status, "Enter the PIN",
                 f"<p>The sender protected this link with a PIN or password.</p>{err}"
                 f"<form method=\"post\" action=\"{action}\">"
                 f"<label for=\"pin\">PIN or password</label><br>"
                 f"<input id=\"pin\" name=\"pin\" type=\"password\" autocomplete=\"off\" "
                 f"required minlength=\"4\" maxlength=\"128\" autofocus> "
                 f"<button type=\"submit\">Open</button></form>")


def _throttled_page(exc: TooManyRequests) -> HTMLResponse:
    return _page(429, "Too many attempts", f"<p>{html.escape(exc.reason)}</p>",
                 {"Retry-After": str(exc.retry_after)})


def _with_session(response: Response, store: LinkStore, link: Link, secret: str,
                  request: Request) -> Response:
    value, max_age = store.new_session(link)
    response.set_cookie(COOKIE, value, max_age=max_age, path=f"/share/{secret}",
                        httponly=True, samesite="strict",
                        secure=bool(request.app.state.settings.secure_cookies))
    return response


def _viewer(secret: str) -> Response:
    if VIEWER.is_file():
        return FileResponse(VIEWER, media_type="text/html", headers=_HEADERS)
    info = f"/share/{html.escape(secret)}/info.json"
    return _page(200, "Shared images",
                 f"<p>The viewer is not installed. What this link shows is listed in "
                 f"<a href=\"{info}\">info.json</a>.</p>")


def _basic_password(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value.strip():
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return decoded.partition(":")[2] or None


def _find(store: LinkStore, secret: str, source: str | None, request: Request) -> Link:
    """The link, or NotFound (audited, and counted against the address). An address
    that failed too often gets TooManyRequests, unless it holds a session of this link."""
    path = request.url.path
    link = store.find(secret)
    if link is None or not store.session_valid(link, request.cookies.get(COOKIE)):
        store.throttled(source)
    if link is None:
        store.failed(source)
        _record(store, "link.open", None, source, "denied", reason="unknown link secret",
                resource=path.partition(secret)[2] or "/")  # never the tried secret
        raise NotFound("this link does not exist")
    return link


def _refuse_state(store: LinkStore, link: Link, source: str | None, what: str,
                  allow_exhausted: bool) -> None:
    state = link.state
    if state == "active" or (state == "exhausted" and allow_exhausted):
        return
    _record(store, "link.open", link, source, "denied", reason=f"link {state}", what=what)
    status, title, _ = _MESSAGES[state]
    raise (LinkLocked if state == "locked" else LinkGone)(title)


def authorize(request: Request, secret: str, what: str,
              count: str = "coalesced") -> tuple[LinkStore, Link, bool]:
    """(store, link, within a link session) for a request that is not the landing page.
    A request without a session needs the PIN (HTTP Basic password) when the link has one,
    and counts as a use: ``count`` "coalesced" (once per address per 30 minutes) or
    "always"."""
    store = links_of(request.app)
    source = client_of(request)
    link = _find(store, secret, source, request)
    _refuse_state(store, link, source, what, allow_exhausted=True)
    if store.session_valid(link, request.cookies.get(COOKIE)):
        return store, link, True
    if link.has_pin:
        pin = _basic_password(request)
        if pin is None:
            _record(store, "link.open", link, source, "denied", reason="PIN required",
                    what=what)
            raise PinRequired("this link needs its PIN: open the link in a browser, or send "
                              "the PIN as the password of HTTP Basic authentication")
        left = store.check_pin_cached(link, pin)
        if left is not None:
            store.failed(source)
            _record(store, "link.unlock", link, source, "denied", reason="wrong PIN",
                    attempts_left=left, what=what)
            if left == 0:
                _record(store, "link.lock", link, source, "denied", wait=True,
                        reason="too many wrong PINs")
                raise LinkLocked(_MESSAGES["locked"][1])
            raise PinRequired(f"wrong PIN; {left} attempt(s) left before the link locks")
    counted = store.count_use(link, source, what) if count == "always" else \
        store.count_use_coalesced(link, source, what)
    if counted is False:
        _record(store, "link.open", link, source, "denied", reason="link exhausted", what=what)
        raise LinkGone(_MESSAGES["exhausted"][1])
    if counted:  # None: this address was counted (and recorded) lately
        _record(store, "link.use", link, source, what=what)
    return store, link, False


# -- the landing page and the PIN -------------------------------------------------------------
@router.get("/share/{secret}")
async def landing(request: Request, secret: str) -> Response:
    return await run_in_threadpool(_landing, request, secret)


def _page_link(request: Request, secret: str, what: str, allow_exhausted: bool
               ) -> tuple[LinkStore, Link, str | None] | HTMLResponse:
    """The link a page request names, or the page to answer instead (throttled, not
    found, or the link's state when it may not be used)."""
    store = links_of(request.app)
    source = client_of(request)
    try:
        link = _find(store, secret, source, request)
    except TooManyRequests as exc:
        return _throttled_page(exc)
    except NotFound:
        return _not_found_page()
    try:
        _refuse_state(store, link, source, what, allow_exhausted=allow_exhausted)
    except (LinkGone, LinkLocked):
        return _state_page(link.state)
    return store, link, source


def _landing(request: Request, secret: str) -> Response:
    found = _page_link(request, secret, "page", allow_exhausted=True)
    if isinstance(found, Response):
        return found
    store, link, source = found
    if store.session_valid(link, request.cookies.get(COOKIE)):
        return _viewer(secret)
    if link.state == "exhausted":
        _record(store, "link.open", link, source, "denied", reason="link exhausted",
                what="page")
        return _state_page("exhausted")
    if link.has_pin:
        return _pin_page(secret)
    if not store.count_use(link, source, "page"):
        _record(store, "link.open", link, source, "denied", reason="link exhausted",
                what="page")
        return _state_page("exhausted")
    _record(store, "link.use", link, source, what="page")
    return _with_session(_viewer(secret), store, link, secret, request)


@router.post("/share/{secret}/unlock")
async def unlock(request: Request, secret: str) -> Response:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return _page(413, "Too large", "<p>The form is too large.</p>")
    return await run_in_threadpool(_unlock, request, secret, body)


def _unlock(request: Request, secret: str, body: bytes) -> Response:
    found = _page_link(request, secret, "unlock", allow_exhausted=False)
    if isinstance(found, Response):
        return found
    store, link, source = found
    landing_url = f"/share/{secret}"
    if not link.has_pin:
        return RedirectResponse(landing_url, status_code=303, headers=_HEADERS)
    form = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    pin = (form.get("pin") or [""])[0]
    if not pin:
        return _pin_page(secret, 400, "Enter the PIN.")
    try:
        left = store.check_pin(link, pin)
    except LinkLocked:
        _record(store, "link.unlock", link, source, "denied", reason="link locked")
        return _state_page("locked")
    if left is not None:
        store.failed(source)
        _record(store, "link.unlock", link, source, "denied", reason="wrong PIN",
                attempts_left=left)
        if left == 0:
            _record(store, "link.lock", link, source, "denied", wait=True,
                    reason="too many wrong PINs")
            return _state_page("locked")
        return _pin_page(secret, 401, f"Wrong PIN. {left} attempt(s) left before the link "
                                      "locks.")
    if not store.count_use(link, source, "unlock"):
        _record(store, "link.open", link, source, "denied", reason="link exhausted",
                what="unlock")
        return _state_page("exhausted")
    _record(store, "link.use", link, source, what="unlock")
    return _with_session(RedirectResponse(landing_url, status_code=303, headers=_HEADERS),
                         store, link, secret, request)


# -- what the link covers ----------------------------------------------------------------------
def _value(ds: dict[str, Any], tag: str) -> Any:
    values = ds.get(tag, {}).get("Value") or []
    if not values:
        return None
    first = values[0]
    if isinstance(first, dict):  # a person name
        return first.get("Alphabetic")
    return first


def _values(ds: dict[str, Any], tag: str) -> list[Any]:
    return list(ds.get(tag, {}).get("Value") or [])


def covered_studies(access: Access, who: Principal, study_uid: str | None = None
                    ) -> list[dict[str, Any]]:
    """The studies the caller sees (all, or the one named), with their series, as the
    viewer's info.json lists them (QIDO through Access: what the caller may see only)."""
    params = [("includefield", "StudyDescription")]
    if study_uid is not None:
        params.append(("StudyInstanceUID", study_uid))
    study_query = parse_qido(Level.STUDY, params)
    out = []
    for st in access.search(who, study_query):
        uid = _value(st, "0020000D")
        series_query = parse_qido(Level.SERIES, [
            ("includefield", "SeriesDescription,SeriesNumber,NumberOfSeriesRelatedInstances")])
        series = access.search(who, series_query, study_uid=uid, audit=False)
        series.sort(key=lambda se: (_value(se, "00200011") is None,
                                    _value(se, "00200011") or 0, _value(se, "0020000E")))
        out.append({"study_uid": uid, "study_date": _value(st, "00080020"),
                    "study_description": _value(st, "00081030"),
                    "patient_name": _value(st, "00100010"),
                    "patient_id": _value(st, "00100020"),
                    "modalities": _values(st, "00080061"),
                    "series": [{"series_uid": _value(se, "0020000E"),
                                "modality": _value(se, "00080060"),
                                "series_number": _value(se, "00200011"),
                                "series_description": _value(se, "0008103E"),
                                "instances": _value(se, "00201209")} for se in series]})
    out.sort(key=lambda st: (st["study_date"] or "", st["study_uid"]))
    return out


@router.get("/share/{secret}/info.json")
async def info(request: Request, secret: str) -> Response:
    return await run_in_threadpool(_info, request, secret)


def _info(request: Request, secret: str) -> Response:
    store, link, _ = authorize(request, secret, "info")
    who = store.principal(link, client_of(request))
    root = f"/share/{secret}/dicomweb"
    if link.deidentified:
        view = deid_views_of(request.app).view(link, who)
        shown = deid_view.summary(view, root)
        return JSONResponse({
            "label": link.label, "expires_at": link.as_json()["expires_at"],
            "permissions": list(link.permissions), "deidentified": True,
            "download_url": f"/share/{secret}/download.zip"
            if "download" in link.permissions else None,
            "dicomweb_root": root, **shown}, headers=_HEADERS)
    studies = covered_studies(request.app.state.access, who)
    for st in studies:
        for se in st["series"]:
            se["thumbnail_url"] = (f"{root}/studies/{st['study_uid']}/series/"
                                   f"{se['series_uid']}/thumbnail")
    body = {"label": link.label, "expires_at": link.as_json()["expires_at"],
            "permissions": list(link.permissions),
            "download_url": f"/share/{secret}/download.zip"
            if "download" in link.permissions else None,
            "dicomweb_root": root, "deidentified": False, "studies": studies}
    return JSONResponse(body, headers=_HEADERS)


# -- the zip download --------------------------------------------------------------------------
@router.get("/share/{secret}/download.zip")
async def download(request: Request, secret: str) -> Response:
    return await run_in_threadpool(_download, request, secret)


def _download(request: Request, secret: str) -> Response:
    store, link, in_session = authorize(request, secret, "download", count="always")
    source = client_of(request)
    if "download" not in link.permissions:
        _record(store, "link.download", link, source, "denied",
                reason="the link does not allow downloads")
        raise Forbidden("this link allows viewing only, not downloading")
    who = store.principal(link, source)
    access: Access = request.app.state.access
    archive: Archive = request.app.state.archive
    name = "".join(c for c in (link.label or "images") if c.isalnum() or c in "-_ ")[:60]
    filename = (name.strip() or "images").replace(" ", "_") + ".zip"
    headers = {**_HEADERS, "Content-Disposition": f"attachment; filename=\"{filename}\""}
    if link.deidentified:
        return _deid_download(request, store, link, who, in_session, headers)
    instances: list[StoredInstance] = []
    for st in access.search(who, parse_qido(Level.STUDY, [])):
        uid = _value(st, "0020000D")
        instances += [inst for inst, _ in access.locate(who, Action.DOWNLOAD, uid)]
    if not instances:
        raise NotFound("this link shows no images any more")
    _record(store, "link.download", link, source, instances=len(instances),
            bytes=sum(i.size for i in instances), in_session=in_session)
    return StreamingResponse(_zip_stream(archive, instances), media_type="application/zip",
                             headers=headers)


def _deid_download(request: Request, store: LinkStore, link: Link, who: Principal,
                   in_session: bool, headers: dict[str, str]) -> Response:
    """The zip of a de-identified link: files as the project's export writes them, held
    back instances left out, and a DICOMDIR of what is in it."""
    views = deid_views_of(request.app)
    view = views.view(link, who)
    if not view.served:
        raise NotFound("this link shows no images any more")
    for study in dict.fromkeys(i.original.study_uid for i in view.served):
        views.access.locate(who, Action.DOWNLOAD, study)  # still allowed now (and audited)
    _record(store, "link.download", link, client_of(request), instances=len(view.served),
            withheld=len(view.withheld), in_session=in_session)
    return StreamingResponse(_deid_zip_stream(views, view), media_type="application/zip",
                             headers=headers)


def _deid_zip_stream(views: DeidViews, view: deid_view.LinkView) -> Iterator[bytes]:
    with tempfile.TemporaryDirectory(prefix="dicomshare-zip-") as tmp:
        files: list[tuple[str, Path]] = []
        for n, item in enumerate(view.served):
            target = Path(tmp) / "files" / f"{n:06d}.dcm"
            target.parent.mkdir(parents=True, exist_ok=True)
            with views.file_of(view, item) as path:
                os.replace(path, target)
            files.append((item.sop, target))
        work = Path(tmp) / "fileset"
        ids = _file_set(((sop, pydicom.dcmread(path, stop_before_pixels=True, force=True))
                         for sop, path in files), work)
        yield from _zip_members(work / "DICOMDIR", (
            (ids[sop], path.stat().st_size, _file_chunks(path)) for sop, path in files))


def _file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            yield chunk


class _Sink:
    """A write-only stream that zipfile writes into and the response drains."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.written = 0

    def write(self, data: bytes) -> int:
        self.parts.append(bytes(data))
        self.written += len(data)
        return len(data)

    def tell(self) -> int:
        return self.written

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def take(self) -> bytes:
        out = b"".join(self.parts)
        self.parts.clear()
        return out


_RECORD_DEFAULTS: dict[str, Any] = {
    "PatientID": "UNKNOWN", "StudyDate": "19000101", "StudyTime": "000000", "StudyID": "1",
    "Modality": "OT", "SeriesNumber": 1, "InstanceNumber": 1,
}


def _headers(archive: Archive, instances: list[StoredInstance]
             ) -> Iterator[tuple[str, Dataset]]:
    for inst in instances:
        with archive.blobs.local_path(inst.blob_key) as path:
            yield inst.sop_uid, pydicom.dcmread(path, stop_before_pixels=True, force=True)


def _file_set(headers: Iterable[tuple[str, Dataset]], work: Path) -> dict[str, str]:
    """Write a DICOMDIR for the instances into ``work``; return SOP UID -> file ID (with
    '/'). The DICOMDIR is made from header-only copies: the zip carries the files' bytes."""
    from pydicom.fileset import FileSet

    fs = FileSet()
    others: dict[str, str] = {}
    for sop_uid, ds in headers:
        try:
            fs.add(ds)
            continue
        except Exception:  # noqa: BLE001 - pydicom says "no record for this" many ways
            pass
        # A record needs some Type 1 values the object lacks: the DICOMDIR gets
        # placeholders, the file itself is sent unchanged.
        for keyword, value in _RECORD_DEFAULTS.items():
            if not getattr(ds, keyword, None):
                setattr(ds, keyword, value)
        try:
            fs.add(ds)
        except Exception:  # noqa: BLE001
            # No directory record fits (an unusual SOP class): in the zip, not the DICOMDIR.
            others[sop_uid] = f"OTHER/OB{len(others):06d}"
    work.mkdir(parents=True, exist_ok=True)
    fs.write(work)
    ids = {str(fi.SOPInstanceUID): fi.FileID.replace(os.sep, "/") for fi in fs}
    return {**ids, **others}


def _zip_stream(archive: Archive, instances: list[StoredInstance]) -> Iterator[bytes]:
    """The zip, member by member: memory holds one chunk, never the archive."""
    with tempfile.TemporaryDirectory(prefix="dicomshare-zip-") as tmp:
        work = Path(tmp) / "fileset"
        ids = _file_set(_headers(archive, instances), work)
        yield from _zip_members(work / "DICOMDIR", (
            (ids[inst.sop_uid], inst.size, archive.read_chunks(inst.blob_key))
            for inst in instances))


def _zip_members(dicomdir: Path, members: Iterable[tuple[str, int, Iterable[bytes]]]
                 ) -> Iterator[bytes]:
    """A zip of the DICOMDIR and (file ID, size, chunks) members, streamed."""
    sink = _Sink()
    with zipfile.ZipFile(sink, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        zf.write(dicomdir, "DICOMDIR")
        yield sink.take()
        for file_id, size, chunks in members:
            info = zipfile.ZipInfo(file_id, date_time=(2000, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            info.file_size = size
            with zf.open(info, "w", force_zip64=size >= 2**31) as out:
                for chunk in chunks:
                    out.write(chunk)
                    yield sink.take()
    yield sink.take()


# -- the DICOMweb root of a link ---------------------------------------------------------------
def link_dicomweb(request: Request, secret: str) -> None:
    """Dependency of the DICOMweb routes under ``/share/{secret}/dicomweb``: resolve the
    link and make it the request's principal (web/app.py ``principal()`` returns it), so
    every route sees only what the link covers. Never falls back to other credentials."""
    store, link, _ = authorize(request, secret, "dicomweb")
    source = client_of(request)
    method = request.method.upper()
    if link.deidentified:  # served by _DeidentifiedRoute only: these routes show originals
        _record(store, "link.dicomweb", link, source, "denied",
                reason="a de-identified link reached the routes of the originals")
        raise NotFound("not found")
    request.state.dicomweb_root = f"/share/{secret}/dicomweb"
    if method in ("GET", "HEAD"):
        request.state.principal = store.principal(link, source)
        return
    if method != "POST":
        _record(store, "link.dicomweb", link, source, "denied",
                reason=f"{method} is not allowed through a share link")
        raise Forbidden("a share link can only read (and upload, when allowed)")
    if "upload" not in link.permissions:
        _record(store, "link.dicomweb", link, source, "denied",
                reason="the link does not allow uploads")
        raise Forbidden("this link does not allow uploads")
    study = request.path_params.get("study")
    if not study:
        _record(store, "link.dicomweb", link, source, "denied",
                reason="upload without a study")
        raise InvalidInput("upload into one study of the link: POST "
                           ".../dicomweb/studies/{StudyInstanceUID}")
    reader = store.principal(link, source)
    access: Access = request.app.state.access
    visible = access.archive.index.locate(
        study, visibility=access.grants.visibility(reader, Action.VIEW))
    if not visible:
        _record(store, "link.dicomweb", link, source, "denied",
                reason="upload into a study the link does not cover", study=study)
        raise NotFound(f"study {study} not found")
    request.state.principal = store.principal(link, source, store=True)


# -- the DICOMweb root of a de-identified link --------------------------------------------------
_METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]


def deid_views_of(app: FastAPI) -> DeidViews:
    """The app's DeidViews (maps of de-identified links), made on first use."""
    state = app.state
    return app_service(state, "deid_views", lambda: DeidViews(state.access, state.settings))


class _DeidentifiedRoute(APIRoute):
    """Matches under ``/share/{secret}/dicomweb`` only when the secret is a de-identified
    link's, for every method and path, so the normal DICOMweb routes (mounted after this
    router) never see such a link. When it cannot tell, it matches: the handler then
    authorizes the link, and never serves originals."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(scope)
        if match is Match.NONE:
            return match, child
        secret = str(child.get("path_params", {}).get("secret", ""))
        app = scope.get("app")
        try:
            deidentified = app is not None and deid_views_of(app).is_deidentified(secret)
        except Exception:  # noqa: BLE001 - fail closed: the handler decides
            deidentified = True
        return (match, child) if deidentified else (Match.NONE, {})


async def _deid_endpoint(request: Request) -> Response:
    params = request.path_params
    return await run_in_threadpool(_deid_dicomweb, request, str(params["secret"]),
                                   str(params.get("rest", "")))


def _deid_dicomweb(request: Request, secret: str, rest: str) -> Response:
    store, link, _ = authorize(request, secret, "dicomweb")
    source = client_of(request)
    if not link.deidentified:  # cannot happen: the flag of a link never changes
        raise NotFound("not found")
    method = request.method.upper()
    if method not in ("GET", "HEAD"):
        _record(store, "link.dicomweb", link, source, "denied",
                reason=f"{method} is not allowed through a de-identified link")
        raise Forbidden("a de-identified link can only read: no uploads, no changes")
    request.state.dicomweb_root = f"/share/{secret}/dicomweb"
    who = store.principal(link, source)
    return deid_view.serve(deid_views_of(request.app), request, link, who, rest)


for _path in ("/share/{secret}/dicomweb", "/share/{secret}/dicomweb/{rest:path}"):
    router.add_api_route(_path, _deid_endpoint, methods=_METHODS, include_in_schema=False,
                         route_class_override=_DeidentifiedRoute,
                         name="deidentified_link_dicomweb")
