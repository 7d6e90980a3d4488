"""wire.py writes what pynetdicom would write, byte for byte (its encoders are the reference)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file
from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta, encode, encode_file_meta, split_dataset
from pynetdicom.pdu import P_DATA_TF

from dicomshare.dimse import wire

CT = "1.2.840.10008.5.1.4.1.1.2"
UIDS = ["1.2.3", "1.2.840.113619.2.55.3.604688119.969.1268071029.320",  # odd, even length
        "1.2.826.0.1.3680043.8.498.1234567890123456789012345678901234567"]


def _command_bytes(message: C_STORE_RQ | C_STORE_RSP, primitive: C_STORE) -> bytes:
    message.primitive_to_message(primitive)
    return bytes(encode(message.command_set, True, True))  # type: ignore[arg-type]


@pytest.mark.parametrize("sop_uid", UIDS)
@pytest.mark.parametrize("originator", [None, ("MOVESCU", 7), ("A_SIXTEEN_CHARS_", 65535)])
def test_c_store_request(sop_uid: str, originator: tuple[str, int] | None) -> None:
    primitive = C_STORE()
    primitive.MessageID = 12
    primitive.Priority = 2
    primitive.AffectedSOPClassUID = CT
    primitive.AffectedSOPInstanceUID = sop_uid
    primitive.DataSet = io.BytesIO(b"\0\0")
    if originator:
        primitive.MoveOriginatorApplicationEntityTitle = originator[0]
        primitive.MoveOriginatorMessageID = originator[1]
    ours = wire.c_store_rq(CT, sop_uid, 12, 2, *(originator or (None, None)))
    assert ours == _command_bytes(C_STORE_RQ(), primitive)


@pytest.mark.parametrize("sop_uid", UIDS)
@pytest.mark.parametrize("status", [0x0000, 0xB000, 0xA700])
def test_c_store_response(sop_uid: str, status: int) -> None:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = 65535
    primitive.AffectedSOPClassUID = CT
    primitive.AffectedSOPInstanceUID = sop_uid
    primitive.Status = status
    assert wire.c_store_rsp(CT, sop_uid, 65535, status) == _command_bytes(C_STORE_RSP(),
                                                                          primitive)


@pytest.mark.parametrize("max_pdu", [0, 16384, 64 * 1024 + 3])
def test_message_is_pynetdicoms_pdus(max_pdu: int, tmp_path: Path) -> None:
    """Same PDUs as pynetdicom's fragmentation of a file's data set, including a data set
    that ends exactly on a fragment boundary and one larger than a send chunk."""
    for length in (1, 16378, 5 * 1024 * 1024 + 11):
        path = tmp_path / f"data{length}"
        path.write_bytes(b"DICM" + bytes(range(256)) * (length // 256) + b"x" * (length % 256))
        command = wire.c_store_rq(CT, UIDS[0], 3, 0)
        primitive = C_STORE()
        primitive.MessageID, primitive.Priority = 3, 0
        primitive.AffectedSOPClassUID, primitive.AffectedSOPInstanceUID = CT, UIDS[0]
        primitive._dataset_path = (path, 4)  # type: ignore[attr-defined]
        message = C_STORE_RQ()
        message.primitive_to_message(primitive)
        expected = b"".join(P_DATA_TF(p).encode() for p in message.encode_msg(1, max_pdu))
        with open(path, "rb") as f:
            f.seek(4)
            chunks = list(wire.message(1, command, max_pdu, f, path.stat().st_size - 4))
        assert b"".join(chunks) == expected
        assert all(len(c) <= wire.CHUNK + 2 * max(max_pdu, path.stat().st_size) for c in chunks)


def test_message_of_a_truncated_file_fails(tmp_path: Path) -> None:
    path = tmp_path / "short"
    path.write_bytes(b"abc")
    with open(path, "rb") as f, pytest.raises(EOFError):
        list(wire.message(1, b"cmd", 16384, f, 10))


@pytest.mark.parametrize("sop_uid", UIDS)
@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.4.50",
                                    "1.2.840.10008.1.2.4.201"])
def test_file_meta_is_pynetdicoms(sop_uid: str, syntax: str) -> None:
    """The Part 10 header of a received object decides its bytes, so its SHA-256 key:
    the same object must keep the same key as before (and as a STOW of pynetdicom's file)."""
    meta = create_file_meta(sop_class_uid=CT, sop_instance_uid=sop_uid,  # type: ignore[arg-type]
                            transfer_syntax=syntax)  # type: ignore[arg-type]
    assert wire.file_meta(CT, sop_uid, syntax) == b"\0" * 128 + b"DICM" + encode_file_meta(meta)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "rtplan.dcm",
                                  "SC_rgb_rle.dcm", "emri_small_big_endian.dcm"])
def test_data_set_offset_agrees_with_pydicom(name: str) -> None:
    path = Path(str(get_testdata_file(name)))
    assert wire.data_set_offset(path.read_bytes()[:8192]) == split_dataset(path)[1]


def test_data_set_offset_declines_what_it_cannot_read() -> None:
    head = wire.file_meta(CT, UIDS[0], "1.2.840.10008.1.2.1")
    assert wire.data_set_offset(head[:150]) is None  # cut inside the meta elements
    assert wire.data_set_offset(b"\0" * 128 + b"DICX" + head[132:]) is None
    assert wire.data_set_offset(head[:140] + b"\x01\x02" + head[142:]) is None  # not a VR
