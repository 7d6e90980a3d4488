"""FHIR R4 resources (as JSON dicts) built from the index's DICOM JSON search results.

Pure functions: web/fhir_api.py searches through Access (so only what the caller may see
is ever passed here) and hands the matches over. The JSON follows FHIR R4 (4.0.1); tests
validate it with ``fhir.resources.R4B`` (R4B changed nothing in these resources).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote

from dicomshare import __version__
from dicomshare.dicom.json import first
from dicomshare.fhir.ids import PatientKey

FHIR_VERSION = "4.0.1"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
ENDPOINT_ID = "dicomweb"
value = first  # the first value of an attribute in DICOM JSON, or None
_OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")
_GENDER = {"M": "male", "F": "female", "O": "other"}


def fhir_date(da: str | None) -> str | None:
    """DICOM DA (YYYYMMDD) to FHIR date; None for anything malformed."""
    if not da or not re.fullmatch(r"\d{8}", da):
        return None
    return f"{da[:4]}-{da[4:6]}-{da[6:]}"


def _started(study: dict[str, Any]) -> str | None:
    """StudyDate with StudyTime when the time zone is known (FHIR dateTime requires a zone
    once a time is given), else the date alone."""
    date = fhir_date(value(study, "00080020"))
    time = value(study, "00080030")
    tz = value(study, "00080201")
    if date and time and tz and re.fullmatch(r"\d{6}(\.\d+)?", str(time)) \
            and re.fullmatch(r"[+-]\d{4}", str(tz)):
        t = str(time)
        return f"{date}T{t[:2]}:{t[2:4]}:{t[4:6]}{tz[:3]}:{tz[3:]}"
    return date


def _int(raw: Any) -> int | None:
    try:
        number = int(raw)
    except (TypeError, ValueError):
        return None
    return number if number >= 0 else None


def _modality(code: str) -> dict[str, str]:
    return {"system": DCM, "code": code}


def imaging_study(study: dict[str, Any], series: list[dict[str, Any]],
                  instances: list[dict[str, Any]], patient_ref: str) -> dict[str, Any]:
    """One ImagingStudy: the study row, its visible series and instances."""
    uid = value(study, "0020000D")
    by_series: dict[str, list[dict[str, Any]]] = {}
    for inst in instances:
        by_series.setdefault(value(inst, "0020000E"), []).append(inst)
    out_series = []
    for se in sorted(series, key=lambda s: (_int(value(s, "00200011")) is None,
                                            _int(value(s, "00200011")) or 0,
                                            value(s, "0020000E"))):
        se_uid = value(se, "0020000E")
        members = sorted(by_series.get(se_uid, []),
                         key=lambda i: (_int(value(i, "00200013")) is None,
                                        _int(value(i, "00200013")) or 0, value(i, "00080018")))
        item: dict[str, Any] = {"uid": se_uid, "modality": _modality(
            value(se, "00080060") or "OT")}
        number = _int(value(se, "00200011"))
        if number is not None:
            item["number"] = number
        if value(se, "0008103E"):
            item["description"] = str(value(se, "0008103E"))
        item["numberOfInstances"] = len(members)
        if value(se, "00180015"):
            item["bodySite"] = {"display": str(value(se, "00180015"))}
        out_instances = []
        for inst in members:
            entry: dict[str, Any] = {"uid": value(inst, "00080018"), "sopClass": {
                "system": "urn:ietf:rfc:3986", "code": f"urn:oid:{value(inst, '00080016')}"}}
            inst_number = _int(value(inst, "00200013"))
            if inst_number is not None:
                entry["number"] = inst_number
            out_instances.append(entry)
        if out_instances:
            item["instance"] = out_instances
        out_series.append(item)
    resource: dict[str, Any] = {
        "resourceType": "ImagingStudy", "id": uid,
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}],
        "status": "available",
    }
    accession = value(study, "00080050")
    if accession:
        resource["identifier"].append({"type": {"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]},
            "value": str(accession)})
    modalities = sorted({s["modality"]["code"] for s in out_series})
    if modalities:
        resource["modality"] = [_modality(m) for m in modalities]
    resource["subject"] = {"reference": patient_ref}
    started = _started(study)
    if started:
        resource["started"] = started
    resource["endpoint"] = [{"reference": f"Endpoint/{ENDPOINT_ID}"}]
    resource["numberOfSeries"] = len(out_series)
    resource["numberOfInstances"] = sum(s["numberOfInstances"] for s in out_series)
    if value(study, "00081030"):
        resource["description"] = str(value(study, "00081030"))
    if out_series:
        resource["series"] = out_series
    return resource


def identifier_system(key: PatientKey, organisation_name: str | None) -> str:
    """``urn:oid:<issuer>`` for an OID issuer, ``urn:dicomshare:issuer:<issuer>`` for
    another, ``urn:dicomshare:organisation:<name>`` when the organisation qualifies."""
    if key.issuer:
        if _OID.match(key.issuer):
            return f"urn:oid:{key.issuer}"
        return f"urn:dicomshare:issuer:{quote(key.issuer, safe='')}"
    return f"urn:dicomshare:organisation:{quote(organisation_name or '', safe='')}"


def human_name(pn: Any) -> dict[str, Any] | None:
    """DICOM PN (JSON form) to a HumanName: its alphabetic group's components."""
    text = pn.get("Alphabetic") if isinstance(pn, dict) else pn
    if not isinstance(text, str) or not text.strip("^ "):
        return None
    parts = [p.strip() for p in text.split("^")] + [""] * 5
    family, given, middle, prefix, suffix = parts[:5]
    name: dict[str, Any] = {"text": " ".join(p for p in (prefix, given, middle, family, suffix)
                                             if p)}
    if family:
        name["family"] = family
    given_names = [g for g in (*given.split(" "), *middle.split(" ")) if g]
    if given_names:
        name["given"] = given_names
    if prefix:
        name["prefix"] = [prefix]
    if suffix:
        name["suffix"] = [suffix]
    return name


def patient(fhir_id: str, key: PatientKey, study: dict[str, Any],
            organisation_name: str | None, links: list[tuple[str, str]] | None = None,
            active: bool | None = None) -> dict[str, Any]:
    """A Patient from the attributes of one of its studies (the latest), with ``links``
    ((Patient id, link type) to the same person's other Patients) and ``active`` (False
    once merged into another) when the caller's person view is known."""
    resource: dict[str, Any] = {"resourceType": "Patient", "id": fhir_id}
    if key.patient_id:
        resource["identifier"] = [{"use": "usual",
                                   "system": identifier_system(key, organisation_name),
                                   "value": key.patient_id}]
    if active is not None:
        resource["active"] = active
    name = human_name(value(study, "00100010"))
    if name:
        resource["name"] = [name]
    resource["gender"] = _GENDER.get(str(value(study, "00100040") or "").upper(), "unknown")
    birth = fhir_date(value(study, "00100030"))
    if birth:
        resource["birthDate"] = birth
    if not key.issuer and organisation_name:
        resource["managingOrganization"] = {"display": organisation_name}
    if links:
        resource["link"] = [{"other": {"reference": f"Patient/{other}"}, "type": kind}
                            for other, kind in links]
    return resource


def endpoint(address: str) -> dict[str, Any]:
    """Our DICOMweb root as an Endpoint (WADO-RS; QIDO-RS and STOW-RS live there too)."""
    return {
        "resourceType": "Endpoint", "id": ENDPOINT_ID, "status": "active",
        "connectionType": {
            "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
            "code": "dicom-wado-rs"},
        "name": "dicomshare DICOMweb",
        "payloadType": [{"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/endpoint-payload-type",
            "code": "any"}], "text": "DICOM"}],
        "payloadMimeType": ["application/dicom"],
        "address": address,
    }


def bundle(base: str, entries: list[dict[str, Any]], total: int,
           links: dict[str, str]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle", "type": "searchset", "total": total,
        "link": [{"relation": rel, "url": url} for rel, url in links.items()],
        "entry": [{"fullUrl": f"{base}/{r['resourceType']}/{r['id']}", "resource": r,
                   "search": {"mode": "match"}} for r in entries],
    }


def operation_outcome(code: str, diagnostics: str) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": code, "diagnostics": diagnostics}]}


def capability_statement(base: str, date: str) -> dict[str, Any]:
    def param(name: str, kind: str, doc: str) -> dict[str, str]:
        return {"name": name, "type": kind, "documentation": doc}

    paging = [param("_count", "number", "page size (default 20, at most 100)"),
              param("_offset", "number", "matches to skip (the next link carries it)")]
    return {
        "resourceType": "CapabilityStatement", "status": "active", "date": date,
        "publisher": "dicomshare", "kind": "instance",
        "software": {"name": "dicomshare", "version": __version__},
        "implementation": {"description": "dicomshare FHIR R4 read API", "url": base},
        "fhirVersion": FHIR_VERSION, "format": ["json"],
        "rest": [{
            "mode": "server",
            "security": {"description": "Authorization: Bearer <token>, or a signed-in "
                                        "browser session; only what the caller may see."},
            "resource": [
                {"type": "ImagingStudy", "interaction": [{"code": "read"},
                                                         {"code": "search-type"}],
                 "searchParam": [
                     param("_id", "token", "the StudyInstanceUID"),
                     param("identifier", "token", "urn:dicom:uid|urn:oid:<StudyUID>"),
                     param("patient", "reference", "Patient/<id>"),
                     param("started", "date", "ge, le, gt, lt, eq on the study date"),
                     param("modality", "token", f"{DCM}|<code>"), *paging]},
                {"type": "Patient", "interaction": [{"code": "read"},
                                                    {"code": "search-type"}],
                 "documentation": "link: the same person's other Patients the caller may "
                                  "see (seealso: linked records; replaced-by / replaces: "
                                  "merges); active is false once merged into another",
                 "searchParam": [
                     param("_id", "token", "the Patient id"),
                     param("identifier", "token", "<system>|<PatientID>"),
                     param("name", "string", "start of any part of the name"),
                     param("birthdate", "date", "ge, le, gt, lt, eq"),
                     param("gender", "token", "male, female, other, unknown"), *paging]},
                {"type": "Endpoint", "interaction": [{"code": "read"}]},
            ],
        }],
    }
