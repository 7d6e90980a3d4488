"""JSON API for background DICOM transfers (dimse/jobs.py), under ``/api/jobs``.

``POST /api/send`` and ``POST /api/remote-aes/{title}/retrieve`` (web/api.py) start a job
instead of transferring inside the request when asked to (``Prefer: respond-async``,
RFC 7240, or ``"background": true``): 202 with ``Location: /api/jobs/{id}``. Here the
caller lists and reads its jobs (an organisation's admins its organisation's, superusers
all), cancels a queued or running one, and retries a failed, cancelled or interrupted one
as a new job. A job the caller may not see answers 404, like one that does not exist.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from dicomshare.access.identity import Principal
from dicomshare.access.policy import Action
from dicomshare.dicom.matching import int_param
from dicomshare.dimse.jobs import Job, TransferJobs
from dicomshare.errors import NotFound
from dicomshare.web.app import principal, requires

router = APIRouter(tags=["DICOM transfer jobs"])

Caller = Annotated[Principal, Depends(principal)]
RemoteUser = Annotated[Principal, Depends(requires(Action.REMOTE))]
MAX_LIMIT = 500
MAX_OFFSET = 1_000_000


class JobProgressModel(BaseModel):
    total: int | None = Field(description="instances to transfer, once known")
    completed: int
    failed: int
    warning: int


class JobModel(BaseModel):
    id: int
    kind: Literal["send", "retrieve"]
    state: Literal["queued", "running", "succeeded", "failed", "cancelled", "interrupted"]
    ae_title: str = Field(description="the peer: destination (send) or source (retrieve)")
    study_uids: list[str]
    method: Literal["move", "get"] | None = Field(description="retrieve only")
    owner: str | None = Field(description="the user it runs as")
    retry_of: int | None = Field(description="the job this one retries")
    created_at: str
    started_at: str | None
    finished_at: str | None
    progress: JobProgressModel
    error: str | None = Field(description="why it failed, was cancelled or interrupted")
    result: dict[str, Any] | None = Field(
        description="once finished: the report the synchronous route returns (SendResponse "
        "or RetrieveResponse)")


def _jobs(request: Request) -> TransferJobs:
    worker = getattr(request.app.state, "transfers", None)
    if worker is not None:
        return worker.jobs
    return TransferJobs(request.app.state.archive, request.app.state.access)


def wants_async(request: Request, background: bool) -> bool:
    """``"background": true``, or RFC 7240 ``Prefer: respond-async`` (any header, any
    position, parameters ignored)."""
    if background:
        return True
    for header in request.headers.getlist("prefer"):
        for preference in header.split(","):
            if preference.split(";")[0].split("=")[0].strip().lower() == "respond-async":
                return True
    return False


def _job_response(request: Request, job: Job, status: int) -> JSONResponse:
    headers = {"Location": f"/api/jobs/{job.id}"}
    if status == 202 and wants_async(request, False):
        headers["Preference-Applied"] = "respond-async"
    return JSONResponse(job.as_json(), status_code=status, headers=headers)


async def create_job(request: Request, who: Principal, kind: str, ae_title: str,
                     study_uids: list[str], method: str | None = None) -> Job:
    """The route's checks, then a queued job."""
    return await run_in_threadpool(_jobs(request).create, who, kind, ae_title, study_uids,
                                   method)


def accepted(request: Request, job: Job) -> JSONResponse:
    """202 with the job and its Location."""
    return _job_response(request, job, 202)


async def start_job(request: Request, who: Principal, kind: str, ae_title: str,
                    study_uids: list[str], method: str | None = None) -> JSONResponse:
    """The route's checks, a queued job, and 202 with its Location (web/api.py)."""
    return accepted(request, await create_job(request, who, kind, ae_title, study_uids,
                                              method))


def _job_id(raw: str) -> int:
    if not re.fullmatch(r"\d{1,9}", raw):  # anything else names no job (and fits no column)
        raise NotFound(f"no job {raw[:40]!r}")
    return int(raw)


@router.get("/jobs", response_model=list[JobModel])
async def list_jobs(request: Request, who: Caller, limit: str = "100",
                    offset: str = "0") -> list[dict[str, Any]]:
    """The caller's jobs, newest first (an organisation's admins: its jobs; superusers:
    all); ``limit`` 1-500 (100), ``offset``."""
    count = int_param("limit", limit, 1, MAX_LIMIT)
    skip = int_param("offset", offset, 0, MAX_OFFSET)
    jobs = await run_in_threadpool(_jobs(request).list_jobs, who, count, skip)
    return [job.as_json() for job in jobs]


@router.get("/jobs/{job_id}", response_model=JobModel)
async def get_job(request: Request, job_id: str, who: Caller) -> dict[str, Any]:
    """One job with its progress, and its report once finished."""
    job = await run_in_threadpool(_jobs(request).get, who, _job_id(job_id))
    return job.as_json()


@router.post("/jobs/{job_id}/cancel", response_model=JobModel)
async def cancel_job(request: Request, job_id: str, who: RemoteUser) -> dict[str, Any]:
    """Queued or running -> cancelled: a running send stops between instances, a running
    retrieve sends C-CANCEL. 409 when the job has finished already."""
    job = await run_in_threadpool(_jobs(request).cancel, who, _job_id(job_id))
    return job.as_json()


@router.post("/jobs/{job_id}/retry", response_model=JobModel, status_code=201)
async def retry_job(request: Request, job_id: str, who: RemoteUser) -> JSONResponse:
    """A failed, cancelled or interrupted job queued again as a new job of the caller's
    (201, Location), after the same checks as a new one; 409 for other states."""
    job = await run_in_threadpool(_jobs(request).retry, who, _job_id(job_id))
    return _job_response(request, job, 201)
