"""Research cohorts and de-identified exports, against a running server."""

from __future__ import annotations

import io
import json
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import pydicom
import pytest
import requests
from pydicom.uid import generate_uid

from conftest import Server, make_file, make_server
from test_auth import STOW_TYPE, stow_body

PATIENTS = {
    # id: (name, sex, birth date, [(study date, modality, description, instances)])
    "H-100": ("Alpha^Ann", "F", "19500101",
              [("20200301", "CT", "CT CHEST", 2), ("20230301", "CT", "CT CHEST FOLLOW-UP", 2)]),
    "H-200": ("Beta^Bob", "M", "19800615", [("20210510", "MR", "MR KNEE", 3)]),
    "H-300": ("Gamma^Gil", "M", "20100101", [("20220101", "CT", "CT HEAD", 1)]),
    "H-400": ("Delta^Dee", "F", "19700202", [("20220202", "US", "US ABDOMEN", 1)]),
}


@dataclass
class Site:
    server: Server
    tokens: dict[str, str] = field(default_factory=dict)
    studies: dict[str, list[str]] = field(default_factory=dict)  # patient -> study UIDs

    def api(self, who: str) -> requests.Session:
        return self.server.session(self.tokens[who])

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("research")
    server = make_server(tmp, env={"DICOMSHARE_EXPORT_STALE_SECONDS": "2"})
    root = server.session(server.make_root())
    site = Site(server)
    for org in ("hospital", "lab"):
        assert root.post(f"{server.url}/api/organisations", json={"name": org}).ok
    for name, org, role in (("clin", "hospital", "clinician"), ("res", "hospital", "researcher"),
                            ("adm", "hospital", "admin"), ("labres", "lab", "researcher")):
        site.tokens[name] = server.make_user(root, name, org, role)
    files = tmp / "files"
    for pid, (name, sex, born, studies) in PATIENTS.items():
        for date, modality, description, count in studies:
            study, series = generate_uid(), generate_uid()
            base = "US1_UNCR.dcm" if modality == "US" else "CT_small.dcm"
            paths = [make_file(files, base=base, study=study, series=series, PatientID=pid,
                               PatientName=name, PatientSex=sex, PatientBirthDate=born,
                               StudyDate=date, Modality=modality,
                               StudyDescription=description, InstitutionName="General PHI")
                     for _ in range(count)]
            r = site.api("clin").post(f"{server.dicomweb}/studies",
                                      data=stow_body(*(p.read_bytes() for p in paths)),
                                      headers={"Content-Type": STOW_TYPE})
            assert r.status_code == 200, r.text
            site.studies.setdefault(pid, []).append(study)
    yield site
    server.stop()


def counted(site: Site, who: str, **cohort: object) -> dict[str, object]:
    r = site.api(who).post(f"{site.url}/api/research/cohorts/count", json=cohort)
    assert r.status_code == 200, r.text
    return r.json()


def test_cohort_counts_filter_before_export(site: Site) -> None:
    everything = counted(site, "res")
    assert (everything["patients"], everything["studies"], everything["instances"]) == (4, 5, 9)
    assert counted(site, "res", modalities=["CT"])["studies"] == 3
    assert counted(site, "res", modalities=["CT"], sexes=["F"])["instances"] == 4
    assert counted(site, "res", study_date_from="20220101", study_date_to="20221231"
                   )["studies"] == 2
    # Age at the study: H-100 was 70 and 73, H-200 40, H-300 12, H-400 52.
    assert counted(site, "res", age_min=65)["patients"] == 1
    assert counted(site, "res", age_max=17)["patients"] == 1
    assert counted(site, "res", description="follow")["studies"] == 1
    assert counted(site, "res", organisations=["lab"])["instances"] == 0


def test_cohorts_are_for_researchers_within_their_data(site: Site) -> None:
    assert site.api("clin").post(f"{site.url}/api/research/cohorts/count",
                                 json={}).status_code == 403
    # Researchers see nothing identifiable: no QIDO, no WADO.
    assert site.api("res").get(f"{site.server.dicomweb}/studies").status_code == 403
    # The lab sees nothing until the hospital opens a patient for research.
    assert counted(site, "labres")["instances"] == 0
    r = site.api("clin").post(f"{site.url}/api/grants", json={
        "patient_id": "H-200", "organisation": "lab", "permissions": ["research"]})
    assert r.status_code == 201, r.text
    assert counted(site, "labres")["instances"] == 3
    # A research grant opens no identifiable view to the lab's clinicians or researchers.
    assert site.api("labres").get(f"{site.server.dicomweb}/studies").status_code == 403


def test_opted_out_patients_are_excluded(site: Site) -> None:
    before = counted(site, "res", modalities=["MR"])
    assert before["patients"] == 1
    r = site.api("clin").post(f"{site.url}/api/research/optouts",
                              json={"patient_id": "H-200", "reason": "declined"})
    assert r.status_code == 204
    after = counted(site, "res", modalities=["MR"])
    assert after["patients"] == 0 and after["opted_out_patients"] == 1
    assert site.api("clin").delete(f"{site.url}/api/research/optouts/H-200").status_code == 204
    assert counted(site, "res", modalities=["MR"])["patients"] == 1


def _export(site: Site, who: str, project: int, **cohort: object) -> dict[str, object]:
    r = site.api(who).post(f"{site.url}/api/exports", json={
        "project_id": project, "cohort": cohort, "layout": "zip"})
    assert r.status_code == 202, r.text
    job = r.json()
    deadline = time.monotonic() + 120
    while job["state"] in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.3)
        job = site.api(who).get(f"{site.url}/api/exports/{job['id']}").json()
    assert job["state"] == "done", job
    return job


def _zip(site: Site, who: str, job: dict[str, object]) -> zipfile.ZipFile:
    r = site.api(who).get(f"{site.url}/api/exports/{job['id']}/download")
    assert r.status_code == 200
    return zipfile.ZipFile(io.BytesIO(r.content))


def test_export_is_deidentified_consistent_and_audited(site: Site) -> None:
    r = site.api("res").post(f"{site.url}/api/research/projects", json={"name": "lung-fu"})
    assert r.status_code == 201, r.text
    project = r.json()["id"]
    job = _export(site, "res", project, modalities=["CT", "US"])
    assert (job["total"], job["exported"], job["held_back"]) == (6, 5, 1)  # US held back
    archive = _zip(site, "res", job)
    manifest = json.loads(archive.read("manifest.json"))
    assert len(manifest) == 5
    report = json.loads(archive.read("report.json"))
    assert report["exported"] == 5 and sum(report["held_back"].values()) == 1
    originals = [*PATIENTS, "Alpha", "Gamma", "General PHI", *site.studies["H-100"]]
    for row in manifest:
        data = archive.read(row["path"])
        for secret in originals:
            assert secret.encode() not in data, (secret, row["path"])
        ds = pydicom.dcmread(io.BytesIO(data))
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.SOPInstanceUID == row["sop_uid"]
    # One patient, one pseudonym; its two studies keep their interval (3 years).
    h100 = [row for row in manifest if row["study_date"] and row["patient"] ==
            manifest[0]["patient"]]
    assert len({row["patient"] for row in manifest}) == 2
    dates = sorted({row["study_date"] for row in h100})
    if len(dates) == 2:
        assert int(dates[1][:4]) - int(dates[0][:4]) == 3
    # The same project maps the same way again; the originals stay on the server, for admins.
    again = json.loads(_zip(site, "res", _export(site, "res", project, modalities=["CT"]))
                       .read("manifest.json"))
    assert {r["sop_uid"] for r in again} == {r["sop_uid"] for r in manifest
                                             if r["modality"] == "CT"}
    url = f"{site.url}/api/research/projects/{project}/pseudonyms"
    assert site.api("res").get(url).status_code == 403
    mapped = site.api("adm").get(url).json()
    assert {m["original"].split("|")[0] for m in mapped} == {"H-100", "H-300"}
    audit = site.api("adm").get(f"{site.url}/api/audit",
                                params={"action": "research.export"}).json()
    assert audit and audit[0]["details"]["query"] == {"modalities": ["CT"]}


def test_export_resumes_after_a_crash(site: Site) -> None:
    project = site.api("adm").post(f"{site.url}/api/research/projects",
                                   json={"name": "resume"}).json()["id"]
    r = site.api("adm").post(f"{site.url}/api/exports", json={
        "project_id": project, "cohort": {"modalities": ["CT", "MR"]}, "layout": "folder"})
    job = r.json()
    site.server.stop(kill=True)  # whatever was running dies with it
    site.server.start()
    deadline = time.monotonic() + 120
    while job["state"] != "done" and time.monotonic() < deadline:
        time.sleep(0.5)
        job = site.api("adm").get(f"{site.url}/api/exports/{job['id']}").json()
    assert job["state"] == "done" and job["exported"] == 8, job
    folder = site.server.data_dir / "exports" / str(job["id"])
    files = list((folder / "dataset").rglob("*.dcm"))
    assert len(files) == 8
    assert len((folder / "manifest.csv").read_text().splitlines()) == 9
    assert not (folder / "tmp").exists()


def test_bad_cohorts_are_refused(site: Site) -> None:
    for bad in ({"study_date_from": "2020-01-01"}, {"age_min": -1}, {"sexes": ["X"]},
                {"modalities": ["CT"] * 51}, {"description": "x" * 201}):
        r = site.api("res").post(f"{site.url}/api/research/cohorts/count", json=bad)
        assert r.status_code == 400, (bad, r.text)
    r = site.api("res").post(f"{site.url}/api/exports", json={
        "project_id": 999_999, "cohort": {}})
    assert r.status_code == 404
    project = site.api("res").post(f"{site.url}/api/research/projects",
                                   json={"name": "bad-options"})
    pid = project.json()["id"]
    r = site.api("res").post(f"{site.url}/api/exports", json={
        "project_id": pid, "cohort": {}, "options": ["retain_everything"]})
    assert r.status_code == 400


def test_export_with_volumes_lists_them_or_says_why_not(site: Site) -> None:
    project = site.api("res").post(f"{site.url}/api/research/projects",
                                   json={"name": "volumes"}).json()["id"]
    r = site.api("res").post(f"{site.url}/api/exports", json={
        "project_id": project, "cohort": {"modalities": ["CT"]}, "layout": "zip",
        "volumes": True})
    assert r.status_code == 202 and r.json()["volumes"] is True
    job = r.json()
    deadline = time.monotonic() + 120
    while job["state"] in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.3)
        job = site.api("res").get(f"{site.url}/api/exports/{job['id']}").json()
    assert job["state"] == "done", job
    volumes = json.loads(_zip(site, "res", job).read("volumes.json"))
    # The samples of one series are copies of one slice (one position): not a volume,
    # and the report says so; tests/test_nifti.py covers real volumes.
    assert volumes["volumes"] == [] and len(volumes["skipped"]) == 3
    assert all("position" in why or "slice" in why for why in volumes["skipped"].values())
