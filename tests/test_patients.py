"""Patients across providers against a running server: records qualified by issuer or
organisation, link proposals by the matching rule, confirmation, the timeline across
organisations (and only what the caller may see), unlink, conflicts, merges, priors.

The person: a hospital stores "MÜLLER^Jörg" as H-123 (and later as H-456), a clinic stores
"Mueller^Jorg" as C-998; same birth date and sex. The clinic's doctor holds a grant for the
hospital's first study; the clinic's nurse holds none.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from conftest import Server, make_file, make_server
from dicomshare.patients import matching
from test_auth import STOW_TYPE, stow_body

BIRTH = "19700101"


@dataclass
class World:
    server: Server
    tokens: dict[str, str] = field(default_factory=dict)
    studies: dict[str, str] = field(default_factory=dict)
    folder: Path = Path()

    def api(self, who: str) -> requests.Session:
        return self.server.session(self.tokens[who])

    def url(self, path: str) -> str:
        return f"{self.server.url}/api{path}"

    def store(self, who: str, name: str, **attrs: Any) -> str:
        uid = generate_uid()
        attrs = {"SpecificCharacterSet": "ISO_IR 192", "PatientBirthDate": BIRTH,
                 "PatientSex": "M", "BodyPartExamined": "CHEST", **attrs}
        path = make_file(self.folder, study=uid, **attrs)
        r = self.api(who).post(f"{self.server.dicomweb}/studies",
                               data=stow_body(path.read_bytes()),
                               headers={"Content-Type": STOW_TYPE}, timeout=60)
        assert r.status_code == 200, r.text
        self.studies[name] = uid
        return uid

    def record(self, who: str, patient_id: str) -> str:
        r = self.api(who).get(self.url("/patients"), params={"patient_id": patient_id})
        assert r.status_code == 200, r.text
        assert len(r.json()) == 1, r.json()
        return str(r.json()[0]["id"])

    def timeline(self, who: str, ref: str, **params: Any) -> dict[str, Any]:
        r = self.api(who).get(self.url(f"/patients/{ref}/timeline"), params=params)
        assert r.status_code == 200, r.text
        return dict(r.json())


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("patients")
    server = make_server(tmp)
    w = World(server, {"root": server.make_root()},
              folder=tmp / "files")
    root = w.api("root")
    for org in ("hospital", "clinic"):
        assert root.post(w.url("/organisations"), json={"name": org}).status_code == 201
    for name, org, role in (("hdoc", "hospital", "clinician"), ("hadmin", "hospital", "admin"),
                            ("cdoc", "clinic", "clinician"), ("cnurse", "clinic", "clinician")):
        w.tokens[name] = server.make_user(root, name, org, role)
    w.store("hdoc", "h1", PatientID="H-123", PatientName="MÜLLER^Jörg", StudyDate="20200105",
            StudyDescription="CT chest hospital")
    w.store("cdoc", "c1", PatientID="C-998", PatientName="Mueller^Jorg", StudyDate="20230310",
            StudyDescription="CT chest clinic")
    r = w.api("hdoc").post(w.url("/grants"), json={
        "study_uid": w.studies["h1"], "user": "cdoc", "permissions": ["view"]})
    assert r.status_code == 201, r.text
    yield w
    server.stop()


def test_same_patient_id_from_two_organisations_is_two_records(world: World) -> None:
    world.store("hdoc", "hsame", PatientID="SAME-1", PatientName="ALPHA^ONE",
                PatientBirthDate="19800101")
    world.store("cdoc", "csame", PatientID="SAME-1", PatientName="BETA^TWO",
                PatientBirthDate="19800101")
    found = world.api("root").get(world.url("/patients"), params={"patient_id": "SAME-1"})
    assert found.status_code == 200
    assert sorted(x["organisation"] for x in found.json()) == ["clinic", "hospital"]
    assert len({x["id"] for x in found.json()}) == 2
    # Each organisation sees its own record only.
    mine = world.api("cnurse").get(world.url("/patients"), params={"patient_id": "SAME-1"})
    assert [x["organisation"] for x in mine.json()] == ["clinic"]


def _qualified(universal: str) -> list[Dataset]:
    item = Dataset()
    item.UniversalEntityID = universal
    item.UniversalEntityIDType = "ISO"
    return [item]


def test_issuer_qualifiers_sequence_identifies_the_issuer(world: World) -> None:
    """The same national identifier (issuer known only by its UniversalEntityID) from two
    organisations is one record; one IssuerOfPatientID with two different universal IDs
    is two records, and neither is the namespace-only record."""
    national = "2.16.840.1.113883.19.5"
    h = world.store("hdoc", "uh", PatientID="U-77", PatientName="GAMMA^G",
                    IssuerOfPatientIDQualifiersSequence=_qualified(national))
    c = world.store("cdoc", "uc", PatientID="U-77", PatientName="GAMMA^G",
                    IssuerOfPatientIDQualifiersSequence=_qualified(national))
    found = world.api("root").get(world.url("/patients"), params={"patient_id": "U-77"}).json()
    assert len(found) == 1, found
    assert found[0]["qualifier"] == "issuer"
    assert found[0]["issuer_universal_id"] == f"{national}&ISO"
    assert found[0]["organisation"] is None
    # Each organisation reaches the record, but sees only the studies it may see.
    for who, mine in (("hdoc", h), ("cnurse", c)):
        ref = world.record(who, "U-77")
        assert ref == found[0]["id"]
        assert [e["study_uid"] for e in world.timeline(who, ref)["studies"]] == [mine]
    assert sorted(e["study_uid"] for e in world.timeline("root", found[0]["id"])["studies"]) \
        == sorted([h, c])

    world.store("hdoc", "r1", PatientID="U-78", IssuerOfPatientID="REGION",
                IssuerOfPatientIDQualifiersSequence=_qualified("1.2.3.4"))
    world.store("hdoc", "r2", PatientID="U-78", IssuerOfPatientID="REGION",
                IssuerOfPatientIDQualifiersSequence=_qualified("1.2.3.5"))
    world.store("hdoc", "r3", PatientID="U-78", IssuerOfPatientID="REGION")
    found = world.api("root").get(world.url("/patients"), params={"patient_id": "U-78"}).json()
    assert sorted(x["issuer_universal_id"] or "" for x in found) == \
        ["", "1.2.3.4&ISO", "1.2.3.5&ISO"]
    assert {x["issuer_of_patient_id"] for x in found} == {"REGION"}
    for rec in found:
        assert len(world.timeline("root", rec["id"])["studies"]) == 1


def test_proposal_confirm_timeline_and_unlink(world: World) -> None:
    c_ref = world.record("cdoc", "C-998")
    h_ref = world.record("cdoc", "H-123")  # visible to cdoc through the grant
    before = world.timeline("cdoc", c_ref)
    assert [e["study_uid"] for e in before["studies"]] == [world.studies["c1"]]

    proposals = world.api("cdoc").get(world.url("/patients/links"),
                                      params={"state": "proposed"}).json()
    ours = [p for p in proposals if {x["id"] for x in p["records"]} == {c_ref, h_ref}]
    assert len(ours) == 1, proposals
    link = ours[0]
    assert link["evidence"]["rule"] == "demographics"
    assert link["evidence"]["name_key"] == "jorg muller"
    # The nurse (no grant) does not see the hospital's record, nor the proposal.
    nurse_links = world.api("cnurse").get(world.url("/patients/links")).json()
    assert all(p["id"] != link["id"] for p in nurse_links)
    assert world.api("cnurse").get(world.url(f"/patients/{h_ref}")).status_code == 404
    assert world.api("cnurse").post(
        world.url(f"/patients/links/{link['id']}/confirm")).status_code == 404

    r = world.api("cdoc").post(world.url(f"/patients/links/{link['id']}/confirm"))
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "confirmed" and r.json()["decided_by"] == "cdoc"

    after = world.timeline("cdoc", c_ref)
    assert [e["study_uid"] for e in after["studies"]] == [world.studies["h1"],
                                                          world.studies["c1"]]
    hospital_entry = after["studies"][0]
    assert hospital_entry["organisations"] == ["hospital"]
    assert hospital_entry["modalities"] == ["CT"]
    assert hospital_entry["body_parts"] == ["CHEST"]
    assert hospital_entry["description"] == "CT chest hospital"
    assert {x["id"] for x in after["records"]} == {c_ref, h_ref}
    # Filters: by modality and by date.
    assert world.timeline("cdoc", c_ref, modality="MR")["studies"] == []
    assert [e["study_uid"] for e in world.timeline("cdoc", c_ref, **{"from": "2021-01-01"})[
        "studies"]] == [world.studies["c1"]]

    # The nurse's timeline of the same person: the clinic's study only; nothing of the
    # hospital's is revealed, not even counted.
    nurse = world.timeline("cnurse", c_ref)
    assert [e["study_uid"] for e in nurse["studies"]] == [world.studies["c1"]]
    assert [x["id"] for x in nurse["records"]] == [c_ref]
    assert "H-123" not in str(nurse)

    # The hospital's own clinician sees the hospital's study, not the clinic's.
    hosp = world.timeline("hdoc", world.record("hdoc", "H-123"))
    assert [e["study_uid"] for e in hosp["studies"]] == [world.studies["h1"]]

    # Audited with provenance.
    r = world.api("root").get(world.url("/audit"), params={"action": "patient.link.confirm"})
    assert r.status_code == 200, r.text
    assert any(str(e).count("cdoc") and str(link["id"]) in str(e) for e in r.json()), r.json()

    r = world.api("cdoc").post(world.url(f"/patients/links/{link['id']}/unlink"))
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "unlinked" and r.json()["unlinked_by"] == "cdoc"
    assert world.timeline("cdoc", c_ref) == before
    # An unlinked pair is not proposed again; it may be linked by hand.
    again = world.api("cdoc").get(world.url("/patients/links"),
                                  params={"state": "proposed"}).json()
    assert all({x["id"] for x in p["records"]} != {c_ref, h_ref} for p in again)
    r = world.api("cdoc").post(world.url("/patients/links"),
                               json={"records": [c_ref, h_ref], "note": "same passport"})
    assert r.status_code == 201, r.text
    assert r.json()["origin"] == "manual" and r.json()["evidence"]["note"] == "same passport"
    assert len(world.timeline("cdoc", c_ref)["studies"]) == 2


def test_conflicting_link_refused(world: World) -> None:
    # The hospital's second ID for the same person: proposed against the clinic's record,
    # but the person already holds the hospital's H-123: one record per issuer.
    world.store("hdoc", "h2", PatientID="H-456", PatientName="Müller^Jörg",
                StudyDate="20210101")
    c_ref = world.record("root", "C-998")
    h2_ref = world.record("root", "H-456")
    proposals = world.api("root").get(world.url("/patients/links"),
                                      params={"state": "proposed", "patient": h2_ref}).json()
    pending = [p for p in proposals if {x["id"] for x in p["records"]} == {c_ref, h2_ref}]
    assert pending, proposals
    r = world.api("root").post(world.url(f"/patients/links/{pending[0]['id']}/confirm"))
    assert r.status_code == 409, r.text
    assert "one issuer" in r.json()["error"]
    r = world.api("root").post(world.url("/patients/links"), json={"records": [c_ref, h2_ref]})
    assert r.status_code == 409
    # Records of one issuer are not linked but merged.
    h1_ref = world.record("root", "H-123")
    r = world.api("root").post(world.url("/patients/links"), json={"records": [h1_ref, h2_ref]})
    assert r.status_code == 409
    # A rejected proposal stays rejected.
    r = world.api("root").post(world.url(f"/patients/links/{pending[0]['id']}/reject"))
    assert r.status_code == 200 and r.json()["state"] == "rejected"
    r = world.api("root").post(world.url(f"/patients/links/{pending[0]['id']}/confirm"))
    assert r.status_code == 409


def test_merge_and_undo(world: World) -> None:
    h1_ref = world.record("hadmin", "H-123")
    h2_ref = world.record("hadmin", "H-456")
    before = world.timeline("hadmin", h1_ref)
    assert world.studies["h2"] not in [e["study_uid"] for e in before["studies"]]
    r = world.api("hdoc").post(world.url("/patients/merges"),
                               json={"old": h2_ref, "new": h1_ref})
    assert r.status_code == 403  # clinicians link, admins merge
    r = world.api("hadmin").post(world.url("/patients/merges"),
                                 json={"old": h2_ref, "new": h1_ref, "reason": "A40"})
    assert r.status_code == 201, r.text
    merge = r.json()
    assert merge["state"] == "active"
    merged = world.timeline("hadmin", h1_ref)
    entries = {e["study_uid"]: e for e in merged["studies"]}
    assert world.studies["h2"] in entries
    assert entries[world.studies["h2"]]["merged_into"] == h1_ref
    # The stored DICOM keeps its PatientID.
    assert entries[world.studies["h2"]]["patient_id"] == "H-456"
    r = world.api("hadmin").post(world.url(f"/patients/merges/{merge['id']}/undo"))
    assert r.status_code == 200 and r.json()["state"] == "undone"
    assert world.timeline("hadmin", h1_ref) == before
    r = world.api("hadmin").post(world.url(f"/patients/merges/{merge['id']}/undo"))
    assert r.status_code == 409
    # A merge may not give a person two live records of one qualifier: the clinic's two
    # IDs of two people linked to the hospital's two IDs cannot be merged through them.
    world.store("cdoc", "c9", PatientID="C-999", PatientName="Mueller^Jorg")
    c9 = world.record("root", "C-999")
    r = world.api("root").post(world.url("/patients/links"), json={"records": [c9, h2_ref]})
    assert r.status_code == 201, r.text
    link_id = r.json()["id"]
    r = world.api("root").post(world.url("/patients/merges"),
                               json={"old": h2_ref, "new": h1_ref})
    assert r.status_code == 409, r.text
    assert "one issuer" in r.json()["error"]
    assert world.api("root").post(
        world.url(f"/patients/links/{link_id}/unlink")).status_code == 200


def test_malformed_names_do_not_break_matching(world: World) -> None:
    for i, name in enumerate(["^^^^^^^^", "=====", "A^B^C^D^E^F^G=X=Y=Z", "  ,.-  ",
                              "Ωμέγα^Δέλτα=Ω^Δ=", "山田^太郎=やまだ^たろう"]):
        world.store("hdoc", f"odd{i}", PatientID=f"ODD-{i}", PatientName=name)
    r = world.api("hdoc").get(world.url("/patients"), params={"patient_id": "ODD-0"})
    assert r.status_code == 200 and len(r.json()) == 1
    assert world.api("hdoc").get(world.url("/patients/links")).status_code == 200
    # Pure function checks of the rule.
    assert matching.name_keys("^^^^^^^^") == frozenset()
    assert matching.name_keys("MÜLLER^Jörg") == matching.name_keys("Mueller^Jorg")
    assert matching.name_keys("Jorg Mueller") == matching.name_keys("MUELLER, JÖRG")
    assert matching.name_keys("山田^太郎=やまだ^たろう") & matching.name_keys("=山田^太郎")
    assert matching.name_keys("\x00\x1b$B\udcff") == frozenset({"b"})
    assert matching.name_keys(None) == frozenset()
    a = matching.Demographics("1", "", "org:1", "Doe^Jane", "19700101", "F")
    b = matching.Demographics("2", "", "org:2", "DOE^JANE", "1970-01-01", "F")
    assert matching.evidence(a, b) is None  # an invalid birth date never matches


def test_identifier_rule_and_person_view(world: World) -> None:
    from pydicom.dataset import Dataset

    other = Dataset()
    other.PatientID = "X-1"
    other.IssuerOfPatientID = "HOSP"
    world.store("hdoc", "x1", PatientID="X-1", IssuerOfPatientID="HOSP",
                PatientName="SMITH^ANNA", PatientBirthDate="19900202", PatientSex="F")
    world.store("cdoc", "x2", PatientID="CL-7", IssuerOfPatientID="CLINIC",
                PatientName="JONES^ANNA", PatientBirthDate="19900202", PatientSex="F",
                OtherPatientIDsSequence=[other])
    x1, x2 = world.record("root", "X-1"), world.record("root", "CL-7")
    links = world.api("root").get(world.url("/patients/links"),
                                  params={"patient": x2, "state": "proposed"}).json()
    assert [(p["evidence"]["rule"], {x["id"] for x in p["records"]}) for p in links] == [
        ("identifier", {x1, x2})]
    r = world.api("root").post(world.url(f"/patients/links/{links[0]['id']}/confirm"))
    assert r.status_code == 200, r.text
    person = world.api("root").get(world.url(f"/patients/{x1}")).json()
    assert {x["id"] for x in person["person"]} == {x1, x2}
    assert person["issuer_of_patient_id"] == "HOSP" and person["qualifier"] == "issuer"
    # The clinic's nurse sees her record and only it in the person.
    nurse = world.api("cnurse").get(world.url(f"/patients/{x2}")).json()
    assert [x["id"] for x in nurse["person"]] == [x2]


def test_invalid_input(world: World) -> None:
    api = world.api("cdoc")
    assert api.post(world.url("/patients/sync")).status_code == 403
    r = world.api("root").post(world.url("/patients/sync"), params={"full": "true"})
    assert r.status_code == 200 and r.json()["records"] >= 0
    assert api.get(world.url("/patients")).status_code == 400
    assert api.get(world.url("/patients/nope/timeline")).status_code == 404
    c_ref = world.record("cdoc", "C-998")
    r = api.get(world.url(f"/patients/{c_ref}/timeline"), params={"from": "yesterday"})
    assert r.status_code == 400
    assert api.post(world.url("/patients/links"),
                    json={"records": [c_ref, c_ref]}).status_code == 400
    assert api.post(world.url("/patients/links/999999/confirm")).status_code == 404
    assert api.get(world.url(f"/studies/{generate_uid()}/priors")).status_code == 404


def test_priors_local(world: World) -> None:
    # Person: C-998 (clinic) linked by hand to H-123 (hospital) above.
    old = world.store("cdoc", "c0", PatientID="C-998", PatientName="Mueller^Jorg",
                      StudyDate="20190101", BodyPartExamined="HEAD")
    r = world.api("cdoc").get(world.url(f"/studies/{world.studies['c1']}/priors"))
    assert r.status_code == 200, r.text
    priors = [p["study_uid"] for p in r.json()["priors"]]
    # Newest first: the hospital's 2020 CT (granted), then the clinic's 2019 CT; the
    # hospital's H-456 study (no grant) is not there.
    assert priors == [world.studies["h1"], old]
    assert all(p["source"] == "local" for p in r.json()["priors"])
    r = world.api("cnurse").get(world.url(f"/studies/{world.studies['c1']}/priors"))
    assert [p["study_uid"] for p in r.json()["priors"]] == [old]


@pytest.fixture(scope="module")
def peer(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    other = make_server(tmp_path_factory.mktemp("peer"), ae_title="PEER")
    try:
        # The clinic's peer; the peer knows us (for C-MOVE) as DICOMSHARE.
        r = world.api("root").put(world.url("/remote-aes/PEER"), json={
            "host": "127.0.0.1", "port": other.dicom_port, "organisation": "clinic"})
        assert r.status_code == 200, r.text
        other.cli("ae", "add", "DICOMSHARE", "--host", "127.0.0.1", "--port",
                  str(world.server.dicom_port))
        yield other
    finally:
        other.stop()


def test_priors_on_a_remote_instance(world: World, peer: Server, tmp_path: Path) -> None:
    uid = generate_uid()
    path = make_file(tmp_path, study=uid, PatientID="C-998", PatientName="Mueller^Jorg",
                     StudyDate="20150101", PatientBirthDate=BIRTH, PatientSex="M")
    r = peer.session().post(f"{peer.dicomweb}/studies", data=stow_body(path.read_bytes()),
                            headers={"Content-Type": STOW_TYPE}, timeout=60)
    assert r.status_code == 200, r.text
    api = world.api("cdoc")
    r = api.get(world.url(f"/studies/{world.studies['c1']}/priors"),
                params={"remote": "PEER"})
    assert r.status_code == 200, r.text
    remote = [p for p in r.json()["priors"] if p["source"] == "remote"]
    assert [p["study_uid"] for p in remote] == [uid], r.json()
    assert remote[0]["remote"] == "PEER"
    # An unknown or foreign peer answers 404; the hospital's clinician may not use it.
    assert api.get(world.url(f"/studies/{world.studies['c1']}/priors"),
                   params={"remote": "NOPE"}).status_code == 404
    r = api.post(world.url(f"/studies/{world.studies['c1']}/priors/fetch"),
                 json={"remote": "PEER", "study_uid": uid, "method": "get"})
    assert r.status_code == 200, r.text
    assert r.json()["stored"] == 1, r.json()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        r = api.get(world.url(f"/studies/{world.studies['c1']}/priors"))
        if uid in [p["study_uid"] for p in r.json()["priors"]]:
            break
        time.sleep(0.2)
    local = {p["study_uid"]: p["source"] for p in r.json()["priors"]}
    assert local.get(uid) == "local"


def test_priors_fetch_in_the_background(world: World, peer: Server, tmp_path: Path) -> None:
    """``Prefer: respond-async``: the same checks, then a retrieve job (202, Location)
    whose result is the retrieve report; the job is its creator's to see."""
    uid = generate_uid()
    path = make_file(tmp_path, study=uid, PatientID="C-998", PatientName="Mueller^Jorg",
                     StudyDate="20140101", PatientBirthDate=BIRTH, PatientSex="M")
    r = peer.session().post(f"{peer.dicomweb}/studies", data=stow_body(path.read_bytes()),
                            headers={"Content-Type": STOW_TYPE}, timeout=60)
    assert r.status_code == 200, r.text
    api, current = world.api("cdoc"), world.studies["c1"]
    fetch = world.url(f"/studies/{current}/priors/fetch")
    body = {"remote": "PEER", "study_uid": uid, "method": "get"}
    # The up-front checks answer as the synchronous route does, and start no job: the
    # hospital's doctor sees neither the clinic's study nor its peer.
    for who, ask in (("hdoc", body), ("cdoc", {**body, "remote": "NOPE"})):
        r = world.api(who).post(fetch, json=ask, headers={"Prefer": "respond-async"})
        assert r.status_code == 404, r.text
    assert api.get(world.url("/jobs")).json() == []

    r = api.post(fetch, json=body, headers={"Prefer": "respond-async"})
    assert r.status_code == 202, r.text
    job, location = r.json(), r.headers["Location"]
    assert location == f"/api/jobs/{job['id']}"
    assert r.headers["Preference-Applied"] == "respond-async"
    assert (job["kind"], job["ae_title"], job["study_uids"], job["method"], job["owner"]) == (
        "retrieve", "PEER", [uid], "get", "cdoc")
    assert job["state"] in ("queued", "running"), job
    job = finished(api, f"{world.server.url}{location}")
    assert job["state"] == "succeeded", job
    assert job["error"] is None and job["progress"]["completed"] == 1, job
    assert job["result"]["source"] == "PEER"
    [report] = job["result"]["studies"]
    assert (report["study_uid"], report["outcome"], report["stored"]) == (uid, "success", 1)
    # The instances are here now, the clinic's, and the study is a local prior.
    r = api.get(f"{world.server.dicomweb}/studies/{uid}/instances", timeout=30)
    assert r.status_code == 200 and len(r.json()) == 1, r.text
    r = api.get(world.url(f"/studies/{current}/priors"))
    assert {p["study_uid"]: p["source"] for p in r.json()["priors"]}.get(uid) == "local"
    # Another organisation's users (even its admin) get 404 for the job, like no job.
    for who in ("hdoc", "hadmin"):
        r = world.api(who).get(world.url(f"/jobs/{job['id']}"))
        assert r.status_code == 404, r.text
        assert world.api(who).post(world.url(f"/jobs/{job['id']}/cancel")).status_code == 404
    # Audited as the synchronous fetch is (once, naming the job), besides the job's own.
    trail = world.api("root").get(world.url("/audit"),
                                  params={"action": "patient.priors.fetch"}).json()
    mine = [e for e in trail if e.get("details", {}).get("job") == job["id"]]
    assert len(mine) == 1, trail[:5]
    assert (mine[0]["actor_user"], mine[0]["details"]["remote"],
            mine[0]["details"]["study_uids"]) == ("cdoc", "PEER", [current, uid]), mine[0]
    # "background": true in the body does the same; the prior is here already.
    r = api.post(fetch, json={**body, "background": True})
    assert r.status_code == 202 and "Preference-Applied" not in r.headers, r.text
    again = finished(api, f"{world.server.url}{r.headers['Location']}")
    assert again["state"] == "succeeded", again
    assert again["result"]["studies"][0]["already_present"] == 1, again


def finished(api: requests.Session, url: str) -> dict[str, Any]:
    """Poll a job until it has finished."""
    deadline = time.monotonic() + 60
    while True:
        r = api.get(url, timeout=30)
        assert r.status_code == 200, r.text
        job: dict[str, Any] = r.json()
        if job["state"] not in ("queued", "running"):
            return job
        assert time.monotonic() < deadline, f"the job never finished: {job}"
        time.sleep(0.2)


@pytest.mark.postgres
def test_sync_finds_a_study_committed_after_a_later_one(tmp_path: Path) -> None:
    """On PostgreSQL a transaction holding a lower study pk can commit after a higher pk
    was synced; the incremental sync must still make its record."""
    from sqlalchemy import insert, select

    from conftest import POSTGRES_URL, drop_postgres_schema, postgres_schema_url
    from dicomshare import clock
    from dicomshare.access.grants import Grants
    from dicomshare.access.service import Access
    from dicomshare.archive import Archive
    from dicomshare.config import load_settings
    from dicomshare.patients.identity import Patients
    from dicomshare.storage import schema as s

    if not POSTGRES_URL:
        pytest.skip("DICOMSHARE_TEST_POSTGRES_URL is not set")
    url, schema = postgres_schema_url(POSTGRES_URL)
    arc = Archive.open(load_settings({"data_dir": tmp_path / "data", "database_url": url}))
    try:
        engine = arc.index.engine
        patients = Patients(engine, Access(arc, Grants(engine), None))

        def study(pid: str) -> dict[str, Any]:
            now = clock.now()
            return {"study_instance_uid": generate_uid(), "patient_id": pid,
                    "issuer_of_patient_id": "GAPS", "attributes": "{}",
                    "created_at": now, "updated_at": now}

        def records() -> set[str]:
            with engine.connect() as conn:
                return set(conn.execute(select(s.patient_record.c.patient_id)).scalars())

        with engine.connect() as slow:
            tx = slow.begin()
            slow.execute(insert(s.study).values(study("LATE")))  # the lower pk, uncommitted
            with engine.begin() as fast:
                fast.execute(insert(s.study).values(study("EARLY")))
            patients.sync()
            assert records() == {"EARLY"}
            tx.commit()
        patients.sync()
        assert records() == {"EARLY", "LATE"}
    finally:
        arc.close()
        drop_postgres_schema(POSTGRES_URL, schema)
