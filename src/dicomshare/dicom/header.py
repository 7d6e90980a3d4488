"""Read what the archive needs from a stored Part 10 file: identity, index keys, metadata.

Large binary values (pixel data, waveforms, overlays) are never loaded: they are deferred
by pydicom and written into the metadata as ``BulkDataURI: bulk/<tag>`` placeholders,
which the web layer later turns into full URLs (PS3.18 F.2.6).
"""

from __future__ import annotations

import json
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicomshare.dicom.attributes import (
    INSTANCE_KEYS,
    PATIENT_KEYS,
    SERIES_EXTRA,
    SERIES_KEYS,
    STUDY_EXTRA,
    STUDY_GROUPS,
    STUDY_KEYS,
    is_valid_uid,
    keyword,
    tag_hex,
    vr_of,
)
from dicomshare.dicom.json import dataset_to_json
from dicomshare.errors import InvalidDicom, InvalidUID, MissingAttribute

BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN", "OB or OW", "US or OW"}
UNDEFINED = 0xFFFFFFFF
DEFLATED = "1.2.840.10008.1.2.1.99"
_WARNINGS_LOCK = threading.Lock()


@dataclass
class Header:
    """Everything ingest and the index need from one instance; built once per store."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    values: dict[str, Any]  # flat index keys (keyword -> str | int | None)
    metadata: dict[str, Any]  # full DICOM JSON with bulk placeholders
    study_json: dict[str, Any] = field(default_factory=dict)
    series_json: dict[str, Any] = field(default_factory=dict)

    def metadata_text(self) -> str:
        return json.dumps(self.metadata, separators=(",", ":"), ensure_ascii=False)

    @property
    def issuer_universal_id(self) -> str | None:
        return issuer_universal_id(self.study_json)


def issuer_universal_id(ds: dict[str, Any]) -> str | None:
    """``UniversalEntityID&UniversalEntityIDType`` of IssuerOfPatientIDQualifiersSequence
    in DICOM JSON (HL7's HD form without the namespace), or None: the identity of an
    issuer that two sites may spell differently in IssuerOfPatientID."""
    try:
        item = ((ds.get("00100024") or {}).get("Value") or [{}])[0]
        uid = ((item.get("00400032") or {}).get("Value") or [""])[0]
        kind = ((item.get("00400033") or {}).get("Value") or [""])[0]
    except (AttributeError, IndexError, TypeError):
        return None
    uid = str(uid or "").strip()[:64]
    return f"{uid}&{str(kind or '').strip()[:16]}" if uid else None


def read_header(path: Path, bulkdata_threshold: int = 1024) -> Header:
    """Parse and validate; raise InvalidDicom / MissingAttribute / InvalidUID with a reason."""
    try:
        # catch_warnings swaps process-wide state: one thread at a time (reading is ~0.2 ms).
        with _WARNINGS_LOCK, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(path, defer_size=bulkdata_threshold)
        for warning in caught:
            if "End of file" in str(warning.message):
                raise InvalidDicom(f"truncated DICOM file: {warning.message}")
        file_meta = ds.file_meta
        # A deflated data set is inflated in memory: offsets are not file offsets then.
        deflated = str(getattr(file_meta, "TransferSyntaxUID", "")) == DEFLATED
        size = None if deflated else path.stat().st_size
        if size is not None:
            _check_complete(ds, size)
        bulk = _take_bulk(ds, bulkdata_threshold, size)
        # Touch every remaining element now, so truncation or corruption is found here.
        # Nested binary values above the threshold (rare: icon images) stay inline.
        metadata = dataset_to_json(ds, bulkdata_threshold)
    except InvalidDicomError as exc:
        raise InvalidDicom(f"not a DICOM Part 10 file: {exc}") from exc
    except (EOFError, OSError, ValueError, KeyError, TypeError, AttributeError,
            NotImplementedError, OverflowError) as exc:
        raise InvalidDicom(f"cannot parse DICOM data set: {exc}") from exc
    for tag, vr in bulk.items():
        metadata[tag_hex(tag)] = {"vr": vr, "BulkDataURI": f"bulk/{tag_hex(tag)}"}
    metadata = dict(sorted(metadata.items()))

    uids = {}
    for name in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        value = _text(ds.get(name))
        if not value:
            raise MissingAttribute(f"{name} is missing or empty")
        if not is_valid_uid(value):
            raise InvalidUID(f"{name} {value[:80]!r} is not a valid DICOM UID")
        uids[name] = value
    tsuid = str(getattr(file_meta, "TransferSyntaxUID", "") or "")
    if not tsuid:
        raise InvalidDicom("file meta information has no TransferSyntaxUID")

    values: dict[str, Any] = {}
    for name in PATIENT_KEYS + STUDY_KEYS + SERIES_KEYS + INSTANCE_KEYS:
        values[name] = _scalar(ds, name)
    return Header(
        study_uid=uids["StudyInstanceUID"],
        series_uid=uids["SeriesInstanceUID"],
        sop_uid=uids["SOPInstanceUID"],
        sop_class_uid=uids["SOPClassUID"],
        transfer_syntax_uid=tsuid,
        values=values,
        metadata=metadata,
        study_json=_subset(metadata, lambda t: (t >> 16) in STUDY_GROUPS or t in STUDY_EXTRA),
        series_json=_subset(metadata, lambda t: t in SERIES_EXTRA),
    )


def _check_complete(ds: Dataset, file_size: int) -> None:
    """The last top-level element must end exactly where the file ends.

    pydicom stops quietly when a file is cut inside an element's header or value; a
    defined-length last element tells where the data set really ends.
    """
    if not len(ds):
        return
    tag = max(ds.keys())  # elements are stored in tag order
    raw = ds.get_item(tag, keep_deferred=True)
    tell, length = getattr(raw, "value_tell", None), getattr(raw, "length", None)
    last = (tell, length, int(tag))
    if tell is None or length is None or length == UNDEFINED:
        return  # a parsed sequence, or undefined length: pydicom warns on a lost delimiter
    end = tell + length
    if end != file_size:
        what = "needs" if end > file_size else "ends at"
        raise InvalidDicom(
            f"truncated DICOM file: the data set {what} {end} bytes (after "
            f"{keyword(last[2])}), the file has {file_size}")


def _take_bulk(ds: Dataset, threshold: int, file_size: int | None) -> dict[int, str]:
    """Remove large top-level binary elements (unread) and return their tags and VRs.

    A deferred value that would end past the end of the file means a truncated upload.
    """
    bulk: dict[int, str] = {}
    for tag in list(ds.keys()):
        raw = ds.get_item(tag, keep_deferred=True)
        vr = str(raw.VR) if raw.VR else vr_of(int(tag))
        if vr not in BINARY_VRS:
            continue
        length = getattr(raw, "length", None)
        if length is None:  # already a converted element
            value = raw.value
            length = len(value) if value is not None else 0
        tell = getattr(raw, "value_tell", None)
        if (file_size is not None and tell is not None and length != UNDEFINED
                and tell + length > file_size):
            raise InvalidDicom(
                f"truncated DICOM file: {keyword(int(tag))} needs {length} bytes at offset "
                f"{tell}, the file has {file_size}"
            )
        if length > threshold or length == UNDEFINED:
            if vr in ("OB or OW", "US or OW"):
                vr = "OB" if length == UNDEFINED else "OW"
            bulk[int(tag)] = vr
            del ds[tag]
    return bulk


def _subset(metadata: dict[str, Any], keep: Any) -> dict[str, Any]:
    return {k: v for k, v in metadata.items() if keep(int(k, 16))}


def _text(value: Any) -> str:
    if value is None:
        return ""
    return str(value).strip().rstrip("\x00")


def _scalar(ds: Dataset, name: str) -> Any:
    """First value of an attribute as str or int, for index columns; None when absent."""
    value = ds.get(name)
    if value is None or value == "":
        return None
    if isinstance(value, pydicom.multival.MultiValue):
        value = value[0] if len(value) else None
        if value is None:
            return None
    if name in ("Rows", "Columns", "BitsAllocated", "NumberOfFrames", "SeriesNumber",
                "InstanceNumber"):
        try:
            return int(value)
        except (TypeError, ValueError):
            return None
    text = _text(value)
    return text or None
