"""Upload links ("send me your images"): a specialist's organisation lets someone without
an account upload a study into it, for a while and up to a size.

A link is a capability record: its secret (shown once) is stored as a SHA-256 digest, it
expires, and it can be revoked with immediate effect. A sender's files arrive through a
resumable, tus-like protocol (docs/upload-links.md): each file is declared (name, size),
its bytes are appended chunk by chunk to a file under ``<data_dir>/uploads``, and once
complete it is ingested: a DICOM file is stored, a zip archive is unpacked member by
member (bounded memory, limits against zip bombs). Storing goes through
:class:`~dicomshare.access.service.Access` with a principal for the link, so the
instances belong to the link's organisation and every archive rule applies (no silent
overwrite, no adding to another organisation's study without an add-series grant).

State lives in the database and on disk, never in a process: any HTTP worker can take the
next chunk of any file.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, insert, or_, select, update
from sqlalchemy.engine import Connection, Engine

from dicomshare import clock
from dicomshare.access.policy import Principal, Visibility
from dicomshare.access.service import Access
from dicomshare.access.throttle import AddressThrottle
from dicomshare.archive import StoreResult
from dicomshare.config import Settings
from dicomshare.errors import (
    DicomshareError,
    DuplicateConflict,
    Forbidden,
    Gone,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    TooManyRequests,
)
from dicomshare.sharing.common import new_secret, secret_digest
from dicomshare.sharing.notify import notify
from dicomshare.storage import schema as s
from dicomshare.storage.base import Outcome, TempBlob

log = logging.getLogger(__name__)

MAX_EXPIRY_DAYS = 90
MAX_FILES_PER_LINK = 20_000
# Zip bombs: a zip may hold at most this many members, and unpack to at most this many
# times its own size, and at most ZIP_MAX_LINK_FACTOR times the link's size limit.
ZIP_MAX_MEMBERS = 10_000
ZIP_MAX_RATIO = 50
ZIP_MAX_LINK_FACTOR = 4
_MAX_DIRECTORY_ENTRY = 46 + 3 * 1024  # a central directory entry: header, name, extra, comment
# Bad secrets from one address before that address is refused for a while (counted in the
# database: every server process alike).
BAD_SECRET_LIMIT = 20
BAD_SECRET_WINDOW = 600  # seconds
# At most one "upload received" notification per link in this interval, unless the sender
# says a batch is complete (POST /upload/{secret}/done).
NOTIFY_EVERY = timedelta(minutes=10)
# A file "processing" without a heartbeat for this long was left by a stopped server.
STALE_PROCESSING = timedelta(minutes=5)
STORE_BATCH = 16
CHUNK = 1 << 20
# Members of a zip that are not images and are skipped without complaint.
_SKIPPED_NAMES = {"dicomdir", ".ds_store", "thumbs.db", "desktop.ini"}

RECEIVING, PROCESSING, STORED, REJECTED, CANCELLED = (
    "receiving", "processing", "stored", "rejected", "cancelled")

L = s.upload_link
F = s.upload_file


class LinkGone(Gone):
    """The link existed but no longer accepts uploads: expired or revoked (410)."""

    def __init__(self, reason: str, why: str) -> None:
        super().__init__(reason)
        self.why = why  # "expired" | "revoked"


@dataclass(frozen=True)
class UploadLink:
    id: int
    organisation_pk: int
    organisation: str
    created_by_user_pk: int | None
    created_by: str | None
    label: str | None
    max_bytes: int
    # Declared sizes of the files begun (reserved when a file starts, so parallel uploads
    # cannot pass the limit); a cancelled file gives its share back.
    bytes_accepted: int
    instances_stored: int
    notify: bool
    created_at: datetime
    expires_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None
    notified_at: datetime | None

    def state(self, now: datetime | None = None) -> str:
        gone = clock.ended(self.revoked_at, self.expires_at, now)
        if gone:
            return gone
        if self.bytes_accepted >= self.max_bytes:
            return "full"
        return "active"

    @property
    def bytes_left(self) -> int:
        return max(0, self.max_bytes - self.bytes_accepted)

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "organisation": self.organisation, "label": self.label,
                "created_by": self.created_by, "max_bytes": self.max_bytes,
                "bytes_accepted": self.bytes_accepted, "bytes_left": self.bytes_left,
                "instances_stored": self.instances_stored, "notify": self.notify,
                "state": self.state(), "created_at": clock.iso(self.created_at),
                "expires_at": clock.iso(self.expires_at),
                "last_used_at": clock.iso(self.last_used_at),
                "revoked_at": clock.iso(self.revoked_at)}


@dataclass
class UploadFile:
    pk: int
    id: str  # the public upload id
    link_pk: int
    name: str
    size: int
    received: int
    state: str
    results: list[dict[str, Any]] = field(default_factory=list)
    created_at: datetime | None = None
    updated_at: datetime | None = None

    def as_json(self) -> dict[str, Any]:
        return {"upload_id": self.id, "name": self.name, "size": self.size,
                "offset": self.received, "state": self.state,
                "counts": Counts.of(self.results).as_json(),
                "results": self.results, "created_at": clock.iso(self.created_at),
                "updated_at": clock.iso(self.updated_at)}


_CREATOR = s.user.alias("upload_link_creator")
_LINKS = (select(L.c.pk, L.c.organisation_pk, s.organisation.c.name, L.c.created_by_user_pk,
                 _CREATOR.c.name, L.c.label, L.c.max_bytes, L.c.bytes_received,
                 L.c.instances_stored, L.c.notify, L.c.created_at, L.c.expires_at,
                 L.c.last_used_at, L.c.revoked_at, L.c.notified_at)
          .select_from(L.join(s.organisation, L.c.organisation_pk == s.organisation.c.pk)
                       .outerjoin(_CREATOR, L.c.created_by_user_pk == _CREATOR.c.pk)))
_FILES = select(F.c.pk, F.c.upload_id, F.c.link_pk, F.c.name, F.c.size, F.c.received,
                F.c.state, F.c.result, F.c.created_at, F.c.updated_at)


def _link(row: Any) -> UploadLink:
    return UploadLink(row[0], row[1], row[2], row[3], row[4], row[5], int(row[6]),
                      int(row[7]), int(row[8]), bool(row[9]), clock.aware(row[10]),
                      clock.aware(row[11]), clock.aware(row[12]), clock.aware(row[13]),
                      clock.aware(row[14]))


def _file(row: Any) -> UploadFile:
    return UploadFile(row[0], row[1], row[2], row[3], int(row[4]), int(row[5]), row[6],
                      json.loads(row[7]) if row[7] else [], clock.aware(row[8]),
                      clock.aware(row[9]))


class Uploads:
    """Upload links and the files received through them."""

    def __init__(self, engine: Engine, access: Access, settings: Settings) -> None:
        self.engine = engine
        self.access = access
        self.settings = settings
        self.root = settings.data_dir / "uploads"
        self._throttle = AddressThrottle(engine, "upload-link", BAD_SECRET_LIMIT,
                                         BAD_SECRET_WINDOW)

    # -- the specialist's side -----------------------------------------------------------
    def create(self, who: Principal, *, label: str | None, expires_in_days: int,
               max_bytes: int | None, notify_me: bool) -> tuple[UploadLink, str]:
        """A new link for the caller's organisation, and its secret (shown once)."""
        if who.organisation_pk is None:
            raise InvalidInput("you belong to no organisation to receive uploads into")
        limit = self.settings.upload_max_bytes
        max_bytes = limit if max_bytes is None else max_bytes
        if not 1 <= max_bytes <= limit:
            raise InvalidInput(f"max_bytes must be between 1 and {limit} (upload_max_bytes)")
        if not 1 <= expires_in_days <= MAX_EXPIRY_DAYS:
            raise InvalidInput(f"expires_in_days must be between 1 and {MAX_EXPIRY_DAYS}")
        secret = new_secret()
        now = clock.now()
        with self.engine.begin() as conn:
            pk = conn.execute(insert(L).values(
                organisation_pk=who.organisation_pk, created_by_user_pk=who.user_pk,
                secret_hash=secret_digest(secret), label=(label or None), max_bytes=max_bytes,
                notify=notify_me, created_at=now,
                expires_at=now + timedelta(days=expires_in_days))
            ).inserted_primary_key[0]  # type: ignore[index]
        link = self._get(int(pk))
        self.audit("upload-link.create", who, link, details={
            "label": link.label, "max_bytes": link.max_bytes,
            "expires_at": clock.iso(link.expires_at), "notify": link.notify}, wait=True)
        self.sweep()
        return link, secret

    def links(self, who: Principal) -> list[UploadLink]:
        stmt = _LINKS.order_by(L.c.pk.desc()).limit(10000)
        if not who.superuser:
            stmt = stmt.where(L.c.organisation_pk == who.organisation_pk)
        with self.engine.connect() as conn:
            return [_link(r) for r in conn.execute(stmt)]

    def link(self, who: Principal, link_id: int) -> UploadLink:
        """One of the caller's organisation's links; others answer like missing ones."""
        try:
            link = self._get(link_id)
        except NotFound:
            link = None
        if link is None or not (who.superuser or link.organisation_pk == who.organisation_pk):
            raise NotFound(f"no upload link {link_id}")
        return link

    def files(self, link: UploadLink) -> list[UploadFile]:
        with self.engine.connect() as conn:
            return [_file(r) for r in conn.execute(
                _FILES.where(F.c.link_pk == link.id).order_by(F.c.pk))]

    def received(self, link: UploadLink) -> dict[str, Any]:
        """What a link has received, for its creator."""
        files = self.files(link)
        counts = Counts()
        studies: dict[str, int] = {}
        for f in files:
            counts.add(f.results)
            for r in f.results:
                if r["outcome"] in ("stored", "duplicate") and r.get("study"):
                    studies[r["study"]] = studies.get(r["study"], 0) + 1
        return {"files": [f.as_json() for f in files],
                "bytes_received": sum(f.received for f in files),
                "instances": counts.as_json(),
                "studies": [{"study": k, "instances": v} for k, v in studies.items()]}

    def revoke(self, who: Principal, link_id: int) -> UploadLink:
        link = self.link(who, link_id)
        with self.engine.begin() as conn:
            conn.execute(update(L).where(L.c.pk == link.id, L.c.revoked_at.is_(None))
                         .values(revoked_at=clock.now()))
            conn.execute(update(F).where(F.c.link_pk == link.id, F.c.state == RECEIVING)
                         .values(state=CANCELLED, updated_at=clock.now()))
        self._remove_parts(link.id)
        self.audit("upload-link.revoke", who, link, details={"label": link.label}, wait=True)
        return self._get(link.id)

    def audit(self, action: str, who: Principal, link: UploadLink, outcome: str = "success",
              details: Mapping[str, Any] | None = None, *, wait: bool = False,
              study_uids: Iterable[str] = ()) -> None:
        """Record ``action`` on ``link`` in its organisation's audit trail (what comes
        through a link is that organisation's data), naming the link."""
        self.access.record(action, who, outcome, wait=wait, study_uids=study_uids,
                           data_organisations=[link.organisation_pk],
                           details={"upload_link": link.id, **(details or {})})

    # -- the sender's side -------------------------------------------------------------
    def resolve(self, secret: str, source: str | None, purpose: str) -> UploadLink:
        """The usable link a secret names. Unknown secrets count against the address, an
        expired or revoked link raises LinkGone (410); both are audited."""
        self._check_address(source, purpose)
        link = None
        if 20 <= len(secret) <= 100:
            with self.engine.connect() as conn:
                row = conn.execute(_LINKS.where(L.c.secret_hash == secret_digest(secret))).first()
            link = _link(row) if row is not None else None
        if link is None:
            self._throttle.failed(source)
            self.access.record("upload-link.use", None, "denied", details={
                "reason": "unknown upload link secret", "source": source, "purpose": purpose})
            raise NotFound("no such upload link")
        state = link.state()
        if state in ("expired", "revoked"):
            when = link.revoked_at if state == "revoked" else link.expires_at
            reason = f"this upload link was {state} on {when:%Y-%m-%d %H:%M} UTC"
            self.audit("upload-link.use", self.principal(link, source), link, "denied",
                       {"reason": reason, "purpose": purpose})
            if state == "expired":
                self._remove_parts(link.id)
            raise LinkGone(reason, state)
        return link

    def opened(self, link: UploadLink, source: str | None) -> None:
        """The upload page was opened (the link was handed on and used)."""
        self.audit("upload-link.open", self.principal(link, source), link,
                   details={"state": link.state()})

    def principal(self, link: UploadLink, source: str | None) -> Principal:
        """Who stores through the link: an uploader of the link's organisation."""
        return Principal(user=f"upload-link:{link.id}", organisation=link.organisation,
                         role="uploader", organisation_pk=link.organisation_pk, kind="link",
                         scopes=frozenset({"write"}), source=source)

    def begin(self, link: UploadLink, name: str, size: int, source: str | None) -> UploadFile:
        """Declare a file; its size is reserved against the link's limit."""
        who = self.principal(link, source)
        name = name.replace("\\", "/").strip()[-500:] or "unnamed"
        if size < 1:
            raise InvalidInput("size must be at least 1 byte")
        now = clock.now()
        upload_id = secrets.token_hex(16)
        with self.engine.begin() as conn:
            refused = self._reserve(conn, link, name, size, now)
            if refused is None:
                pk = conn.execute(insert(F).values(
                    link_pk=link.id, upload_id=upload_id, name=name, size=size, received=0,
                    state=RECEIVING, created_at=now, updated_at=now)
                ).inserted_primary_key[0]  # type: ignore[index]
        if refused is not None:
            self.audit("upload.begin", who, link, "denied",
                       {"name": name, "size": size, "reason": refused.reason})
            raise refused
        path = self.part_path(link.id, upload_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        self.audit("upload.begin", who, link,
                   details={"upload_id": upload_id, "name": name, "size": size})
        return UploadFile(int(pk), upload_id, link.id, name, size, 0, RECEIVING, [], now, now)

    def _reserve(self, conn: Connection, link: UploadLink, name: str, size: int,
                 now: datetime) -> DicomshareError | None:
        """Reserve ``size`` bytes of the link (atomically: parallel files cannot pass the
        limit together); the refusal, if any."""
        count = conn.execute(select(func.count()).select_from(F)
                             .where(F.c.link_pk == link.id)).scalar_one()
        if count >= MAX_FILES_PER_LINK:
            return InvalidInput(f"this upload link has taken its maximum of "
                                f"{MAX_FILES_PER_LINK} files")
        reserved = conn.execute(update(L).where(
            L.c.pk == link.id, L.c.bytes_received + size <= L.c.max_bytes)
            .values(bytes_received=L.c.bytes_received + size, last_used_at=now))
        if reserved.rowcount == 1:
            return None
        left = conn.execute(select(L.c.max_bytes - L.c.bytes_received)
                            .where(L.c.pk == link.id)).scalar_one()
        return PayloadTooLarge(f"{name} ({size} bytes) is larger than what this upload link "
                               f"still accepts ({max(0, left)} of {link.max_bytes} bytes)")

    def file(self, link: UploadLink, upload_id: str) -> UploadFile:
        with self.engine.connect() as conn:
            row = conn.execute(_FILES.where(F.c.upload_id == upload_id[:64],
                                            F.c.link_pk == link.id)).first()
        if row is None:
            raise NotFound("no such upload on this link")
        return _file(row)

    def part_path(self, link_id: int, upload_id: str) -> Path:
        if not upload_id.isalnum():
            raise NotFound("no such upload on this link")
        return self.root / str(link_id) / f"{upload_id}.part"

    def offset(self, f: UploadFile) -> int:
        """How much of a file the server holds: the bytes on disk while receiving."""
        if f.state != RECEIVING:
            return f.received
        try:
            return min(f.size, self.part_path(f.link_pk, f.id).stat().st_size)
        except FileNotFoundError:
            return 0

    def note_received(self, f: UploadFile, received: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(F).where(F.c.pk == f.pk, F.c.state == RECEIVING)
                         .values(received=received, updated_at=clock.now()))

    def refused_chunk(self, link: UploadLink, f: UploadFile, source: str | None,
                      exc: DicomshareError) -> None:
        self.audit("upload.chunk", self.principal(link, source), link, "denied",
                   {"upload_id": f.id, "reason": exc.reason})

    def cancel(self, link: UploadLink, f: UploadFile, source: str | None) -> None:
        """Abandon a file still being received; its reservation goes back to the link."""
        with self.engine.begin() as conn:
            done = conn.execute(update(F).where(F.c.pk == f.pk, F.c.state == RECEIVING)
                                .values(state=CANCELLED, updated_at=clock.now())).rowcount
            if done:
                conn.execute(update(L).where(L.c.pk == link.id)
                             .values(bytes_received=L.c.bytes_received - f.size))
        if not done:
            raise InvalidInput(f"this upload is {f.state}; only one being received can be "
                               "cancelled")
        self.part_path(link.id, f.id).unlink(missing_ok=True)
        self.audit("upload.cancel", self.principal(link, source), link,
                   details={"upload_id": f.id})

    def finish(self, link: UploadLink, f: UploadFile, source: str | None) -> UploadFile:
        """Ingest a completely received file (once, whoever asks first)."""
        with self.engine.begin() as conn:
            claimed = conn.execute(update(F).where(F.c.pk == f.pk, F.c.state == RECEIVING)
                                   .values(state=PROCESSING, received=f.size,
                                           updated_at=clock.now())).rowcount
        if not claimed:
            return self.file(link, f.id)
        who = self.principal(link, source)
        path = self.part_path(link.id, f.id)
        try:
            results = self._ingest(who, link, f, path)
        except Exception as exc:  # never leave a file "processing" for ever
            log.exception("ingest of upload %s failed", f.id)
            results = [{"name": f.name, "outcome": "rejected",
                        "reason": f"internal error while unpacking ({type(exc).__name__})"}]
        finally:
            path.unlink(missing_ok=True)
        outcome = Counts.of(results)
        state = STORED if outcome.stored or outcome.duplicate else REJECTED
        now = clock.now()
        with self.engine.begin() as conn:
            conn.execute(update(F).where(F.c.pk == f.pk).values(
                state=state, result=json.dumps(results), updated_at=now))
            conn.execute(update(L).where(L.c.pk == link.id).values(
                instances_stored=L.c.instances_stored + outcome.stored, last_used_at=now))
            if link.notify:
                self._notify(conn, link.id, force=False)
        self.audit("upload.file", who, link, "success" if state == STORED else "failure",
                   {"upload_id": f.id, "name": f.name, "size": f.size, **outcome.as_json(),
                    "reasons": sorted({r["reason"] for r in results if r.get("reason")})[:10]},
                   study_uids=sorted({r["study"] for r in results if r.get("study")
                                      and r["outcome"] in ("stored", "duplicate")}))
        return self.file(link, f.id)

    def recover(self, link: UploadLink, f: UploadFile, source: str | None) -> UploadFile:
        """A file left ``processing`` by a server that stopped (no heartbeat for a while)
        is ingested again: what was stored already comes back as duplicates."""
        now = clock.now()
        if f.state != PROCESSING or f.updated_at is None \
                or now - f.updated_at < STALE_PROCESSING:
            return f
        path = self.part_path(link.id, f.id)
        whole = path.exists() and path.stat().st_size == f.size
        with self.engine.begin() as conn:
            values: dict[str, Any] = {"state": RECEIVING, "updated_at": now} if whole else {
                "state": REJECTED, "updated_at": now, "result": json.dumps([_rejected(
                    f.name, "the server stopped while storing this file; send it again")])}
            taken = conn.execute(update(F).where(F.c.pk == f.pk, F.c.state == PROCESSING,
                                                 F.c.updated_at == f.updated_at)
                                 .values(**values)).rowcount
        if taken and whole:
            log.warning("upload %s was left processing; ingesting it again", f.id)
            return self.finish(link, self.file(link, f.id), source)
        return self.file(link, f.id)

    def done(self, link: UploadLink, source: str | None) -> None:
        """The sender's batch is complete: tell the creator now (when asked to)."""
        if link.notify:
            with self.engine.begin() as conn:
                self._notify(conn, link.id, force=True)
        self.audit("upload.done", self.principal(link, source), link)

    # -- ingest -----------------------------------------------------------------------
    def _ingest(self, who: Principal, link: UploadLink, f: UploadFile,
                path: Path) -> list[dict[str, Any]]:
        name = f.name
        with open(path, "rb") as head:
            magic = head.read(4)
        may_store = self.access.store_access(who)
        if magic in (b"PK\x03\x04", b"PK\x05\x06"):
            return self._ingest_zip(who, link, f, path, may_store)
        temp = self.access.archive.new_temp()
        try:
            with open(path, "rb") as src:
                while chunk := src.read(CHUNK):
                    temp.write(chunk)
        except BaseException:
            self.access.archive.blobs.discard(temp)  # type: ignore[arg-type]
            raise
        return self._store(who, f, [(name, temp)], may_store)

    def _ingest_zip(self, who: Principal, link: UploadLink, f: UploadFile, path: Path,
                    may_store: Visibility) -> list[dict[str, Any]]:
        name = f.name
        too_many = _zip_too_many_members(path)
        if too_many:
            return [_rejected(name, too_many)]
        try:
            archive = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as exc:
            return [_rejected(name, f"not a readable zip archive: {exc}")]
        results: list[dict[str, Any]] = []
        with archive:
            members = [i for i in archive.infolist() if not i.is_dir()]
            if len(members) > ZIP_MAX_MEMBERS:
                return [_rejected(name, f"the zip archive holds {len(members)} files; at most "
                                        f"{ZIP_MAX_MEMBERS} are accepted in one archive")]
            limit = min(ZIP_MAX_RATIO * path.stat().st_size,
                        ZIP_MAX_LINK_FACTOR * link.max_bytes)
            declared = sum(i.file_size for i in members)
            if declared > limit:
                return [_rejected(name, f"the zip archive would unpack to {declared} bytes, "
                                        f"above the limit of {limit} bytes for this archive")]
            total = 0
            batch: list[tuple[str, TempBlob]] = []
            for info in members:
                member = f"{name}/{info.filename}"
                base = info.filename.rsplit("/", 1)[-1]
                if base.lower() in _SKIPPED_NAMES or info.filename.startswith("__MACOSX/") \
                        or base.startswith("._"):
                    results.append({"name": member, "outcome": "skipped",
                                    "reason": "not an image (index or system file)"})
                    continue
                if info.flag_bits & 0x1:
                    results.append(_rejected(member, "encrypted zip members are not accepted"))
                    continue
                temp = self.access.archive.new_temp()
                try:
                    with archive.open(info) as src:
                        while chunk := src.read(CHUNK):
                            total += len(chunk)
                            if total > limit:
                                raise PayloadTooLarge(
                                    f"the zip archive unpacks to more than {limit} bytes")
                            temp.write(chunk)
                except PayloadTooLarge as exc:
                    self.access.archive.blobs.discard(temp)  # type: ignore[arg-type]
                    results.append(_rejected(member, exc.reason))
                    break
                except (zipfile.BadZipFile, zlib.error, NotImplementedError, EOFError,
                        OSError, RuntimeError) as exc:
                    self.access.archive.blobs.discard(temp)  # type: ignore[arg-type]
                    results.append(_rejected(member, f"cannot unpack this member: {exc}"))
                    continue
                batch.append((member, temp))
                if len(batch) >= STORE_BATCH:
                    results += self._store(who, f, batch, may_store)
                    batch = []
            if batch:
                results += self._store(who, f, batch, may_store)
        if not members:
            results.append(_rejected(name, "the zip archive is empty"))
        return results

    def _store(self, who: Principal, f: UploadFile, batch: list[tuple[str, TempBlob]],
               may_store: Visibility) -> list[dict[str, Any]]:
        with self.engine.begin() as conn:  # a heartbeat: this ingest is alive (recover())
            conn.execute(update(F).where(F.c.pk == f.pk, F.c.state == PROCESSING)
                         .values(updated_at=clock.now()))
        link = self._get(f.link_pk)
        if link.state() in ("expired", "revoked"):  # revocation stops an ingest under way
            for _, temp in batch:
                self.access.archive.blobs.discard(temp)  # type: ignore[arg-type]
            return [_rejected(n, f"the upload link was {link.state()} before this was stored")
                    for n, _ in batch]
        stored = self.access.store(who, [t for _, t in batch], store_access=may_store)
        return [_result(n, r) for (n, _), r in zip(batch, stored, strict=True)]

    # -- notifications, throttling, housekeeping -----------------------------------------
    def _notify(self, conn: Connection, link_id: int, force: bool) -> None:
        row = conn.execute(_LINKS.where(L.c.pk == link_id)).first()
        if row is None:
            return
        link = _link(row)
        now = clock.now()
        if not force and link.notified_at is not None \
                and now - link.notified_at < NOTIFY_EVERY:
            return
        since = link.notified_at or link.created_at
        rows = conn.execute(_FILES.where(F.c.link_pk == link.id,
                                         F.c.state.in_((STORED, REJECTED)),
                                         F.c.updated_at > since)).all()
        if not rows:
            return
        claimed = conn.execute(update(L).where(
            L.c.pk == link.id, L.c.notified_at.is_(None) if link.notified_at is None
            else L.c.notified_at == link.notified_at).values(notified_at=now)).rowcount
        if not claimed:  # another worker is telling the same news
            return
        totals = Counts()
        for r in rows:
            totals.add(_file(r).results)
        label = link.label or f"upload link {link.id}"
        notify(conn, link.organisation_pk, link.created_by_user_pk, "upload-received",
               f"Images received through {label}: {totals.stored} new instance(s)",
               {"upload_link": link.id, "label": link.label, "files": len(rows),
                **totals.as_json()})

    def _check_address(self, source: str | None, purpose: str) -> None:
        try:
            self._throttle.check(source, "too many unknown upload links from your address")
        except TooManyRequests:
            self.access.record("upload-link.use", None, "denied", details={
                "reason": "too many unknown upload link secrets from this address",
                "source": source, "purpose": purpose})
            raise

    def _get(self, link_id: int) -> UploadLink:
        with self.engine.connect() as conn:
            row = conn.execute(_LINKS.where(L.c.pk == link_id)).first()
        if row is None:
            raise NotFound(f"no upload link {link_id}")
        return _link(row)

    def _remove_parts(self, link_id: int) -> None:
        shutil.rmtree(self.root / str(link_id), ignore_errors=True)

    def sweep(self) -> None:
        """Remove partial files of links that are expired or revoked."""
        if not self.root.is_dir():
            return
        with self.engine.connect() as conn:
            dead = set(conn.execute(select(L.c.pk).where(or_(
                L.c.revoked_at.isnot(None), L.c.expires_at <= clock.now()))).scalars())
        for folder in self.root.iterdir():
            if folder.name.isdigit() and int(folder.name) in dead:
                self._remove_parts(int(folder.name))


@dataclass
class Counts:
    stored: int = 0
    duplicate: int = 0
    rejected: int = 0
    skipped: int = 0

    @classmethod
    def of(cls, results: list[dict[str, Any]]) -> Counts:
        counts = cls()
        counts.add(results)
        return counts

    def add(self, results: list[dict[str, Any]]) -> None:
        for r in results:
            name = r["outcome"]
            setattr(self, name, getattr(self, name) + 1)

    def as_json(self) -> dict[str, int]:
        return {"stored": self.stored, "duplicate": self.duplicate,
                "rejected": self.rejected, "skipped": self.skipped}


def _zip_too_many_members(path: Path) -> str | None:
    """Why a zip's central directory is too big to read (many members make a large one),
    judged from its end record before anything is loaded; None when it is fine."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - (1 << 16) - 22))
        tail = f.read()
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) < at + 22:
            return None  # not found: zipfile says what is wrong
        entries = int.from_bytes(tail[at + 10:at + 12], "little")
        directory = int.from_bytes(tail[at + 12:at + 16], "little")
        locator = at - 20
        if (entries == 0xFFFF or directory == 0xFFFFFFFF) and locator >= 0 \
                and tail[locator:locator + 4] == b"PK\x06\x07":
            f.seek(int.from_bytes(tail[locator + 8:locator + 16], "little"))
            record = f.read(56)
            if record[:4] == b"PK\x06\x06" and len(record) == 56:
                entries = int.from_bytes(record[32:40], "little")
                directory = int.from_bytes(record[40:48], "little")
    if entries > ZIP_MAX_MEMBERS or directory > ZIP_MAX_MEMBERS * _MAX_DIRECTORY_ENTRY:
        return (f"the zip archive holds too many files ({entries}); at most "
                f"{ZIP_MAX_MEMBERS} are accepted in one archive")
    return None


def _rejected(name: str, reason: str) -> dict[str, Any]:
    return {"name": name, "outcome": "rejected", "reason": reason}


def _result(name: str, r: StoreResult) -> dict[str, Any]:
    """One instance's fate, as the sender may see it: nothing about other organisations."""
    out: dict[str, Any] = {"name": name}
    if r.error is None:
        out["outcome"] = "duplicate" if r.outcome is Outcome.ALREADY_PRESENT else "stored"
    else:
        out["outcome"] = "rejected"
        if isinstance(r.error, DuplicateConflict):
            out["reason"] = ("an instance with this SOP Instance UID is already stored with "
                             "different content; it was not replaced")
        elif isinstance(r.error, Forbidden):
            out["reason"] = "this study already exists and may not be added to through this link"
        elif r.error.reason.startswith("not a DICOM Part 10 file"):
            out["reason"] = "not a DICOM file (nor a zip archive of DICOM files)"
        else:
            out["reason"] = r.error.reason
    for key, value in (("study", r.study_uid), ("series", r.series_uid), ("sop", r.sop_uid)):
        if value and (r.error is None or isinstance(r.error, DuplicateConflict)):
            out[key] = value
    return out


@contextmanager
def locked(path: Path) -> Iterator[int | None]:
    """An exclusive, non-blocking lock on a part file (across processes): the open file
    descriptor, or None when another transfer of the same file holds it."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
            return
        try:
            yield fd
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
