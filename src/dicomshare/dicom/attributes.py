"""Which attributes belong to which query level, and which are returned by default.

Names and sets follow PS3.18 Tables 10.6.3-3/4/5 (QIDO-RS return attributes) and the
PS3.4 C.6 query/retrieve information model, so QIDO-RS and C-FIND share one picture.
"""

from __future__ import annotations

import re
from enum import StrEnum

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from dicomshare.errors import InvalidQuery, InvalidUID


class Level(StrEnum):
    PATIENT = "PATIENT"
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"  # DIMSE's name for the instance level


# Attributes stored on each level's index row. Patient attributes live on the study row:
# a patient here is "the patient of a study" until cross-provider identity exists.
PATIENT_KEYS = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex")
STUDY_KEYS = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDescription",
    "StudyID",
)
SERIES_KEYS = (
    "SeriesInstanceUID",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "BodyPartExamined",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
)
INSTANCE_KEYS = (
    "SOPInstanceUID",
    "SOPClassUID",
    "InstanceNumber",
    "Rows",
    "Columns",
    "BitsAllocated",
    "NumberOfFrames",
)

# Attributes computed from the index, never read from a single instance.
COMPUTED_KEYS = {
    Level.PATIENT: ("NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
                    "NumberOfPatientRelatedInstances"),
    Level.STUDY: ("ModalitiesInStudy", "SOPClassesInStudy", "NumberOfStudyRelatedSeries",
                  "NumberOfStudyRelatedInstances"),
    Level.SERIES: ("NumberOfSeriesRelatedInstances",),
    Level.IMAGE: (),
}

# PS3.18 Table 10.6.3-3/4/5: returned for every match, whatever includefield says.
DEFAULT_RETURN = {
    Level.STUDY: (
        "SpecificCharacterSet", "StudyDate", "StudyTime", "AccessionNumber",
        "InstanceAvailability", "ModalitiesInStudy", "ReferringPhysicianName",
        "TimezoneOffsetFromUTC", "RetrieveURL", "PatientName", "PatientID",
        "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
        "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances", "StudyDescription",
    ),
    Level.SERIES: (
        "SpecificCharacterSet", "Modality", "TimezoneOffsetFromUTC", "SeriesDescription",
        "RetrieveURL", "SeriesInstanceUID", "SeriesNumber", "NumberOfSeriesRelatedInstances",
        "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
        "RequestAttributesSequence", "StudyInstanceUID", "BodyPartExamined",
    ),
    Level.IMAGE: (
        "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "InstanceAvailability",
        "TimezoneOffsetFromUTC", "RetrieveURL", "InstanceNumber", "Rows", "Columns",
        "BitsAllocated", "NumberOfFrames", "StudyInstanceUID", "SeriesInstanceUID",
    ),
}

# Modules copied into a study's / series' stored attribute set (for includefield=all and
# matching on attributes that have no column). Group 0x0010 is the Patient module.
STUDY_GROUPS = (0x0010,)
STUDY_EXTRA = {
    tag_for_keyword(k)
    for k in STUDY_KEYS + (
        "SpecificCharacterSet", "TimezoneOffsetFromUTC", "PatientAge", "PatientSize",
        "PatientWeight", "AdmittingDiagnosesDescription", "ProcedureCodeSequence",
        "NameOfPhysiciansReadingStudy", "IssuerOfAccessionNumberSequence",
        "ReferencedStudySequence", "RequestingPhysician", "InstitutionName",
    )
}
SERIES_EXTRA = {
    tag_for_keyword(k)
    for k in SERIES_KEYS + (
        "SpecificCharacterSet", "TimezoneOffsetFromUTC", "SeriesDate", "SeriesTime",
        "Laterality", "ProtocolName", "OperatorsName", "PerformingPhysicianName",
        "RequestAttributesSequence", "Manufacturer", "ManufacturerModelName", "StationName",
        "FrameOfReferenceUID", "InstitutionName", "InstitutionalDepartmentName",
        "PerformedProcedureStepID", "PerformedProcedureStepDescription",
    )
}

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_TAG_RE = re.compile(r"^[0-9A-Fa-f]{8}$")


def is_valid_uid(value: str) -> bool:
    """PS3.5 9.1: digits and dots, no leading zeros in a component, at most 64 chars."""
    return 0 < len(value) <= 64 and bool(_UID_RE.match(value))


def check_uid(value: str, what: str) -> str:
    """Raise InvalidUID with a reason unless ``value`` is a valid UID; used for URL paths too."""
    if not is_valid_uid(value):
        shown = value if len(value) <= 80 else value[:77] + "..."
        raise InvalidUID(f"{what} {shown!r} is not a valid DICOM UID")
    return value


def parse_tag(key: str) -> int:
    """A keyword ('PatientName') or 8-hex-digit tag ('00100010') to an integer tag."""
    if _TAG_RE.match(key):
        return int(key, 16)
    tag = tag_for_keyword(key)
    if tag is None:
        raise InvalidQuery(f"unknown attribute {key!r}")
    return int(tag)


def parse_path(key: str) -> tuple[int, ...]:
    """'ReferencedStudySequence.ReferencedSOPInstanceUID' or '00081110.00081155' to tags."""
    tags = tuple(parse_tag(part) for part in key.split("."))
    for tag in tags[:-1]:
        if _vr(tag) != "SQ":
            raise InvalidQuery(f"{key!r}: {keyword_for_tag(tag) or hex(tag)} is not a sequence")
    return tags


def keyword(tag: int) -> str:
    return keyword_for_tag(tag) or f"{tag:08X}"


def tag_hex(tag: int) -> str:
    return f"{tag:08X}"


def _vr(tag: int) -> str:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return "UN"


def vr_of(tag: int) -> str:
    """The dictionary VR of a tag ('UN' for private or unknown ones)."""
    return _vr(tag)
