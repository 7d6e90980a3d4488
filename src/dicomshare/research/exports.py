"""Research exports: a cohort, de-identified with a project's key, as a dataset.

A job is a row (``export_job``); a worker thread in each server process claims queued
jobs, and jobs whose worker died (no heartbeat for a minute), and resumes them: every
finished instance is a row in ``export_item``, so a restarted job skips what is done.
Files are written under a temporary name and renamed, so an interrupted instance leaves
nothing half-written. The dataset folder holds the DICOM files by pseudonymous patient,
study and series, ``manifest.csv`` / ``manifest.json`` (pseudonymous identifiers,
modality, shifted dates, paths, SHA-256) and ``report.json`` (what the de-identification
did, and which instances were held back and why, without original identifiers). With
the zip layout the same goes into ``dataset.zip``. The map from originals to pseudonyms
stays in the database (``pseudonym``), for the organisation's admins only.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import threading
import zipfile
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom
from sqlalchemy import insert, or_, select, update
from sqlalchemy.engine import Engine

from dicomshare import clock
from dicomshare.access.grants import Grants
from dicomshare.access.identity import Identities
from dicomshare.access.policy import Action, Principal, check, visibility
from dicomshare.access.service import Access
from dicomshare.archive import Archive
from dicomshare.background import Worker
from dicomshare.errors import DicomshareError, InvalidInput, NotFound
from dicomshare.research.cohorts import CohortQuery, Member, count, members
from dicomshare.research.projects import Projects
from dicomshare.storage import schema as s

log = logging.getLogger(__name__)
_J = s.export_job
_I = s.export_item
HEARTBEAT_EVERY = 20  # instances
LAYOUTS = ("folder", "zip")
MANIFEST_FIELDS = ("patient", "study_uid", "series_uid", "sop_uid", "modality", "study_date",
                   "path", "size", "sha256")


@dataclass(frozen=True)
class Job:
    id: int
    project_id: int
    organisation_pk: int
    state: str
    query: dict[str, Any]
    options: tuple[str, ...]
    layout: str
    volumes: bool
    total: int
    exported: int
    held_back: int
    failed: int
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "project_id": self.project_id, "state": self.state,
                "query": self.query, "options": list(self.options), "layout": self.layout,
                "volumes": self.volumes,
                "total": self.total, "exported": self.exported, "held_back": self.held_back,
                "failed": self.failed, "error": self.error,
                "created_at": clock.iso(self.created_at), "started_at": clock.iso(self.started_at),
                "finished_at": clock.iso(self.finished_at)}





def _job(row: Any) -> Job:
    return Job(row.pk, row.project_pk, row.organisation_pk, row.state, json.loads(row.query),
               tuple(o for o in row.options.split(",") if o), row.layout, bool(row.volumes),
               row.total,
               row.exported, row.held_back, row.failed, row.error,
               clock.aware(row.created_at), clock.aware(row.started_at),
               clock.aware(row.finished_at))


def query_from_json(data: dict[str, Any]) -> CohortQuery:
    values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v
                              for k, v in data.items()}
    try:
        return CohortQuery(**values)
    except TypeError as exc:
        raise InvalidInput(f"invalid cohort query: {exc}") from None


class Exports:
    """Creating, listing and cancelling jobs (the API's side)."""

    def __init__(self, archive: Archive, access: Access, projects: Projects) -> None:
        self.archive = archive
        self.access = access
        self.projects = projects
        self.engine: Engine = archive.index.engine
        self.wake = threading.Event()

    def research_visibility(self, who: Principal) -> Any:
        return self.access.grants.visibility(who, Action.RESEARCH)

    def count(self, who: Principal, query: CohortQuery) -> dict[str, Any]:
        vis = self.research_visibility(who)
        counts = count(self.engine, vis, query)
        self.access.record("research.cohort", who, details={
            "query": query.as_json(), "patients": counts.patients, "studies": counts.studies,
            "instances": counts.instances})
        return counts.__dict__

    def create(self, who: Principal, project_id: int, query: CohortQuery,
               options: tuple[str, ...] | None, layout: str = "folder",
               volumes: bool = False) -> Job:
        check(who, Action.RESEARCH)
        project = self.projects.get(who, project_id)
        if layout not in LAYOUTS:
            raise InvalidInput(f"layout is folder or zip, not {layout!r}")
        chosen = tuple(options) if options is not None else project.options
        check_options(chosen)
        counts = count(self.engine, self.research_visibility(who), query)
        with self.engine.begin() as conn:
            result = conn.execute(insert(_J).values(
                project_pk=project.id, organisation_pk=project.organisation_pk,
                created_by_user_pk=who.user_pk, query=json.dumps(query.as_json()),
                options=",".join(chosen), layout=layout, volumes=volumes, state="queued",
                total=counts.instances, created_at=clock.now()))
            pk = int(result.inserted_primary_key[0])  # type: ignore[index]
        self.access.record("research.export", who, wait=True, details={
            "job": pk, "project": project.name, "query": query.as_json(),
            "options": list(chosen), "instances": counts.instances,
            "patients": counts.patients})
        self.wake.set()
        return self.get(who, pk)

    def get(self, who: Principal, job_id: int) -> Job:
        with self.engine.connect() as conn:
            row = conn.execute(select(_J).where(_J.c.pk == job_id)).first()
        if row is None or not (who.superuser or row.organisation_pk == who.organisation_pk):
            raise NotFound(f"no export {job_id}")
        return _job(row)

    def list_jobs(self, who: Principal) -> list[Job]:
        stmt = select(_J).order_by(_J.c.pk.desc()).limit(500)
        if not who.superuser:
            stmt = stmt.where(_J.c.organisation_pk == who.organisation_pk)
        with self.engine.connect() as conn:
            return [_job(r) for r in conn.execute(stmt)]

    def cancel(self, who: Principal, job_id: int) -> Job:
        check(who, Action.RESEARCH)
        self.get(who, job_id)
        with self.engine.begin() as conn:
            conn.execute(update(_J).where(_J.c.pk == job_id,
                                          _J.c.state.in_(("queued", "running")))
                         .values(state="cancelled", finished_at=clock.now()))
        self.access.record("research.export.cancel", who, details={"job": job_id})
        return self.get(who, job_id)

    def output_dir(self, job_id: int) -> Path:
        return self.archive.settings.data_dir / "exports" / str(job_id)

    def download_path(self, who: Principal, job_id: int) -> Path:
        job = self.get(who, job_id)
        check(who, Action.RESEARCH)
        if job.state != "done":
            raise NotFound(f"export {job_id} is {job.state}, not done")
        path = self.output_dir(job_id) / "dataset.zip"
        if not path.exists():
            raise NotFound(f"export {job_id} has no zip (layout {job.layout})")
        self.access.record("research.export.download", who, details={"job": job_id})
        return path


def check_options(options: tuple[str, ...]) -> None:
    from dicomshare.deid.profile import OPTIONS

    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise InvalidInput(f"unknown de-identification option {sorted(unknown)[0]!r}; "
                           f"options are {', '.join(OPTIONS)}")


class ExportWorker(Worker):
    """Runs export jobs in the background of one process, one job at a time."""

    thread_name = "export-worker"

    def __init__(self, exports: Exports, identities: Identities, grants: Grants,
                 poll_seconds: float = 2.0) -> None:
        super().__init__(poll_seconds, exports.wake)
        self.exports = exports
        self.identities = identities
        self.grants = grants

    def run_once(self) -> bool:
        """Claim one queued (or abandoned) job and run it; False when there is none."""
        engine = self.exports.engine
        now = clock.now()
        stale = timedelta(seconds=self.exports.archive.settings.export_stale_seconds)
        with engine.connect() as conn:
            candidates = conn.execute(select(_J.c.pk).where(or_(
                _J.c.state == "queued",
                (_J.c.state == "running") & (_J.c.heartbeat_at < now - stale)))
                .order_by(_J.c.pk).limit(5)).scalars().all()
        for pk in candidates:
            with engine.begin() as conn:
                claimed = conn.execute(update(_J).where(_J.c.pk == pk, or_(
                    _J.c.state == "queued",
                    (_J.c.state == "running") & (_J.c.heartbeat_at < now - stale)))
                    .values(state="running", heartbeat_at=clock.now())).rowcount
            if claimed == 1:
                self._run(pk)
                return True
        return False

    def _run(self, pk: int) -> None:
        engine = self.exports.engine
        with engine.connect() as conn:
            row = conn.execute(select(_J, s.user.c.name.label("creator"))
                               .select_from(_J.outerjoin(s.user, _J.c.created_by_user_pk
                                                         == s.user.c.pk))
                               .where(_J.c.pk == pk)).one()
        try:
            who = self.identities.principal_for_user(row.creator, kind="job")
            with engine.begin() as conn:
                conn.execute(update(_J).where(_J.c.pk == pk, _J.c.started_at.is_(None))
                             .values(started_at=clock.now()))
            done = _Run(self, pk, row, who).run()
        except DicomshareError as exc:
            self._finish(pk, "failed", exc.reason)
            return
        except Exception as exc:  # noqa: BLE001 - recorded on the job, reported in the log
            log.exception("export %d failed", pk)
            self._finish(pk, "failed", f"{type(exc).__name__}: {exc}")
            return
        if done:
            self._finish(pk, "done", None)
            self.exports.access.record("research.export.done", who, details={
                "job": pk, "output": str(self.exports.output_dir(pk))})

    def _finish(self, pk: int, state: str, error: str | None) -> None:
        with self.exports.engine.begin() as conn:
            conn.execute(update(_J).where(_J.c.pk == pk, _J.c.state == "running")
                         .values(state=state, error=error, finished_at=clock.now()))


class _Run:
    """One job's work: resumable, instance by instance."""

    def __init__(self, worker: ExportWorker, pk: int, row: Any, who: Principal) -> None:
        from dicomshare.deid.engine import Deidentifier
        from dicomshare.deid.masking import masking_hook

        self.worker = worker
        self.exports = worker.exports
        self.engine = self.exports.engine
        self.pk = pk
        self.row = row
        self.who = who
        self.query = query_from_json(json.loads(row.query))
        self.options = tuple(o for o in row.options.split(",") if o)
        settings = self.exports.archive.settings
        hook = masking_hook([Path(f) for f in settings.deid_mask_rules],
                            settings.deid_default_masks)
        self.deid = Deidentifier(self.options, self.exports.projects.key(row.project_pk),
                                 pixel_hook=hook)
        self.root = self.exports.output_dir(pk)
        self.dataset = self.root / "dataset"

    def run(self) -> bool:
        """True when finished; False when cancelled meanwhile."""
        check(self.who, Action.RESEARCH)
        vis = visibility(self.who, Action.RESEARCH, self.worker.grants.live_for(self.who))
        with self.engine.connect() as conn:
            finished = set(conn.execute(select(_I.c.sop_instance_uid)
                                        .where(_I.c.job_pk == self.pk)).scalars())
        tmp = self.root / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        since_beat = 0
        for member in members(self.engine, vis, self.query):
            if member.sop_uid in finished:
                continue
            self._one(member, tmp)
            since_beat += 1
            if since_beat >= HEARTBEAT_EVERY:
                since_beat = 0
                if not self._beat():
                    return False
        if not self._beat():
            return False
        shutil.rmtree(tmp, ignore_errors=True)
        manifest = self._write_manifest_and_report()
        if self.row.volumes and not self._write_volumes(manifest):
            return False
        if self.row.layout == "zip":
            self._zip()
        return True

    def _write_volumes(self, manifest: list[dict[str, Any]]) -> bool:
        """NIfTI volumes of the CT and MR series, in ``nifti/`` and ``volumes.json``
        (with the reasons series got none); False when the job was cancelled meanwhile."""
        from dicomshare.research.nifti import NotAVolume, series_to_nifti

        groups: dict[tuple[str, str, str], list[Path]] = defaultdict(list)
        for row in manifest:
            if row["modality"] in ("CT", "MR"):
                groups[(row["patient"], row["study_uid"], row["series_uid"])].append(
                    self.root / row["path"])
        volumes: list[dict[str, Any]] = []
        skipped: dict[str, str] = {}
        for (patient, study, series), files in sorted(groups.items()):
            out = self.root / "nifti" / (_safe(patient) or "unknown") / study / \
                f"{series}.nii.gz"
            try:
                result = series_to_nifti(files, out)
            except NotAVolume as exc:
                skipped[series] = exc.reason
                continue
            except Exception as exc:  # noqa: BLE001 - one bad series does not stop the job
                log.warning("export %d: series %s: no volume: %s", self.pk, series, exc)
                skipped[series] = f"{type(exc).__name__}: {exc}"[:300]
                continue
            if result is not None:
                volumes.append({"patient": patient, "study_uid": study, "series_uid": series,
                                **result.as_json(self.root)})
            if not self._beat():
                return False
        (self.root / "volumes.json").write_text(json.dumps(
            {"volumes": volumes, "skipped": skipped}, indent=1))
        return True

    def _beat(self) -> bool:
        """Heartbeat and counters; False when the job was cancelled."""
        with self.engine.begin() as conn:
            counts = Counter(conn.execute(select(_I.c.state).where(_I.c.job_pk == self.pk))
                             .scalars())
            done = conn.execute(update(_J).where(_J.c.pk == self.pk, _J.c.state == "running")
                                .values(heartbeat_at=clock.now(), exported=counts["exported"],
                                        held_back=counts["held"], failed=counts["failed"]))
        return done.rowcount == 1

    def _one(self, member: Member, tmp: Path) -> None:
        archive = self.exports.archive
        target = tmp / f"{member.sop_uid}.dcm"
        state, path, digest, detail = "failed", None, None, {}
        try:
            with archive.blobs.local_path(member.blob_key) as src:
                report = self.deid.deidentify_file(src, target)
            detail = _report_json(report)
            held = getattr(report, "held_back", None)
            if held:
                state = "held"
                target.unlink(missing_ok=True)
            else:
                path, digest, manifest = self._place(target, member)
                detail["manifest"] = manifest
                state = "exported"
        except Exception as exc:  # noqa: BLE001 - one bad instance does not stop the job
            log.warning("export %d: %s failed: %s", self.pk, member.sop_uid, exc)
            detail = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            target.unlink(missing_ok=True)
        with self.engine.begin() as conn:
            conn.execute(insert(_I).values(job_pk=self.pk, sop_instance_uid=member.sop_uid,
                                           state=state, path=path, sha256=digest,
                                           detail=json.dumps(detail, default=str)))
            if state == "exported":
                self._remember(conn, member, detail["manifest"])

    def _place(self, target: Path, member: Member) -> tuple[str, str, dict[str, Any]]:
        ds = pydicom.dcmread(target, stop_before_pixels=True)
        manifest: dict[str, Any] = {"patient": str(ds.get("PatientID", "")),
                    "study_uid": str(ds.StudyInstanceUID),
                    "series_uid": str(ds.SeriesInstanceUID), "sop_uid": str(ds.SOPInstanceUID),
                    "modality": str(ds.get("Modality", "")),
                    "study_date": str(ds.get("StudyDate", ""))}
        relative = Path(_safe(manifest["patient"]) or "unknown", manifest["study_uid"],
                        manifest["series_uid"], manifest["sop_uid"] + ".dcm")
        final = self.dataset / relative
        final.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with open(target, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        size = target.stat().st_size
        os.replace(target, final)
        manifest.update(path=str(Path("dataset") / relative), size=size,
                        sha256=digest.hexdigest())
        return manifest["path"], manifest["sha256"], manifest

    def _remember(self, conn: Any, member: Member, manifest: dict[str, Any]) -> None:
        """The originals behind the pseudonyms, for the organisation's admins."""
        now = clock.now()
        pairs = [("patient", f"{member.patient_id or ''}|{member.issuer_of_patient_id or ''}",
                  manifest["patient"]),
                 ("study", member.study_uid, manifest["study_uid"]),
                 ("series", member.series_uid, manifest["series_uid"]),
                 ("instance", member.sop_uid, manifest["sop_uid"])]
        p = s.pseudonym
        for kind, original, alias in pairs:
            exists = conn.execute(select(p.c.pseudonym).where(
                p.c.project_pk == self.row.project_pk, p.c.kind == kind,
                p.c.original == original[:200])).first()
            if exists is None:
                conn.execute(insert(p).values(project_pk=self.row.project_pk, kind=kind,
                                              original=original[:200], pseudonym=alias[:200],
                                              created_at=now))

    def _write_manifest_and_report(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(_I.c.state, _I.c.detail).where(_I.c.job_pk == self.pk)
                                .order_by(_I.c.path)).all()
        manifest = []
        instances = []
        held: Counter[str] = Counter()
        failed = 0
        for state, detail_text in rows:
            detail = json.loads(detail_text or "{}")
            if state == "exported":
                manifest.append(detail["manifest"])
                instances.append({k: v for k, v in detail.items() if k != "manifest"})
            elif state == "held":
                held[str(detail.get("held_back", "held back"))] += 1
            else:
                failed += 1
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "manifest.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=MANIFEST_FIELDS)
            writer.writeheader()
            writer.writerows(manifest)
        (self.root / "manifest.json").write_text(json.dumps(manifest, indent=1))
        report = {"job": self.pk, "options": list(self.options),
                  "query": self.query.as_json(), "exported": len(manifest),
                  "held_back": dict(held), "failed": failed, "instances": instances}
        (self.root / "report.json").write_text(json.dumps(report, indent=1, default=str))
        return manifest

    def _zip(self) -> None:
        partial = self.root / "dataset.zip.partial"
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name in ("manifest.csv", "manifest.json", "report.json", "volumes.json"):
                if (self.root / name).exists():
                    zf.write(self.root / name, name)
            for path in [*sorted(self.dataset.rglob("*.dcm")),
                         *sorted((self.root / "nifti").rglob("*.nii.gz"))]:
                zf.write(path, str(path.relative_to(self.root)))
        os.replace(partial, self.root / "dataset.zip")


def _report_json(report: Any) -> dict[str, Any]:
    """The engine's per-instance report, without the original identifiers."""
    if hasattr(report, "as_dict"):
        data = dict(report.as_dict())
    elif hasattr(report, "__dict__"):
        data = dict(vars(report))
    else:
        data = {}
    for key in ("input_sop_uid", "source", "output_path"):
        data.pop(key, None)
    return {k: v for k, v in data.items() if not callable(v)}


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:64]
