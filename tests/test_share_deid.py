"""De-identified share links against a running server: what they serve carries no PHI, the
pseudonyms are exactly those of an export of the same project, held-back instances are
withheld, and the DICOMweb routes of the originals are never reached.

The hospital stores real pydicom samples with their PHI: CT_small (patient CT1) with an
ultrasound image (US1_UNCR) put into the same study, and MR_small (patient MR1). A
research project of the hospital gives the pseudonyms.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from conftest import Server, make_server, split_multipart
from test_auth import STOW_TYPE, stow_body

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytest_plugins = ["browser"]
DICOM_ANY = 'multipart/related; type="application/dicom"; transfer-syntax=*'


@dataclass
class Site:
    server: Server
    tokens: dict[str, str] = field(default_factory=dict)
    originals: dict[str, pydicom.Dataset] = field(default_factory=dict)  # name -> dataset
    project: int = 0
    link: dict[str, Any] = field(default_factory=dict)
    plain: dict[str, Any] = field(default_factory=dict)  # an identified link, same studies
    export: list[dict[str, Any]] = field(default_factory=list)  # the export's manifest
    export_report: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.server.url

    def api(self, who: str) -> requests.Session:
        return self.server.session(self.tokens[who])

    @property
    def root(self) -> str:
        return str(self.link["dicomweb_url"])

    def secrets(self) -> list[str]:
        """Every original identifying string: names, IDs, UIDs, dates, institution."""
        out: list[str] = []
        for ds in self.originals.values():
            out += [str(ds.PatientName), str(ds.PatientName).split("^")[-1], ds.PatientID,
                    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID,
                    ds.StudyDate]
            institution = str(ds.get("InstitutionName", ""))
            if institution and institution not in str(ds.get("Manufacturer", "")):
                out.append(institution)  # MR_small's is its kept manufacturer's name
            if ds.get("FrameOfReferenceUID"):
                out.append(ds.FrameOfReferenceUID)
        return sorted(set(out))

    def assert_clean(self, text: str) -> None:
        for secret in self.secrets():
            assert secret not in text, f"{secret!r} leaked"


def _original(name: str, **attrs: Any) -> pydicom.Dataset:
    ds = pydicom.dcmread(get_testdata_file(name))
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def _bytes(ds: pydicom.Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    server = make_server(tmp_path_factory.mktemp("deidlinks"),
                         env={"DICOMSHARE_SECURE_COOKIES": "false", "DICOMSHARE_DICOM_PORT": "0"})
    site = Site(server)
    root = server.session(server.make_root())
    for org in ("hospital", "other"):
        assert root.post(f"{server.url}/api/organisations", json={"name": org}).status_code == 201
    for org, role in [("hospital", "admin"), ("hospital", "clinician"), ("other", "admin"),
                      ("other", "clinician")]:
        site.tokens[f"{org}/{role}"] = server.make_user(root, f"{role}-{org}", org, role)
    ct = _original("CT_small.dcm")
    # An ultrasound image in the CT's study, of the same patient: at risk of burned-in text.
    us = _original("US1_UNCR.dcm", StudyInstanceUID=ct.StudyInstanceUID,
                   PatientID=ct.PatientID, PatientName=ct.PatientName,
                   SeriesInstanceUID=generate_uid())
    mr = _original("MR_small.dcm")
    site.originals = {"ct": ct, "us": us, "mr": mr}
    r = site.api("hospital/clinician").post(
        f"{server.dicomweb}/studies", data=stow_body(*(_bytes(d) for d in (ct, us, mr))),
        headers={"Content-Type": STOW_TYPE}, timeout=60)
    assert r.status_code == 200, r.text
    r = site.api("hospital/admin").post(f"{server.url}/api/research/projects",
                                        json={"name": "teaching"})
    assert r.status_code == 201, r.text
    site.project = r.json()["id"]
    site.link = _create(site, permissions=["download"], label="deid")
    site.plain = _create(site, deidentified=False, permissions=["download"])
    yield site
    server.stop()


def _create(site: Site, who: str = "hospital/clinician", **body: Any) -> dict[str, Any]:
    body.setdefault("studies", [site.originals["ct"].StudyInstanceUID,
                                site.originals["mr"].StudyInstanceUID])
    body.setdefault("deidentified", True)
    if body["deidentified"]:
        body.setdefault("project_id", site.project)
    r = site.api(who).post(f"{site.url}/api/links", json=body, timeout=30)
    assert r.status_code == 201, r.text
    return dict(r.json())


def _export(site: Site) -> list[dict[str, Any]]:
    """The manifest of an export of the whole hospital with the link's project."""
    if site.export:
        return site.export
    api = site.api("hospital/admin")
    r = api.post(f"{site.url}/api/exports", json={"project_id": site.project, "layout": "zip"})
    assert r.status_code == 202, r.text
    job = r.json()
    deadline = time.monotonic() + 120
    while job["state"] in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.3)
        job = api.get(f"{site.url}/api/exports/{job['id']}").json()
    assert job["state"] == "done", job
    r = api.get(f"{site.url}/api/exports/{job['id']}/download", timeout=60)
    assert r.status_code == 200
    archive = zipfile.ZipFile(io.BytesIO(r.content))
    site.export = json.loads(archive.read("manifest.json"))
    site.export_report = json.loads(archive.read("report.json"))
    return site.export


def _get(url: str, accept: str = "application/dicom+json", **kw: Any) -> requests.Response:
    return requests.get(url, headers={"Accept": accept}, timeout=30, **kw)


def _uid(ds: dict[str, Any], tag: str) -> str:
    return str(ds[tag]["Value"][0])


# -- creating -----------------------------------------------------------------------------------
def test_creating_needs_a_project_of_ones_own_organisation(site: Site) -> None:
    api = site.api("hospital/clinician")
    study = site.originals["ct"].StudyInstanceUID
    r = api.post(f"{site.url}/api/links", json={"studies": [study], "deidentified": True})
    assert r.status_code == 400 and "project_id" in r.json()["error"]
    r = api.post(f"{site.url}/api/links", json={"studies": [study], "project_id": site.project})
    assert r.status_code == 400 and "deidentified" in r.json()["error"]
    r = api.post(f"{site.url}/api/links", json={
        "studies": [study], "deidentified": True, "project_id": site.project,
        "permissions": ["upload"]})
    assert r.status_code == 400 and "upload" in r.json()["error"]
    r = site.api("other/admin").post(f"{site.url}/api/research/projects",
                                     json={"name": "theirs"})
    assert r.status_code == 201
    theirs = r.json()["id"]
    r = api.post(f"{site.url}/api/links", json={
        "studies": [study], "deidentified": True, "project_id": theirs})
    assert r.status_code == 404
    r = api.post(f"{site.url}/api/links", json={
        "studies": [study], "deidentified": True, "project_id": 999999})
    assert r.status_code == 404
    assert site.link["deidentified"] is True and site.link["project_id"] == site.project
    listed = api.get(f"{site.url}/api/links/{site.link['id']}").json()
    assert listed["deidentified"] is True and listed["project_id"] == site.project


# -- what it shows ------------------------------------------------------------------------------
def test_info_json_is_pseudonymous_and_lists_the_withheld(site: Site) -> None:
    r = requests.get(f"{site.link['url']}/info.json", timeout=30)
    assert r.status_code == 200, r.text
    site.assert_clean(r.text)
    info = r.json()
    assert info["deidentified"] is True
    assert len(info["studies"]) == 2
    ct_study = next(st for st in info["studies"] if "CT" in st["modalities"])
    assert re.fullmatch(r"PAT-[A-Z2-7]{16}", ct_study["patient_id"])
    assert ct_study["patient_name"] == ct_study["patient_id"]
    assert ct_study["study_uid"].startswith("2.25.")
    assert ct_study["study_date"] and ct_study["study_date"] < site.originals["ct"].StudyDate
    assert [se["modality"] for se in ct_study["series"]] == ["CT"]  # the US is withheld
    assert len(info["withheld"]) == 1
    held = info["withheld"][0]
    assert held["modality"] == "US" and "burned-in" in held["reason"]
    assert held["study_uid"] == ct_study["study_uid"]
    thumb = requests.get(f"{site.url}{ct_study['series'][0]['thumbnail_url']}", timeout=30)
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"


def test_qido_and_metadata_carry_no_phi(site: Site) -> None:
    studies = _get(f"{site.root}/studies")
    assert studies.status_code == 200, studies.text
    site.assert_clean(studies.text)
    assert len(studies.json()) == 2
    texts = []
    for st in studies.json():
        uid = _uid(st, "0020000D")
        assert uid.startswith("2.25.")
        assert _uid(st, "00100020").startswith("PAT-")
        series = _get(f"{site.root}/studies/{uid}/series")
        instances = _get(f"{site.root}/studies/{uid}/instances")
        meta = _get(f"{site.root}/studies/{uid}/metadata")
        for r in (series, instances, meta):
            assert r.status_code == 200, r.text
            texts.append(r.text)
        for ds in meta.json():
            assert _uid(ds, "00120062") == "YES"  # PatientIdentityRemoved
            assert ds["7FE00010"]["BulkDataURI"].startswith(site.root + "/studies/2.25.")
        assert "US" not in {_uid(s, "00080060") for s in series.json()}
    for text in texts:
        site.assert_clean(text)
    everything = _get(f"{site.root}/instances")
    assert len(everything.json()) == 2  # CT and MR; the US is withheld
    # Matching on UIDs works, on what the profile changed is refused with a reason.
    uid = _uid(studies.json()[0], "0020000D")
    one = _get(f"{site.root}/studies", params={"StudyInstanceUID": uid})
    assert [_uid(s, "0020000D") for s in one.json()] == [uid]
    r = _get(f"{site.root}/studies", params={"PatientName": "Compressed*"})
    assert r.status_code == 400 and "PatientName" in r.json()["error"]


def test_pseudonyms_are_those_of_an_export_of_the_project(site: Site) -> None:
    manifest = _export(site)
    assert {row["modality"] for row in manifest} == {"CT", "MR"}
    assert sum(site.export_report["held_back"].values()) == 1  # the US, there too
    served = _get(f"{site.root}/instances").json()
    link_uids = {(_uid(d, "0020000D"), _uid(d, "0020000E"), _uid(d, "00080018"))
                 for d in served}
    assert link_uids == {(row["study_uid"], row["series_uid"], row["sop_uid"])
                         for row in manifest}
    studies = _get(f"{site.root}/studies").json()
    assert {(_uid(s, "00100020"), _uid(s, "00080020")) for s in studies} == \
        {(row["patient"], row["study_date"]) for row in manifest}
    # The link's pseudonyms are in the project's map, for the admins.
    rows = site.api("hospital/admin").get(
        f"{site.url}/api/research/projects/{site.project}/pseudonyms",
        params={"kind": "study"}).json()
    assert {r["original"] for r in rows} >= {site.originals["ct"].StudyInstanceUID}


def test_instances_are_the_exported_files(site: Site) -> None:
    manifest = _export(site)
    row = next(r for r in manifest if r["modality"] == "CT")
    url = f"{site.root}/studies/{row['study_uid']}/series/{row['series_uid']}/instances/" \
          f"{row['sop_uid']}"
    r = _get(url, DICOM_ANY)
    assert r.status_code == 200, r.text[:300]
    parts = split_multipart(r)
    assert len(parts) == 1
    data = parts[0][1]
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.PatientIdentityRemoved == "YES"
    assert ds.PatientID == row["patient"] and ds.SOPInstanceUID == row["sop_uid"]
    site.assert_clean(repr(ds))
    assert hashlib.sha256(data).hexdigest() == row["sha256"]  # byte for byte the export's
    assert ds.pixel_array.shape == site.originals["ct"].pixel_array.shape
    # The whole study, through dicomweb-client.
    client = DICOMwebClient(site.root)
    found = client.retrieve_study(row["study_uid"])
    assert [str(d.SOPInstanceUID) for d in found] == [row["sop_uid"]]


def test_rendered_images_come_from_the_deidentified_instance(site: Site) -> None:
    row = next(r for r in _export(site) if r["modality"] == "CT")
    base = f"{site.root}/studies/{row['study_uid']}/series/{row['series_uid']}/instances/" \
           f"{row['sop_uid']}"
    for path in ("/rendered", "/thumbnail", "/frames/1/rendered"):
        r = _get(base + path, "image/png")
        assert r.status_code == 200, (path, r.text[:200])
        assert r.content.startswith(b"\x89PNG")
    r = _get(base + "/frames/1", 'multipart/related; type="application/octet-stream"')
    assert r.status_code == 200
    assert len(split_multipart(r)[0][1]) == 128 * 128 * 2
    # The viewer's page works on the link too.
    assert requests.get(site.link["url"], timeout=30).status_code == 200


def test_withheld_instances_are_absent(site: Site) -> None:
    info = requests.get(f"{site.link['url']}/info.json", timeout=30).json()
    held = info["withheld"][0]
    base = f"{site.root}/studies/{held['study_uid']}/series/{held['series_uid']}"
    for path in ("", "/metadata", "/rendered", "/thumbnail", "/instances",
                 f"/instances/{held['sop_uid']}", f"/instances/{held['sop_uid']}/metadata",
                 f"/instances/{held['sop_uid']}/rendered",
                 f"/instances/{held['sop_uid']}/frames/1"):
        r = _get(base + path, "*/*")
        assert r.status_code == 404, (path, r.status_code)
    r = requests.get(f"{site.link['url']}/download.zip", timeout=60)
    assert r.status_code == 200
    archive = zipfile.ZipFile(io.BytesIO(r.content))
    names = archive.namelist()
    assert "DICOMDIR" in names and len(names) == 3  # DICOMDIR, CT, MR
    for name in names:
        ds = pydicom.dcmread(io.BytesIO(archive.read(name)), force=True)
        site.assert_clean(repr(ds))
        if name != "DICOMDIR":
            assert ds.PatientIdentityRemoved == "YES" and ds.Modality in ("CT", "MR")


def test_original_uids_are_unknown(site: Site) -> None:
    ct = site.originals["ct"]
    for path in (f"/studies/{ct.StudyInstanceUID}",
                 f"/studies/{ct.StudyInstanceUID}/metadata",
                 f"/studies/{ct.StudyInstanceUID}/series",
                 f"/studies/{ct.StudyInstanceUID}/series/{ct.SeriesInstanceUID}/instances/"
                 f"{ct.SOPInstanceUID}/rendered",
                 f"/studies/{ct.StudyInstanceUID}/series/{ct.SeriesInstanceUID}/instances/"
                 f"{ct.SOPInstanceUID}",
                 "/studies/2.25.1/metadata"):
        r = _get(site.root + path, "*/*")
        assert r.status_code == 404, (path, r.status_code, r.text[:200])
    r = _get(f"{site.root}/studies", params={"StudyInstanceUID": ct.StudyInstanceUID})
    assert r.status_code == 200 and r.json() == []


def test_an_identified_link_to_the_same_studies_shows_the_originals(site: Site) -> None:
    ct = site.originals["ct"]
    r = requests.get(f"{site.plain['url']}/info.json", timeout=30)
    assert ct.StudyInstanceUID in r.text and ct.PatientID in r.text
    assert r.json()["deidentified"] is False
    r = _get(f"{site.plain['dicomweb_url']}/studies/{ct.StudyInstanceUID}/metadata")
    assert r.status_code == 200 and "CompressedSamples^CT1" in r.text


def test_dicomweb_client_searches_and_reads_metadata(site: Site) -> None:
    client = DICOMwebClient(site.root)
    studies = client.search_for_studies()
    assert len(studies) == 2
    for st in studies:
        uid = _uid(st, "0020000D")
        series = client.search_for_series(uid)
        assert series
        meta = client.retrieve_series_metadata(uid, _uid(series[0], "0020000E"))
        assert meta and all(_uid(m, "00120062") == "YES" for m in meta)
        site.assert_clean(json.dumps([studies, series, meta]))
        frames = client.retrieve_instance_frames(uid, _uid(series[0], "0020000E"),
                                                 _uid(meta[0], "00080018"), [1])
        assert len(frames) == 1 and len(frames[0]) > 1000


def test_a_pin_protects_a_deidentified_link_too(site: Site) -> None:
    link = _create(site, pin="4711-secret")
    assert requests.get(f"{link['dicomweb_url']}/studies", timeout=30).status_code == 401
    session = requests.Session()
    session.auth = ("x", "4711-secret")
    studies = DICOMwebClient(link["dicomweb_url"], session=session).search_for_studies()
    assert len(studies) == 2
    site.assert_clean(json.dumps(studies))


def test_the_routes_of_the_originals_are_never_reached(site: Site) -> None:
    """Every route of the normal DICOMweb API, under the link's root, with original and
    pseudonymous UIDs and every method: answered by the de-identified handlers or
    refused, never with an original."""
    from dicomshare.web.dicomweb import router

    ct = site.originals["ct"]
    pseudo = _get(f"{site.root}/instances").json()
    fakes = [{"study": ct.StudyInstanceUID, "series": ct.SeriesInstanceUID,
              "instance": ct.SOPInstanceUID},
             {"study": _uid(pseudo[0], "0020000D"), "series": _uid(pseudo[0], "0020000E"),
              "instance": _uid(pseudo[0], "00080018")}]
    tried = 0
    for route in router.routes:
        path = getattr(route, "path", "")
        methods = sorted(getattr(route, "methods", None) or {"GET"})
        for values in fakes:
            url = site.root + path.format(frame_list="1", tag_path="7FE00010", **values)
            for method in {*methods, "GET", "POST", "DELETE"}:
                r = requests.request(method, url, timeout=30, headers={"Accept": "*/*"},
                                     data=b"" if method == "POST" else None)
                tried += 1
                if method not in ("GET", "HEAD"):
                    assert r.status_code == 403, (method, path, r.status_code)
                    continue
                assert r.status_code in (200, 400, 404, 406), (method, path, r.status_code)
                if r.status_code == 200:
                    site.assert_clean(r.content.decode("latin-1"))
    assert tried > 50
    # The study is still there, undeleted.
    assert len(_get(f"{site.plain['dicomweb_url']}/studies").json()) == 2


def test_uses_and_refusals_are_audited_as_deidentified(site: Site) -> None:
    link = _create(site, label="audited")
    assert requests.get(f"{link['url']}/info.json", timeout=30).status_code == 200
    r = requests.post(f"{link['dicomweb_url']}/studies", data=b"x", timeout=30,
                      headers={"Content-Type": STOW_TYPE})
    assert r.status_code == 403
    time.sleep(0.5)  # refusals are recorded without waiting for the commit
    audit = site.api("hospital/admin").get(f"{site.url}/api/audit", params={
        "user": f"link:{link['id']}", "limit": 100}, timeout=10).json()
    uses = [a for a in audit if a["action"] == "link.use"]
    assert uses and all(a["details"]["deidentified"] is True for a in uses)
    denied = [a for a in audit if a["action"] == "link.dicomweb" and a["outcome"] == "denied"]
    assert denied and denied[0]["details"]["deidentified"] is True
    created = site.api("hospital/admin").get(f"{site.url}/api/audit", params={
        "action": "link.create", "limit": 100}, timeout=10).json()
    mine = [a for a in created if a["details"].get("link") == link["id"]]
    assert mine and mine[0]["details"]["deidentified"] is True


@pytest.mark.slow
def test_the_viewer_shows_the_pseudonymous_studies(page: Page, site: Site) -> None:
    info = requests.get(f"{site.link['url']}/info.json", timeout=30).json()
    ct_study = next(st for st in info["studies"] if "CT" in st["modalities"])
    page.goto(site.link["url"])
    page.wait_for_function("n => document.querySelectorAll('[data-testid=study]').length === n",
                           arg=2)
    text = page.get_by_test_id("study-list").inner_text()
    assert ct_study["patient_id"] in text
    site.assert_clean(page.content())
    page.wait_for_function(
        """() => { const imgs = [...document.querySelectorAll('[data-testid=thumbnail-image]')];
                   return imgs.length === 2 && imgs.every(i => i.complete && i.naturalWidth > 0);
        }""")
    series = ct_study["series"][0]["series_uid"]
    page.locator(f"[data-testid=series-thumbnail][data-series-uid='{series}']").click()
    page.wait_for_function(
        """() => { const i = document.querySelector('[data-testid=image]');
                   return i && i.getAttribute('src') && i.complete && i.naturalWidth > 0; }""")
    src = page.get_attribute("[data-testid=image]", "src") or ""
    assert f"/studies/{ct_study['study_uid']}/series/{series}/instances/2.25." in src
