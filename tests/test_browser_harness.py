"""The headless-Chromium harness (tests/browser.py) on hand-written pages: each check it
offers is shown to pass on a good page and to catch the fault it is for."""
from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

import browser as B
from browser import Browser, open_page, require_browser


def _png(width=40, height=20, colour=(200, 30, 30)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _page(tmp_path, body: str, name: str = "page.html"):
    path = tmp_path / name
    path.write_text("<!doctype html><html><head><meta charset='utf-8'><title>report</title>"
                    f"</head><body>{body}</body></html>", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def chromium():
    require_browser()
    with Browser() as shared:
        yield shared


def test_good_page_is_clean_and_screenshot_shows_it(tmp_path):
    require_browser()
    page = _page(tmp_path, f"<h1>Verdict: PASS</h1><img alt='heatmap' src='{_png()}' "
                           "style='margin-top:1500px; width:400px; height:200px'>")
    shot = tmp_path / "shots" / "page.png"
    report = open_page(page, screenshot=shot)  # a fresh browser of its own
    assert report.problems() == []
    assert "Verdict: PASS" in report.text
    assert report.images == [B.Image(_png()[:64], 40)]
    assert report.elements["img"] == 1 and "script" not in report.elements
    picture = Image.open(shot).convert("RGB")
    assert picture.width == 1280 and picture.height >= 1700  # the full page, not the viewport
    # The inline image is drawn where the page puts it, below the first screen.
    assert picture.getpixel((8 + 200, picture.height - 120)) == (200, 30, 30)
    assert picture.getpixel((640, 300)) == (255, 255, 255)


def test_broken_images_are_reported(chromium, tmp_path):
    page = _page(tmp_path, f"<img src='{_png()}'><img src='data:image/png;base64,iVBORw0KGgoAAAA'>"
                           "<img src='missing.png'>")
    report = chromium.open_page(page)
    assert [image.natural_width for image in report.images] == [40, 0, 0]
    assert [image.src[:22] for image in report.broken_images] == [
        "data:image/png;base64,", page.with_name("missing.png").as_uri()[:22]]
    assert sum("image did not load" in p for p in report.problems()) == 2
    assert report.external_requests == []


def test_console_errors_and_uncaught_exceptions_are_reported(chromium, tmp_path):
    page = _page(tmp_path, "<p>FAIL</p><script>console.log('fine'); console.error('boom', 42);"
                           "setTimeout(() => { throw new TypeError('late'); }, 0);</script>")
    report = chromium.open_page(page)
    assert report.console_errors == ["boom 42"]
    assert len(report.page_errors) == 1 and "TypeError: late" in report.page_errors[0]
    assert report.dialogs == [] and report.text == "FAIL"


def test_external_request_is_recorded_and_blocked_before_the_network(chromium, tmp_path):
    page = _page(tmp_path, f"<p>PASS</p><img src='{_png()}'><img src='http://example.invalid/x.png'>"
                           "<link rel='stylesheet' href='https://203.0.113.7/style.css'>")
    report = chromium.open_page(page)
    assert report.external_requests == ["http://example.invalid/x.png", "https://203.0.113.7/style.css"]
    assert report.broken_images == [B.Image("http://example.invalid/x.png", 0)]
    # Failed by the harness (blocked by the client), not by a name lookup or a connection.
    failures = [m for m in report.console_errors if "Failed to load resource" in m]
    assert len(failures) == 2 and all("ERR_BLOCKED_BY_CLIENT" in m for m in failures)
    assert any(p.startswith("external request: ") for p in report.problems())


def test_escaped_markup_is_text_and_runs_nothing(chromium, tmp_path):
    escaped = "&lt;img src=x onerror=alert(1)&gt; &lt;script&gt;alert(1)&lt;/script&gt;"
    report = chromium.open_page(_page(tmp_path, f"<h1>PASS</h1><pre>{escaped}</pre>"))
    assert "<img src=x onerror=alert(1)> <script>alert(1)</script>" in report.text
    assert report.dialogs == [] and report.problems() == []
    assert report.elements == {"html": 1, "head": 1, "meta": 1, "title": 1, "body": 1, "h1": 1, "pre": 1}


@pytest.mark.parametrize("markup", ["<script>alert(1)</script>", "<img src=x onerror=alert(1)>"])
def test_unescaped_markup_runs_and_is_caught(chromium, tmp_path, markup):
    report = chromium.open_page(_page(tmp_path, f"<h1>PASS</h1><pre>{markup}</pre>"))
    assert report.dialogs == ["alert: 1"]
    assert "dialog: alert: 1" in report.problems()
    assert "alert(1)" not in report.text
    tag = markup[1:markup.index(" " if markup.startswith("<img") else ">")]
    assert report.elements.get(tag) == 1


def test_require_browser_skips_or_fails_naming_the_package(monkeypatch):
    monkeypatch.setenv("CHROMIUM", "/nonexistent/chromium")
    monkeypatch.delenv("ONNXLRP_REQUIRE_BROWSER", raising=False)
    with pytest.raises(pytest.skip.Exception, match="Debian package 'chromium'"):
        require_browser()
    monkeypatch.setenv("ONNXLRP_REQUIRE_BROWSER", "1")
    with pytest.raises(pytest.fail.Exception, match="apt-get install"):
        require_browser()
