"""A share link in a real browser: headless Chromium against a running server.

A clinician stores a CT series (ten slices, sent out of order), an MR image and a
multi-frame MR, and shares them with the API. The recipient, without an account, opens
the link, enters the PIN, sees the studies and their thumbnails, scrolls through a
series, changes the window and downloads the zip, which pydicom reads back.
"""

from __future__ import annotations

import io
import random
import re
import zipfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydicom
import pytest
from playwright.sync_api import expect
from pydicom.fileset import FileSet
from pydicom.uid import generate_uid

from conftest import Server, make_file, make_server
from test_auth import STOW_TYPE, stow_body

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytest_plugins = ["browser"]
pytestmark = pytest.mark.slow

PIN = "4711-2468"
LABEL = "Second opinion: chest CT <b>not bold</b>"
IMAGE = "[data-testid=image]"
POSITION = "[data-testid=position]"
THUMBS = "[data-testid=thumbnail-image]"


@dataclass
class Shared:
    server: Server
    token: str  # the clinician who shares
    ct_study: str
    mr_study: str
    ct_series: str
    multiframe_series: str
    ct_sops: list[str]  # in InstanceNumber order
    stored: dict[str, bytes] = field(default_factory=dict)  # SOP UID -> the file sent
    links: dict[str, dict[str, Any]] = field(default_factory=dict)

    def create_link(self, **body: Any) -> dict[str, Any]:
        response = self.server.session(self.token).post(
            f"{self.server.url}/api/links", json=body, timeout=30)
        assert response.status_code == 201, response.text
        link: dict[str, Any] = response.json()
        return link


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    tmp = tmp_path_factory.mktemp("share-browser")
    server = make_server(tmp)
    try:
        token = server.new_token("doctor", "clinician")
        ct_study, mr_study, ct_series = generate_uid(), generate_uid(), generate_uid()
        files = tmp / "files"
        numbers = list(range(1, 11))
        random.Random(6).shuffle(numbers)  # stored out of order: the viewer must sort
        ct = {n: make_file(files, study=ct_study, series=ct_series, InstanceNumber=n,
                           SeriesNumber=1, SeriesDescription="Chest axial",
                           StudyDescription="CT chest", PatientName="Doe^Jane",
                           PatientID="P-6", SliceLocation=float(n * 5))
              for n in numbers}
        mr = make_file(files, "MR_small.dcm", study=mr_study, SeriesNumber=1,
                       SeriesDescription="T1 sagittal", StudyDescription="MR knee",
                       PatientName="Doe^Jane", PatientID="P-6")
        multiframe_series = generate_uid()
        multi = make_file(files, "emri_small.dcm", study=mr_study, series=multiframe_series,
                          SeriesNumber=2, SeriesDescription="Multi-frame",
                          StudyDescription="MR knee", PatientName="Doe^Jane",
                          PatientID="P-6")
        paths = [*ct.values(), mr, multi]
        sent = server.session().post(f"{server.dicomweb}/studies",
                                     data=stow_body(*(p.read_bytes() for p in paths)),
                                     headers={"Content-Type": STOW_TYPE}, timeout=60)
        assert sent.status_code == 200, sent.text
        stored = {}
        for path in paths:
            data = path.read_bytes()
            stored[pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
                   .SOPInstanceUID] = data
        ct_sops = [pydicom.dcmread(ct[n], stop_before_pixels=True).SOPInstanceUID
                   for n in sorted(ct)]
        site = Shared(server, token, ct_study, mr_study, ct_series, multiframe_series,
                      ct_sops, stored)
        site.links["pin"] = site.create_link(
            studies=[ct_study, mr_study], permissions=["view", "download"], pin=PIN,
            label=LABEL)
        site.links["view"] = site.create_link(studies=[mr_study], permissions=["view"],
                                              label="MR only")
        yield site
    finally:
        server.stop()


def unlock(page: Page, url: str, pin: str) -> None:
    """Open a link and submit its PIN form."""
    page.goto(url)
    page.locator("input[name=pin]").fill(pin)
    page.locator("form").filter(has=page.locator("input[name=pin]")).locator(
        "button, input[type=submit]").first.click()
    page.wait_for_load_state()


def thumbnails_loaded(page: Page, count: int) -> None:
    page.wait_for_function(
        """([sel, n]) => {
            const imgs = [...document.querySelectorAll(sel)];
            return imgs.length === n && imgs.every(i => i.complete && i.naturalWidth > 0);
        }""", arg=[THUMBS, count])


def image_shown(page: Page) -> str:
    """Wait until the viewer's image has loaded; its URL."""
    page.wait_for_function(
        """sel => { const i = document.querySelector(sel);
                    return i && i.getAttribute('src') && i.complete && i.naturalWidth > 0; }""",
        arg=IMAGE)
    src = page.get_attribute(IMAGE, "src")
    assert src
    return src


def open_series(page: Page, series_uid: str, total: int) -> str:
    page.locator(f"[data-testid=series-thumbnail][data-series-uid='{series_uid}']").click()
    page.wait_for_function("([sel, text]) => document.querySelector(sel).textContent === text",
                           arg=[POSITION, f"1 / {total}"])
    return image_shown(page)


def next_image(page: Page, before: str, position: str) -> str:
    page.wait_for_function(
        "([pos, text, img, old]) => document.querySelector(pos).textContent === text && "
        "document.querySelector(img).getAttribute('src') !== old",
        arg=[POSITION, position, IMAGE, before])
    return image_shown(page)


@pytest.fixture
def landing(page: Page, shared: Shared) -> Page:
    """The PIN link's landing page, unlocked, in a fresh browser context."""
    unlock(page, shared.links["pin"]["url"], PIN)
    page.get_by_test_id("study").first.wait_for()
    return page


def test_wrong_pin_is_refused_then_the_right_one_opens_the_studies(
        page: Page, shared: Shared) -> None:
    url = shared.links["pin"]["url"]
    unlock(page, url, "0000-0000")
    expect(page.get_by_role("alert")).to_contain_text("Wrong PIN")
    body = page.locator("body").inner_text()
    assert page.get_by_test_id("study-list").count() == 0
    assert "Chest axial" not in body and "Doe" not in body
    assert page.context.request.get(f"{url}/info.json").status == 401

    unlock(page, url, PIN)
    expect(page.get_by_test_id("study")).to_have_count(2)
    expect(page.get_by_test_id("label")).to_have_text(LABEL)  # as text, not markup
    expect(page.get_by_test_id("expiry")).to_contain_text("Available until")
    text = page.get_by_test_id("study-list").inner_text()
    for expected in ("CT chest", "MR knee", "Doe, Jane", "P-6", "CT", "MR", "Chest axial",
                     "T1 sagittal", "10 images"):
        assert expected in text, expected
    thumbnails_loaded(page, 3)
    download = page.get_by_test_id("download")
    expect(download).to_be_visible()
    assert download.get_attribute("href") == shared.links["pin"]["url"].removeprefix(
        shared.server.url) + "/download.zip"


def test_scrolling_a_series_shows_each_slice_in_order(landing: Page, shared: Shared) -> None:
    page = landing
    rendered: list[str] = []
    page.on("request", lambda r: rendered.append(r.url) if "/rendered" in r.url else None)
    src = open_series(page, shared.ct_series, 10)
    assert f"/instances/{shared.ct_sops[0]}/rendered" in src, "slice 1 first"
    assert src.startswith("/share/") and "/dicomweb/" in src
    # The next slices are fetched ahead while the user looks at this one...
    page.wait_for_function("n => performance.getEntriesByType('resource').filter("
                           "e => e.name.includes('/rendered')).length >= n", arg=4)

    page.get_by_test_id("stage").hover()
    page.mouse.wheel(0, 100)
    src = next_image(page, src, "2 / 10")
    assert f"/instances/{shared.ct_sops[1]}/" in src
    # ... and shown from the browser's cache: asked for once.
    assert sum(f"/instances/{shared.ct_sops[1]}/rendered" in u for u in rendered) == 1

    page.keyboard.press("ArrowDown")
    src = next_image(page, src, "3 / 10")
    assert f"/instances/{shared.ct_sops[2]}/" in src

    page.get_by_test_id("slider").fill("10")
    src = next_image(page, src, "10 / 10")
    assert f"/instances/{shared.ct_sops[9]}/" in src
    page.get_by_test_id("stage").click()  # the keys are the stack's again, not the slider's
    page.mouse.wheel(0, 100)  # past the end: stays on the last slice
    page.keyboard.press("ArrowUp")
    src = next_image(page, src, "9 / 10")
    assert f"/instances/{shared.ct_sops[8]}/" in src


def test_window_presets_and_dragging_ask_the_server_for_a_new_rendering(
        landing: Page, shared: Shared) -> None:
    page = landing
    src = open_series(page, shared.ct_series, 10)
    assert "window=" not in src  # the file's own window first
    with page.expect_response(lambda r: "/rendered" in r.url and "window=-600" in r.url) as got:
        page.get_by_test_id("wl-preset").select_option(label="Lung (-600/1500)")
    response = got.value
    assert response.status == 200 and response.headers["content-type"] == "image/jpeg"
    assert "window=-600%2C1500%2Clinear" in response.url
    src = image_shown(page)
    assert "window=-600%2C1500" in src
    assert page.get_by_test_id("wl-value").inner_text() == "C -600 / W 1500"

    box = page.get_by_test_id("stage").bounding_box()
    assert box
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down(button="right")
    page.mouse.move(x + 60, y - 30, steps=4)
    page.mouse.up(button="right")
    page.wait_for_function(
        "([img, old]) => { const i = document.querySelector(img); const s = i.getAttribute("
        "'src'); return s !== old && !s.includes('quality=') && i.complete && "
        "i.naturalWidth > 0; }", arg=[IMAGE, src])
    assert page.get_by_test_id("wl-preset").input_value() == "custom"
    center, width = re.findall(r"-?[\d.]+", page.get_by_test_id("wl-value").inner_text())
    assert float(width) > 1500 and float(center) < -600  # right: wider; up: lower level


def test_zoom_and_pan_stay_in_the_browser(landing: Page, shared: Shared) -> None:
    page = landing
    open_series(page, shared.ct_series, 10)
    requests_made: list[str] = []
    page.on("request", lambda r: requests_made.append(r.url))
    page.get_by_test_id("zoom-in").click()
    page.get_by_test_id("zoom-in").click()
    box = page.get_by_test_id("stage").bounding_box()
    assert box
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + 40, y + 25, steps=3)
    page.mouse.up()
    style = page.get_attribute(IMAGE, "style") or ""
    assert "translate(40px, 25px)" in style and "scale(1.5625)" in style
    page.get_by_test_id("zoom-reset").click()
    assert "scale(1)" in (page.get_attribute(IMAGE, "style") or "")
    assert requests_made == []
    assert page.get_by_test_id("position").inner_text() == "1 / 10"


def test_multi_frame_instances_scroll_frame_by_frame(landing: Page, shared: Shared) -> None:
    page = landing
    src = open_series(page, shared.multiframe_series, 10)
    assert src.endswith("/frames/1/rendered")
    page.keyboard.press("End")
    src = next_image(page, src, "10 / 10")
    assert src.endswith("/frames/10/rendered")
    assert "frame 10 of 10" in (page.get_attribute(IMAGE, "alt") or "")


def test_download_zip_holds_the_stored_instances_and_a_dicomdir(
        landing: Page, shared: Shared, tmp_path: Path) -> None:
    page = landing
    with page.expect_download() as got:
        page.get_by_test_id("download").click()
    saved = tmp_path / "shared.zip"
    got.value.save_as(saved)
    out = tmp_path / "unzipped"
    with zipfile.ZipFile(saved) as archive:
        names = archive.namelist()
        assert "DICOMDIR" in names, names
        archive.extractall(out)
    fileset = FileSet(pydicom.dcmread(out / "DICOMDIR"))
    listed = {inst.SOPInstanceUID for inst in fileset}
    assert listed == set(shared.stored)
    found = {}
    for name in names:
        if name != "DICOMDIR" and not name.endswith("/"):
            ds = pydicom.dcmread(out / name)
            found[ds.SOPInstanceUID] = ds
    assert set(found) == set(shared.stored)
    for sop, data in shared.stored.items():
        original = pydicom.dcmread(io.BytesIO(data))
        assert found[sop].PixelData == original.PixelData
        assert found[sop].PatientName == original.PatientName


def test_view_only_link_opens_without_pin_and_offers_no_download(
        page: Page, shared: Shared) -> None:
    page.goto(shared.links["view"]["url"])
    expect(page.get_by_test_id("study")).to_have_count(1)
    expect(page.get_by_test_id("label")).to_have_text("MR only")
    assert "CT chest" not in page.get_by_test_id("study-list").inner_text()
    thumbnails_loaded(page, 2)
    expect(page.get_by_test_id("download")).to_be_hidden()
    open_series(page, shared.multiframe_series, 10)


def test_fast_scrolling_on_a_slow_line_skips_to_the_slice_wanted(
        landing: Page, shared: Shared) -> None:
    page = landing
    open_series(page, shared.ct_series, 10)
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send("Network.emulateNetworkConditions", {
        "offline": False, "latency": 1000, "downloadThroughput": 16_000,
        "uploadThroughput": 16_000})
    page.evaluate("""sel => { const img = document.querySelector(sel); window.shown = [];
        new MutationObserver(() => window.shown.push(img.getAttribute('src')))
            .observe(img, {attributes: true, attributeFilter: ['src']}); }""", IMAGE)
    page.get_by_test_id("stage").click()
    for _ in range(9):
        page.keyboard.press("ArrowDown")
    expect(page.get_by_test_id("position")).to_have_text("10 / 10")  # before any image
    page.wait_for_function(
        "([img, sop]) => { const i = document.querySelector(img); return i.getAttribute("
        "'src').includes(sop) && i.complete && i.naturalWidth > 0; }",
        arg=[IMAGE, shared.ct_sops[9]], timeout=30_000)
    # One image at a time: slices reached while another was on its way are skipped, not
    # queued (a naive viewer would show all nine in turn).
    shown: list[str] = page.evaluate("window.shown")
    assert shared.ct_sops[9] in shown[-1]
    assert len(shown) < 9, shown


def test_a_revoked_link_stops_working_at_once(page: Page, shared: Shared) -> None:
    link = shared.create_link(studies=[shared.mr_study], permissions=["view"],
                              label="Soon revoked")
    page.goto(link["url"])
    expect(page.get_by_test_id("study")).to_have_count(1)
    revoked = shared.server.session(shared.token).delete(
        f"{shared.server.url}/api/links/{link['id']}", timeout=30)
    assert revoked.status_code == 200, revoked.text
    page.get_by_test_id("series-thumbnail").first.click()
    expect(page.get_by_test_id("stage-message")).to_contain_text("revoked")
    response = page.reload()
    assert response is not None and response.status == 410
    expect(page.locator("h1")).to_have_text("This link has been revoked")
    assert "MR knee" not in page.locator("body").inner_text()


def test_on_a_phone_the_viewer_fits_the_screen(
        new_page: Callable[..., AbstractContextManager[Page]], shared: Shared) -> None:
    with new_page(viewport={"width": 390, "height": 844}, has_touch=True,
                  is_mobile=True) as phone:
        phone.goto(shared.links["view"]["url"])
        thumbnails_loaded(phone, 2)
        phone.locator(f"[data-testid=series-thumbnail][data-series-uid="
                      f"'{shared.multiframe_series}']").tap()
        expect(phone.get_by_test_id("position")).to_have_text("1 / 10")
        image_shown(phone)
        expect(phone.get_by_test_id("image")).to_be_in_viewport()
        assert phone.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways
        phone.get_by_test_id("next").tap()
        expect(phone.get_by_test_id("position")).to_have_text("2 / 10")
