"""The built site in a real browser: headless Chromium opens every page of the book.

Checks that every page loads, every image on it is displayed (not broken), every internal link
points to a page or file that exists, notebook pages show at least as many images as the notebook
has stored figures, and the search page finds something. Saves screenshots of the intro and of
chapter 8 (when it exists) to ``$MREC_SCREENSHOT_DIR`` (default ``_build/screenshots``).

Needs Debian's ``chromium`` and ``chromium-driver`` and the ``selenium`` package. Without them the
tests are skipped, unless ``MREC_REQUIRE_BROWSER=1`` (CI sets it), in which case they fail.
"""
from __future__ import annotations

import functools
import http.server
import os
import shutil
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from test_book import PAGES, ROOT, n_stored_figures

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SCREENSHOT_PAGES = ["book/intro.html", "notebooks/09_gpt_meta_recommender.html"]


def _require_browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("python package selenium")
    if missing:
        message = f"browser test needs {missing} (apt-get install chromium chromium-driver)"
        if os.environ.get("MREC_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def site(built_book):
    """Serve the built book on a free loopback port for the duration of the module."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(built_book))
    handler.log_message = lambda *args, **kwargs: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield built_book, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    _require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,1600", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    browser.set_page_load_timeout(60)
    yield browser
    browser.quit()


PAGE_REPORT_JS = """
const imgs = Array.from(document.images).map(i => [i.currentSrc || i.src, i.complete, i.naturalWidth]);
const links = Array.from(document.querySelectorAll('a[href]')).map(a => a.href);
return {imgs: imgs, links: links, title: document.title, bodyText: document.body.innerText.length};
"""


def _local_target(built: Path, base: str, url: str) -> Path | None:
    """The file an internal URL points to, or None for external URLs."""
    if not url.startswith(base):
        return None
    path = unquote(urlsplit(url).path).lstrip("/")
    target = built / path
    return target / "index.html" if target.is_dir() or path == "" else target


def test_every_page_renders_images_and_links(site, driver):
    built, base = site
    pages = sorted(p.relative_to(built).as_posix() for p in built.rglob("*.html") if "_static" not in p.parts)
    assert pages, "no HTML pages were built"
    problems = []
    for rel in pages:
        driver.get(f"{base}/{rel}")
        report = driver.execute_script(PAGE_REPORT_JS)
        if report["bodyText"] < 50:
            problems.append(f"{rel}: page is (nearly) empty")
        for src, complete, width in report["imgs"]:
            if src.startswith(base) and not (complete and width > 0):
                problems.append(f"{rel}: image not displayed: {src}")
        for url in report["links"]:
            target = _local_target(built, base, url)
            if target is not None and not target.exists():
                problems.append(f"{rel}: broken internal link {url}")
    assert not problems, "\n".join(problems[:40])


@pytest.mark.parametrize("nb", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_notebook_pages_display_their_figures(site, driver, nb):
    built, base = site
    rel = nb.relative_to(ROOT).with_suffix(".html").as_posix()
    driver.get(f"{base}/{rel}")
    shown = driver.execute_script(
        "return Array.from(document.querySelectorAll('.cell_output img, .output img'))"
        ".filter(i => i.complete && i.naturalWidth > 0).length;"
    )
    assert shown >= n_stored_figures(nb), f"{rel}: {shown} figures displayed, notebook has {n_stored_figures(nb)}"


def test_search_finds_pages(site, driver):
    built, base = site
    driver.get(f"{base}/search.html?q=MovieLens")
    deadline = time.time() + 20
    found = 0
    while time.time() < deadline:
        found = driver.execute_script("return document.querySelectorAll('#search-results li').length;")
        if found:
            break
        time.sleep(0.25)
    assert found > 0, "the search page found nothing for 'MovieLens'"


def test_screenshots(site, driver):
    import matplotlib.image as mpimg

    built, base = site
    out = Path(os.environ.get("MREC_SCREENSHOT_DIR", ROOT / "_build" / "screenshots"))
    out.mkdir(parents=True, exist_ok=True)
    taken = []
    for rel in SCREENSHOT_PAGES:
        if not (built / rel).exists():
            continue
        driver.get(f"{base}/{rel}")
        path = out / (rel.replace("/", "_").replace(".html", ".png"))
        assert driver.save_screenshot(str(path)), f"could not save a screenshot of {rel}"
        pixels = mpimg.imread(path)
        assert pixels.std() > 0.05, f"the screenshot of {rel} is blank"
        taken.append(path.name)
    assert "book_intro.png" in taken
