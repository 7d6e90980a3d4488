"""The archive: the one door for storing, finding, retrieving and deleting instances.

STOW-RS, C-STORE and ``dicomshare import`` all call :meth:`Archive.store_received`;
QIDO-RS and C-FIND call :meth:`Archive.search`; WADO-RS, C-GET and C-MOVE call
:meth:`Archive.locate`. The rules below therefore hold for every way in:

- Validate before acknowledging: the bytes must parse, and carry valid SOP Class, SOP
  Instance, Study and Series UIDs. The received bytes are stored unchanged.
- Durable before acknowledged: blob fsynced and renamed into place, then the index
  committed, then success. A crash in between leaves at most an unindexed blob, which
  ``check`` finds and re-indexes.
- Same SOP Instance UID again: identical bytes are a no-op success; different bytes are
  refused (the first object is kept; the caller gets a 0x0111 "duplicate" failure). To
  replace an instance, delete it first.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from dicomshare.access.policy import EVERYTHING, Visibility
from dicomshare.config import Settings
from dicomshare.dicom.header import Header, read_header
from dicomshare.dicom.matching import Query
from dicomshare.errors import (
    DicomshareError,
    DuplicateConflict,
    Forbidden,
    NotFound,
    StorageFailure,
    StudyMismatch,
)
from dicomshare.storage import make_engine, migrate, open_blobs, open_index
from dicomshare.storage.base import InstanceRecord, Outcome, StoredInstance, TempBlob
from dicomshare.storage.filesystem import FilesystemBlobStore
from dicomshare.storage.groupcommit import GroupCommit
from dicomshare.storage.sql import SqlIndex

log = logging.getLogger(__name__)
CHUNK = 1 << 20


@dataclass
class StoreResult:
    """The fate of one received object, as every adapter reports it."""

    sop_class_uid: str | None = None
    sop_uid: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    outcome: Outcome | None = None
    error: DicomshareError | None = None
    patient_id: str | None = None
    issuer_of_patient_id: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class CheckReport:
    checked: int = 0
    missing: list[StoredInstance] = field(default_factory=list)
    corrupt: list[StoredInstance] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    leftovers: list[Path] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.missing or self.corrupt or self.orphans or self.leftovers)


class Archive:
    def __init__(self, settings: Settings, index: SqlIndex, blobs: FilesystemBlobStore) -> None:
        self.settings = settings
        self.index = index
        self.blobs = blobs
        self._commits = GroupCommit(index)

    @classmethod
    def open(cls, settings: Settings) -> Archive:
        """Open (initialising or upgrading on first use) the archive the settings name."""
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = make_engine(settings.resolved_database_url, durable=settings.fsync)
        migrate(engine)
        return cls(settings, open_index(engine), open_blobs(settings.blob_dir, settings.fsync))

    def close(self) -> None:
        self.index.engine.dispose()

    # -- store -----------------------------------------------------------------------------
    def new_temp(self) -> TempBlob:
        return self.blobs.new_temp()

    def store_received(self, temps: Iterable[TempBlob], study_uid: str | None = None,
                       check: Callable[[Header], None] | None = None,
                       owner: int | None = None, store_access: Visibility | None = None
                       ) -> list[StoreResult]:
        """Validate, make durable and index received blobs; one result per blob, in order.

        ``study_uid`` is set for STOW-RS ``POST /studies/{study}``: other studies are refused.
        ``check`` is an adapter's own rule (C-STORE: the data set is the SOP Instance the
        request names); it raises a DicomshareError to refuse an object before it is stored.
        ``owner`` is the storing organisation; ``store_access`` says into which existing
        studies it may add (access/service.py decides both).
        """
        temps = list(temps)
        for temp in temps:  # the disk works on the fsyncs while the headers are parsed
            self.blobs.start_sync(temp)  # type: ignore[arg-type]
        results: list[StoreResult] = []
        valid: list[tuple[StoreResult, Header, TempBlob]] = []
        for temp in temps:
            result = StoreResult()
            results.append(result)
            try:
                header = read_header(temp.path, self.settings.bulkdata_threshold)
                _describe(result, header)
                if study_uid and header.study_uid != study_uid:
                    raise StudyMismatch(
                        f"instance belongs to study {header.study_uid}, not {study_uid}")
                if check is not None:
                    check(header)
                valid.append((result, header, temp))
            except DicomshareError as exc:
                self.blobs.discard(temp)  # type: ignore[arg-type]
                result.error = exc
        pending: list[tuple[StoreResult, InstanceRecord]] = []
        if valid:
            try:
                keys = self.blobs.commit_many([t for _, _, t in valid])  # type: ignore[misc]
            except StorageFailure as exc:
                for result, _, _ in valid:
                    result.error = exc
                return results
            for (result, header, temp), key in zip(valid, keys, strict=True):
                pending.append((result, InstanceRecord(header, key, temp.size, temp.sha256(),
                                                       owner, store_access)))
        if pending:
            try:
                outcomes = self._commits.add([rec for _, rec in pending])
            except Exception as exc:  # the database is down or full: nothing acknowledged
                log.exception("index commit failed")
                failure = StorageFailure(f"could not commit to the index: {type(exc).__name__}")
                for result, _ in pending:
                    result.error = failure
                return results
            for (result, rec), outcome in zip(pending, outcomes, strict=True):
                result.outcome = outcome
                if outcome is Outcome.FORBIDDEN:
                    self.blobs.delete(rec.blob_key)  # unreferenced, as for CONFLICT
                    result.error = Forbidden(
                        f"study {rec.header.study_uid} holds instances of another organisation"
                        " and no add-series grant lets you add to it; nothing was stored")
                elif outcome is Outcome.CONFLICT:
                    self.blobs.delete(rec.blob_key)  # unreferenced: its content is unique
                    result.error = DuplicateConflict(
                        f"SOP Instance {rec.header.sop_uid} is already stored with different "
                        "content (or its series belongs to another study); the stored object "
                        "was kept. Delete it first to replace it.")
        return results

    def store_stream(self, stream: BinaryIO, study_uid: str | None = None) -> StoreResult:
        temp = self.blobs.new_temp()
        try:
            while chunk := stream.read(CHUNK):
                temp.write(chunk)
        except BaseException:
            self.blobs.discard(temp)
            raise
        return self.store_received([temp], study_uid)[0]

    def store_file(self, path: Path) -> StoreResult:
        with open(path, "rb") as stream:
            return self.store_stream(stream)

    # -- find and read ---------------------------------------------------------------------
    def search(self, query: Query, study_uid: str | None = None,
               series_uid: str | None = None, visibility: Visibility = EVERYTHING
               ) -> list[dict[str, Any]]:
        return self.index.search(query, study_uid, series_uid, visibility)

    def locate(self, study_uid: str, series_uid: str | None = None, sop_uid: str | None = None,
               with_metadata: bool = False, visibility: Visibility = EVERYTHING
               ) -> list[tuple[StoredInstance, str | None]]:
        """Instances below a resource; NotFound (never an empty list) when there are none."""
        found = self.index.locate(study_uid, series_uid, sop_uid, with_metadata, visibility)
        if not found:
            raise NotFound(resource_name(study_uid, series_uid, sop_uid) + " not found")
        return found

    def read_chunks(self, key: str) -> Iterator[bytes]:
        with self.blobs.open(key) as stream:
            while chunk := stream.read(CHUNK):
                yield chunk

    # -- delete and check ------------------------------------------------------------------
    def delete(self, study_uid: str, series_uid: str | None = None,
               sop_uid: str | None = None, organisation: int | None = None
               ) -> list[StoredInstance]:
        """Journal, index rows, blobs: a crash after the index commit leaves orphans that
        the journal marks as deleted (``check --repair`` removes them, never re-indexes
        them). With ``organisation``, only its share goes (instances others own stay)."""
        candidates = self.index.locate(study_uid, series_uid, sop_uid)
        journal = self.blobs.begin_delete(sorted({inst.blob_key for inst, _ in candidates}))
        try:
            gone = self.index.remove(study_uid, series_uid, sop_uid, organisation)
            if not gone and organisation is None:
                raise NotFound(resource_name(study_uid, series_uid, sop_uid) + " not found")
            for inst in gone:
                self.blobs.delete(inst.blob_key)
        finally:
            self.blobs.end_delete(journal)
        return gone

    def check(self, repair: bool = False, verify_hashes: bool = True) -> CheckReport:
        """Every indexed instance has its blob and hash; every blob is indexed."""
        import hashlib

        report = CheckReport()
        known: set[str] = set()
        for inst in self.index.all_instances():
            report.checked += 1
            known.add(inst.blob_key)
            try:
                if verify_hashes:
                    digest = hashlib.sha256()
                    for chunk in self.read_chunks(inst.blob_key):
                        digest.update(chunk)
                    if digest.hexdigest() != inst.sha256:
                        report.corrupt.append(inst)
                else:
                    with self.blobs.local_path(inst.blob_key):
                        pass
            except NotFound:
                report.missing.append(inst)
        report.orphans = sorted(set(self.blobs.keys()) - known)
        report.leftovers = self.blobs.temp_leftovers()
        if repair:
            self._repair(report)
        return report

    def _repair(self, report: CheckReport) -> None:
        deleted = self.blobs.deleting()
        for key in report.orphans:
            if key in deleted:  # a delete was acknowledged, its blob removal interrupted
                self.blobs.delete(key)
                report.repaired.append(f"removed blob {key} of an interrupted delete")
                continue
            with self.blobs.local_path(key) as path:
                temp = self.blobs.new_temp()
                with open(path, "rb") as src:
                    shutil.copyfileobj(src, temp)
            result = self.store_received([temp])[0]
            if result.ok:
                if temp.sha256() != key:  # misnamed: the bytes now live under their own key
                    self.blobs.delete(key)
                owners = self.index.adopt(result.sop_uid) if result.sop_uid else []
                whose = (f"organisation {', '.join(owners)}" if owners
                         else "no organisation: superusers only")
                report.repaired.append(
                    f"re-indexed orphan blob {key} ({result.sop_uid}) for {whose}")
            else:
                self.blobs.delete(key)
                report.repaired.append(f"removed unreadable orphan blob {key}: "
                                       f"{result.error.reason if result.error else ''}")
        self.blobs.clear_deleting()  # the rest are still indexed: their delete never ran
        for path in report.leftovers:
            path.unlink(missing_ok=True)
            report.repaired.append(f"removed partial upload {path.name}")
        for inst in report.missing:
            self.index.remove(inst.study_uid, inst.series_uid, inst.sop_uid)
            report.repaired.append(f"removed index entry of lost instance {inst.sop_uid}")


def _describe(result: StoreResult, header: Header) -> None:
    result.patient_id = header.values.get("PatientID")
    result.issuer_of_patient_id = header.values.get("IssuerOfPatientID")
    result.sop_class_uid = header.sop_class_uid
    result.sop_uid = header.sop_uid
    result.study_uid = header.study_uid
    result.series_uid = header.series_uid


def resource_name(study: str, series: str | None, sop: str | None) -> str:
    if sop:
        return f"instance {sop}"
    if series:
        return f"series {series}"
    return f"study {study}"
