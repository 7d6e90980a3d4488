"""The signed-in browser pages: login, home (notifications), share links, upload links,
inbox and consults, a patient's timeline and the side-by-side comparison (``/app/...``).
See docs/web-ui.md.

Each page is a static HTML shell from ``static/app``; its script fetches everything else
from the JSON API with the session cookie (and ``X-CSRF-Token`` on unsafe requests), so no
patient data is ever in the HTML. The shells go out with a Content-Security-Policy that
allows only this site's own scripts (no inline script, no ``eval``), forbids framing and
sends no referrer; the scripts write server data into the page as text only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from dicomshare.access.policy import Action
from dicomshare.dicom.attributes import check_uid
from dicomshare.errors import NotFound
from dicomshare.web.app import require
from dicomshare.web.share import VIEWER, covered_studies

router = APIRouter(include_in_schema=False)
STATIC = Path(__file__).parent / "static" / "app"
# The page name in the URL -> its shell. The consult detail, timeline (/app/timeline/{id})
# and comparison pages read their ids from the URL.
PAGES = {"": "home.html", "login": "login.html", "links": "links.html",
         "uploads": "uploads.html", "inbox": "inbox.html", "consults": "consults.html",
         "timeline": "timeline.html"}
SHELLS = frozenset({*PAGES.values(), "consult.html", "compare.html"})
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}
# The viewer may be framed by this site's own pages (the comparison page shows two), and
# the comparison page may frame this site's pages; nothing else changes.
VIEWER_HEADERS = {**HEADERS, "X-Frame-Options": "SAMEORIGIN",
                  "Content-Security-Policy": CSP.replace("frame-ancestors 'none'",
                                                         "frame-ancestors 'self'")}
COMPARE_HEADERS = {**HEADERS, "Content-Security-Policy": CSP + "; frame-src 'self'"}


def _shell(name: str) -> Response:
    return FileResponse(STATIC / name, media_type="text/html; charset=utf-8",
                        headers=COMPARE_HEADERS if name == "compare.html" else HEADERS)


@router.get("/")
def root() -> Response:
    return RedirectResponse("/app/", status_code=303, headers={"Cache-Control": "no-store"})


@router.get("/app")
def app_root() -> Response:
    return RedirectResponse("/app/", status_code=308)


@router.get("/app/")
def home() -> Response:
    return _shell("home.html")


@router.get("/app/config.json")
def config(request: Request) -> dict[str, Any]:
    """What the pages need to know about this server (nothing secret): whether OpenID
    Connect login is offered and where the DICOMweb root is."""
    settings = request.app.state.settings
    return {"oidc": bool(settings.oidc_issuer), "dicomweb_root": settings.dicomweb_root}


@router.get("/app/consults/{consult_id}")
def consult_page(consult_id: int) -> Response:
    """The consult detail shell; the page asks /api/consults/{id} (404 for non-parties)."""
    return _shell("consult.html")


@router.get("/app/timeline/{patient}")
def timeline_page(patient: str) -> Response:
    """A person's studies in time order; timeline.js asks /api/patients/{id}/timeline
    (404 for a record the caller does not see)."""
    return _shell("timeline.html")


@router.get("/app/compare/{study}/{prior}")
def compare_page(study: str, prior: str) -> Response:
    """Two viewers side by side (same-origin frames of /app/view/...), scrolling in sync."""
    check_uid(study, "StudyInstanceUID")
    check_uid(prior, "StudyInstanceUID")
    return _shell("compare.html")


@router.get("/app/{page}")
def page(page: str) -> Response:
    name = PAGES.get(page)
    if name is None:
        raise NotFound(f"there is no page {page[:100]!r}")
    return _shell(name)


@router.get("/static/app/{name}")
def static_shell(name: str) -> Response:
    """The shells under their static path, with the same headers (this route is matched
    before the /static mount); scripts and styles come from the mount."""
    if name in SHELLS:
        return _shell(name)
    path = STATIC / name
    if "/" in name or name.startswith(".") or not path.is_file():
        raise NotFound(f"no file {name[:100]!r}")
    return FileResponse(path, headers={"X-Content-Type-Options": "nosniff",
                                       "Cache-Control": "no-cache"})


# -- the viewer for signed-in users -----------------------------------------------------------
# The share links' viewer, on the normal DICOMweb root with the session cookie: a specialist
# looks at a consult's studies, a clinician at a study in the inbox, with the same viewer.
@router.get("/app/view/{study}")
def viewer(study: str) -> Response:
    check_uid(study, "StudyInstanceUID")
    return FileResponse(VIEWER, media_type="text/html; charset=utf-8",
                        headers=VIEWER_HEADERS)


@router.get("/app/view/{study}/info.json")
async def viewer_info(request: Request, study: str) -> Response:
    check_uid(study, "StudyInstanceUID")
    who = require(request, Action.VIEW)
    studies = await run_in_threadpool(covered_studies, request.app.state.access, who, study)
    if not studies:
        raise NotFound(f"study {study} not found")
    root = request.app.state.settings.dicomweb_root
    for st in studies:
        for se in st["series"]:
            se["thumbnail_url"] = (f"{root}/studies/{st['study_uid']}/series/"
                                   f"{se['series_uid']}/thumbnail")
    return JSONResponse({"label": studies[0]["study_description"] or "Study",
                         "expires_at": None, "permissions": ["view"], "download_url": None,
                         "dicomweb_root": root, "deidentified": False, "studies": studies},
                        headers={"Cache-Control": "no-store"})
