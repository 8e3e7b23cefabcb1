"""Headless Chromium without a network, and a loopback server for a built site.

Used by ``tools/pdf.py`` (print the book) and ``tests/test_browser.py`` (check the site): both
must show what a reader without internet sees.
"""
from __future__ import annotations

import contextlib
import functools
import http.server
import importlib.util
import os
import shutil
import threading
from pathlib import Path

# Debian's chromium and chromium-driver; elsewhere (e.g. GitHub's runners) Google Chrome and the
# chromedriver that $CHROMEWEBDRIVER names.
CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), "/usr/bin/chromium")
CHROMEDRIVER = (shutil.which("chromedriver") or shutil.which("chromedriver", path=os.environ.get("CHROMEWEBDRIVER", ""))
                or "/usr/bin/chromedriver")
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
    "--no-first-run", "--disable-component-update", "--disable-sync", "--window-size=1280,1600",
    # no network: names resolve to nothing, and everything not on loopback goes to a proxy that
    # does not exist
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=127.0.0.1",
)


def missing() -> list[str]:
    """What is missing to drive Chromium (empty when everything is there)."""
    absent = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if importlib.util.find_spec("selenium") is None:
        absent.append("python package selenium")
    return absent


def chromium(user_data_dir: Path):
    """A headless Chromium (selenium WebDriver) that cannot reach the internet."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + (f"--user-data-dir={user_data_dir}",):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    browser.set_page_load_timeout(120)
    browser.set_script_timeout(120)
    return browser


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args, **kwargs) -> None:
        pass


@contextlib.contextmanager
def serve(directory: Path):
    """Serve ``directory`` on a free loopback port; yields its base address."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# Resolves when MathJax has typeset the page (at once when the page has no MathJax).
WAIT_FOR_PAGE_JS = """
const done = arguments[arguments.length - 1];
const images = Array.from(document.images).map(i => i.complete ? Promise.resolve() :
  new Promise(r => { i.addEventListener('load', r); i.addEventListener('error', r); }));
const hasMath = document.querySelector('span.math, div.math') !== null;
// MathJax loads asynchronously: a page with math waits (up to 60 s) until MathJax has started.
const started = new Promise(r => { let n = 0; (function poll() {
  if ((window.MathJax && MathJax.startup && MathJax.startup.promise) || !hasMath || n++ >= 600) r(); else setTimeout(poll, 100);
})(); });
const math = started.then(() => (window.MathJax && MathJax.startup && MathJax.startup.promise) || Promise.resolve());
Promise.all([math, ...images]).then(() => done(true), () => done(false));
"""
