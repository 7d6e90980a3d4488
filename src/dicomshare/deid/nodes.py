"""The walk's view of a dataset, over pydicom (:class:`DatasetNode`) or raw bytes.

The engine has one walk and two representations: a pydicom ``Dataset`` for the library
API and the pixel hook, and :class:`~dicomshare.deid.rawdicom.RawNode` for the fast file
path. Both offer the methods of :class:`Node`, with tags as plain ints and values as
decoded strings, so every rule is implemented once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

from dicomshare.errors import InvalidDicom


class Node(Protocol):
    def tags(self) -> list[int]: ...
    def has(self, tag: int) -> bool: ...
    def vr(self, tag: int) -> str | None: ...
    def is_empty(self, tag: int) -> bool: ...
    def strings(self, tag: int, vr: str) -> list[str]: ...
    def first(self, tag: int, vr: str) -> str: ...
    def is_sequence(self, tag: int) -> bool: ...
    def items(self, tag: int) -> list[Any]: ...
    def delete(self, tag: int) -> None: ...
    def put(self, tag: int, vr: str, value: Any) -> None: ...
    def creator(self, tag: int) -> str | None: ...


class DatasetNode:
    """A pydicom ``Dataset`` seen as a :class:`Node`."""

    __slots__ = ("ds",)

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds

    def tags(self) -> list[int]:
        return [int(t) for t in self.ds.keys()]

    def has(self, tag: int) -> bool:
        return tag in self.ds

    def vr(self, tag: int) -> str | None:
        return self.ds.get_item(tag).VR

    def is_empty(self, tag: int) -> bool:
        elem = self.ds.get_item(tag)
        if isinstance(elem, RawDataElement):
            return elem.length == 0
        if elem.VR == "SQ":
            return len(elem.value) == 0
        return bool(elem.is_empty)

    def strings(self, tag: int, vr: str) -> list[str]:
        value = self.ds[tag].value
        if value is None:
            return []
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        values = list(value) if isinstance(value, MultiValue | list) else [value]
        return [str(v).rstrip(" \x00") for v in values]

    def first(self, tag: int, vr: str) -> str:
        if tag not in self.ds or self.ds[tag].VR == "SQ":
            return ""
        values = self.strings(tag, vr)
        return values[0] if values else ""

    def is_sequence(self, tag: int) -> bool:
        return self.ds[tag].VR == "SQ"

    def items(self, tag: int) -> list[DatasetNode]:
        value = self.ds[tag].value
        if not isinstance(value, Sequence | list):
            raise InvalidDicom(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) is not a sequence")
        return [DatasetNode(item) for item in value]

    def delete(self, tag: int) -> None:
        del self.ds[tag]

    def put(self, tag: int, vr: str, value: Any) -> None:
        if vr == "SQ":
            raise ValueError("sequences are changed through their items")
        self.ds[tag] = DataElement(tag, vr, value)

    def creator(self, tag: int) -> str | None:
        if tag not in self.ds:
            return None
        value = self.ds[tag].value
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        return str(value).strip(" \x00")


def getter(node: Node) -> Callable[[str], list[str]]:
    """``get(keyword)``: a node's values of a standard attribute, [] when absent."""
    def get(keyword: str) -> list[str]:
        tag = tag_for_keyword(keyword)
        if tag is None or not node.has(tag):
            return []
        vr = str(dictionary_VR(tag))
        if vr == "SQ" or node.is_empty(tag):
            return []
        return node.strings(tag, vr)
    return get
