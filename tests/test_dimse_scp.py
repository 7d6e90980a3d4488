"""The DICOM network service of ``dicomshare serve``, driven by DCMTK tools and pynetdicom.

One server for the module. Every caller registers its AE title first (the server refuses
unknown callers). The sample files are copied with fresh UIDs, so each object is unique
in the archive, and sent as they are: whatever comes back (WADO-RS, C-MOVE, C-GET) must
be the same data set bytes.
"""

from __future__ import annotations

import copy
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE, AllStoragePresentationContexts, _config, build_context, build_role, evt
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode

import conftest
from conftest import Server, free_port, read_full, split_multipart
from dicomshare.archive import Archive
from dicomshare.config import load_settings
from dicomshare.dicom.attributes import Level
from dicomshare.dicom.matching import Query, condition_for
from dicomshare.dimse import wire

pytestmark = pytest.mark.skipif(shutil.which("echoscu") is None, reason="DCMTK is not installed")

CT = UID("1.2.840.10008.5.1.4.1.1.2")
MR = UID("1.2.840.10008.5.1.4.1.1.4")
VERIFICATION = UID("1.2.840.10008.1.1")
PATIENT_FIND = UID("1.2.840.10008.5.1.4.1.2.1.1")
STUDY_FIND = UID("1.2.840.10008.5.1.4.1.2.2.1")
PATIENT_MOVE = UID("1.2.840.10008.5.1.4.1.2.1.2")
STUDY_MOVE = UID("1.2.840.10008.5.1.4.1.2.2.2")
STUDY_GET = UID("1.2.840.10008.5.1.4.1.2.2.3")
COMMITMENT = UID("1.2.840.10008.1.20.1")
COMMITMENT_INSTANCE = UID("1.2.840.10008.1.20.1.1")
ALL_SYNTAXES = [str(uid) for uid in pydicom.uid.AllTransferSyntaxes]
CALLERS = ("ECHOSCU", "STORESCU", "FINDSCU", "MOVESCU", "GETSCU", "PYSCU")
# Sample files in their own transfer syntaxes (pydicom and pydicom-data).
SAMPLES = (
    "CT_small.dcm",  # explicit VR little endian
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "image_dfl.dcm",  # deflated
    "JPGExtended.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline
    "MR_small_jpeg_ls_lossless.dcm",
    "JPEGLSNearLossless_08.dcm",
    "MR_small_jp2klossless.dcm",
    "JPEG2000.dcm",
    "MR_small_RLE.dcm",
    "SC_rgb_rle_2frame.dcm",  # multi-frame RLE
    "emri_small.dcm",  # multi-frame, pydicom-data
)


# -- helpers ------------------------------------------------------------------------------
def sample(name: str) -> str:
    return conftest.testdata(name)  # not imported by name: pytest would collect it


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"{args[0]} failed ({result.returncode}):\n{result.stdout}\n"
                             f"{result.stderr}")
    return result


def dataset_bytes(data: bytes) -> bytes:
    """The encoded data set of a Part 10 file: what follows the File Meta group."""
    assert data[128:132] == b"DICM"
    assert data[132:136] == b"\x02\x00\x00\x00", "no File Meta Information Group Length"
    return data[144 + int.from_bytes(data[140:144], "little"):]


def comparable(data: bytes) -> bytes:
    """The data set bytes of a Part 10 file, inflated when deflated (storescp -B
    re-deflates: its deflated bytes are not the ones it received)."""
    syntax = pydicom.dcmread(BytesIO(data), stop_before_pixels=True).file_meta
    return inflated(str(syntax.TransferSyntaxUID), dataset_bytes(data))


def inflated(syntax: str, data: bytes) -> bytes:
    if syntax == DeflatedExplicitVRLittleEndian:
        return zlib.decompressobj(-zlib.MAX_WBITS).decompress(data)
    return data


def unique_copy(name: str, folder: Path, study_uid: str, **values: Any) -> Path:
    """A sample file with new UIDs (and optional attribute values), same encoding."""
    ds = read_full(sample(name))
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for key, value in values.items():
        setattr(ds, key, value)
    path = folder / name
    ds.save_as(path)
    return path


def associate(server: Server, contexts: list[Any], title: str = "PYSCU",
              **kwargs: Any) -> Association:
    ae = AE(title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", server.dicom_port, contexts=contexts,
                         ae_title=server.ae_title, **kwargs)
    assert assoc.is_established, "association refused"
    return assoc


def wado(server: Server, study: str, series: str, sop: str) -> bytes:
    r = server.session().get(
        f"{server.dicomweb}/studies/{study}/series/{series}/instances/{sop}",
        headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    assert r.status_code == 200, r.text
    (_, body), = split_multipart(r)
    return body


def find(server: Server, *keys: str, model: str = "-S", folder: Path) -> list[Dataset]:
    """findscu, each response written to a file (-X) and read back."""
    out = folder / f"find{len(list(folder.glob('find*')))}"
    out.mkdir()
    run("findscu", model, "-aet", "FINDSCU", "-aec", server.ae_title, "-X", "-od", str(out),
        "127.0.0.1", str(server.dicom_port), *[a for k in keys for a in ("-k", k)])
    return [pydicom.dcmread(p, force=True) for p in sorted(out.glob("rsp*.dcm"))]


def wait_for(condition: Any, what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


class StoreSCP:
    """A pynetdicom storage SCP keeping the data set bytes exactly as they arrived."""

    def __init__(self, title: str = "PYSTORE") -> None:
        self.title = title
        self.port = free_port()
        self.received: dict[str, bytes] = {}  # SOP UID -> data set (see comparable)
        ae = AE(title)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_SYNTAXES)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event: evt.Event) -> int:
        request = event.request
        self.received[str(request.AffectedSOPInstanceUID)] = inflated(
            str(event.context.transfer_syntax), request.DataSet.getvalue())
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()


# -- fixtures -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dicom(server: Server) -> Server:
    for title in CALLERS:
        server.cli("ae", "add", title, "--host", "127.0.0.1", "--port", "1")
    return server


@pytest.fixture(scope="module")
def sent(dicom: Server, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The samples, each sent in its own transfer syntax; name -> the data set as it went
    over the wire.

    dcmsend proposes each file's syntax but re-encodes the data set (OB pixel data,
    defined sequence lengths...), so it sends the same to a bit-preserving storescp,
    whose file is what was sent. It would convert implicit VR and big endian to explicit
    VR little endian: those two go through pynetdicom, file bytes as they are.
    """
    folder = tmp_path_factory.mktemp("samples")
    study = generate_uid()
    files = {name: unique_copy(name, folder, study) for name in SAMPLES}
    native = ["MR_small_implicit.dcm", "MR_small_bigendian.dcm"]
    names = [n for n in files if n not in native]
    capture = folder / "capture"
    with storescp_process("CAPTURE", capture) as port:
        for title, to in (("CAPTURE", port), (dicom.ae_title, dicom.dicom_port)):
            result = run("dcmsend", "-v", "-aet", "STORESCU", "-aec", title, "127.0.0.1",
                         str(to), *(str(files[n]) for n in names))
            log = result.stdout + result.stderr
            assert log.count("Received C-STORE Response (Success)") == len(names), log
            assert "Converting transfer syntax" not in log  # each went in its own syntax
    wire = {str(read_full(str(p)).SOPInstanceUID): p for p in capture.iterdir()}
    out = {n: wire[str(read_full(str(files[n])).SOPInstanceUID)] for n in names}
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    assoc = associate(dicom, [build_context(MR, ImplicitVRLittleEndian),
                              build_context(MR, ExplicitVRBigEndian)])
    try:
        for name in native:
            assert assoc.send_c_store(files[name]).Status == 0x0000
            out[name] = files[name]
    finally:
        assoc.release()
        _config.STORE_SEND_CHUNKED_DATASET = chunked
    return out


@pytest.fixture(scope="module")
def catalog(dicom: Server, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two patients, three studies, stored through a pynetdicom SCU."""
    base = read_full(sample("CT_small.dcm"))
    spec = [  # patient name, id, age, study date, modality, instances
        ("DOE^JOHN", "PID-DOE", "045Y", "20200115", "CT", 2),
        ("DOE^JOHN", "PID-DOE", "046Y", "20210610", "MR", 1),
        ("ROE^JANE", "PID-ROE", "030Y", "20220301", "CT", 1),
        ("Müller^Jürgen", "MUE-1", "060Y", "20230101", "MR", 1),  # stored as ISO_IR 100
    ]
    studies: list[tuple[str, str, list[str]]] = []
    datasets = []
    for name, pid, age, date, modality, count in spec:
        study, series = generate_uid(), generate_uid()
        sops = [generate_uid() for _ in range(count)]
        studies.append((study, series, sops))
        for number, sop in enumerate(sops, 1):
            ds = copy.deepcopy(base)
            ds.PatientName, ds.PatientID, ds.PatientAge = name, pid, age
            ds.StudyDate, ds.Modality, ds.InstanceNumber = date, modality, number
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, sop
            ds.file_meta.MediaStorageSOPInstanceUID = sop
            datasets.append(ds)
    assoc = associate(dicom, [build_context(CT, ExplicitVRLittleEndian)])
    try:
        for ds in datasets:
            assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()
    return {"studies": studies}


@contextmanager
def storescp_process(title: str, out: Path) -> Iterator[int]:
    """DCMTK storescp accepting every syntax, writing the data sets bit for bit."""
    port = free_port()
    out.mkdir()
    process = subprocess.Popen(["storescp", "-aet", title, "+xa", "+B", "-od", str(out),
                                str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: run("echoscu", "-aec", title, "127.0.0.1", str(port),
                             check=False).returncode == 0, "storescp")
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def storescp(dicom: Server, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    out = tmp_path / "received"
    with storescp_process("STORESCP", out) as port:
        dicom.cli("ae", "add", "STORESCP", "--host", "127.0.0.1", "--port", str(port),
                  "--replace")
        yield "STORESCP", out


def assert_same_data_sets(received: dict[str, bytes], sent: dict[str, Path]) -> None:
    """Each received data set (see comparable) equals the sent one, byte for byte."""
    expected = {str(read_full(str(p)).SOPInstanceUID): p for p in sent.values()}
    assert set(received) == set(expected)
    for sop, data in received.items():
        assert data == comparable(expected[sop].read_bytes()), expected[sop].name


# -- association --------------------------------------------------------------------------
def test_echo_and_who_may_connect(dicom: Server) -> None:
    port = str(dicom.dicom_port)
    run("echoscu", "-aet", "ECHOSCU", "-aec", dicom.ae_title, "127.0.0.1", port)
    refused = run("echoscu", "-aet", "LATECOMER", "-aec", dicom.ae_title, "127.0.0.1", port,
                  check=False)
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stdout + refused.stderr
    wrong = run("echoscu", "-aet", "ECHOSCU", "-aec", "SOMEONEELSE", "127.0.0.1", port,
                check=False)
    assert "Called AE Title Not Recognized" in wrong.stdout + wrong.stderr
    dicom.cli("ae", "add", "LATECOMER", "--host", "127.0.0.1", "--port", "1")  # no restart
    run("echoscu", "-aet", "LATECOMER", "-aec", dicom.ae_title, "127.0.0.1", port)


def test_each_presentation_context_is_judged_on_its_own(dicom: Server) -> None:
    syntaxes = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian,
                DeflatedExplicitVRLittleEndian, *(f"1.2.840.10008.1.2.4.{n}" for n in (
                    50, 51, 57, 70, 80, 81, 90, 91, 201, 202, 203)), "1.2.840.10008.1.2.5"]
    contexts = [build_context(CT, ts) for ts in syntaxes]
    contexts.append(build_context("1.2.826.0.1.3680043.9.9999.1"))  # unknown SOP class
    contexts.append(build_context(MR, ["1.2.3.4.5.6", ImplicitVRLittleEndian]))
    assoc = associate(dicom, contexts)
    try:
        accepted = {str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts
                    if cx.abstract_syntax == CT}
        assert accepted == {str(ts) for ts in syntaxes}
        assert [cx.abstract_syntax for cx in assoc.rejected_contexts] == [
            "1.2.826.0.1.3680043.9.9999.1"]
        mr = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == MR]
        assert [str(cx.transfer_syntax[0]) for cx in mr] == [ImplicitVRLittleEndian]
        # The proposer's first choice wins when it offers several.
        assoc.release()
        assoc = associate(dicom, [build_context(CT, ["1.2.840.10008.1.2.4.90",
                                                     ExplicitVRLittleEndian])])
        assert str(assoc.accepted_contexts[0].transfer_syntax[0]) == "1.2.840.10008.1.2.4.90"
    finally:
        assoc.release()


# -- C-STORE ------------------------------------------------------------------------------
def test_stored_bytes_are_the_sent_bytes(dicom: Server, sent: dict[str, Path]) -> None:
    for name, path in sent.items():
        ds = read_full(str(path))
        body = wado(dicom, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        assert comparable(body) == comparable(path.read_bytes()), name
        stored = pydicom.dcmread(BytesIO(body))
        assert stored.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID, name
        assert stored == ds, name


def test_storescu_and_duplicates(dicom: Server, tmp_path: Path) -> None:
    path = unique_copy("CT_small.dcm", tmp_path, generate_uid())
    port = str(dicom.dicom_port)
    run("storescu", "-aet", "STORESCU", "-aec", dicom.ae_title, "127.0.0.1", port, str(path))
    again = run("storescu", "-v", "-aet", "STORESCU", "-aec", dicom.ae_title, "127.0.0.1",
                port, str(path))
    assert "Received Store Response (Success)" in again.stderr
    ds = read_full(str(path))  # same SOP Instance UID, different content
    ds.PatientName = "SOMEONE^ELSE"
    assoc = associate(dicom, [build_context(CT, ExplicitVRLittleEndian)])
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    assert status.Status == 0x0111
    assert "already stored" in status.ErrorComment
    body = wado(dicom, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert pydicom.dcmread(BytesIO(body)).PatientName == read_full(str(path)).PatientName


def test_malformed_data_sets_are_refused_with_a_reason(dicom: Server, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Files sent as they are on disk (pynetdicom's chunked mode) reach the server
    unchecked: no SOP Instance UID, one that is not the request's, or no DICOM at all."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    base = read_full(sample("CT_small.dcm"))
    cases: dict[str, tuple[int, str]] = {}

    def save(name: str, ds: Dataset) -> Path:
        path = tmp_path / name
        ds.save_as(path, enforce_file_format=False)
        return path

    no_sop = copy.deepcopy(base)
    no_sop.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    del no_sop.SOPInstanceUID
    cases[str(save("no_sop.dcm", no_sop))] = (0xA900, "SOPInstanceUID")
    other = copy.deepcopy(base)
    other.SOPInstanceUID = generate_uid()
    other.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    cases[str(save("other.dcm", other))] = (0xA900, "Affected SOP Instance")
    no_study = copy.deepcopy(base)
    no_study.SOPInstanceUID = no_study.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    del no_study.StudyInstanceUID
    cases[str(save("no_study.dcm", no_study))] = (0xA900, "StudyInstanceUID")
    junk = tmp_path / "junk.dcm"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CT, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    with open(junk, "wb") as f:
        f.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(f, meta)
        f.write(b"\x08\x00\x16\x00UI\xff\x7f" + b"\x01" * 64)  # a value longer than the data
    cases[str(junk)] = (0xC000, "")
    assoc = associate(dicom, [build_context(CT, ExplicitVRLittleEndian)])
    try:
        for path, (code, words) in cases.items():
            status = assoc.send_c_store(Path(path))
            assert status.Status == code, (path, status)
            assert words in status.ErrorComment and len(status.ErrorComment) <= 64
    finally:
        assoc.release()
    run("echoscu", "-aet", "ECHOSCU", "-aec", dicom.ae_title, "127.0.0.1",
        str(dicom.dicom_port))


def test_one_audit_record_per_study_of_an_association(dicom: Server) -> None:
    """A modality's series is audited as one ``study.store`` per study (PS3.15 A.5.3.2
    DICOM Instances Transferred), with the counts, not once per instance."""
    base = read_full(sample("CT_small.dcm"))
    studies = [generate_uid(), generate_uid()]
    assoc = associate(dicom, [build_context(CT, ExplicitVRLittleEndian)])
    try:
        for study, count in zip(studies, (3, 2), strict=True):
            series = generate_uid()
            for _ in range(count):
                ds = copy.deepcopy(base)
                ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
                assert assoc.send_c_store(ds).Status == 0x0000
        assert assoc.send_c_store(ds).Status == 0x0000  # the last one again: already there
    finally:
        assoc.release()
    session = dicom.session()
    for study, stored, present in ((studies[0], 3, 0), (studies[1], 2, 1)):
        records: list[dict[str, Any]] = []
        deadline = time.monotonic() + 10  # written by the audit writer, after the release
        while not records and time.monotonic() < deadline:
            r = session.get(f"{dicom.url}/api/audit",
                            params={"action": "study.store", "study": study})
            assert r.status_code == 200, r.text
            records = r.json()
            time.sleep(0.1)
        assert len(records) == 1, records
        assert (records[0]["actor_user"], records[0]["actor_kind"]) == ("AE PYSCU", "ae")
        assert records[0]["details"]["stored"] == stored
        assert records[0]["details"]["already_present"] == present


def test_a_quiet_association_is_audited_while_it_stays_open(dicom: Server) -> None:
    """A modality that sends a study and keeps its association open: the study's
    ``study.store`` record (and new-study notice) does not wait for the release."""
    ds = read_full(sample("CT_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    session = dicom.session()
    assoc = associate(dicom, [build_context(CT, ExplicitVRLittleEndian)])
    try:
        assert assoc.send_c_store(ds).Status == 0x0000
        records: list[dict[str, Any]] = []
        deadline = time.monotonic() + 10
        while not records and time.monotonic() < deadline:
            r = session.get(f"{dicom.url}/api/audit",
                            params={"action": "study.store", "study": ds.StudyInstanceUID})
            assert r.status_code == 200, r.text
            records = r.json()
            time.sleep(0.2)
        assert assoc.is_established  # still open: written because it went quiet
        assert [rec["details"]["stored"] for rec in records] == [1]
    finally:
        assoc.release()
    time.sleep(0.5)  # the release writes nothing more: the result was reported once
    r = session.get(f"{dicom.url}/api/audit",
                    params={"action": "study.store", "study": ds.StudyInstanceUID})
    assert len(r.json()) == 1, r.json()


def _pdu(context_id: int, fragments: list[tuple[int, bytes]]) -> bytes:
    """A P-DATA-TF PDU of several PDVs (message control header, value), as DCMTK and
    other peers may send them; pynetdicom sends one PDV per PDU."""
    items = b"".join(struct.pack(">LBB", len(value) + 2, context_id, control) + value
                     for control, value in fragments)
    return struct.pack(">BBL", 0x04, 0, len(items)) + items


def test_a_data_set_in_pdus_of_several_pdvs_is_stored_as_sent(dicom: Server) -> None:
    """Data set fragments, several to a PDU and the last one beside others in its PDU,
    are written in order: the stored object is the bytes sent."""
    ds = read_full(sample("CT_small.dcm"))
    ds.SOPInstanceUID = generate_uid()
    data = encode(ds, False, True)
    assert data is not None
    pieces = [data[i:i + 997] for i in range(0, len(data), 997)]
    assoc = associate(dicom, [build_context(CT, ExplicitVRLittleEndian)])
    assoc._reactor_checkpoint.clear()  # as pynetdicom's send_c_store: we read the response
    wait_for(lambda: assoc._is_paused, "the association's reactor to pause")
    try:
        cx = assoc.accepted_contexts[0].context_id
        sock = assoc.dul.socket
        sock.send(_pdu(cx, [(0x03, wire.c_store_rq(CT, ds.SOPInstanceUID, 7, 2))]))
        body, last = pieces[:-2], pieces[-2:]
        for i in range(0, len(body), 3):
            sock.send(_pdu(cx, [(0x00, piece) for piece in body[i:i + 3]]))
        sock.send(_pdu(cx, [(0x00, last[0]), (0x02, last[1])]))
        _, response = assoc.dimse.get_msg(block=True)
        assert response is not None and response.Status == 0x0000, response
        assert response.MessageIDBeingRespondedTo == 7
    finally:
        assoc._reactor_checkpoint.set()
        assoc.release()
    stored = wado(dicom, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    offset = wire.data_set_offset(stored)
    assert offset is not None and stored[offset:] == data


def test_association_aborted_mid_store_leaves_nothing(dicom: Server) -> None:
    ds = read_full(sample("CT_small.dcm"))
    ds.SOPInstanceUID = generate_uid()
    ds.PixelData = bytes(4_000_000)  # many PDUs
    request = C_STORE()
    request.MessageID, request.Priority = 1, 2
    request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = CT, ds.SOPInstanceUID
    request.DataSet = BytesIO(encode(ds, False, True))
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    temp_dir = dicom.data_dir / "blobs" / "tmp"
    assoc = associate(dicom, [build_context(CT, ExplicitVRLittleEndian)])
    fragments = message.encode_msg(assoc.accepted_contexts[0].context_id, 16382)
    for _ in range(40):  # the command and part of the data set, never the last fragment
        assoc.dul.send_pdu(next(fragments))
    wait_for(lambda: any(temp_dir.glob("*.part")), "the data set to reach a temp blob")
    assoc.abort()
    wait_for(lambda: not any(temp_dir.glob("*.part")), "the temp blob to be discarded")
    r = dicom.session().get(f"{dicom.dicomweb}/instances",
                            params={"SOPInstanceUID": ds.SOPInstanceUID})
    assert r.status_code == 204 or r.json() == []
    run("echoscu", "-aet", "ECHOSCU", "-aec", dicom.ae_title, "127.0.0.1",
        str(dicom.dicom_port))
    assert "ok: index and blobs agree" in dicom.cli("check").stdout


def _serving_process(server: Server, client_port: int) -> int:
    """The pid of the worker process holding the server end of a connection from
    ``client_port`` (from /proc: the socket's inode in /proc/net/tcp and in the fds)."""
    inode = ""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if (int(local.split(":")[1], 16) == server.dicom_port
                and int(remote.split(":")[1], 16) == client_port):
            inode = fields[9]
    assert inode, f"no server socket for client port {client_port}"
    assert server.process is not None
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != server.process.pid:
                continue
            fds = list((stat.parent / "fd").iterdir())
            if any(os.readlink(fd) == f"socket:[{inode}]" for fd in fds):
                return int(stat.parent.name)
        except (OSError, ValueError, IndexError):
            continue
    raise AssertionError(f"no worker holds socket {inode}")


def _workers(server: Server) -> list[int]:
    """The server's worker processes (uvicorn spawns them; not the resource tracker)."""
    assert server.process is not None
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            command = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if parent == server.process.pid and b"spawn_main" in command:
            found.append(int(stat.parent.name))
    return found


def test_associations_are_spread_over_the_workers(dicom: Server) -> None:
    """All workers accept from one listening socket, and a worker that already serves an
    association lets an idle one take the next: four modalities end up two per worker
    (a hash of the addresses, as with SO_REUSEPORT, gave 3+1 or 4+0 in most runs)."""
    assocs = []
    try:
        for _ in range(4):
            assocs.append(associate(dicom, [build_context(CT, ExplicitVRLittleEndian)]))
            time.sleep(0.2)
        ports = [a.dul.socket.socket.getsockname()[1] for a in assocs]
        serving = Counter(_serving_process(dicom, port) for port in ports)
        counts = [serving.get(pid, 0) for pid in _workers(dicom)]
        assert len(counts) > 1 and sum(counts) == 4
        assert max(counts) - min(counts) <= 1, counts  # 2+2 on two CPUs
    finally:
        for a in assocs:
            a.release()


def _rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0])


def test_the_parent_process_only_supervises(dicom: Server) -> None:
    """With several workers, ``serve`` checks, binds and then becomes a small supervisor
    (same process ID): it holds neither the archive's libraries nor their memory."""
    assert dicom.process is not None
    parent, workers = dicom.process.pid, _workers(dicom)
    assert len(workers) > 1
    command = Path(f"/proc/{parent}/cmdline").read_bytes().split(b"\0")
    assert b"dicomshare.supervisor" in command and b"serve" in command, command
    libraries = Path(f"/proc/{parent}/maps").read_text()
    assert "_multiarray_umath" not in libraries and "sqlalchemy" not in libraries
    assert _rss_kib(parent) < min(_rss_kib(pid) for pid in workers) / 2
    run("echoscu", "-aet", "ECHOSCU", "-aec", dicom.ae_title, "127.0.0.1",
        str(dicom.dicom_port))


def test_garbage_on_the_port_does_not_stop_the_listener(dicom: Server) -> None:
    for junk in (b"GET / HTTP/1.1\r\n\r\n", b"\x01\x00\xff\xff\xff\xff" + b"x" * 100, b""):
        with socket.create_connection(("127.0.0.1", dicom.dicom_port), timeout=30) as sock:
            sock.sendall(junk)
    run("echoscu", "-aet", "ECHOSCU", "-aec", dicom.ae_title, "127.0.0.1",
        str(dicom.dicom_port))


# -- C-FIND -------------------------------------------------------------------------------
def test_find_every_level_with_dcmtk(dicom: Server, catalog: dict[str, Any],
                                     tmp_path: Path) -> None:
    (s1, se1, sops1), (s2, _, _), (s3, _, _), _ = catalog["studies"]
    patients = find(dicom, "QueryRetrieveLevel=PATIENT", "PatientName=DOE*", "PatientID",
                    "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
                    "NumberOfPatientRelatedInstances", "PatientBirthDate", model="-P",
                    folder=tmp_path)
    assert len(patients) == 1
    p = patients[0]
    assert (p.PatientID, p.NumberOfPatientRelatedStudies, p.NumberOfPatientRelatedSeries,
            p.NumberOfPatientRelatedInstances) == ("PID-DOE", 2, 2, 3)
    assert p.QueryRetrieveLevel == "PATIENT" and p.RetrieveAETitle == dicom.ae_title
    assert "PatientBirthDate" in p and "StudyDate" not in p  # requested keys only
    by_age = find(dicom, "QueryRetrieveLevel=PATIENT", "PatientAge=030Y", "PatientID",
                  model="-P", folder=tmp_path)  # no column: matched on the stored JSON
    assert [r.PatientID for r in by_age] == ["PID-ROE"]

    for model in ("-S", "-P"):
        studies = find(dicom, "QueryRetrieveLevel=STUDY", "PatientName=DOE*",
                       "StudyInstanceUID", "StudyDate", "ModalitiesInStudy",
                       "NumberOfStudyRelatedInstances", model=model, folder=tmp_path)
        assert {r.StudyInstanceUID for r in studies} == {s1, s2}
        assert {r.StudyInstanceUID: int(r.NumberOfStudyRelatedInstances)
                for r in studies} == {s1: 2, s2: 1}
        if model == "-P":
            assert all(r.PatientID == "PID-DOE" for r in studies)  # unique key above
    in_2020 = find(dicom, "QueryRetrieveLevel=STUDY", "StudyDate=20200101-20201231",
                   "PatientID=PID-*", "StudyInstanceUID", folder=tmp_path)
    assert [r.StudyInstanceUID for r in in_2020] == [s1]
    listed = find(dicom, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={s1}\\{s3}",
                  folder=tmp_path)
    assert {r.StudyInstanceUID for r in listed} == {s1, s3}
    by_modality = find(dicom, "QueryRetrieveLevel=STUDY", "ModalitiesInStudy=MR",
                       "PatientID=PID-*", folder=tmp_path)
    assert [r.StudyInstanceUID for r in by_modality] == [s2]

    series = find(dicom, "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={s1}", "Modality",
                  "SeriesInstanceUID", "NumberOfSeriesRelatedInstances", folder=tmp_path)
    assert [(r.SeriesInstanceUID, r.Modality, r.NumberOfSeriesRelatedInstances)
            for r in series] == [(se1, "CT", 2)]
    images = find(dicom, "QueryRetrieveLevel=IMAGE", "PatientID=PID-DOE",
                  f"StudyInstanceUID={s1}", f"SeriesInstanceUID={se1}", "SOPInstanceUID",
                  "InstanceNumber", model="-P", folder=tmp_path)
    assert [(r.SOPInstanceUID, r.InstanceNumber) for r in images] == [
        (sops1[0], 1), (sops1[1], 2)]
    assert all(r.StudyInstanceUID == s1 and r.PatientID == "PID-DOE" for r in images)


def test_patient_level_search_on_each_backend(database_url: str, tmp_path: Path) -> None:
    """Archive.search at PATIENT level (C-FIND only): studies grouped by PatientID and
    IssuerOfPatientID, counts over all of a patient's studies, paging, and matching on
    attributes without a column."""
    archive = Archive.open(load_settings({"data_dir": tmp_path / "data",
                                          "database_url": database_url, "fsync": False}))
    base = read_full(sample("CT_small.dcm"))
    rows = [  # PatientID, issuer, name, age, instances per series of one study
        ("P1", None, "DOE^JOHN", "045Y", [2, 1]), ("P1", None, "DOE^JOHN", "046Y", [1]),
        ("P1", "OTHER", "DOE^J", "050Y", [1]), ("P2", None, "ROE^JANE", "030Y", [1]),
    ]
    try:
        for pid, issuer, name, age, series in rows:
            study = generate_uid()
            for count in series:
                uid = generate_uid()
                for _ in range(count):
                    ds = copy.deepcopy(base)
                    ds.PatientID, ds.PatientName, ds.PatientAge = pid, name, age
                    ds.PatientComments = "IN TEST"
                    if issuer:
                        ds.IssuerOfPatientID = issuer
                    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, uid
                    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = \
                        generate_uid()
                    path = tmp_path / "in.dcm"
                    ds.save_as(path)
                    assert archive.store_file(path).ok

        def patients(*conds: str, **paging: int) -> list[tuple[Any, ...]]:
            query = Query(Level.PATIENT, [condition_for(*c.split("=")) for c in conds],
                          **paging)  # type: ignore[arg-type]
            return sorted((d["00100020"]["Value"][0], (d["00100021"].get("Value") or [""])[0],
                           *(d[t]["Value"][0] for t in ("00201200", "00201202", "00201204")))
                          for d in archive.search(query))

        assert patients("PatientID=P*") == [
            ("P1", "", 2, 3, 4), ("P1", "OTHER", 1, 1, 1), ("P2", "", 1, 1, 1)]
        assert patients("PatientAge=046Y") == [("P1", "", 2, 3, 4)]  # no column: JSON
        assert patients("PatientName=roe*") == [("P2", "", 1, 1, 1)]
        assert len(patients("PatientID=P*", limit=2)) == 2
        assert len(patients("PatientID=P*", limit=2, offset=2)) == 1
        assert len(patients("PatientComments=IN*", offset=1, limit=5)) == 2
    finally:
        archive.close()


@pytest.mark.filterwarnings("ignore:Invalid value for VR")  # the invalid queries below
def test_find_with_pynetdicom_statuses(dicom: Server, catalog: dict[str, Any]) -> None:
    assoc = associate(dicom, [build_context(STUDY_FIND), build_context(PATIENT_FIND)])

    def ask(model: UID, **keys: Any) -> list[tuple[int, Dataset | None, Dataset]]:
        query = Dataset()
        for key, value in keys.items():
            setattr(query, key, value)
        return [(status.Status, ident, status) for status, ident in
                assoc.send_c_find(query, model)]

    try:
        answers = ask(STUDY_FIND, QueryRetrieveLevel="STUDY", PatientName="doe^john",
                      StudyInstanceUID="", StudyDate="")
        assert [a[0] for a in answers] == [0xFF00, 0xFF00, 0x0000]
        for code, keys, why in [
            (0xA900, {"QueryRetrieveLevel": "PATIENT", "PatientName": ""}, "Study Root"),
            (0xA900, {"PatientName": "DOE*"}, "QueryRetrieveLevel"),
            (0xC000, {"QueryRetrieveLevel": "STUDY", "StudyDate": "2020XX"}, "StudyDate"),
            (0xC000, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "1.2.x"}, "UID"),
        ]:
            (status, _, full), = ask(STUDY_FIND, **keys)
            assert status == code, keys
            assert why in full.ErrorComment
        (_, found, _), _ = ask(STUDY_FIND, QueryRetrieveLevel="STUDY", PatientID="MUE-1",
                               PatientName="")
        assert found.SpecificCharacterSet == "ISO_IR 192"  # what fits any value
        assert found.PatientName == "Müller^Jürgen"
        answers = ask(PATIENT_FIND, QueryRetrieveLevel="PATIENT", PatientID="PID-*",
                      NumberOfPatientRelatedStudies="")
        assert sorted((a[1].PatientID, a[1].NumberOfPatientRelatedStudies)
                      for a in answers if a[1] is not None) == [("PID-DOE", 2), ("PID-ROE", 1)]
    finally:
        assoc.release()


def test_find_can_be_cancelled(dicom: Server, catalog: dict[str, Any]) -> None:
    assoc = associate(dicom, [build_context(STUDY_FIND)])
    try:
        query = Dataset()
        query.QueryRetrieveLevel, query.SOPInstanceUID = "IMAGE", ""
        responses = assoc.send_c_find(query, STUDY_FIND)
        status, _ = next(responses)
        assert status.Status == 0xFF00
        assoc.send_c_cancel(1, query_model=STUDY_FIND)
        statuses = [s.Status for s, _ in responses]
        assert statuses[-1] in (0xFE00, 0x0000)  # cancelled, unless it had just finished
    finally:
        assoc.release()


def test_find_across_pages_while_studies_arrive(dicom: Server) -> None:
    """More matches than one page of the index, and new matching studies stored during the
    C-FIND (each sorts first, pushing the rest back): every match once, none repeated."""
    from test_auth import store

    template = pydicom.dcmread(sample("CT_small.dcm"))

    def instance(date: str) -> tuple[str, bytes]:
        ds = copy.deepcopy(template)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyDate, ds.PatientID = date, "PAGING"
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return ds.StudyInstanceUID, buffer.getvalue()

    before: set[str] = set()
    for _ in range(3):  # 600 studies of 2011, more than one page (500)
        made = [instance("20110101") for _ in range(200)]
        assert store(dicom, *(data for _, data in made)).status_code == 200
        before |= {uid for uid, _ in made}
    stop, arrived = threading.Event(), []

    def keep_storing() -> None:  # studies of 2099: first in the index's order
        while not stop.is_set():
            uid, data = instance("20990101")
            if store(dicom, data).status_code == 200:
                arrived.append(uid)

    writer = threading.Thread(target=keep_storing, daemon=True)
    writer.start()
    try:
        wait_for(lambda: len(arrived) >= 3, "studies arriving")
        assoc = associate(dicom, [build_context(STUDY_FIND)])
        try:
            query = Dataset()
            query.QueryRetrieveLevel, query.PatientID, query.StudyInstanceUID = \
                "STUDY", "PAGING", ""
            found = [str(ds.StudyInstanceUID) for status, ds in
                     assoc.send_c_find(query, STUDY_FIND) if status.Status == 0xFF00]
        finally:
            assoc.release()
        during = len(arrived)
    finally:
        stop.set()
        writer.join(timeout=30)
    assert during > 3, "no study arrived during the C-FIND"
    assert len(found) == len(set(found)), f"{len(found) - len(set(found))} matches repeated"
    assert before <= set(found)


# -- C-MOVE and C-GET ---------------------------------------------------------------------
def test_movescu_to_storescp(dicom: Server, sent: dict[str, Path],
                             storescp: tuple[str, Path]) -> None:
    title, out = storescp
    study = read_full(str(sent["CT_small.dcm"])).StudyInstanceUID
    run("movescu", "-S", "-aet", "MOVESCU", "-aem", title, "-aec", dicom.ae_title,
        "127.0.0.1", str(dicom.dicom_port), "-k", "QueryRetrieveLevel=STUDY",
        "-k", f"StudyInstanceUID={study}")
    received = {str(pydicom.dcmread(p).SOPInstanceUID): comparable(p.read_bytes())
                for p in out.iterdir()}
    assert_same_data_sets(received, sent)

    unknown = run("movescu", "-S", "-aet", "MOVESCU", "-aem", "NOWHERE", "-aec",
                  dicom.ae_title, "127.0.0.1", str(dicom.dicom_port), "-k",
                  "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", check=False)
    assert "MoveDestinationUnknown" in unknown.stdout + unknown.stderr


def test_large_object_moves_and_gets_in_chunks(dicom: Server, tmp_path: Path,
                                               storescp: tuple[str, Path]) -> None:
    """A 12 MiB data set goes out in several 4 MiB chunks of PDUs (wire.py) over a 16 KiB
    PDU limit (storescp's default), with at most two chunks queued: it arrives whole,
    byte for byte, by C-MOVE and by C-GET."""
    ds = read_full(sample("CT_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns = 2048, 3072
    ds.PixelData = bytes(range(256)) * (2048 * 3072 * 2 // 256)
    path = tmp_path / "large.dcm"
    ds.save_as(path)
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    assoc = associate(dicom, [build_context(CT, ExplicitVRLittleEndian)])
    try:
        assert assoc.send_c_store(path).Status == 0x0000
    finally:
        assoc.release()
        _config.STORE_SEND_CHUNKED_DATASET = chunked
    title, out = storescp
    run("movescu", "-S", "-aet", "MOVESCU", "-aem", title, "-aec", dicom.ae_title,
        "127.0.0.1", str(dicom.dicom_port), "-k", "QueryRetrieveLevel=STUDY",
        "-k", f"StudyInstanceUID={ds.StudyInstanceUID}")
    got = tmp_path / "got"
    got.mkdir()
    run("getscu", "-S", "+B", "-aet", "GETSCU", "-aec", dicom.ae_title, "-od", str(got),
        "127.0.0.1", str(dicom.dicom_port), "-k", "QueryRetrieveLevel=STUDY",
        "-k", f"StudyInstanceUID={ds.StudyInstanceUID}")
    expected = comparable(path.read_bytes())
    assert len(expected) > 3 * 4 * 1024 * 1024
    for folder in (out, got):
        (received,) = folder.iterdir()
        assert comparable(received.read_bytes()) == expected


def test_polling_loops_store_and_move_the_same_bytes(tmp_path: Path) -> None:
    """With DICOMSHARE_DICOM_EVENT_LOOPS=false, pynetdicom's own loops and encoders carry
    the C-STORE responses and the C-MOVE sub-operations (wire.py is not used): the same
    statuses and the same bytes arrive."""
    srv = conftest.make_server(tmp_path / "polling", env={
        "DICOMSHARE_DICOM_EVENT_LOOPS": "false", "DICOMSHARE_DICOM_IN_WORKERS": "false"})
    try:
        srv.cli("ae", "add", "STORESCU", "--host", "127.0.0.1", "--port", "1")
        study = generate_uid()
        files = [unique_copy(name, tmp_path, study) for name in ("CT_small.dcm", "MR_small.dcm")]
        chunked = _config.STORE_SEND_CHUNKED_DATASET
        _config.STORE_SEND_CHUNKED_DATASET = True  # the files' data sets as they are
        assoc = associate(srv, [build_context(CT, ExplicitVRLittleEndian),
                                build_context(MR, ExplicitVRLittleEndian)], "STORESCU")
        try:
            assert [assoc.send_c_store(f).Status for f in files] == [0x0000, 0x0000]
        finally:
            assoc.release()
            _config.STORE_SEND_CHUNKED_DATASET = chunked
        out = tmp_path / "moved"
        with storescp_process("STORESCP", out) as port:
            srv.cli("ae", "add", "STORESCP", "--host", "127.0.0.1", "--port", str(port))
            run("movescu", "-S", "-aet", "STORESCU", "-aem", "STORESCP", "-aec", srv.ae_title,
                "127.0.0.1", str(srv.dicom_port), "-k", "QueryRetrieveLevel=STUDY",
                "-k", f"StudyInstanceUID={study}")
        received = sorted(comparable(p.read_bytes()) for p in out.iterdir())
        stored = sorted(comparable(f.read_bytes()) for f in files)
        assert received == stored
    finally:
        srv.stop()


def test_getscu(dicom: Server, sent: dict[str, Path], tmp_path: Path) -> None:
    ct = read_full(str(sent["CT_small.dcm"]))
    j2k = read_full(str(sent["MR_small_jp2klossless.dcm"]))
    for level_keys, extra in [
        (["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={ct.StudyInstanceUID}",
          f"SeriesInstanceUID={ct.SeriesInstanceUID}"], []),
        (["QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={j2k.StudyInstanceUID}",
          f"SeriesInstanceUID={j2k.SeriesInstanceUID}",
          f"SOPInstanceUID={j2k.SOPInstanceUID}"], ["+xv"]),  # prefer JPEG 2000 lossless
    ]:
        out = tmp_path / f"get{len(list(tmp_path.iterdir()))}"
        out.mkdir()
        run("getscu", "-S", "+B", *extra, "-aet", "GETSCU", "-aec", dicom.ae_title, "-od", str(out),
            "127.0.0.1", str(dicom.dicom_port), *[a for k in level_keys for a in ("-k", k)])
        (got,) = out.iterdir()
        source = sent["CT_small.dcm" if not extra else "MR_small_jp2klossless.dcm"]
        assert comparable(got.read_bytes()) == comparable(source.read_bytes())


def test_move_and_get_with_pynetdicom(dicom: Server, sent: dict[str, Path],
                                      catalog: dict[str, Any]) -> None:
    destination = StoreSCP()
    dicom.cli("ae", "add", destination.title, "--host", "127.0.0.1", "--port",
              str(destination.port), "--replace")
    study = read_full(str(sent["CT_small.dcm"])).StudyInstanceUID
    query = Dataset()
    query.QueryRetrieveLevel, query.StudyInstanceUID = "STUDY", study
    try:
        assoc = associate(dicom, [build_context(STUDY_MOVE), build_context(PATIENT_MOVE)])
        try:
            answers = [s for s, _ in assoc.send_c_move(query, destination.title, STUDY_MOVE)]
            statuses = [s.Status for s in answers]
            # Progress for the first sub-operation, then at most every 0.5 s; the final
            # response counts them all.
            assert statuses[-1] == 0x0000 and 1 <= statuses.count(0xFF00) <= len(sent)
            assert answers[-1].NumberOfCompletedSuboperations == len(sent)
            (unknown, _), = assoc.send_c_move(query, "NOWHERE", STUDY_MOVE)
            assert unknown.Status == 0xA801
            bad = Dataset()
            bad.QueryRetrieveLevel = "SERIES"  # no SeriesInstanceUID
            (failure, _), = assoc.send_c_move(bad, destination.title, STUDY_MOVE)
            assert failure.Status == 0xA900 and "SeriesInstanceUID" in failure.ErrorComment
            patient = Dataset()
            patient.QueryRetrieveLevel, patient.PatientID = "PATIENT", "PID-ROE"
            statuses = [s.Status for s, _ in assoc.send_c_move(patient, destination.title,
                                                               PATIENT_MOVE)]
            assert statuses[-1] == 0x0000
        finally:
            assoc.release()
        roe_sop = catalog["studies"][2][2][0]
        assert roe_sop in destination.received
        del destination.received[roe_sop]
        assert_same_data_sets(destination.received, sent)
    finally:
        destination.stop()

    # C-GET: storage contexts with the SCP role, in the stored syntaxes
    files = {n: sent[n] for n in ("MR_small_RLE.dcm", "JPEG2000.dcm", "CT_small.dcm")}
    wanted = [read_full(str(p)) for p in files.values()]
    received: dict[str, bytes] = {}

    def on_store(event: evt.Event) -> int:
        received[str(event.request.AffectedSOPInstanceUID)] = inflated(
            str(event.context.transfer_syntax), event.request.DataSet.getvalue())
        return 0x0000

    contexts = [build_context(STUDY_GET)]
    contexts += [build_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for ds in wanted]
    roles = [build_role(cls, scp_role=True) for cls in {ds.SOPClassUID for ds in wanted}]
    assoc = associate(dicom, contexts, ext_neg=roles,
                      evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        query = Dataset()
        query.QueryRetrieveLevel, query.StudyInstanceUID = "IMAGE", study
        query.SOPInstanceUID = "\\".join(ds.SOPInstanceUID for ds in wanted)
        statuses = [s.Status for s, _ in assoc.send_c_get(query, STUDY_GET)]
        assert statuses[-1] == 0x0000, statuses
    finally:
        assoc.release()
    assert_same_data_sets(received, files)


def test_scu_that_goes_away_during_a_move(dicom: Server, sent: dict[str, Path]) -> None:
    destination = StoreSCP("PYSTORE2")
    dicom.cli("ae", "add", destination.title, "--host", "127.0.0.1", "--port",
              str(destination.port))
    try:
        assoc = associate(dicom, [build_context(STUDY_MOVE)])
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = read_full(str(sent["CT_small.dcm"])).StudyInstanceUID
        responses = assoc.send_c_move(query, destination.title, STUDY_MOVE)
        status, _ = next(responses)
        assert status.Status == 0xFF00
        assoc.abort()
    finally:
        destination.stop()
    run("echoscu", "-aet", "ECHOSCU", "-aec", dicom.ae_title, "127.0.0.1",
        str(dicom.dicom_port))


# -- Storage Commitment -------------------------------------------------------------------
def commitment_request(refs: list[tuple[str, str]]) -> Dataset:
    info = Dataset()
    info.TransactionUID = generate_uid()
    info.ReferencedSOPSequence = []
    for cls, uid in refs:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = cls, uid
        info.ReferencedSOPSequence.append(item)
    return info


def test_storage_commitment(dicom: Server, catalog: dict[str, Any]) -> None:
    (_, _, sops), *_ = catalog["studies"]
    reports: list[tuple[int, Dataset]] = []
    arrived = threading.Event()

    def on_report(event: evt.Event) -> tuple[int, None]:
        reports.append((event.event_type, event.event_information))
        arrived.set()
        return 0x0000, None

    assoc = associate(dicom, [build_context(COMMITMENT)],
                      evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
    try:
        unknown = generate_uid()
        for refs, event_type in [
            ([(CT, sops[0]), (CT, sops[1])], 1),
            ([(CT, sops[0]), (CT, unknown), (MR, sops[1])], 2),
        ]:
            arrived.clear()
            info = commitment_request(refs)
            status, _ = assoc.send_n_action(info, 1, COMMITMENT, COMMITMENT_INSTANCE)
            assert status.Status == 0x0000
            assert arrived.wait(30), "no N-EVENT-REPORT"
            got_type, report = reports[-1]
            assert got_type == event_type and report.TransactionUID == info.TransactionUID
            done = [i.ReferencedSOPInstanceUID for i in report.ReferencedSOPSequence]
            if event_type == 1:
                assert done == [sops[0], sops[1]] and "FailedSOPSequence" not in report
            else:
                assert done == [sops[0]]
                assert [(i.ReferencedSOPInstanceUID, i.FailureReason)
                        for i in report.FailedSOPSequence] == [(unknown, 0x0112),
                                                               (sops[1], 0x0119)]
        bad = Dataset()
        bad.TransactionUID = generate_uid()  # no ReferencedSOPSequence
        status, _ = assoc.send_n_action(bad, 1, COMMITMENT, COMMITMENT_INSTANCE)
        assert status.Status == 0x0115 and "ReferencedSOPSequence" in status.ErrorComment
        status, _ = assoc.send_n_action(bad, 2, COMMITMENT, COMMITMENT_INSTANCE)
        assert status.Status == 0x0123
    finally:
        assoc.release()

    # A requester that goes away at once gets its report on a new association to its AE.
    listener = AE("PYCOMMIT")
    listener.add_supported_context(COMMITMENT, scu_role=True, scp_role=True)
    port = free_port()
    commit_scp = listener.start_server(("127.0.0.1", port), block=False,
                                       evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
    dicom.cli("ae", "add", "PYCOMMIT", "--host", "127.0.0.1", "--port", str(port))
    try:
        arrived.clear()
        assoc = associate(dicom, [build_context(COMMITMENT)], title="PYCOMMIT")
        info = commitment_request([(CT, sops[0])])
        status, _ = assoc.send_n_action(info, 1, COMMITMENT, COMMITMENT_INSTANCE)
        assoc.abort()
        assert status.Status == 0x0000
        assert arrived.wait(30), "no N-EVENT-REPORT on a new association"
        assert reports[-1][0] == 1 and reports[-1][1].TransactionUID == info.TransactionUID
    finally:
        commit_scp.shutdown()
