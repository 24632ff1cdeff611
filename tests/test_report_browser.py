"""The report page in a real browser: Debian's Chromium, headless, driven by Playwright.

The page is loaded from disk (file://, no network). Checked: the table has one row per task ×
solver configuration, every image loads (naturalWidth > 0), sorting by a column orders the rows,
the viewer pages through the jobs, and the console has no errors. A screenshot is kept as a test
artefact (tests/artifacts/report-page.png). Skipped, with the reason, where Chromium or Playwright
is missing (scripts/test-setup.sh installs both).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import store_factory as sf
from pipeline import report as rp

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
# as the machine's notes say: no background networking, no GPU, no sandbox as root
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="Chromium not installed (scripts/test-setup.sh installs Debian's)"),
    pytest.mark.browser,
]


@pytest.fixture(scope="module")
def page_path(tmp_path_factory):
    fab = sf.fabricate_store(tmp_path_factory.mktemp("browser") / "res.zarr", statuses={1: "failed", 9: "pending"},
                             n_scans=2, seeds=(0, 1))
    return rp.report(fab.path, tmp_path_factory.mktemp("report"))["page"], rp.ensure_aggregate(fab.path)


def test_page_in_chromium(page_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install playwright)")
    path, agg = page_path
    errors: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 2000})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(path.as_uri())
        page.wait_for_load_state("load")
        rows = page.locator("#summary tbody tr")
        assert rows.count() == agg.sizes["group"]
        # every image decodes: the curves and the viewer's three panels
        broken = page.evaluate("Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0))"
                               ".map(i => i.alt)")
        assert broken == [] and page.evaluate("document.images.length") >= 3
        # sorting by Final PSNR, then again (descending)
        col = rp.markdown_columns().index("Final PSNR")
        header = page.locator(f"#summary th[data-col='{col}']")
        for ascending in (True, False):
            header.click()
            keys = page.evaluate(f"Array.from(document.querySelectorAll('#summary tbody tr'))"
                                 f".map(r => parseFloat(r.cells[{col}].getAttribute('data-sort')))")
            assert keys == sorted(keys, reverse=not ascending)
        # the viewer pages: the reconstruction changes with 'next'
        first = page.get_attribute("#img-rec", "src")
        page.click("#next")
        assert page.get_attribute("#img-rec", "src") != first and page.inner_text("#position").startswith("2 /")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "report-page.png"), full_page=True)
        browser.close()
    assert errors == []
