"""DICOM read and written as bytes, without pydicom objects: the fast path of the engine.

:func:`parse_file` splits a PS3.10 file into element records that point into the input
bytes; :class:`RawNode` gives the engine's walk what it needs (tags, VRs, values, items)
and records replacements; :func:`serialize` emits the result as a list of chunks, most of
them slices of the input, so untouched elements (always the pixel data) are copied, never
decoded. Building pydicom datasets costs more than de-identifying them, which is why this
path exists; the engine falls back to pydicom (``Unsupported``) for anything unusual:
deflated or damaged files, encodings that contradict the meta header, truncated values.
"""

from __future__ import annotations

import struct
from typing import Any

from pydicom.charset import convert_encodings, decode_bytes, encode_string
from pydicom.datadict import dictionary_VR

ITEM, ITEM_END, SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
UNDEFINED = 0xFFFFFFFF
LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT"})
VALID_VRS = LONG_VRS | {"AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO",
                        "LT", "PN", "SH", "SL", "SS", "ST", "SV", "TM", "UI", "UL", "US", "UV"}
ASCII_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI"})
_NUMBER_WIDTH = {"US": 2, "SS": 2, "UL": 4, "SL": 4, "FL": 4, "AT": 4, "FD": 8, "SV": 8,
                 "UV": 8}
_PN_DELIMITERS = {0x5C, 0x3D, 0x5E}
_TEXT_DELIMITERS = {0x5C}
_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_BE = "1.2.840.10008.1.2.2"
_DEFLATED = frozenset({"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.8.1"})
_VRS: dict[int, str] = {}


class Unsupported(Exception):
    """This file needs pydicom's reader (it is unusual, or damaged)."""


def dict_vr(tag: int) -> str:
    """The data dictionary's VR, "" for unknown (and private) tags."""
    found = _VRS.get(tag)
    if found is None:
        try:
            found = str(dictionary_VR(tag)) if not tag & 0x10000 else ""
        except KeyError:
            found = ""
        _VRS[tag] = found
    return found


class Elem:
    """One element: where it is in the input, or what replaces it."""

    __slots__ = ("vr", "start", "vstart", "vend", "end", "items", "value", "extra")

    def __init__(self, vr: str | None, start: int, vstart: int) -> None:
        self.vr = vr  # as written (None in implicit VR)
        self.start, self.vstart, self.vend, self.end = start, vstart, vstart, vstart
        self.items: list[RawNode] | None = None  # parsed sequence items
        self.value: bytes | None = None  # a replacement value (encoded)
        self.extra: list[bytes] = []  # encoded items appended to a sequence


class _Codec:
    """Header packing for one encoding."""

    def __init__(self, implicit: bool, little: bool) -> None:
        self.implicit, self.little = implicit, little
        e = "<" if little else ">"
        self.tag = struct.Struct(e + "HH")
        self.u16, self.u32 = struct.Struct(e + "H"), struct.Struct(e + "L")
        self.implicit_head = struct.Struct(e + "HHL")
        self.short_head = struct.Struct(e + "HH2sH")
        self.long_head = struct.Struct(e + "HH2s2xL")

    def header(self, tag: int, vr: str | None, length: int) -> bytes:
        if self.implicit:
            return self.implicit_head.pack(tag >> 16, tag & 0xFFFF, length)
        code = vr or "UN"
        if code in LONG_VRS or length > 0xFFFF:
            code = code if code in LONG_VRS else "UN"
            return self.long_head.pack(tag >> 16, tag & 0xFFFF, code.encode(), length)
        return self.short_head.pack(tag >> 16, tag & 0xFFFF, code.encode(), length)

    def mark(self, tag: int, length: int = 0) -> bytes:
        return self.implicit_head.pack(tag >> 16, tag & 0xFFFF, length)


_CODECS = {(i, le): _Codec(i, le) for i in (False, True) for le in (False, True)}


class RawNode:
    """A dataset or sequence item: its elements by tag, and the encoding they are in."""

    __slots__ = ("buf", "implicit", "little", "charset", "elems", "dirty")

    def __init__(self, buf: Any, implicit: bool, little: bool, charset: list[str]) -> None:
        self.buf = buf
        self.implicit, self.little, self.charset = implicit, little, charset
        self.elems: dict[int, Elem] = {}
        self.dirty = False

    # -- reading ----------------------------------------------------------------------------
    def tags(self) -> list[int]:
        return list(self.elems)

    def has(self, tag: int) -> bool:
        return tag in self.elems

    def vr(self, tag: int) -> str | None:
        return self.elems[tag].vr

    def raw(self, tag: int) -> bytes:
        el = self.elems[tag]
        return el.value if el.value is not None else bytes(self.buf[el.vstart:el.vend])

    def is_empty(self, tag: int) -> bool:
        el = self.elems[tag]
        if el.items is not None:
            return not el.items and not el.extra
        return (len(el.value) if el.value is not None else el.vend - el.vstart) == 0

    def strings(self, tag: int, vr: str) -> list[str]:
        """The values, decoded with the character set in force (padding stripped)."""
        data = self.raw(tag)
        if vr in ASCII_VRS or vr == "UI":
            text = data.decode("ascii", "replace")
            return [v.strip(" \x00") for v in text.split("\\")]
        delimiters = _PN_DELIMITERS if vr == "PN" else _TEXT_DELIMITERS
        text = decode_bytes(data, self.charset, delimiters)
        if vr in ("LT", "ST", "UT", "UR"):
            return [text.rstrip(" \x00")]
        return [v.rstrip(" \x00") for v in text.split("\\")]

    def first(self, tag: int, vr: str) -> str:
        """The first value, "" when absent or empty."""
        if tag not in self.elems or self.elems[tag].items is not None:
            return ""
        values = self.strings(tag, vr)
        return values[0] if values else ""

    def is_sequence(self, tag: int) -> bool:
        return self.elems[tag].items is not None

    def items(self, tag: int) -> list[RawNode]:
        items = self.elems[tag].items
        if items is None:
            raise Unsupported(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) is not a readable sequence")
        return items

    # -- changing ---------------------------------------------------------------------------
    def delete(self, tag: int) -> None:
        del self.elems[tag]
        self.dirty = True

    def put(self, tag: int, vr: str, value: Any) -> None:
        """Replace (or add) an element with ``value``: text, a list of texts, bytes, a
        number (only 0 is ever used: dummies) or None/"" for an empty value."""
        if value is None or value == "" or value == b"":
            data = b""
        elif isinstance(value, bytes):
            data = value
        elif isinstance(value, int | float):
            data = b"\x00" * _NUMBER_WIDTH.get(vr, 2) if vr in _NUMBER_WIDTH else \
                str(value).encode("ascii")
        else:
            text = "\\".join(value) if isinstance(value, list) else str(value)
            data = text.encode("ascii") if text.isascii() else \
                encode_string(text, self.charset)
        if len(data) % 2:
            data += b" " if vr not in ("UI", "OB", "UN") else b"\x00"
        el = self.elems.get(tag)
        if el is None:
            el = self.elems[tag] = Elem(vr, -1, -1)
        el.vr, el.value, el.items = vr, data, None
        self.dirty = True

    def append_item(self, tag: int, encoded_item: bytes) -> None:
        """Add an encoded item (with its item header) at the end of a sequence."""
        el = self.elems[tag]
        if el.items is None:
            raise Unsupported("not a sequence")
        el.extra.append(encoded_item)
        self.dirty = True

    def creator(self, tag: int) -> str | None:
        if tag not in self.elems:
            return None
        return self.raw(tag).decode("latin-1").strip(" \x00")


# -- parsing ------------------------------------------------------------------------------
def parse_file(data: Any) -> tuple[RawNode, RawNode, str]:
    """(file meta, dataset, transfer syntax UID) of a PS3.10 file; Unsupported if the fast
    path should not handle it."""
    buf = memoryview(data)
    if len(buf) >= 132 and bytes(buf[128:132]) == b"DICM":
        pos = 132
    elif len(buf) >= 8 and bytes(buf[0:2]) == b"\x02\x00":
        pos = 0  # meta without a preamble
    else:
        raise Unsupported("no PS3.10 header")
    meta = RawNode(buf, False, True, ["iso8859"])
    while pos + 8 <= len(buf) and bytes(buf[pos:pos + 2]) == b"\x02\x00":
        pos = _element(meta, pos, len(buf), False)
    if 0x00020010 not in meta.elems:
        raise Unsupported("no transfer syntax")
    syntax = meta.strings(0x00020010, "UI")[0]
    if syntax in _DEFLATED:
        raise Unsupported("deflated")
    implicit, little = syntax == _IMPLICIT_LE, syntax != _EXPLICIT_BE
    if pos + 6 <= len(buf) and not implicit:
        vr = bytes(buf[pos + 4:pos + 6])
        if not (vr.isalpha() and vr.isupper()):
            raise Unsupported("dataset encoding contradicts the transfer syntax")
    ds = RawNode(buf, implicit, little, ["iso8859"])
    _dataset(ds, pos, len(buf), False)
    return meta, ds, syntax


def _dataset(node: RawNode, pos: int, end: int, until_delimiter: bool) -> int:
    """Parse elements into ``node`` from ``pos``; returns the position after them."""
    codec = _CODECS[(node.implicit, node.little)]
    buf = node.buf
    while pos < end:
        if pos + 8 > end:
            raise Unsupported("truncated element header")
        group, element = codec.tag.unpack_from(buf, pos)
        if group == 0xFFFE:
            if (group << 16 | element) == ITEM_END and until_delimiter:
                return pos + 8
            raise Unsupported("unexpected delimiter")
        pos = _element(node, pos, end, True)
    if until_delimiter:
        raise Unsupported("item without its delimiter")
    return pos


def _element(node: RawNode, pos: int, end: int, charset_aware: bool) -> int:
    codec = _CODECS[(node.implicit, node.little)]
    buf = node.buf
    group, element = codec.tag.unpack_from(buf, pos)
    tag = group << 16 | element
    if node.implicit:
        vr: str | None = None
        (length,) = codec.u32.unpack_from(buf, pos + 4)
        vstart = pos + 8
    else:
        vr = bytes(buf[pos + 4:pos + 6]).decode("latin-1")
        if vr not in VALID_VRS:
            raise Unsupported(f"invalid VR {vr!r}")
        if vr in LONG_VRS:
            (length,) = codec.u32.unpack_from(buf, pos + 8)
            vstart = pos + 12
        else:
            (length,) = codec.u16.unpack_from(buf, pos + 6)
            vstart = pos + 8
    el = Elem(vr, pos, vstart)
    known = dict_vr(tag)
    sequence = vr == "SQ" or (vr is None and known == "SQ") or (vr == "UN" and known == "SQ")
    if length == UNDEFINED and vr in (None, "UN") and not sequence:
        # undefined length with no VR to go by: a sequence if an item follows (PS3.5 6.2.2)
        if vstart + 4 <= end and codec.tag.unpack_from(buf, vstart) == (0xFFFE, 0xE000):
            sequence = True
    if sequence:
        inner = (True, True) if vr == "UN" else (node.implicit, node.little)
        el.items, el.end = _sequence(node, vstart, length, end, inner)
        el.vend = el.end
    elif length == UNDEFINED:  # encapsulated pixel data: fragments up to a delimiter
        p = vstart
        while True:
            if p + 8 > end:
                raise Unsupported("encapsulated value without its delimiter")
            g, e = codec.tag.unpack_from(buf, p)
            (n,) = codec.u32.unpack_from(buf, p + 4)
            if (g, e) == (0xFFFE, 0xE0DD):
                el.vend, el.end = p, p + 8
                break
            if (g, e) != (0xFFFE, 0xE000) or n == UNDEFINED:
                raise Unsupported("malformed encapsulated value")
            p += 8 + n
    else:
        el.vend = el.end = vstart + length
        if el.end > end:
            raise Unsupported("value runs past the end")
    node.elems[tag] = el
    if tag == 0x00080005 and charset_aware:
        values = [v for v in node.strings(tag, "CS") if v] or ["ISO_IR 6"]
        node.charset = convert_encodings(values)
    return el.end


def _sequence(parent: RawNode, vstart: int, length: int, end: int,
              encoding: tuple[bool, bool]) -> tuple[list[RawNode], int]:
    codec = _CODECS[encoding]
    buf = parent.buf
    items: list[RawNode] = []
    undefined = length == UNDEFINED
    limit = end if undefined else vstart + length
    if limit > end:
        raise Unsupported("sequence runs past the end")
    p = vstart
    while p < limit:
        if p + 8 > limit:
            raise Unsupported("truncated item")
        g, e = codec.tag.unpack_from(buf, p)
        (n,) = codec.u32.unpack_from(buf, p + 4)
        if (g, e) == (0xFFFE, 0xE0DD) and undefined:
            return items, p + 8
        if (g, e) != (0xFFFE, 0xE000):
            raise Unsupported("sequence without items")
        item = RawNode(buf, encoding[0], encoding[1], parent.charset)
        if n == UNDEFINED:
            p = _dataset(item, p + 8, limit, True)
        else:
            if p + 8 + n > limit:
                raise Unsupported("item runs past its sequence")
            _dataset(item, p + 8, p + 8 + n, False)
            p += 8 + n
        items.append(item)
    if undefined:
        raise Unsupported("sequence without its delimiter")
    return items, limit


# -- writing ------------------------------------------------------------------------------
def serialize(node: RawNode, out: list[Any]) -> None:
    """Append ``node``'s encoding to ``out`` (chunks: bytes or slices of the input)."""
    codec = _CODECS[(node.implicit, node.little)]
    buf = node.buf
    for tag in sorted(node.elems):
        el = node.elems[tag]
        if el.value is not None:
            out.append(codec.header(tag, el.vr, len(el.value)))
            out.append(el.value)
        elif el.items is not None and (el.extra or any(map(_dirty, el.items))):
            out.append(codec.header(tag, el.vr or "SQ", UNDEFINED))
            for item in el.items:
                inner = _CODECS[(item.implicit, item.little)]
                out.append(inner.mark(ITEM, UNDEFINED))
                serialize(item, out)
                out.append(inner.mark(ITEM_END))
            out.extend(el.extra)
            inner = _CODECS[(el.items[0].implicit, el.items[0].little)] if el.items else codec
            out.append(inner.mark(SEQ_END))
        else:
            out.append(buf[el.start:el.end])


def _dirty(node: RawNode) -> bool:
    if node.dirty:
        return True
    for el in node.elems.values():
        if el.items is not None and (el.extra or any(map(_dirty, el.items))):
            node.dirty = True
            return True
    return False
