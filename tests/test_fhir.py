"""FHIR R4 read endpoints and IHE Invoke Image Display against a running server.

Two organisations store studies built from pydicom's sample files: "alpha" has a patient
with an OID issuer (two studies, one of them with two series) and a patient without an
issuer; "beta" has a study of the same issuer-qualified patient and one with the same
bare PatientID as alpha's (a different patient: another organisation). Resources are
validated with ``fhir.resources.R4B`` (the R4 resources did not change in R4B).

Patient links use two more organisations on the same server, "gamma" (a hospital) and
"delta" (a clinic), whose records of one person are linked and merged through the real
/api/patients endpoints; alpha's and beta's views do not change.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlparse

import pydicom
import pytest
import requests
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.endpoint import Endpoint
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.operationoutcome import OperationOutcome
from fhir.resources.R4B.patient import Patient
from pydicom.uid import generate_uid

from conftest import Server, make_file, make_server
from test_auth import STOW_TYPE, stow_body

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytest_plugins = ["browser"]

PASSWORD = "correct horse battery"
ISSUER = "1.2.826.0.1.3680043.10.99"
FHIR_JSON = "application/fhir+json"
DCM = "http://dicom.nema.org/resources/ontology/DCM"


@dataclass
class World:
    server: Server
    tokens: dict[str, str] = field(default_factory=dict)
    studies: dict[str, str] = field(default_factory=dict)  # name -> StudyInstanceUID
    counts: dict[str, tuple[int, int]] = field(default_factory=dict)  # series, instances
    sops: dict[str, set[str]] = field(default_factory=dict)

    def api(self, user: str) -> requests.Session:
        return self.server.session(self.tokens[user])

    def get(self, user: str, path: str, **params: Any) -> requests.Response:
        return self.api(user).get(f"{self.server.url}{path}", params=params or None,
                                  timeout=30)


def _store(world: World, user: str, name: str, files: list[Any]) -> None:
    r = world.api(user).post(f"{world.server.dicomweb}/studies",
                             data=stow_body(*(p.read_bytes() for p in files)),
                             headers={"Content-Type": STOW_TYPE}, timeout=60)
    assert r.status_code == 200, r.text
    datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    world.studies[name] = str(datasets[0].StudyInstanceUID)
    world.counts[name] = (len({d.SeriesInstanceUID for d in datasets}), len(datasets))
    world.sops[name] = {str(d.SOPInstanceUID) for d in datasets}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("fhir")
    server = make_server(tmp, env={"DICOMSHARE_SECURE_COOKIES": "false",
                                   "DICOMSHARE_DICOM_PORT": "0"})
    try:
        w = World(server)
        w.tokens["root"] = server.make_root()
        root = w.api("root")
        for user, org in (("ann", "alpha"), ("bob", "beta")):
            made = root.post(f"{server.url}/api/organisations", json={"name": org}, timeout=30)
            assert made.status_code == 201, made.text
            w.tokens[user] = server.make_user(root, user, org, "clinician")
        files = tmp / "files"
        anna = {"PatientName": "Fhirson^Anna^Maria", "PatientID": "PA-1",
                "IssuerOfPatientID": ISSUER, "PatientBirthDate": "19700102",
                "PatientSex": "F"}
        # alpha: Anna's CT (two series, three instances) and MR; Otto without an issuer.
        ct, se1, se2 = generate_uid(), generate_uid(), generate_uid()
        _store(w, "ann", "ct", [
            make_file(files, study=ct, series=se1, StudyDate="20240115", StudyTime="103000",
                      TimezoneOffsetFromUTC="+0100", StudyDescription="CT chest",
                      SeriesNumber=1, InstanceNumber=1, BodyPartExamined="CHEST",
                      AccessionNumber="ACC-1", **anna),
            make_file(files, study=ct, series=se1, StudyDate="20240115", SeriesNumber=1,
                      InstanceNumber=2, BodyPartExamined="CHEST", **anna),
            make_file(files, study=ct, series=se2, StudyDate="20240115", SeriesNumber=2,
                      InstanceNumber=1, **anna)])
        _store(w, "ann", "mr", [make_file(files, "MR_small.dcm", StudyDate="20230610",
                                          StudyDescription="MR head", **anna)])
        otto = {"PatientName": "Nobody^Otto", "PatientID": "PX-7", "PatientSex": "M",
                "PatientBirthDate": "19800303"}
        _store(w, "ann", "otto", [make_file(files, StudyDate="20220101", **otto)])
        # beta: Anna (same issuer: the same patient) and another "PX-7" (not alpha's).
        _store(w, "bob", "beta-anna", [make_file(files, StudyDate="20240301",
                                                 StudyDescription="beta CT", **anna)])
        _store(w, "bob", "beta-px7", [make_file(files, StudyDate="20210101",
                                                PatientName="Other^Person", PatientID="PX-7")])
        yield w
    finally:
        server.stop()


def _outcome(r: requests.Response, status: int) -> OperationOutcome:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(FHIR_JSON)
    return OperationOutcome.model_validate(r.json())


def _bundle(r: requests.Response) -> Bundle:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith(FHIR_JSON)
    bundle = Bundle.model_validate(r.json())
    assert bundle.type == "searchset"
    return bundle


def _study_ids(bundle: Bundle) -> list[str]:
    return [e.resource.id for e in bundle.entry or []]


# -- ImagingStudy ---------------------------------------------------------------------------
def test_imaging_study_read_is_valid_r4_with_series_and_instances(world: World) -> None:
    uid = world.studies["ct"]
    r = world.get("ann", f"/fhir/ImagingStudy/{uid}")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith(FHIR_JSON)
    study = ImagingStudy.model_validate(r.json())
    assert study.id == uid and study.status == "available"
    assert any(i.system == "urn:dicom:uid" and i.value == f"urn:oid:{uid}"
               for i in study.identifier)
    assert any(i.value == "ACC-1" for i in study.identifier)
    assert study.started.isoformat().startswith("2024-01-15T10:30:00+01:00")
    assert (study.numberOfSeries, study.numberOfInstances) == world.counts["ct"] == (2, 3)
    assert [(m.system, m.code) for m in study.modality] == [(DCM, "CT")]
    assert study.description == "CT chest"
    assert study.subject.reference.startswith("Patient/")
    assert study.endpoint[0].reference == "Endpoint/dicomweb"
    first, second = study.series
    assert (first.number, first.numberOfInstances, second.number) == (1, 2, 2)
    assert first.bodySite.display == "CHEST" and second.bodySite is None
    assert first.modality.code == "CT"
    sops = {i.uid for s in study.series for i in s.instance}
    assert sops == world.sops["ct"]
    ct_class = pydicom.uid.UID("1.2.840.10008.5.1.4.1.1.2")
    assert first.instance[0].sopClass.code == f"urn:oid:{ct_class}"
    assert first.instance[0].sopClass.system == "urn:ietf:rfc:3986"
    assert [i.number for i in first.instance] == [1, 2]


def test_endpoint_address_is_our_dicomweb_root(world: World) -> None:
    study = world.get("ann", f"/fhir/ImagingStudy/{world.studies['mr']}").json()
    r = world.get("ann", f"/fhir/{study['endpoint'][0]['reference']}")
    endpoint = Endpoint.model_validate(r.json())
    assert endpoint.connectionType.code == "dicom-wado-rs"
    assert endpoint.address == world.server.dicomweb
    # The address works: QIDO and WADO-RS metadata under it with the same token.
    found = world.api("ann").get(f"{endpoint.address}/studies",
                                 params={"StudyInstanceUID": study["id"]}, timeout=30)
    assert found.status_code == 200 and len(found.json()) == 1
    meta = world.api("ann").get(f"{endpoint.address}/studies/{study['id']}/metadata",
                                timeout=30)
    assert meta.status_code == 200
    assert len(meta.json()) == study["numberOfInstances"]


def test_another_organisations_study_is_not_found(world: World) -> None:
    hidden = world.get("ann", f"/fhir/ImagingStudy/{world.studies['beta-anna']}")
    missing = world.get("ann", f"/fhir/ImagingStudy/{generate_uid()}")
    a, b = _outcome(hidden, 404), _outcome(missing, 404)
    assert a.issue[0].code == b.issue[0].code == "not-found"
    # Its owner sees it.
    assert world.get("bob", f"/fhir/ImagingStudy/{world.studies['beta-anna']}"
                     ).status_code == 200
    _outcome(world.get("ann", "/fhir/ImagingStudy/not-a-uid"), 404)


def test_search_by_patient_date_modality_identifier(world: World) -> None:
    study = world.get("ann", f"/fhir/ImagingStudy/{world.studies['ct']}").json()
    patient = study["subject"]["reference"]
    bundle = _bundle(world.get("ann", "/fhir/ImagingStudy", patient=patient))
    # Anna's studies alpha may see, newest first; beta's study of her is not among them.
    assert _study_ids(bundle) == [world.studies["ct"], world.studies["mr"]]
    assert bundle.total == 2
    for entry in bundle.entry:
        assert entry.fullUrl.endswith(f"/fhir/ImagingStudy/{entry.resource.id}")
        assert isinstance(entry.resource, ImagingStudy)
    bare = patient.split("/", 1)[1]
    assert _study_ids(_bundle(world.get("ann", "/fhir/ImagingStudy", patient=bare,
                                        started="ge2024-01-01"))) == [world.studies["ct"]]
    assert _study_ids(_bundle(world.get(
        "ann", "/fhir/ImagingStudy", started=["ge2023-01-01", "lt2024-01-15"]))) \
        == [world.studies["mr"]]
    assert _study_ids(_bundle(world.get("ann", "/fhir/ImagingStudy", started="2022"))) \
        == [world.studies["otto"]]
    assert _study_ids(_bundle(world.get("ann", "/fhir/ImagingStudy",
                                        modality=f"{DCM}|MR"))) == [world.studies["mr"]]
    assert _study_ids(_bundle(world.get("ann", "/fhir/ImagingStudy", patient=bare,
                                        modality="MR"))) == [world.studies["mr"]]
    by_uid = world.get("ann", "/fhir/ImagingStudy",
                       identifier=f"urn:dicom:uid|urn:oid:{world.studies['otto']}")
    assert _study_ids(_bundle(by_uid)) == [world.studies["otto"]]
    # Another organisation's study by its UID: simply no match.
    other = world.get("ann", "/fhir/ImagingStudy",
                      identifier=f"urn:oid:{world.studies['beta-anna']}")
    assert _bundle(other).total == 0


def test_search_returns_only_visible_studies_and_pages(world: World) -> None:
    everything = _bundle(world.get("ann", "/fhir/ImagingStudy"))
    mine = {world.studies[k] for k in ("ct", "mr", "otto")}
    assert set(_study_ids(everything)) == mine and everything.total == 3
    theirs = _bundle(world.get("bob", "/fhir/ImagingStudy"))
    assert set(_study_ids(theirs)) == {world.studies["beta-anna"], world.studies["beta-px7"]}
    first = _bundle(world.get("ann", "/fhir/ImagingStudy", _count="2"))
    assert len(first.entry) == 2 and first.total == 3
    following = next(link.url for link in first.link if link.relation == "next")
    query = parse_qs(urlparse(following).query)
    assert query["_offset"] == ["2"] and query["_count"] == ["2"]
    second = _bundle(world.api("ann").get(following, timeout=30))
    assert len(second.entry) == 1 and not any(link.relation == "next" for link in second.link)
    assert set(_study_ids(first) + _study_ids(second)) == mine


@pytest.mark.parametrize("params", [
    {"started": "yesterday"}, {"started": "ne2024-01-01"}, {"started": "2024-13-01"},
    {"_count": "-1"}, {"_count": "1000"}, {"modality": "http://other|CT"},
    {"identifier": "urn:oid:not.a.uid"}, {"identifier": "http://example.org|x"},
    {"colour": "blue"}, {"patient": "Practitioner/1"}])
def test_bad_search_parameters_are_400_outcomes(world: World, params: dict[str, str]) -> None:
    outcome = _outcome(world.get("ann", "/fhir/ImagingStudy", **params), 400)
    assert outcome.issue[0].code == "invalid" and outcome.issue[0].diagnostics


def test_authentication_format_and_unsupported_interactions(world: World) -> None:
    url = f"{world.server.url}/fhir/ImagingStudy/{world.studies['ct']}"
    anonymous = requests.get(url, timeout=30)
    assert _outcome(anonymous, 401).issue[0].code == "login"
    bad_token = requests.get(url, headers={"Authorization": "Bearer nope"}, timeout=30)
    _outcome(bad_token, 401)
    xml = world.api("ann").get(url, headers={"Accept": "application/fhir+xml"}, timeout=30)
    _outcome(xml, 406)
    _outcome(world.get("ann", f"/fhir/ImagingStudy/{world.studies['ct']}", _format="xml"), 406)
    _outcome(world.api("ann").delete(url, timeout=30), 405)
    _outcome(world.get("ann", "/fhir/Observation"), 404)
    _outcome(world.get("ann", "/fhir/Endpoint/other"), 404)
    # The capability statement is open and lists what is supported.
    meta = requests.get(f"{world.server.url}/fhir/metadata", timeout=30)
    capability = CapabilityStatement.model_validate(meta.json())
    assert capability.fhirVersion == "4.0.1"
    kinds = {r.type: {i.code for i in r.interaction} for r in capability.rest[0].resource}
    assert kinds == {"ImagingStudy": {"read", "search-type"},
                     "Patient": {"read", "search-type"}, "Endpoint": {"read"}}


# -- Patient --------------------------------------------------------------------------------
def _patient_ref(world: World, user: str, study: str) -> str:
    r = world.get(user, f"/fhir/ImagingStudy/{world.studies[study]}")
    assert r.status_code == 200, r.text
    ref: str = r.json()["subject"]["reference"]
    return ref.split("/", 1)[1]


def test_patient_read_from_the_study_rows(world: World) -> None:
    pid = _patient_ref(world, "ann", "ct")
    assert re.fullmatch(r"[A-Za-z0-9\-.]{1,64}", pid) and "PA-1" not in pid
    assert _patient_ref(world, "ann", "mr") == pid
    patient = Patient.model_validate(world.get("ann", f"/fhir/Patient/{pid}").json())
    assert patient.id == pid
    assert [(i.system, i.value) for i in patient.identifier] == [(f"urn:oid:{ISSUER}", "PA-1")]
    assert patient.name[0].family == "Fhirson" and patient.name[0].given == ["Anna", "Maria"]
    assert patient.gender == "female" and patient.birthDate.isoformat() == "1970-01-02"
    # The same issuer-qualified patient from beta is the same Patient id.
    assert _patient_ref(world, "bob", "beta-anna") == pid
    # Without an issuer, the organisation qualifies: two different patients "PX-7".
    otto, other = _patient_ref(world, "ann", "otto"), _patient_ref(world, "bob", "beta-px7")
    assert otto != other
    otto_patient = Patient.model_validate(world.get("ann", f"/fhir/Patient/{otto}").json())
    assert otto_patient.identifier[0].system == "urn:dicomshare:organisation:alpha"
    assert otto_patient.gender == "male"
    # Beta's patient is not alpha's to see: 404 like an id that never existed.
    hidden = _outcome(world.get("ann", f"/fhir/Patient/{other}"), 404)
    unknown = _outcome(world.get("ann", "/fhir/Patient/pnothingatall"), 404)
    assert hidden.issue[0].code == unknown.issue[0].code == "not-found"
    _outcome(world.get("ann", "/fhir/Patient/" + pid[:-1] + ("a" if pid[-1] != "a" else "b")),
             404)


def test_patient_search(world: World) -> None:
    pid = _patient_ref(world, "ann", "ct")
    by_ident = _bundle(world.get("ann", "/fhir/Patient", identifier=f"urn:oid:{ISSUER}|PA-1"))
    assert [e.resource.id for e in by_ident.entry] == [pid]
    assert isinstance(by_ident.entry[0].resource, Patient)
    assert _bundle(world.get("ann", "/fhir/Patient", identifier="PA-1")).total == 1
    assert _bundle(world.get("ann", "/fhir/Patient",
                             identifier="urn:oid:1.2.3|PA-1")).total == 0
    by_name = _bundle(world.get("ann", "/fhir/Patient", name="fhirs"))
    assert [e.resource.id for e in by_name.entry] == [pid]
    assert _bundle(world.get("ann", "/fhir/Patient", name="mar")).total == 1  # given name
    assert [e.resource.id for e in _bundle(world.get(
        "ann", "/fhir/Patient", birthdate="ge1975-01-01")).entry] \
        == [_patient_ref(world, "ann", "otto")]
    assert _bundle(world.get("ann", "/fhir/Patient", gender="female")).total == 1
    assert _bundle(world.get("ann", "/fhir/Patient", _id=pid)).total == 1
    # Visible patients only: alpha sees two, not beta's "Other^Person".
    everyone = _bundle(world.get("ann", "/fhir/Patient"))
    assert everyone.total == 2
    assert _bundle(world.get("ann", "/fhir/Patient", name="Other")).total == 0
    for params in ({"name": "Fh*"}, {"birthdate": "1970-02-30"}, {"gender": "x"},
                   {"family": "Fhirson"}):
        _outcome(world.get("ann", "/fhir/Patient", **params), 400)


def test_a_grant_opens_another_organisations_study_and_revoking_closes_it(
        world: World) -> None:
    patient = _patient_ref(world, "ann", "ct")
    shared = world.studies["beta-anna"]
    r = world.api("bob").post(f"{world.server.url}/api/grants", json={
        "study_uid": shared, "organisation": "alpha", "permissions": ["view"]}, timeout=30)
    assert r.status_code == 201, r.text
    grant = r.json()["id"]
    try:
        bundle = _bundle(world.get("ann", "/fhir/ImagingStudy", patient=patient))
        assert _study_ids(bundle) == [shared, world.studies["ct"], world.studies["mr"]]
        study = ImagingStudy.model_validate(
            world.get("ann", f"/fhir/ImagingStudy/{shared}").json())
        assert study.subject.reference == f"Patient/{patient}"
        assert study.description == "beta CT"
    finally:
        gone = world.api("bob").delete(f"{world.server.url}/api/grants/{grant}", timeout=30)
        assert gone.status_code == 200, gone.text
    _outcome(world.get("ann", f"/fhir/ImagingStudy/{shared}"), 404)
    assert _bundle(world.get("ann", "/fhir/ImagingStudy", patient=patient)).total == 2


# -- IHE Invoke Image Display ---------------------------------------------------------------
def _iid(session: requests.Session, world: World, **params: Any) -> requests.Response:
    return session.get(f"{world.server.url}/IHEInvokeImageDisplay", params=params,
                       allow_redirects=False, timeout=30)


def test_iid_study_and_patient_redirects(world: World) -> None:
    ann = world.api("ann")
    ct, mr = world.studies["ct"], world.studies["mr"]
    r = _iid(ann, world, requestType="STUDY", studyUID=ct)
    assert r.status_code in (302, 303) and r.headers["location"] == f"/app/view/{ct}"
    # Several studies: the first the caller may see.
    r = _iid(ann, world, requestType="STUDY",
             studyUID=f"{world.studies['beta-anna']},{mr}")
    assert r.headers["location"] == f"/app/view/{mr}"
    pid = _patient_ref(world, "ann", "ct")
    for params in ({"patientID": f"PA-1^^^{ISSUER}"},
                   {"patientID": "PA-1", "issuerOfPatientID": ISSUER},
                   {"patientID": f"PA-1^^^&{ISSUER}&ISO"}, {"patientID": "PA-1"}):
        r = _iid(ann, world, requestType="PATIENT", **params)
        assert r.status_code in (302, 303), (params, r.text)
        assert r.headers["location"] == f"/app/patients/{pid}"
    r = _iid(ann, world, requestType="patient", patientID="PX-7")
    assert r.headers["location"] == f"/app/patients/{_patient_ref(world, 'ann', 'otto')}"
    page = ann.get(f"{world.server.url}{r.headers['location']}", timeout=30)
    assert page.status_code == 200 and "patient.js" in page.text


def test_iid_refusals(world: World) -> None:
    ann = world.api("ann")
    r = _iid(ann, world, requestType="SERIES", studyUID=world.studies["ct"])
    assert r.status_code == 400 and "requestType" in r.text
    assert _iid(ann, world).status_code == 400
    assert _iid(ann, world, requestType="STUDY").status_code == 400
    assert _iid(ann, world, requestType="STUDY", studyUID="1.2.x").status_code == 400
    assert _iid(ann, world, requestType="PATIENT").status_code == 400
    # Beta's PX-7 patient is not alpha's: not found, as for an unknown ID.
    hidden = _iid(ann, world, requestType="PATIENT", patientID="PX-7^^^nowhere")
    unknown = _iid(ann, world, requestType="PATIENT", patientID="NO-SUCH")
    assert hidden.status_code == unknown.status_code == 404
    # Not signed in: the login page, which comes back here afterwards.
    r = _iid(requests.Session(), world, requestType="STUDY", studyUID=world.studies["ct"])
    assert r.status_code in (302, 303)
    location = urlparse(r.headers["location"])
    assert location.path == "/app/login"
    back = parse_qs(location.query)["next"][0]
    assert back.startswith("/IHEInvokeImageDisplay?") and world.studies["ct"] in back


# -- in a browser ---------------------------------------------------------------------------
@pytest.mark.slow
def test_iid_opens_viewer_and_patient_page_after_login(
        world: World, new_page: Callable[..., AbstractContextManager[Page]]) -> None:
    from playwright.sync_api import expect

    ct = world.studies["ct"]
    with new_page() as page:
        page.goto(f"{world.server.url}/IHEInvokeImageDisplay?requestType=STUDY&studyUID={ct}")
        page.wait_for_url(re.compile(r"/app/login"))
        page.get_by_test_id("username").fill("ann")
        page.get_by_test_id("password").fill(PASSWORD)
        page.get_by_test_id("login-button").click()
        page.wait_for_url(re.compile(re.escape(f"/app/view/{ct}") + "$"))
        expect(page.locator("body")).to_contain_text("CT chest")
        page.goto(f"{world.server.url}/IHEInvokeImageDisplay?requestType=PATIENT"
                  f"&patientID=PA-1%5E%5E%5E{ISSUER}")
        page.wait_for_url(re.compile(r"/app/patients/[a-z0-9]+$"))
        expect(page.get_by_test_id("patient-name")).to_have_text("Anna Maria Fhirson")
        rows = page.get_by_test_id("patient-study")
        expect(rows).to_have_count(2)
        expect(rows.first).to_have_attribute("data-study-uid", ct)
        rows.first.get_by_test_id("view-study").click()
        page.wait_for_url(re.compile(re.escape(f"/app/view/{ct}") + "$"))


# -- Patient links: one person across organisations -------------------------------------------
LENA = {"PatientName": "Linkmann^Lena", "PatientBirthDate": "19650505", "PatientSex": "F"}
MAX = {"PatientName": "Mergel^Max", "PatientBirthDate": "19550505", "PatientSex": "M"}
KIM = {"PatientName": "Coowned^Kim", "PatientBirthDate": "19900909", "PatientSex": "F"}


@pytest.fixture(scope="module")
def persons(world: World, tmp_path_factory: pytest.TempPathFactory) -> World:
    """gamma (gdoc clinician, gadmin admin) and delta (ddoc, dnurse clinicians). Lena is
    H-1 at gamma and C-1 at delta (no issuers); ddoc holds a grant for H-1's study, dnurse
    none. Max is M-1 and M-2 at gamma and MC-9 at delta."""
    files = tmp_path_factory.mktemp("persons")
    root = world.api("root")
    for org in ("gamma", "delta"):
        made = root.post(f"{world.server.url}/api/organisations", json={"name": org},
                         timeout=30)
        assert made.status_code == 201, made.text
    for user, org, role in (("gdoc", "gamma", "clinician"), ("gadmin", "gamma", "admin"),
                            ("ddoc", "delta", "clinician"), ("dnurse", "delta", "clinician")):
        world.tokens[user] = world.server.make_user(root, user, org, role)
    for user, name, pid, attrs, date in (
            ("gdoc", "lena-h", "H-1", LENA, "20200101"), ("ddoc", "lena-c", "C-1", LENA,
                                                         "20230101"),
            ("gdoc", "max-1", "M-1", MAX, "20100101"), ("gdoc", "max-2", "M-2", MAX,
                                                        "20150101"),
            ("ddoc", "max-c", "MC-9", MAX, "20160101")):
        _store(world, user, name, [make_file(files, PatientID=pid, StudyDate=date, **attrs)])
    r = world.api("gdoc").post(f"{world.server.url}/api/grants", json={
        "study_uid": world.studies["lena-h"], "user": "ddoc", "permissions": ["view"]},
        timeout=30)
    assert r.status_code == 201, r.text
    return world


def _api(world: World, user: str, method: str, path: str, /, **body: Any) -> Any:
    """A call to /api as ``user`` that must succeed; its JSON."""
    r = world.api(user).request(method, f"{world.server.url}/api{path}", json=body or None,
                                timeout=30)
    assert r.status_code in (200, 201), r.text
    return r.json()


def _record(world: World, user: str, patient_id: str) -> str:
    found = world.get(user, "/api/patients", patient_id=patient_id).json()
    assert len(found) == 1, found
    return str(found[0]["id"])


def _patient(world: World, user: str, fhir_id: str) -> dict[str, Any]:
    """A Patient read, validated; its JSON."""
    r = world.get(user, f"/fhir/Patient/{fhir_id}")
    assert r.status_code == 200, r.text
    Patient.model_validate(r.json())
    body: dict[str, Any] = r.json()
    assert body["id"] == fhir_id
    return body


def _links(patient: dict[str, Any]) -> set[tuple[str, str]]:
    return {(link["other"]["reference"].removeprefix("Patient/"), link["type"])
            for link in patient.get("link", [])}


def test_confirmed_link_shows_as_seealso_to_those_who_see_both(persons: World) -> None:
    w = persons
    c, h = _patient_ref(w, "ddoc", "lena-c"), _patient_ref(w, "ddoc", "lena-h")
    assert h == _patient_ref(w, "gdoc", "lena-h")  # the same id for every caller
    before = _patient(w, "ddoc", c)
    assert _links(before) == set() and before["active"] is True
    c_rec, h_rec = _record(w, "ddoc", "C-1"), _record(w, "ddoc", "H-1")
    proposals = _api(w, "ddoc", "GET", f"/patients/links?state=proposed&patient={c_rec}")
    ours = [p for p in proposals if {x["id"] for x in p["records"]} == {c_rec, h_rec}]
    assert len(ours) == 1, proposals
    assert _links(_patient(w, "ddoc", c)) == set()  # proposed is not linked
    _api(w, "ddoc", "POST", f"/patients/links/{ours[0]['id']}/confirm")
    try:
        assert _links(_patient(w, "ddoc", c)) == {(h, "seealso")}
        # The target can be followed, and links back.
        target = _patient(w, "ddoc", h)
        assert target["identifier"][0]["value"] == "H-1"
        assert target["identifier"][0]["system"] == "urn:dicomshare:organisation:gamma"
        assert _links(target) == {(c, "seealso")}
        # Search results carry the links too.
        found = _bundle(w.get("ddoc", "/fhir/Patient",
                              identifier="urn:dicomshare:organisation:delta|C-1"))
        assert [e.resource.id for e in found.entry] == [c]
        assert _links(found.entry[0].resource.model_dump(mode="json")) == {(h, "seealso")}
        by_name = _bundle(w.get("ddoc", "/fhir/Patient", name="linkmann"))
        assert {e.resource.id: _links(e.resource.model_dump(mode="json"))
                for e in by_name.entry} == {c: {(h, "seealso")}, h: {(c, "seealso")}}
        # The clinic's nurse (no grant) sees her record, no link, and not the hospital's.
        assert _links(_patient(w, "dnurse", c)) == set()
        _outcome(w.get("dnurse", f"/fhir/Patient/{h}"), 404)
        nurse_found = _bundle(w.get("dnurse", "/fhir/Patient", identifier="C-1"))
        assert nurse_found.total == 1 and not nurse_found.entry[0].resource.link
        assert h not in w.get("dnurse", "/fhir/Patient", identifier="C-1").text
        # The hospital's doctor sees no clinic study: no link either.
        assert _links(_patient(w, "gdoc", h)) == set()
    finally:
        _api(w, "ddoc", "POST", f"/patients/links/{ours[0]['id']}/unlink")
    assert _links(_patient(w, "ddoc", c)) == set()


def test_merge_gives_replaced_by_and_replaces(persons: World) -> None:
    w = persons
    m1, m2 = _patient_ref(w, "gadmin", "max-1"), _patient_ref(w, "gadmin", "max-2")
    mc = _patient_ref(w, "root", "max-c")
    r1, r2, rc = (_record(w, "root", pid) for pid in ("M-1", "M-2", "MC-9"))
    link = _api(w, "root", "POST", "/patients/links", records=[rc, r2], note="passport")
    merge = _api(w, "gadmin", "POST", "/patients/merges", old=r1, new=r2, reason="A40")
    try:
        old = _patient(w, "gadmin", m1)
        assert old["active"] is False and _links(old) == {(m2, "replaced-by")}
        new = _patient(w, "gadmin", m2)
        assert new["active"] is True and _links(new) == {(m1, "replaces")}
        # A superuser also sees the clinic's linked record.
        assert _links(_patient(w, "root", m1)) == {(m2, "replaced-by"), (mc, "seealso")}
        assert _links(_patient(w, "root", m2)) == {(m1, "replaces"), (mc, "seealso")}
        clinic = _patient(w, "root", mc)
        assert _links(clinic) == {(m1, "seealso"), (m2, "seealso")}
        for other, _ in _links(clinic):
            _patient(w, "root", other)
        # The clinic's doctor sees none of gamma's Max studies: no link.
        assert _links(_patient(w, "ddoc", mc)) == set()
        # With a grant for the old ID's study only, the merge target stays hidden: the
        # old Patient is not even shown inactive; the clinic's record is the person's.
        grant = _api(w, "gdoc", "POST", "/grants", study_uid=w.studies["max-1"],
                     user="ddoc", permissions=["view"])
        try:
            seen = _patient(w, "ddoc", m1)
            assert seen["active"] is True and _links(seen) == {(mc, "seealso")}
            assert _links(_patient(w, "ddoc", mc)) == {(m1, "seealso")}
            assert m2 not in w.get("ddoc", "/fhir/Patient", name="mergel").text
        finally:
            _api(w, "gdoc", "DELETE", f"/grants/{grant['id']}")
        # The replaced-by order puts the forward pointer first.
        assert _patient(w, "root", m1)["link"][0]["type"] == "replaced-by"
    finally:
        _api(w, "gadmin", "POST", f"/patients/merges/{merge['id']}/undo")
        _api(w, "root", "POST", f"/patients/links/{link['id']}/unlink")
    after = _patient(w, "gadmin", m1)
    assert after["active"] is True and _links(after) == set()


def test_co_owned_study_is_the_lowest_owners_patient_and_links_to_the_record(
        persons: World, tmp_path: Path) -> None:
    w = persons
    uid = generate_uid()
    _store(w, "gdoc", "kim-shared", [make_file(tmp_path, study=uid, PatientID="K-1",
                                               StudyDate="20190101", **KIM)])
    r = w.api("gdoc").post(f"{w.server.url}/api/grants", json={
        "study_uid": uid, "organisation": "delta", "permissions": ["view", "add-series"]},
        timeout=30)
    assert r.status_code == 201, r.text
    # delta adds a series to gamma's study: both organisations own it now.
    _store(w, "ddoc", "kim-shared-delta", [make_file(tmp_path, study=uid, PatientID="K-1",
                                                     StudyDate="20190101", **KIM)])
    assert w.api("gdoc").delete(f"{w.server.url}/api/grants/{r.json()['id']}",
                                timeout=30).status_code == 200
    _store(w, "ddoc", "kim-delta", [make_file(tmp_path, PatientID="K-1",
                                              StudyDate="20210101", **KIM)])
    shared, own = _patient_ref(w, "ddoc", "kim-shared"), _patient_ref(w, "ddoc", "kim-delta")
    assert shared == _patient_ref(w, "gdoc", "kim-shared") and shared != own
    # delta's one record K-1 shows as two Patients (the co-owned study is gamma's, the
    # lower organisation's), linked to each other without any confirmation.
    first = _patient(w, "ddoc", shared)
    assert first["identifier"][0]["system"] == "urn:dicomshare:organisation:gamma"
    assert _links(first) == {(own, "seealso")}
    second = _patient(w, "ddoc", own)
    assert second["identifier"][0]["system"] == "urn:dicomshare:organisation:delta"
    assert _links(second) == {(shared, "seealso")}
    # ImagingStudy stays per Patient.
    assert _study_ids(_bundle(w.get("ddoc", "/fhir/ImagingStudy", patient=shared))) == [uid]
    assert _study_ids(_bundle(w.get("ddoc", "/fhir/ImagingStudy", patient=own))) \
        == [w.studies["kim-delta"]]
    # gamma does not see delta's own study: no link, and its Patient is not found.
    assert _links(_patient(w, "gdoc", shared)) == set()
    _outcome(w.get("gdoc", f"/fhir/Patient/{own}"), 404)
