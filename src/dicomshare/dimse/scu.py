"""The DICOM client side (SCU): send studies to, query and retrieve from registered peers.

Used by ``dicomshare send`` / ``dicomshare remote``, by the JSON API (``web/api.py``) and
by background transfer jobs (``dimse/jobs.py``). Each call opens one association and
closes it before returning; calls block, so the web layer runs them in a threadpool or a
job. ``send`` and ``retrieve`` take an optional ``progress`` callback (the CLI's progress
bar, a job's counters) and an optional ``cancelled`` check: a send stops between
instances, a retrieve sends C-CANCEL on the next pending response and starts no further
study. pynetdicom failures are translated here, at the
boundary: no association at all is :class:`PeerUnavailable`, a failure status to a query
is :class:`RemoteError` (both 502), and per-instance outcomes are data in the reports.

Sending streams the stored bytes unchanged (pynetdicom's chunked file mode), so what the
peer receives is byte-identical to what we stored; only when the peer refuses the stored
transfer syntax of uncompressed data do we let pynetdicom re-encode it (implicit <->
explicit VR little endian).

Peers registered with ``--tls`` are called over DICOM TLS (``dimse/tls.py``) by
:func:`_association`, the one place associations are opened here; a failed handshake is
a PeerUnavailable that says why (certificate not trusted, wrong host name, not a TLS
port, our client certificate refused).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID
from pynetdicom import _config, evt, sop_class
from pynetdicom.association import Association
from pynetdicom.dsutils import split_dataset
from pynetdicom.presentation import PresentationContext, build_context, build_role
from pynetdicom.status import (
    QR_FIND_SERVICE_CLASS_STATUS,
    QR_GET_SERVICE_CLASS_STATUS,
    QR_MOVE_SERVICE_CLASS_STATUS,
    STORAGE_SERVICE_CLASS_STATUS,
    code_to_category,
)

from dicomshare.access.policy import Action, Principal
from dicomshare.access.service import Access
from dicomshare.archive import Archive
from dicomshare.config import Settings
from dicomshare.dicom import transfer
from dicomshare.dicom.json import dataset_to_json
from dicomshare.dimse import tls
from dicomshare.dimse.aes import RemoteAE
from dicomshare.dimse.reactor import EventLoopAE
from dicomshare.errors import (
    DicomshareError,
    InvalidQuery,
    PeerUnavailable,
    RemoteError,
    StorageFailure,
)
from dicomshare.storage.base import Outcome, StoredInstance

log = logging.getLogger(__name__)

# A path given to send_c_store is streamed as stored instead of decoded and re-encoded.
# Process-wide in pynetdicom; every path we hand it must go out byte-identical anyway.
_config.STORE_SEND_CHUNKED_DATASET = True

# Query/Retrieve information models (PS3.4 C.6); pynetdicom.sop_class names them dynamically.
PATIENT_ROOT_FIND = UID("1.2.840.10008.5.1.4.1.2.1.1")
STUDY_ROOT_FIND = UID("1.2.840.10008.5.1.4.1.2.2.1")
STUDY_ROOT_MOVE = UID("1.2.840.10008.5.1.4.1.2.2.2")
STUDY_ROOT_GET = UID("1.2.840.10008.5.1.4.1.2.2.3")
MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: presentation context IDs are odd numbers 1-255
UNCOMPRESSED = [transfer.EXPLICIT_VR_LE, transfer.IMPLICIT_VR_LE,
                transfer.DEFLATED_EXPLICIT_VR_LE, transfer.EXPLICIT_VR_BE]
# pynetdicom converts between these two only (same endianness, not encapsulated): the
# fallback proposed for uncompressed data, explicit VR first.
FALLBACK = [transfer.EXPLICIT_VR_LE, transfer.IMPLICIT_VR_LE]
CONVERTIBLE = frozenset(FALLBACK)
COMPRESSED = [uid for uid, ts in transfer.TRANSFER_SYNTAXES.items() if ts.is_encapsulated]
LOSSLESS = [uid for uid in COMPRESSED if not transfer.TRANSFER_SYNTAXES[uid].is_lossy]
LOSSY = [uid for uid in COMPRESSED if transfer.TRANSFER_SYNTAXES[uid].is_lossy]
# C-GET from a peer that will not list a study's SOP classes: the common ones, 42 of them,
# so three contexts each (uncompressed, lossless, lossy) fit beside the model's.
COMMON_STORAGE = [str(getattr(sop_class, name)) for name in (
    "CTImageStorage EnhancedCTImageStorage MRImageStorage EnhancedMRImageStorage "
    "UltrasoundImageStorage UltrasoundMultiFrameImageStorage ComputedRadiographyImageStorage "
    "DigitalXRayImageStorageForPresentation DigitalXRayImageStorageForProcessing "
    "DigitalMammographyXRayImageStorageForPresentation "
    "DigitalMammographyXRayImageStorageForProcessing BreastTomosynthesisImageStorage "
    "NuclearMedicineImageStorage PositronEmissionTomographyImageStorage "
    "EnhancedPETImageStorage XRayAngiographicImageStorage EnhancedXAImageStorage "
    "XRayRadiofluoroscopicImageStorage RTImageStorage RTDoseStorage RTStructureSetStorage "
    "RTPlanStorage RTIonPlanStorage SecondaryCaptureImageStorage "
    "MultiFrameGrayscaleByteSecondaryCaptureImageStorage "
    "MultiFrameGrayscaleWordSecondaryCaptureImageStorage "
    "MultiFrameTrueColorSecondaryCaptureImageStorage VLPhotographicImageStorage "
    "VLEndoscopicImageStorage VideoEndoscopicImageStorage VLWholeSlideMicroscopyImageStorage "
    "OphthalmicPhotography8BitImageStorage BasicTextSRStorage EnhancedSRStorage "
    "ComprehensiveSRStorage Comprehensive3DSRStorage KeyObjectSelectionDocumentStorage "
    "XRayRadiationDoseSRStorage GrayscaleSoftcopyPresentationStateStorage "
    "EncapsulatedPDFStorage SegmentationStorage TwelveLeadECGWaveformStorage").split()]

FIND_LIMIT = 1000  # matches a C-FIND keeps by default, then C-CANCEL
MAX_FIND_LIMIT = 10_000
LEVELS = {"patient": "PATIENT", "study": "STUDY", "series": "SERIES", "image": "IMAGE"}
MODELS = {"study": STUDY_ROOT_FIND, "patient": PATIENT_ROOT_FIND}
# Asked for on every query (empty = "return it"), so a table of matches says something.
RETURN_KEYS = {
    "patient": ["PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                "NumberOfPatientRelatedStudies"],
    "study": ["PatientName", "PatientID", "StudyInstanceUID", "StudyDate", "StudyTime",
              "AccessionNumber", "StudyID", "StudyDescription", "ModalitiesInStudy",
              "NumberOfStudyRelatedInstances"],
    "series": ["StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesNumber",
               "SeriesDescription", "NumberOfSeriesRelatedInstances"],
    "image": ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID",
              "InstanceNumber"],
}
_NUMERIC_VRS = {"US": int, "UL": int, "SS": int, "SL": int, "UV": int, "SV": int,
                "FL": float, "FD": float}


def category(status: int | None) -> str:
    """success, warning, failure, cancel or pending; failure when there was no answer."""
    if status is None:
        return "failure"
    found = code_to_category(status).lower()
    return found if found in ("success", "warning", "cancel", "pending") else "failure"


_MEANINGS = {"store": STORAGE_SERVICE_CLASS_STATUS, "find": QR_FIND_SERVICE_CLASS_STATUS,
             "move": QR_MOVE_SERVICE_CLASS_STATUS, "get": QR_GET_SERVICE_CLASS_STATUS}


def explain(code: int, status: Dataset, service: str) -> str:
    """The peer's ErrorComment, else what PS3.4 says the status means; empty on success."""
    comment = str(status.get("ErrorComment", "") or "").strip()
    if comment or code in (0x0000, 0xFF00, 0xFF01):
        return comment
    return _MEANINGS[service].get(code, ("", ""))[1]


# -- associations ---------------------------------------------------------------------------
@dataclass
class _Negotiation:
    """What the peer said while associating, for an error message that names the cause."""

    connected: bool = False
    accepted: bool = False
    rejection: str | None = None


def _nodelay(event: evt.Event) -> None:
    try:  # small DIMSE messages must not wait for Nagle's algorithm
        event.assoc.dul.socket.socket.setsockopt(  # type: ignore[union-attr]
            socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):
        pass


def _on_acse(event: evt.Event, seen: _Negotiation) -> None:
    primitive: Any = getattr(event, "primitive", None)
    result = getattr(primitive, "result", None)
    if result == 0x00:
        seen.accepted = True
    elif result in (0x01, 0x02):
        seen.rejection = (f"{primitive.reason_str} ({primitive.result_str.lower()}, "
                          f"{primitive.source_str})")


@contextmanager
def _association(settings: Settings, remote: RemoteAE, contexts: list[PresentationContext],
                 roles: Sequence[Any] = (),
                 handlers: Sequence[tuple[Any, ...]] = ()) -> Iterator[Association]:
    """An established association (released afterwards) or PeerUnavailable with the cause."""
    ae = EventLoopAE(ae_title=settings.ae_title)
    ae.event_loops = settings.dicom_event_loops
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = settings.dicom_timeout
    ae.connection_timeout = settings.dicom_timeout
    ae.maximum_pdu_size = settings.dicom_max_pdu
    seen = _Negotiation()

    def opened(_event: evt.Event) -> None:
        seen.connected = True
        _nodelay(_event)

    where = f"{remote.ae_title} at {remote.host}:{remote.port}"
    handshake = tls.for_peer(settings, remote)
    if handshake is not None:
        where += " (TLS)"
    try:
        assoc = ae.associate(remote.host, remote.port, contexts=contexts,
                             ae_title=remote.ae_title, max_pdu=settings.dicom_max_pdu,
                             ext_neg=list(roles),
                             evt_handlers=[(evt.EVT_CONN_OPEN, opened),
                                           (evt.EVT_ACSE_RECV, _on_acse, [seen]),
                                           *handlers],
                             tls_args=handshake.tls_args if handshake else None)
    except (OSError, ValueError, RuntimeError) as exc:  # e.g. a host name that does not resolve
        raise PeerUnavailable(f"cannot associate with {where}: {exc}") from exc
    if not assoc.is_established:
        if handshake is not None and handshake.error:
            raise PeerUnavailable(f"{where}: {handshake.error}")
        kind, why = _why_not(assoc, seen, settings)
        raise kind(f"{where}: {why}")
    try:
        yield assoc
    except BaseException:
        assoc.abort()
        raise
    if assoc.is_established:
        assoc.release()


def _why_not(assoc: Association, seen: _Negotiation,
             settings: Settings) -> tuple[type[RemoteError], str]:
    if not seen.connected:
        return PeerUnavailable, "cannot connect (nothing listening, host unreachable or blocked)"
    if assoc.is_rejected or seen.rejection:
        why = seen.rejection or "no reason given"
        hint = ("; is the registered AE title the peer's own?" if "called ae" in why.lower()
                else f"; does the peer know our AE title {settings.ae_title}?"
                if "calling ae" in why.lower() else "")
        return PeerUnavailable, f"association rejected: {why}{hint}"
    if seen.accepted:  # reachable, but it does not offer the service we asked for
        return RemoteError, ("the peer accepted none of the proposed presentation contexts "
                             "(SOP classes and transfer syntaxes)")
    if assoc.is_aborted:
        return PeerUnavailable, "the peer aborted the association request"
    return PeerUnavailable, (f"no answer to the association request within "
                             f"{settings.dicom_timeout} s")


def _lost(remote: RemoteAE, settings: Settings) -> str:
    return (f"no response from {remote.ae_title}: the association was aborted or the peer "
            f"did not answer within {settings.dicom_timeout} s")


# -- C-STORE --------------------------------------------------------------------------------
@dataclass
class InstanceResult:
    """The fate of one instance sent with C-STORE."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str  # as stored
    status: int | None = None  # the peer's status; None when never sent or never answered
    comment: str = ""  # the peer's ErrorComment, or why we could not send
    sent_as: str | None = None  # transfer syntax on the wire

    @property
    def outcome(self) -> str:
        return category(self.status)


@dataclass
class SendReport:
    destination: str
    instances: list[InstanceResult] = field(default_factory=list)
    error: str | None = None  # the association ended before every instance was sent

    def count(self, outcome: str) -> int:
        return sum(1 for r in self.instances if r.outcome == outcome)

    @property
    def ok(self) -> bool:
        return self.error is None and all(r.outcome != "failure" for r in self.instances)


def send(archive: Archive, settings: Settings, remote: RemoteAE, study_uids: Sequence[str],
         who: Principal, access: Access,
         progress: Callable[[InstanceResult], None] | None = None,
         cancelled: Callable[[], bool] | None = None) -> SendReport:
    """C-STORE every instance of the studies over one association; NotFound for an unknown
    study or one ``who`` may not download (before connecting), PeerUnavailable when no
    association can be made.

    ``progress`` is called after each instance tried; ``cancelled`` before each one: once
    it answers True the rest are reported "not sent: cancelled" (without ``progress``)."""
    instances = [inst for uid in dict.fromkeys(study_uids)
                 for inst, _ in access.locate(who, Action.DOWNLOAD, uid)]
    report = SendReport(remote.ae_title)
    contexts, unproposed = _store_contexts(instances)
    stopped = False
    with _association(settings, remote, contexts) as assoc:
        accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                    for cx in assoc.accepted_contexts}
        for inst in instances:
            result = InstanceResult(inst.study_uid, inst.series_uid, inst.sop_uid,
                                    inst.sop_class_uid, inst.transfer_syntax_uid)
            if not stopped and cancelled is not None and cancelled():
                stopped = True
                report.error = report.error or "cancelled before every instance was sent"
            if stopped:
                result.comment = "not sent: cancelled"
                report.instances.append(result)
                continue
            if not assoc.is_established:
                report.error = report.error or _lost(remote, settings)
                result.comment = "not sent: the association ended early"
            elif inst.sop_uid in unproposed:
                result.comment = ("not sent: more than 128 presentation contexts needed; "
                                  "send fewer studies at once")
            else:
                _store_one(archive, assoc, inst, accepted, result)
                if result.status is None and not result.comment:
                    result.comment = _lost(remote, settings)
            report.instances.append(result)
            if progress:
                progress(result)
    return report


def _store_contexts(instances: list[StoredInstance]) -> tuple[list[PresentationContext],
                                                                set[str]]:
    """One context per (SOP class, stored transfer syntax), then the re-encoding fallbacks
    for uncompressed data; the SOP Instance UIDs that would need more than 128."""
    exact = list(dict.fromkeys((i.sop_class_uid, i.transfer_syntax_uid) for i in instances))
    fallback = list(dict.fromkeys(i.sop_class_uid for i in instances
                                  if i.transfer_syntax_uid in CONVERTIBLE))
    kept = exact[:MAX_CONTEXTS]
    room = MAX_CONTEXTS - len(kept)
    fallback = fallback[:room]
    contexts = [build_context(cls, [ts]) for cls, ts in kept]
    contexts += [build_context(cls, FALLBACK) for cls in fallback]
    proposed = set(kept)
    unproposed = {i.sop_uid for i in instances
                  if (i.sop_class_uid, i.transfer_syntax_uid) not in proposed
                  and not (i.transfer_syntax_uid in CONVERTIBLE and i.sop_class_uid in fallback)}
    return contexts, unproposed


def _store_one(archive: Archive, assoc: Association, inst: StoredInstance,
               accepted: set[tuple[str, str]], result: InstanceResult) -> None:
    cls, ts = inst.sop_class_uid, inst.transfer_syntax_uid
    other = next((t for t in FALLBACK if (cls, t) in accepted), None)
    if (cls, ts) not in accepted and (ts not in CONVERTIBLE or other is None):
        result.comment = (f"not sent: the peer accepted no presentation context for "
                          f"{_sop_name(cls)} in {transfer.name(ts)}")
        return
    with archive.blobs.local_path(inst.blob_key) as path:
        try:
            if (cls, ts) in accepted and _meta_agrees(path, inst):
                result.sent_as = ts
                status = assoc.send_c_store(path)  # streamed as stored
            else:
                result.sent_as = ts if (cls, ts) in accepted else other
                status = assoc.send_c_store(pydicom.dcmread(path))  # pynetdicom re-encodes
        except (AttributeError, ValueError, OSError, InvalidDicomError) as exc:
            # the stored file meta or the accepted context does not fit this instance
            result.sent_as = None
            result.comment = f"not sent: {exc}"
            return
    if "Status" in status:
        result.status = int(status.Status)
        result.comment = explain(result.status, status, "store")


def _meta_agrees(path: Path, inst: StoredInstance) -> bool:
    """Streaming names the instance by its file meta; a file whose meta contradicts its
    data set (it happens) is sent re-encoded, named by the data set as the index is."""
    meta, _ = split_dataset(path)
    return (str(meta.get("MediaStorageSOPInstanceUID", "")) == inst.sop_uid
            and str(meta.get("MediaStorageSOPClassUID", "")) == inst.sop_class_uid)


def _sop_name(uid: str) -> str:
    name = UID(uid).name
    return name if name and name != uid else uid


# -- C-FIND ---------------------------------------------------------------------------------
class Matches(list[dict[str, Any]]):
    """C-FIND matches; ``truncated`` when the limit was reached and the rest cancelled."""

    truncated = False


def find(settings: Settings, remote: RemoteAE, level: str, keys: dict[str, str],
         model: str | None = None, limit: int = FIND_LIMIT) -> Matches:
    """C-FIND at a level (patient, study, series, image); each match as DICOM JSON.

    ``keys`` maps keywords or 8-digit tags to matching values (PS3.4 C.2.2.2: wildcards,
    ranges; empty asks for the attribute). The model defaults to Study Root, Patient Root
    for patient-level queries. After ``limit`` matches the query is cancelled (C-CANCEL):
    a broad query to a large PACS neither fills memory nor runs on.
    """
    model = model or ("patient" if level == "patient" else "study")
    if level not in LEVELS:
        raise InvalidQuery(f"unknown level {level!r}: one of {', '.join(LEVELS)}")
    if model not in MODELS:
        raise InvalidQuery(f"unknown information model {model!r}: study or patient")
    if model == "study" and level == "patient":
        raise InvalidQuery("the Study Root model has no patient level; use model patient")
    if not 1 <= limit <= MAX_FIND_LIMIT:
        raise InvalidQuery(f"limit must be between 1 and {MAX_FIND_LIMIT}, got {limit}")
    identifier = _identifier(level, keys)
    model_uid = MODELS[model]
    matches = Matches()
    with _association(settings, remote, [build_context(model_uid)]) as assoc:
        for status, found in assoc.send_c_find(identifier, model_uid, msg_id=1):
            if "Status" not in status:
                raise PeerUnavailable(_lost(remote, settings))
            code = int(status.Status)
            if category(code) == "pending":
                if matches.truncated:
                    continue  # sent before the peer saw our C-CANCEL
                if found is None:
                    raise RemoteError(f"{remote.ae_title} sent a match that cannot be decoded")
                matches.append(dataset_to_json(found, settings.bulkdata_threshold))
                if len(matches) >= limit:
                    matches.truncated = True
                    assoc.send_c_cancel(1, query_model=model_uid)
            elif code == 0xFE00 and matches.truncated:
                break  # cancelled, as asked
            elif code != 0x0000:
                raise RemoteError(f"{remote.ae_title} failed the query: status 0x{code:04X} "
                                  f"({category(code)}): {explain(code, status, 'find')}")
    return matches


def _identifier(level: str, keys: dict[str, str]) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = LEVELS[level]
    for name in RETURN_KEYS[level]:
        setattr(ds, name, None)
    for raw_key, value in keys.items():
        tag = attribute_tag(raw_key)
        if tag >> 16 in (0x0000, 0x0002) or tag == 0x00080052:
            raise InvalidQuery(f"{raw_key} cannot be a query key")
        vr = dictionary_VR(tag)
        if vr == "SQ":
            if value:
                raise InvalidQuery(f"{raw_key} is a sequence: it can only be asked for, empty")
            ds.add_new(tag, vr, [])
            continue
        converted: Any = value or None
        if value and vr in _NUMERIC_VRS:
            try:
                converted = _NUMERIC_VRS[vr](value)
            except ValueError as exc:
                raise InvalidQuery(f"{raw_key}={value!r} is not a number") from exc
        ds.add_new(tag, vr, converted)
    return ds


def attribute_tag(key: str) -> int:
    """A keyword or 8-digit tag (parentheses and comma allowed) as an int; InvalidQuery."""
    cleaned = key.strip().replace("(", "").replace(")", "").replace(",", "")
    tag = tag_for_keyword(cleaned)
    if tag is None and len(cleaned) == 8:
        try:
            tag = int(cleaned, 16)
        except ValueError:
            tag = None
    if tag is None or not keyword_for_tag(tag):
        raise InvalidQuery(f"unknown attribute {key!r}: use a DICOM keyword or an 8-digit tag")
    return tag


# -- C-MOVE and C-GET -----------------------------------------------------------------------
@dataclass
class RetrieveReport:
    """One study retrieved: the peer's final status and sub-operation counts; for C-GET
    also what our archive did with each instance received."""

    study_uid: str
    method: str
    status: int | None = None
    comment: str = ""
    completed: int = 0
    failed: int = 0
    warning: int = 0
    stored: int = 0  # C-GET: instances new to the archive
    already_present: int = 0  # C-GET: identical bytes were stored before
    refused: list[tuple[str, str]] = field(default_factory=list)  # C-GET: (SOP UID, reason)
    remaining: int | None = None  # sub-operations still to come, when the peer says

    @property
    def outcome(self) -> str:
        if self.status == 0x0000 and (self.failed or self.refused or not self.completed):
            return "warning"  # "success" with failures, or with nothing found to send
        return category(self.status)


def retrieve(archive: Archive, settings: Settings, remote: RemoteAE, study_uids: Sequence[str],
             method: str, who: Principal, access: Access,
             progress: Callable[[RetrieveReport], None] | None = None,
             cancelled: Callable[[], bool] | None = None) -> list[RetrieveReport]:
    """Retrieve studies over one association, one report per study.

    ``move``: C-MOVE to our own AE title; the peer must have us registered, and our SCP
    (``dicomshare serve``) stores what arrives. ``get``: C-GET; we are the storage SCP on
    the same association and store each instance for ``who``'s organisation.

    ``progress`` gets the current study's report after each response from the peer.
    ``cancelled`` is asked after each pending response (True: C-CANCEL, the peer ends the
    study with status FE00) and before each study (True: "not retrieved: cancelled").
    """
    if method not in ("move", "get"):
        raise InvalidQuery(f"unknown retrieve method {method!r}: move or get")
    uids = list(dict.fromkeys(study_uids))
    if not uids:
        raise InvalidQuery("no study to retrieve")
    reports = [RetrieveReport(uid, method) for uid in uids]
    current: list[RetrieveReport] = []
    roles: list[Any] = []
    handlers: list[tuple[Any, ...]] = []
    if method == "move":
        model = STUDY_ROOT_MOVE
        contexts = [build_context(model)]
    else:
        model = STUDY_ROOT_GET
        classes = _sop_classes(settings, remote, uids)
        contexts = [build_context(model), *_get_contexts(classes)]
        roles = [build_role(cls, scp_role=True) for cls in dict.fromkeys(
            str(cx.abstract_syntax) for cx in contexts[1:])]
        handlers = [(evt.EVT_C_STORE, _receive, [archive, current, who, access])]
    with _association(settings, remote, contexts, roles, handlers) as assoc:
        for msg_id, report in enumerate(reports, start=1):
            current[:] = [report]
            if not assoc.is_established:
                report.comment = _lost(remote, settings)
                continue
            if cancelled is not None and cancelled():
                report.comment = "not retrieved: cancelled"
                continue
            identifier = Dataset()
            identifier.QueryRetrieveLevel = "STUDY"
            identifier.StudyInstanceUID = report.study_uid
            if method == "move":
                responses = assoc.send_c_move(identifier, settings.ae_title, model,
                                              msg_id=msg_id)
            else:
                responses = assoc.send_c_get(identifier, model, msg_id=msg_id)

            def cancel(msg_id: int = msg_id) -> bool:
                """C-CANCEL the study's request if the caller asks to; True once sent."""
                if cancelled is None or not cancelled():
                    return False
                assoc.send_c_cancel(msg_id, query_model=model)
                return True

            _follow(responses, report, remote, settings, progress, cancel)
    return reports


def _follow(responses: Iterator[tuple[Dataset, Dataset | None]], report: RetrieveReport,
            remote: RemoteAE, settings: Settings,
            progress: Callable[[RetrieveReport], None] | None = None,
            cancel: Callable[[], bool] | None = None) -> None:
    for status, _identifier in responses:
        if "Status" not in status:
            report.status = None
            report.comment = _lost(remote, settings)
            return
        code = int(status.Status)
        report.completed = int(status.get("NumberOfCompletedSuboperations", 0) or 0)
        report.failed = int(status.get("NumberOfFailedSuboperations", 0) or 0)
        report.warning = int(status.get("NumberOfWarningSuboperations", 0) or 0)
        remaining = status.get("NumberOfRemainingSuboperations")
        report.remaining = int(remaining) if isinstance(remaining, int) else None
        if category(code) == "pending":
            if progress is not None:
                progress(report)
            if cancel is not None and cancel():
                cancel = None  # asked once; the peer ends the study with FE00 (Cancel)
            continue
        report.status = code
        report.comment = explain(code, status, report.method)
        if report.method == "move" and code in (0xA801, 0xA702) and not report.completed:
            report.comment += (f"; the peer must know our AE title {settings.ae_title} "
                               "with the host and DICOM port of `dicomshare serve`")
        if code == 0x0000 and not (report.completed or report.failed or report.warning):
            report.comment = report.comment or "the peer found nothing to send"
        if progress is not None:
            progress(report)


def _sop_classes(settings: Settings, remote: RemoteAE, study_uids: list[str]) -> list[str]:
    """The SOP classes in the studies (IMAGE-level C-FIND), so C-GET can propose exactly
    those; empty when the peer will not say (we then propose the common ones)."""
    found: dict[str, None] = {}
    try:
        for uid in study_uids:
            for match in find(settings, remote, "image",
                              {"StudyInstanceUID": uid, "SOPClassUID": ""}):
                value = match.get("00080016", {}).get("Value")
                if value:
                    found[str(value[0])] = None
    except PeerUnavailable:
        raise
    except RemoteError as exc:  # no C-FIND there, or a failure: fall back to common classes
        log.info("cannot list SOP classes of %s on %s: %s", study_uids, remote.ae_title,
                 exc.reason)
        return []
    return list(found)


def _get_contexts(classes: list[str]) -> list[PresentationContext]:
    """Storage contexts (we are SCP) for C-GET, so the peer can send each instance as it
    stores it. The peer picks one transfer syntax per context by its own preference, so
    uncompressed, lossless and lossy get contexts of their own (one per compressed syntax
    when that fits): a single mixed context could make it transcode, even lossily."""
    room = MAX_CONTEXTS - 1
    if classes and len(classes) * (1 + len(COMPRESSED)) <= room:
        return [ctx for cls in classes for ctx in
                (build_context(cls, UNCOMPRESSED),
                 *(build_context(cls, [ts]) for ts in COMPRESSED))]
    chosen = classes or COMMON_STORAGE
    if len(chosen) * 3 <= room:
        return [ctx for cls in chosen for ctx in
                (build_context(cls, UNCOMPRESSED), build_context(cls, LOSSLESS),
                 build_context(cls, LOSSY))]
    return [build_context(cls, UNCOMPRESSED + LOSSLESS + LOSSY) for cls in chosen[:room]]


def _receive(event: evt.Event, archive: Archive, current: list[RetrieveReport],
             who: Principal, access: Access) -> Any:
    """EVT_C_STORE during C-GET: store the received bytes; acknowledge once durable."""
    report = current[0] if current else None
    sop_uid = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "")
    temp = archive.new_temp()
    try:
        if getattr(event.request, "DataSet", None) is not None:
            temp.write(event.encoded_dataset(include_meta=True))
        else:  # pynetdicom wrote it to a file (STORE_RECV_CHUNKED_DATASET)
            with open(event.dataset_path, "rb") as stream:
                while chunk := stream.read(1 << 20):
                    temp.write(chunk)
    except Exception as exc:  # noqa: BLE001 - refuse the instance, keep the association
        archive.blobs.discard(temp)  # type: ignore[arg-type]
        error = StorageFailure(f"cannot write the received instance: {exc}")
        return _refuse(report, sop_uid, error.reason, error.failure_reason)
    try:
        result = access.store(who, [temp])[0]
    except DicomshareError as exc:
        return _refuse(report, sop_uid, exc.reason, exc.failure_reason)
    if result.error is not None:
        return _refuse(report, result.sop_uid or sop_uid, result.error.reason,
                       result.error.failure_reason)
    if report is not None:
        if result.outcome is Outcome.ALREADY_PRESENT:
            report.already_present += 1
        else:
            report.stored += 1
    return 0x0000


def _refuse(report: RetrieveReport | None, sop_uid: str, reason: str, code: int) -> Dataset:
    if report is not None:
        report.refused.append((sop_uid, reason))
    status = Dataset()
    status.Status = code
    status.ErrorComment = reason[:64]
    return status
