"""Share links end to end against a running server: the API, the public pages, the PIN,
the states a link goes through, its DICOMweb root and its zip download.

Two organisations: the hospital shares its studies; "other" is a foreign organisation
whose clinician must not see or revoke the hospital's links.
"""

from __future__ import annotations

import base64
import io
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import generate_uid

from conftest import Server, make_file, make_server
from test_auth import STOW_TYPE, stow_body

PIN = "4711-secret"


@dataclass
class Site:
    server: Server
    root: str
    tokens: dict[str, str] = field(default_factory=dict)  # "org/role" -> token
    studies: dict[str, str] = field(default_factory=dict)  # name -> study UID
    files: dict[str, dict[str, bytes]] = field(default_factory=dict)  # name -> sop -> bytes
    series: dict[str, str] = field(default_factory=dict)

    def api(self, who: str) -> requests.Session:
        return self.server.session(self.tokens[who])

    @property
    def url(self) -> str:
        return self.server.url

    def link(self, who: str = "hospital/clinician", **body: Any) -> dict[str, Any]:
        body.setdefault("studies", [self.studies["a"]])
        r = self.api(who).post(f"{self.url}/api/links", json=body, timeout=30)
        assert r.status_code == 201, r.text
        return dict(r.json())


def _store(site: Site, who: str, folder: Path, name: str, patient: str, count: int = 2) -> None:
    study, series = generate_uid(), generate_uid()
    paths = [make_file(folder, study=study, series=series, PatientID=patient,
                       StudyDescription=f"study {name}", SeriesDescription=f"series {name}",
                       InstanceNumber=n + 1) for n in range(count)]
    data = [p.read_bytes() for p in paths]
    r = site.api(who).post(f"{site.server.dicomweb}/studies", data=stow_body(*data),
                           headers={"Content-Type": STOW_TYPE}, timeout=60)
    assert r.status_code == 200, r.text
    site.studies[name] = study
    site.series[name] = series
    site.files[name] = {pydicom.dcmread(io.BytesIO(d), stop_before_pixels=True)
                        .SOPInstanceUID: d for d in data}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("links")
    server = make_server(tmp, env={"DICOMSHARE_SECURE_COOKIES": "false",
                                   "DICOMSHARE_DICOM_PORT": "0"})
    site = Site(server, server.make_root())
    root = server.session(site.root)
    for org in ("hospital", "other"):
        assert root.post(f"{server.url}/api/organisations", json={"name": org}).status_code == 201
    for org, roles in {"hospital": ["admin", "clinician", "auditor"],
                       "other": ["clinician"]}.items():
        for role in roles:
            site.tokens[f"{org}/{role}"] = server.make_user(root, f"{role}-{org}", org, role)
    files = tmp / "files"
    _store(site, "hospital/clinician", files, "a", "PAT-A")
    _store(site, "hospital/clinician", files, "b", "PAT-B")
    _store(site, "hospital/clinician", files, "a2", "PAT-A", count=1)
    _store(site, "other/clinician", files, "foreign", "PAT-F")
    yield site
    server.stop()


def _dicomweb(link: dict[str, Any], session: requests.Session | None = None) -> DICOMwebClient:
    return DICOMwebClient(link["dicomweb_url"], session=session or requests.Session())


def _uid(ds: dict[str, Any], tag: str) -> str:
    return str(ds[tag]["Value"][0])


def _basic(pin: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"link:{pin}".encode()).decode()}


# -- the API --------------------------------------------------------------------------------
def test_create_list_get_revoke(site: Site) -> None:
    link = site.link(label="for Dr. Who", permissions=["download"], max_uses=10, pin=PIN,
                     expires_in_days=7, notify=True)
    assert len(link["secret"]) >= 43  # 32 random bytes
    assert link["url"] == f"{site.url}/share/{link['secret']}"
    assert link["dicomweb_url"] == f"{site.url}/share/{link['secret']}/dicomweb"
    assert link["permissions"] == ["view", "download"]
    assert link["state"] == "active" and link["uses"] == 0 and link["has_pin"] is True
    assert link["studies"] == [site.studies["a"]] and link["patient"] is None
    api = site.api("hospital/clinician")
    listed = api.get(f"{site.url}/api/links", timeout=10)
    assert listed.status_code == 200
    assert link["secret"] not in listed.text and PIN not in listed.text
    mine = [x for x in listed.json() if x["id"] == link["id"]]
    assert mine and "secret" not in mine[0] and mine[0]["label"] == "for Dr. Who"
    got = api.get(f"{site.url}/api/links/{link['id']}", timeout=10)
    assert got.status_code == 200 and link["secret"] not in got.text
    # The organisation's admin sees it too.
    admin = site.api("hospital/admin").get(f"{site.url}/api/links", timeout=10).json()
    assert link["id"] in [x["id"] for x in admin]
    r = api.delete(f"{site.url}/api/links/{link['id']}", timeout=10)
    assert r.status_code == 200 and r.json()["state"] == "revoked"
    # The API is in the OpenAPI schema; the public pages are not.
    paths = requests.get(f"{site.url}/openapi.json", timeout=10).json()["paths"]
    assert {"/api/links", "/api/links/{link_id}"} <= set(paths)
    assert not any(p.startswith("/share/") for p in paths)
    assert api.get(f"{site.url}/api/links/{link['id']}", timeout=10).json()["state"] == "revoked"


def test_foreign_clinician_cannot_see_or_revoke(site: Site) -> None:
    link = site.link()
    foreign = site.api("other/clinician")
    assert link["id"] not in [x["id"] for x in foreign.get(f"{site.url}/api/links").json()]
    missing = foreign.get(f"{site.url}/api/links/99999999", timeout=10)
    got = foreign.get(f"{site.url}/api/links/{link['id']}", timeout=10)
    assert got.status_code == missing.status_code == 404
    assert foreign.delete(f"{site.url}/api/links/{link['id']}", timeout=10).status_code == 404
    still = site.api("hospital/clinician").get(f"{site.url}/api/links/{link['id']}").json()
    assert still["state"] == "active"


def test_create_refusals(site: Site) -> None:
    api = site.api("hospital/clinician")
    post = f"{site.url}/api/links"
    # A study of another organisation answers exactly like a study that does not exist.
    foreign = api.post(post, json={"studies": [site.studies["foreign"]]}, timeout=10)
    missing = api.post(post, json={"studies": [generate_uid()]}, timeout=10)
    assert foreign.status_code == missing.status_code == 404
    assert foreign.json()["error"].replace(site.studies["foreign"], "X") == \
        missing.json()["error"].replace(missing.json()["error"].split()[1], "X")
    past = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 60))
    cases = [
        ({"studies": [site.studies["a"]], "expires_at": past}, "past"),
        ({"studies": [site.studies["a"]], "expires_in_days": 1000}, "expires_in_days"),
        ({"studies": [site.studies["a"]], "pin": "12"}, "pin"),
        ({"studies": [site.studies["a"]], "permissions": ["delete"]}, "permissions"),
        ({"studies": [site.studies["a"]], "max_uses": 0}, "max_uses"),
        ({}, "either"),
        ({"studies": [site.studies["a"]], "deidentified": True}, "project_id"),
    ]
    for body, reason in cases:
        r = api.post(post, json=body, timeout=10)
        assert r.status_code == 400, (body, r.text)
        assert reason in r.json()["error"], (body, r.text)
    # Roles that may not share.
    r = site.api("hospital/auditor").post(post, json={"studies": [site.studies["a"]]})
    assert r.status_code == 403


# -- the public pages -----------------------------------------------------------------------
def test_unknown_secret_is_a_plain_404_page(site: Site) -> None:
    for secret in ("x" * 43, "nope"):
        r = requests.get(f"{site.url}/share/{secret}", timeout=10)
        assert r.status_code == 404
        assert r.headers["content-type"].startswith("text/html")
        assert "This link does not exist" in r.text
        assert "PIN" not in r.text
    r = requests.post(f"{site.url}/share/{'x' * 43}/unlock", data={"pin": "1234"}, timeout=10)
    assert r.status_code == 404 and "This link does not exist" in r.text
    r = requests.get(f"{site.url}/share/{'x' * 43}/dicomweb/studies", timeout=10)
    assert r.status_code == 404


def test_landing_session_and_info(site: Site) -> None:
    link = site.link(studies=[site.studies["a"], site.studies["a2"]], label="two studies")
    browser = requests.Session()
    r = browser.get(link["url"], timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    cookie = r.headers["set-cookie"].lower()
    assert "dicomshare_link=" in cookie and "httponly" in cookie
    assert "samesite=strict" in cookie and f"path=/share/{link['secret']}".lower() in cookie
    info = browser.get(f"{link['url']}/info.json", timeout=10)
    assert info.status_code == 200, info.text
    body = info.json()
    assert body["label"] == "two studies" and body["permissions"] == ["view"]
    assert body["download_url"] is None
    assert body["dicomweb_root"] == f"/share/{link['secret']}/dicomweb"
    assert sorted(s["study_uid"] for s in body["studies"]) == sorted(
        [site.studies["a"], site.studies["a2"]])
    study = next(s for s in body["studies"] if s["study_uid"] == site.studies["a"])
    assert study["study_description"] == "study a" and study["patient_id"] == "PAT-A"
    assert study["modalities"] == ["CT"]
    (series,) = study["series"]
    assert series["series_uid"] == site.series["a"] and series["instances"] == 2
    assert series["series_description"] == "series a" and series["modality"] == "CT"
    thumb = browser.get(site.url + series["thumbnail_url"], timeout=30)
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    # A page reload within the session is not a new use.
    assert browser.get(link["url"], timeout=10).status_code == 200
    got = site.api("hospital/clinician").get(f"{site.url}/api/links/{link['id']}").json()
    assert got["uses"] == 1 and got["last_used_at"]


def test_dicomweb_root_with_dicomweb_client(site: Site) -> None:
    link = site.link()
    client = _dicomweb(link)
    studies = client.search_for_studies()
    assert [_uid(s, "0020000D") for s in studies] == [site.studies["a"]]
    assert studies[0]["00081190"]["Value"][0] == \
        f"{link['dicomweb_url']}/studies/{site.studies['a']}"
    assert client.search_for_studies(search_filters={"PatientID": "PAT-B"}) == []
    metadata = client.retrieve_study_metadata(site.studies["a"])
    assert sorted(_uid(m, "00080018") for m in metadata) == sorted(site.files["a"])
    sop = sorted(site.files["a"])[0]
    jpeg = client.retrieve_instance_rendered(site.studies["a"], site.series["a"], sop,
                                             media_types=("image/jpeg",))
    assert jpeg[:2] == b"\xff\xd8"


def test_other_study_by_editing_the_url_is_404(site: Site) -> None:
    link = site.link()
    root = link["dicomweb_url"]
    for study in (site.studies["b"], site.studies["foreign"]):
        edited = requests.get(f"{root}/studies/{study}/metadata", timeout=10)
        missing_uid = generate_uid()
        missing = requests.get(f"{root}/studies/{missing_uid}/metadata", timeout=10)
        assert edited.status_code == missing.status_code == 404
        assert edited.json()["error"].replace(study, "X") == \
            missing.json()["error"].replace(missing_uid, "X")
        r = requests.get(f"{root}/studies/{study}/series/{site.series['b']}/thumbnail",
                         timeout=10)
        assert r.status_code == 404
    assert requests.get(f"{root}/studies", params={"PatientID": "PAT-B"}).json() == []
    # The viewer's info lists only the link's study, and a logged-in user's bearer token
    # does not widen what the link root shows.
    r = requests.get(f"{root}/studies", timeout=10,
                     headers={"Authorization": f"Bearer {site.tokens['hospital/admin']}"})
    assert [_uid(s, "0020000D") for s in r.json()] == [site.studies["a"]]


def test_view_only_link_cannot_download(site: Site) -> None:
    link = site.link(permissions=["view"])
    root = link["dicomweb_url"]
    r = requests.get(f"{root}/studies/{site.studies['a']}", timeout=10,
                     headers={"Accept": 'multipart/related; type="application/dicom"'})
    assert r.status_code == 403  # visible for viewing (Access.locate), so not a 404
    assert requests.get(f"{link['url']}/download.zip", timeout=10).status_code == 403
    # Rendered images and thumbnails work.
    r = requests.get(f"{root}/studies/{site.studies['a']}/series/{site.series['a']}/thumbnail",
                     timeout=30)
    assert r.status_code == 200
    # No uploads, no deletes.
    r = requests.post(f"{root}/studies/{site.studies['a']}", timeout=10,
                      data=stow_body(next(iter(site.files["a"].values()))),
                      headers={"Content-Type": STOW_TYPE})
    assert r.status_code == 403
    r = requests.delete(f"{root}/studies/{site.studies['a']}", timeout=10)
    assert r.status_code == 403


def test_patient_link_covers_all_of_the_patients_studies(site: Site) -> None:
    link = site.link(studies=None, patient={"id": "PAT-A"})
    assert link["patient"] == {"id": "PAT-A", "issuer": None} and link["studies"] == []
    found = requests.get(f"{link['dicomweb_url']}/studies", timeout=10).json()
    assert sorted(_uid(s, "0020000D") for s in found) == sorted(
        [site.studies["a"], site.studies["a2"]])
    r = site.api("hospital/clinician").post(f"{site.url}/api/links", timeout=10,
                                            json={"patient": {"id": "PAT-F"}})
    assert r.status_code == 404  # the foreign organisation's patient


def test_link_follows_the_creators_re_share_grant(site: Site) -> None:
    """A study opened to the hospital with re-share can be passed on by link; the link
    shows it only as long as that grant lives."""
    foreign = site.studies["foreign"]
    owner = site.api("other/clinician")
    r = owner.post(f"{site.url}/api/grants", timeout=10, json={
        "study_uid": foreign, "organisation": "hospital", "permissions": ["view"]})
    assert r.status_code == 201, r.text
    plain = r.json()["id"]
    api = site.api("hospital/clinician")
    r = api.post(f"{site.url}/api/links", json={"studies": [foreign]}, timeout=10)
    assert r.status_code == 403 and "re-share" in r.json()["error"]
    assert owner.delete(f"{site.url}/api/grants/{plain}", timeout=10).status_code == 200
    r = owner.post(f"{site.url}/api/grants", timeout=10, json={
        "study_uid": foreign, "organisation": "hospital", "permissions": ["view", "re-share"]})
    assert r.status_code == 201, r.text
    grant = r.json()["id"]
    r = api.post(f"{site.url}/api/links", timeout=10,
                 json={"studies": [foreign], "permissions": ["download"]})
    assert r.status_code == 403  # more than the grant allows
    link = site.link(studies=[foreign])
    root = link["dicomweb_url"]
    assert [_uid(s, "0020000D") for s in requests.get(f"{root}/studies").json()] == [foreign]
    assert requests.get(f"{root}/studies/{foreign}/metadata", timeout=10).status_code == 200
    assert owner.delete(f"{site.url}/api/grants/{grant}", timeout=10).status_code == 200
    assert requests.get(f"{root}/studies", timeout=10).json() == []
    assert requests.get(f"{root}/studies/{foreign}/metadata", timeout=10).status_code == 404


# -- the PIN ----------------------------------------------------------------------------------
def test_pin_flow(site: Site) -> None:
    link = site.link(pin=PIN)
    browser = requests.Session()
    r = browser.get(link["url"], timeout=10)
    assert r.status_code == 200 and 'name="pin"' in r.text
    assert f'action="/share/{link["secret"]}/unlock"' in r.text
    assert "dicomshare_link" not in r.headers.get("set-cookie", "")
    # Nothing without the PIN.
    assert browser.get(f"{link['url']}/info.json", timeout=10).status_code == 401
    assert browser.get(f"{link['dicomweb_url']}/studies", timeout=10).status_code == 401
    r = browser.post(f"{link['url']}/unlock", data={"pin": "wrong-pin"}, timeout=10,
                     allow_redirects=False)
    assert r.status_code == 401 and "4 attempt(s) left" in r.text and 'name="pin"' in r.text
    r = browser.post(f"{link['url']}/unlock", data={"pin": PIN}, timeout=10,
                     allow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/share/{link['secret']}"
    assert "dicomshare_link=" in r.headers["set-cookie"]
    r = browser.get(link["url"], timeout=10)
    assert r.status_code == 200 and 'name="pin"' not in r.text
    assert browser.get(f"{link['url']}/info.json", timeout=10).status_code == 200
    assert len(browser.get(f"{link['dicomweb_url']}/studies", timeout=10).json()) == 1
    # Clients that are not browsers send the PIN with HTTP Basic authentication.
    http = requests.Session()
    http.headers.update(_basic(PIN))
    client = _dicomweb(link, http)
    assert [_uid(s, "0020000D") for s in client.search_for_studies()] == [site.studies["a"]]
    r = requests.get(f"{link['dicomweb_url']}/studies", headers=_basic("bad-pin"), timeout=10)
    assert r.status_code == 401 and "attempt(s) left" in r.json()["error"]
    # A cookie of another link opens nothing here.
    other = site.link()
    stranger = requests.Session()
    assert stranger.get(other["url"], timeout=10).status_code == 200
    value = next(c.value for c in stranger.cookies if c.name == "dicomshare_link")
    r = requests.get(f"{link['url']}/info.json", cookies={"dicomshare_link": value},
                     timeout=10)
    assert r.status_code == 401


def test_pin_brute_force_locks_the_link(site: Site) -> None:
    link = site.link(pin=PIN)
    unlock = f"{link['url']}/unlock"
    statuses = [requests.post(unlock, data={"pin": f"guess-{n}"}, timeout=10).status_code
                for n in range(5)]
    assert statuses == [401, 401, 401, 401, 423]
    r = requests.post(unlock, data={"pin": PIN}, timeout=10)
    assert r.status_code == 423 and "locked" in r.text.lower()
    r = requests.get(link["url"], timeout=10)
    assert r.status_code == 423 and "ask the person who sent it" in r.text.lower()
    assert requests.get(f"{link['dicomweb_url']}/studies", headers=_basic(PIN),
                        timeout=10).status_code == 423
    got = site.api("hospital/clinician").get(f"{site.url}/api/links/{link['id']}").json()
    assert got["state"] == "locked"
    time.sleep(0.5)  # refusals are recorded without waiting for the commit
    audit = site.api("hospital/admin").get(f"{site.url}/api/audit",
                                           params={"user": f"link:{link['id']}",
                                                   "limit": 100}, timeout=10).json()
    denied = [(a["action"], a["details"].get("reason")) for a in audit
              if a["outcome"] == "denied"]
    assert denied.count(("link.unlock", "wrong PIN")) == 5
    assert ("link.lock", "too many wrong PINs") in denied


def test_parallel_pin_guesses_cannot_pass_the_limit(site: Site) -> None:
    from concurrent.futures import ThreadPoolExecutor

    link = site.link(pin=PIN)

    def guess(n: int) -> int:
        return requests.post(f"{link['url']}/unlock", data={"pin": f"parallel-{n}"},
                             timeout=30).status_code

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(guess, range(8)))
    assert statuses.count(401) <= 4 and set(statuses) <= {401, 423}
    r = requests.post(f"{link['url']}/unlock", data={"pin": PIN}, timeout=10)
    assert r.status_code == 423


# -- states -------------------------------------------------------------------------------------
def test_revoked_link_stops_at_once(site: Site) -> None:
    link = site.link()
    browser = requests.Session()
    assert browser.get(link["url"], timeout=10).status_code == 200
    assert browser.get(f"{link['url']}/info.json", timeout=10).status_code == 200
    api = site.api("hospital/clinician")
    assert api.delete(f"{site.url}/api/links/{link['id']}", timeout=10).status_code == 200
    r = browser.get(link["url"], timeout=10)
    assert r.status_code == 410 and "revoked" in r.text
    assert browser.get(f"{link['url']}/info.json", timeout=10).status_code == 410
    assert browser.get(f"{link['dicomweb_url']}/studies", timeout=10).status_code == 410


def test_expired_link(site: Site) -> None:
    soon = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3))
    link = site.link(expires_at=soon)
    browser = requests.Session()
    assert browser.get(link["url"], timeout=10).status_code == 200
    time.sleep(3.5)
    r = browser.get(link["url"], timeout=10)
    assert r.status_code == 410 and "expired" in r.text
    assert browser.get(f"{link['dicomweb_url']}/studies", timeout=10).status_code == 410
    got = site.api("hospital/clinician").get(f"{site.url}/api/links/{link['id']}").json()
    assert got["state"] == "expired"


def test_exhausted_link(site: Site) -> None:
    link = site.link(max_uses=1)
    first = requests.Session()
    assert first.get(link["url"], timeout=10).status_code == 200
    r = requests.get(link["url"], timeout=10)  # a second visitor: a new use
    assert r.status_code == 410 and "used up" in r.text
    # The session that counted the use goes on.
    assert first.get(link["url"], timeout=10).status_code == 200
    assert first.get(f"{link['url']}/info.json", timeout=10).status_code == 200
    got = site.api("hospital/clinician").get(f"{site.url}/api/links/{link['id']}").json()
    assert got["state"] == "exhausted" and got["uses"] == 1


# -- download and upload ---------------------------------------------------------------------
def test_zip_download_with_dicomdir(site: Site, tmp_path: Path) -> None:
    # An object without the values a DICOMDIR record needs (no InstanceNumber) goes too.
    plan = make_file(tmp_path / "in", base="rtplan.dcm", study=site.studies["b"],
                     PatientID="PAT-B").read_bytes()
    r = site.api("hospital/clinician").post(
        f"{site.server.dicomweb}/studies", data=stow_body(plan),
        headers={"Content-Type": STOW_TYPE}, timeout=30)
    assert r.status_code == 200, r.text
    site.files["b"][pydicom.dcmread(io.BytesIO(plan)).SOPInstanceUID] = plan
    link = site.link(studies=[site.studies["a"], site.studies["b"]],
                     permissions=["download"], label="zip test")
    r = requests.get(f"{link['url']}/download.zip", timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/zip"
    assert "zip_test.zip" in r.headers["content-disposition"]
    with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
        names = zf.namelist()
        assert "DICOMDIR" in names
        zf.extractall(tmp_path / "out")
    expected = {**site.files["a"], **site.files["b"]}
    members = [n for n in names if n != "DICOMDIR"]
    assert len(members) == len(expected)
    for name in members:
        assert all(len(part) <= 8 and part.isupper() or part.isdigit()
                   for part in name.split("/")), name
    from pydicom.fileset import FileSet

    fs = FileSet(pydicom.dcmread(tmp_path / "out" / "DICOMDIR"))
    seen = {}
    for instance in fs:
        data = (tmp_path / "out" / instance.FileID.replace("\\", "/")).read_bytes()
        seen[instance.SOPInstanceUID] = data
    assert seen.keys() == expected.keys()
    for sop, data in expected.items():
        assert seen[sop] == data  # byte-identical to what was stored
    got = site.api("hospital/clinician").get(f"{site.url}/api/links/{link['id']}").json()
    assert got["uses"] == 1
    time.sleep(0.5)
    audit = site.api("hospital/admin").get(f"{site.url}/api/audit", timeout=10, params={
        "user": f"link:{link['id']}", "action": "link.download"}).json()
    assert audit and audit[0]["details"]["instances"] == len(expected)


def test_upload_into_a_covered_study(site: Site, tmp_path: Path) -> None:
    link = site.link(permissions=["view", "upload"])
    root = link["dicomweb_url"]
    new = make_file(tmp_path, study=site.studies["a"], PatientID="PAT-A").read_bytes()
    r = requests.post(f"{root}/studies/{site.studies['a']}", data=stow_body(new),
                      headers={"Content-Type": STOW_TYPE}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["00081190"]["Value"][0].startswith(root)
    # Visible to the hospital afterwards (owned by the link creator's organisation).
    found = site.api("hospital/clinician").get(
        f"{site.server.dicomweb}/studies/{site.studies['a']}/instances", timeout=10).json()
    assert len(found) == 3
    # Not into another study, nor without naming the study.
    other = make_file(tmp_path, study=site.studies["b"]).read_bytes()
    r = requests.post(f"{root}/studies/{site.studies['b']}", data=stow_body(other),
                      headers={"Content-Type": STOW_TYPE}, timeout=30)
    assert r.status_code == 404
    r = requests.post(f"{root}/studies", data=stow_body(other),
                      headers={"Content-Type": STOW_TYPE}, timeout=30)
    assert r.status_code == 400


# -- audit and notifications -----------------------------------------------------------------
def test_audit_trail(site: Site) -> None:
    link = site.link(notify=True)
    assert requests.get(link["url"], timeout=10).status_code == 200
    api = site.api("hospital/clinician")
    assert api.delete(f"{site.url}/api/links/{link['id']}", timeout=10).status_code == 200
    assert requests.get(link["url"], timeout=10).status_code == 410
    requests.get(f"{site.url}/share/{'y' * 43}", timeout=10)
    admin = site.api("hospital/admin")

    def actions(**params: Any) -> list[tuple[str, str]]:
        rows = admin.get(f"{site.url}/api/audit", params={"limit": 1000, **params},
                         timeout=10).json()
        return [(a["action"], a["outcome"]) for a in rows
                if a["details"].get("link") == link["id"]]

    time.sleep(0.5)  # uses are recorded without waiting for the commit

    made = actions(action="link.create")
    assert made == [("link.create", "success")]
    assert ("link.revoke", "success") in actions(action="link.revoke")
    used = actions(user=f"link:{link['id']}")
    assert ("link.use", "success") in used and ("link.open", "denied") in used
    # The unknown secret: recorded (seen by the superuser, it touches no organisation).
    rows = site.server.session(site.root).get(f"{site.url}/api/audit", timeout=10, params={
        "action": "link.open", "limit": 50}).json()
    assert any(a["details"].get("reason") == "unknown link secret" for a in rows)
    assert not any("y" * 43 in str(a) for a in rows)  # the tried secret is not kept
    # The creator was notified of the use.
    notes = api.get(f"{site.url}/api/notifications", params={"kind": "share-used"},
                    timeout=10).json()
    assert any(n["details"].get("link") == link["id"] for n in notes)
    # A refused creation is audited too.
    api.post(f"{site.url}/api/links", json={"studies": [site.studies["foreign"]]}, timeout=10)
    rows = admin.get(f"{site.url}/api/audit", params={"action": "link.create"}).json()
    assert any(a["outcome"] == "denied" for a in rows)


# -- last: it leaves this address throttled ---------------------------------------------------
def test_guessing_secrets_is_throttled_per_address(site: Site) -> None:
    link = site.link()
    viewer = requests.Session()
    assert viewer.get(link["url"], timeout=10).status_code == 200
    statuses = [requests.get(f"{site.url}/share/{'g' * 42}{n % 10}", timeout=10).status_code
                for n in range(31)]
    assert statuses[0] == 404 and statuses[-1] == 429
    r = requests.get(f"{site.url}/share/{'g' * 43}", timeout=10)
    assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
    r = requests.get(f"{site.url}/share/{'g' * 43}/dicomweb/studies", timeout=10)
    assert r.status_code == 429
    # A browser already viewing a link from this address goes on; new visitors wait.
    assert viewer.get(f"{link['url']}/info.json", timeout=10).status_code == 200
    assert requests.get(link["url"], timeout=10).status_code == 429
