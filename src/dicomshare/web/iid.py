"""IHE Invoke Image Display (IID, ITI TF / RAD-106): an EHR opens our viewer with a URL.

``GET /IHEInvokeImageDisplay?requestType=STUDY&studyUID=<uid>[,<uid>...]`` opens the
viewer (``/app/view/<uid>``) on the first of the studies the caller may see;
``requestType=PATIENT&patientID=<id>[^^^<issuer>]`` (or ``&issuerOfPatientID=``) opens
the patient page (``/app/patients/<FHIR Patient id>``, served here as well). A caller
without a session is sent to the login page, which comes back here afterwards. See
docs/fhir.md.
"""

from __future__ import annotations

import html
from pathlib import Path
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from dicomshare.access.policy import Principal
from dicomshare.dicom.attributes import Level, is_valid_uid
from dicomshare.dicom.matching import parse_qido
from dicomshare.errors import DicomshareError, InvalidInput, NotFound, Unauthenticated
from dicomshare.fhir import resources as res
from dicomshare.fhir.ids import PatientKey, patient_ids_of, study_patient_key
from dicomshare.web.app import principal
from dicomshare.web.pages import HEADERS

router = APIRouter(include_in_schema=False)
STATIC = Path(__file__).parent / "static" / "app"
REQUEST_TYPES = ("STUDY", "PATIENT")
MAX_STUDIES = 100


def _page(status: int, title: str, text: str) -> HTMLResponse:
    body = (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title></head><body><h1>{html.escape(title)}</h1>"
            f"<p data-testid=\"reason\">{html.escape(text)}</p>"
            f"<p><a href=\"/app/\">dicomshare</a></p></body></html>")
    return HTMLResponse(body, status_code=status, headers=HEADERS)


def _redirect(location: str) -> Response:
    return RedirectResponse(location, status_code=303, headers={"Cache-Control": "no-store"})


@router.get("/IHEInvokeImageDisplay")
async def invoke_image_display(request: Request) -> Response:
    params = request.query_params
    kind = (params.get("requestType") or "").upper()
    if kind not in REQUEST_TYPES:
        shown = (params.get("requestType") or "")[:40]
        return _page(400, "Unsupported request",
                     f"requestType {shown!r} is not supported; use STUDY or PATIENT.")
    try:
        who = principal(request)
    except Unauthenticated:
        here = request.url.path + ("?" + request.url.query if request.url.query else "")
        return _redirect("/app/login?next=" + quote(here, safe=""))
    try:
        if kind == "STUDY":
            target = await run_in_threadpool(_study_target, request, who)
        else:
            target = await run_in_threadpool(_patient_target, request, who)
    except DicomshareError as exc:
        return _page(exc.http_status, "Cannot display the images", exc.reason)
    return _redirect(target)


def _study_target(request: Request, who: Principal) -> str:
    uids: list[str] = []
    for raw in request.query_params.getlist("studyUID"):
        uids += [u.strip() for u in raw.split(",") if u.strip()]
    if not uids:
        raise InvalidInput("requestType=STUDY needs studyUID")
    if len(uids) > MAX_STUDIES:
        raise InvalidInput(f"at most {MAX_STUDIES} studyUID values")
    for uid in uids:
        if not is_valid_uid(uid):
            raise InvalidInput(f"studyUID {uid[:80]!r} is not a valid DICOM UID")
    query = parse_qido(Level.STUDY, [("StudyInstanceUID", ",".join(uids))])
    visible = {res.value(st, "0020000D") for st in request.app.state.access.search(who, query)}
    # The first one the caller may see; none: the first (the viewer then says not found).
    first = next((u for u in uids if u in visible), uids[0])
    return f"/app/view/{first}"


def parse_patient_id(raw: str, issuer: str | None) -> tuple[str, str | None]:
    """``id^^^issuer`` (HL7 CX; the assigning authority may be ``ns&uid&type``)."""
    pid, _, rest = raw.partition("^")
    parts = rest.split("^")
    authority = parts[2] if len(parts) >= 3 else ""
    if authority:
        hd = authority.split("&")
        authority = hd[0] or (hd[1] if len(hd) > 1 else "")
    pid = pid.strip()
    if not pid or len(pid) > 64:
        raise InvalidInput("patientID must be a PatientID of 1 to 64 characters")
    found = (issuer or "").strip() or authority.strip() or None
    return pid, found


def _patient_target(request: Request, who: Principal) -> str:
    raw = request.query_params.get("patientID")
    if not raw:
        raise InvalidInput("requestType=PATIENT needs patientID")
    pid, issuer = parse_patient_id(raw, request.query_params.get("issuerOfPatientID"))
    params = [("PatientID", pid), ("includefield", "IssuerOfPatientID"), ("limit", "1000")]
    if issuer:
        params.append(("IssuerOfPatientID", issuer))
    studies = request.app.state.access.search(who, parse_qido(Level.STUDY, params))
    index = request.app.state.access.archive.index
    keys: list[PatientKey] = []
    for st in studies:
        if res.value(st, "00100020") != pid:
            continue  # wildcard characters in the PatientID widened the match
        keys.append(study_patient_key(st, index))
    if not keys:
        raise NotFound("no patient with this ID among the studies you may see")
    # Without an issuer asked for: an organisation-qualified patient of the caller's own
    # organisation first, then other organisation-qualified ones, then issuer-qualified.
    keys.sort(key=lambda k: (k.issuer is not None,
                             k.organisation_pk != who.organisation_pk, k.qualifier))
    return f"/app/patients/{patient_ids_of(request.app).encode(keys[0])}"


@router.get("/app/patients/{patient_id}")
def patient_page(patient_id: str) -> Response:
    """The patient's studies (a static shell; patient.js asks /fhir with the session)."""
    return FileResponse(STATIC / "patient.html", media_type="text/html; charset=utf-8",
                        headers=HEADERS)
