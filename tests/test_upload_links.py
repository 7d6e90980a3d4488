"""Upload links end to end against a running server: a specialist makes a link, someone
without an account sends files through the resumable protocol (requests, raw sockets and
headless Chromium), and the specialist's organisation finds the study, byte for byte."""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import socket
import sqlite3
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import pydicom
import pytest
import requests
from pydicom.uid import generate_uid

from conftest import Server, make_file, make_server, split_multipart
from test_auth import STOW_TYPE, stow_body

if TYPE_CHECKING:
    from playwright.sync_api import Browser

pytest_plugins = ["browser"]

OFFSET_TYPE = "application/offset+octet-stream"


@dataclass
class Site:
    server: Server
    tokens: dict[str, str] = field(default_factory=dict)  # "org/role" -> token

    def api(self, who: str) -> requests.Session:
        return self.server.session(self.tokens[who])

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    server = make_server(tmp_path_factory.mktemp("uploads"))
    site = Site(server, {"site/root": server.make_root()})
    root = site.api("site/root")
    for org in ("specialist", "clinic"):
        assert root.post(f"{site.url}/api/organisations", json={"name": org}).ok
    for org, role in (("specialist", "clinician"), ("specialist", "admin"),
                      ("specialist", "uploader"), ("clinic", "clinician"), ("clinic", "admin")):
        site.tokens[f"{org}/{role}"] = server.make_user(root, f"{role}-{org}", org, role)
    yield site
    server.stop()


def new_link(site: Site, who: str = "specialist/clinician", **body: Any) -> dict[str, Any]:
    r = site.api(who).post(f"{site.url}/api/upload-links", json={"label": "Dr Who", **body})
    assert r.status_code == 201, r.text
    return r.json()


def begin(link: dict[str, Any], name: str, size: int) -> requests.Response:
    return requests.post(f"{link['url']}/files", json={"name": name, "size": size}, timeout=30)


def patch(link: dict[str, Any], upload_id: str, offset: int, data: bytes) -> requests.Response:
    return requests.patch(f"{link['url']}/files/{upload_id}", data=data, timeout=120,
                          headers={"Content-Type": OFFSET_TYPE, "Upload-Offset": str(offset)})


def send(link: dict[str, Any], name: str, data: bytes, chunk: int = 64 * 1024) -> dict[str, Any]:
    """Upload one file in chunks the way a client does; its final state."""
    r = begin(link, name, len(data))
    assert r.status_code == 201, r.text
    upload_id = r.json()["upload_id"]
    assert r.json()["offset"] == 0
    offset = 0
    while offset < len(data):
        r = patch(link, upload_id, offset, data[offset:offset + chunk])
        assert r.status_code == 204, r.text
        offset = int(r.headers["Upload-Offset"])
    return state(link, upload_id)


def patch_head(site: Site, link: dict[str, Any], upload_id: str, offset: int,
               length: int) -> bytes:
    """The head of a PATCH whose body a test sends by hand over a socket (to drop the
    connection midway, or to hold a transfer open)."""
    host = urlsplit(site.url)
    return (f"PATCH /upload/{link['secret']}/files/{upload_id} HTTP/1.1\r\n"
            f"Host: {host.netloc}\r\nContent-Type: {OFFSET_TYPE}\r\n"
            f"Upload-Offset: {offset}\r\nContent-Length: {length}\r\n\r\n").encode()


def state(link: dict[str, Any], upload_id: str) -> dict[str, Any]:
    r = requests.get(f"{link['url']}/files/{upload_id}", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def dicom_bytes(folder: Path, **attrs: Any) -> tuple[bytes, pydicom.Dataset]:
    path = make_file(folder, **attrs)
    return path.read_bytes(), pydicom.dcmread(path)


def wado_instance(site: Site, who: str, ds: pydicom.Dataset) -> requests.Response:
    return site.api(who).get(
        f"{site.server.dicomweb}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}",
        headers={"Accept": 'multipart/related; type="application/dicom"'}, timeout=30)


def qido_studies(site: Site, who: str, study: str) -> list[Any]:
    r = site.api(who).get(f"{site.server.dicomweb}/studies",
                          params={"StudyInstanceUID": study}, timeout=30)
    assert r.status_code in (200, 204), r.text
    return r.json() if r.status_code == 200 else []


def audit(site: Site, action: str) -> list[dict[str, Any]]:
    time.sleep(0.3)  # audit records are written by a background writer
    r = site.api("specialist/admin").get(f"{site.url}/api/audit",
                                         params={"action": action, "limit": 1000})
    assert r.status_code == 200, r.text
    return list(r.json())


def database(site: Site) -> sqlite3.Connection:
    return sqlite3.connect(site.server.data_dir / "index.db", timeout=30)


# -- the specialist's API ----------------------------------------------------------------------
def test_create_list_read_and_revoke_own_links_only(site: Site) -> None:
    link = new_link(site, expires_in_days=3, max_bytes=10_000_000, notify=True)
    secret = link["secret"]
    assert len(secret) >= 43  # 32 random bytes
    assert link["url"] == f"{site.url}/upload/{secret}"
    assert link["state"] == "active" and link["max_bytes"] == 10_000_000 and link["notify"]
    mine = site.api("specialist/admin").get(f"{site.url}/api/upload-links").json()
    assert link["id"] in [x["id"] for x in mine]
    assert all("secret" not in x for x in mine)  # shown once
    assert secret not in json.dumps(mine)
    # Another organisation neither lists, reads nor revokes it: it does not exist for them.
    other = site.api("clinic/admin")
    assert link["id"] not in [x["id"] for x in other.get(f"{site.url}/api/upload-links").json()]
    for method in ("get", "delete"):
        r = getattr(other, method)(f"{site.url}/api/upload-links/{link['id']}")
        assert r.status_code == 404, r.text
        missing = getattr(other, method)(f"{site.url}/api/upload-links/999999")
        assert missing.status_code == 404
        assert r.json()["error"].replace(str(link["id"]), "X") == \
            missing.json()["error"].replace("999999", "X")
    assert requests.get(link["url"], timeout=30).status_code == 200  # still usable
    time.sleep(0.3)
    tried = other.get(f"{site.url}/api/audit", params={"action": "upload-link.revoke"}).json()
    assert any(x["outcome"] == "denied" and x["details"]["upload_link"] == link["id"]
               for x in tried)
    with database(site) as db:  # only a digest of the secret is kept
        [(digest,)] = db.execute("SELECT secret_hash FROM upload_link WHERE pk = ?",
                                 (link["id"],)).fetchall()
    assert digest == hashlib.sha256(secret.encode()).hexdigest()
    # Uploaders store but do not hand out links.
    r = site.api("specialist/uploader").post(f"{site.url}/api/upload-links", json={})
    assert r.status_code == 403
    # Bad parameters are refused with a reason.
    for body in ({"expires_in_days": 91}, {"expires_in_days": 0}, {"max_bytes": 0},
                 {"max_bytes": 2 * 1024**4}):
        r = site.api("specialist/clinician").post(f"{site.url}/api/upload-links", json=body)
        assert r.status_code == 400, (body, r.text)
    assert site.api("specialist/admin").delete(
        f"{site.url}/api/upload-links/{link['id']}").json()["state"] == "revoked"
    created = audit(site, "upload-link.create")
    assert any(x["details"].get("upload_link") == link["id"] for x in created)


# -- the protocol --------------------------------------------------------------------------------
def test_upload_dicom_files_into_the_specialists_organisation(site: Site, tmp_path: Path) -> None:
    link = new_link(site, notify=True)
    study = generate_uid()
    sent = [dicom_bytes(tmp_path, study=study) for _ in range(2)]
    for i, (data, _) in enumerate(sent):
        result = send(link, f"CT/{i}.dcm", data, chunk=1000 + i * 3000)
        assert result["state"] == "stored", result
        assert result["offset"] == len(data)
        assert [r["outcome"] for r in result["results"]] == ["stored"]
        assert result["results"][0]["study"] == study
    # The specialist's organisation sees it, byte for byte; the clinic does not.
    assert len(qido_studies(site, "specialist/clinician", study)) == 1
    assert qido_studies(site, "clinic/clinician", study) == []
    for data, ds in sent:
        r = wado_instance(site, "specialist/clinician", ds)
        assert r.status_code == 200, r.text
        [(_, body)] = split_multipart(r)
        assert body == data
    # The same bytes again: a duplicate, nothing changes.
    again = send(link, "again.dcm", sent[0][0])
    assert again["state"] == "stored"
    assert [r["outcome"] for r in again["results"]] == ["duplicate"]
    # The creator sees what arrived.
    info = site.api("specialist/clinician").get(
        f"{site.url}/api/upload-links/{link['id']}").json()
    assert info["instances_stored"] == 2
    assert info["instances"]["stored"] == 2 and info["instances"]["duplicate"] == 1
    assert info["studies"] == [{"study": study, "instances": 3}]
    assert info["bytes_received"] == sum(len(d) for d, _ in sent) + len(sent[0][0])
    assert len(info["files"]) == 3
    # Audited as the link, for the specialist's organisation; and the creator was told.
    stores = [x for x in audit(site, "study.store")
              if x["actor_user"] == f"upload-link:{link['id']}"]
    assert len(stores) == 3
    assert requests.post(f"{link['url']}/done", timeout=30).status_code == 204
    with database(site) as db:
        subjects = db.execute("SELECT subject, details FROM notification "
                              "WHERE kind = 'upload-received'").fetchall()
    mine = [s for s in subjects if json.loads(s[1]).get("upload_link") == link["id"]]
    assert 1 <= len(mine) <= 2, mine
    assert sum(json.loads(d)["stored"] for _, d in mine) == 2


def test_zip_archive_is_unpacked_member_by_member(site: Site, tmp_path: Path) -> None:
    link = new_link(site)
    study = generate_uid()
    members = [dicom_bytes(tmp_path, study=study) for _ in range(3)]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        for i, (data, _) in enumerate(members):
            z.writestr(f"study/series/IM{i:04d}", data)
        z.writestr("study/DICOMDIR", b"index")
        z.writestr("study/readme.txt", b"these are the images you asked for")
        z.writestr("__MACOSX/._IM0000", b"resource fork")
    result = send(link, "images.zip", buffer.getvalue(), chunk=50_000)
    assert result["state"] == "stored", result
    outcomes = {r["name"]: r for r in result["results"]}
    assert [outcomes[f"images.zip/study/series/IM{i:04d}"]["outcome"] for i in range(3)] == \
        ["stored"] * 3
    assert outcomes["images.zip/study/readme.txt"]["outcome"] == "rejected"
    assert "not a DICOM file" in outcomes["images.zip/study/readme.txt"]["reason"]
    assert outcomes["images.zip/study/DICOMDIR"]["outcome"] == "skipped"
    assert result["counts"] == {"stored": 3, "duplicate": 0, "rejected": 1, "skipped": 2}
    for data, ds in members:
        [(_, body)] = split_multipart(wado_instance(site, "specialist/admin", ds))
        assert body == data


def test_zip_bomb_is_refused(site: Site) -> None:
    link = new_link(site)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("zeros.dcm", bytes(8 * 1024 * 1024))  # compresses about 1000:1
    result = send(link, "bomb.zip", buffer.getvalue())
    assert result["state"] == "rejected"
    [only] = result["results"]
    assert only["outcome"] == "rejected" and "unpack" in only["reason"], only
    many = io.BytesIO()
    with zipfile.ZipFile(many, "w") as z:
        for i in range(10_001):
            z.writestr(f"{i}", b"")
    result = send(link, "many.zip", many.getvalue(), chunk=1 << 20)
    assert result["state"] == "rejected"
    [only] = result["results"]
    assert "too many files" in only["reason"], only


def test_resume_after_an_interrupted_transfer(site: Site, tmp_path: Path) -> None:
    link = new_link(site)
    data, ds = dicom_bytes(tmp_path, base="MR_small.dcm")
    upload_id = begin(link, "mr.dcm", len(data)).json()["upload_id"]
    half = len(data) // 2
    assert patch(link, upload_id, 0, data[:half]).headers["Upload-Offset"] == str(half)
    # A client that lost track: wrong offsets are refused with the server's offset.
    for wrong in (0, half - 1, half + 10):
        r = patch(link, upload_id, wrong, data[wrong:wrong + 100])
        assert r.status_code == 409, r.text
        assert r.headers["Upload-Offset"] == str(half)
    # The connection drops in the middle of a chunk: what arrived is kept.
    host = urlsplit(site.url)
    rest = data[half:]
    with socket.create_connection((host.hostname, host.port)) as sock:
        sock.sendall(patch_head(site, link, upload_id, half, len(rest)) + rest[:len(rest) // 2])
        time.sleep(0.5)
    offset = half
    for _ in range(50):  # until the server has noticed the drop
        r = requests.head(f"{link['url']}/files/{upload_id}", timeout=30)
        assert r.status_code == 200
        offset = int(r.headers["Upload-Offset"])
        r = patch(link, upload_id, offset, data[offset:])
        if r.status_code == 204:
            break
        assert r.status_code == 409, r.text
        time.sleep(0.1)
    assert r.status_code == 204, r.text
    assert half < offset < len(data)  # the half chunk was kept, not resent
    assert r.headers["Upload-Offset"] == str(len(data))
    assert state(link, upload_id)["state"] == "stored"
    [(_, body)] = split_multipart(wado_instance(site, "specialist/clinician", ds))
    assert body == data
    # Repeating the last chunk (its answer was lost) is harmless.
    r = patch(link, upload_id, len(data), b"")
    assert r.status_code == 204 and r.headers["Upload-Offset"] == str(len(data))


def test_one_transfer_of_a_file_at_a_time(site: Site, tmp_path: Path) -> None:
    link = new_link(site)
    data, ds = dicom_bytes(tmp_path)
    upload_id = begin(link, "ct.dcm", len(data)).json()["upload_id"]
    host = urlsplit(site.url)
    with socket.create_connection((host.hostname, host.port)) as sock:
        sock.sendall(patch_head(site, link, upload_id, 0, len(data)) + data[:1000])
        time.sleep(0.5)  # the first transfer holds the file now
        r = patch(link, upload_id, 1000, data[1000:])
        assert r.status_code == 409, r.text
        assert "in progress" in r.json()["error"]
        sock.sendall(data[1000:])  # the first one completes
        assert sock.recv(1000).startswith(b"HTTP/1.1 204")
    assert state(link, upload_id)["state"] == "stored"
    [(_, body)] = split_multipart(wado_instance(site, "specialist/clinician", ds))
    assert body == data


def test_a_file_left_processing_by_a_stopped_server_is_ingested_again(
        site: Site, tmp_path: Path) -> None:
    link = new_link(site)
    data, ds = dicom_bytes(tmp_path)
    upload_id = begin(link, "ct.dcm", len(data)).json()["upload_id"]
    assert patch(link, upload_id, 0, data[:-1]).status_code == 204
    # As a server leaves it when it stops after the last byte, before storing the file.
    part = site.server.data_dir / "uploads" / str(link["id"]) / f"{upload_id}.part"
    with part.open("ab") as f:
        f.write(data[-1:])
    with database(site) as db:
        db.execute("UPDATE upload_file SET state = 'processing', received = size, "
                   "updated_at = '2020-01-01 00:00:00.000000' WHERE upload_id = ?",
                   (upload_id,))
    result = state(link, upload_id)
    assert result["state"] == "stored", result
    assert [r["outcome"] for r in result["results"]] == ["stored"]
    [(_, body)] = split_multipart(wado_instance(site, "specialist/clinician", ds))
    assert body == data
    assert not part.exists()


def test_size_limits(site: Site, tmp_path: Path) -> None:
    data, ds = dicom_bytes(tmp_path)
    link = new_link(site, max_bytes=len(data) + 100)
    r = begin(link, "too-big.dcm", len(data) + 101)
    assert r.status_code == 413, r.text
    assert "accepts" in r.json()["error"]
    # A chunk past the declared size is dropped.
    upload_id = begin(link, "ok.dcm", len(data)).json()["upload_id"]
    r = patch(link, upload_id, 0, data + b"extra")
    assert r.status_code == 413, r.text
    # Also when no Content-Length announces it (chunked): cut off while streaming.
    r = requests.patch(f"{link['url']}/files/{upload_id}", data=iter([data, b"extra"]),
                       headers={"Content-Type": OFFSET_TYPE, "Upload-Offset": "0"},
                       timeout=60)
    assert r.status_code == 413, r.text
    assert "dropped" in r.json()["error"]
    assert requests.head(f"{link['url']}/files/{upload_id}", timeout=30) \
        .headers["Upload-Offset"] == "0"
    # The link is now (nearly) full: the next file does not fit, the page says so when full.
    assert begin(link, "second.dcm", 200).status_code == 413
    assert qido_studies(site, "specialist/admin", ds.StudyInstanceUID) == []
    r = patch(link, upload_id, 0, data)
    assert r.status_code == 204
    assert qido_studies(site, "specialist/admin", ds.StudyInstanceUID) != []
    full = new_link(site, max_bytes=10)
    assert send(full, "tiny.dcm", b"0123456789")["state"] == "rejected"
    page = requests.get(full["url"], timeout=30)
    assert page.status_code == 413 and "size limit" in page.text
    for action in ("upload.begin", "upload.chunk"):
        refused = audit(site, action)
        assert any(x["outcome"] == "denied" and x["details"].get("upload_link") == link["id"]
                   for x in refused), action


def test_cancelling_a_file_gives_its_size_back(site: Site) -> None:
    link = new_link(site, max_bytes=1000)
    upload_id = begin(link, "a.dcm", 800).json()["upload_id"]
    assert patch(link, upload_id, 0, b"x" * 100).status_code == 204
    assert begin(link, "b.dcm", 800).status_code == 413
    assert requests.delete(f"{link['url']}/files/{upload_id}", timeout=30).status_code == 204
    assert state(link, upload_id)["state"] == "cancelled"
    assert patch(link, upload_id, 100, b"x" * 100).status_code == 409
    assert begin(link, "b.dcm", 800).status_code == 201
    assert not (site.server.data_dir / "uploads" / str(link["id"]) / f"{upload_id}.part") \
        .exists()


def test_the_page_is_served_with_protective_headers(site: Site) -> None:
    link = new_link(site)
    page = requests.get(link["url"], timeout=30)
    assert page.status_code == 200
    assert 'data-testid="file-input"' in page.text
    assert page.headers["Referrer-Policy"] == "no-referrer"
    assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
    assert page.headers["Cache-Control"] == "no-store"
    info = requests.get(f"{link['url']}/info", timeout=30).json()
    assert info["organisation"] == "specialist" and info["label"] == "Dr Who"
    assert info["bytes_left"] == info["max_bytes"] and info["state"] == "active"
    opened = audit(site, "upload-link.open")
    assert any(x["details"].get("upload_link") == link["id"] for x in opened)
    assert "/upload/{secret}/files/{upload_id}" in requests.get(
        f"{site.url}/openapi.json", timeout=30).json()["paths"]


def test_non_dicom_file_is_rejected_with_a_reason(site: Site) -> None:
    link = new_link(site)
    result = send(link, "notes.txt", b"Patient is a 45 year old with a sore knee.\n" * 10)
    assert result["state"] == "rejected"
    [only] = result["results"]
    assert only["outcome"] == "rejected"
    assert "not a DICOM file" in only["reason"]
    assert not list((site.server.data_dir / "uploads" / str(link["id"])).glob("*.part"))


def test_overwriting_an_instance_is_refused(site: Site, tmp_path: Path) -> None:
    original, ds = dicom_bytes(tmp_path)
    r = site.api("specialist/clinician").post(f"{site.server.dicomweb}/studies",
                                             data=stow_body(original),
                                             headers={"Content-Type": STOW_TYPE})
    assert r.status_code == 200, r.text
    ds.PatientName = "Someone^Else"
    changed = io.BytesIO()
    ds.save_as(changed, enforce_file_format=True)
    link = new_link(site)
    result = send(link, "changed.dcm", changed.getvalue())
    [only] = result["results"]
    assert result["state"] == "rejected" and only["outcome"] == "rejected"
    assert "already stored with different content" in only["reason"]
    [(_, body)] = split_multipart(wado_instance(site, "specialist/clinician", ds))
    assert body == original


def test_a_study_of_another_organisation_is_not_added_to(site: Site, tmp_path: Path) -> None:
    study = generate_uid()
    theirs, _ = dicom_bytes(tmp_path, study=study)
    r = site.api("clinic/clinician").post(f"{site.server.dicomweb}/studies",
                                          data=stow_body(theirs),
                                          headers={"Content-Type": STOW_TYPE})
    assert r.status_code == 200, r.text
    link = new_link(site)
    extra, ds = dicom_bytes(tmp_path, study=study)
    result = send(link, "extra.dcm", extra)
    [only] = result["results"]
    assert only["outcome"] == "rejected"
    assert "clinic" not in only["reason"]  # nothing about who owns it
    assert wado_instance(site, "clinic/clinician", ds).status_code == 404
    assert wado_instance(site, "specialist/clinician", ds).status_code == 404


def test_revoked_and_expired_links_refuse_everything(site: Site, tmp_path: Path) -> None:
    data, ds = dicom_bytes(tmp_path)
    revoked = new_link(site)
    upload_id = begin(revoked, "a.dcm", len(data)).json()["upload_id"]
    assert patch(revoked, upload_id, 0, data[:100]).status_code == 204
    r = site.api("specialist/clinician").delete(f"{site.url}/api/upload-links/{revoked['id']}")
    assert r.status_code == 200 and r.json()["revoked_at"]
    page = requests.get(revoked["url"], timeout=30)
    assert page.status_code == 410 and "revoked" in page.text
    assert page.headers["Referrer-Policy"] == "no-referrer"
    assert patch(revoked, upload_id, 100, data[100:]).status_code == 410
    assert begin(revoked, "b.dcm", 10).status_code == 410
    assert requests.head(f"{revoked['url']}/files/{upload_id}", timeout=30).status_code == 410
    assert not (site.server.data_dir / "uploads" / str(revoked["id"])).exists()

    expired = new_link(site)
    upload_id = begin(expired, "a.dcm", len(data)).json()["upload_id"]
    with database(site) as db:
        db.execute("UPDATE upload_link SET expires_at = '2020-01-01 00:00:00.000000' "
                   "WHERE pk = ?", (expired["id"],))
    page = requests.get(expired["url"], timeout=30)
    assert page.status_code == 410 and "expired" in page.text
    r = patch(expired, upload_id, 0, data)
    assert r.status_code == 410 and "expired" in r.json()["error"]
    assert qido_studies(site, "specialist/admin", ds.StudyInstanceUID) == []
    listed = {x["id"]: x["state"] for x in
              site.api("specialist/admin").get(f"{site.url}/api/upload-links").json()}
    assert listed[revoked["id"]] == "revoked" and listed[expired["id"]] == "expired"
    refused = [x for x in audit(site, "upload-link.use") if x["outcome"] == "denied"]
    assert {x["actor_user"] for x in refused} >= {f"upload-link:{revoked['id']}",
                                                   f"upload-link:{expired['id']}"}


def test_unknown_secrets(site: Site) -> None:
    page = requests.get(f"{site.url}/upload/{'x' * 43}", timeout=30)
    assert page.status_code == 404 and "does not exist" in page.text
    r = requests.post(f"{site.url}/upload/{'y' * 43}/files", json={"name": "a", "size": 1},
                      timeout=30)
    assert r.status_code == 404
    r = requests.head(f"{site.url}/upload/short/files/abc", timeout=30)
    assert r.status_code == 404
    # An upload id of another link is unknown through this one.
    a, b = new_link(site), new_link(site)
    upload_id = begin(a, "a.dcm", 10).json()["upload_id"]
    assert requests.get(f"{b['url']}/files/{upload_id}", timeout=30).status_code == 404
    assert patch(b, upload_id, 0, b"0123456789").status_code == 404


def test_bad_secrets_are_throttled_and_audited(site: Site) -> None:
    # From an address of its own (all of 127/8 is loopback), so the other tests' client
    # is not throttled.
    host = urlsplit(site.url)
    statuses: list[int] = []
    for i in range(100):
        conn = http.client.HTTPConnection(host.hostname or "", host.port,
                                          source_address=("127.0.0.77", 0), timeout=30)
        conn.request("GET", f"/upload/guess-{i:040d}")
        response = conn.getresponse()
        text = response.read().decode()
        conn.close()
        statuses.append(response.status)
        if response.status == 429:
            break
    assert statuses[0] == 404
    assert statuses[-1] == 429, statuses
    assert response.getheader("Retry-After") and "too many" in text.lower()
    assert requests.get(f"{site.url}/upload/{'z' * 43}", timeout=30).status_code == 404
    time.sleep(0.5)
    # Unknown secrets name no organisation: the site's superusers read those records.
    records = [x for x in site.api("site/root").get(f"{site.url}/api/audit", params={
        "action": "upload-link.use", "limit": 1000}).json()
               if x["details"].get("source") == "127.0.0.77"]
    assert len(records) == len(statuses)
    assert all(x["outcome"] == "denied" for x in records)
    assert any("too many" in x["details"]["reason"] for x in records)


# -- the page ------------------------------------------------------------------------------------
def test_upload_page_in_a_browser(site: Site, browser: Browser, tmp_path: Path) -> None:
    from browser import open_page

    link = new_link(site, label="Knee MRI for Dr Who")
    study = generate_uid()
    files = [make_file(tmp_path / "pick", study=study) for _ in range(2)]
    note = tmp_path / "pick" / "letter.txt"
    note.write_text("Dear colleague, please find the images attached.")
    with open_page(browser) as page:
        page.goto(link["url"])
        info = page.get_by_test_id("link-info")
        info.get_by_text("Knee MRI for Dr Who", exact=False).wait_for()
        page.get_by_test_id("file-input").set_input_files([*map(str, files), str(note)])
        page.get_by_test_id("summary").wait_for(state="visible")
        assert page.get_by_test_id("summary-stored").inner_text() == "2"
        assert page.get_by_test_id("summary-duplicates").inner_text() == "0"
        assert page.get_by_test_id("summary-rejected").inner_text() == "1"
        rejected = page.get_by_test_id("rejected-item").inner_text()
        assert "letter.txt" in rejected and "not a DICOM file" in rejected
        assert page.get_by_test_id("file-row").count() == 3
    assert len(qido_studies(site, "specialist/clinician", study)) == 1


def test_the_page_sends_a_folder(site: Site, browser: Browser, tmp_path: Path) -> None:
    from browser import open_page

    link = new_link(site)
    study = generate_uid()
    folder = tmp_path / "CD" / "DICOM"
    for _ in range(3):
        make_file(folder, study=study)
    with open_page(browser) as page:
        page.goto(link["url"])
        page.get_by_test_id("folder-input").set_input_files(str(tmp_path / "CD"))
        page.get_by_test_id("summary").wait_for(state="visible")
        assert page.get_by_test_id("summary-stored").inner_text() == "3"
        names = page.get_by_test_id("file-row").evaluate_all(
            "rows => rows.map(r => r.dataset.name)")
    assert len(names) == 3 and all(n.startswith("CD/DICOM/") for n in names), names
    files = site.api("specialist/clinician").get(
        f"{site.url}/api/upload-links/{link['id']}").json()["files"]
    assert sorted(f["name"] for f in files) == sorted(names)


def test_the_page_resumes_after_a_network_error(site: Site, browser: Browser,
                                                tmp_path: Path) -> None:
    from playwright.sync_api import Route

    from browser import open_page

    link = new_link(site)
    data, ds = dicom_bytes(tmp_path / "pick")
    path = tmp_path / "pick" / "image.dcm"
    path.write_bytes(data)
    seen: list[str] = []

    def flaky(route: Route) -> None:
        seen.append(route.request.method)
        if route.request.method == "PATCH" and seen.count("PATCH") == 1:
            route.abort("connectionreset")
        else:
            route.continue_()

    with open_page(browser) as page:
        page.route("**/files/*", flaky)
        page.goto(link["url"])
        page.get_by_test_id("file-input").set_input_files(str(path))
        page.get_by_test_id("summary").wait_for(state="visible", timeout=30_000)
        assert page.get_by_test_id("summary-stored").inner_text() == "1"
        assert page.get_by_test_id("summary-rejected").inner_text() == "0"
    assert seen.count("PATCH") == 2 and "HEAD" in seen
    [(_, body)] = split_multipart(wado_instance(site, "specialist/clinician", ds))
    assert body == data
