"""JSON API for research: projects, opt-outs, cohort counts and de-identified exports.

Researchers and admins (role with ``research.export``) count cohorts and export them
de-identified, within their organisation's data and grants with the ``research``
permission; clinicians and admins record opt-outs; only admins read a project's
pseudonym map. Jobs run in the background: ``POST /api/exports`` answers 202 with the
job, ``GET /api/exports/{id}`` shows its progress.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from dicomshare.access.policy import Action, Principal
from dicomshare.research.cohorts import CohortQuery
from dicomshare.research.exports import Exports, check_options
from dicomshare.research.projects import DEFAULT_OPTIONS, Projects
from dicomshare.storage import schema as s
from dicomshare.web.app import requires

router = APIRouter(tags=["research"])





Researcher = Annotated[Principal, Depends(requires(Action.RESEARCH))]
Sharer = Annotated[Principal, Depends(requires(Action.SHARE))]
Manager = Annotated[Principal, Depends(requires(Action.MANAGE_ORGANISATION))]


def _exports(request: Request) -> Exports:
    return request.app.state.exports


def _projects(request: Request) -> Projects:
    return request.app.state.exports.projects


class CohortModel(BaseModel):
    modalities: list[str] = Field(default_factory=list, max_length=50)
    body_parts: list[str] = Field(default_factory=list, max_length=50)
    study_date_from: str | None = Field(None, pattern=r"^\d{8}$")
    study_date_to: str | None = Field(None, pattern=r"^\d{8}$")
    age_min: int | None = Field(None, ge=0, le=150)
    age_max: int | None = Field(None, ge=0, le=150)
    sexes: list[Literal["M", "F", "O"]] = Field(default_factory=list)
    description: str | None = Field(None, max_length=200)
    sop_classes: list[str] = Field(default_factory=list, max_length=50)
    organisations: list[str] = Field(default_factory=list, max_length=50,
                                     description="owning organisations (names)")

    def query(self, request: Request) -> CohortQuery:
        orgs = ()
        if self.organisations:
            names = {o.name: o.id for o in request.app.state.identities.organisations()}
            orgs = tuple(names.get(n, -1) for n in self.organisations)
        return CohortQuery(tuple(self.modalities), tuple(self.body_parts), self.study_date_from,
                           self.study_date_to, self.age_min, self.age_max, tuple(self.sexes),
                           self.description, tuple(self.sop_classes), orgs)


class ProjectCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    description: str | None = Field(None, max_length=2000)
    options: list[str] | None = Field(None, max_length=20, description="default options "
                                      "of its exports (PS3.15 profile options)")


class ExportCreate(BaseModel):
    project_id: int
    cohort: CohortModel = Field(default_factory=lambda: CohortModel.model_validate({}))
    options: list[str] | None = Field(None, max_length=20,
                                      description="default: the project's")
    layout: Literal["folder", "zip"] = "zip"
    volumes: bool = Field(False, description="also NIfTI volumes of the CT and MR series "
                          "(nifti/<patient>/<study>/<series>.nii.gz, listed in volumes.json)")


class OptOut(BaseModel):
    patient_id: str = Field(min_length=1, max_length=64)
    issuer_of_patient_id: str = Field("", max_length=64)
    reason: str | None = Field(None, max_length=1000)


@router.post("/research/cohorts/count")
async def count_cohort(request: Request, body: CohortModel,
                       who: Researcher) -> dict[str, Any]:
    """How many patients, studies, series and instances a cohort holds (nothing exported)."""
    return await run_in_threadpool(_exports(request).count, who, body.query(request))


@router.get("/research/projects")
async def list_projects(request: Request, who: Researcher) -> list[dict[str, Any]]:
    found = await run_in_threadpool(_projects(request).list_projects, who)
    return [p.as_json() for p in found]


@router.post("/research/projects", status_code=201)
async def create_project(request: Request, body: ProjectCreate,
                         who: Researcher) -> dict[str, Any]:
    options = tuple(body.options) if body.options is not None else DEFAULT_OPTIONS
    check_options(options)
    project = await run_in_threadpool(_projects(request).create, who, body.name,
                                      body.description, options)
    request.app.state.access.record("research.project.create", who,
                                    details=project.as_json())
    return project.as_json()


@router.get("/research/projects/{project_id}/pseudonyms")
async def pseudonyms(request: Request, project_id: int, who: Manager,
                     kind: Literal["patient", "study", "series", "instance"] = "patient"
                     ) -> list[dict[str, str]]:
    """Originals behind a project's pseudonyms (the organisation's admins only)."""
    await run_in_threadpool(_projects(request).get, who, project_id)
    p = s.pseudonym

    def read() -> list[dict[str, str]]:
        with request.app.state.archive.index.engine.connect() as conn:
            rows = conn.execute(select(p.c.original, p.c.pseudonym).where(
                p.c.project_pk == project_id, p.c.kind == kind).order_by(p.c.pseudonym)
                .limit(100_000)).all()
        return [{"original": o, "pseudonym": a} for o, a in rows]

    found = await run_in_threadpool(read)
    request.app.state.access.record("research.pseudonyms.read", who, wait=False, details={
        "project": project_id, "kind": kind, "rows": len(found)})
    return found


@router.get("/research/optouts")
async def list_optouts(request: Request, who: Sharer) -> list[dict[str, Any]]:
    return await run_in_threadpool(_projects(request).opt_outs, who)


@router.post("/research/optouts", status_code=204)
async def opt_out(request: Request, body: OptOut, who: Sharer) -> Response:
    await run_in_threadpool(_projects(request).opt_out, who, body.patient_id,
                            body.issuer_of_patient_id, body.reason)
    request.app.state.access.record("research.optout", who, patient_ids=[body.patient_id])
    return Response(status_code=204)


@router.delete("/research/optouts/{patient_id}", status_code=204)
async def opt_in(request: Request, patient_id: str, who: Sharer, issuer: str = "") -> Response:
    await run_in_threadpool(_projects(request).opt_in, who, patient_id, issuer)
    request.app.state.access.record("research.optin", who, patient_ids=[patient_id])
    return Response(status_code=204)


@router.post("/exports", status_code=202)
async def create_export(request: Request, body: ExportCreate,
                        who: Researcher) -> dict[str, Any]:
    job = await run_in_threadpool(
        _exports(request).create, who, body.project_id, body.cohort.query(request),
        tuple(body.options) if body.options is not None else None, body.layout, body.volumes)
    return job.as_json()


@router.get("/exports")
async def list_exports(request: Request, who: Researcher) -> list[dict[str, Any]]:
    return [j.as_json() for j in await run_in_threadpool(_exports(request).list_jobs, who)]


@router.get("/exports/{job_id}")
async def export_status(request: Request, job_id: int, who: Researcher) -> dict[str, Any]:
    return (await run_in_threadpool(_exports(request).get, who, job_id)).as_json()


@router.delete("/exports/{job_id}")
async def cancel_export(request: Request, job_id: int, who: Researcher) -> dict[str, Any]:
    return (await run_in_threadpool(_exports(request).cancel, who, job_id)).as_json()


@router.get("/exports/{job_id}/download")
async def download_export(request: Request, job_id: int, who: Researcher) -> FileResponse:
    path = await run_in_threadpool(_exports(request).download_path, who, job_id)
    return FileResponse(path, media_type="application/zip",
                        filename=f"export-{job_id}.zip")
