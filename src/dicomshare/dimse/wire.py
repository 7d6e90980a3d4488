"""The bytes of the few DIMSE messages every instance costs, encoded directly.

pynetdicom builds each command set as a pydicom Dataset, encodes it through pydicom's
writer, and cuts a data set into P-DATA primitives that each pass through a queue, the
upper layer's state machine and a PDU object before reaching the socket: for a 512 KiB
CT slice over a 16 KiB PDU that is ~33 trips, a third of a C-MOVE's time. What is sent
per instance is always the same shape (C-STORE-RQ with its data set, C-STORE-RSP with a
status), so this module writes those bytes with ``struct``: command sets in Implicit VR
Little Endian (PS3.7 6.3.1, E.1), P-DATA-TF PDUs (PS3.8 9.3.5) and the Part 10 header
of a received object. tests/test_dimse_wire.py checks each against pynetdicom's own
encoding, byte for byte. Anything less common still goes through pynetdicom.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import BinaryIO

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

PREAMBLE = b"\x00" * 128 + b"DICM"
C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
DATA_SET_PRESENT = 0x0001  # CommandDataSetType (PS3.7 E.1): anything but 0x0101
NO_DATA_SET = 0x0101
# Message control header of a PDV (PS3.8 E.2): bit 0 command, bit 1 last fragment.
DATA, DATA_LAST, COMMAND, COMMAND_LAST = 0x00, 0x02, 0x01, 0x03
CHUNK = 4 * 1024 * 1024  # bytes of PDUs handed to the socket at once


def _padded(text: str, pad: bytes) -> bytes:
    raw = text.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def _implicit(tag: int, value: bytes) -> bytes:
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def command_set(elements: dict[int, bytes]) -> bytes:
    """An Implicit VR Little Endian command set with its CommandGroupLength."""
    body = b"".join(_implicit(tag, value) for tag, value in sorted(elements.items()))
    return _implicit(0x00000000, struct.pack("<I", len(body))) + body


def c_store_rq(sop_class_uid: str, sop_instance_uid: str, message_id: int, priority: int,
               move_originator_aet: str | None = None,
               move_originator_id: int | None = None) -> bytes:
    elements = {
        0x00000002: _padded(sop_class_uid, b"\0"),
        0x00000100: struct.pack("<H", C_STORE_RQ),
        0x00000110: struct.pack("<H", message_id),
        0x00000700: struct.pack("<H", priority),
        0x00000800: struct.pack("<H", DATA_SET_PRESENT),
        0x00001000: _padded(sop_instance_uid, b"\0"),
    }
    if move_originator_aet is not None:
        elements[0x00001030] = _padded(move_originator_aet, b" ")
    if move_originator_id is not None:
        elements[0x00001031] = struct.pack("<H", move_originator_id)
    return command_set(elements)


def c_store_rsp(sop_class_uid: str | None, sop_instance_uid: str | None,
                message_id_responded_to: int, status: int) -> bytes:
    elements = {
        0x00000100: struct.pack("<H", C_STORE_RSP),
        0x00000120: struct.pack("<H", message_id_responded_to),
        0x00000800: struct.pack("<H", NO_DATA_SET),
        0x00000900: struct.pack("<H", status),
    }
    if sop_class_uid:
        elements[0x00000002] = _padded(sop_class_uid, b"\0")
    if sop_instance_uid:
        elements[0x00001000] = _padded(sop_instance_uid, b"\0")
    return command_set(elements)


def p_data_tf(context_id: int, control: int, fragment: bytes | memoryview) -> bytes:
    """One P-DATA-TF PDU holding one PDV."""
    n = len(fragment)
    return struct.pack(">BBIIBB", 0x04, 0x00, n + 6, n + 2, context_id, control) + fragment


def fragment_size(max_pdu: int, length: int) -> int:
    """The largest PDV value that fits the peer's maximum PDU length (0: unlimited)."""
    return max(length, 1) if max_pdu == 0 else max_pdu - 6


def message(context_id: int, command: bytes, max_pdu: int,
            data: BinaryIO | None = None, length: int = 0) -> Iterator[bytes]:
    """The PDUs of one DIMSE message, in chunks of about CHUNK bytes: the command set,
    then ``length`` bytes of the data set read from ``data`` (if any)."""
    out: list[bytes] = []
    size = 0
    step = fragment_size(max_pdu, len(command))
    for start in range(0, len(command), step):
        last = start + step >= len(command)
        out.append(p_data_tf(context_id, COMMAND_LAST if last else COMMAND,
                             command[start:start + step]))
    if data is None:
        yield b"".join(out)
        return
    step = fragment_size(max_pdu, length)
    left = length
    while left > 0:
        fragment = data.read(min(step, left))
        if not fragment:
            raise EOFError(f"the data set ended {left} bytes early")
        left -= len(fragment)
        out.append(p_data_tf(context_id, DATA if left else DATA_LAST, fragment))
        size += len(fragment)
        if size >= CHUNK and left:
            yield b"".join(out)
            out, size = [], 0
    yield b"".join(out)


def file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """Preamble and File Meta Information (Explicit VR Little Endian) as pynetdicom
    writes it for a received C-STORE data set."""
    def short(tag: int, vr: bytes, value: bytes) -> bytes:
        return struct.pack("<HH2sH", 0x0002, tag, vr, len(value)) + value

    body = (struct.pack("<HH2sHI", 0x0002, 0x0001, b"OB", 0, 2) + b"\x00\x01"
            + short(0x0002, b"UI", _padded(sop_class_uid, b"\0"))
            + short(0x0003, b"UI", _padded(sop_instance_uid, b"\0"))
            + short(0x0010, b"UI", _padded(transfer_syntax_uid, b"\0"))
            + short(0x0012, b"UI", _padded(PYNETDICOM_IMPLEMENTATION_UID, b"\0"))
            + short(0x0013, b"SH", _padded(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")))
    return PREAMBLE + short(0x0000, b"UL", struct.pack("<I", len(body))) + body


_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
             b"UT", b"UV"}


def data_set_offset(head: bytes) -> int | None:
    """Where the data set starts in a Part 10 file, from its first bytes: past the last
    group 0002 element (Explicit VR Little Endian, PS3.10 7.1); None when ``head`` does
    not hold all of them or they are not well formed (the caller asks pydicom)."""
    if head[128:132] != b"DICM":
        return None
    pos = 132
    while pos + 8 <= len(head):
        group, _, vr = struct.unpack_from("<HH2s", head, pos)
        if group != 0x0002:
            return pos
        if vr in _LONG_VRS:
            if pos + 12 > len(head):
                return None
            pos += 12 + int(struct.unpack_from("<I", head, pos + 8)[0])
        elif vr.isalpha() and vr.isupper():
            pos += 8 + int(struct.unpack_from("<H", head, pos + 6)[0])
        else:
            return None
    return None
