"""Audit records in the forms other systems read: JSON lines (our own record, hash and all,
verifiable offline with the key), DICOM audit messages (PS3.15 Annex A.5), which audit
repositories and SIEMs understand without knowing dicomshare, and RFC 5424 syslog messages
forwarded to a collector as records are committed (an external copy of the chain).

The action -> DICOM event mapping is documented in docs/audit.md; :func:`dicom_event` is it.
XML is built with ElementTree, so user-supplied values are always escaped.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import queue
import re
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC
from typing import Any
from urllib.parse import urlsplit
from xml.etree import ElementTree as ET

from dicomshare.access.audit import AuditError, AuditRecord, canonical_json, log

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"  # Study Root Q/R Information Model - FIND

Code = tuple[str, str]  # (code value, meaning); DCM unless noted

# EventID (DCID 400)
APPLICATION_ACTIVITY: Code = ("110100", "Application Activity")
AUDIT_LOG_USED: Code = ("110101", "Audit Log Used")
INSTANCES_ACCESSED: Code = ("110103", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED: Code = ("110104", "DICOM Instances Transferred")
STUDY_DELETED: Code = ("110105", "DICOM Study Deleted")
EXPORT: Code = ("110106", "Export")
IMPORT: Code = ("110107", "Import")
QUERY: Code = ("110112", "Query")
SECURITY_ALERT: Code = ("110113", "Security Alert")
USER_AUTHENTICATION: Code = ("110114", "User Authentication")

# EventTypeCode (DCID 401, 403)
APPLICATION_START: Code = ("110120", "Application Start")
APPLICATION_STOP: Code = ("110121", "Application Stop")
LOGIN: Code = ("110122", "Login")
LOGOUT: Code = ("110123", "Logout")
NODE_AUTHENTICATION: Code = ("110126", "Node Authentication")
NETWORK_CONFIGURATION: Code = ("110128", "Network Configuration")
SECURITY_CONFIGURATION: Code = ("110129", "Security Configuration")
RESTRICTED_FUNCTION: Code = ("110132", "Use of Restricted Function")
OBJECT_SECURITY_CHANGED: Code = ("110135", "Object Security Attributes Changed")
SECURITY_ROLES_CHANGED: Code = ("110136", "Security Roles Changed")
USER_SECURITY_CHANGED: Code = ("110137", "User security Attributes Changed")

# RoleIDCode (DCID 402) and ParticipantObjectIDTypeCode
DESTINATION_ROLE: Code = ("110152", "Destination Role ID")
SOURCE_ROLE: Code = ("110153", "Source Role ID")
STUDY_INSTANCE_UID: Code = ("110180", "Study Instance UID")
SOP_CLASS_UID: Code = ("110181", "SOP Class UID")

OUTCOME_INDICATOR = {"success": "0", "denied": "4", "failure": "8"}  # 4 minor, 8 serious


@dataclass(frozen=True)
class DicomEvent:
    event_id: Code
    action_code: str  # C create, R read, U update, D delete, E execute
    type_code: Code | None = None


_EXACT: dict[str, DicomEvent] = {
    "study.search": DicomEvent(QUERY, "E"),
    "study.view": DicomEvent(INSTANCES_ACCESSED, "R"),
    "study.retrieve": DicomEvent(INSTANCES_ACCESSED, "R"),
    "study.download": DicomEvent(INSTANCES_ACCESSED, "R"),
    "study.store": DicomEvent(INSTANCES_TRANSFERRED, "C"),
    "study.import": DicomEvent(IMPORT, "C"),
    "study.send": DicomEvent(INSTANCES_TRANSFERRED, "R"),
    "study.export": DicomEvent(EXPORT, "R"),
    "study.delete": DicomEvent(STUDY_DELETED, "D"),
    "study.share": DicomEvent(SECURITY_ALERT, "E", OBJECT_SECURITY_CHANGED),
    "login.lockout": DicomEvent(SECURITY_ALERT, "E", RESTRICTED_FUNCTION),
    "token.reuse": DicomEvent(SECURITY_ALERT, "E", RESTRICTED_FUNCTION),
    "token.tamper": DicomEvent(SECURITY_ALERT, "E", RESTRICTED_FUNCTION),
    "session.tamper": DicomEvent(SECURITY_ALERT, "E", RESTRICTED_FUNCTION),
    "security.alert": DicomEvent(SECURITY_ALERT, "E", RESTRICTED_FUNCTION),
    "association": DicomEvent(SECURITY_ALERT, "E", NODE_AUTHENTICATION),  # DIMSE peers
    "user.role": DicomEvent(SECURITY_ALERT, "E", SECURITY_ROLES_CHANGED),
    "app.start": DicomEvent(APPLICATION_ACTIVITY, "E", APPLICATION_START),
    "app.stop": DicomEvent(APPLICATION_ACTIVITY, "E", APPLICATION_STOP),
}
_AUTH_FAMILIES = {"login", "logout", "session", "authenticate"}
_FAMILY: dict[str, DicomEvent] = {
    "grant": DicomEvent(SECURITY_ALERT, "E", OBJECT_SECURITY_CHANGED),
    "user": DicomEvent(SECURITY_ALERT, "E", USER_SECURITY_CHANGED),
    "token": DicomEvent(SECURITY_ALERT, "E", USER_SECURITY_CHANGED),
    "organisation": DicomEvent(SECURITY_ALERT, "E", SECURITY_CONFIGURATION),
    "config": DicomEvent(SECURITY_ALERT, "E", SECURITY_CONFIGURATION),
    "ae": DicomEvent(SECURITY_ALERT, "E", NETWORK_CONFIGURATION),
    "security": DicomEvent(SECURITY_ALERT, "E", RESTRICTED_FUNCTION),
    "audit": DicomEvent(AUDIT_LOG_USED, "R"),
    "study": DicomEvent(INSTANCES_ACCESSED, "R"),
}


def dicom_event(action: str, outcome: str = "success",
                actor_kind: str | None = None) -> DicomEvent:
    """Which DICOM audit message an action becomes, by rules tried in order:

    1. named security alerts (lockouts, token reuse or tampering, ...);
    2. logins, logouts and sessions, whatever their outcome: User Authentication;
    3. anything else refused (outcome "denied"): Security Alert, Use of Restricted Function;
    4. the action itself (``study.store`` by the CLI is an Import), then its family."""
    family = action.split(".", 1)[0]
    exact = _EXACT.get(action)
    if exact is not None and exact.event_id == SECURITY_ALERT:
        return exact
    if family in _AUTH_FAMILIES:
        out = family == "logout" or action.endswith((".end", ".revoke", ".logout"))
        return DicomEvent(USER_AUTHENTICATION, "E", LOGOUT if out else LOGIN)
    if outcome == "denied":
        return DicomEvent(SECURITY_ALERT, "E", RESTRICTED_FUNCTION)
    if action == "study.store" and actor_kind == "cli":
        return DicomEvent(IMPORT, "C")
    if exact is not None:
        return exact
    return _FAMILY.get(family, DicomEvent(SECURITY_ALERT, "E"))


# -- JSON lines -----------------------------------------------------------------------------
def to_json_line(record: AuditRecord) -> str:
    """One record as one line of JSON (no newline): the stored content plus seq and hash."""
    return canonical_json(record.as_dict())


def from_json_line(line: str) -> AuditRecord:
    return AuditRecord.from_dict(json.loads(line))


# -- DICOM audit messages -------------------------------------------------------------------
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _clean(value: object) -> str:
    """Characters XML 1.0 cannot carry become U+FFFD; the message stays parseable."""
    return _NOT_XML.sub("\ufffd", str(value))


def _el(parent: ET.Element, tag: str, **attrs: object) -> ET.Element:
    return ET.SubElement(parent, tag, {k.replace("_", "-"): _clean(v) for k, v in attrs.items()
                                       if v is not None})


def _code(parent: ET.Element, tag: str, code: Code, system: str = "DCM") -> ET.Element:
    return _el(parent, tag, csd_code=code[0], codeSystemName=system, originalText=code[1])


def _b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode("utf-8") if isinstance(data, str) else data).decode()


def _access_point_type(source: str) -> str:
    """NetworkAccessPointTypeCode: 2 for an IP address, 1 for a machine name."""
    try:
        ipaddress.ip_address(source.split("%")[0])
        return "2"
    except ValueError:
        return "1"


def to_dicom_xml(record: AuditRecord, organisation_names: Mapping[int, str] | None = None,
                 *, audit_source_id: str = "dicomshare") -> str:
    """One DICOM ``AuditMessage`` element (UTF-8 text, no XML declaration, one line).

    ``organisation_names`` turns the actor's organisation pk into a UserName
    ("user@organisation"); ``audit_source_id`` names this archive (e.g. its AE title)."""
    event = dicom_event(record.action, record.outcome, record.actor_kind)
    details = record.details
    root = ET.Element("AuditMessage")

    ident = _el(root, "EventIdentification", EventActionCode=event.action_code,
                EventDateTime=record.at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                EventOutcomeIndicator=OUTCOME_INDICATOR.get(record.outcome, "8"))
    _code(ident, "EventID", event.event_id)
    if event.type_code is not None:
        _code(ident, "EventTypeCode", event.type_code)
    reason = details.get("reason") or details.get("error")
    if record.outcome != "success" and reason:
        _el(ident, "EventOutcomeDescription").text = _clean(" ".join(str(reason).split()))

    # Who asked: the user (or AE title) behind the request.
    user = record.actor_user or record.source or "unknown"
    org = (organisation_names or {}).get(record.actor_organisation or -1)
    requestor_role, archive_role = {
        QUERY: (SOURCE_ROLE, DESTINATION_ROLE),
        INSTANCES_TRANSFERRED: ((None, SOURCE_ROLE) if event.action_code == "R"
                                else (SOURCE_ROLE, DESTINATION_ROLE)),
        IMPORT: (SOURCE_ROLE, DESTINATION_ROLE),
    }.get(event.event_id, (None, None))
    requestor = _el(root, "ActiveParticipant", UserID=user,
                    AlternativeUserID=(f"AETITLE={record.source or user}"
                                       if record.actor_kind == "ae" else None),
                    UserName=f"{user}@{org}" if org else None, UserIsRequestor="true",
                    NetworkAccessPointID=record.source,
                    NetworkAccessPointTypeCode=(_access_point_type(record.source)
                                                if record.source else None))
    if requestor_role is not None:
        _code(requestor, "RoleIDCode", requestor_role)
    # The archive itself, which answered.
    archive = _el(root, "ActiveParticipant", UserID=audit_source_id, UserIsRequestor="false")
    if archive_role is not None:
        _code(archive, "RoleIDCode", archive_role)
    destination = details.get("destination")
    if destination and event.event_id in (INSTANCES_TRANSFERRED, EXPORT):
        peer = _el(root, "ActiveParticipant", UserID=destination, UserIsRequestor="false")
        _code(peer, "RoleIDCode", DESTINATION_ROLE)

    source_ident = _el(root, "AuditSourceIdentification", AuditSourceID=audit_source_id)
    _code(source_ident, "AuditSourceTypeCode", ("4", "Application Server"), "RFC-3881")

    if event.event_id == QUERY:
        query = details.get("query", details)
        obj = _el(root, "ParticipantObjectIdentification",
                  ParticipantObjectID=details.get("sop_class_uid") or STUDY_ROOT_FIND,
                  ParticipantObjectTypeCode="2", ParticipantObjectTypeCodeRole="3")
        _code(obj, "ParticipantObjectIDTypeCode", SOP_CLASS_UID)
        _el(obj, "ParticipantObjectQuery").text = _b64(
            query if isinstance(query, str) else canonical_json(query))
        syntax = details.get("transfer_syntax")
        _el(obj, "ParticipantObjectDetail", type="TransferSyntax" if syntax else
            "QueryEncoding", value=_b64(syntax or "UTF-8"))
    if event.event_id == SECURITY_ALERT:
        # The alert subject: what the alert is about, with the record's details.
        obj = _el(root, "ParticipantObjectIdentification",
                  ParticipantObjectID=f"urn:dicomshare:{record.action}",
                  ParticipantObjectTypeCode="2", ParticipantObjectTypeCodeRole="13")
        _code(obj, "ParticipantObjectIDTypeCode", ("12", "URI"), "RFC-3881")
        _el(obj, "ParticipantObjectDetail", type="Alert Description", value=_b64(
            canonical_json({"action": record.action, "outcome": record.outcome,
                            "data_organisations": list(record.data_organisations),
                            "details": details})))
    for uid in record.study_uids:
        obj = _el(root, "ParticipantObjectIdentification", ParticipantObjectID=uid,
                  ParticipantObjectTypeCode="2", ParticipantObjectTypeCodeRole="3")
        _code(obj, "ParticipantObjectIDTypeCode", STUDY_INSTANCE_UID)
    for pid in record.patient_ids:
        obj = _el(root, "ParticipantObjectIdentification", ParticipantObjectID=pid,
                  ParticipantObjectTypeCode="1", ParticipantObjectTypeCodeRole="1")
        _code(obj, "ParticipantObjectIDTypeCode", ("2", "Patient Number"), "RFC-3881")
    return ET.tostring(root, encoding="unicode")



# -- syslog forwarding ----------------------------------------------------------------------
FACILITY_AUTHPRIV = 10
SEVERITY_WARNING, SEVERITY_NOTICE = 4, 5
SD_ID = "dicomshare@32473"  # 32473: the enterprise number RFC 5612 sets aside for examples
_UDP_MAX = 60000  # bytes; larger records go out without their details


def _printable(value: str, limit: int) -> str:
    """RFC 5424 header fields: printable US-ASCII, no spaces, not empty."""
    clean = "".join(c if 33 <= ord(c) <= 126 else "_" for c in value)[:limit]
    return clean or "-"


def _sd_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def syslog_message(record: AuditRecord, hostname: str | None = None,
                   procid: int | None = None, max_bytes: int | None = None) -> bytes:
    """One RFC 5424 message: authpriv, notice (warning unless success), MSGID = action,
    seq/hash/outcome/user as structured data, the JSON record as MSG."""
    severity = SEVERITY_NOTICE if record.outcome == "success" else SEVERITY_WARNING
    stamp = record.at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    host = _printable(hostname if hostname is not None else socket.gethostname(), 255)
    params = [("seq", str(record.seq)), ("hash", record.hash), ("outcome", record.outcome)]
    if record.actor_user is not None:
        params.append(("user", record.actor_user))
    sd = "[" + SD_ID + "".join(f' {k}="{_sd_value(v)}"' for k, v in params) + "]"
    head = (f"<{FACILITY_AUTHPRIV * 8 + severity}>1 {stamp} {host} dicomshare "
            f"{procid if procid is not None else os.getpid()} "
            f"{_printable(record.action, 32)} {sd} ").encode()
    body = canonical_json(record.as_dict()).encode("utf-8")
    if max_bytes is not None and len(head) + 3 + len(body) > max_bytes:
        short = {**record.as_dict(), "details": {"truncated": True}}
        body = canonical_json(short).encode("utf-8")
    return head + b"\xef\xbb\xbf" + body  # MSG-UTF8: BOM, then UTF-8


class SyslogForwarder:
    """Sends committed records to a collector from its own thread: a slow or dead collector
    never delays recording. Failures are logged; the records stay in the database."""

    def __init__(self, url: str, queue_size: int = 10000) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("udp", "tcp") or not parts.hostname or not parts.port:
            raise AuditError(f"audit syslog must be udp://host:port or tcp://host:port, "
                             f"not {url!r}")
        self.scheme, self.host, self.port = parts.scheme, parts.hostname, parts.port
        self._hostname = socket.gethostname()
        self._queue_size = queue_size
        self._reset()

    def _reset(self) -> None:
        self._queue: queue.Queue[AuditRecord | None] = queue.Queue(self._queue_size)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._addr: Any = None
        self._quiet_until = 0.0  # after a failure: drop instead of reconnecting per record
        self._dropped = 0

    def send(self, records: Sequence[AuditRecord]) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="audit-syslog",
                                                daemon=True)
                self._thread.start()
        for rec in records:
            try:
                self._queue.put_nowait(rec)
            except queue.Full:
                self._dropped += 1
                if self._dropped % 1000 == 1:
                    log.warning("audit syslog queue full: %d records not forwarded",
                                self._dropped)

    def close(self, timeout: float = 10) -> None:
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._queue.put(None)
            thread.join(timeout)
        self._thread = None
        self._disconnect()

    def _run(self) -> None:
        while True:
            rec = self._queue.get()
            if rec is None:
                return
            if time.monotonic() < self._quiet_until:
                self._dropped += 1
                continue
            try:
                self._transmit(rec)
                if self._dropped:
                    log.warning("audit syslog forwarding resumed; %d records were not "
                                "forwarded (they are in the database)", self._dropped)
                    self._dropped = 0
            except OSError:
                self._disconnect()
                try:  # one reconnect: a collector restart should cost nothing
                    self._transmit(rec)
                    self._dropped = 0
                except OSError as exc:
                    self._disconnect()
                    self._dropped += 1
                    self._quiet_until = time.monotonic() + 5
                    log.warning("audit syslog forwarding to %s://%s:%d failed (seq %d): %s",
                                self.scheme, self.host, self.port, rec.seq, exc)

    def _transmit(self, rec: AuditRecord) -> None:
        if self.scheme == "udp":
            msg = syslog_message(rec, self._hostname, max_bytes=_UDP_MAX)
            if self._sock is None:
                family, kind, proto, _name, addr = socket.getaddrinfo(
                    self.host, self.port, type=socket.SOCK_DGRAM)[0]
                self._sock, self._addr = socket.socket(family, kind, proto), addr
            self._sock.sendto(msg, self._addr)
            return
        msg = syslog_message(rec, self._hostname)
        if self._sock is None:
            self._sock = socket.create_connection((self.host, self.port), timeout=5)
        self._sock.sendall(str(len(msg)).encode("ascii") + b" " + msg)  # RFC 6587 framing

    def _disconnect(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None


__all__ = ["DicomEvent", "SyslogForwarder", "dicom_event", "from_json_line", "syslog_message",
           "to_dicom_xml", "to_json_line"]
