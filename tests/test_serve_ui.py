"""The browser UI in a real browser: Playwright drives Debian's Chromium against the lookup
application deployed on the session's Ray Serve, over a digits run whose images the service
rebuilds and a bare table. Skipped, saying why, only where no Chromium is installed (.ci/run
installs Debian's `chromium`).

Each test fails on any console error or uncaught exception in the page, except the failed
resource loads that the test itself provokes (a wrong token's 401, a missing sample's 404).
With $RAYCURV_UI_SCREENSHOT set, the gallery's screenshot is also written there (the README's
docs/ui.png is made so).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from raycurv.serve.settings import build_settings
from tests.serve_support import make_table, run_app, write_image_run, write_run

CHROMIUM = os.environ.get("RAYCURV_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run"]
SCREENSHOT_ENV = "RAYCURV_UI_SCREENSHOT"
TOKEN = "ui-token-4711"
VIEWPORT = {"width": 960, "height": 640}
TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium; .ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def service(ray_cluster, tmp_path_factory):
    """The application over a digits run with images and a bare table, token-protected."""
    from ray import serve

    root = tmp_path_factory.mktemp("runs")
    _, table = write_image_run(root, "digits")
    write_run(root, "bare", make_table(20, run="bare"))
    url = run_app(build_settings(runs=[root], token=TOKEN, environ={}), name="serve-ui")
    yield url.rstrip("/") + "/", table
    serve.delete("serve-ui")


class Page:
    """A fresh browser tab, recording its console errors, page errors and requests."""

    def __init__(self, browser, url: str) -> None:
        self.context = browser.new_context(viewport=VIEWPORT)
        self.context.set_default_timeout(TIMEOUT_MS)
        self.tab = self.context.new_page()
        self.url = url
        self.errors: list[str] = []
        self.requests: list = []
        self.tab.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.tab.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        self.tab.on("request", lambda r: self.requests.append(r))

    def open(self, route: str = "") -> None:
        self.tab.goto(self.url + route)

    def login(self, token: str = TOKEN) -> None:
        self.tab.wait_for_selector("#token-form:not([hidden])")
        self.tab.fill("#token-input", token)
        self.tab.click("#token-form button[type=submit]")

    def errors_besides(self, *statuses: int) -> list[str]:
        allowed = re.compile(r"Failed to load resource: the server responded with a status of "
                             rf"({'|'.join(map(str, statuses)) or 'none'})")
        return [e for e in self.errors if not allowed.search(e)]

    def wait_for(self, function: str, arg=None) -> None:
        """Poll the JavaScript ``function`` (of ``arg``) until it returns true. (Playwright's
        own polling evaluates strings, which the UI's Content-Security-Policy forbids.)"""
        deadline = time.monotonic() + TIMEOUT_MS / 1000
        while not self.tab.evaluate(function, arg):
            assert time.monotonic() < deadline, f"not true within {TIMEOUT_MS} ms: {function}"
            time.sleep(0.1)

    def images_loaded(self, selector: str) -> None:
        self.wait_for("s => document.querySelectorAll(s).length > 0 && [...document"
                      ".querySelectorAll(s)].every(i => i.complete && i.naturalWidth > 0)",
                      selector)


@pytest.fixture
def page(browser, service):
    opened = Page(browser, service[0])
    yield opened
    opened.context.close()


def _by_rank(table: pa.Table, mask: np.ndarray | None = None) -> list[int]:
    ids = table.column("sample_id").to_numpy()
    rank = table.column("rank").to_numpy()
    keep = np.ones(len(ids), dtype=bool) if mask is None else mask
    return ids[keep][np.argsort(rank[keep])].tolist()


def _cards(page: Page) -> list[tuple[int, int]]:
    return page.tab.eval_on_selector_all(
        "#gallery .card", "cs => cs.map(c => [+c.dataset.rank, +c.dataset.sampleId])")


def test_token_is_asked_once_kept_for_the_session_and_never_in_a_url(page, service):
    page.open()
    page.login("not-the-token")
    page.wait_for("() => document.getElementById('auth-message').textContent !== ''")
    assert "wrong bearer token" in page.tab.inner_text("#auth-message")
    page.login()
    page.tab.wait_for_selector("#runs")
    assert page.tab.locator("#runs a", has_text="digits").count() == 1
    page.tab.click("#runs a >> text=digits")
    page.tab.wait_for_selector("#run-page #histogram")
    page.open("#/runs/digits/gallery?k=12")  # the token stays for the tab: not asked again
    page.tab.wait_for_selector("#gallery .card")
    assert page.tab.is_hidden("#token-form")
    api = [r for r in page.requests if "/v1/" in r.url]
    assert api and all(TOKEN not in r.url for r in page.requests)
    assert all(r.headers.get("authorization") in (f"Bearer {TOKEN}", "Bearer not-the-token")
               for r in api)
    assert page.errors_besides(401) == []


def test_gallery_shows_k_images_in_rank_order(page, service, tmp_path):
    url, table = service
    page.open("#/runs/digits/gallery?k=12")
    page.login()
    page.tab.wait_for_selector("#gallery .card")
    cards = _cards(page)
    assert [rank for rank, _ in cards] == list(range(1, 13))
    assert [sample for _, sample in cards] == _by_rank(table)[:12]
    page.images_loaded("#gallery img")
    assert page.tab.inner_text("#showing") == f"1–12 of {table.num_rows}"
    shot = tmp_path / "ui.png"
    page.tab.screenshot(path=str(shot))
    if os.environ.get(SCREENSHOT_ENV):  # small: a 64-colour palette
        Image.open(shot).convert("RGB").quantize(colors=64).save(os.environ[SCREENSHOT_ENV],
                                                                 optimize=True)
    page.tab.click("#next-page")
    page.wait_for("() => document.getElementById('showing').textContent.startsWith('13')")
    assert [sample for _, sample in _cards(page)] == _by_rank(table)[12:24]
    assert page.errors_besides() == []


def test_a_filter_changes_the_rows(page, service):
    _, table = service
    page.open("#/runs/digits/gallery?k=48")
    page.login()
    page.tab.wait_for_selector("#gallery .card")
    assert len(_cards(page)) == 48
    page.tab.select_option("#filter-corrupted", "true")
    page.wait_for("() => location.hash.includes('corrupted=true')")
    page.wait_for("() => document.querySelectorAll('#gallery .card').length < 48")
    corrupted = table.column("corrupted").to_numpy()
    assert [sample for _, sample in _cards(page)] == _by_rank(table, corrupted)
    assert page.tab.locator("#gallery .card .badge.corrupted").count() == int(corrupted.sum())
    page.tab.select_option("#filter-label", "3")
    page.wait_for("() => location.hash.includes('label=3')")
    labels = table.column("label").to_numpy()
    page.wait_for("n => document.querySelectorAll('#gallery .card').length === n",
                  int((corrupted & (labels == 3)).sum()))
    assert [s for _, s in _cards(page)] == _by_rank(table, corrupted & (labels == 3))
    assert page.errors_besides() == []


def test_clicking_a_sample_shows_its_image_curve_and_duplicates(page, service):
    _, table = service
    copies = table.column("duplicate_of").is_valid().to_numpy(zero_copy_only=False)
    copy = _by_rank(table, copies)[0]
    page.open("#/runs/digits/gallery?k=48&injected=true")
    page.login()
    page.tab.click(f"#gallery .card[data-sample-id='{copy}']")
    page.tab.wait_for_selector(f"#sample-page[data-sample-id='{copy}']")
    page.images_loaded("#sample-page img.big")
    page.tab.wait_for_selector("#sample-curve polyline.curve")
    assert page.tab.locator("#sample-curve circle.point").count() == 4  # one per scored epoch
    page.tab.wait_for_selector("#duplicates .thumb")
    members = page.tab.eval_on_selector_all("#duplicates .thumb", "ts => ts.map(t => +t.dataset.sampleId)")
    source = table.filter(pa.compute.equal(table.column("sample_id"), copy))["duplicate_of"][0]
    assert {copy, source.as_py()} <= set(members)
    assert "Conflicting labels" in page.tab.inner_text("#duplicates")
    page.images_loaded("#duplicates img")
    assert page.errors_besides() == []


def test_a_missing_sample_shows_the_services_message(page, service):
    page.open("#/runs/digits/samples/99999")
    page.login()
    page.tab.wait_for_selector("#error:not([hidden])")
    message = page.tab.inner_text("#error")
    assert "run 'digits' has no sample 99999" in message and "sample ids span" in message
    page.open("#/runs/bare/samples/3")  # a run without its data: the row, and why no image
    page.tab.wait_for_selector("#sample-page")
    page.wait_for("() => document.querySelector('#sample-page img.big').alt.includes('not reachable')")
    page.wait_for("() => document.getElementById('curve').textContent.includes('no per-epoch')")
    assert page.errors_besides(404) == []
