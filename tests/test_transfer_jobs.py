"""Background DICOM transfers (``/api/jobs``) between two real dicomshare sites.

A clinic (one worker process: its jobs run one at a time, so a job can be held queued
deterministically) and a hospital (two worker processes sharing the database and the
jobs; on PostgreSQL when ``DICOMSHARE_TEST_POSTGRES_URL`` is set). Peers in this process
(pynetdicom) play slow ones: a storage SCP that holds each C-STORE, and a C-GET SCP that
holds its second sub-operation, until the test lets them go, so a job is running for
exactly as long as the test needs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from pydicom.uid import generate_uid

from conftest import (
    POSTGRES_URL,
    Server,
    drop_postgres_schema,
    free_port,
    make_file,
    make_server,
    postgres_schema_url,
)

FINISHED = ("succeeded", "failed", "cancelled", "interrupted")


# -- a slow peer ----------------------------------------------------------------------------
@dataclass
class SlowPeer:
    """A storage SCP that holds each C-STORE until ``release`` is set."""

    port: int
    release: threading.Event = field(default_factory=threading.Event)
    arrived: threading.Event = field(default_factory=threading.Event)
    received: list[str] = field(default_factory=list)
    server: Any = None

    def handle(self, event: Any) -> int:
        self.arrived.set()
        self.release.wait(30)
        self.received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def reset(self) -> None:
        self.release.set()  # let go of anything still held
        self.release, self.arrived = threading.Event(), threading.Event()
        self.received.clear()


@pytest.fixture(scope="module")
def slow() -> Iterator[SlowPeer]:
    from pynetdicom import AE, StoragePresentationContexts, evt

    peer = SlowPeer(free_port())
    ae = AE(ae_title="SLOWPEER")
    ae.supported_contexts = StoragePresentationContexts
    ae.dimse_timeout = ae.network_timeout = 60
    peer.server = ae.start_server(("127.0.0.1", peer.port), block=False,
                                  evt_handlers=[(evt.EVT_C_STORE, lambda e: peer.handle(e))])
    yield peer
    peer.release.set()
    peer.server.shutdown()


@dataclass
class GetPeer:
    """A C-GET SCP serving ``datasets`` for any study: it holds before its second
    sub-operation until ``release``, then waits for a C-CANCEL and honours it."""

    port: int
    datasets: list[pydicom.Dataset] = field(default_factory=list)
    held: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    cancelled: threading.Event = field(default_factory=threading.Event)
    server: Any = None

    def handle(self, event: Any) -> Iterator[Any]:
        yield len(self.datasets)
        for i, ds in enumerate(self.datasets):
            if i == 1:
                self.held.set()
                self.release.wait(30)
            deadline = time.monotonic() + 20
            while i >= 2 and time.monotonic() < deadline:
                if event.is_cancelled:  # true once per C-CANCEL (pynetdicom consumes it)
                    self.cancelled.set()
                    yield 0xFE00, None
                    return
                time.sleep(0.05)
            yield 0xFF00, ds


@pytest.fixture(scope="module")
def getpeer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GetPeer]:
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import (
        CTImageStorage,
        StudyRootQueryRetrieveInformationModelGet,
    )

    folder = tmp_path_factory.mktemp("getpeer")
    study = generate_uid()
    peer = GetPeer(free_port(), [pydicom.dcmread(make_file(folder, study=study))
                                 for _ in range(4)])
    ae = AE(ae_title="GETPEER")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_supported_context(CTImageStorage, scu_role=True, scp_role=True)
    ae.dimse_timeout = ae.network_timeout = 60
    peer.server = ae.start_server(("127.0.0.1", peer.port), block=False,
                                  evt_handlers=[(evt.EVT_C_GET, lambda e: peer.handle(e))])
    yield peer
    peer.release.set()
    peer.server.shutdown()


def register(server: Server, title: str, port: int) -> None:
    r = server.session().put(f"{server.url}/api/remote-aes/{title}",
                             json={"host": "127.0.0.1", "port": port}, timeout=30)
    assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory,
          slow: SlowPeer) -> Iterator[tuple[Server, Server]]:
    env = {"DICOMSHARE_WORKERS": "2", "DICOMSHARE_TRANSFER_STALE_SECONDS": "2"}
    schema = None
    if POSTGRES_URL:
        env["DICOMSHARE_DATABASE_URL"], schema = postgres_schema_url(POSTGRES_URL)
    clinic = make_server(tmp_path_factory.mktemp("clinic"), ae_title="CLINIC",
                         env={"DICOMSHARE_WORKERS": "1"})
    hospital = make_server(tmp_path_factory.mktemp("hospital"), ae_title="HOSPITAL", env=env)
    try:
        register(clinic, "HOSPITAL", hospital.dicom_port)
        register(clinic, "SLOWPEER", slow.port)
        register(hospital, "CLINIC", clinic.dicom_port)
        register(hospital, "SLOWPEER", slow.port)
        yield clinic, hospital
    finally:
        slow.release.set()
        clinic.stop()
        hospital.stop()
        if schema is not None:
            drop_postgres_schema(POSTGRES_URL, schema)


@dataclass
class People:
    """The clinic's users, tokens by name: tester (admin, organisation test) made them."""

    tokens: dict[str, str]

    def __getitem__(self, name: str) -> str:
        return self.tokens[name]


@pytest.fixture(scope="module")
def people(sites: tuple[Server, Server]) -> People:
    clinic, _ = sites
    root = clinic.make_root()
    as_root = clinic.session(root)
    r = as_root.post(f"{clinic.url}/api/organisations", json={"name": "elsewhere"})
    assert r.status_code == 201, r.text
    tokens = {"root": root, "tester": clinic.token,
              "outsider": clinic.make_user(as_root, "outsider", "elsewhere", "clinician")}
    for name in ("member", "colleague", "leaver"):
        tokens[name] = clinic.make_user(clinic.session(), name, "test", "clinician")
    return People(tokens)


# -- helpers --------------------------------------------------------------------------------
def store(server: Server, folder: Path, count: int, base: str = "CT_small.dcm") -> str:
    """A new study of ``count`` instances, stored by the tester (STOW-RS); its UID."""
    study = generate_uid()
    files = [make_file(folder, base, study=study, PatientID="JOBS-1") for _ in range(count)]
    server.client().store_instances([pydicom.dcmread(f) for f in files])
    return study


def instances_on(server: Server, study: str) -> int:
    r = server.session().get(f"{server.dicomweb}/studies/{study}/instances", timeout=30)
    return 0 if r.status_code == 204 else len(r.json())


def start(server: Server, path: str, body: dict[str, Any], token: str | None = None,
          header: bool = True) -> dict[str, Any]:
    """A background job, asked for by header or by body; checks the 202 answer."""
    r = server.session(token).post(
        f"{server.url}{path}", json=body if header else {**body, "background": True},
        headers={"Prefer": "respond-async"} if header else {}, timeout=30)
    assert r.status_code == 202, r.text
    job: dict[str, Any] = r.json()
    assert r.headers["Location"] == f"/api/jobs/{job['id']}"
    if header:
        assert r.headers["Preference-Applied"] == "respond-async"
    assert job["state"] in ("queued", "running")
    return job


def get(server: Server, job_id: int, token: str | None = None) -> requests.Response:
    return server.session(token).get(f"{server.url}/api/jobs/{job_id}", timeout=30)


def wait(server: Server, job_id: int, until: Callable[[dict[str, Any]], bool] | None = None,
         token: str | None = None) -> dict[str, Any]:
    """Poll the job until ``until`` (default: finished) holds."""
    until = until or (lambda j: j["state"] in FINISHED)
    deadline = time.monotonic() + 45
    while True:
        r = get(server, job_id, token)
        assert r.status_code == 200, r.text
        job: dict[str, Any] = r.json()
        if until(job):
            return job
        assert time.monotonic() < deadline, f"job {job_id} never got there: {job}"
        time.sleep(0.1)


def post(server: Server, path: str, token: str | None = None) -> requests.Response:
    return server.session(token).post(f"{server.url}{path}", timeout=30)


def utc(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    assert parsed.utcoffset() == timedelta(0), value
    return parsed


# -- tests ----------------------------------------------------------------------------------
def test_background_send_to_another_site(sites: tuple[Server, Server],
                                         tmp_path: Path) -> None:
    clinic, hospital = sites
    study = store(clinic, tmp_path, 3)
    job = start(clinic, "/api/send", {"destination": "HOSPITAL", "study_uids": [study]})
    assert (job["kind"], job["ae_title"], job["study_uids"], job["method"]) == (
        "send", "HOSPITAL", [study], None)
    assert job["progress"]["total"] == 3 and job["owner"] == "tester"
    done = wait(clinic, job["id"])
    assert done["state"] == "succeeded", done
    assert done["progress"] == {"total": 3, "completed": 3, "failed": 0, "warning": 0}
    assert done["error"] is None
    assert utc(done["created_at"]) <= utc(done["started_at"]) <= utc(done["finished_at"])
    result = done["result"]
    assert (result["destination"], result["succeeded"], result["failed"], result["error"]) == (
        "HOSPITAL", 3, 0, None)
    assert {i["outcome"] for i in result["instances"]} == {"success"}
    assert instances_on(hospital, study) == 3


def test_background_sends_on_a_site_with_two_worker_processes(sites: tuple[Server, Server],
                                                              tmp_path: Path) -> None:
    clinic, hospital = sites
    studies = [store(hospital, tmp_path / str(i), 1) for i in range(3)]
    jobs = [start(hospital, "/api/send", {"destination": "CLINIC", "study_uids": [s]},
                  header=False) for s in studies]
    for job in jobs:
        done = wait(hospital, job["id"])
        assert (done["state"], done["progress"]["completed"]) == ("succeeded", 1), done
    assert [instances_on(clinic, s) for s in studies] == [1, 1, 1]


@pytest.mark.parametrize("method", ["get", "move"])
def test_background_retrieve(sites: tuple[Server, Server], tmp_path: Path,
                             method: str) -> None:
    clinic, hospital = sites
    first, second = store(hospital, tmp_path / "a", 2), store(hospital, tmp_path / "b", 1)
    job = start(clinic, "/api/remote-aes/HOSPITAL/retrieve",
                {"study_uids": [first, second], "method": method}, header=method == "get")
    assert (job["kind"], job["method"]) == ("retrieve", method)
    done = wait(clinic, job["id"])
    assert done["state"] == "succeeded", done
    assert done["progress"] == {"total": 3, "completed": 3, "failed": 0, "warning": 0}
    result = done["result"]
    assert result["source"] == "HOSPITAL"
    assert [(s["study_uid"], s["outcome"], s["completed"]) for s in result["studies"]] == [
        (first, "success", 2), (second, "success", 1)]
    if method == "get":
        assert [s["stored"] for s in result["studies"]] == [2, 1]
    assert (instances_on(clinic, first), instances_on(clinic, second)) == (2, 1)
    trail = clinic.session().get(f"{clinic.url}/api/audit",
                                 params={"action": "remote.retrieve"}).json()
    assert any(e.get("details", {}).get("job") == job["id"] for e in trail), trail[:3]


def test_jobs_are_seen_by_their_owner_admins_and_superusers_only(
        sites: tuple[Server, Server], people: People, tmp_path: Path) -> None:
    clinic, _ = sites
    study = store(clinic, tmp_path, 1)
    job = start(clinic, "/api/send", {"destination": "HOSPITAL", "study_uids": [study]},
                token=people["member"])
    assert job["owner"] == "member"
    wait(clinic, job["id"], token=people["member"])
    for name in ("member", "tester", "root"):  # owner, the organisation's admin, superuser
        assert get(clinic, job["id"], people[name]).status_code == 200, name
        listed = clinic.session(people[name]).get(f"{clinic.url}/api/jobs").json()
        assert job["id"] in [j["id"] for j in listed], name
    for name in ("outsider", "colleague"):  # another organisation; a colleague, no admin
        r = get(clinic, job["id"], people[name])
        assert r.status_code == 404 and "no job" in r.json()["error"], name
        listed = clinic.session(people[name]).get(f"{clinic.url}/api/jobs").json()
        assert job["id"] not in [j["id"] for j in listed], name
        assert post(clinic, f"/api/jobs/{job['id']}/cancel", people[name]).status_code == 404
        assert post(clinic, f"/api/jobs/{job['id']}/retry", people[name]).status_code == 404
    mine = clinic.session(people["member"]).get(f"{clinic.url}/api/jobs").json()
    assert {j["owner"] for j in mine} == {"member"}


def test_cancel_running_and_queued_jobs(sites: tuple[Server, Server], people: People,
                                        slow: SlowPeer, tmp_path: Path) -> None:
    """The clinic's one worker is held by a send to the slow peer; what is queued behind
    it stays queued until the test lets the peer go."""
    clinic, hospital = sites
    slow.reset()
    held = store(clinic, tmp_path / "held", 2)
    remote = store(hospital, tmp_path / "remote", 1)
    quick = store(clinic, tmp_path / "quick", 1)
    try:
        running = start(clinic, "/api/send", {"destination": "SLOWPEER", "study_uids": [held]})
        wait(clinic, running["id"], lambda j: j["state"] == "running")
        assert slow.arrived.wait(30), "the slow peer got nothing"
        queued = start(clinic, "/api/remote-aes/HOSPITAL/retrieve",
                       {"study_uids": [remote], "method": "get"}, token=people["member"])
        doomed = start(clinic, "/api/send", {"destination": "HOSPITAL", "study_uids": [quick]},
                       token=people["leaver"])
        assert get(clinic, queued["id"]).json()["state"] == "queued"
        r = clinic.session().patch(f"{clinic.url}/api/users/leaver", json={"disabled": True})
        assert r.status_code == 200, r.text

        r = post(clinic, f"/api/jobs/{queued['id']}/cancel", people["member"])
        assert r.status_code == 200 and r.json()["state"] == "cancelled", r.text
        r = post(clinic, f"/api/jobs/{running['id']}/cancel")
        assert r.status_code == 200, r.text
        assert (r.json()["state"], r.json()["error"]) == ("cancelled", "cancelled by tester")
        time.sleep(1.0)  # past the job's next state check (every 0.5 s at most): not a race
    finally:
        slow.release.set()
    stopped = wait(clinic, running["id"], lambda j: j["result"] is not None)
    assert stopped["state"] == "cancelled"
    outcomes = [(i["outcome"], i["comment"]) for i in stopped["result"]["instances"]]
    assert outcomes == [("success", ""), ("failure", "not sent: cancelled")], outcomes
    assert stopped["progress"]["completed"] == 1 and len(slow.received) == 1

    failed = wait(clinic, doomed["id"])  # its user was disabled while it waited
    assert failed["state"] == "failed" and "leaver was disabled" in failed["error"], failed
    # Jobs are claimed in order: once a later one has run, the cancelled one never will.
    after = start(clinic, "/api/send", {"destination": "HOSPITAL", "study_uids": [quick]})
    assert wait(clinic, after["id"])["state"] == "succeeded"
    never = get(clinic, queued["id"]).json()
    assert (never["state"], never["started_at"], never["result"]) == ("cancelled", None, None)
    assert instances_on(clinic, remote) == 0

    for job in (running, after):  # finished: nothing to cancel
        r = post(clinic, f"/api/jobs/{job['id']}/cancel")
        assert r.status_code == 409 and "already" in r.json()["error"], r.text
    trail = clinic.session().get(f"{clinic.url}/api/audit",
                                 params={"action": "job.cancelled"}).json()
    assert {e["details"]["job"] for e in trail} >= {running["id"], queued["id"]}


def test_cancel_of_a_running_retrieve_sends_c_cancel(sites: tuple[Server, Server],
                                                     getpeer: GetPeer) -> None:
    clinic, _ = sites
    register(clinic, "GETPEER", getpeer.port)
    study = str(getpeer.datasets[0].StudyInstanceUID)
    try:
        job = start(clinic, "/api/remote-aes/GETPEER/retrieve",
                    {"study_uids": [study, generate_uid()], "method": "get"})
        assert getpeer.held.wait(30), "the peer was never asked"
        running = wait(clinic, job["id"], lambda j: j["progress"]["completed"] == 1)
        # the second study has not started: how many instances in all is not known yet
        assert (running["state"], running["progress"]["total"]) == ("running", None), running
        r = post(clinic, f"/api/jobs/{job['id']}/cancel")
        assert r.status_code == 200 and r.json()["state"] == "cancelled", r.text
        time.sleep(1.0)  # past the job's next state check (every 0.5 s at most): not a race
    finally:
        getpeer.release.set()
    stopped = wait(clinic, job["id"], lambda j: j["result"] is not None)
    assert getpeer.cancelled.is_set(), "no C-CANCEL reached the peer"
    first, second = stopped["result"]["studies"]
    assert (stopped["state"], first["status"], first["outcome"], first["stored"]) == (
        "cancelled", 0xFE00, "cancel", 2), stopped
    assert second["comment"] == "not retrieved: cancelled" and second["status"] is None
    assert stopped["progress"]["completed"] == 2
    assert instances_on(clinic, study) == 2


def test_retry_of_a_failed_job(sites: tuple[Server, Server], tmp_path: Path) -> None:
    clinic, hospital = sites
    study = store(clinic, tmp_path, 2)
    register(clinic, "HOSPITAL", free_port())  # nothing listens there
    try:
        job = start(clinic, "/api/send", {"destination": "HOSPITAL", "study_uids": [study]})
        failed = wait(clinic, job["id"])
        assert failed["state"] == "failed" and "cannot connect" in failed["error"], failed
        assert failed["result"] is None and failed["finished_at"] is not None
    finally:
        register(clinic, "HOSPITAL", hospital.dicom_port)
    r = post(clinic, f"/api/jobs/{job['id']}/retry")
    assert r.status_code == 201, r.text
    again = r.json()
    assert r.headers["Location"] == f"/api/jobs/{again['id']}"
    assert again["id"] != job["id"] and again["retry_of"] == job["id"]
    done = wait(clinic, again["id"])
    assert (done["state"], done["progress"]["completed"]) == ("succeeded", 2), done
    assert instances_on(hospital, study) == 2
    r = post(clinic, f"/api/jobs/{again['id']}/retry")  # succeeded: nothing to retry
    assert r.status_code == 409, r.text


def test_bad_input(sites: tuple[Server, Server], people: People, tmp_path: Path) -> None:
    clinic, _ = sites
    s = clinic.session()
    before = len(s.get(f"{clinic.url}/api/jobs", params={"limit": "500"}).json())
    for raw in ("999999", "abc", "-1", "1.5", "99999999999999999999", "%20"):
        assert s.get(f"{clinic.url}/api/jobs/{raw}").status_code == 404, raw
        assert s.post(f"{clinic.url}/api/jobs/{raw}/cancel").status_code == 404, raw
        assert s.post(f"{clinic.url}/api/jobs/{raw}/retry").status_code == 404, raw
    for params in ({"limit": "abc"}, {"limit": "0"}, {"limit": "100000"}, {"offset": "-1"},
                   {"offset": "1e3"}, {"limit": " 7"}, {"offset": "9" * 30}):
        r = s.get(f"{clinic.url}/api/jobs", params=params)
        assert r.status_code == 400, (params, r.text)
    assert requests.get(f"{clinic.url}/api/jobs", timeout=10).status_code == 401
    async_header = {"Prefer": "respond-async"}
    unknown_peer = s.post(f"{clinic.url}/api/send", headers=async_header,
                          json={"destination": "NOBODY", "study_uids": [generate_uid()]})
    assert unknown_peer.status_code == 404, unknown_peer.text
    unknown_study = s.post(f"{clinic.url}/api/send", headers=async_header,
                           json={"destination": "HOSPITAL", "study_uids": [generate_uid()]})
    assert unknown_study.status_code == 404, unknown_study.text
    theirs = s.post(f"{clinic.url}/api/send", json={"destination": "HOSPITAL", "background": True,
                                                     "study_uids": [store(clinic, tmp_path, 1)]},
                    headers={"Authorization": f"Bearer {people['outsider']}"})
    assert theirs.status_code == 404, theirs.text  # another organisation's peer
    too_many = s.post(f"{clinic.url}/api/remote-aes/HOSPITAL/retrieve", headers=async_header,
                      json={"study_uids": [f"1.2.{i}" for i in range(1001)]})
    assert too_many.status_code == 400, too_many.text
    r = s.post(f"{clinic.url}/api/tokens", json={"scopes": ["read"]})
    read_only = r.json()["token"]
    no_store = clinic.session(read_only).post(
        f"{clinic.url}/api/remote-aes/HOSPITAL/retrieve", headers=async_header,
        json={"study_uids": [generate_uid()]})
    assert no_store.status_code == 403, no_store.text
    assert len(s.get(f"{clinic.url}/api/jobs", params={"limit": "500"}).json()) == before


def test_synchronous_routes_are_unchanged(sites: tuple[Server, Server], tmp_path: Path) -> None:
    clinic, hospital = sites
    study = store(clinic, tmp_path, 1)
    r = clinic.session().post(f"{clinic.url}/api/send", headers={"Prefer": "return=minimal"},
                              json={"destination": "HOSPITAL", "study_uids": [study]})
    assert r.status_code == 200 and "Location" not in r.headers, r.text
    assert set(r.json()) == {"destination", "succeeded", "warnings", "failed", "error",
                             "instances"}
    assert r.json()["succeeded"] == 1
    prior = store(hospital, tmp_path / "prior", 1)
    r = clinic.session().post(f"{clinic.url}/api/remote-aes/HOSPITAL/retrieve",
                              json={"study_uids": [prior], "method": "get",
                                    "background": False})
    assert r.status_code == 200, r.text
    assert [s["stored"] for s in r.json()["studies"]] == [1]
    schema = clinic.session().get(f"{clinic.url}/openapi.json").json()
    assert {"/api/jobs", "/api/jobs/{job_id}", "/api/jobs/{job_id}/cancel",
            "/api/jobs/{job_id}/retry"} <= set(schema["paths"])
    assert "202" in schema["paths"]["/api/send"]["post"]["responses"]


def test_a_job_whose_server_died_is_interrupted_not_rerun(sites: tuple[Server, Server],
                                                          slow: SlowPeer,
                                                          tmp_path: Path) -> None:
    """Last: it kills the hospital (stale limit 2 s there) in the middle of a send."""
    _, hospital = sites
    slow.reset()
    study = store(hospital, tmp_path, 1)
    try:
        job = start(hospital, "/api/send", {"destination": "SLOWPEER", "study_uids": [study]})
        wait(hospital, job["id"], lambda j: j["state"] == "running")
        assert slow.arrived.wait(30)
        hospital.stop(kill=True)
    finally:
        slow.release.set()
    hospital.start()
    dead = wait(hospital, job["id"])
    assert dead["state"] == "interrupted" and "retry" in dead["error"], dead
    assert dead["started_at"] is not None
    r = post(hospital, f"/api/jobs/{job['id']}/retry")
    assert r.status_code == 201, r.text
    again = wait(hospital, r.json()["id"])
    assert (again["state"], again["progress"]["completed"]) == ("succeeded", 1), again
