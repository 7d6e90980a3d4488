"""/api/patients (records, links, merges, timelines) and /api/studies/{uid}/priors.

Reading needs the search permission (study.search); linking needs a clinician or admin,
merging an admin. A record, link or merge the caller cannot see (no visible study of
each record involved) answers 404 like one that does not exist; a link never opens
studies: the timeline shows only what the caller's own organisation and grants let it see.
Fetching a remote prior runs in the request, or, with ``Prefer: respond-async`` or
``"background": true``, as a background retrieve job (dimse/jobs.py): 202 and the job.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from dicomshare.access.policy import Action, Principal, check
from dicomshare.dimse import scu
from dicomshare.dimse.aes import AERegistry, RemoteAE
from dicomshare.errors import Forbidden
from dicomshare.patients import timeline as tl
from dicomshare.patients.identity import Patients
from dicomshare.sharing.common import app_service
from dicomshare.web.app import requires
from dicomshare.web.jobs_api import JobModel, accepted, create_job, wants_async

router = APIRouter(tags=["patients"])
Reader = Annotated[Principal, Depends(requires(Action.SEARCH))]


def _patients(request: Request) -> Patients:
    state = request.app.state
    return app_service(state, "patients", lambda: Patients(state.archive.index.engine,
                                                           state.access))


class LinkBody(BaseModel):
    records: list[str] = Field(min_length=2, max_length=2,
                               description="the ids of the two records to link")
    note: str | None = Field(None, max_length=1000, description="why (the evidence)")


class MergeBody(BaseModel):
    old: str = Field(min_length=1, max_length=32, description="record id of the old PatientID")
    new: str = Field(min_length=1, max_length=32, description="record id of the new PatientID")
    reason: str | None = Field(None, max_length=1000)


class FetchBody(BaseModel):
    remote: str = Field(min_length=1, max_length=16)
    study_uid: str = Field(min_length=1, max_length=64)
    method: Literal["move", "get"] = "get"
    background: bool = Field(False, description="run as a background retrieve job: 202 and "
                             "the job (like the header Prefer: respond-async)")


@router.get("/patients")
async def find_patients(request: Request, who: Reader,
                        patient_id: Annotated[str | None, Query(max_length=64)] = None,
                        issuer: Annotated[str | None, Query(max_length=64)] = None,
                        name: Annotated[str | None, Query(max_length=64)] = None
                        ) -> list[dict[str, Any]]:
    """Patient records the caller sees, by PatientID (and issuer) or a name prefix."""
    found = await run_in_threadpool(_patients(request).find, who, patient_id, issuer, name)
    return [x.as_json() for x in found]


@router.post("/patients/sync")
async def sync(request: Request,
               who: Annotated[Principal, Depends(requires(Action.MANAGE_SITE))],
               full: bool = False) -> dict[str, int]:
    """Superusers: derive records from the studies now (``full``: re-read every study,
    e.g. after a PostgreSQL commit-order gap); requests do the incremental part anyway."""
    patients = _patients(request)
    touched = await run_in_threadpool(patients.sync, full)
    await run_in_threadpool(lambda: patients.access.record(
        "patient.sync", who, wait=True, details={"full": full, "records": touched}))
    return {"records": touched}


@router.get("/patients/links")
async def list_links(request: Request, who: Reader,
                     state: Annotated[str | None, Query(max_length=16)] = None,
                     patient: Annotated[str | None, Query(max_length=32)] = None
                     ) -> list[dict[str, Any]]:
    """Links and proposals between records the caller sees (``state=proposed``: to review)."""
    return await run_in_threadpool(_patients(request).links, who, state, patient)


@router.post("/patients/links", status_code=201)
async def link(request: Request, body: LinkBody, who: Reader) -> dict[str, Any]:
    """Link two records by hand (confirmed at once; refused on a conflict)."""
    return await run_in_threadpool(_patients(request).manual_link, who, body.records[0],
                                   body.records[1], body.note)


@router.get("/patients/links/{link_id}")
async def get_link(request: Request, link_id: int, who: Reader) -> dict[str, Any]:
    return await run_in_threadpool(_patients(request).link, who, link_id)


@router.post("/patients/links/{link_id}/{decision}")
async def decide(request: Request, link_id: int,
                 decision: Literal["confirm", "reject", "unlink"],
                 who: Reader) -> dict[str, Any]:
    """Confirm or reject a proposal; unlink a confirmed link (the view before it returns)."""
    return await run_in_threadpool(_patients(request).decide, who, link_id, decision)


@router.post("/patients/merges", status_code=201)
async def merge(request: Request, body: MergeBody, who: Reader) -> dict[str, Any]:
    """ADT A40/A47: show the old PatientID's studies under the new one (same issuer)."""
    return await run_in_threadpool(_patients(request).merge, who, body.old, body.new,
                                   body.reason)


@router.get("/patients/merges/{merge_id}")
async def get_merge(request: Request, merge_id: int, who: Reader) -> dict[str, Any]:
    return await run_in_threadpool(_patients(request).merge_json, who, merge_id)


@router.post("/patients/merges/{merge_id}/undo")
async def undo_merge(request: Request, merge_id: int, who: Reader) -> dict[str, Any]:
    return await run_in_threadpool(_patients(request).undo_merge, who, merge_id)


@router.get("/patients/{ref}")
async def get_patient(request: Request, ref: str, who: Reader) -> dict[str, Any]:
    """A record and the records linked to it (those the caller sees)."""
    return await run_in_threadpool(_patients(request).describe, who, ref)


@router.get("/patients/{ref}/timeline")
async def get_timeline(request: Request, ref: str, who: Reader,
                       modality: Annotated[list[str] | None, Query()] = None,
                       date_from: Annotated[str | None, Query(alias="from")] = None,
                       date_to: Annotated[str | None, Query(alias="to")] = None
                       ) -> dict[str, Any]:
    """Every visible study of the linked person, oldest first."""
    filters = tl.Filters.parse(modality, date_from, date_to)
    return await run_in_threadpool(tl.timeline, _patients(request), who, ref, filters)


def _peers(request: Request, who: Principal, remote: list[str] | None) -> list[RemoteAE]:
    if not remote:
        return []
    try:
        check(who, Action.REMOTE)
    except Forbidden as exc:
        request.app.state.access.record(str(Action.REMOTE), who, "denied",
                                        details={"reason": exc.reason})
        raise
    registry = AERegistry(request.app.state.archive.index.engine)
    if remote == ["*"]:
        return registry.all(None if who.superuser else who.organisation_pk)
    return [registry.usable_by(who, title) for title in dict.fromkeys(remote)]


@router.get("/studies/{uid}/priors")
async def get_priors(request: Request, uid: str, who: Reader,
                     remote: Annotated[list[str] | None, Query(max_length=16)] = None
                     ) -> dict[str, Any]:
    """Earlier studies of the same person sharing a modality or body part; with
    ``remote=TITLE`` (repeatable, or ``*`` for every peer of the caller's organisation)
    also the studies those peers answer to a C-FIND on the person's PatientIDs."""
    peers = await run_in_threadpool(_peers, request, who, remote)
    return await run_in_threadpool(tl.priors, _patients(request), who, uid,
                                   request.app.state.settings, peers)


@router.post("/studies/{uid}/priors/fetch", response_model=dict[str, Any], responses={
    202: {"model": JobModel, "description": "with `Prefer: respond-async` or `\"background\": "
          "true`: the retrieve job, started (Location: /api/jobs/{id}); its `result` is "
          "the report of `POST /api/remote-aes/{title}/retrieve`"}})
async def fetch_prior(request: Request, uid: str, body: FetchBody,
                      who: Reader) -> dict[str, Any] | Response:
    """Retrieve one remote prior into this archive (C-GET, or C-MOVE to our AE title);
    what arrives belongs to the caller's organisation. Asynchronously (the same checks
    first): 202 and a retrieve job (``GET /api/jobs/{id}`` for its progress)."""
    patients = _patients(request)
    state = request.app.state

    def checked() -> RemoteAE:
        vis = patients.visibility(who)
        with patients.engine.connect() as conn:
            tl.current_study(patients, conn, vis, uid)  # 404 unless visible
        peer = _peers(request, who, [body.remote])[0]
        state.access.store_access(who)
        return peer

    if wants_async(request, body.background):
        peer = await run_in_threadpool(checked)
        job = await create_job(request, who, "retrieve", peer.ae_title, [body.study_uid],
                               body.method)
        # The job records job.created and, when done, remote.retrieve with its outcome;
        # this records what the synchronous route does: which study the prior is for.
        await run_in_threadpool(lambda: state.access.record(
            "patient.priors.fetch", who, wait=True, study_uids=[uid, body.study_uid],
            details={"remote": peer.ae_title, "method": body.method, "job": job.id}))
        return accepted(request, job)

    def run() -> dict[str, Any]:
        peer = checked()
        reports = scu.retrieve(state.archive, state.settings, peer, [body.study_uid],
                               body.method, who, state.access)
        state.access.record("patient.priors.fetch", who, wait=True,
                            study_uids=[uid, body.study_uid],
                            details={"remote": peer.ae_title, "method": body.method,
                                     "outcome": reports[0].outcome})
        rep = reports[0]
        return {"study_uid": rep.study_uid, "remote": peer.ae_title, "method": body.method,
                "outcome": rep.outcome, "status": rep.status, "comment": rep.comment,
                "completed": rep.completed, "failed": rep.failed, "stored": rep.stored,
                "already_present": rep.already_present}

    return await run_in_threadpool(run)
