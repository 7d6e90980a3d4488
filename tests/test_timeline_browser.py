"""The patient timeline and the side-by-side comparison in headless Chromium.

A hospital stores "MÜLLER^Jörg" as H-123 (one CT series of 5 images), a clinic stores
"Mueller^Jorg" as C-998 (a CT of 3 images, later an MR); same birth date and sex, so the
matching rule proposes one person. The clinic's doctor holds a grant for the hospital's
study and confirms the proposal on the timeline page; the clinic's nurse holds no grant.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pydicom
import pytest
import requests
from playwright.sync_api import expect
from pydicom.uid import generate_uid

from conftest import Server, free_port, make_file, make_server, sign_in
from test_auth import STOW_TYPE, stow_body

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytest_plugins = ["browser"]
pytestmark = pytest.mark.slow

PASSWORD = "correct horse battery"
BIRTH = "19700101"
MARKUP = "<img src=x onerror=alert(1)>"  # in a description: shown as text, never parsed
NewPage = Callable[..., AbstractContextManager["Page"]]


@dataclass
class World:
    server: Server
    tokens: dict[str, str] = field(default_factory=dict)
    studies: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.server.url

    def api(self, who: str) -> requests.Session:
        return self.server.session(self.tokens[who])

    def store(self, who: str, name: str, images: int, base: str = "CT_small.dcm",
              **attrs: Any) -> None:
        study, series = generate_uid(), generate_uid()
        attrs = {"SpecificCharacterSet": "ISO_IR 192", "PatientBirthDate": BIRTH,
                 "PatientSex": "M", "BodyPartExamined": "CHEST", **attrs}
        for number in range(1, images + 1):
            path = make_file(self.server.data_dir.parent / "files", base=base, study=study,
                             series=series, InstanceNumber=number, **attrs)
            r = self.api(who).post(f"{self.server.dicomweb}/studies",
                                   data=stow_body(path.read_bytes()),
                                   headers={"Content-Type": STOW_TYPE}, timeout=60)
            assert r.status_code == 200, r.text
        self.studies[name] = study

    def record(self, who: str, patient_id: str) -> str:
        r = self.api(who).get(f"{self.url}/api/patients", params={"patient_id": patient_id},
                              timeout=30)
        assert r.status_code == 200 and len(r.json()) == 1, r.text
        return str(r.json()[0]["id"])

    def linked(self) -> None:
        """The clinic's and the hospital's records confirmed as one person (by the first
        test in the browser; here through the API when that one did not run first)."""
        c_ref, h_ref = self.record("cdoc", "C-998"), self.record("cdoc", "H-123")
        links = self.api("cdoc").get(f"{self.url}/api/patients/links",
                                     params={"patient": c_ref}, timeout=30).json()
        ours = [x for x in links if {r["id"] for r in x["records"]} == {c_ref, h_ref}]
        assert ours, links
        if ours[0]["state"] == "proposed":
            r = self.api("cdoc").post(f"{self.url}/api/patients/links/{ours[0]['id']}/confirm",
                                      timeout=30)
            assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("timeline")
    server = make_server(tmp, env={"DICOMSHARE_SECURE_COOKIES": "false",
                                   "DICOMSHARE_DICOM_PORT": "0"})
    try:
        w = World(server, {"root": server.make_root()})
        root = w.api("root")
        for org in ("hospital", "clinic"):
            assert root.post(f"{w.url}/api/organisations", json={"name": org},
                             timeout=30).status_code == 201
        for name, org in (("hdoc", "hospital"), ("cdoc", "clinic"), ("cnurse", "clinic")):
            w.tokens[name] = server.make_user(root, name, org, "clinician")
        w.store("hdoc", "h1", 5, PatientID="H-123", PatientName="MÜLLER^Jörg",
                StudyDate="20200105", StudyDescription="CT chest hospital")
        w.store("cdoc", "c1", 3, PatientID="C-998", PatientName="Mueller^Jorg",
                StudyDate="20230310", StudyDescription="CT chest clinic")
        w.store("cdoc", "c2", 1, base="MR_small.dcm", PatientID="C-998",
                PatientName="Mueller^Jorg", StudyDate="20240101", Modality="MR",
                BodyPartExamined="HEAD", StudyDescription=f"MR head clinic {MARKUP}")
        r = w.api("hdoc").post(f"{w.url}/api/grants", json={
            "study_uid": w.studies["h1"], "user": "cdoc", "permissions": ["view"]},
            timeout=30)
        assert r.status_code == 201, r.text
        yield w
    finally:
        server.stop()


def log_in(page: Page, world: World, user: str, start: str) -> None:
    sign_in(page, world.url, user, PASSWORD, start)


def rows(page: Page) -> Any:
    return page.get_by_test_id("timeline-study")


def shown_uids(page: Page) -> list[str]:
    return [str(x.get_attribute("data-study-uid")) for x in rows(page).all()]


# -- without a browser ------------------------------------------------------------------------
def test_pages_and_framing_headers(world: World) -> None:
    ref = world.record("cdoc", "C-998")
    r = requests.get(f"{world.url}/app/timeline/{ref}", timeout=10)
    assert r.status_code == 200 and "<script>" not in r.text and "C-998" not in r.text
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    assert r.headers["x-frame-options"] == "DENY"
    compare = requests.get(f"{world.url}/app/compare/{world.studies['c1']}/"
                           f"{world.studies['h1']}", timeout=10)
    assert compare.status_code == 200
    csp = compare.headers["content-security-policy"]
    assert "frame-src 'self'" in csp and "frame-ancestors 'none'" in csp
    shell = requests.get(f"{world.url}/static/app/compare.html", timeout=10)
    assert "frame-src 'self'" in shell.headers["content-security-policy"]
    assert requests.get(f"{world.url}/app/compare/not-a-uid/1.2.3",
                        timeout=10).status_code == 400
    # The viewer may be framed by this site only.
    viewer = requests.get(f"{world.url}/app/view/{world.studies['c1']}", timeout=10)
    assert viewer.headers["x-frame-options"] == "SAMEORIGIN"
    assert "frame-ancestors 'self'" in viewer.headers["content-security-policy"]


# -- in the browser ---------------------------------------------------------------------------
def test_timeline_confirm_link_then_both_organisations_in_date_order(
        page: Page, world: World) -> None:
    ref = world.record("cdoc", "C-998")
    start = f"/app/timeline/{ref}"
    log_in(page, world, "cdoc", start)
    expect(page.get_by_test_id("patient-name")).to_have_text("Mueller Jorg")
    expect(rows(page)).not_to_have_count(0)
    # Not linked yet (the tests after this one rely on the link made here, or make it).
    proposals = page.get_by_test_id("proposal")
    expect(proposals).to_have_count(1)
    expect(rows(page)).to_have_count(2)
    assert world.studies["h1"] not in shown_uids(page)
    expect(proposals).to_contain_text("H-123")
    proposals.get_by_test_id("confirm-link").click()
    expect(page.get_by_test_id("timeline-record")).to_have_count(2)
    expect(page.get_by_test_id("proposal")).to_have_count(0)
    expect(rows(page)).to_have_count(3)
    assert shown_uids(page) == [world.studies["h1"], world.studies["c1"], world.studies["c2"]]
    first = rows(page).first
    expect(first.get_by_test_id("study-date")).to_have_text("2020-01-05")
    expect(first.get_by_test_id("study-source")).to_have_text("hospital")
    expect(first.get_by_test_id("study-modality")).to_have_text("CT")
    expect(page.get_by_test_id("page-error")).to_be_hidden()
    expect(rows(page).last).to_contain_text(f"MR head clinic {MARKUP}")
    assert page.locator("main img").count() == 0

    # Filters: by modality, then by date.
    page.get_by_test_id("filter-modality").select_option("MR")
    page.get_by_test_id("filter-button").click()
    expect(rows(page)).to_have_count(1)
    assert shown_uids(page) == [world.studies["c2"]]
    page.get_by_test_id("filter-modality").select_option("")
    page.get_by_test_id("filter-from").fill("2021-01-01")
    page.get_by_test_id("filter-button").click()
    expect(rows(page)).to_have_count(2)
    assert shown_uids(page) == [world.studies["c1"], world.studies["c2"]]

    # "View images" opens the viewer on the study.
    page.get_by_test_id("filter-from").fill("")
    page.get_by_test_id("filter-button").click()
    expect(rows(page)).to_have_count(3)
    row = page.locator(f"[data-testid=timeline-study][data-study-uid='{world.studies['h1']}']")
    row.get_by_test_id("view-study").click()
    page.wait_for_url(re.compile(f"/app/view/{re.escape(world.studies['h1'])}$"))
    expect(page.get_by_test_id("study")).to_have_count(1)


def test_compare_with_a_prior_scrolls_in_sync(page: Page, world: World) -> None:
    world.linked()
    ref = world.record("cdoc", "C-998")
    log_in(page, world, "cdoc", f"/app/timeline/{ref}")
    row = page.locator(f"[data-testid=timeline-study][data-study-uid='{world.studies['c1']}']")
    row.get_by_test_id("compare-study").click()
    prior = page.get_by_test_id("prior-link")
    expect(prior).to_have_count(1)  # the MR is later, the CT of 2020 is the prior
    assert prior.get_attribute("data-study-uid") == world.studies["h1"]
    prior.click()
    page.wait_for_url(re.compile(
        f"/app/compare/{re.escape(world.studies['c1'])}/{re.escape(world.studies['h1'])}"))
    expect(page.get_by_test_id("left-title")).to_contain_text("CT chest clinic")
    expect(page.get_by_test_id("right-title")).to_contain_text("CT chest hospital")
    expect(page.get_by_test_id("sync")).to_be_checked()
    left = page.frame_locator("[data-testid=left-frame]")
    right = page.frame_locator("[data-testid=right-frame]")
    for frame, count in ((left, 3), (right, 5)):
        frame.get_by_test_id("series-thumbnail").first.click()
        expect(frame.get_by_test_id("position")).to_have_text(f"1 / {count}")
    # Scrolling the left stack moves the right one to the same relative position.
    left.get_by_test_id("next").click()
    expect(left.get_by_test_id("position")).to_have_text("2 / 3")
    expect(right.get_by_test_id("position")).to_have_text("3 / 5")
    left.get_by_test_id("next").click()
    expect(right.get_by_test_id("position")).to_have_text("5 / 5")
    expect(page.get_by_test_id("left-position")).to_have_text("3 / 3")
    expect(page.get_by_test_id("right-position")).to_have_text("5 / 5")
    # And the other way round.
    right.get_by_test_id("prev").click()
    expect(right.get_by_test_id("position")).to_have_text("4 / 5")
    expect(left.get_by_test_id("position")).to_have_text("3 / 3")  # round(0.75 * 2) = 2
    right.get_by_test_id("prev").click()
    expect(right.get_by_test_id("position")).to_have_text("3 / 5")
    expect(left.get_by_test_id("position")).to_have_text("2 / 3")
    # Without sync, each scrolls alone.
    page.get_by_test_id("sync").uncheck()
    left.get_by_test_id("prev").click()
    expect(left.get_by_test_id("position")).to_have_text("1 / 3")
    page.wait_for_timeout(300)
    expect(right.get_by_test_id("position")).to_have_text("3 / 5")
    # With sync on again, a series opened anew joins the other stack's position.
    page.get_by_test_id("sync").check()
    left.get_by_test_id("series-thumbnail").first.click()
    expect(left.get_by_test_id("position")).to_have_text("2 / 3")
    expect(right.get_by_test_id("position")).to_have_text("3 / 5")
    page.get_by_test_id("back-to-timeline").click()
    page.wait_for_url(re.compile(f"/app/timeline/{ref}$"))


def test_without_the_grant_the_other_organisation_stays_hidden(
        page: Page, world: World) -> None:
    world.linked()
    ref = world.record("cnurse", "C-998")
    log_in(page, world, "cnurse", f"/app/timeline/{ref}")
    expect(rows(page)).to_have_count(2)
    assert world.studies["h1"] not in shown_uids(page)
    expect(page.get_by_test_id("timeline-record")).to_have_count(1)
    body = page.locator("main").inner_text()
    assert "hospital" not in body and "H-123" not in body
    expect(page.get_by_test_id("proposal")).to_have_count(0)
    # Its compare page cannot open the hospital's study either.
    page.goto(f"{world.url}/app/compare/{world.studies['c1']}/{world.studies['h1']}")
    expect(page.get_by_test_id("right-title")).to_have_text("not found, or not visible to you")
    right = page.frame_locator("[data-testid=right-frame]")
    expect(right.get_by_test_id("status")).to_contain_text("cannot be opened")


def test_an_unknown_record_says_so(page: Page, world: World) -> None:
    log_in(page, world, "cnurse", "/app/timeline/nosuchrecord")
    expect(page.get_by_test_id("page-error")).to_contain_text("does not exist")


def test_iid_patient_page_leads_to_the_timeline(page: Page, world: World) -> None:
    ref = world.record("cdoc", "C-998")
    log_in(page, world, "cdoc", f"/app/timeline/{ref}")
    page.goto(f"{world.url}/IHEInvokeImageDisplay?requestType=PATIENT&patientID=C-998")
    page.wait_for_url(re.compile(r"/app/patients/[A-Za-z0-9_-]+$"))
    link = page.get_by_test_id("timeline-link")
    expect(link).to_have_count(1)
    link.click()
    page.wait_for_url(re.compile(re.escape(f"/app/timeline/{ref}") + "$"))
    expect(rows(page)).not_to_have_count(0)


def test_find_a_patient_then_open_the_timeline(page: Page, world: World) -> None:
    log_in(page, world, "cnurse", "/app/timeline")
    page.get_by_test_id("find-name").fill("mueller")
    page.get_by_test_id("find-button").click()
    found = page.get_by_test_id("found-record")
    expect(found).to_have_count(1)  # the hospital's MÜLLER is not hers to see
    expect(found).to_contain_text("C-998 (clinic)")
    found.get_by_role("link").click()
    page.wait_for_url(re.compile(r"/app/timeline/[A-Za-z0-9_-]+$"))
    expect(rows(page)).to_have_count(2)


@pytest.fixture(scope="module")
def peer(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Another archive, registered for the clinic, that knows us (C-FIND and C-GET)."""
    other = make_server(tmp_path_factory.mktemp("peer"), ae_title="PEER")
    try:
        r = world.api("root").put(f"{world.url}/api/remote-aes/PEER", json={
            "host": "127.0.0.1", "port": other.dicom_port, "organisation": "clinic"},
            timeout=30)
        assert r.status_code == 200, r.text
        other.cli("ae", "add", "DICOMSHARE", "--host", "127.0.0.1", "--port", "11112")
        yield other
    finally:
        other.stop()


def test_a_prior_on_another_archive_is_fetched_then_compared(
        page: Page, world: World, peer: Server, tmp_path: Any) -> None:
    """Near the end of this module: the fetched study joins the clinic's record."""
    uid = generate_uid()
    path = make_file(tmp_path, study=uid, PatientID="C-998", PatientName="Mueller^Jorg",
                     PatientBirthDate=BIRTH, PatientSex="M", BodyPartExamined="CHEST",
                     StudyDate="20100101", StudyDescription="CT chest elsewhere")
    r = peer.session().post(f"{peer.dicomweb}/studies", data=stow_body(path.read_bytes()),
                            headers={"Content-Type": STOW_TYPE}, timeout=60)
    assert r.status_code == 200, r.text
    ref = world.record("cdoc", "C-998")
    log_in(page, world, "cdoc", f"/app/timeline/{ref}")
    assert uid not in shown_uids(page)
    row = page.locator(f"[data-testid=timeline-study][data-study-uid='{world.studies['c1']}']")
    row.get_by_test_id("compare-study").click()
    page.get_by_test_id("search-remote").click()
    remote = page.get_by_test_id("remote-prior")
    expect(remote).to_have_count(1)
    assert remote.get_attribute("data-study-uid") == uid
    expect(remote).to_contain_text("CT chest elsewhere")
    expect(remote).to_contain_text("PEER")
    remote.get_by_test_id("fetch-prior").click()
    # A background job: progress (and Cancel) while it runs, then what arrived.
    expect(remote.get_by_test_id("fetched")).to_have_text(" fetched: 1 new image(s)")
    expect(remote.get_by_test_id("fetch-progress")).to_have_count(0)
    expect(remote.get_by_test_id("cancel-fetch")).to_have_count(0)
    expect(remote.get_by_test_id("fetch-error")).to_have_count(0)
    jobs = world.api("cdoc").get(f"{world.url}/api/jobs", timeout=30).json()
    assert [(j["kind"], j["study_uids"], j["state"]) for j in jobs][:1] == [
        ("retrieve", [uid], "succeeded")], jobs[:1]
    remote.get_by_test_id("prior-link").click()
    page.wait_for_url(re.compile(
        f"/app/compare/{re.escape(world.studies['c1'])}/{re.escape(uid)}"))
    expect(page.get_by_test_id("right-title")).to_contain_text("CT chest elsewhere")
    right = page.frame_locator("[data-testid=right-frame]")
    right.get_by_test_id("series-thumbnail").first.click()
    expect(right.get_by_test_id("position")).to_have_text("1 / 1")


@dataclass
class HeldPeer:
    """An archive in this process (pynetdicom) with one CT study of three images for C-998:
    it answers C-FIND, and its first C-GET holds before the second image until
    ``release``, then waits for the C-CANCEL; later C-GETs send everything."""

    port: int
    study: str
    datasets: list[Any]
    release: threading.Event = field(default_factory=threading.Event)
    gets: int = 0
    server: Any = None

    def find(self, event: Any) -> Iterator[tuple[int, Any]]:
        from pydicom.dataset import Dataset

        asked = event.identifier
        if asked.QueryRetrieveLevel == "STUDY" and asked.get("PatientID") == "C-998":
            found = Dataset()
            found.QueryRetrieveLevel = "STUDY"
            first = self.datasets[0]
            for name in ("StudyInstanceUID", "PatientID", "StudyDate", "StudyDescription"):
                setattr(found, name, getattr(first, name))
            found.ModalitiesInStudy = "CT"
            yield 0xFF00, found
        elif asked.QueryRetrieveLevel == "IMAGE":  # the SOP classes, before a C-GET
            for ds in self.datasets:
                found = Dataset()
                found.QueryRetrieveLevel = "IMAGE"
                found.SOPClassUID, found.SOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
                yield 0xFF00, found

    def get(self, event: Any) -> Iterator[Any]:
        self.gets += 1
        hold = self.gets == 1
        yield len(self.datasets)
        for i, ds in enumerate(self.datasets):
            if hold and i == 1:
                self.release.wait(60)
            if hold and i >= 2:
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    if event.is_cancelled:  # true once per C-CANCEL
                        yield 0xFE00, None
                        return
                    time.sleep(0.05)
            yield 0xFF00, ds


@pytest.fixture(scope="module")
def held(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HeldPeer]:
    """HELDPEER, registered for the clinic."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import (
        CTImageStorage,
        StudyRootQueryRetrieveInformationModelFind,
        StudyRootQueryRetrieveInformationModelGet,
    )

    folder = tmp_path_factory.mktemp("held")
    study, series = generate_uid(), generate_uid()
    peer = HeldPeer(free_port(), study, [pydicom.dcmread(make_file(
        folder, study=study, series=series, InstanceNumber=number, PatientID="C-998",
        PatientName="Mueller^Jorg", PatientBirthDate=BIRTH, PatientSex="M",
        BodyPartExamined="CHEST", StudyDate="20120101", StudyDescription="CT chest held"))
        for number in (1, 2, 3)])
    ae = AE(ae_title="HELDPEER")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_supported_context(CTImageStorage, scu_role=True, scp_role=True)
    ae.dimse_timeout = ae.network_timeout = 60
    peer.server = ae.start_server(("127.0.0.1", peer.port), block=False, evt_handlers=[
        (evt.EVT_C_FIND, peer.find), (evt.EVT_C_GET, peer.get)])
    try:
        r = world.api("root").put(f"{world.url}/api/remote-aes/HELDPEER", json={
            "host": "127.0.0.1", "port": peer.port, "organisation": "clinic"}, timeout=30)
        assert r.status_code == 200, r.text
        yield peer
    finally:
        peer.release.set()
        peer.server.shutdown()


def test_a_fetch_shows_its_progress_and_can_be_cancelled(
        page: Page, world: World, held: HeldPeer) -> None:
    """The peer holds the fetch after its first image: progress and Cancel while it runs;
    cancelled, it says so and can be fetched again, then compared."""
    ref = world.record("cdoc", "C-998")
    log_in(page, world, "cdoc", f"/app/timeline/{ref}")
    row = page.locator(f"[data-testid=timeline-study][data-study-uid='{world.studies['c1']}']")
    row.get_by_test_id("compare-study").click()
    page.get_by_test_id("search-remote").click()
    item = page.locator(f"[data-testid=remote-prior][data-study-uid='{held.study}']")
    expect(item).to_contain_text("CT chest held")
    expect(item).to_contain_text("HELDPEER")
    fetch = item.get_by_test_id("fetch-prior")
    fetch.click()
    progress = item.get_by_test_id("fetch-progress")
    try:
        expect(progress).to_have_text("Fetching… 1 of 3 images")
        expect(fetch).to_have_count(0)  # replaced by the progress and Cancel
        job = progress.get_attribute("data-job")
        item.get_by_test_id("cancel-fetch").click()
        error = item.get_by_test_id("fetch-error")
        expect(error).to_have_text(
            "The fetch was cancelled (1 image arrived; fetch again for the rest).")
        expect(error).to_have_attribute("role", "alert")
        partial = item.get_by_test_id("partial-prior-link")  # what arrived can be compared
        expect(partial).to_have_text("Compare the 1 image that arrived")
        expect(partial).to_have_attribute("href", re.compile(
            f"/app/compare/{re.escape(world.studies['c1'])}/{re.escape(held.study)}"))
        expect(progress).to_have_count(0)
        expect(item.get_by_test_id("cancel-fetch")).to_have_count(0)
        expect(fetch).to_be_enabled()
        expect(fetch).to_have_text("Fetch from HELDPEER")
    finally:
        held.release.set()
    # The cancelled job stops once the peer lets go (C-CANCEL before the third image).
    deadline = time.monotonic() + 45
    while True:
        stopped = world.api("cdoc").get(f"{world.url}/api/jobs/{job}", timeout=30).json()
        if stopped["result"] is not None:
            break
        assert time.monotonic() < deadline, stopped
        time.sleep(0.2)
    assert stopped["state"] == "cancelled", stopped
    assert stopped["result"]["studies"][0]["stored"] == 2, stopped

    fetch.click()  # the rest, this time without a hold
    expect(item.get_by_test_id("fetched")).to_have_text(" fetched: 1 new image(s)")
    expect(item.get_by_test_id("fetch-error")).to_have_count(0)
    expect(item.get_by_test_id("partial-prior-link")).to_have_count(0)
    item.get_by_test_id("prior-link").click()
    page.wait_for_url(re.compile(
        f"/app/compare/{re.escape(world.studies['c1'])}/{re.escape(held.study)}"))
    expect(page.get_by_test_id("right-title")).to_contain_text("CT chest held")
    right = page.frame_locator("[data-testid=right-frame]")
    right.get_by_test_id("series-thumbnail").first.click()
    expect(right.get_by_test_id("position")).to_have_text("1 / 3")
