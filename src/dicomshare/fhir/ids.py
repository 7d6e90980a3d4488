"""Patient ids for FHIR: the one place that turns (qualifier, PatientID) into an id.

A patient is its PatientID qualified by IssuerOfPatientID, or by the storing organisation
when the issuer is absent (the same PatientID from two organisations is two patients).
The FHIR id must match ``[A-Za-z0-9\\-\\.]{1,64}``, be stable, and not show the PatientID
in URLs and logs, yet the server must find the patient's studies from it without a table.
So the id is a deterministic encryption of ``PatientID 0x1F qualifier`` with a server key
(a synthetic IV: ``tag = HMAC(key, text)[:10]``, ``text XOR HMAC-stream(key, tag)``),
base32 in lower case behind a one-letter kind:

- ``p...``: the whole text fits (at most 29 bytes); decoding gives PatientID and qualifier
  and the tag proves the id was made here;
- ``q...``: a longer text; only its first 29 bytes are in the id, so decoding gives the
  PatientID or its start, and the caller compares the ids of the candidate studies.

The key is ``<data_dir>/secrets/fhir-patient.key`` (made once; servers sharing one
database must share it). Linking and merging patient records (dicomshare.patients) never
change an id, so a client's stored references survive an unlink or an undone merge; they
show as ``Patient.link`` instead, and :func:`record_patient_keys` says under which
Patients a record appears.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from dicomshare.access.policy import Visibility
from dicomshare.keys import load_or_create_key
from dicomshare.patients.identity import Record, record_studies
from dicomshare.storage import schema
from dicomshare.storage.visibility import study_visible_by_row

TAG_BYTES = 10
MAX_TEXT = 29  # 1 + base32(10 + 29 bytes) = 64 characters, FHIR's limit
SEPARATOR = b"\x1f"


@dataclass(frozen=True)
class PatientKey:
    """Who a study's patient is: PatientID and the issuer, or the owning organisation."""

    patient_id: str
    issuer: str | None
    organisation_pk: int | None = None

    @property
    def qualifier(self) -> str:
        if self.issuer:
            return f"i:{self.issuer}"
        return f"o:{self.organisation_pk if self.organisation_pk is not None else ''}"


@dataclass(frozen=True)
class Lookup:
    """What an id tells: the PatientID (``exact``) or only its start."""

    patient_id: str
    exact: bool


class PatientIds:
    def __init__(self, key: bytes) -> None:
        self._tag_key = hmac.new(key, b"fhir-patient-id tag", hashlib.sha256).digest()
        self._stream_key = hmac.new(key, b"fhir-patient-id stream", hashlib.sha256).digest()

    def _stream(self, tag: bytes, size: int) -> bytes:
        out = b""
        counter = 0
        while len(out) < size:
            out += hmac.new(self._stream_key, tag + counter.to_bytes(4, "big"),
                            hashlib.sha256).digest()
            counter += 1
        return out[:size]

    def encode(self, key: PatientKey) -> str:
        text = key.patient_id.encode("utf-8") + SEPARATOR + key.qualifier.encode("utf-8")
        tag = hmac.new(self._tag_key, text, hashlib.sha256).digest()[:TAG_BYTES]
        kind, body = ("p", text) if len(text) <= MAX_TEXT else ("q", text[:MAX_TEXT])
        sealed = bytes(a ^ b for a, b in zip(body, self._stream(tag, len(body)), strict=True))
        return kind + base64.b32encode(tag + sealed).decode("ascii").rstrip("=").lower()

    def decode(self, fhir_id: str) -> Lookup | None:
        """The PatientID an id stands for, or None when it is not one of ours."""
        if not 2 <= len(fhir_id) <= 64 or fhir_id[0] not in "pq":
            return None
        raw = fhir_id[1:].upper()
        try:
            data = base64.b32decode(raw + "=" * (-len(raw) % 8))
        except (binascii.Error, ValueError):
            return None
        if len(data) <= TAG_BYTES:
            return None
        tag, sealed = data[:TAG_BYTES], data[TAG_BYTES:]
        text = bytes(a ^ b for a, b in zip(sealed, self._stream(tag, len(sealed)), strict=True))
        if fhir_id[0] == "p":
            expected = hmac.new(self._tag_key, text, hashlib.sha256).digest()[:TAG_BYTES]
            if not hmac.compare_digest(expected, tag) or SEPARATOR not in text:
                return None
            return Lookup(text.split(SEPARATOR, 1)[0].decode("utf-8", "replace"), True)
        if len(text) != MAX_TEXT:
            return None
        if SEPARATOR in text:
            return Lookup(text.split(SEPARATOR, 1)[0].decode("utf-8", "replace"), True)
        return Lookup(text.decode("utf-8", "ignore"), False)


def study_patient_key(study: dict[str, Any], index: Any) -> PatientKey:
    """The patient of a study row (DICOM JSON with IssuerOfPatientID): qualified by its
    issuer, else by the lowest-numbered organisation owning the study (the same for every
    caller, whatever they may see)."""
    def first(tag: str) -> Any:
        found = (study.get(tag) or {}).get("Value") or []
        return found[0] if found else None

    pid = str(first("00100020") or "")
    issuer = first("00100021")
    if issuer:
        return PatientKey(pid, str(issuer))
    _, owners = index.study_facts(first("0020000D"))
    return PatientKey(pid, None, min(owners) if owners else None)


def record_patient_keys(conn: Connection, rec: Record, vis: Visibility) -> set[PatientKey]:
    """The Patients a patient record appears as to a caller (empty if it sees none).

    A record with an IssuerOfPatientID is one Patient. Any other record (one per owner of
    a study without an issuer, or one qualified only by the issuer's universal ID, which
    Patients do not use) is the Patient of each study of it the caller sees, keyed by the
    study's *lowest* owning organisation: a study co-owned with a lower organisation
    shows under that organisation's Patient, as :func:`study_patient_key` says, so links
    made from this agree with ``ImagingStudy.subject``."""
    if rec.issuer:
        return {PatientKey(rec.patient_id, rec.issuer)}
    so = schema.study_owner.alias("fhir_owner")
    lowest = select(func.min(so.c.organisation_pk)).where(
        so.c.study_pk == schema.study.c.pk).scalar_subquery()
    owners = conn.execute(select(lowest).distinct().where(
        record_studies(rec), study_visible_by_row(vis))).scalars()
    return {PatientKey(rec.patient_id, None, int(o)) for o in owners if o is not None}


def patient_ids_of(app: Any) -> PatientIds:
    """The app's PatientIds, made once (the key file is read or created then)."""
    found: PatientIds | None = getattr(app.state, "fhir_patient_ids", None)
    if found is None:
        settings = app.state.settings
        found = PatientIds(load_or_create_key(Path(settings.data_dir) / "secrets"
                                              / "fhir-patient.key"))
        app.state.fhir_patient_ids = found
    return found
