"""The signed-in pages in a real browser: headless Chromium against a running server.

Two organisations, a clinic and a specialist centre, with users who log in with
passwords. The clinic's clinician finds studies with the search, shares one with a link
(the URL shown once) and revokes it, sends one to the specialist's inbox, and asks for a
second opinion; the specialist logs in in another browser context, accepts the consult,
comments and writes the opinion; the clinician sees it answered. Plus the pages' security
headers and the CSRF check, with requests.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pydicom
import pytest
import requests
from playwright.sync_api import expect

from conftest import Server, make_file, make_server, sign_in
from test_auth import STOW_TYPE, stow_body

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytest_plugins = ["browser"]
pytestmark = pytest.mark.slow

PASSWORD = "correct horse battery"
USERS = {"doc": ("clinic", "clinician"), "spec": ("specialist", "clinician")}
NewPage = Callable[..., AbstractContextManager["Page"]]


@dataclass
class Site:
    server: Server
    tokens: dict[str, str] = field(default_factory=dict)
    studies: dict[str, str] = field(default_factory=dict)  # what it is for -> StudyUID

    @property
    def url(self) -> str:
        return self.server.url

    def api(self, user: str) -> requests.Session:
        return self.server.session(self.tokens[user])

    def sees(self, user: str, study: str) -> bool:
        r = self.api(user).get(f"{self.server.dicomweb}/studies",
                               params={"StudyInstanceUID": study}, timeout=30)
        assert r.status_code in (200, 204), r.text
        return r.status_code == 200 and len(r.json()) > 0


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("pages")
    server = make_server(tmp, env={"DICOMSHARE_SECURE_COOKIES": "false",
                                   "DICOMSHARE_DICOM_PORT": "0"})
    try:
        world = Site(server)
        for org in ("clinic", "specialist"):
            server.cli("orgs", "create", org)
        for name, (org, role) in USERS.items():
            server.cli("users", "create", name, "--org", org, "--role", role,
                       "--password-stdin", stdin=f"{PASSWORD}\n")
            world.tokens[name] = server.cli("tokens", "create", name).stdout.strip()
        # The clinic's studies: one patient each, so a name search finds exactly one.
        files = tmp / "files"
        for purpose, name, pid, date in (
                ("link", "Linkova^Alice", "PG-LINK", "20240105"),
                ("consult", "Consultez^Bob", "PG-CONS", "20240210"),
                ("inbox", "Inboxer^Carol", "PG-INBX", "20240315")):
            path = make_file(files, PatientName=name, PatientID=pid, StudyDate=date,
                             StudyDescription=f"CT for {purpose}")
            sent = world.api("doc").post(f"{server.dicomweb}/studies",
                                         data=stow_body(path.read_bytes()),
                                         headers={"Content-Type": STOW_TYPE}, timeout=60)
            assert sent.status_code == 200, sent.text
            world.studies[purpose] = str(pydicom.dcmread(path).StudyInstanceUID)
        yield world
    finally:
        server.stop()


def log_in(page: Page, site: Site, user: str, start: str = "/app/") -> None:
    sign_in(page, site.url, user, PASSWORD, start)


def no_page_error(page: Page) -> None:
    """Errors the page catches are shown in its #page-error box: there must be none."""
    expect(page.get_by_test_id("page-error")).to_be_hidden()


def pick_study(page: Page, patient_name: str, study_uid: str) -> None:
    """Search by the start of the patient's name and tick the one study found."""
    page.get_by_test_id("search-name").fill(patient_name)
    page.get_by_test_id("search-button").click()
    row = page.locator(f"[data-testid=study-result][data-study-uid='{study_uid}']")
    expect(page.get_by_test_id("study-result")).to_have_count(1)
    row.get_by_test_id("study-pick").check()
    expect(page.get_by_test_id("selected-count")).to_have_text("1 study selected.")


# -- without a browser: headers, no PHI, CSRF ---------------------------------------------------
def test_pages_send_security_headers_and_no_patient_data(site: Site) -> None:
    r = requests.get(site.url + "/", allow_redirects=False, timeout=10)
    assert r.status_code == 303 and r.headers["location"] == "/app/"
    for path in ("/app/", "/app/login", "/app/links", "/app/uploads", "/app/inbox",
                 "/app/consults", "/app/consults/1", "/static/app/links.html"):
        r = requests.get(site.url + path, timeout=10)
        assert r.status_code == 200, path
        assert r.headers["content-type"].startswith("text/html")
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp
        assert r.headers["x-frame-options"] == "DENY"
        assert r.headers["referrer-policy"] == "no-referrer"
        assert "<script>" not in r.text  # no inline scripts: every script has a src
        for name in ("Linkova", "Consultez", "PG-LINK"):
            assert name not in r.text
    assert requests.get(site.url + "/app/nothing", timeout=10).status_code == 404
    assert requests.get(site.url + "/static/app/api.js", timeout=10).status_code == 200
    assert requests.get(site.url + "/app/config.json", timeout=10).json() == {
        "oidc": False, "dicomweb_root": "/dicomweb"}


def test_a_session_request_without_the_csrf_token_is_refused(site: Site) -> None:
    http = requests.Session()
    r = http.post(f"{site.url}/api/login", json={"username": "doc", "password": PASSWORD},
                  timeout=30)
    assert r.status_code == 200, r.text
    csrf = r.json()["csrf_token"]
    body = {"studies": [site.studies["link"]], "label": "csrf check"}
    refused = http.post(f"{site.url}/api/links", json=body, timeout=30)
    assert refused.status_code == 403 and "CSRF" in refused.json()["error"]
    wrong = http.post(f"{site.url}/api/links", json=body, timeout=30,
                      headers={"X-CSRF-Token": "not-the-token"})
    assert wrong.status_code == 403
    assert all(link["label"] != "csrf check"
               for link in http.get(f"{site.url}/api/links", timeout=30).json())
    made = http.post(f"{site.url}/api/links", json=body, timeout=30,
                     headers={"X-CSRF-Token": csrf})
    assert made.status_code == 201, made.text
    revoked = http.delete(f"{site.url}/api/links/{made.json()['id']}", timeout=30)
    assert revoked.status_code == 403
    assert http.delete(f"{site.url}/api/links/{made.json()['id']}", timeout=30,
                       headers={"X-CSRF-Token": csrf}).status_code == 200


def test_the_signed_in_viewer_shows_only_what_the_user_may_see(site: Site) -> None:
    """/app/view/<study>/info.json lists a visible study; another organisation's study
    answers like a missing one; nothing without a session."""
    study = site.studies["link"]
    assert requests.get(f"{site.url}/app/view/{study}/info.json",
                        timeout=30).status_code == 401
    sessions = {}
    for user in ("doc", "spec"):
        http = sessions[user] = requests.Session()
        assert http.post(f"{site.url}/api/login", json={"username": user,
                                                         "password": PASSWORD},
                         timeout=30).status_code == 200
    info = sessions["doc"].get(f"{site.url}/app/view/{study}/info.json", timeout=30)
    assert info.status_code == 200, info.text
    [shown] = info.json()["studies"]
    assert shown["study_uid"] == study and shown["patient_name"] == "Linkova^Alice"
    assert shown["series"][0]["thumbnail_url"].startswith("/dicomweb/studies/")
    assert info.json()["download_url"] is None
    foreign = sessions["spec"].get(f"{site.url}/app/view/{study}/info.json", timeout=30)
    missing = sessions["spec"].get(f"{site.url}/app/view/1.2.3.4.5/info.json", timeout=30)
    assert foreign.status_code == missing.status_code == 404
    assert "Linkova" not in foreign.text
    assert sessions["doc"].get(f"{site.url}/app/view/not-a-uid/info.json",
                               timeout=30).status_code == 400
    page = sessions["doc"].get(f"{site.url}/app/view/{study}", timeout=30)
    assert page.status_code == 200 and "Linkova" not in page.text
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]


# -- in the browser ---------------------------------------------------------------------------
def test_login_shows_a_wrong_password_then_goes_where_the_user_was_going(
        page: Page, site: Site) -> None:
    page.goto(site.url + "/app/links")
    page.wait_for_url(re.compile(r"/app/login\?next=%2Fapp%2Flinks$"))
    page.get_by_test_id("username").fill("doc")
    page.get_by_test_id("password").fill("wrong password")
    page.get_by_test_id("login-button").click()
    expect(page.get_by_test_id("login-error")).to_have_text("Wrong user name or password.")
    expect(page.get_by_role("alert")).to_be_visible()
    assert page.get_by_test_id("oidc-login").is_hidden()  # OpenID Connect is not set up
    page.get_by_test_id("password").fill(PASSWORD)
    page.get_by_test_id("login-button").click()
    page.wait_for_url(site.url + "/app/links")
    expect(page.get_by_test_id("who")).to_contain_text("doc · clinic (clinician)")

    page.get_by_test_id("logout").click()
    page.wait_for_url(re.compile(r"/app/login"))
    page.goto(site.url + "/app/")
    page.wait_for_url(re.compile(r"/app/login\?next="))  # the session has ended


def test_a_share_link_made_from_the_search_is_shown_once_and_revoked(
        page: Page, site: Site) -> None:
    label = "For Dr <img src=x onerror=alert(1)> Who"
    log_in(page, site, "doc", "/app/links")
    page.get_by_test_id("search-name").fill("ALICE")  # any name part, any case
    page.get_by_test_id("search-button").click()
    expect(page.get_by_test_id("study-result")).to_have_count(1)
    page.get_by_test_id("search-name").fill("")
    page.get_by_test_id("search-from").fill("2024-03-01")  # a date range
    page.get_by_test_id("search-to").fill("2024-03-31")
    page.get_by_test_id("search-button").click()
    expect(page.get_by_test_id("study-result")).to_have_text([re.compile("Inboxer Carol")])
    page.get_by_test_id("search-from").fill("")
    page.get_by_test_id("search-to").fill("")
    pick_study(page, "linkova", site.studies["link"])
    page.get_by_test_id("perm-download").check()
    page.get_by_test_id("link-label").fill(label)
    page.get_by_test_id("link-max-uses").fill("5")
    page.get_by_test_id("create-link").click()

    url_field = page.get_by_test_id("new-link-url")
    expect(url_field).to_be_visible()
    url = url_field.input_value()
    secret = page.get_by_test_id("new-link-secret").input_value()
    assert url == f"{site.url}/share/{secret}" and len(secret) >= 43
    assert page.get_by_test_id("new-link-dicomweb").input_value() == f"{url}/dicomweb"
    assert requests.get(url, timeout=30).status_code == 200  # the recipient opens it

    row = page.get_by_test_id("link").filter(has_text="For Dr")
    expect(row.get_by_test_id("link-row-label")).to_have_text(label)  # text, not markup
    assert page.locator("[data-testid=links] img").count() == 0
    expect(row.get_by_test_id("link-state")).to_have_text("active")

    page.reload()  # shown once: gone after a reload, the list never has it
    expect(row.get_by_test_id("link-uses")).to_have_text("1 of 5")
    assert page.get_by_test_id("new-link").is_hidden()
    assert secret not in page.content()

    page.once("dialog", lambda dialog: dialog.dismiss())
    row.get_by_test_id("revoke-link").click()  # cancelled: nothing happens
    expect(row.get_by_test_id("link-state")).to_have_text("active")
    page.once("dialog", lambda dialog: dialog.accept())
    row.get_by_test_id("revoke-link").click()
    expect(row.get_by_test_id("link-state")).to_have_text("revoked")
    expect(row.get_by_test_id("revoke-link")).to_have_count(0)
    no_page_error(page)
    assert requests.get(url, timeout=30).status_code == 410


def test_upload_links_are_created_listed_and_revoked(page: Page, site: Site) -> None:
    log_in(page, site, "spec", "/app/uploads")
    page.get_by_test_id("upload-label").fill("Images from the clinic")
    page.get_by_test_id("create-upload").click()
    url = page.get_by_test_id("new-upload-url").input_value()
    assert url.startswith(f"{site.url}/upload/")
    row = page.get_by_test_id("upload-link").filter(has_text="Images from the clinic")
    expect(row.get_by_test_id("upload-state")).to_have_text("active")
    page.once("dialog", lambda dialog: dialog.accept())
    row.get_by_test_id("revoke-upload").click()
    expect(row.get_by_test_id("upload-state")).to_have_text("revoked")
    no_page_error(page)
    assert requests.get(url, timeout=30).status_code in (404, 410)


def test_a_whole_consult_through_the_pages(new_page: NewPage, site: Site) -> None:
    study = site.studies["consult"]
    question = "Nodule in the right upper lobe: benign?\nPrior CT is attached."
    with new_page() as doc:
        log_in(doc, site, "doc", "/app/consults")
        pick_study(doc, "consultez", study)
        doc.get_by_test_id("consult-question").fill(question)
        doc.get_by_test_id("consult-urgency").select_option("urgent")
        doc.get_by_test_id("consult-org").fill("specialist")
        doc.get_by_test_id("consult-user").fill("spec")
        doc.get_by_test_id("request-consult").click()
        doc.wait_for_url(re.compile(r"/app/consults/\d+$"))
        consult_url = doc.url
        expect(doc.get_by_test_id("consult-state")).to_have_text("requested")
        expect(doc.get_by_test_id("consult-question")).to_have_text(question)
        expect(doc.get_by_test_id("consult-study")).to_contain_text("Consultez Bob")
        assert doc.get_by_test_id("consult-accept").count() == 0  # not the specialist's

        with new_page() as spec:
            log_in(spec, site, "spec", "/app/")
            note = spec.get_by_test_id("notification").filter(has_text="consult request")
            expect(note).to_have_count(1)
            assert int(spec.get_by_test_id("unread-count").inner_text()) >= 1
            note.get_by_test_id("mark-read").click()
            expect(note).to_have_attribute("data-read", "true")

            spec.get_by_role("navigation").get_by_role("link", name="Consults").click()
            row = spec.get_by_test_id("as-specialist").get_by_test_id("consult")
            expect(row.get_by_test_id("consult-state")).to_have_text("requested")
            row.get_by_test_id("consult-link").click()
            spec.wait_for_url(consult_url)
            # The specialist sees the study before accepting (the consult's grant).
            expect(spec.get_by_test_id("consult-study")).to_contain_text("CT for consult")
            # ... in the same viewer as share links, on the DICOMweb root with the session.
            with spec.context.expect_page() as opened:
                spec.get_by_test_id("view-study").click()
            viewer = opened.value
            thumb = viewer.get_by_test_id("thumbnail-image").first
            expect(thumb).to_be_visible()
            viewer.wait_for_function(
                "() => [...document.querySelectorAll('[data-testid=thumbnail-image]')]"
                ".every(i => i.complete && i.naturalWidth > 0)")
            viewer.get_by_test_id("series-thumbnail").first.click()
            expect(viewer.get_by_test_id("position")).to_contain_text("1 /")
            viewer.wait_for_function(
                "() => { const i = document.querySelector('[data-testid=image]');"
                " return i && i.complete && i.naturalWidth > 0; }")
            assert viewer.get_by_test_id("download").is_hidden()
            viewer.close()
            spec.get_by_test_id("consult-accept").click()
            expect(spec.get_by_test_id("consult-state")).to_have_text("accepted")
            expect(spec.get_by_test_id("time-accepted_at")).not_to_be_empty()

            spec.get_by_test_id("comment-text").fill("Any older imaging to compare?")
            spec.get_by_test_id("comment-submit").click()
            expect(spec.get_by_test_id("comment-body")).to_have_text(
                ["Any older imaging to compare?"])

            spec.get_by_test_id("opinion-text").fill("Calcified granuloma. Benign.")
            spec.get_by_test_id("opinion-submit").click()
            expect(spec.get_by_test_id("consult-state")).to_have_text("answered")
            expect(spec.get_by_test_id("opinion-body")).to_have_text(
                "Calcified granuloma. Benign.")
            assert spec.get_by_test_id("opinion-form").is_hidden()
            no_page_error(spec)

        doc.reload()
        expect(doc.get_by_test_id("consult-state")).to_have_text("answered")
        expect(doc.get_by_test_id("comment-body")).to_have_text(
            ["Any older imaging to compare?"])
        expect(doc.get_by_test_id("opinion-body")).to_have_text("Calcified granuloma. Benign.")
        expect(doc.get_by_test_id("study-opinion")).to_have_text("opinion stored here")
        for key in ("created_at", "accepted_at", "answered_at"):
            expect(doc.get_by_test_id(f"time-{key}")).to_be_visible()
        doc.get_by_test_id("comment-text").fill("Thank you.")
        doc.get_by_test_id("comment-submit").click()
        expect(doc.get_by_test_id("comment-body")).to_have_text(
            ["Any older imaging to compare?", "Thank you."])
        doc.once("dialog", lambda dialog: dialog.accept())
        doc.get_by_test_id("consult-close").click()
        expect(doc.get_by_test_id("consult-state")).to_have_text("closed")
        expect(doc.get_by_test_id("comment-form")).to_be_hidden()
        no_page_error(doc)


def test_sending_a_study_to_the_inbox_and_accepting_it(new_page: NewPage, site: Site) -> None:
    study = site.studies["inbox"]
    assert not site.sees("spec", study)
    with new_page() as doc:
        log_in(doc, site, "doc", "/app/inbox")
        pick_study(doc, "inboxer", study)
        doc.get_by_test_id("send-org").fill("specialist")
        doc.get_by_test_id("send-message").fill("For the tumour board")
        doc.get_by_test_id("send-button").click()
        expect(doc.get_by_test_id("send-error")).to_have_text("Sent 1 study.")
        sent = doc.get_by_test_id("sent-item").filter(has_text=study)
        expect(sent.get_by_test_id("item-state")).to_have_text("pending")

        with new_page() as spec:
            log_in(spec, site, "spec", "/app/inbox")
            item = spec.get_by_test_id("received-item").filter(has_text="For the tumour board")
            expect(item.get_by_test_id("item-state")).to_have_text("pending")
            expect(item).to_contain_text("shown once accepted")  # no UID before accepting
            assert study not in spec.get_by_test_id("received").inner_text()
            item.get_by_test_id("accept-item").click()
            expect(item.get_by_test_id("item-state")).to_have_text("accepted")
            expect(item).to_contain_text(study)
            no_page_error(spec)
        assert site.sees("spec", study)

        doc.reload()
        expect(sent.get_by_test_id("item-state")).to_have_text("accepted")
        expect(sent.get_by_test_id("withdraw-item")).to_have_count(0)
        no_page_error(doc)


def test_a_locked_user_name_is_told_when_to_try_again(page: Page, site: Site) -> None:
    page.goto(site.url + "/app/login")
    page.get_by_test_id("username").fill("nobody-here")
    for _ in range(5):  # DICOMSHARE_LOGIN_MAX_FAILURES
        page.get_by_test_id("password").fill("guess")
        page.get_by_test_id("login-button").click()
        expect(page.get_by_test_id("login-error")).to_have_text("Wrong user name or password.")
        page.get_by_test_id("login-error").evaluate("box => { box.textContent = ''; }")
    page.get_by_test_id("password").fill("guess")
    page.get_by_test_id("login-button").click()
    expect(page.get_by_test_id("login-error")).to_have_text(re.compile(
        r"^Too many failed logins for this user name; try again in \d+ minutes?\.$"))


def test_declining_and_withdrawing_in_the_inbox_and_declining_a_consult(
        new_page: NewPage, site: Site) -> None:
    study = site.studies["link"]
    with new_page() as doc, new_page() as spec:
        log_in(doc, site, "doc", "/app/inbox")
        for message in ("First try", "Second try"):
            pick_study(doc, "linkova", study)
            doc.get_by_test_id("send-org").fill("specialist")
            doc.get_by_test_id("send-message").fill(message)
            doc.get_by_test_id("send-button").click()
            expect(doc.get_by_test_id("send-error")).to_have_text("Sent 1 study.")
            doc.get_by_test_id("search-name").fill("")
        second = doc.get_by_test_id("sent-item").first  # newest first
        expect(second.get_by_test_id("item-state")).to_have_text("pending")
        doc.once("dialog", lambda dialog: dialog.accept())
        second.get_by_test_id("withdraw-item").click()
        expect(second.get_by_test_id("item-state")).to_have_text("withdrawn")

        log_in(spec, site, "spec", "/app/inbox")
        first = spec.get_by_test_id("received-item").filter(has_text="First try")
        withdrawn = spec.get_by_test_id("received-item").filter(has_text="Second try")
        expect(withdrawn.get_by_test_id("item-state")).to_have_text("withdrawn")
        expect(withdrawn.get_by_test_id("accept-item")).to_have_count(0)
        spec.once("dialog", lambda dialog: dialog.accept("Not our speciality"))
        first.get_by_test_id("decline-item").click()
        expect(first.get_by_test_id("item-state")).to_have_text("declined")
        assert not site.sees("spec", study)

        doc.goto(site.url + "/app/consults")
        pick_study(doc, "linkova", study)
        doc.get_by_test_id("consult-question").fill("Fracture?")
        doc.get_by_test_id("consult-org").fill("specialist")
        doc.get_by_test_id("request-consult").click()
        doc.wait_for_url(re.compile(r"/app/consults/\d+$"))
        spec.goto(doc.url)
        expect(spec.get_by_test_id("consult-state")).to_have_text("requested")
        spec.get_by_test_id("consult-decline").click()
        spec.get_by_test_id("decline-text").fill("Please send the X-ray instead.")
        spec.get_by_test_id("decline-confirm").click()
        expect(spec.get_by_test_id("consult-state")).to_have_text("declined")
        expect(spec.get_by_test_id("consult-decline")).to_have_count(0)
        doc.reload()
        expect(doc.get_by_test_id("consult-state")).to_have_text("declined")
        expect(doc.get_by_test_id("decline-reason")).to_have_text(
            "Please send the X-ray instead.")
        expect(doc.get_by_test_id("time-declined_at")).to_be_visible()
        no_page_error(doc)
        no_page_error(spec)
