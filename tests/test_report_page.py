"""The report's index.html: self-contained, every section present, images that decode, a partial store.

Parsed with the standard library's HTML parser (the real-browser check lives in test_report_browser.py).
"""
from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

import store_factory as sf
from pipeline import report as rp
from pipeline.jobs import STATUS_CODES


class Page(HTMLParser):
    """Collects what the tests look at: table rows, image sources, links, section ids, scripts."""

    def __init__(self):
        super().__init__()
        self.rows, self.images, self.links, self.sections, self.scripts = [], [], [], [], []
        self._in_tbody = self._in_summary = False
        self._script = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table" and a.get("id") == "summary":
            self._in_summary = True
        if tag == "tbody" and self._in_summary:
            self._in_tbody = True
        if tag == "tr" and self._in_tbody:
            self.rows.append([])
        if tag == "td" and self._in_tbody:
            self.rows[-1].append(a.get("data-sort"))
        if tag == "img" and a.get("src"):
            self.images.append(a["src"])
        if tag in ("a", "link", "script") and (a.get("href") or a.get("src")):
            self.links.append(a.get("href") or a.get("src"))
        if tag == "section":
            self.sections.append(a.get("id"))
        if tag == "script":
            self._script = a.get("id", "")

    def handle_endtag(self, tag):
        if tag == "tbody":
            self._in_tbody = self._in_summary = False
        if tag == "script":
            self._script = None

    def handle_data(self, data):
        if self._script is not None:
            self.scripts.append((self._script, data))


def _decode(uri: str) -> Image.Image:
    assert uri.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


@pytest.fixture(scope="module")
def fab(tmp_path_factory):
    statuses = {1: "failed", 6: "diverged", 9: "pending", 10: "running"}
    return sf.fabricate_store(tmp_path_factory.mktemp("page") / "res.zarr", statuses=statuses, n_scans=2, seeds=(0, 1))


def test_page_is_self_contained_with_every_section(fab, tmp_path):
    paths = rp.report(fab.path, tmp_path / "r")
    text = paths["page"].read_text()
    page = Page()
    page.feed(text)
    assert page.sections == ["summary", "paired-comparisons", "curves", "images", "failed-and-diverged-jobs",
                             "still-to-come", "provenance"]
    assert not [link for link in page.links if link.startswith(("http:", "https:", "//"))], "no network needed"
    agg = rp.ensure_aggregate(fab.path)
    assert len(page.rows) == agg.sizes["group"]                   # one row per task × solver configuration
    assert len(page.images) == len(paths["curves"])              # curves inline; viewer images come from data
    for uri in page.images:
        assert _decode(uri).size[0] > 0
    data = json.loads(next(body for sid, body in page.scripts if sid == "viewer-data"))
    counted = int(np.isin(fab.status, [STATUS_CODES["done"], STATUS_CODES["diverged"]]).sum())
    assert len(data["jobs"]) == counted
    for job in data["jobs"]:
        for key in ("ref", "deg", "rec"):
            img = _decode(data["images"][job[key]])
            assert max(img.size) <= 128
    # failed and diverged jobs are listed with their log, the waiting ones as still to come
    assert text.count('class="problem"') == 2 and text.count(">log</a>") == 2
    assert "2 job(s) still to come" in text and "partial store" in text


def test_page_sort_keys_are_the_means(fab, tmp_path):
    rows = rp.table_rows(rp.ensure_aggregate(fab.path))
    page = Page()
    page.feed(rp.report(fab.path, tmp_path / "r")["page"].read_text())
    final = rp.markdown_columns().index("Final PSNR")
    for html_row, row in zip(page.rows, rows):
        assert float(html_row[final]) == pytest.approx(row["raw"]["final_psnr_mean"], abs=0.006)


def test_page_limits_the_viewer_and_says_so(fab, tmp_path):
    text = rp.report(fab.path, tmp_path / "r", page_jobs=3)["page"].read_text()
    page = Page()
    page.feed(text)
    data = json.loads(next(body for sid, body in page.scripts if sid == "viewer-data"))
    assert len(data["jobs"]) == 3 and "more finished job(s) are not shown" in text
