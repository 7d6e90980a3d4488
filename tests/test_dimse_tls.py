"""DICOM TLS (PS3.15 Annex B): a clinic and a hospital exchange studies over TLS.

A throwaway PKI made here with ``cryptography``: our CA signs both archives' certificates
(server and client use) and a DCMTK tool's; another CA signs a rogue one. Both archives
run mutual TLS (``--dicom-tls-ca``) beside their plain port. Real servers, real DCMTK
tools with ``+tls``, real pynetdicom; nothing is mocked.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE

from conftest import DICOMSHARE, Server, cli, free_port, make_file, make_server
from test_dimse_peers import stored_bytes

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.skipif(shutil.which("echoscu") is None or shutil.which("storescp") is None,
                       reason="DCMTK is not installed"),
]

VERIFICATION = "1.2.840.10008.1.1"
TOOL = "TLSTOOL"  # the calling AE title of the DCMTK tools and pynetdicom here


# -- a throwaway PKI ------------------------------------------------------------------------
@dataclass
class Pair:
    cert: Path
    key: Path


@dataclass
class PKI:
    ca: Path
    hospital: Pair
    clinic: Pair
    tool: Pair  # a DCMTK client's certificate, our CA
    rogue: Pair  # signed by another CA
    other_ca: Path


def _pki(folder: Path) -> PKI:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))

    def authority(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(name(cn))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=2))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(False, False, False, False, False, True, True,
                                             False, False), critical=True)
                .sign(key, hashes.SHA256()))
        path = folder / f"{cn}.pem"
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return key, cert, path

    def leaf(cn: str, issuer: tuple[ec.EllipticCurvePrivateKey, x509.Certificate, Path]
             ) -> Pair:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(cn))
                .issuer_name(issuer[1].subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=2))
                .add_extension(x509.SubjectAlternativeName([
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]),
                               critical=False)
                .sign(issuer[0], hashes.SHA256()))
        pair = Pair(folder / f"{cn}.crt", folder / f"{cn}.key")
        pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        write_key(key, pair.key)
        return pair

    ours, theirs = authority("test-ca"), authority("other-ca")
    return PKI(ours[2], leaf("hospital", ours), leaf("clinic", ours), leaf("tool", ours),
               leaf("rogue", theirs), theirs[2])


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return _pki(tmp_path_factory.mktemp("pki"))


def tls_env(pki: PKI, pair: Pair, port: int) -> dict[str, str]:
    return {"DICOMSHARE_DICOM_TLS_PORT": str(port), "DICOMSHARE_DICOM_TLS_CERT": str(pair.cert),
            "DICOMSHARE_DICOM_TLS_KEY": str(pair.key), "DICOMSHARE_DICOM_TLS_CA": str(pki.ca)}


# -- two archives, each listening plain and over mutual TLS -------------------------------
@dataclass
class Sites:
    clinic: Server
    hospital: Server
    clinic_tls: int
    hospital_tls: int


@pytest.fixture(scope="module")
def sites(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sites]:
    clinic_tls, hospital_tls = free_port(), free_port()
    with ThreadPoolExecutor(2) as pool:  # both start at once: half the wait
        starting = [pool.submit(make_server, tmp_path_factory.mktemp(title.lower()),
                                ae_title=title, env=tls_env(pki, pair, port))
                    for title, pair, port in (("HOSPITAL", pki.hospital, hospital_tls),
                                              ("CLINIC", pki.clinic, clinic_tls))]
    if any(future.exception() for future in starting):
        for future in starting:
            if future.exception() is None:
                future.result().stop()
        raise RuntimeError("a server did not start") from next(
            f.exception() for f in starting if f.exception())
    hospital, clinic = (future.result() for future in starting)
    try:
        clinic.cli("ae", "add", "HOSPITAL", "--host", "127.0.0.1", "--port", str(hospital_tls),
                   "--tls")
        hospital.cli("ae", "add", "CLINIC", "--host", "127.0.0.1", "--port", str(clinic_tls),
                     "--tls")
        hospital.cli("ae", "add", TOOL, "--host", "127.0.0.1", "--port", "104")
        yield Sites(clinic, hospital, clinic_tls, hospital_tls)
    finally:
        clinic.stop()
        hospital.stop()


def dcmtk(tool: str, *args: str, timeout: int = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool, "-to", "10", "-ta", "10", "-td", "10", *args],
                          capture_output=True, text=True, timeout=timeout)


def echo(port: int, *tls: str, calling: str = TOOL) -> subprocess.CompletedProcess[str]:
    return dcmtk("echoscu", "-aet", calling, "-aec", "HOSPITAL", *tls, "127.0.0.1", str(port))


def with_cert(pki: PKI, pair: Pair) -> list[str]:
    return ["+tls", str(pair.key), str(pair.cert), "+cf", str(pki.ca)]


def log_of(server: Server) -> str:
    assert server.log_path is not None
    return server.log_path.read_text(errors="replace")


# -- the listener ----------------------------------------------------------------------------
def test_echo_over_tls_and_the_plain_port_still_works(sites: Sites, pki: PKI) -> None:
    result = echo(sites.hospital_tls, *with_cert(pki, pki.tool))
    assert result.returncode == 0, result.stdout + result.stderr
    plain = echo(sites.hospital.dicom_port)
    assert plain.returncode == 0, plain.stdout + plain.stderr
    assert (f"DICOM: AE HOSPITAL on 127.0.0.1:{sites.hospital.dicom_port}, DICOM TLS on "
            f"127.0.0.1:{sites.hospital_tls} (client certificates required") in log_of(
                sites.hospital)


def test_pynetdicom_over_tls(sites: Sites, pki: PKI) -> None:
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.load_cert_chain(str(pki.tool.cert), str(pki.tool.key))
    ae = AE(ae_title=TOOL)
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", sites.hospital_tls, ae_title="HOSPITAL",
                         tls_args=(context, "127.0.0.1"))
    try:
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        assert isinstance(assoc.dul.socket.socket, ssl.SSLSocket)  # type: ignore[union-attr]
        assert assoc.dul.socket.socket.version() in ("TLSv1.2", "TLSv1.3")  # type: ignore
    finally:
        assoc.release()


def test_storescu_over_tls_stores_the_instance(sites: Sites, pki: PKI, tmp_path: Path) -> None:
    study = generate_uid()
    path = make_file(tmp_path, "CT_small.dcm", study)
    result = dcmtk("storescu", "-aet", TOOL, "-aec", "HOSPITAL", *with_cert(pki, pki.tool),
                   "127.0.0.1", str(sites.hospital_tls), str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    found = sites.hospital.session().get(f"{sites.hospital.dicomweb}/studies/{study}/instances")
    assert found.status_code == 200, found.text
    sop = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    assert [m["00080018"]["Value"][0] for m in found.json()] == [sop]


def test_the_registry_check_holds_on_the_tls_port(sites: Sites, pki: PKI) -> None:
    result = echo(sites.hospital_tls, *with_cert(pki, pki.tool), calling="NOBODY")
    assert result.returncode != 0
    assert "Calling AE Title Not Recognized" in result.stdout + result.stderr
    assert "unregistered AE title 'NOBODY'" in log_of(sites.hospital)


def test_a_plain_client_on_the_tls_port_fails_cleanly(sites: Sites, pki: PKI) -> None:
    started = time.monotonic()
    assert echo(sites.hospital_tls).returncode != 0
    assert time.monotonic() - started < 10
    # A client that connects and says nothing does not hold up anyone else's handshake.
    with socket.create_connection(("127.0.0.1", sites.hospital_tls), timeout=10):
        result = echo(sites.hospital_tls, *with_cert(pki, pki.tool))
        assert result.returncode == 0, result.stdout + result.stderr
    assert echo(sites.hospital.dicom_port).returncode == 0
    log = log_of(sites.hospital)
    assert "failed: it does not speak TLS (wrong version number)" in log
    assert "Traceback" not in log


def test_mutual_tls_refuses_a_client_without_a_certificate(sites: Sites, pki: PKI) -> None:
    result = echo(sites.hospital_tls, "+tla", "+cf", str(pki.ca))
    assert result.returncode != 0
    assert "failed: it sent no client certificate" in log_of(sites.hospital)
    assert echo(sites.hospital_tls, *with_cert(pki, pki.tool)).returncode == 0


def test_mutual_tls_refuses_a_certificate_of_another_ca(sites: Sites, pki: PKI) -> None:
    result = echo(sites.hospital_tls, "+tls", str(pki.rogue.key), str(pki.rogue.cert),
                  "+cf", str(pki.ca))
    assert result.returncode != 0
    assert ("failed: its client certificate does not verify against --dicom-tls-ca: unable "
            "to get local issuer certificate") in log_of(sites.hospital)
    assert echo(sites.hospital_tls, *with_cert(pki, pki.tool)).returncode == 0


# -- a bare `serve` (flags only, one data folder): one-way TLS, misconfiguration --------
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bare") / "data"


def serve(data: Path, *flags: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*DICOMSHARE, "--data-dir", str(data), "serve", "--workers", "1", "--http-port",
         str(free_port()), "--dicom-port", str(free_port()), *flags],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "DICOMSHARE_DATA_DIR": str(data)})


def test_one_way_tls_without_a_ca(pki: PKI, data_dir: Path) -> None:
    """Without --dicom-tls-ca no client certificate is asked for."""
    port = free_port()
    process = serve(data_dir, "--dicom-accept-unknown", "--ae-title", "HOSPITAL",
                    "--dicom-tls-port", str(port), "--dicom-tls-cert", str(pki.hospital.cert),
                    "--dicom-tls-key", str(pki.hospital.key))
    try:
        assert process.stderr is not None
        for line in process.stderr:
            if line.startswith("DICOM:"):
                break
        assert "no client certificates asked for" in line, line
        result = echo(port, "+tla", "+cf", str(pki.ca))
        assert result.returncode == 0, result.stdout + result.stderr
    finally:
        process.terminate()
        process.wait(timeout=30)


def serve_fails(data: Path, *flags: str) -> str:
    process = serve(data, "--dicom-tls-port", str(free_port()), *flags)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 1, err
    assert "Traceback" not in err
    return err


def test_tls_misconfiguration_fails_at_start(pki: PKI, data_dir: Path) -> None:
    out = serve_fails(data_dir, "--dicom-tls-cert", str(pki.hospital.cert),
                      "--dicom-tls-key", str(pki.clinic.key))
    assert f"error: DICOM TLS key {pki.clinic.key} does not belong to the certificate" in out


def test_tls_misconfiguration_messages(pki: PKI, tmp_path: Path) -> None:
    """What `serve` prints (as above) for each kind of mistake, asked of the module."""
    from dicomshare.config import Settings
    from dicomshare.dimse import tls
    from dicomshare.errors import InvalidInput

    missing = tmp_path / "missing.pem"
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_text("-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n")
    good: dict[str, Any] = {"dicom_tls_port": 2762, "dicom_tls_cert": str(pki.hospital.cert),
            "dicom_tls_key": str(pki.hospital.key)}
    cases = [
        ({"dicom_tls_cert": ""}, "--dicom-tls-port needs --dicom-tls-cert and --dicom-tls-key"),
        ({"dicom_tls_cert": str(missing)},
         f"DICOM TLS certificate (--dicom-tls-cert) {missing}: No such file"),
        ({"dicom_tls_key": str(tmp_path)}, f"DICOM TLS key (--dicom-tls-key) {tmp_path}: Is a "
         "directory"),
        ({"dicom_tls_cert": str(pki.hospital.key)}, "is not a PEM certificate"),
        ({"dicom_tls_key": str(pki.hospital.cert)}, "is not a PEM private key"),
        ({"dicom_tls_key": str(encrypted)}, "is protected by a passphrase"),
        ({"dicom_tls_ca": str(missing)}, f"DICOM TLS CA file (--dicom-tls-ca) {missing}: No "
         "such file"),
        ({"dicom_tls_ca": str(pki.hospital.key)}, "no usable PEM certificate"),
    ]
    for change, message in cases:
        with pytest.raises(InvalidInput) as caught:
            tls.server_context(Settings(**{**good, **change}))
        assert message in caught.value.reason, (change, caught.value.reason)
    with pytest.raises(InvalidInput, match="go together"):
        tls.client_context(Settings(dicom_tls_cert=str(pki.clinic.cert)))
    context = tls.server_context(Settings(**good))
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_NONE  # no CA: no client certificate asked for


# -- two archives over TLS ----------------------------------------------------------------
def test_registry_shows_tls(sites: Sites) -> None:
    listed = sites.clinic.cli("ae", "list").stdout
    assert f"HOSPITAL\t127.0.0.1\t{sites.hospital_tls}\ttls\t" in listed
    api = sites.clinic.session().get(f"{sites.clinic.url}/api/remote-aes").json()
    assert {ae["ae_title"]: ae["tls"] for ae in api}["HOSPITAL"] is True
    url = f"{sites.clinic.url}/api/remote-aes/VIAAPI"
    body: dict[str, Any] = {"host": "127.0.0.1", "port": 2762, "tls": True}
    response = sites.clinic.session().put(url, json=body)
    assert response.status_code == 200 and response.json()["tls"] is True, response.text
    assert "VIAAPI\t127.0.0.1\t2762\ttls\t" in sites.clinic.cli("ae", "list").stdout
    plain = sites.clinic.session().put(url, json={"host": "127.0.0.1", "port": 104})
    assert plain.json()["tls"] is False
    assert sites.clinic.session().delete(url).status_code == 204


def test_clinic_sends_a_study_over_tls(sites: Sites, tmp_path: Path) -> None:
    study = generate_uid()
    files = [make_file(tmp_path, name, study, PatientID="TLS-1")
             for name in ("CT_small.dcm", "MR_small_jp2klossless.dcm")]
    sites.clinic.cli("import", "--quiet", *map(str, files))
    result = sites.clinic.cli("send", "--to", "HOSPITAL", "--quiet", study)
    assert "sent: 2" in result.stdout and "failed: 0" in result.stdout, result.stdout
    assert stored_bytes(sites.hospital, study) == stored_bytes(sites.clinic, study)


def test_clinic_finds_and_retrieves_over_tls(sites: Sites, tmp_path: Path) -> None:
    priors = [generate_uid(), generate_uid()]
    sites.hospital.cli("import", "--quiet",
                       str(make_file(tmp_path / "a", "CT_small.dcm", priors[0],
                                     PatientID="TLS-9")),
                       str(make_file(tmp_path / "b", "MR_small_RLE.dcm", priors[1],
                                     PatientID="TLS-9")))
    found = json.loads(sites.clinic.cli("remote", "find", "HOSPITAL", "--patient-id",
                                        "TLS-9", "--json").stdout)
    assert sorted(m["0020000D"]["Value"][0] for m in found) == sorted(priors)
    # C-MOVE: the hospital's SCP opens the sub-association to the clinic's TLS port.
    moved = sites.clinic.cli("remote", "retrieve", "HOSPITAL", priors[0], "--method", "move")
    assert "success" in moved.stdout, moved.stdout
    sites.clinic.cli("remote", "retrieve", "HOSPITAL", priors[1], "--method", "get")
    for study in priors:
        assert stored_bytes(sites.clinic, study) == stored_bytes(sites.hospital, study)


@pytest.fixture
def rogue(pki: PKI, tmp_path: Path) -> Iterator[int]:
    """DCMTK storescp over TLS with a certificate of another CA."""
    port = free_port()
    process = subprocess.Popen(
        ["storescp", "--aetitle", "ROGUE", "+tls", str(pki.rogue.key), str(pki.rogue.cert),
         "+cf", str(pki.other_ca), "--output-directory", str(tmp_path), str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                break
        assert time.monotonic() < deadline and process.poll() is None, "storescp did not start"
        time.sleep(0.05)
    yield port
    process.terminate()
    process.wait(timeout=10)


def _rogue_and_a_study(server: Server, rogue: int, tmp_path: Path) -> str:
    """ROGUE registered as a TLS peer of ``server``, and a new study stored there."""
    server.cli("ae", "add", "ROGUE", "--host", "127.0.0.1", "--port", str(rogue), "--tls",
               "--replace")
    study = generate_uid()
    server.cli("import", "--quiet", str(make_file(tmp_path, "CT_small.dcm", study)))
    return study


def test_a_tls_peer_whose_certificate_does_not_verify(sites: Sites, rogue: int,
                                                      tmp_path: Path) -> None:
    clinic = sites.clinic
    study = _rogue_and_a_study(clinic, rogue, tmp_path)
    started = time.monotonic()
    result = clinic.cli("send", "--to", "ROGUE", "--quiet", study, check=False)
    assert result.returncode == 1 and time.monotonic() - started < 30
    assert "Traceback" not in result.stderr
    assert (f"error: ROGUE at 127.0.0.1:{rogue} (TLS): TLS handshake failed: the "
            f"certificate of 127.0.0.1:{rogue} does not verify against the CA in") in result.stderr
    # the JSON API: 502, the same reason
    response = clinic.session().post(f"{clinic.url}/api/remote-aes/ROGUE/find", json={})
    assert response.status_code == 502
    assert "does not verify" in response.json()["error"]


def test_a_peer_registered_tls_on_a_plain_port(sites: Sites) -> None:
    clinic = sites.clinic
    clinic.cli("ae", "add", "PLAINPORT", "--host", "127.0.0.1", "--port",
               str(sites.hospital.dicom_port), "--tls", "--replace")
    result = clinic.cli("remote", "find", "PLAINPORT", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"is {sites.hospital.dicom_port} the peer's DICOM TLS port?" in result.stderr


def test_the_peer_refuses_a_client_without_our_certificate(sites: Sites, pki: PKI) -> None:
    """The clinic's certificate settings are what the hospital checks: without them the
    hospital's mutual TLS refuses the clinic, and the clinic says so."""
    env = {k: v for k, v in sites.clinic.env.items()
           if k not in ("DICOMSHARE_DICOM_TLS_CERT", "DICOMSHARE_DICOM_TLS_KEY")}
    result = cli(sites.clinic.data_dir, "remote", "find", "HOSPITAL", env=env, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "refused our client certificate" in result.stderr, result.stderr


def test_a_c_move_to_a_tls_destination_that_does_not_verify(sites: Sites, rogue: int,
                                                            tmp_path: Path) -> None:
    hospital = sites.hospital
    study = _rogue_and_a_study(hospital, rogue, tmp_path)
    # (DCMTK's movescu has no TLS; the request comes on the plain port, the sub-association
    # to the destination is TLS all the same)
    result = dcmtk("movescu", "-aet", TOOL, "-aec", "HOSPITAL", "-aem", "ROGUE", "-S",
                   "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
                   "127.0.0.1", str(hospital.dicom_port))
    assert "MoveDestinationUnknown" in result.stdout + result.stderr, result.stdout + result.stderr
    log = log_of(hospital)
    assert (f"cannot associate with ROGUE: TLS handshake failed: the certificate of "
            f"127.0.0.1:{rogue} does not verify") in log
    assert "Traceback" not in log
