"""Who may do what: bearer tokens on every DICOMweb endpoint, admin-only DELETE, CORS.

Tokens are made and revoked with the ``dicomshare tokens`` command, exactly as an
administrator would; requests go through requests and dicomweb-client.
"""

from __future__ import annotations

import copy
import hashlib
import io
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from conftest import Server, make_server

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

BOUNDARY = "auth-test-boundary"
STOW_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
DICOM_ANY = 'multipart/related; type="application/dicom"; transfer-syntax=*'
VIEWER = "http://viewer.example"


@cache
def _ct() -> pydicom.Dataset:
    return pydicom.dcmread(get_testdata_file("CT_small.dcm"))


def make_instance(study: str, series: str | None = None) -> bytes:
    ds = copy.deepcopy(_ct())
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series or generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out = io.BytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


def stow_body(*instances: bytes) -> bytes:
    body = b"".join(f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                    + data + b"\r\n" for data in instances)
    return body + f"--{BOUNDARY}--\r\n".encode()


def uids_of(data: bytes) -> tuple[str, str, str]:
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    return ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID


def store(server: Server, *instances: bytes, token: str | None = None) -> requests.Response:
    return server.session(token).post(f"{server.dicomweb}/studies", data=stow_body(*instances),
                                      headers={"Content-Type": STOW_TYPE}, timeout=60)


def listed(server: Server, *secrets: str) -> list[list[str]]:
    """The `tokens list` rows of tokens (it shows a prefix, never the secret): id, user,
    name, prefix, state, created."""
    rows = [line.split("\t") for line in server.cli("tokens", "list").stdout.splitlines()]
    found = []
    for secret in secrets:
        (row,) = [r for r in rows if secret.startswith(r[3].removesuffix("..."))]
        found.append(row)
    return found


def qido(server: Server, path: str, **params: str) -> list[dict[str, Any]]:
    r = server.session().get(server.dicomweb + path, params=params, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def count(item: dict[str, Any], tag: str) -> int:
    return int(item[tag]["Value"][0])


@dataclass
class Setup:
    study: str
    series: str
    sop: str
    member: str
    revoked: str
    expired: str


@pytest.fixture(scope="module")
def setup(server: Server) -> Setup:
    data = make_instance(generate_uid())
    assert store(server, data).status_code == 200
    member = server.new_token("member-user")
    revoked = server.cli("tokens", "create", "member-user", "--name", "to-revoke").stdout.strip()
    # Revocation must act at once: the token works, is revoked, and is refused next.
    r = server.session(revoked).get(f"{server.dicomweb}/studies", timeout=30)
    assert r.status_code == 200, r.text
    server.cli("tokens", "revoke", listed(server, revoked)[0][0])
    expired = server.cli("tokens", "create", "member-user", "--expires-days", "0"
                         ).stdout.strip()
    return Setup(*uids_of(data), member, revoked, expired)


def endpoints(s: Setup) -> list[tuple[str, str]]:
    inst = f"/studies/{s.study}/series/{s.series}/instances/{s.sop}"
    return [
        ("POST", "/studies"),
        ("POST", f"/studies/{s.study}"),
        ("GET", "/studies"), ("GET", "/series"), ("GET", "/instances"),
        ("GET", f"/studies/{s.study}/series"), ("GET", f"/studies/{s.study}/instances"),
        ("GET", f"/studies/{s.study}/series/{s.series}/instances"),
        ("GET", f"/studies/{s.study}"), ("GET", f"/studies/{s.study}/series/{s.series}"),
        ("GET", inst),
        ("GET", f"/studies/{s.study}/metadata"), ("GET", f"{inst}/metadata"),
        ("GET", f"{inst}/frames/1"), ("GET", f"{inst}/rendered"),
        ("GET", f"/studies/{s.study}/rendered"), ("GET", f"{inst}/frames/1/rendered"),
        ("GET", f"{inst}/thumbnail"), ("GET", f"/studies/{s.study}/thumbnail"),
        ("GET", f"{inst}/bulk/7FE00010"),
        ("DELETE", inst), ("DELETE", f"/studies/{s.study}/series/{s.series}"),
        ("DELETE", f"/studies/{s.study}"),
    ]


def call(server: Server, method: str, path: str, headers: dict[str, str]) -> requests.Response:
    body = None
    if method == "POST":
        headers = {**headers, "Content-Type": STOW_TYPE}
        body = stow_body(make_instance(path.split("/")[2] if path.count("/") > 1
                                       else generate_uid()))
    return requests.request(method, server.dicomweb + path, headers=headers, data=body,
                            timeout=60)


CREDENTIALS = ["none", "empty-bearer", "basic", "wrong-token", "not-our-format", "revoked",
               "expired"]


def authorization(kind: str, s: Setup) -> dict[str, str]:
    value = {
        "none": None,
        "empty-bearer": "Bearer ",
        "basic": "Basic dGVzdGVyOmNvcnJlY3QgaG9yc2UgYmF0dGVyeQ==",
        "wrong-token": "Bearer dsh_" + "A" * 43,
        "not-our-format": "Bearer eyJhbGciOiJub25lIn0.e30.",
        "revoked": f"Bearer {s.revoked}",
        "expired": f"Bearer {s.expired}",
    }[kind]
    return {"Authorization": value} if value else {}


@pytest.mark.parametrize("kind", CREDENTIALS)
def test_every_endpoint_refuses_bad_credentials(server: Server, setup: Setup,
                                                kind: str) -> None:
    s = setup
    before = count(qido(server, "/studies", StudyInstanceUID=s.study)[0], "00201208")
    for method, path in endpoints(s):
        r = call(server, method, path, authorization(kind, s))
        assert r.status_code == 401, (kind, method, path, r.status_code, r.text[:200])
        assert r.headers["WWW-Authenticate"].lower().startswith("bearer")
        assert r.json()["error"]
    # Nothing was stored or deleted on the way.
    assert count(qido(server, "/studies", StudyInstanceUID=s.study)[0], "00201208") == before


def test_good_credentials_reach_every_endpoint(server: Server, setup: Setup) -> None:
    """The same requests with a member token succeed (DELETE aside): the 401s are real."""
    for method, path in endpoints(setup):
        if method == "DELETE":
            continue
        r = call(server, method, path, {"Authorization": f"bearer {setup.member}"})
        assert r.status_code == 200, (method, path, r.status_code, r.text[:200])


def test_token_states_are_listed(server: Server, setup: Setup) -> None:
    """`--expires-days 0` makes a token that is expired at once, not one that never is."""
    rows = listed(server, setup.expired, setup.revoked, setup.member)
    assert [row[4] for row in rows] == ["expired", "revoked", "active"]


def test_healthz_needs_no_token(server: Server) -> None:
    r = requests.get(f"{server.url}/healthz", timeout=10)
    assert r.status_code == 200
    assert r.json()["status"] == "ok"


# -- DELETE ---------------------------------------------------------------------------------
def blob_path(server: Server, data: bytes) -> Path:
    digest = hashlib.sha256(data).hexdigest()
    return server.data_dir / "blobs" / digest[:2] / digest


def test_delete_needs_an_administrator(server: Server, setup: Setup) -> None:
    study = generate_uid()
    data = make_instance(study)
    assert store(server, data, token=setup.member).status_code == 200  # members may store
    _, series, sop = uids_of(data)
    for path in (f"/studies/{study}/series/{series}/instances/{sop}",
                 f"/studies/{study}/series/{series}", f"/studies/{study}"):
        r = server.session(setup.member).delete(server.dicomweb + path, timeout=30)
        assert r.status_code == 403, (path, r.text)
        assert r.json()["error"]
    assert blob_path(server, data).is_file()
    assert len(qido(server, f"/studies/{study}/instances")) == 1


def test_admin_deletes_instance_series_and_study(server: Server, setup: Setup) -> None:
    study = generate_uid()
    series = [generate_uid(), generate_uid()]
    data = {s: [make_instance(study, s) for _ in range(2)] for s in series}
    assert store(server, *data[series[0]], *data[series[1]]).status_code == 200
    client = server.client()

    def summary() -> tuple[int, int] | None:
        found = qido(server, "/studies", StudyInstanceUID=study)
        return (count(found[0], "00201206"), count(found[0], "00201208")) if found else None

    assert summary() == (2, 4)
    gone = data[series[0]][0]
    sop = uids_of(gone)[2]
    client.delete_instance(study, series[0], sop)
    assert summary() == (2, 3)
    assert not blob_path(server, gone).exists()
    url = f"{server.dicomweb}/studies/{study}/series/{series[0]}/instances/{sop}"
    for suffix in ("", "/metadata", "/rendered"):
        assert server.session().get(url + suffix, timeout=30).status_code == 404
    assert qido(server, "/instances", SOPInstanceUID=sop) == []

    r = server.session().delete(f"{server.dicomweb}/studies/{study}/series/{series[0]}",
                                timeout=30)
    assert r.status_code == 200, r.text
    assert summary() == (1, 2)
    assert not blob_path(server, data[series[0]][1]).exists()
    assert qido(server, f"/studies/{study}/series", SeriesInstanceUID=series[0]) == []
    assert server.session().get(f"{server.dicomweb}/studies/{study}/series/{series[0]}",
                                headers={"Accept": DICOM_ANY}, timeout=30).status_code == 404

    client.delete_study(study)
    assert summary() is None
    assert not any(blob_path(server, d).exists() for d in data[series[1]])
    assert server.session().get(f"{server.dicomweb}/studies/{study}",
                                headers={"Accept": DICOM_ANY}, timeout=30).status_code == 404
    r = server.session().delete(f"{server.dicomweb}/studies/{study}", timeout=30)
    assert r.status_code == 404, r.text

    report = server.cli("check").stdout
    assert "ok: index and blobs agree" in report and "not in the index" not in report


# -- CORS -----------------------------------------------------------------------------------
def preflight(server: Server, origin: str, method: str = "GET") -> requests.Response:
    return requests.options(f"{server.dicomweb}/studies", timeout=10, headers={
        "Origin": origin, "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "authorization, accept"})


@pytest.fixture
def cors_server(tmp_path: Path) -> Any:
    srv = make_server(tmp_path, env={"DICOMSHARE_CORS_ORIGINS": VIEWER})
    yield srv
    srv.stop()


def test_cors_for_the_configured_origin_only(cors_server: Server) -> None:
    for method in ("GET", "POST", "DELETE"):
        r = preflight(cors_server, VIEWER, method)
        assert r.status_code == 200, r.text
        assert r.headers["Access-Control-Allow-Origin"] == VIEWER
        assert "authorization" in r.headers["Access-Control-Allow-Headers"].lower()
        assert method in r.headers["Access-Control-Allow-Methods"]

    r = preflight(cors_server, "http://evil.example")
    assert "Access-Control-Allow-Origin" not in r.headers

    r = cors_server.session().get(f"{cors_server.dicomweb}/studies", timeout=10,
                                  headers={"Origin": VIEWER})
    assert r.status_code == 200
    assert r.headers["Access-Control-Allow-Origin"] == VIEWER
    r = requests.get(f"{cors_server.dicomweb}/studies", headers={"Origin": VIEWER}, timeout=10)
    assert r.status_code == 401  # the browser may read why it was refused
    assert r.headers["Access-Control-Allow-Origin"] == VIEWER
    r = cors_server.session().get(f"{cors_server.dicomweb}/studies", timeout=10,
                                  headers={"Origin": "http://evil.example"})
    assert "Access-Control-Allow-Origin" not in r.headers


def test_no_cors_unless_configured(server: Server) -> None:
    r = preflight(server, VIEWER)
    assert "Access-Control-Allow-Origin" not in r.headers
    r = server.session().get(f"{server.dicomweb}/studies", headers={"Origin": VIEWER},
                             timeout=10)
    assert "Access-Control-Allow-Origin" not in r.headers
