"""Remote monitoring (issue 7): webhooks per organisation and watchlists, against a real
server and a real HTTP receiver (http.server in a thread) that checks signatures.

The retry schedule is shortened through DICOMSHARE_WEBHOOK_RETRY_SECONDS, the attempt
timeout through DICOMSHARE_WEBHOOK_TIMEOUT; loopback receivers are allowed with
DICOMSHARE_WEBHOOK_ALLOW_PRIVATE.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from pydicom.uid import generate_uid

from conftest import Server, free_port, make_file, make_server
from dicomshare.errors import InvalidInput
from dicomshare.monitoring.webhooks import check_url, sign, verify
from test_auth import STOW_TYPE, stow_body

ENV = {"DICOMSHARE_WEBHOOK_RETRY_SECONDS": "0.3,0.3",  # 3 attempts in all
       "DICOMSHARE_WEBHOOK_TIMEOUT": "2",
       "DICOMSHARE_WEBHOOK_ALLOW_PRIVATE": "1"}
# The server runs several HTTP worker processes; each sees a new subscription within
# monitoring.events.ACTIVE_CACHE_SECONDS (1 s).
SETTLE = 1.2


@dataclass
class Hit:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)
        return data


@dataclass
class Receiver:
    """A webhook receiver: /ok answers 204, /fail 500 (until ``fixed``), /hang sleeps 30 s,
    /redirect answers 302 to /redirected."""

    port: int
    hits: list[Hit] = field(default_factory=list)
    fixed: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def received(self, path: str) -> list[Hit]:
        with self.lock:
            return [h for h in self.hits if h.path == path]

    def wait_for(self, path: str, match: Callable[[Hit], bool],
                 timeout: float = 20.0) -> Hit:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for hit in self.received(path):
                if match(hit):
                    return hit
            time.sleep(0.1)
        raise AssertionError(f"nothing matching arrived at {path}: {self.received(path)}")


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    rec = Receiver(free_port())

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            path = self.path.split("?")[0]
            with rec.lock:
                rec.hits.append(Hit(self.path, dict(self.headers.items()), body))
                fixed = path in rec.fixed
            if path == "/hang" and not fixed:
                time.sleep(30)
            if path == "/redirect":
                self.send_response(302)
                self.send_header("Location", rec.url("/redirected"))
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(500 if path == "/fail" and not fixed else 204)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", rec.port), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield rec
    httpd.shutdown()
    httpd.server_close()


@dataclass
class Site:
    server: Server
    tokens: dict[str, str]
    files: Path

    def api(self, who: str) -> requests.Session:
        return self.server.session(self.tokens[who])

    def store(self, who: str, study: str, series: str | None = None, count: int = 1,
              **attrs: object) -> requests.Response:
        paths = [make_file(self.files, study=study, series=series, **attrs)
                 for _ in range(count)]
        return self.api(who).post(f"{self.server.dicomweb}/studies",
                                  data=stow_body(*(p.read_bytes() for p in paths)),
                                  headers={"Content-Type": STOW_TYPE}, timeout=60)

    def hook(self, who: str, url: str, events: list[str]) -> dict[str, Any]:
        r = self.api(who).post(f"{self.server.url}/api/webhooks",
                               json={"url": url, "events": events})
        assert r.status_code == 201, r.text
        body: dict[str, Any] = r.json()
        time.sleep(SETTLE)
        return body

    def deliveries(self, who: str, hook: int) -> list[dict[str, Any]]:
        r = self.api(who).get(f"{self.server.url}/api/webhooks/{hook}/deliveries")
        assert r.status_code == 200, r.text
        found: list[dict[str, Any]] = r.json()
        return found

    def wait_delivery(self, who: str, hook: int, match: Callable[[dict[str, Any]], bool],
                      timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for found in self.deliveries(who, hook):
                if match(found):
                    return found
            time.sleep(0.2)
        raise AssertionError(f"no such delivery: {self.deliveries(who, hook)}")

    def drop(self, who: str, hook: int) -> None:
        r = self.api(who).delete(f"{self.server.url}/api/webhooks/{hook}")
        assert r.status_code == 204, r.text


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("monitoring")
    server = make_server(tmp, env=ENV)
    root = server.session(server.make_root())
    for org in ("hospital", "clinic", "other"):
        assert root.post(f"{server.url}/api/organisations",
                         json={"name": org}).status_code == 201
    tokens = {f"{org}/{role}": server.make_user(root, f"{role}-{org}", org, role)
              for org in ("hospital", "clinic", "other") for role in ("admin", "clinician")}
    yield Site(server, tokens, tmp / "files")
    server.stop()


def _for_study(study: str, event: str = "new-study") -> Callable[[Hit], bool]:
    return lambda hit: (hit.json["event"] == event
                        and hit.json["data"]["study_instance_uid"] == study)


def _valid(hit: Hit, secret: str) -> bool:
    return verify(secret, hit.headers["X-Dicomshare-Timestamp"], hit.body,
                  hit.headers["X-Dicomshare-Signature"])


# -- webhooks ------------------------------------------------------------------------------
def test_new_study_webhook_is_signed_and_carries_no_phi(site: Site, receiver: Receiver) -> None:
    hook = site.hook("hospital/admin", receiver.url("/ok?t=signed"),
                     ["new-study", "new-series"])
    assert len(hook["secret"]) >= 32  # generated, shown once
    listed = site.api("hospital/admin").get(f"{site.server.url}/api/webhooks/{hook['id']}")
    assert listed.status_code == 200 and "secret" not in listed.json()
    study, series = generate_uid(), generate_uid()
    r = site.store("hospital/clinician", study, series, count=2, PatientID="PAT-SIGNED",
                   PatientName="Secret^Person")
    assert r.status_code == 200, r.text

    hit = receiver.wait_for("/ok?t=signed", _for_study(study))
    assert _valid(hit, hook["secret"])
    assert hit.headers["X-Dicomshare-Signature"] == sign(
        hook["secret"], hit.headers["X-Dicomshare-Timestamp"], hit.body)
    assert hit.json["organisation"] == "hospital"
    assert hit.json["data"]["series_instance_uids"] == [series]
    assert b"PAT-SIGNED" not in hit.body and b"Secret" not in hit.body
    # A tampered body, a wrong secret, an old timestamp: verification fails.
    tampered = hit.body.replace(study.encode(), generate_uid().encode())
    assert not verify(hook["secret"], hit.headers["X-Dicomshare-Timestamp"], tampered,
                      hit.headers["X-Dicomshare-Signature"])
    assert not verify("another secret of enough length", hit.headers["X-Dicomshare-Timestamp"],
                      hit.body, hit.headers["X-Dicomshare-Signature"])
    old = str(int(hit.headers["X-Dicomshare-Timestamp"]) - 3600)
    assert not verify(hook["secret"], old, hit.body, sign(hook["secret"], old, hit.body))
    receiver.wait_for("/ok?t=signed", _for_study(study, "new-series"))

    # More instances of the same series: not new. A new series: new-series only.
    more = generate_uid()
    assert site.store("hospital/clinician", study, series, PatientID="PAT-SIGNED"
                      ).status_code == 200
    assert site.store("hospital/clinician", study, more, PatientID="PAT-SIGNED"
                      ).status_code == 200
    receiver.wait_for("/ok?t=signed", lambda h: h.json["event"] == "new-series"
                      and h.json["data"]["series_instance_uid"] == more)
    studies = [h for h in receiver.received("/ok?t=signed") if _for_study(study)(h)]
    assert len(studies) == 1
    ids = [h.json["id"] for h in receiver.received("/ok?t=signed")]
    assert len(ids) == len(set(ids))

    done = site.wait_delivery("hospital/admin", hook["id"],
                              lambda d: d["event"] == "new-study" and d["state"] == "delivered")
    assert done["attempts"] == 1 and done["status_code"] == 204 and done["error"] is None
    assert done["attempt_log"][0]["status_code"] == 204
    site.drop("hospital/admin", hook["id"])


def test_failing_target_is_retried_then_redelivered(site: Site, receiver: Receiver) -> None:
    since = datetime.now(UTC).isoformat()  # ids of deleted webhooks may be used again
    hook = site.hook("hospital/admin", receiver.url("/fail"), ["new-study"])
    study = generate_uid()
    assert site.store("hospital/clinician", study, PatientID="PAT-FAIL").status_code == 200
    failed = site.wait_delivery("hospital/admin", hook["id"],
                                lambda d: d["payload"]["data"]["study_instance_uid"] == study
                                and d["state"] == "failed")
    assert failed["attempts"] == 3 and failed["status_code"] == 500
    assert failed["error"] == "HTTP 500"
    assert [t["number"] for t in failed["attempt_log"]] == [1, 2, 3]
    assert all(t["status_code"] == 500 for t in failed["attempt_log"])
    assert len([h for h in receiver.received("/fail") if _for_study(study)(h)]) == 3

    receiver.fixed.add("/fail")
    url = (f"{site.server.url}/api/webhooks/{hook['id']}/deliveries/{failed['id']}"
           "/redeliver")
    r = site.api("hospital/admin").post(url)
    assert r.status_code == 202, r.text
    done = site.wait_delivery("hospital/admin", hook["id"],
                              lambda d: d["id"] == failed["id"] and d["state"] == "delivered")
    assert done["attempts"] == 4 and done["status_code"] == 204
    hits = [h for h in receiver.received("/fail") if _for_study(study)(h)]
    assert len(hits) == 4 and _valid(hits[-1], hook["secret"])
    assert len({h.json["id"] for h in hits}) == 1  # the same event, for deduplication
    # Another organisation's admin cannot see nor redeliver it.
    other = site.api("clinic/admin")
    assert other.get(f"{site.server.url}/api/webhooks/{hook['id']}/deliveries"
                     ).status_code == 404
    assert other.post(url).status_code == 404
    site.drop("hospital/admin", hook["id"])

    # Every attempt, the giving up and the manual re-delivery are in the audit trail of
    # the webhook's organisation, with ids, event kind and status only.
    expected = [("webhook.attempt-failed", "failure", 500), ("webhook.attempt-failed",
                                                            "failure", 500),
                ("webhook.given-up", "failure", 500), ("webhook.redeliver", "success", None),
                ("webhook.delivered", "success", 204)]
    records = _delivery_audit(site, "hospital/admin", failed["id"], since, len(expected))
    found = [(r["action"], r["outcome"], r["details"].get("status_code")) for r in records]
    # Sender and request record concurrently: the trail's order may differ by a little.
    assert sorted(found, key=str) == sorted(expected, key=str)
    hospital = site.api("hospital/admin").get(f"{site.server.url}/api/organisations").json()
    for r in records:
        assert r["actor_organisation"] == hospital[0]["id"]
        assert set(r["details"]) <= {"event", "webhook_id", "delivery_id", "attempt",
                                     "status_code", "reason"}
        assert r["details"]["event"] == "new-study"
        assert r["details"]["webhook_id"] == hook["id"]
        assert r["patient_id"] is None and r["study_uid"] is None
        assert study not in json.dumps(r) and "PAT-FAIL" not in json.dumps(r)
    attempts = {r["details"]["attempt"]: r["action"] for r in records
                if r["action"] != "webhook.redeliver"}
    assert attempts == {1: "webhook.attempt-failed", 2: "webhook.attempt-failed",
                        3: "webhook.given-up", 4: "webhook.delivered"}
    assert {r["details"].get("reason") for r in records if r["outcome"] == "failure"
            } == {"http-status"}
    # The clinic's administrators see their refused re-delivery in their trail, not the
    # hospital's deliveries.
    assert [(r["action"], r["outcome"]) for r in _delivery_audit(
        site, "clinic/admin", failed["id"], since, 1)] == [("webhook.redeliver", "denied")]
    # The sender appends through its own handle on the trail: the chain stays intact.
    result = site.server.cli("audit", "verify", check=False)
    assert result.returncode == 0, result.stdout + result.stderr


_DELIVERY_ACTIONS = ("webhook.attempt-failed", "webhook.given-up", "webhook.delivered",
                     "webhook.redeliver")


def _delivery_audit(site: Site, who: str, delivery: int, since: str, count: int,
                    timeout: float = 10.0) -> list[dict[str, Any]]:
    """The audit records about one delivery, oldest first, once ``count`` are there (the
    sender queues them; its writer commits within milliseconds)."""
    deadline = time.monotonic() + timeout
    while True:
        found = []
        for action in _DELIVERY_ACTIONS:
            r = site.api(who).get(f"{site.server.url}/api/audit",
                                  params={"action": action, "since": since,
                                          "limit": 1000})
            assert r.status_code == 200, r.text
            found += [x for x in r.json() if x["details"].get("delivery_id") == delivery]
        if len(found) >= count or time.monotonic() > deadline:
            return sorted(found, key=lambda x: x["seq"])
        time.sleep(0.2)


def _time_stores(site: Site, studies: list[str]) -> float:
    started = time.monotonic()
    for study in studies:
        assert site.store("hospital/clinician", study, PatientID="PAT-HANG").status_code == 200
    return time.monotonic() - started


def test_hanging_target_does_not_slow_ingest(site: Site, receiver: Receiver) -> None:
    baseline = _time_stores(site, [generate_uid() for _ in range(5)])
    hook = site.hook("hospital/admin", receiver.url("/hang"), ["new-study", "new-series"])
    studies = [generate_uid() for _ in range(5)]
    hanging = _time_stores(site, studies)
    # The target hangs 30 s per request (the sender gives up after 2 s, 3 times); ingest
    # does not wait for it.
    assert hanging < 10, (baseline, hanging)
    timed_out = site.wait_delivery(
        "hospital/admin", hook["id"],
        lambda d: d["payload"]["data"]["study_instance_uid"] == studies[0]
        and d["attempts"] >= 1, timeout=30)
    assert "timed out" in (timed_out["attempt_log"][0]["error"] or "")
    site.drop("hospital/admin", hook["id"])


def test_redirect_is_not_followed(site: Site, receiver: Receiver) -> None:
    hook = site.hook("hospital/admin", receiver.url("/redirect"), ["new-study"])
    study = generate_uid()
    assert site.store("hospital/clinician", study, PatientID="PAT-REDIR").status_code == 200
    found = site.wait_delivery("hospital/admin", hook["id"],
                               lambda d: d["payload"]["data"]["study_instance_uid"] == study
                               and d["attempts"] >= 1)
    assert found["status_code"] == 302
    assert "redirect" in found["error"] and "not followed" in found["error"]
    assert receiver.received("/redirected") == []
    site.drop("hospital/admin", hook["id"])


def test_other_organisation_hears_only_of_what_it_may_see(site: Site,
                                                          receiver: Receiver) -> None:
    mine = site.hook("hospital/admin", receiver.url("/ok?t=hospital"), ["new-study"])
    theirs = site.hook("clinic/admin", receiver.url("/ok?t=clinic"), ["new-study"])
    hidden = generate_uid()
    assert site.store("hospital/clinician", hidden, PatientID="PAT-GRANTED").status_code == 200
    receiver.wait_for("/ok?t=hospital", _for_study(hidden))
    # Fanned out in one transaction: the clinic's deliveries, if any, exist by now.
    assert site.deliveries("clinic/admin", theirs["id"]) == []

    # A grant on the patient (which opens the first study but is no arrival), then a new
    # study of that patient: the clinic hears of that one.
    r = site.api("hospital/clinician").post(f"{site.server.url}/api/grants", json={
        "patient_id": "PAT-GRANTED", "organisation": "clinic", "permissions": ["view"]})
    assert r.status_code == 201, r.text
    granted = generate_uid()
    assert site.store("hospital/clinician", granted, PatientID="PAT-GRANTED"
                      ).status_code == 200
    hit = receiver.wait_for("/ok?t=clinic", _for_study(granted))
    assert _valid(hit, theirs["secret"]) and hit.json["organisation"] == "clinic"
    assert not [h for h in receiver.received("/ok?t=clinic") if _for_study(hidden)(h)]
    site.drop("hospital/admin", mine["id"])
    site.drop("clinic/admin", theirs["id"])


def test_webhook_api_refuses_bad_input(site: Site, receiver: Receiver) -> None:
    admin, url = site.api("hospital/admin"), f"{site.server.url}/api/webhooks"
    for body, why in (({"url": "ftp://127.0.0.1/x", "events": ["new-study"]}, "http"),
                      ({"url": "file:///etc/passwd", "events": ["new-study"]}, "http"),
                      ({"url": "http://user:pw@127.0.0.1/", "events": ["new-study"]},
                       "credentials"),
                      ({"url": "http://no-such-host.invalid/", "events": ["new-study"]},
                       "resolved"),
                      ({"url": receiver.url("/ok"), "events": ["everything"]}, "events"),
                      ({"url": receiver.url("/ok"), "events": ["new-study"],
                        "secret": "short"}, "16")):
        r = admin.post(url, json=body)
        assert r.status_code == 400, (body, r.text)
        assert why in r.json()["error"], r.text
    # Only administrators manage webhooks.
    r = site.api("hospital/clinician").post(url, json={"url": receiver.url("/ok"),
                                                       "events": ["new-study"]})
    assert r.status_code == 403
    hook = site.hook("hospital/admin", receiver.url("/ok?t=api"), ["share-used"])
    assert [h["id"] for h in admin.get(url).json()] == [hook["id"]]
    assert site.api("clinic/admin").get(url).json() == []
    assert site.api("clinic/admin").get(f"{url}/{hook['id']}").status_code == 404
    assert site.api("clinic/admin").delete(f"{url}/{hook['id']}").status_code == 404
    site.drop("hospital/admin", hook["id"])
    assert admin.get(f"{url}/{hook['id']}").status_code == 404


def test_private_addresses_are_refused_unless_allowed() -> None:
    for url in ("http://127.0.0.1:8080/", "http://10.0.0.1/", "http://169.254.169.254/",
                "http://[::1]/", "http://[::ffff:127.0.0.1]/"):
        with pytest.raises(InvalidInput, match="non-public"):
            check_url(url, private_ok=False)
        assert check_url(url, private_ok=True) == url


def test_share_link_use_fires_share_used(site: Site, receiver: Receiver) -> None:
    hook = site.hook("hospital/admin", receiver.url("/ok?t=share"), ["share-used"])
    study = generate_uid()
    assert site.store("hospital/clinician", study, PatientID="PAT-SHARE").status_code == 200
    r = site.api("hospital/clinician").post(f"{site.server.url}/api/links",
                                            json={"studies": [study]})
    assert r.status_code == 201, r.text
    link = r.json()
    opened = requests.get(link["url"], timeout=30)
    assert opened.status_code == 200, opened.text
    hit = receiver.wait_for("/ok?t=share", lambda h: h.json["event"] == "share-used")
    assert _valid(hit, hook["secret"]) and hit.json["data"]["link_id"] == link["id"]
    site.drop("hospital/admin", hook["id"])


# -- watchlists ----------------------------------------------------------------------------
def _notes(site: Site, who: str, kind: str) -> list[dict[str, Any]]:
    r = site.api(who).get(f"{site.server.url}/api/notifications", params={"kind": kind})
    assert r.status_code == 200, r.text
    found: list[dict[str, Any]] = r.json()
    return found


def _watch_notes(site: Site, who: str) -> list[dict[str, Any]]:
    return _notes(site, who, "watch-new-study")


def test_watchlist_notifies_of_visible_new_studies_only(site: Site) -> None:
    api, url = site.api("clinic/clinician"), f"{site.server.url}/api/watchlist"
    r = api.post(url, json={"patient_id": "PAT-WATCH", "label": "follow-up"})
    assert r.status_code == 201, r.text
    watch = r.json()
    time.sleep(SETTLE)
    assert api.post(url, json={"patient_id": "PAT-WATCH"}).status_code == 409
    assert [w["id"] for w in api.get(url).json()] == [watch["id"]]
    assert site.api("other/clinician").get(f"{url}/{watch['id']}").status_code == 404

    # The hospital stores a study of that patient without sharing it: no notification.
    unshared = generate_uid()
    assert site.store("hospital/clinician", unshared, PatientID="PAT-WATCH"
                      ).status_code == 200
    # Then shares the patient with the clinic, and stores another study: notified.
    r = site.api("hospital/clinician").post(f"{site.server.url}/api/grants", json={
        "patient_id": "PAT-WATCH", "organisation": "clinic", "permissions": ["view"]})
    assert r.status_code == 201, r.text
    shared = generate_uid()
    assert site.store("hospital/clinician", shared, PatientID="PAT-WATCH").status_code == 200
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not _watch_notes(site, "clinic/clinician"):
        time.sleep(0.2)
    notes = _watch_notes(site, "clinic/clinician")
    assert [n["details"]["study_instance_uid"] for n in notes] == [shared]
    assert notes[0]["details"]["watch_id"] == watch["id"]
    assert "PAT-WATCH" not in notes[0]["subject"]
    # Others (who follow nobody) hear nothing; the clinic's admin neither.
    assert _watch_notes(site, "other/clinician") == []
    assert _watch_notes(site, "clinic/admin") == []

    assert api.delete(f"{url}/{watch['id']}").status_code == 204
    assert api.get(url).json() == []
    later = generate_uid()
    assert site.store("hospital/clinician", later, PatientID="PAT-WATCH").status_code == 200
    time.sleep(2)
    assert len(_watch_notes(site, "clinic/clinician")) == 1


def test_watchlist_follows_confirmed_patient_links(site: Site) -> None:
    """The clinic follows its own "C-LINK"; the hospital knows the same person as
    "H-LINK". Once a clinician confirms the two records are one person, a new hospital
    study of "H-LINK" that the clinic may see reaches the follower."""
    clinic, hospital = site.api("clinic/clinician"), site.api("hospital/clinician")
    base = site.server.url
    assert site.store("clinic/clinician", generate_uid(), PatientID="C-LINK",
                      PatientName="Linked^Person").status_code == 200
    assert site.store("hospital/clinician", generate_uid(), PatientID="H-LINK",
                      PatientName="Linked^Person").status_code == 200
    assert hospital.post(f"{base}/api/grants", json={
        "patient_id": "H-LINK", "organisation": "clinic", "permissions": ["view"]}
    ).status_code == 201
    assert clinic.post(f"{base}/api/watchlist", json={"patient_id": "C-LINK"}
                       ).status_code == 201
    time.sleep(SETTLE)
    # Not linked yet: a new study of H-LINK is visible to the clinic but not "its" patient.
    before = generate_uid()
    assert site.store("hospital/clinician", before, PatientID="H-LINK").status_code == 200
    time.sleep(2)
    assert before not in {n["details"]["study_instance_uid"]
                          for n in _watch_notes(site, "clinic/clinician")}

    refs = []
    for pid in ("C-LINK", "H-LINK"):
        [found] = clinic.get(f"{base}/api/patients", params={"patient_id": pid}).json()
        refs.append(found["id"])
    r = clinic.post(f"{base}/api/patients/links", json={"records": refs,
                                                        "note": "same person"})
    assert r.status_code == 201, r.text
    after = generate_uid()
    assert site.store("hospital/clinician", after, PatientID="H-LINK").status_code == 200
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and after not in {
            n["details"]["study_instance_uid"] for n in _watch_notes(site, "clinic/clinician")}:
        time.sleep(0.2)
    assert after in {n["details"]["study_instance_uid"]
                     for n in _watch_notes(site, "clinic/clinician")}
    # The other organisation, which may not see H-LINK, follows nothing and hears nothing.
    assert _watch_notes(site, "other/clinician") == []


def test_watchlist_refuses_bad_input(site: Site) -> None:
    url = f"{site.server.url}/api/watchlist"
    api = site.api("clinic/clinician")
    assert api.post(url, json={"patient_id": ""}).status_code == 400
    assert api.post(url, json={"patient_id": "x" * 65}).status_code == 400
    assert api.post(url, json={"patient_id": "A\\B"}).status_code == 400
    assert api.delete(f"{url}/999999").status_code == 404


def test_consult_news_reach_both_parties(site: Site, receiver: Receiver) -> None:
    asking = site.hook("hospital/admin", receiver.url("/ok?t=consult-h"), ["consult-updated"])
    asked = site.hook("clinic/admin", receiver.url("/ok?t=consult-c"), ["consult-updated"])
    study = generate_uid()
    assert site.store("hospital/clinician", study, PatientID="PAT-CONSULT").status_code == 200
    r = site.api("hospital/clinician").post(f"{site.server.url}/api/consults", json={
        "studies": [study], "question": "Secret question about Mr X?",
        "specialist_organisation": "clinic"})
    assert r.status_code == 201, r.text
    consult = r.json()["id"]
    r = site.api("clinic/clinician").post(f"{site.server.url}/api/consults/{consult}/accept")
    assert r.status_code == 200, r.text
    for path, hook in (("/ok?t=consult-h", asking), ("/ok?t=consult-c", asked)):
        for event in ("requested", "accepted"):
            hit = receiver.wait_for(path, lambda h, e=event: h.json["event"] == "consult-updated"
                                    and h.json["data"]["consult_id"] == consult
                                    and h.json["data"]["event"] == e)
            assert _valid(hit, hook["secret"]) and b"Secret" not in hit.body
    site.drop("hospital/admin", asking["id"])
    site.drop("clinic/admin", asked["id"])


# -- cohort watches ------------------------------------------------------------------------
def _cohort_notes(site: Site, who: str) -> list[dict[str, Any]]:
    return _notes(site, who, "watch-cohort-study")


def _wait_cohort_note(site: Site, who: str, study: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if study in {n["details"]["study_instance_uid"] for n in _cohort_notes(site, who)}:
            return
        time.sleep(0.2)
    raise AssertionError(f"no cohort notification of {study}: {_cohort_notes(site, who)}")


# A CT of the chest of a woman of 54 (born 1970, seen 2024), as the cohort below wants it.
MATCH = {"Modality": "CT", "BodyPartExamined": "CHEST", "StudyDescription": "CT Thorax routine",
         "PatientSex": "F", "PatientBirthDate": "19700101", "StudyDate": "20240601"}
COHORT = {"Modality": ["CT", "MR"], "BodyPartExamined": "chest",
          "StudyDescription": "*THORAX*", "PatientSex": "F", "min_age": 40, "max_age": 70}


def test_cohort_watch_notifies_matching_visible_new_studies(site: Site) -> None:
    api, url = site.api("clinic/clinician"), f"{site.server.url}/api/watchlist/cohorts"
    r = api.post(url, json={"query": COHORT, "label": "women's chest CT"})
    assert r.status_code == 201, r.text
    anywhere = r.json()
    assert anywhere["query"] == {"Modality": ["CT", "MR"], "BodyPartExamined": ["CHEST"],
                                 "StudyDescription": "*THORAX*", "PatientSex": ["F"],
                                 "min_age": 40, "max_age": 70}
    r = api.post(url, json={"query": COHORT | {"organisation": "clinic"}})
    assert r.status_code == 201, r.text
    own = r.json()
    assert own["query"]["organisation"] == ["clinic"] and own["label"] is None
    assert api.post(url, json={"query": COHORT}).status_code == 409
    assert [w["id"] for w in api.get(url).json()] == [anywhere["id"], own["id"]]
    assert api.get(f"{url}/{own['id']}").json() == own
    time.sleep(SETTLE)

    # The hospital opens one patient to the clinic (after a first, matching study: the
    # grant opens it, but it is no arrival), another patient stays closed.
    before = generate_uid()
    assert site.store("hospital/clinician", before, PatientID="PAT-COHORT-OPEN",
                      **MATCH).status_code == 200
    r = site.api("hospital/clinician").post(f"{site.server.url}/api/grants", json={
        "patient_id": "PAT-COHORT-OPEN", "organisation": "clinic", "permissions": ["view"]})
    assert r.status_code == 201, r.text
    hidden, wrong_age, wrong_part, shared, clinics = (generate_uid() for _ in range(5))
    for study, who, pid, attrs in (
            (hidden, "hospital/clinician", "PAT-COHORT-CLOSED", {}),
            (wrong_age, "hospital/clinician", "PAT-COHORT-OPEN",
             {"PatientBirthDate": "19300101"}),
            (wrong_part, "hospital/clinician", "PAT-COHORT-OPEN", {"BodyPartExamined": "HEAD"}),
            (shared, "hospital/clinician", "PAT-COHORT-OPEN",
             {"StudyDescription": "ct thorax low dose"}),  # wildcards ignore case
            (clinics, "clinic/clinician", "PAT-COHORT-OWN", {})):
        r = site.store(who, study, PatientID=pid, count=2, **(MATCH | attrs))
        assert r.status_code == 200, r.text
    # More of the shared study in a later request, in a new series: no second notification.
    assert site.store("hospital/clinician", shared, PatientID="PAT-COHORT-OPEN",
                      **MATCH).status_code == 200
    _wait_cohort_note(site, "clinic/clinician", shared)
    _wait_cohort_note(site, "clinic/clinician", clinics)
    time.sleep(2)  # events are fanned out in parallel: let the others finish too
    notes = _cohort_notes(site, "clinic/clinician")
    assert sorted((n["details"]["watch_id"], n["details"]["study_instance_uid"])
                  for n in notes) == sorted([(anywhere["id"], shared),
                                             (anywhere["id"], clinics), (own["id"], clinics)])
    for note in notes:
        assert set(note["details"]) == {"watch_id", "label", "study_instance_uid"}
        assert "chest" not in note["subject"].lower()  # the label is not e-mailed
    assert {n["details"]["label"] for n in notes} == {"women's chest CT", None}
    # Nobody else hears of them.
    assert _cohort_notes(site, "other/clinician") == []
    assert _cohort_notes(site, "hospital/clinician") == []

    # Another user's cohort watches do not exist for them.
    other = site.api("other/clinician")
    assert other.get(url).json() == []
    assert other.get(f"{url}/{own['id']}").status_code == 404
    assert other.delete(f"{url}/{own['id']}").status_code == 404
    assert api.get(f"{url}/{own['id']}").status_code == 200

    # Unfollowed: no more news.
    for watch in (anywhere, own):
        assert api.delete(f"{url}/{watch['id']}").status_code == 204
    assert api.get(url).json() == []
    assert api.get(f"{url}/{own['id']}").status_code == 404
    later = generate_uid()
    assert site.store("hospital/clinician", later, PatientID="PAT-COHORT-OPEN",
                      **MATCH).status_code == 200
    time.sleep(2)
    assert len(_cohort_notes(site, "clinic/clinician")) == 3


def test_cohort_watch_refuses_bad_queries(site: Site) -> None:
    api, url = site.api("clinic/clinician"), f"{site.server.url}/api/watchlist/cohorts"
    for query, why in (
            ({}, "no filter"),
            ({"Modality": "CT", "PatientName": "DOE*"}, "unknown filter 'PatientName'"),
            ({"Modality": []}, "Modality: give one value"),
            ({"Modality": "CT\\MR"}, "Modality: 'CT\\\\MR' is not a code string"),
            ({"Modality": 3}, "Modality: values are text"),
            ({"Modality": ["CT"] * 51}, "Modality: at most 50 values"),
            ({"BodyPartExamined": "x" * 17}, "BodyPartExamined"),
            ({"PatientSex": "X"}, "PatientSex: 'X' is not one of M, F, O"),
            ({"StudyDescription": "*"}, "matches every study"),
            ({"StudyDescription": "x" * 65}, "StudyDescription: 1 to 64 characters"),
            ({"StudyDescription": "a\\b"}, "backslashes"),
            ({"min_age": "40"}, "min_age: a whole number of years"),
            ({"min_age": True}, "min_age: a whole number"),
            ({"max_age": 151}, "max_age: between 0 and 150"),
            ({"min_age": 60, "max_age": 40}, "min_age (60) is above max_age (40)"),
            ({"organisation": "no-such-org"}, "organisation: no organisation"),
            # exists, but shares nothing with the clinic: answered like a missing one
            ({"organisation": "other"}, "organisation: no organisation 'other'"),
            ({"organisation": 1.5}, "organisation: a name or an id"),
            ({"Modality": "CT", "x": "y" * 5000}, "longer than 4000 characters")):
        r = api.post(url, json={"query": query})
        assert r.status_code == 400, (query, r.text)
        assert why in r.json()["error"], (query, r.text)
    r = api.post(url, json={"query": ["CT"]})
    assert r.status_code == 400 and "query" in r.json()["error"]
    assert api.post(url, json={"query": {"Modality": "CT"}, "label": "x" * 201}
                    ).status_code == 400
    # Only roles that may search follow cohorts; a bounded number per user.
    created = []
    for age in range(50):
        r = api.post(url, json={"query": {"min_age": age}})
        assert r.status_code == 201, r.text
        created.append(r.json()["id"])
    r = api.post(url, json={"query": {"min_age": 100}})
    assert r.status_code == 400 and "at most 50" in r.json()["error"]
    for pk in created:
        assert api.delete(f"{url}/{pk}").status_code == 204
    assert api.delete(f"{url}/999999").status_code == 404


def test_cohort_watch_alone_is_a_subscriber(tmp_path: Path) -> None:
    server = make_server(tmp_path, env=ENV)
    try:
        api = server.session()
        r = api.post(f"{server.url}/api/watchlist/cohorts", json={"query": {"Modality": "CT"}})
        assert r.status_code == 201, r.text
        time.sleep(SETTLE)
        site = Site(server, {"tester": server.token}, tmp_path / "files")
        study = generate_uid()
        assert site.store("tester", study, PatientID="PAT-ALONE").status_code == 200
        _wait_cohort_note(site, "tester", study, timeout=8)
    finally:
        server.stop()
