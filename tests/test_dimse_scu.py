"""The DICOM client side against real peers: DCMTK storescp (send), DCMTK dcmqrscp (find,
C-GET, C-MOVE), through ``dicomshare send`` / ``dicomshare remote`` and the JSON API.

Every peer is a real process on a free port; nothing is mocked. What storescp receives
with ``--bit-preserving`` is compared byte for byte with what we stored.
"""

from __future__ import annotations

import io
import json
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.uid import generate_uid
from pynetdicom.dsutils import split_dataset

from conftest import Server, free_port, make_file

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.skipif(not (shutil.which("storescp") and shutil.which("dcmqrscp")),
                       reason="DCMTK (storescp, dcmqrscp, storescu) is not installed"),
]

SENT = "sent: {}  warning: {}  failed: {}"


# -- helpers --------------------------------------------------------------------------------
def dataset_bytes(path: Path) -> bytes:
    """The encoded data set, without preamble and file meta (each side writes its own)."""
    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def wait_listening(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"peer exited: {log.read_text()[-2000:]}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"peer did not listen on {port}")


@dataclass
class Peer:
    title: str
    port: int
    folder: Path
    process: subprocess.Popen[bytes]
    http_port: int = 0  # Orthanc's REST API

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def received(self, sop: str) -> Path:
        found = [p for p in self.folder.rglob("*") if p.is_file() and p.name.endswith(sop)]
        assert len(found) == 1, f"{sop} arrived {len(found)} times at {self.title}"
        return found[0]


def start_storescp(tmp: Path, title: str, *options: str) -> Peer:
    """DCMTK storescp writing exactly what arrives (``--bit-preserving``)."""
    folder, port = tmp / title, free_port()
    folder.mkdir(parents=True)
    log = tmp / f"{title}.log"
    process = subprocess.Popen(
        ["storescp", "--aetitle", title, "--bit-preserving", "--output-directory",
         str(folder), *options, str(port)], stdout=log.open("wb"), stderr=subprocess.STDOUT)
    wait_listening(port, process, log)
    return Peer(title, port, folder, process)


def start_dcmqrscp(tmp: Path, title: str, ours: Server, knows_us: bool = True) -> Peer:
    """DCMTK's Q/R archive; it knows our AE title (for C-MOVE) at our DICOM port."""
    folder, port = tmp / title, free_port()
    (folder / "db").mkdir(parents=True)
    config = folder / "dcmqrscp.cfg"
    us = f"us = ({ours.ae_title}, 127.0.0.1, {ours.dicom_port})\n" if knows_us else ""
    config.write_text(
        f"NetworkTCPPort = {port}\nMaxPDUSize = 16384\nMaxAssociations = 16\n\n"
        f"HostTable BEGIN\n{us}"
        "HostTable END\n\nVendorTable BEGIN\nVendorTable END\n\n"
        f"AETable BEGIN\n{title} {folder / 'db'} RW (200, 1024mb) ANY\nAETable END\n")
    log = tmp / f"{title}.log"
    process = subprocess.Popen(["dcmqrscp", "--config", str(config), str(port)],
                               stdout=log.open("wb"), stderr=subprocess.STDOUT)
    wait_listening(port, process, log)
    return Peer(title, port, folder, process)


def load(peer: Peer, *files: Path) -> None:
    subprocess.run(["storescu", "--call", peer.title, "127.0.0.1", str(peer.port),
                    *map(str, files)], check=True, capture_output=True, timeout=60)


def register(server: Server, peer: Peer) -> None:
    server.cli("ae", "add", peer.title, "--host", "127.0.0.1", "--port", str(peer.port),
               "--replace")


def instances_on(server: Server, study: str) -> set[str]:
    response = server.session().get(f"{server.dicomweb}/studies/{study}/instances")
    if response.status_code == 204:
        return set()
    response.raise_for_status()
    return {m["00080018"]["Value"][0] for m in response.json()}


def ours_listens(server: Server) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", server.dicom_port)) == 0


# -- fixtures: one dicomshare server (conftest ``server``) and its peers --------------------
@pytest.fixture(scope="module")
def storescp(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peer]:
    """Accepts every transfer syntax."""
    peer = start_storescp(tmp_path_factory.mktemp("storescp"), "STORESCP", "+xa")
    register(server, peer)
    yield peer
    peer.stop()


@pytest.fixture(scope="module")
def implicit_only(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peer]:
    """Accepts Implicit VR Little Endian only: no compressed data, no explicit VR."""
    peer = start_storescp(tmp_path_factory.mktemp("implicit"), "IMPLICIT", "+xi")
    register(server, peer)
    yield peer
    peer.stop()


@dataclass
class QRPeer:
    peer: Peer
    studies: dict[str, list[Path]]  # study UID -> files the peer holds


@pytest.fixture(scope="module")
def qrscp(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[QRPeer]:
    """dcmqrscp holding two studies: ALPHA (two CT series), BETA (one MR)."""
    tmp = tmp_path_factory.mktemp("qrscp")
    peer = start_dcmqrscp(tmp, "QRSCP", server)
    alpha, beta = generate_uid(), generate_uid()
    files = {
        alpha: [make_file(tmp / "files", "CT_small.dcm", alpha, PatientName="SCU^ALPHA",
                          PatientID="SCU-A", AccessionNumber="ACC-A", StudyDate="20230105")
                for _ in range(2)],
        beta: [make_file(tmp / "files", "MR_small.dcm", beta, PatientName="SCU^BETA",
                         PatientID="SCU-B", AccessionNumber="ACC-B", StudyDate="20240610")],
    }
    load(peer, *(f for group in files.values() for f in group))
    register(server, peer)
    yield QRPeer(peer, files)
    peer.stop()


# -- send ------------------------------------------------------------------------------------
def test_send_delivers_the_stored_bytes_unchanged(server: Server, storescp: Peer,
                                                  tmp_path: Path) -> None:
    study = generate_uid()
    files = [make_file(tmp_path, "CT_small.dcm", study) for _ in range(2)]
    files.append(make_file(tmp_path, "JPEG2000.dcm", study))  # compressed, as stored
    files.append(make_file(tmp_path, "MR_small_implicit.dcm", study))
    server.cli("import", "--quiet", *map(str, files))

    result = server.cli("send", "--to", "STORESCP", study, "--quiet")
    assert SENT.format(4, 0, 0) in result.stdout
    assert result.stdout.count("success  0x0000") == 4
    for path in files:
        assert dataset_bytes(storescp.received(sop_uid(path))) == dataset_bytes(path), path.name


def test_send_accepts_several_studies(server: Server, storescp: Peer,
                                                         tmp_path: Path) -> None:
    studies = [generate_uid(), generate_uid()]
    files = [make_file(tmp_path, "CT_small.dcm", s) for s in studies]
    server.cli("import", "--quiet", *map(str, files))
    result = server.cli("send", "--to", "STORESCP", *studies)
    assert SENT.format(2, 0, 0) in result.stdout
    for path in files:
        assert dataset_bytes(storescp.received(sop_uid(path))) == dataset_bytes(path)


def test_send_reports_what_the_peer_would_not_take(server: Server, implicit_only: Peer,
                                                   tmp_path: Path) -> None:
    """Explicit VR data is re-encoded for an implicit-only peer; compressed data that the
    peer refuses is reported per instance, and the command fails."""
    study = generate_uid()
    explicit = make_file(tmp_path, "CT_small.dcm", study)
    compressed = make_file(tmp_path, "JPEG2000.dcm", study)
    server.cli("import", "--quiet", str(explicit), str(compressed))

    result = server.cli("send", "--to", "IMPLICIT", study, "--quiet", check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert SENT.format(1, 0, 1) in result.stdout
    line = next(ln for ln in result.stdout.splitlines() if sop_uid(compressed) in ln)
    assert "failure" in line and "no presentation context" in line and "JPEG 2000" in line
    arrived = pydicom.dcmread(implicit_only.received(sop_uid(explicit)))
    assert arrived.file_meta.TransferSyntaxUID == pydicom.uid.ImplicitVRLittleEndian
    assert arrived.PixelData == pydicom.dcmread(explicit).PixelData


def test_send_to_an_unknown_ae_or_study_fails_clearly(server: Server, storescp: Peer) -> None:
    result = server.cli("send", "--to", "NOBODY", generate_uid(), check=False)
    assert result.returncode == 1
    assert "no registered AE 'NOBODY'" in result.stderr
    missing = generate_uid()
    result = server.cli("send", "--to", "STORESCP", missing, check=False)
    assert result.returncode == 1
    assert f"study {missing} not found" in result.stderr


def test_send_to_an_unreachable_peer_fails_fast(server: Server, tmp_path: Path) -> None:
    path = make_file(tmp_path)
    server.cli("import", "--quiet", str(path))
    server.cli("ae", "add", "NOTHERE", "--host", "127.0.0.1", "--port", str(free_port()),
               "--replace")
    started = time.monotonic()
    result = server.cli("send", "--to", "NOTHERE", pydicom.dcmread(path).StudyInstanceUID,
                        "--quiet", check=False)
    assert result.returncode == 1
    assert "NOTHERE at 127.0.0.1" in result.stderr and "cannot connect" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 20


def test_a_peer_that_rejects_the_association_says_why(server: Server, qrscp: QRPeer) -> None:
    """dcmqrscp refuses a called AE title it does not serve; the reason reaches the user."""
    server.cli("ae", "add", "WRONGNAME", "--host", "127.0.0.1", "--port",
               str(qrscp.peer.port), "--replace")
    result = server.cli("remote", "find", "WRONGNAME", check=False)
    assert result.returncode == 1
    assert "WRONGNAME at 127.0.0.1" in result.stderr, result.stderr
    # dcmqrscp sends A-ASSOCIATE-RJ and closes at once; on a loaded machine pynetdicom
    # sometimes sees the close before the rejection and reports an abort instead.
    assert ("association rejected" in result.stderr and "alled AE" in result.stderr) \
        or "the peer aborted the association request" in result.stderr, result.stderr


# -- remote find -----------------------------------------------------------------------------
def test_remote_find_prints_a_table(server: Server, qrscp: QRPeer) -> None:
    result = server.cli("remote", "find", "QRSCP")
    lines = result.stdout.splitlines()
    assert lines[0].split()[:2] == ["PatientName", "PatientID"]
    for study in qrscp.studies:
        assert any(study in ln for ln in lines[1:])
    assert "SCU^ALPHA" in result.stdout and "SCU^BETA" in result.stdout


def test_remote_find_filters(server: Server, qrscp: QRPeer) -> None:
    alpha, beta = list(qrscp.studies)
    by_name = server.cli("remote", "find", "QRSCP", "--patient-name", "SCU^AL*").stdout
    assert alpha in by_name and beta not in by_name
    by_date = server.cli("remote", "find", "QRSCP", "--study-date", "20240101-").stdout
    assert beta in by_date and alpha not in by_date
    by_key = server.cli("remote", "find", "QRSCP", "-k", "AccessionNumber=ACC-B").stdout
    assert beta in by_key and alpha not in by_key
    by_tag = server.cli("remote", "find", "QRSCP", "-k", "00100020=SCU-A").stdout
    assert alpha in by_tag and beta not in by_tag


def test_remote_find_at_every_level_as_json(server: Server, qrscp: QRPeer) -> None:
    alpha = next(iter(qrscp.studies))
    series = json.loads(server.cli("remote", "find", "QRSCP", "--level", "series",
                                   "--study-uid", alpha, "--json").stdout)
    assert len(series) == 2
    assert {s["00080060"]["Value"][0] for s in series} == {"CT"}
    images = json.loads(server.cli("remote", "find", "QRSCP", "--level", "image",
                                   "--study-uid", alpha, "--json").stdout)
    assert {i["00080018"]["Value"][0] for i in images} == {
        sop_uid(p) for p in qrscp.studies[alpha]}
    patients = json.loads(server.cli("remote", "find", "QRSCP", "--level", "patient",
                                     "--patient-id", "SCU-B", "--json").stdout)
    assert [p["00100010"]["Value"][0]["Alphabetic"] for p in patients] == ["SCU^BETA"]


def test_remote_find_stops_at_the_limit(server: Server, qrscp: QRPeer) -> None:
    """After --limit matches the query is cancelled (C-CANCEL): one match of the several,
    said on stderr (CLI) and in a Warning header (API)."""
    alpha = next(iter(qrscp.studies))
    assert len(qrscp.studies[alpha]) >= 2
    result = server.cli("remote", "find", "QRSCP", "--level", "image", "--study-uid", alpha,
                        "--json", "--limit", "1")
    assert len(json.loads(result.stdout)) == 1
    assert "stopped at --limit 1" in result.stderr, result.stderr
    api = server.session()
    r = api.post(f"{server.url}/api/remote-aes/QRSCP/find", timeout=60, json={
        "level": "image", "keys": {"StudyInstanceUID": alpha}, "limit": 1})
    assert r.status_code == 200, r.text
    assert len(r.json()) == 1 and "more matches" in r.headers.get("Warning", "")
    r = api.post(f"{server.url}/api/remote-aes/QRSCP/find", timeout=60, json={
        "level": "image", "keys": {"StudyInstanceUID": alpha}})
    assert len(r.json()) == len(qrscp.studies[alpha]) and "Warning" not in r.headers
    bad = server.cli("remote", "find", "QRSCP", "--limit", "0", check=False)
    assert bad.returncode == 1 and "limit must be between 1 and 10000" in bad.stderr
    # The association is still usable after a cancelled query: the next find works.
    assert alpha in server.cli("remote", "find", "QRSCP").stdout


def test_remote_find_bad_input(server: Server, qrscp: QRPeer) -> None:
    result = server.cli("remote", "find", "QRSCP", "-k", "NoSuchKeyword=1", check=False)
    assert result.returncode == 1 and "unknown attribute 'NoSuchKeyword'" in result.stderr
    result = server.cli("remote", "find", "NOBODY", check=False)
    assert result.returncode == 1 and "no registered AE 'NOBODY'" in result.stderr


# -- remote retrieve -------------------------------------------------------------------------
def test_remote_retrieve_by_c_get_stores_into_the_archive(server: Server,
                                                          qrscp: QRPeer) -> None:
    alpha, beta = list(qrscp.studies)
    result = server.cli("remote", "retrieve", "QRSCP", alpha, beta, "--method", "get")
    assert f"study {alpha}: success (0x0000) completed: 2  failed: 0" in result.stdout
    assert f"study {beta}: success (0x0000) completed: 1  failed: 0" in result.stdout
    for study, files in qrscp.studies.items():
        assert instances_on(server, study) == {sop_uid(p) for p in files}
    # what we stored is the peer's data set: the pixels are the original's
    path = qrscp.studies[beta][0]
    stored = server.session().get(
        f"{server.dicomweb}/studies/{beta}/series/"
        f"{pydicom.dcmread(path).SeriesInstanceUID}/instances/{sop_uid(path)}",
        headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    assert stored.status_code == 200
    assert pydicom.dcmread(path).PixelData in stored.content

    again = server.cli("remote", "retrieve", "QRSCP", alpha, "--method", "get")
    assert "stored: 0  already present: 2" in again.stdout


def test_remote_retrieve_of_a_study_the_peer_lacks(server: Server, qrscp: QRPeer) -> None:
    """dcmqrscp answers success with nothing to send: reported, and the command fails."""
    result = server.cli("remote", "retrieve", "QRSCP", generate_uid(), "--method", "get",
                        check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "completed: 0" in result.stdout and "nothing to send" in result.stdout


def test_remote_retrieve_by_c_move_into_our_scp(server: Server, qrscp: QRPeer,
                                                tmp_path: Path) -> None:
    """The peer sends to our AE title; `dicomshare serve`'s storage SCP stores it."""
    assert ours_listens(server), "dicomshare serve does not listen on its DICOM port"
    study = generate_uid()
    files = [make_file(tmp_path, "CT_small.dcm", study) for _ in range(2)]
    load(qrscp.peer, *files)
    result = server.cli("remote", "retrieve", "QRSCP", study)  # --method move is the default
    assert f"study {study}: success (0x0000) completed: 2  failed: 0" in result.stdout
    assert instances_on(server, study) == {sop_uid(p) for p in files}


def test_c_move_from_a_peer_that_does_not_know_us(server: Server, tmp_path: Path) -> None:
    peer = start_dcmqrscp(tmp_path, "STRANGER", server, knows_us=False)
    try:
        study = generate_uid()
        load(peer, make_file(tmp_path / "f", "CT_small.dcm", study))
        register(server, peer)
        result = server.cli("remote", "retrieve", "STRANGER", study, check=False)
    finally:
        peer.stop()
    assert result.returncode == 1
    assert f"study {study}: failure (0xA801)" in result.stdout, result.stdout
    assert "Move destination unknown" in result.stdout
    assert f"the peer must know our AE title {server.ae_title}" in result.stdout


def test_remote_retrieve_from_an_unreachable_peer(server: Server) -> None:
    server.cli("ae", "add", "NOTHERE", "--host", "127.0.0.1", "--port", str(free_port()),
               "--replace")
    for method in ("move", "get"):
        started = time.monotonic()
        result = server.cli("remote", "retrieve", "NOTHERE", generate_uid(), "--method",
                            method, check=False)
        assert result.returncode == 1 and "cannot connect" in result.stderr
        assert time.monotonic() - started < 20


# -- Orthanc as the peer: SOP classes it names, compressed data kept compressed -----------
@pytest.fixture(scope="module")
def orthanc(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peer]:
    binary = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin")
    if not binary:
        pytest.skip("Orthanc is not installed")
    tmp = tmp_path_factory.mktemp("orthanc")
    http, port = free_port(), free_port()
    config = tmp / "orthanc.json"
    config.write_text(json.dumps({
        "Name": "scu-test", "StorageDirectory": str(tmp / "storage"),
        "IndexDirectory": str(tmp / "index"), "HttpPort": http, "DicomPort": port,
        "DicomAet": "ORTHANC", "DicomServerEnabled": True, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "WebDavEnabled": False, "SaveJobs": False,
        "DicomModalities": {"us": [server.ae_title, "127.0.0.1", server.dicom_port]}}))
    log = tmp / "orthanc.log"
    process = subprocess.Popen([binary, str(config)], cwd=tmp, stdout=log.open("wb"),
                               stderr=subprocess.STDOUT)
    peer = Peer("ORTHANC", port, tmp, process, http)
    try:
        wait_listening(port, process, log)
        wait_listening(http, process, log)
        register(server, peer)
        yield peer
    finally:
        peer.stop()


def upload(orthanc: Peer, *files: Path) -> None:
    for path in files:
        response = requests.post(f"http://127.0.0.1:{orthanc.http_port}/instances",
                                 data=path.read_bytes(), timeout=30)
        assert response.status_code == 200, response.text


def stored_dataset(server: Server, path: Path) -> pydicom.Dataset:
    """The instance as our archive stored it (WADO-RS with transfer-syntax=*)."""
    from conftest import split_multipart

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    response = server.session().get(
        f"{server.dicomweb}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/"
        f"instances/{ds.SOPInstanceUID}",
        headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    assert response.status_code == 200, response.text
    [(_, body)] = split_multipart(response)
    return pydicom.dcmread(io.BytesIO(body))


def test_c_get_from_orthanc_keeps_compressed_data_as_stored(server: Server, orthanc: Peer,
                                                            tmp_path: Path) -> None:
    """Orthanc lists the study's SOP classes, so C-GET proposes one context per transfer
    syntax: JPEG 2000 and RLE arrive in the transfer syntax Orthanc stores, not transcoded.
    (Orthanc re-encodes the data set around the pixels, so whole bytes are not compared.)"""
    study = generate_uid()
    files = [make_file(tmp_path, name, study)
             for name in ("CT_small.dcm", "JPEG2000.dcm", "SC_rgb_rle.dcm")]
    upload(orthanc, *files)
    result = server.cli("remote", "retrieve", "ORTHANC", study, "--method", "get")
    assert f"study {study}: success (0x0000) completed: 3  failed: 0" in result.stdout
    for path in files:
        original, ours = pydicom.dcmread(path), stored_dataset(server, path)
        assert ours.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert ours.PixelData == original.PixelData, path.name  # codestreams untouched


def test_c_move_from_orthanc_into_our_scp(server: Server, orthanc: Peer,
                                          tmp_path: Path) -> None:
    assert ours_listens(server), "dicomshare serve does not listen on its DICOM port"
    study = generate_uid()
    files = [make_file(tmp_path, name, study) for name in ("CT_small.dcm", "JPEG2000.dcm")]
    upload(orthanc, *files)
    result = server.cli("remote", "retrieve", "ORTHANC", study, "--method", "move")
    assert f"study {study}: success (0x0000) completed: 2  failed: 0" in result.stdout
    for path in files:
        original, ours = pydicom.dcmread(path), stored_dataset(server, path)
        assert ours.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert ours.PixelData == original.PixelData


def test_find_on_orthanc(server: Server, orthanc: Peer, tmp_path: Path) -> None:
    study = generate_uid()
    upload(orthanc, make_file(tmp_path, "CT_small.dcm", study, PatientName="ORTHANC^FOUND"))
    matches = json.loads(server.cli("remote", "find", "ORTHANC", "--patient-name",
                                    "orthanc^found", "--json").stdout)
    assert [m["0020000D"]["Value"][0] for m in matches] == [study]
    # what C-GET relies on to propose exactly the study's SOP classes
    images = json.loads(server.cli("remote", "find", "ORTHANC", "--level", "image",
                                   "--study-uid", study, "-k", "SOPClassUID", "--json").stdout)
    assert [i["00080016"]["Value"][0] for i in images] == [pydicom.uid.CTImageStorage]


# -- JSON API --------------------------------------------------------------------------------
def test_api_lists_the_organisations_peers(server: Server, qrscp: QRPeer) -> None:
    response = server.session().get(f"{server.url}/api/remote-aes")
    assert response.status_code == 200
    titles = {ae["ae_title"]: ae for ae in response.json()}
    assert titles["QRSCP"] == {"ae_title": "QRSCP", "host": "127.0.0.1",
                               "port": qrscp.peer.port, "description": None,
                               "organisation": "test", "scopes": ["read", "write"],
                               "tls": False}
    assert server.session("dsh_wrong").get(f"{server.url}/api/remote-aes").status_code == 401
    assert requests.get(f"{server.url}/api/remote-aes", timeout=10).status_code == 401
    # credentials are checked before the body is looked at
    anonymous = requests.post(f"{server.url}/api/send", json={"nonsense": 1}, timeout=10)
    assert anonymous.status_code == 401 and "bearer token" in anonymous.json()["error"]


def test_api_registry_changes_need_an_administrator(server: Server) -> None:
    member = server.new_token(f"member-{uuid.uuid4().hex[:6]}")
    url = f"{server.url}/api/remote-aes/APITEST"
    body = {"host": "127.0.0.1", "port": 4242, "description": "made by the API"}
    assert server.session(member).put(url, json=body).status_code == 403
    response = server.session().put(url, json=body)
    assert response.status_code == 200, response.text
    assert response.json()["port"] == 4242
    assert "APITEST\t127.0.0.1\t4242" in server.cli("ae", "list").stdout
    assert server.session(member).delete(url).status_code == 403
    assert server.session().delete(url).status_code == 204
    assert server.session().delete(url).status_code == 404
    bad = server.session().put(url, json={"host": "x", "port": 70000})
    assert bad.status_code == 400
    bad_title = server.session().put(f"{server.url}/api/remote-aes/{'X' * 17}", json=body)
    assert bad_title.status_code == 400 and "not a valid AE title" in bad_title.json()["error"]


def test_api_find(server: Server, qrscp: QRPeer) -> None:
    alpha = next(iter(qrscp.studies))
    member = server.new_token(f"member-{uuid.uuid4().hex[:6]}")
    response = server.session(member).post(
        f"{server.url}/api/remote-aes/QRSCP/find",
        json={"level": "study", "keys": {"PatientName": "SCU^ALPHA"}})
    assert response.status_code == 200, response.text
    [match] = response.json()
    assert match["0020000D"] == {"vr": "UI", "Value": [alpha]}
    series = server.session().post(f"{server.url}/api/remote-aes/QRSCP/find",
                                   json={"level": "series", "keys": {"StudyInstanceUID": alpha}})
    assert len(series.json()) == 2
    bad = server.session().post(f"{server.url}/api/remote-aes/QRSCP/find",
                                json={"keys": {"Nonsense": "1"}})
    assert bad.status_code == 400 and "unknown attribute" in bad.json()["error"]
    bad_level = server.session().post(f"{server.url}/api/remote-aes/QRSCP/find",
                                      json={"level": "galaxy"})
    assert bad_level.status_code == 400


def test_api_retrieve_by_c_get(server: Server, qrscp: QRPeer, tmp_path: Path) -> None:
    study = generate_uid()
    files = [make_file(tmp_path, "CT_small.dcm", study) for _ in range(3)]
    load(qrscp.peer, *files)
    response = server.session().post(f"{server.url}/api/remote-aes/QRSCP/retrieve",
                                     json={"study_uids": [study], "method": "get"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["source"] == "QRSCP"
    [report] = body["studies"]
    assert report | {"comment": ""} == {
        "study_uid": study, "method": "get", "outcome": "success", "status": 0,
        "comment": "", "completed": 3, "failed": 0, "warning": 0, "stored": 3,
        "already_present": 0, "refused": []}
    assert instances_on(server, study) == {sop_uid(p) for p in files}


def test_api_retrieve_by_c_move(server: Server, qrscp: QRPeer, tmp_path: Path) -> None:
    assert ours_listens(server), "dicomshare serve does not listen on its DICOM port"
    study = generate_uid()
    files = [make_file(tmp_path, "MR_small.dcm", study) for _ in range(2)]
    load(qrscp.peer, *files)
    response = server.session().post(f"{server.url}/api/remote-aes/QRSCP/retrieve",
                                     json={"study_uids": [study]})
    assert response.status_code == 200, response.text
    [report] = response.json()["studies"]
    assert (report["method"], report["outcome"], report["completed"]) == ("move", "success", 2)
    assert instances_on(server, study) == {sop_uid(p) for p in files}


def test_api_send(server: Server, storescp: Peer, tmp_path: Path) -> None:
    study = generate_uid()
    files = [make_file(tmp_path, "CT_small.dcm", study), make_file(tmp_path, "JPEG2000.dcm",
                                                                   study)]
    server.cli("import", "--quiet", *map(str, files))
    member = server.new_token(f"member-{uuid.uuid4().hex[:6]}")
    response = server.session(member).post(f"{server.url}/api/send",
                                            json={"destination": "STORESCP",
                                                  "study_uids": [study]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["destination"], body["succeeded"], body["failed"], body["error"]) == (
        "STORESCP", 2, 0, None)
    by_uid = {i["sop_instance_uid"]: i for i in body["instances"]}
    for path in files:
        result = by_uid[sop_uid(path)]
        assert (result["outcome"], result["status"]) == ("success", 0)
        assert result["sent_as"] == result["transfer_syntax_uid"] == str(
            pydicom.dcmread(path).file_meta.TransferSyntaxUID)
        assert dataset_bytes(storescp.received(sop_uid(path))) == dataset_bytes(path)


def test_api_errors(server: Server, storescp: Peer, tmp_path: Path) -> None:
    session = server.session()
    unknown = session.post(f"{server.url}/api/send",
                           json={"destination": "NOBODY", "study_uids": [generate_uid()]})
    assert unknown.status_code == 404 and "no registered AE 'NOBODY'" in unknown.json()["error"]
    missing = session.post(f"{server.url}/api/send",
                           json={"destination": "STORESCP", "study_uids": [generate_uid()]})
    assert missing.status_code == 404 and "not found" in missing.json()["error"]
    assert session.post(f"{server.url}/api/remote-aes/NOBODY/find", json={}).status_code == 404
    empty = session.post(f"{server.url}/api/send",
                         json={"destination": "STORESCP", "study_uids": []})
    assert empty.status_code == 400

    server.cli("ae", "add", "NOTHERE", "--host", "127.0.0.1", "--port", str(free_port()),
               "--replace")
    path = make_file(tmp_path)
    server.cli("import", "--quiet", str(path))
    study = str(pydicom.dcmread(path).StudyInstanceUID)
    for url, body in ((f"{server.url}/api/send", {"destination": "NOTHERE",
                                                  "study_uids": [study]}),
                      (f"{server.url}/api/remote-aes/NOTHERE/find", {}),
                      (f"{server.url}/api/remote-aes/NOTHERE/retrieve",
                       {"study_uids": [study], "method": "get"})):
        started = time.monotonic()
        response = session.post(url, json=body, timeout=30)
        assert response.status_code == 502, (url, response.text)
        assert "cannot connect" in response.json()["error"]
        assert time.monotonic() - started < 20


def test_api_is_in_the_openapi_schema(server: Server) -> None:
    schema = server.session().get(f"{server.url}/openapi.json").json()
    for path in ("/api/remote-aes", "/api/remote-aes/{title}/find",
                 "/api/remote-aes/{title}/retrieve", "/api/send"):
        assert path in schema["paths"]
    assert {"SendRequest", "SendResponse", "FindRequest", "RetrieveRequest",
            "RetrieveResponse"} <= set(schema["components"]["schemas"])
