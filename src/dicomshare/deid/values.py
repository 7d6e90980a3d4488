"""Replacement values: dummies per VR (action D), empties (Z), ages, and text cleaning (C).

A dummy says plainly that a value was removed (``DEIDENTIFIED``, 1900-01-01, zero), so
nobody mistakes it for data; it is valid for its VR, which keeps Type 1 attributes valid.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

DUMMY_TEXT = "DEIDENTIFIED"

_DUMMIES: dict[str, Any] = {
    "AE": DUMMY_TEXT, "AS": "000Y", "CS": DUMMY_TEXT, "DA": "19000101",
    "DT": "19000101000000", "TM": "000000", "DS": "0", "IS": "0", "LO": DUMMY_TEXT,
    "LT": DUMMY_TEXT, "PN": DUMMY_TEXT, "SH": DUMMY_TEXT, "ST": DUMMY_TEXT, "UC": DUMMY_TEXT,
    "UT": DUMMY_TEXT, "UR": "urn:deidentified", "FL": 0.0, "FD": 0.0, "SL": 0, "SS": 0,
    "UL": 0, "US": 0, "SV": 0, "UV": 0, "AT": 0, "OB": b"\x00\x00", "OW": b"\x00\x00",
    "OD": b"\x00" * 8, "OF": b"\x00" * 4, "OL": b"\x00" * 4, "OV": b"\x00" * 8,
    "UN": b"\x00\x00",
}
_BYTES_VRS = frozenset({"OB", "OW", "OD", "OF", "OL", "OV", "UN"})
_NUMBER_VRS = frozenset({"FL", "FD", "SL", "SS", "UL", "US", "SV", "UV", "AT"})


def dummy(vr: str) -> Any:
    """A non-empty value valid for ``vr`` that carries no information."""
    if vr not in _DUMMIES and " or " in vr:  # ambiguous dictionary VR, e.g. "US or SS"
        vr = vr.split(" or ")[0]
    return _DUMMIES.get(vr, DUMMY_TEXT)


def empty(vr: str) -> Any:
    """The zero-length value for ``vr``."""
    if vr in _BYTES_VRS or vr.startswith("OB or") or vr.startswith("US or OW"):
        return b""
    if vr in _NUMBER_VRS or " or " in vr:
        return None
    return ""


def cap_age(value: str) -> str:
    """An Age String with ages over 89 years aggregated to ``090Y`` (HIPAA Safe Harbor)."""
    text = value.strip()
    digits = text[:-1] if text[-1:] in "DWMY" else text
    unit = text[-1:] if text[-1:] in "DWMY" else "Y"
    if digits.isdigit() and unit == "Y" and int(digits) > 89:
        return "090Y"
    return value


# Top-level attributes whose values are looked for, and cut, inside cleaned text.
IDENTIFYING_KEYWORDS = (
    "PatientName", "PatientID", "OtherPatientIDs", "OtherPatientNames", "PatientBirthName",
    "PatientMotherBirthName", "PatientAddress", "PatientTelephoneNumbers", "AccessionNumber",
    "StudyID", "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName",
    "NameOfPhysiciansReadingStudy", "PhysiciansOfRecord", "RequestingPhysician",
    "ConsultingPhysicianName", "InstitutionName", "InstitutionAddress",
    "InstitutionalDepartmentName", "StationName", "DeviceSerialNumber",
    "RequestedProcedureID", "AdmissionID", "MilitaryRank", "BranchOfService",
)

# Identifier-shaped strings: runs of 4+ digits (IDs, years, phone numbers), dates written
# with separators, e-mail addresses.
_GENERIC = r"\d{4,}|\d{1,4}[-/.]\d{1,2}[-/.]\d{1,4}|[\w.+-]+@[\w-]+(?:\.[\w-]+)+"


def identifying_terms(get: Callable[[str], list[str]]) -> list[str]:
    """Values of the instance's identifying attributes (``get(keyword)``), and the parts
    of its names."""
    terms: list[str] = []
    for keyword in IDENTIFYING_KEYWORDS:
        for value in get(keyword):
            text = value.strip()
            if not text:
                continue
            terms.append(text)
            terms.extend(re.split(r"[\^=\s,]+", text))
    return terms


class Scrubber:
    """Cuts the instance's own identifiers and identifier-shaped strings out of short text.

    Used for action C on descriptors (LO, SH, UC, CS): "CT HEAD SMITH 20240101" becomes
    "CT HEAD". It cannot recognise a name it was not told about; that is why free text
    (LT, ST, UT) is replaced whole instead.
    """

    def __init__(self, terms: Iterable[str]) -> None:
        words = sorted({t for t in terms if len(t) >= 3}, key=len, reverse=True)
        alternatives = [re.escape(w) for w in words] + [_GENERIC]
        self._pattern = re.compile("|".join(alternatives), re.IGNORECASE)

    def __call__(self, text: str) -> str:
        return " ".join(self._pattern.sub(" ", text).split())
