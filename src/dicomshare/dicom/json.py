"""DICOM JSON (PS3.18 Annex F) of a data set, as pydicom makes it, in a fraction of the time.

``DataElement.to_json_dict`` rebuilds VR sets, re-derives ``VM`` several times and formats a
log message per element; at ingest that was a large share of the CPU per instance. This
module walks the data set once, with the same rules, and hands any value shape it does not
know to pydicom itself, so the output is always pydicom's.
"""

from __future__ import annotations

from base64 import b64encode
from io import BufferedIOBase
from typing import Any

from pydicom.dataelem import DataElement, empty_value_for_VR
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import AMBIGUOUS_VR, BYTES_VR, FLOAT_VR, INT_VR, VR, PersonName

# The VR sets exactly as DataElement.to_json_dict and jsonrep.convert_to_python_number use them.
_BINARY = frozenset((BYTES_VR | AMBIGUOUS_VR) - {VR.US_SS})
_INT = frozenset((INT_VR - {VR.AT}) | {VR.US_SS})
_FLOAT = frozenset(FLOAT_VR)


class _Dropped(Exception):
    """pydicom itself fails here, so the whole top-level element is left out.

    Raised when reading a nested element fails, or pydicom's own conversion of it does:
    retrying would not be the same as pydicom's single pass (a failed read may leave a
    half-converted element behind).
    """


def values(ds: dict[str, Any], tag: str) -> list[Any]:
    """The values of an attribute in DICOM JSON (``[]`` when absent or empty)."""
    return list((ds.get(tag) or {}).get("Value") or [])


def first(ds: dict[str, Any], tag: str) -> Any:
    """The first value of an attribute in DICOM JSON, or None."""
    found = (ds.get(tag) or {}).get("Value") or [None]
    return found[0]


def dataset_to_json(ds: Dataset, bulkdata_threshold: int) -> dict[str, Any]:
    """DICOM JSON of every top-level element whose value converts; the others are left out.

    Equal to ``{f"{t:08X}": ds[t].to_json_dict(None, bulkdata_threshold)}`` over
    ``ds.keys()``, skipping elements that raise. Touches no pydicom settings.
    """
    out: dict[str, Any] = {}
    for tag in ds.keys():
        try:
            elem = ds[tag]
        except Exception:  # noqa: BLE001 - an unreadable element is left out
            continue
        try:
            out[f"{tag:08X}"] = _element(elem, bulkdata_threshold)
        except _Dropped:
            continue
        except Exception:  # noqa: BLE001 - let pydicom decide: it raises too, or it knows better
            try:
                out[f"{tag:08X}"] = elem.to_json_dict(None, bulkdata_threshold)
            except Exception:  # noqa: BLE001
                continue
    return out


def _item(item: Dataset, threshold: int) -> dict[str, Any]:
    """One sequence item, as ``Dataset.to_json_dict`` does it (any failure fails the item)."""
    out: dict[str, Any] = {}
    for key in item.keys():
        try:
            elem = item[key]
        except Exception as exc:
            raise _Dropped from exc
        out[f"{key:08X}"] = _element(elem, threshold)
    return out


def _pydicom(elem: DataElement, threshold: int) -> dict[str, Any]:
    """pydicom's own conversion, for the value shapes the fast path leaves alone."""
    try:
        return elem.to_json_dict(None, threshold)
    except Exception as exc:
        raise _Dropped from exc


def _element(elem: DataElement, threshold: int) -> dict[str, Any]:
    """One element; the branches and their order follow ``DataElement.to_json_dict``."""
    vr = elem.VR
    value = elem.value
    if vr in _BINARY:
        if type(value) is not bytes:
            return _pydicom(elem, threshold)
        if not value:
            return {"vr": vr}
        # No bulk data handler: pydicom inlines every binary value, whatever its size.
        return {"vr": vr, "InlineBinary": b64encode(value).decode("utf-8")}
    if vr == VR.SQ:
        return {"vr": vr, "Value": [_item(item, threshold) for item in value]}

    # The values DataElement.VM counts: none, one, or the items of a multi-value.
    values: list[Any]
    if value is None:
        return {"vr": vr}
    if isinstance(value, str):  # the disjoint cases in order of frequency
        if not value:
            return {"vr": vr}
        values = [value]
    elif isinstance(value, int | float):
        values = [value]
    elif isinstance(value, MultiValue | list | tuple):
        values = _multiple(value)
    elif isinstance(value, bytes | PersonName):
        if not value:
            return {"vr": vr}
        values = [value]
    elif isinstance(value, BufferedIOBase):
        return _pydicom(elem, threshold)
    else:
        try:
            iter(value)
        except TypeError:
            values = [value]
        else:
            values = _multiple(value)
    if not values:
        return {"vr": vr}

    if vr in _INT:
        return {"vr": vr, "Value": [
            int(v) if v is not None else empty_value_for_VR(vr) for v in values]}
    if vr in _FLOAT:
        return {"vr": vr, "Value": [
            float(v) if v is not None else empty_value_for_VR(vr) for v in values]}
    if vr == VR.PN:
        return {"vr": vr, "Value": [_person_name(v) for v in values]}
    if vr == VR.AT:
        return {"vr": vr, "Value": [format(v, "08X") for v in values]}
    return {"vr": vr, "Value": values}


def _multiple(value: Any) -> list[Any]:
    """The values of an iterable value: VM 1 wraps the value itself, as pydicom does."""
    count = len(value)
    return list(value) if count > 1 else [value] if count else []


def _person_name(name: PersonName) -> dict[str, str]:
    """PS3.18 F.2.2 component groups; absent trailing groups stay absent."""
    components = name.components
    groups = {"Alphabetic": components[0]}
    if len(components) > 1:
        groups["Ideographic"] = components[1]
    if len(components) > 2:
        groups["Phonetic"] = components[2]
    return groups
