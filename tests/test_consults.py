"""Inbox, second-opinion consults and notifications, end to end: a real server with three
organisations, real DICOM data, a real SMTP server (aiosmtpd) receiving the e-mails, and
DICOMweb clients reading what the specialist answered."""

from __future__ import annotations

import email
import io
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from aiosmtpd.controller import Controller
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from conftest import Server, free_port, make_server, split_multipart
from test_auth import STOW_TYPE, stow_body

PASSWORD = "correct horse battery"
USERS = {  # name -> (organisation, role, e-mail)
    "doc": ("clinic", "clinician", "doc@clinic.example"),
    "clinic-admin": ("clinic", "admin", None),
    "rad": ("hospital", "clinician", "rad@hospital.example"),
    "rad2": ("hospital", "clinician", "rad2@hospital.example"),
    "hosp-admin": ("hospital", "admin", None),
    "outsider": ("outside", "clinician", "outsider@outside.example"),
}


class Mailbox:
    """An aiosmtpd handler keeping every message it receives."""

    def __init__(self) -> None:
        self.messages: list[tuple[list[str], Message]] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            self.messages.append((list(envelope.rcpt_tos),
                                  email.message_from_bytes(envelope.content)))
        return "250 OK"

    def wait_for(self, recipient: str, subject_part: str,
                 timeout: float = 20.0) -> Message:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                for rcpts, msg in self.messages:
                    if recipient in rcpts and subject_part in str(msg["Subject"]):
                        return msg
            time.sleep(0.2)
        raise AssertionError(f"no e-mail to {recipient} about {subject_part!r}; got "
                             f"{[(r, m['Subject']) for r, m in self.messages]}")

    def to(self, recipient: str) -> list[Message]:
        with self.lock:
            return [m for r, m in self.messages if recipient in r]


@dataclass
class World:
    server: Server
    root: str
    mailbox: Mailbox
    tokens: dict[str, str] = field(default_factory=dict)
    studies: dict[str, str] = field(default_factory=dict)
    patients: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.server.url

    def api(self, user: str) -> requests.Session:
        return self.server.session(self.tokens[user] if user != "root" else self.root)

    def qido_series(self, user: str, study: str) -> list[dict[str, Any]]:
        r = self.api(user).get(f"{self.server.dicomweb}/studies/{study}/series")
        if r.status_code == 204:
            return []
        assert r.status_code == 200, r.text
        return list(r.json())

    def sees(self, user: str, study: str) -> bool:
        r = self.api(user).get(f"{self.server.dicomweb}/studies",
                               params={"StudyInstanceUID": study})
        assert r.status_code in (200, 204), r.text
        return r.status_code == 200 and len(r.json()) > 0

    def audit(self, action: str) -> list[dict[str, Any]]:
        time.sleep(0.3)
        r = self.api("root").get(f"{self.url}/api/audit",
                                 params={"action": action, "limit": 1000})
        assert r.status_code == 200, r.text
        return list(r.json())


def _stow(world: World, user: str, path: Path | str, **attrs: Any) -> str:
    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for k, v in attrs.items():
        setattr(ds, k, v)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    r = world.api(user).post(f"{world.server.dicomweb}/studies", data=stow_body(out.getvalue()),
                             headers={"Content-Type": STOW_TYPE}, timeout=60)
    assert r.status_code == 200, r.text
    return str(ds.StudyInstanceUID)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("consults")
    mailbox = Mailbox()
    controller = Controller(mailbox, hostname="127.0.0.1", port=free_port())
    controller.start()
    server = make_server(tmp, env={"DICOMSHARE_SMTP_HOST": "127.0.0.1",
                                   "DICOMSHARE_SMTP_PORT": str(controller.port),
                                   "DICOMSHARE_SMTP_FROM": "noreply@share.example",
                                   "DICOMSHARE_PUBLIC_URL": "https://share.example/"})
    world = World(server, server.make_root(), mailbox)
    root = world.api("root")
    for org in ("clinic", "hospital", "outside"):
        assert root.post(f"{server.url}/api/organisations", json={"name": org}).status_code == 201
    for name, (org, role, address) in USERS.items():
        if name == "rad2":  # the command line way
            server.cli("users", "create", name, "--org", org, "--role", role, "--no-password",
                       "--email", address or "")
        else:
            r = root.post(f"{server.url}/api/users", json={
                "name": name, "organisation": org, "role": role, "password": PASSWORD,
                "email": address})
            assert r.status_code == 201, r.text
            assert r.json()["email"] == address
        world.tokens[name] = server.cli("tokens", "create", name).stdout.strip()
    world.studies["ct"] = _stow(world, "doc", get_testdata_file("CT_small.dcm"),
                                PatientID="PAT-CT-1", PatientName="Doe^Jane")
    world.studies["mr"] = _stow(world, "doc", get_testdata_file("MR_small.dcm"),
                                PatientID="PAT-MR-1", PatientName="Roe^Richard")
    world.studies["mr2"] = _stow(world, "doc", get_testdata_file("MR_small.dcm"),
                                 PatientID="PAT-MR-2", PatientName="Poe^Edgar")
    world.studies["hosp"] = _stow(world, "rad", get_testdata_file("CT_small.dcm"),
                                  PatientID="PAT-H-1")
    yield world
    server.stop()
    controller.stop()


def _consult(world: World, user: str, consult_id: int) -> requests.Response:
    return world.api(user).get(f"{world.url}/api/consults/{consult_id}")


def _post(world: World, user: str, path: str, body: Any = None) -> requests.Response:
    return world.api(user).post(f"{world.url}/api{path}", json=body)


def _created(world: World, user: str, path: str, body: Any) -> dict[str, Any]:
    """POST what must be created (201); what was made, as the API shows it."""
    r = _post(world, user, path, body)
    assert r.status_code == 201, r.text
    return dict(r.json())


# -- users' e-mail addresses ---------------------------------------------------------------
def test_users_have_email_addresses(world: World) -> None:
    users = {u["name"]: u for u in world.api("root").get(f"{world.url}/api/users").json()}
    assert users["rad2"]["email"] == "rad2@hospital.example"
    assert users["clinic-admin"]["email"] is None
    admin = world.api("clinic-admin")
    r = admin.patch(f"{world.url}/api/users/clinic-admin", json={"email": "boss@clinic.example"})
    assert r.status_code == 200, r.text
    assert r.json()["email"] == "boss@clinic.example"
    r = admin.patch(f"{world.url}/api/users/clinic-admin", json={"email": "not an address"})
    assert r.status_code == 400
    assert "e-mail address" in r.json()["error"]
    r = admin.patch(f"{world.url}/api/users/clinic-admin", json={"email": ""})
    assert r.status_code == 200 and r.json()["email"] is None
    world.server.cli("users", "set-email", "clinic-admin", "cli@clinic.example")
    users = {u["name"]: u for u in admin.get(f"{world.url}/api/users").json()}
    assert users["clinic-admin"]["email"] == "cli@clinic.example"
    assert world.server.cli("users", "set-email", "clinic-admin", "nope", check=False).returncode
    world.server.cli("users", "set-email", "clinic-admin", "")
    # Another organisation's admin cannot touch it.
    r = world.api("hosp-admin").patch(f"{world.url}/api/users/doc", json={"email": "x@y.org"})
    assert r.status_code == 404


# -- the whole consult ---------------------------------------------------------------------
def test_whole_consult_from_request_to_answered_report(world: World) -> None:
    study = world.studies["ct"]
    assert not world.sees("rad", study)
    consult = _created(world, "doc", "/consults", {
        "studies": [study], "question": "Nodule in the left lung: benign?",
        "urgency": "urgent", "specialist_organisation": "hospital"})
    cid = consult["id"]
    assert consult["state"] == "requested" and consult["role"] == "requester"
    assert consult["studies"] == [study] and consult["created_at"]
    assert consult["accepted_at"] is None

    # The specialist organisation sees the request and, before accepting, the images.
    listed = world.api("rad").get(f"{world.url}/api/consults",
                                  params={"role": "specialist", "state": "requested"}).json()
    assert [c["id"] for c in listed] == [cid]
    assert listed[0]["question"] == "Nodule in the left lung: benign?"
    assert world.sees("rad", study) and world.sees("rad2", study)
    assert world.sees("doc", study)

    # Outsiders: 404 everywhere, like a consult that does not exist.
    missing = _consult(world, "outsider", 999999)
    for path in ("", "/comments"):
        r = world.api("outsider").get(f"{world.url}/api/consults/{cid}{path}")
        assert r.status_code == 404
    for verb in ("accept", "decline", "close"):
        r = _post(world, "outsider", f"/consults/{cid}/{verb}")
        assert r.status_code == 404 and r.json()["error"] == f"no consult {cid}"
    assert missing.status_code == 404
    assert not world.sees("outsider", study)
    assert world.api("outsider").get(f"{world.url}/api/consults").json() == []

    # Wrong party or wrong state: refused with a reason.
    r = _post(world, "doc", f"/consults/{cid}/accept")
    assert r.status_code == 403 and "specialist" in r.json()["error"]
    r = _post(world, "rad", f"/consults/{cid}/opinion", {"text": "too early"})
    assert r.status_code == 409 and "accept it first" in r.json()["error"]

    # Comments both ways.
    _created(world, "rad", f"/consults/{cid}/comments", {"body": "Any prior imaging?"})
    _created(world, "doc", f"/consults/{cid}/comments", {"body": "None, first scan."})
    thread = world.api("doc").get(f"{world.url}/api/consults/{cid}/comments").json()
    assert [(c["author"], c["organisation"], c["body"]) for c in thread] == [
        ("rad", "hospital", "Any prior imaging?"), ("doc", "clinic", "None, first scan.")]

    r = _post(world, "rad", f"/consults/{cid}/accept")
    assert r.status_code == 200 and r.json()["state"] == "accepted"
    assert r.json()["accepted_at"]
    r = _post(world, "rad2", f"/consults/{cid}/accept")
    assert r.status_code == 409 and "accepted" in r.json()["error"]

    opinion = "Benign granuloma.\nNo follow-up needed. Ärztlich geprüft."
    answered = _created(world, "rad", f"/consults/{cid}/opinion",
                        {"text": opinion, "format": "sr"})
    assert answered["state"] == "answered" and answered["answered_at"]
    sop = answered["opinion"]["sop_instance_uid"]
    assert answered["opinion"]["study_uid"] == study

    # The requester finds the report in its study over DICOMweb and reads it.
    series = world.qido_series("doc", study)
    sr_series = [s for s in series if s["00080060"]["Value"] == ["SR"]]
    assert len(sr_series) == 1 and len(series) == 2
    client = world.server.client(world.tokens["doc"])
    report = client.retrieve_instance(study, sr_series[0]["0020000E"]["Value"][0], sop)
    original = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    assert report.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    assert report.StudyInstanceUID == study
    assert report.PatientID == "PAT-CT-1" and str(report.PatientName) == "Doe^Jane"
    assert report.PatientBirthDate == original.get("PatientBirthDate", "")
    assert report.InstitutionName == "hospital"
    texts = {item.ConceptNameCodeSequence[0].CodeMeaning: item.get("TextValue")
             for item in report.ContentSequence}
    assert texts["Request"] == "Nodule in the left lung: benign?"
    assert texts["Conclusions"] == opinion
    evidence = report.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == study
    # The opinion series came back to the clinic through a grant made for it.
    grants = world.api("doc").get(f"{world.url}/api/grants", params={"study": study}).json()
    assert any(g["source_organisation"] == "hospital" and g["grantee_organisation"] == "clinic"
               and g["state"] == "active" for g in grants)

    r = _post(world, "rad", f"/consults/{cid}/close")
    assert r.status_code == 403
    r = _post(world, "doc", f"/consults/{cid}/close")
    assert r.status_code == 200 and r.json()["state"] == "closed"
    done = r.json()
    assert all(done[k] for k in ("created_at", "accepted_at", "answered_at", "closed_at"))
    assert done["declined_at"] is None
    r = _post(world, "doc", f"/consults/{cid}/close")
    assert r.status_code == 409 and "closed" in r.json()["error"]
    r = _post(world, "rad", f"/consults/{cid}/comments", {"body": "one more thing"})
    assert r.status_code == 409
    # Closing ended the specialist's access to the images; its own report stays its own.
    left = world.qido_series("rad", study)
    assert [s["00080060"]["Value"] for s in left] == [["SR"]]
    assert len(world.qido_series("doc", study)) == 2

    # Notified: the hospital's users (organisation-wide) and the requester, by e-mail.
    for address in ("rad@hospital.example", "rad2@hospital.example"):
        msg = world.mailbox.wait_for(address, "New urgent consult request from clinic")
        assert msg["From"] == "noreply@share.example"
        assert "https://share.example/" in msg.get_payload()
    world.mailbox.wait_for("doc@clinic.example", f"Consult #{cid}: opinion given by hospital")
    world.mailbox.wait_for("doc@clinic.example", f"Consult #{cid}: new comment by hospital")
    world.mailbox.wait_for("rad@hospital.example", f"Consult #{cid}: closed by clinic")
    for _, msg in world.mailbox.messages:  # no PHI in any e-mail
        text = str(msg["Subject"]) + str(msg.get_payload())
        assert "PAT-" not in text and "Doe" not in text and "Nodule" not in text
    assert world.mailbox.to("outsider@outside.example") == []

    # In the API too.
    notes = world.api("doc").get(f"{world.url}/api/notifications").json()
    assert any(n["details"].get("consult_id") == cid and n["details"]["event"] == "answered"
               for n in notes)

    # Audited, refusals included.
    actions = {(a["action"], a["outcome"], a["actor_user"]) for a in world.audit("consult.request")
               + world.audit("consult.opinion") + world.audit("consult.accept")}
    assert ("consult.request", "success", "doc") in actions
    assert ("consult.opinion", "success", "rad") in actions
    assert ("consult.opinion", "denied", "rad") in actions
    assert ("consult.accept", "denied", "outsider") in actions
    assert ("consult.accept", "denied", "doc") in actions


def test_consult_for_one_user_declined_then_answered_as_pdf(world: World) -> None:
    study = world.studies["mr"]
    consult = _created(world, "doc", "/consults", {
        "studies": [study], "question": "Any sign of MS?", "specialist_organisation": "hospital",
        "specialist_user": "rad2"})
    cid = consult["id"]
    assert consult["urgency"] == "routine" and consult["specialist_user"] == "rad2"
    # Only the named specialist: the other radiologist sees neither consult nor study.
    assert _consult(world, "rad", cid).status_code == 404
    assert not world.sees("rad", study)
    assert world.sees("rad2", study)
    r = _post(world, "rad2", f"/consults/{cid}/decline", {"reason": "out of my field"})
    assert r.status_code == 200
    assert r.json()["state"] == "declined" and r.json()["decline_reason"] == "out of my field"
    assert not world.sees("rad2", study)  # declining revoked the grant
    r = _post(world, "rad2", f"/consults/{cid}/accept")
    assert r.status_code == 409 and "declined" in r.json()["error"]
    r = _post(world, "rad2", f"/consults/{cid}/opinion", {"text": "late"})
    assert r.status_code == 409
    world.mailbox.wait_for("doc@clinic.example", f"Consult #{cid}: declined by hospital")
    assert all("rad@hospital.example" not in rc for rc, m in world.mailbox.messages
               if f"#{cid}" in str(m["Subject"]))
    assert _post(world, "doc", f"/consults/{cid}/close").json()["state"] == "closed"

    # Asked again, answered as a PDF.
    r = _post(world, "doc", "/consults", {
        "studies": [study], "question": "Any sign of MS? (second try)",
        "urgency": "emergency", "specialist_organisation": "hospital",
        "specialist_user": "rad"})
    cid = r.json()["id"]
    assert _post(world, "rad", f"/consults/{cid}/accept").status_code == 200
    answered = _created(world, "rad", f"/consults/{cid}/opinion",
                        {"text": "No lesions typical of MS (c) hospital.", "format": "pdf"})
    sop = answered["opinion"]["sop_instance_uid"]
    docs = [s for s in world.qido_series("doc", study) if s["00080060"]["Value"] == ["DOC"]]
    assert len(docs) == 1
    series = docs[0]["0020000E"]["Value"][0]
    resp = world.api("doc").get(
        f"{world.server.dicomweb}/studies/{study}/series/{series}/instances/{sop}",
        headers={"Accept": 'multipart/related; type="application/dicom"'})
    assert resp.status_code == 200
    ds = pydicom.dcmread(io.BytesIO(split_multipart(resp)[0][1]))
    assert ds.MIMETypeOfEncapsulatedDocument == "application/pdf"
    pdf = bytes(ds.EncapsulatedDocument)[:ds.EncapsulatedDocumentLength]
    assert pdf.startswith(b"%PDF-1.4") and pdf.rstrip().endswith(b"%%EOF")
    assert b"No lesions typical of MS \\(c\\) hospital." in pdf
    assert ds.PatientID == "PAT-MR-1"


def test_consult_bad_input(world: World) -> None:
    doc = "doc"
    base = {"question": "q", "specialist_organisation": "hospital"}
    # A study the requester cannot see answers like one that does not exist.
    hidden = _post(world, doc, "/consults", {**base, "studies": [world.studies["hosp"]]})
    unknown = _post(world, doc, "/consults", {**base, "studies": ["1.2.3.4"]})
    assert hidden.status_code == unknown.status_code == 404
    assert hidden.json()["error"] == f"study {world.studies['hosp']} not found"
    # All or nothing: with one bad study, no grant is made for the good one.
    r = _post(world, doc, "/consults", {**base, "studies": [world.studies["mr2"], "1.2.3.4"]})
    assert r.status_code == 404
    assert not world.sees("rad", world.studies["mr2"])
    r = _post(world, doc, "/consults", {**base, "studies": [world.studies["mr2"]],
                                        "urgency": "whenever"})
    assert r.status_code == 400
    r = _post(world, doc, "/consults", {**base, "studies": [world.studies["mr2"]],
                                        "specialist_organisation": "clinic"})
    assert r.status_code == 400
    r = _post(world, doc, "/consults", {**base, "studies": [world.studies["mr2"]],
                                        "specialist_user": "doc"})
    assert r.status_code == 404  # not a user of the hospital
    r = _post(world, doc, "/consults", {**base, "studies": [world.studies["mr2"]],
                                        "specialist_organisation": "nowhere"})
    assert r.status_code == 404
    r = world.api(doc).get(f"{world.url}/api/consults", params={"state": "bogus"})
    assert r.status_code == 400


# -- the inbox -----------------------------------------------------------------------------
def test_inbox_send_accept_decline_withdraw(world: World) -> None:
    study = world.studies["mr2"]
    assert not world.sees("rad", study)
    item = _created(world, "doc", "/inbox/sends", {
        "study_uid": study, "to_organisation": "hospital", "message": "For your tumour board"})
    assert item["state"] == "pending" and item["permissions"] == ["view", "download"]
    assert item["study_uid"] == study  # the sender sees what it sent

    received = world.api("rad").get(f"{world.url}/api/inbox", params={"state": "pending"})
    mine = [x for x in received.json() if x["id"] == item["id"]]
    assert len(mine) == 1
    assert mine[0]["study_uid"] is None and mine[0]["patient"] is None  # not yet accepted
    assert mine[0]["message"] == "For your tumour board"
    assert mine[0]["from_organisation"] == "clinic" and mine[0]["from_user"] == "doc"
    assert not world.sees("rad", study)
    assert world.api("outsider").get(f"{world.url}/api/inbox").json() == []
    assert _post(world, "outsider", f"/inbox/{item['id']}/accept").status_code == 404
    assert _post(world, "doc", f"/inbox/{item['id']}/accept").status_code == 404

    r = _post(world, "rad", f"/inbox/{item['id']}/accept")
    assert r.status_code == 200, r.text
    accepted = r.json()
    assert accepted["state"] == "accepted" and accepted["study_uid"] == study
    assert accepted["decided_by"] == "rad" and accepted["grant_id"]
    assert world.sees("rad", study) and world.sees("hosp-admin", study)
    grants = world.api("rad").get(f"{world.url}/api/grants", params={"study": study}).json()
    assert any(g["id"] == accepted["grant_id"] and g["source_organisation"] == "clinic"
               and g["grantee_organisation"] == "hospital" and g["created_by"] == "doc"
               for g in grants)
    r = _post(world, "rad2", f"/inbox/{item['id']}/accept")
    assert r.status_code == 409 and "accepted" in r.json()["error"]
    r = _post(world, "doc", f"/inbox/{item['id']}/withdraw")
    assert r.status_code == 409
    world.mailbox.wait_for("rad2@hospital.example", "New study sent to you by clinic")
    world.mailbox.wait_for("doc@clinic.example", "hospital accepted the study you sent")
    notes = world.api("doc").get(f"{world.url}/api/notifications",
                                 params={"unread": "true"}).json()
    decided = [n for n in notes if n["kind"] == "inbox-decided"
               and n["details"]["inbox_id"] == item["id"]]
    assert len(decided) == 1 and decided[0]["details"]["state"] == "accepted"

    # To one user, who declines.
    second = _created(world, "doc", "/inbox/sends", {
        "patient": {"id": "PAT-MR-1"}, "to_organisation": "outside", "to_user": "outsider",
        "permissions": ["view"]})["id"]
    assert [x["id"] for x in world.api("outsider").get(f"{world.url}/api/inbox").json()] \
        == [second]
    r = _post(world, "outsider", f"/inbox/{second}/decline", {"reason": "not ours"})
    assert r.status_code == 200 and r.json()["state"] == "declined"
    assert r.json()["patient"] is None
    assert not world.sees("outsider", world.studies["mr"])
    assert _post(world, "outsider", f"/inbox/{second}/accept").status_code == 409

    # Withdrawn while pending.
    r = _post(world, "doc", "/inbox/sends", {"study_uid": study, "to_organisation": "outside"})
    third = r.json()["id"]
    r = _post(world, "outsider", f"/inbox/{third}/withdraw")
    assert r.status_code == 404
    r = _post(world, "doc", f"/inbox/{third}/withdraw")
    assert r.status_code == 200 and r.json()["state"] == "withdrawn"
    assert _post(world, "outsider", f"/inbox/{third}/accept").status_code == 409
    world.mailbox.wait_for("outsider@outside.example", "clinic withdrew a study it sent you")
    sent = world.api("doc").get(f"{world.url}/api/inbox/sent").json()
    assert {x["id"]: x["state"] for x in sent} == {
        item["id"]: "accepted", second: "declined", third: "withdrawn"}

    actions = {(a["action"], a["outcome"], a["actor_user"]) for a in
               world.audit("inbox.send") + world.audit("inbox.accept")
               + world.audit("inbox.decline") + world.audit("inbox.withdraw")}
    assert {("inbox.send", "success", "doc"), ("inbox.accept", "success", "rad"),
            ("inbox.accept", "denied", "outsider"), ("inbox.decline", "success", "outsider"),
            ("inbox.withdraw", "success", "doc"),
            ("inbox.withdraw", "denied", "outsider")} <= actions


def test_inbox_bad_input(world: World) -> None:
    # Sending a study one cannot see: exactly like an unknown one.
    hidden = _post(world, "outsider", "/inbox/sends", {"study_uid": world.studies["ct"],
                                                       "to_organisation": "hospital"})
    unknown = _post(world, "outsider", "/inbox/sends", {"study_uid": "1.2.3.4",
                                                        "to_organisation": "hospital"})
    assert hidden.status_code == unknown.status_code == 404
    assert hidden.json()["error"] == f"study {world.studies['ct']} not found"
    for body, status in (
            ({"study_uid": world.studies["ct"], "to_organisation": "clinic"}, 400),
            ({"study_uid": world.studies["ct"], "to_organisation": "nowhere"}, 404),
            ({"study_uid": world.studies["ct"], "to_organisation": "hospital",
              "to_user": "outsider"}, 404),
            ({"to_organisation": "hospital"}, 400),
            ({"study_uid": world.studies["ct"], "to_organisation": "hospital",
              "permissions": ["re-share"]}, 400)):
        r = _post(world, "doc", "/inbox/sends", body)
        assert r.status_code == status, (body, r.text)
    r = world.api("rad").get(f"{world.url}/api/inbox", params={"state": "bogus"})
    assert r.status_code == 400


def test_notifications_read_and_private(world: World) -> None:
    _post(world, "doc", "/inbox/sends", {"study_uid": world.studies["ct"],
                                         "to_organisation": "hospital", "to_user": "rad2"})
    notes = world.api("rad2").get(f"{world.url}/api/notifications",
                                  params={"unread": "true"}).json()
    assert notes and notes[0]["kind"] == "inbox-new" and not notes[0]["read"]
    nid = notes[0]["id"]
    # Not rad's (the item was for rad2 only), nor the outsider's: 404.
    assert nid not in [n["id"] for n in
                       world.api("rad").get(f"{world.url}/api/notifications").json()]
    assert _post(world, "rad", f"/notifications/{nid}/read").status_code == 404
    assert _post(world, "outsider", f"/notifications/{nid}/read").status_code == 404
    r = _post(world, "rad2", f"/notifications/{nid}/read")
    assert r.status_code == 200 and r.json()["read"] and r.json()["read_at"]
    unread = world.api("rad2").get(f"{world.url}/api/notifications",
                                   params={"unread": "true"}).json()
    assert nid not in [n["id"] for n in unread]


def test_consult_on_a_reshared_study_answers_back_to_the_requester(world: World) -> None:
    """The clinic holds the hospital's study through a re-share grant and asks the outside
    organisation: the opinion reaches the clinic (and the hospital, which owns the study)."""
    study = world.studies["hosp"]
    _created(world, "rad", "/grants", {
        "study_uid": study, "organisation": "clinic",
        "permissions": ["view", "download", "add-series", "re-share"]})
    cid = _created(world, "doc", "/consults", {"studies": [study], "question": "Re-read please",
                                               "specialist_organisation": "outside"})["id"]
    assert world.sees("outsider", study)
    assert _post(world, "outsider", f"/consults/{cid}/accept").status_code == 200
    _created(world, "outsider", f"/consults/{cid}/opinion", {"text": "Normal."})
    for reader in ("doc", "rad"):
        modalities = [s["00080060"]["Value"] for s in world.qido_series(reader, study)]
        assert ["SR"] in modalities, (reader, modalities)


def test_mail_failures_are_recorded_and_never_sent_twice(tmp_path: Path) -> None:
    """Against a port where no mail server listens: the error is kept on the row, and the
    row, claimed once, is not tried again (by this or another process)."""
    from sqlalchemy import insert, select

    from dicomshare import clock
    from dicomshare.archive import Archive
    from dicomshare.config import Settings
    from dicomshare.sharing.notify import deliver_pending, notify, set_email
    from dicomshare.storage import schema as s

    settings = Settings(data_dir=tmp_path / "data", smtp_host="127.0.0.1",
                        smtp_port=free_port(), fsync=False)
    archive = Archive.open(settings)
    engine = archive.index.engine
    try:
        with engine.begin() as conn:
            org = conn.execute(insert(s.organisation).values(
                name="o", created_at=clock.now())).inserted_primary_key[0]
            conn.execute(insert(s.user).values(name="u", organisation_pk=org, role="clinician",
                                               created_at=clock.now()))
            notify(conn, org, None, "inbox-new", "New study sent to you by x", {})
        set_email(engine, "u", "u@example.org")
        assert deliver_pending(engine, settings) == 1
        assert deliver_pending(engine, settings) == 0
        with engine.connect() as conn:
            row = conn.execute(select(s.notification.c.emailed_at,
                                      s.notification.c.email_error)).one()
        assert row[0] is not None and "ConnectionRefusedError" in row[1]
    finally:
        archive.close()
