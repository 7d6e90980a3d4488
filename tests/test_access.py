"""Organisations, ownership and grants, end to end against a running server.

The matrix: every role x the DICOMweb, API and DIMSE operations x own / granted /
foreign / expired-grant / missing studies, each with the exact outcome. What a caller may
not see must answer exactly like what does not exist, in status and body.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)

from conftest import Server, make_file, make_server
from test_auth import STOW_TYPE, stow_body


@dataclass
class Site:
    server: Server
    root: str  # superuser token
    tokens: dict[str, str] = field(default_factory=dict)  # "org/role" -> token
    studies: dict[str, str] = field(default_factory=dict)  # name -> study UID
    series: dict[str, str] = field(default_factory=dict)  # name -> a series UID in it
    instances: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (se, sop)
    grants: dict[str, int] = field(default_factory=dict)

    def api(self, token: str) -> requests.Session:
        return self.server.session(token)


def _store(site: Site, token: str, folder: Path, study: str, count: int = 2,
           series: str | None = None, **attrs: object) -> requests.Response:
    paths = [make_file(folder, study=study, series=series, **attrs) for _ in range(count)]
    return site.api(token).post(f"{site.server.dicomweb}/studies",
                                data=stow_body(*(p.read_bytes() for p in paths)),
                                headers={"Content-Type": STOW_TYPE}, timeout=60)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("access")
    server = make_server(tmp)
    site = Site(server, server.make_root())
    root = site.api(site.root)
    for org in ("hospital", "clinic", "other"):
        assert root.post(f"{server.url}/api/organisations", json={"name": org}).status_code == 201
    for org, roles in {"hospital": ["admin", "clinician", "uploader", "researcher", "auditor"],
                       "clinic": ["admin", "clinician"], "other": ["clinician"]}.items():
        for role in roles:
            site.tokens[f"{org}/{role}"] = server.make_user(root, f"{role}-{org}", org, role)
    data = tmp / "files"
    for name, owner, patient in (("own", "hospital", "PAT-H1"), ("shared", "hospital", "PAT-H2"),
                                 ("viewonly", "hospital", "PAT-H3"),
                                 ("expired", "hospital", "PAT-H4"),
                                 ("foreign", "clinic", "PAT-C1")):
        uid = generate_uid()
        series = generate_uid()
        r = _store(site, site.tokens[f"{owner}/clinician"], data, uid, series=series,
                   PatientID=patient)
        assert r.status_code == 200, r.text
        site.studies[name] = uid
        site.series[name] = series
        sop = r.json()["00081199"]["Value"][0]["00081155"]["Value"][0]
        site.instances[name] = (series, sop)
    site.studies["missing"] = generate_uid()
    site.series["missing"] = generate_uid()
    site.instances["missing"] = (site.series["missing"], generate_uid())
    share = site.api(site.tokens["hospital/clinician"])
    for name, grantee, perms, expires in (
            ("shared", "clinic", ["view", "download", "add-series"], None),
            ("viewonly", "clinic", ["view"], None),
            ("expired", "clinic", ["view", "download"], 3)):
        body = {"study_uid": site.studies[name], "organisation": grantee, "permissions": perms}
        if expires:
            body["expires_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                               time.gmtime(time.time() + expires))
        r = share.post(f"{server.url}/api/grants", json=body)
        assert r.status_code == 201, r.text
        site.grants[name] = r.json()["id"]
    time.sleep(3.5)  # the "expired" grant is now past its expiry
    yield site
    server.stop()


# -- the DICOMweb matrix --------------------------------------------------------------------
# (org/role, resource) -> expected status of: search (match count), metadata, retrieve.
# Resources seen from the hospital: own; from the clinic: shared (view+download), viewonly,
# expired; "foreign" is the clinic's own study, foreign to the hospital.
SEARCH_VISIBLE = {
    ("hospital/admin", "own"), ("hospital/clinician", "own"),
    ("hospital/admin", "shared"), ("hospital/clinician", "shared"),
    ("hospital/admin", "viewonly"), ("hospital/clinician", "viewonly"),
    ("hospital/admin", "expired"), ("hospital/clinician", "expired"),
    ("clinic/admin", "shared"), ("clinic/clinician", "shared"),
    ("clinic/admin", "viewonly"), ("clinic/clinician", "viewonly"),
    ("clinic/admin", "foreign"), ("clinic/clinician", "foreign"),
}
NO_DATA_ROLES = {"hospital/uploader", "hospital/researcher", "hospital/auditor"}
CALLERS = ["hospital/admin", "hospital/clinician", "hospital/uploader", "hospital/researcher",
           "hospital/auditor", "clinic/admin", "clinic/clinician", "other/clinician"]
RESOURCES = ["own", "shared", "viewonly", "expired", "foreign", "missing"]


def _expected(caller: str, resource: str, operation: str) -> int:
    if caller in NO_DATA_ROLES:
        return 403
    visible = (caller, resource) in SEARCH_VISIBLE
    if operation == "search":
        return 200
    if not visible:
        return 404
    if operation == "retrieve" and caller.startswith("clinic/") and resource == "viewonly":
        return 403  # may view, may not download
    return 200


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("resource", RESOURCES)
def test_dicomweb_matrix(site: Site, caller: str, resource: str) -> None:
    s = site.api(site.tokens[caller])
    base = site.server.dicomweb
    study = site.studies[resource]
    series, sop = site.instances[resource]
    r = s.get(f"{base}/studies", params={"StudyInstanceUID": study}, timeout=30)
    assert r.status_code == _expected(caller, resource, "search"), r.text
    if r.status_code == 200:
        assert len(r.json()) == (1 if (caller, resource) in SEARCH_VISIBLE else 0)
    for operation, url, headers in (
            ("metadata", f"{base}/studies/{study}/metadata", {}),
            ("metadata", f"{base}/studies/{study}/series/{series}/instances/{sop}/rendered",
             {"Accept": "image/png"}),
            ("retrieve", f"{base}/studies/{study}/series/{series}/instances/{sop}",
             {"Accept": 'multipart/related; type="application/dicom"'})):
        r = s.get(url, headers=headers, timeout=30)
        assert r.status_code == _expected(caller, resource, operation), (url, r.text)
        if r.status_code == 404:  # exactly like a study that does not exist
            missing = s.get(url.replace(study, site.studies["missing"])
                            .replace(series, site.series["missing"])
                            .replace(sop, site.instances["missing"][1]),
                            headers=headers, timeout=30)
            assert missing.status_code == 404
            assert r.json()["error"].replace(study, "X").replace(series, "X").replace(sop, "X") \
                == missing.json()["error"].replace(site.studies["missing"], "X") \
                .replace(site.series["missing"], "X").replace(site.instances["missing"][1], "X")


def test_search_lists_only_visible_studies_and_counts(site: Site) -> None:
    def listed(caller: str) -> set[str]:
        r = site.api(site.tokens[caller]).get(f"{site.server.dicomweb}/studies", timeout=30)
        assert r.status_code == 200
        return {ds["0020000D"]["Value"][0] for ds in r.json()}

    s = site.studies
    assert listed("hospital/clinician") >= {s["own"], s["shared"], s["viewonly"], s["expired"]}
    assert s["foreign"] not in listed("hospital/clinician")
    assert listed("clinic/clinician") >= {s["shared"], s["viewonly"], s["foreign"]}
    assert not listed("clinic/clinician") & {s["own"], s["expired"]}
    assert not listed("other/clinician") & set(s.values())


def test_stow_ownership_rules(site: Site, tmp_path: Path) -> None:
    """Uploaders store; no-data roles do not; nobody adds to another organisation's study
    without add-series; with it, the addition goes back to the grantor."""
    t = site.tokens
    new = generate_uid()
    assert _store(site, t["hospital/uploader"], tmp_path, new).status_code == 200
    # The uploader cannot see what it stored; its clinicians can.
    r = site.api(t["hospital/clinician"]).get(f"{site.server.dicomweb}/studies",
                                              params={"StudyInstanceUID": new})
    assert len(r.json()) == 1
    for role in ("researcher", "auditor"):
        r = _store(site, t[f"hospital/{role}"], tmp_path, generate_uid())
        assert r.status_code == 403, r.text
    # Into a foreign study without add-series: refused, nothing stored (0x0124).
    r = _store(site, t["other/clinician"], tmp_path, site.studies["own"])
    assert r.status_code == 409
    assert {item["00081197"]["Value"][0] for item in r.json()["00081198"]["Value"]} == {0x0124}
    r = site.api(t["hospital/clinician"]).get(
        f"{site.server.dicomweb}/studies/{site.studies['own']}/series")
    assert len(r.json()) == 1  # still only the hospital's series
    # With add-series (clinic on "shared"): the clinic's report series is stored, and the
    # hospital sees it.
    report_series = generate_uid()
    r = _store(site, t["clinic/clinician"], tmp_path, site.studies["shared"], count=1,
               series=report_series)
    assert r.status_code == 200, r.text
    r = site.api(t["hospital/clinician"]).get(
        f"{site.server.dicomweb}/studies/{site.studies['shared']}/series")
    assert report_series in {ds["0020000E"]["Value"][0] for ds in r.json()}


def test_counts_cover_only_visible_instances(site: Site, tmp_path: Path) -> None:
    """A study holding two organisations' series: each caller counts what it may see."""
    t = site.tokens
    study = generate_uid()
    assert _store(site, t["hospital/clinician"], tmp_path, study, count=3,
                  series=generate_uid()).status_code == 200
    grant = site.api(t["hospital/clinician"]).post(f"{site.server.url}/api/grants", json={
        "study_uid": study, "organisation": "clinic", "permissions": ["view", "add-series"]})
    assert grant.status_code == 201
    assert _store(site, t["clinic/clinician"], tmp_path, study, count=2,
                  series=generate_uid()).status_code == 200
    viewer = site.api(t["hospital/clinician"]).post(f"{site.server.url}/api/grants", json={
        "study_uid": study, "organisation": "other", "permissions": ["view"]})
    assert viewer.status_code == 201

    def counts(caller: str) -> tuple[int, int]:
        r = site.api(t[caller]).get(f"{site.server.dicomweb}/studies", params={
            "StudyInstanceUID": study, "includefield": "NumberOfStudyRelatedInstances,"
            "NumberOfStudyRelatedSeries"})
        (ds,) = r.json()
        return ds["00201208"]["Value"][0], ds["00201206"]["Value"][0]

    assert counts("hospital/clinician") == (5, 2)  # its 3 + the clinic's 2 (sent back)
    assert counts("clinic/clinician") == (5, 2)  # the granted 3 + its own 2
    assert counts("other/clinician") == (3, 1)  # only what the hospital opened to it
    r = site.api(t["other/clinician"]).get(f"{site.server.dicomweb}/studies/{study}/metadata")
    assert len(r.json()) == 3


def test_revoking_takes_effect_at_once(site: Site, tmp_path: Path) -> None:
    t = site.tokens
    study = generate_uid()
    assert _store(site, t["hospital/clinician"], tmp_path, study).status_code == 200
    hospital = site.api(t["hospital/clinician"])
    grant = hospital.post(f"{site.server.url}/api/grants", json={
        "study_uid": study, "organisation": "clinic",
        "permissions": ["view", "re-share"]}).json()
    clinic = site.api(t["clinic/clinician"])
    url = f"{site.server.dicomweb}/studies/{study}/metadata"
    assert clinic.get(url).status_code == 200
    # The clinic re-shares with "other"; a re-share cannot widen permissions.
    wider = clinic.post(f"{site.server.url}/api/grants", json={
        "study_uid": study, "organisation": "other", "permissions": ["download"]})
    assert wider.status_code == 403
    reshared = clinic.post(f"{site.server.url}/api/grants", json={
        "study_uid": study, "organisation": "other", "permissions": ["view"]})
    assert reshared.status_code == 201, reshared.text
    other = site.api(t["other/clinician"])
    assert other.get(url).status_code == 200
    # The clinic cannot revoke the hospital's grant; the hospital can, and the re-share dies.
    assert clinic.delete(f"{site.server.url}/api/grants/{grant['id']}").status_code == 403
    r = hospital.delete(f"{site.server.url}/api/grants/{grant['id']}")
    assert r.status_code == 200 and r.json()["state"] == "revoked"
    assert clinic.get(url).status_code == 404
    assert other.get(url).status_code == 404


def test_grants_need_ownership(site: Site) -> None:
    """Nobody shares what it cannot see; a study it cannot see is answered like a missing
    one; grantees without re-share cannot pass access on."""
    t = site.tokens
    for study in (site.studies["foreign"], site.studies["missing"]):
        r = site.api(t["hospital/clinician"]).post(f"{site.server.url}/api/grants", json={
            "study_uid": study, "organisation": "other"})
        assert r.status_code == 404
        assert study in r.json()["error"]
    r = site.api(t["clinic/clinician"]).post(f"{site.server.url}/api/grants", json={
        "study_uid": site.studies["viewonly"], "organisation": "other"})
    assert r.status_code == 403
    for role in ("uploader", "researcher", "auditor"):
        r = site.api(t[f"hospital/{role}"]).post(f"{site.server.url}/api/grants", json={
            "study_uid": site.studies["own"], "organisation": "other"})
        assert r.status_code == 403


def test_delete_is_for_owning_admins(site: Site, tmp_path: Path) -> None:
    t = site.tokens
    study = generate_uid()
    assert _store(site, t["hospital/clinician"], tmp_path, study).status_code == 200
    assert site.api(t["hospital/clinician"]).post(f"{site.server.url}/api/grants", json={
        "study_uid": study, "organisation": "clinic", "permissions": ["view"]}
    ).status_code == 201
    url = f"{site.server.dicomweb}/studies/{study}"
    assert site.api(t["hospital/clinician"]).delete(url).status_code == 403  # role
    assert site.api(t["clinic/admin"]).delete(url).status_code == 403  # sees, does not own
    assert site.api(t["other/clinician"]).delete(url).status_code == 403  # role first
    r = site.api(t["hospital/admin"]).delete(url)
    assert r.status_code == 200 and r.json()["deleted"] == 2
    assert site.api(t["hospital/admin"]).delete(url).status_code == 404


def test_token_scopes_narrow_the_role(site: Site) -> None:
    s = site.api(site.tokens["hospital/clinician"])
    r = s.post(f"{site.server.url}/api/tokens", json={"scopes": ["read"]})
    assert r.status_code == 201
    read_only = site.api(r.json()["token"])
    assert read_only.get(f"{site.server.dicomweb}/studies").status_code == 200
    assert read_only.post(f"{site.server.url}/api/grants", json={
        "study_uid": site.studies["own"], "organisation": "other"}).status_code == 403
    # A read-only token cannot mint a wider one.
    assert read_only.post(f"{site.server.url}/api/tokens",
                          json={"scopes": ["read", "share"]}).status_code == 403
    # An uploader's token with every scope still cannot read: the role bounds it.
    assert site.api(site.tokens["hospital/uploader"]).get(
        f"{site.server.dicomweb}/studies").status_code == 403


def test_admin_api_boundaries(site: Site) -> None:
    t, url = site.tokens, site.server.url
    hospital_admin = site.api(t["hospital/admin"])
    users = hospital_admin.get(f"{url}/api/users").json()
    assert {u["organisation"] for u in users} == {"hospital"}
    assert hospital_admin.post(f"{url}/api/users", json={
        "name": f"x-{uuid.uuid4().hex[:6]}", "organisation": "clinic",
        "role": "clinician"}).status_code == 403
    assert hospital_admin.post(f"{url}/api/users", json={
        "name": f"x-{uuid.uuid4().hex[:6]}", "role": "admin", "superuser": True
    }).status_code == 403
    assert hospital_admin.patch(f"{url}/api/users/clinician-clinic",
                                json={"disabled": True}).status_code == 404
    assert hospital_admin.post(f"{url}/api/organisations",
                               json={"name": "mine"}).status_code == 403
    for role in ("clinician", "uploader", "researcher", "auditor"):
        assert site.api(t[f"hospital/{role}"]).get(f"{url}/api/users").status_code == 403
    # Disabling a user stops its tokens at once.
    name = f"temp-{uuid.uuid4().hex[:6]}"
    assert hospital_admin.post(f"{url}/api/users", json={
        "name": name, "role": "clinician"}).status_code == 201
    token = hospital_admin.post(f"{url}/api/tokens", json={"user": name}).json()["token"]
    assert site.api(token).get(f"{site.server.dicomweb}/studies").status_code == 200
    assert hospital_admin.patch(f"{url}/api/users/{name}",
                                json={"disabled": True}).status_code == 200
    assert site.api(token).get(f"{site.server.dicomweb}/studies").status_code == 401


def test_audit_records_access_and_refusals(site: Site) -> None:
    t, url = site.tokens, site.server.url
    study = site.studies["own"]
    site.api(t["clinic/clinician"]).get(f"{site.server.dicomweb}/studies/{study}/metadata")
    site.api(t["hospital/clinician"]).get(f"{site.server.dicomweb}/studies/{study}/metadata")
    time.sleep(0.5)
    auditor = site.api(t["hospital/auditor"])
    r = auditor.get(f"{url}/api/audit", params={"study": study})
    assert r.status_code == 200
    records = r.json()
    views = [x for x in records if x["action"] == "study.view"]
    assert any(x["actor_user"] == "clinician-hospital" and x["outcome"] == "success"
               for x in views)
    # The clinic's look at a study it may not see: denied, and visible to the hospital,
    # whose data it concerns.
    assert any(x["actor_user"] == "clinician-clinic" and x["outcome"] == "denied"
               for x in records)
    # Auditors of another organisation do not see the hospital's trail.
    other = site.api(t["clinic/admin"]).get(f"{url}/api/audit", params={"study": study})
    assert other.status_code == 200
    assert all(x["actor_organisation"] != _org_id(site, "hospital") for x in other.json())
    for role in ("clinician", "uploader", "researcher"):
        assert site.api(t[f"hospital/{role}"]).get(f"{url}/api/audit").status_code == 403
    result = site.server.cli("audit", "verify", check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def _org_id(site: Site, name: str) -> int:
    orgs = site.api(site.root).get(f"{site.server.url}/api/organisations").json()
    return next(o["id"] for o in orgs if o["name"] == name)


@pytest.mark.parametrize("param", ["StudyInstanceUID", "PatientID", "PatientName",
                                   "StudyDate", "limit", "offset", "includefield",
                                   "ModalitiesInStudy", "AccessionNumber"])
@pytest.mark.parametrize("value", ["' OR 1=1 --", "x' UNION SELECT secret_hash FROM api_token--",
                                   "*' OR '1'='1", "A" * 100_00])
def test_hostile_query_values_leak_nothing(site: Site, param: str, value: str) -> None:
    r = site.api(site.tokens["other/clinician"]).get(f"{site.server.dicomweb}/studies",
                                                     params={param: value}, timeout=30)
    assert r.status_code in (200, 400), r.text
    if r.status_code == 200:
        assert r.json() == []  # "other" owns nothing and holds no live grant


def test_tampered_and_reused_tokens(site: Site) -> None:
    token = site.tokens["hospital/clinician"]
    url = f"{site.server.dicomweb}/studies"
    for bad in (token[:-1] + ("A" if token[-1] != "A" else "B"), token + "x",
                token.upper(), "dsh_" + "A" * 43):
        assert site.api(bad).get(url).status_code == 401
    s = site.api(token)
    r = s.post(f"{site.server.url}/api/tokens", json={"name": "short-lived"})
    created = r.json()
    assert site.api(created["token"]).get(url).status_code == 200
    assert s.delete(f"{site.server.url}/api/tokens/{created['id']}").status_code == 204
    assert site.api(created["token"]).get(url).status_code == 401


# -- DIMSE: the same decisions for AE titles ---------------------------------------------------
def _find(port: int, calling: str, study: str) -> tuple[list[int], int]:
    ae = AE(ae_title=calling)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMSHARE")
    assert assoc.is_established
    ident = pydicom.Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    ident.StudyInstanceUID = study
    statuses, matches = [], 0
    for status, found in assoc.send_c_find(ident, StudyRootQueryRetrieveInformationModelFind):
        statuses.append(int(status.Status))
        matches += found is not None and status.Status in (0xFF00, 0xFF01)
    assoc.release()
    return statuses, matches


def _get(port: int, calling: str, study: str) -> tuple[int, int]:
    ae = AE(ae_title=calling)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage)
    from pynetdicom import build_role, evt

    received: list[str] = []

    def on_store(event: evt.Event) -> int:
        received.append(str(event.request.AffectedSOPInstanceUID))
        return 0

    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMSHARE",
                         ext_neg=[build_role(CTImageStorage, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    ident = pydicom.Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    ident.StudyInstanceUID = study
    final = 0
    for status, _ in assoc.send_c_get(ident, StudyRootQueryRetrieveInformationModelGet):
        final = int(status.Status)
    assoc.release()
    return final, len(received)


def test_dimse_uses_the_same_decisions(site: Site, tmp_path: Path) -> None:
    server = site.server
    server.cli("ae", "add", "HOSP_PACS", "--host", "127.0.0.1", "--port", "1",
               "--org", "hospital")
    server.cli("ae", "add", "CLINIC_WS", "--host", "127.0.0.1", "--port", "1",
               "--org", "clinic")
    server.cli("ae", "add", "HOSP_MOD", "--host", "127.0.0.1", "--port", "1",
               "--org", "hospital", "--scope", "write")
    port = server.dicom_port
    s = site.studies
    # C-FIND: own and granted visible; foreign and expired like missing.
    assert _find(port, "HOSP_PACS", s["own"])[1] == 1
    assert _find(port, "HOSP_PACS", s["foreign"])[1] == 0
    assert _find(port, "CLINIC_WS", s["shared"])[1] == 1
    assert _find(port, "CLINIC_WS", s["expired"]) == _find(port, "CLINIC_WS", s["missing"])
    # A store-only modality may not query: "Refused: Not Authorized".
    statuses, _ = _find(port, "HOSP_MOD", s["own"])
    assert statuses[-1] == 0x0124
    # C-GET: granted with download gives the instances; view-only and foreign give none.
    status, received = _get(port, "CLINIC_WS", s["shared"])
    assert status == 0x0000 and received >= 2  # the 2 granted (+ a report it added)
    assert _get(port, "CLINIC_WS", s["foreign"])[1] == 2  # its own
    assert _get(port, "HOSP_PACS", s["foreign"]) == _get(port, "HOSP_PACS", s["missing"])
    assert _get(port, "CLINIC_WS", s["viewonly"])[1] == 0
    # C-STORE from the modality belongs to the hospital.
    ae = AE(ae_title="HOSP_MOD")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMSHARE")
    study = generate_uid()
    ds = pydicom.dcmread(make_file(tmp_path, study=study))
    assert int(assoc.send_c_store(ds).Status) == 0x0000
    # ... and into another organisation's study without add-series: refused.
    ds2 = pydicom.dcmread(make_file(tmp_path, study=s["foreign"]))
    assert int(assoc.send_c_store(ds2).Status) == 0x0124
    assoc.release()
    r = site.api(site.tokens["hospital/clinician"]).get(
        f"{server.dicomweb}/studies", params={"StudyInstanceUID": study})
    assert len(r.json()) == 1
    r = site.api(site.tokens["clinic/clinician"]).get(
        f"{server.dicomweb}/studies", params={"StudyInstanceUID": study})
    assert r.json() == []


def test_open_association_loses_a_revoked_add_series_grant(site: Site, tmp_path: Path) -> None:
    """An association reads where it may store at most every 2 s (STORE_ACCESS_TTL): a
    revoked add-series grant stops a modality that keeps sending within that window."""
    server, t = site.server, site.tokens
    study = generate_uid()
    assert _store(site, t["hospital/clinician"], tmp_path, study).status_code == 200
    hospital = site.api(t["hospital/clinician"])
    grant = hospital.post(f"{server.url}/api/grants", json={
        "study_uid": study, "organisation": "clinic",
        "permissions": ["view", "add-series"]}).json()
    server.cli("ae", "add", "CLINIC_MOD", "--host", "127.0.0.1", "--port", "1",
               "--org", "clinic", "--scope", "write")
    ae = AE(ae_title="CLINIC_MOD")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title="DICOMSHARE")
    try:  # its own new study first: the association now holds its store permissions
        own = pydicom.dcmread(make_file(tmp_path, study=generate_uid()))
        assert int(assoc.send_c_store(own).Status) == 0x0000
        r = hospital.delete(f"{server.url}/api/grants/{grant['id']}")
        assert r.status_code == 200, r.text
        time.sleep(2.5)
        late = pydicom.dcmread(make_file(tmp_path, study=study))
        assert int(assoc.send_c_store(late).Status) == 0x0124
    finally:
        assoc.release()


@pytest.mark.parametrize("path,param", [("/api/audit", "patient_id"), ("/api/audit", "user"),
                                        ("/api/audit", "study"), ("/api/audit", "action"),
                                        ("/api/audit", "since"), ("/api/audit", "limit"),
                                        ("/api/grants", "study"),
                                        ("/api/remote-aes/X'--/find", None)])
@pytest.mark.parametrize("value", ["' OR 1=1 --", "x\x00y", "B" * 5000])
def test_hostile_api_values_are_refused_or_harmless(site: Site, path: str, param: str | None,
                                                    value: str) -> None:
    s = site.api(site.tokens["hospital/admin"])
    if param is None:
        r = s.post(site.server.url + path, json={"level": "study", "keys": {"PatientID": value}})
        assert r.status_code == 404  # no such peer, whatever the value
        return
    r = s.get(site.server.url + path, params={param: value}, timeout=30)
    assert r.status_code in (200, 400, 422), r.text
    if r.status_code == 200:
        body = r.json()
        assert isinstance(body, list)
        assert all(value not in str(item) or item.get("action") == "audit.read"
                   for item in body)
