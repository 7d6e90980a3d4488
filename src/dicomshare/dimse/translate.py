"""Between DIMSE identifiers and the archive's own types (PS3.4 C.4 on one side, Query and
DICOM JSON on the other).

A C-FIND identifier becomes the same :class:`Query` QIDO-RS builds, so both services
share one matching engine (PS3.4 C.2.2.2): keys with values are matching keys, empty keys
are return keys. Results come back from the index as DICOM JSON and leave as identifiers
holding exactly the requested keys, plus what PS3.4 C.4.1.2.3 always wants returned.
C-MOVE / C-GET identifiers become the unique keys that name what to send. Errors from the
project's tree leave as DIMSE statuses with an ErrorComment.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

from dicomshare.archive import StoreResult
from dicomshare.dicom.attributes import Level, is_valid_uid, keyword, vr_of
from dicomshare.dicom.header import Header
from dicomshare.dicom.matching import Condition, Kind, Query, condition_for
from dicomshare.errors import DicomshareError, Forbidden, InvalidInput, InvalidQuery

log = logging.getLogger(__name__)

PATIENT_ROOT = "Patient Root"
STUDY_ROOT = "Study Root"
# PS3.4 C.6.1 / C.6.2: FIND, MOVE and GET SOP classes of the two models we serve.
MODELS = {
    "1.2.840.10008.5.1.4.1.2.1.1": PATIENT_ROOT, "1.2.840.10008.5.1.4.1.2.1.2": PATIENT_ROOT,
    "1.2.840.10008.5.1.4.1.2.1.3": PATIENT_ROOT,
    "1.2.840.10008.5.1.4.1.2.2.1": STUDY_ROOT, "1.2.840.10008.5.1.4.1.2.2.2": STUDY_ROOT,
    "1.2.840.10008.5.1.4.1.2.2.3": STUDY_ROOT,
}
LEVELS = {
    PATIENT_ROOT: (Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE),
    STUDY_ROOT: (Level.STUDY, Level.SERIES, Level.IMAGE),
}
UNIQUE_KEY = {Level.PATIENT: 0x00100020, Level.STUDY: 0x0020000D,
              Level.SERIES: 0x0020000E, Level.IMAGE: 0x00080018}
QR_LEVEL = 0x00080052
CHARSET = 0x00080005
RETRIEVE_AE = 0x00080054
# Return-only keys: a value sent for them is not a matching condition (PS3.4 C.3.4: the
# NumberOf...Related... counts, the level, the charset, where to retrieve, availability).
_RETURN_ONLY = {QR_LEVEL, CHARSET, RETRIEVE_AE, 0x00080053, 0x00080056, 0x00080201,
                0x00201200, 0x00201202, 0x00201204, 0x00201206, 0x00201208, 0x00201209}
_BINARY = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}


class IdentifierMismatch(InvalidQuery):
    """The identifier does not fit the information model or level (PS3.4 C.4: 0xA900)."""

    failure_reason = 0xA900


@dataclass
class FindRequest:
    """A C-FIND identifier, translated: the query, and the keys to return.

    ``keys`` maps each requested top-level tag to the item keys requested inside it
    (sequences) or None (everything).
    """

    root: str
    query: Query
    keys: dict[int, set[int] | None] = field(default_factory=dict)
    charset_requested: bool = False


@dataclass
class RetrieveRequest:
    """A C-MOVE / C-GET identifier: the level and the unique keys given at each level."""

    root: str
    level: Level
    uids: dict[Level, tuple[str, ...]] = field(default_factory=dict)
    issuer: str | None = None


def model_root(sop_class_uid: str) -> str:
    root = MODELS.get(str(sop_class_uid))
    if root is None:
        raise IdentifierMismatch(f"information model {sop_class_uid} is not supported")
    return root


def query_level(identifier: Dataset, root: str) -> Level:
    """QueryRetrieveLevel, checked against the model (PATIENT only with Patient Root)."""
    raw = identifier.get("QueryRetrieveLevel")
    text = text_of(raw).strip().upper() if raw is not None else ""
    if not text:
        raise IdentifierMismatch("QueryRetrieveLevel is missing")
    try:
        level = Level(text)
    except ValueError:
        raise IdentifierMismatch(f"QueryRetrieveLevel {text[:16]!r} is not valid") from None
    if level not in LEVELS[root]:
        raise IdentifierMismatch(f"level {level.value} is not part of {root}")
    return level


def find_request(identifier: Dataset, root: str) -> FindRequest:
    """The identifier of a C-FIND request as a Query; raises InvalidQuery with a reason."""
    level = query_level(identifier, root)
    request = FindRequest(root, Query(level=level))
    for elem in _elements(identifier):
        tag = int(elem.tag)
        if tag == CHARSET:
            request.charset_requested = True
            continue
        if elem.tag.element == 0 or tag == QR_LEVEL:  # group lengths; the level itself
            continue
        if elem.VR == "SQ":
            items = list(elem.value or [])
            item = items[0] if items else None
            wanted = {int(t) for t in item.keys()} if item is not None and len(item) else None
            request.keys[tag] = wanted
            request.query.include.add(tag)
            if item is not None:
                request.query.conditions += _item_conditions((tag,), item)
            continue
        request.keys[tag] = None
        request.query.include.add(tag)
        if tag in _RETURN_ONLY or elem.VR in _BINARY:
            continue
        cond = _condition((tag,), elem)
        if cond.kind is not Kind.UNIVERSAL:
            request.query.conditions.append(cond)
    return request


def _elements(ds: Dataset) -> Iterable[DataElement]:
    """Every element, decoded; a value pydicom cannot decode is an invalid identifier."""
    out = []
    for tag in list(ds.keys()):
        try:
            out.append(ds[tag])
        except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds here
            raise InvalidQuery(f"cannot decode {keyword(int(tag))}: {exc}") from exc
    return out


def _item_conditions(path: tuple[int, ...], item: Dataset) -> list[Condition]:
    """PS3.4 C.2.2.2.6: keys with values inside a sequence item match inside the items."""
    conds: list[Condition] = []
    for elem in _elements(item):
        sub = (*path, int(elem.tag))
        if elem.VR == "SQ":
            inner = list(elem.value or [])
            if inner:
                conds += _item_conditions(sub, inner[0])
        elif elem.VR not in _BINARY:
            cond = _condition(sub, elem)
            if cond.kind is not Kind.UNIVERSAL:
                conds.append(cond)
    return conds


def _condition(path: tuple[int, ...], elem: DataElement) -> Condition:
    return condition_for(".".join(keyword(t) for t in path), text_of(elem.value))


def text_of(value: Any) -> str:
    """A decoded element value as the string the matching engine takes."""
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(text_of(v) for v in value)
    if isinstance(value, PersonName):
        return str(value).split("=")[0]  # the alphabetic group, as DICOM JSON matching uses
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").strip("\x00 ")
    original = getattr(value, "original_string", None)  # DA/TM/DT converted by pydicom
    return str(original if isinstance(original, str) else value)


def retrieve_request(identifier: Dataset, root: str) -> RetrieveRequest:
    """PS3.4 C.4.2.1.4: the unique keys at the level and above; the level's one is required."""
    level = query_level(identifier, root)
    request = RetrieveRequest(root, level)
    for lvl in LEVELS[root][: LEVELS[root].index(level) + 1]:
        tag = UNIQUE_KEY[lvl]
        raw = identifier.get(tag)
        values = tuple(v.strip() for v in text_of(raw.value if raw is not None else None)
                       .split("\\") if v.strip())
        if not values:
            if lvl is level:
                raise IdentifierMismatch(f"a {level.value} level retrieve needs "
                                         f"{keyword(tag)}")
            continue
        if lvl is not Level.PATIENT:
            for uid in values:
                if not is_valid_uid(uid):
                    raise InvalidQuery(f"{keyword(tag)} {uid[:64]!r} is not a valid UID")
        request.uids[lvl] = values
    issuer = identifier.get("IssuerOfPatientID")
    if issuer is not None and text_of(issuer.value).strip():
        request.issuer = text_of(issuer.value).strip()
    return request


def uid_condition(tag: int, values: Iterable[str]) -> Condition:
    """A UID list condition without the 1024-character limit of query strings."""
    uids = tuple(values)
    if len(uids) == 1:
        return Condition((tag,), Kind.SINGLE, uids[0], "UI")
    return Condition((tag,), Kind.LIST, uids, "UI")


def result_dataset(result: dict[str, Any], request: FindRequest, ae_title: str) -> Dataset:
    """One match (DICOM JSON) as a C-FIND response identifier.

    Holds the requested keys (empty when the match has no value), QueryRetrieveLevel,
    the unique keys of the level and those above, RetrieveAETitle, and a
    SpecificCharacterSet that fits the values: the stored one while they are ASCII,
    ISO_IR 192 (UTF-8) when any is not.
    """
    level = request.query.level
    levels = LEVELS[request.root]
    wanted = dict(request.keys)
    for lvl in levels[: levels.index(level) + 1]:
        wanted.setdefault(UNIQUE_KEY[lvl], None)
    ds = Dataset()
    for tag, items in sorted(wanted.items()):
        element = result.get(f"{tag:08X}")
        if element is not None and items is not None and element.get("vr") == "SQ":
            element = _filter_items(element, items)
        ds.add(_element(tag, element))
    ds.QueryRetrieveLevel = level.value
    ds.RetrieveAETitle = ae_title
    stored = (result.get(f"{CHARSET:08X}") or {}).get("Value")
    if not _is_ascii(ds):
        ds.SpecificCharacterSet = "ISO_IR 192"
    elif stored or request.charset_requested:  # ASCII fits any of them
        ds.SpecificCharacterSet = stored or ""
    return ds


def _filter_items(element: dict[str, Any], keys: set[int]) -> dict[str, Any]:
    wanted = {f"{t:08X}" for t in keys}
    items = [{k: v for k, v in item.items() if k in wanted}
             for item in element.get("Value", []) if isinstance(item, dict)]
    return {"vr": "SQ", "Value": items}


def _element(tag: int, element: dict[str, Any] | None) -> DataElement:
    """The JSON element as pydicom's, or an empty element of the dictionary VR."""
    if element is not None:
        try:
            return Dataset.from_json({f"{tag:08X}": element})[tag]
        except Exception:  # noqa: BLE001 - a stored value pydicom cannot take: send it empty
            pass
    vr = (element or {}).get("vr") or vr_of(tag)
    vr = vr.split(" or ")[0]
    empty: Any = [] if vr == "SQ" else b"" if vr in _BINARY else ""
    return DataElement(tag, vr, empty)


def _is_ascii(ds: Dataset) -> bool:
    for elem in ds.iterall():
        value = elem.value
        if isinstance(value, PersonName):
            value = str(value)
        if isinstance(value, MultiValue | list):
            value = "".join(str(v) for v in value)
        if isinstance(value, str) and not value.isascii():
            return False
    return True


# -- statuses: the error tree on the wire -------------------------------------------------
_STORE_STATUSES = {0x0111, 0x0124, 0xA700, 0xA900, 0xC000}
_UIDS = re.compile(r"'?\b\d+(\.\d+){3,}\b'?")


class DataSetMismatch(InvalidInput):
    """The received data set is not the SOP Instance its C-STORE request names (0xA900)."""

    failure_reason = 0xA900


def check_names(expected: tuple[str, str], header: Header) -> None:
    """PS3.4 B.2.3: the data set must be the SOP Instance the C-STORE request names."""
    sop_class, sop_uid = expected
    if header.sop_uid != sop_uid:
        raise DataSetMismatch(f"SOPInstanceUID {header.sop_uid} is not the Affected SOP "
                              f"Instance UID {sop_uid}")
    if header.sop_class_uid != sop_class:
        raise DataSetMismatch(f"SOPClassUID {header.sop_class_uid} is not the Affected SOP "
                              f"Class UID {sop_class}")


def store_status(result: StoreResult) -> int | Dataset:
    """The C-STORE status of a stored or refused object (table in dimse/scp.py)."""
    if result.error is None:
        return 0x0000
    code = result.error.failure_reason
    if code not in _STORE_STATUSES:
        code = 0xC000 if isinstance(result.error, InvalidInput) else 0xA700
    return failure(code, result.error.reason)


def query_failure(exc: BaseException) -> Dataset:
    """C-FIND / C-MOVE / C-GET failure: 0xA900 when the identifier does not fit the model,
    0xC000 for a value the archive cannot match, 0xA700 when the archive is unavailable."""
    if isinstance(exc, IdentifierMismatch):
        return failure(0xA900, exc.reason)
    if isinstance(exc, Forbidden):
        return failure(0x0124, exc.reason)
    if isinstance(exc, InvalidQuery | InvalidInput):
        return failure(0xC000, exc.reason)
    if isinstance(exc, DicomshareError):
        return failure(0xA700, exc.reason)
    log.error("query failed", exc_info=exc)
    return failure(0xC001, f"unable to process: {type(exc).__name__}")


def failure(status: int, reason: str) -> Dataset:
    """A status with its ErrorComment: LO, 64 characters, so without the UIDs (the
    requester knows them; the server log has the full reason)."""
    ds = Dataset()
    ds.Status = status
    text = " ".join(_UIDS.sub("", reason.replace("\\", "/")).split())
    ds.ErrorComment = text if len(text) <= 64 else text[:61] + "..."
    return ds


def commitment_request(info: Dataset) -> tuple[str, list[tuple[str, str]]]:
    """A Storage Commitment N-ACTION's Action Information: the transaction UID and the
    (SOP Class UID, SOP Instance UID) pairs it asks about (PS3.4 J.3.2)."""
    transaction = str(info.get("TransactionUID", "") or "").strip()
    if not is_valid_uid(transaction):
        raise InvalidInput("TransactionUID is missing or not a valid UID")
    refs = []
    for item in info.get("ReferencedSOPSequence") or []:
        sop_class = str(item.get("ReferencedSOPClassUID", "") or "").strip()
        sop_uid = str(item.get("ReferencedSOPInstanceUID", "") or "").strip()
        if not (is_valid_uid(sop_class) and is_valid_uid(sop_uid)):
            raise InvalidInput("a ReferencedSOPSequence item lacks valid SOP Class and "
                               "Instance UIDs")
        refs.append((sop_class, sop_uid))
    if not refs:
        raise InvalidInput("ReferencedSOPSequence is empty")
    return transaction, refs


def chunks(values: Iterable[str], size: int = 500) -> Iterator[tuple[str, ...]]:
    """UID lists in pieces an IN (...) clause takes on every database."""
    it = iter(values)
    while chunk := tuple(islice(it, size)):
        yield chunk


def first_value(row: dict[str, Any], tag: str) -> str:
    """The first value of an attribute in a DICOM JSON search result."""
    return str(row[tag]["Value"][0])
