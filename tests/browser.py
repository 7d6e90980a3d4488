"""Headless Chromium for browser tests: Debian's ``/usr/bin/chromium`` driven by Playwright.

Playwright's own browser downloads are never used (the machines have no internet); it
drives the system Chromium through ``executable_path``. A test module enables the
fixtures with ``pytest_plugins = ["browser"]``::

    pytest_plugins = ["browser"]

    def test_x(page: Page, server: Server) -> None:  # a fresh page in a fresh context
        page.goto(server.url + "/...")

    def test_two_people(browser: Browser) -> None:  # or as many as a test needs
        with open_page(browser) as alice, open_page(browser) as bob:
            ...

``open_page`` is also the ``new_page`` fixture, for modules that would rather not import
this one (an imported plugin module cannot have its asserts rewritten). Every page gets a
context of its own (no cookies or storage shared), and a JavaScript error thrown in the
page fails the test that opened it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

CHROMIUM = Path(os.environ.get("DICOMSHARE_TEST_CHROMIUM", "/usr/bin/chromium"))
ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
TIMEOUT_MS = 15_000

if TYPE_CHECKING:  # playwright itself is imported only when a browser is wanted
    from playwright.sync_api import Browser, Page


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One headless Chromium per test module (each page gets a fresh context). Not per
    session: Playwright's sync API keeps an event loop running in the main thread while
    it is open, and later modules calling ``asyncio.run()`` would fail. Skips when
    Chromium is missing, except in CI (``CI`` set), where that is a failure."""
    if not CHROMIUM.exists():
        reason = f"{CHROMIUM} is missing (apt install chromium) for browser tests"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        # launch() gives every browser a fresh, temporary user-data directory.
        instance = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        try:
            yield instance
        finally:
            instance.close()


@contextmanager
def open_page(browser: Browser, **context_options: Any) -> Iterator[Page]:
    """A page in a new browser context (own cookies), closed afterwards. Downloads are
    accepted; uncaught JavaScript errors in the page fail the test."""
    context = browser.new_context(accept_downloads=True, **context_options)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield page
        assert not errors, f"JavaScript errors in the page: {errors}"
    finally:
        context.close()


@pytest.fixture
def new_page(browser: Browser) -> Callable[..., AbstractContextManager[Page]]:
    """:func:`open_page` bound to the module's browser: ``with new_page() as page:``."""
    return lambda **context_options: open_page(browser, **context_options)


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh page (in a context of its own) for one test."""
    with open_page(browser) as fresh:
        yield fresh
