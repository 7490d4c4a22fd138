"""Opens a local HTML file in headless Chromium so tests can check what a person would see, and
do what a reviewer does on the report page (click Reject, download the rejects file).

Not a test module: tests import ``open_in_chromium``, ``review_in_chromium`` and
``chromium_available`` from here. The browser runs fully offline: Debian's chromium and
chromedriver are named explicitly so selenium-manager never tries to download a driver, and
every background network feature is off.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)

# Counts images the way a person would: a broken <img> is "complete" but has no natural width.
_IMAGES_JS = """
const imgs = Array.from(document.images);
const ok = imgs.filter(i => i.complete && i.naturalWidth > 0);
return {images: imgs.length, loaded: ok.length, thumbs: document.querySelectorAll('img.thumb').length,
        broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt),
        text: document.body ? document.body.innerText : ""};
"""


def chromium_available() -> bool:
    """True when the browser, its driver and selenium are all installed."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return False
    return Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()


@contextmanager
def _chromium(path: Path, timeout: float, downloads: Path | None = None) -> Iterator:
    """A headless Chromium (a fresh profile) with ``file://path`` loaded; with ``downloads``,
    files the page downloads go there without asking."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    profile = tempfile.mkdtemp(prefix="klein-ray-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in _FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument("--window-size=1280,2000")
    if downloads is not None:
        options.add_experimental_option("prefs", {
            "download.default_directory": str(downloads), "download.prompt_for_download": False,
            "download.directory_upgrade": True, "safebrowsing.enabled": False})
    driver = None
    try:
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
        if downloads is not None:  # headless Chromium takes the prefs only with this too
            driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
        driver.set_page_load_timeout(timeout)
        driver.get(Path(path).resolve().as_uri())
        WebDriverWait(driver, timeout).until(
            lambda d: d.execute_script("return document.readyState") == "complete"
        )
        yield driver
    finally:
        if driver is not None:
            driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def open_in_chromium(path: Path, screenshot: Path | None = None, timeout: float = 60.0) -> dict:
    """Load ``file://path`` headless; report image counts, broken images' alt text and the title.

    Returns ``{"images", "loaded", "broken", "thumbs", "title", "text"}`` (``thumbs``: the
    images' own thumbnails, not their references'); ``text`` is the body's rendered text (what is
    visible, not the markup), for checking banners and escaping.

    With ``screenshot``, saves a 1280x2000 PNG of the page (tall enough for header and grid).
    """
    with _chromium(path, timeout) as driver:
        result = dict(driver.execute_script(_IMAGES_JS))
        result["title"] = driver.title
        if screenshot is not None:
            driver.set_window_size(1280, 2000)
            driver.save_screenshot(str(screenshot))
        return result


# What a reviewer sees of each card (its id, its group, its reference thumbnails as drawn) and
# of the groups' headings.
_CARDS_JS = """
return {
  cards: Array.from(document.querySelectorAll('.card[data-id]')).map(c => ({
    id: c.getAttribute('data-id'),
    group: c.closest('section.group') ? c.closest('section.group').getAttribute('data-group') : null,
    refs: Array.from(c.querySelectorAll('img.ref')).map(i => ({
      loaded: i.complete && i.naturalWidth > 0, width: i.naturalWidth, height: i.naturalHeight,
      shown: i.getBoundingClientRect().width > 0 && getComputedStyle(i).visibility !== 'hidden'})),
    rejected: c.classList.contains('rejected')})),
  groups: Array.from(document.querySelectorAll('section.group > h3')).map(h => h.innerText),
  count: document.getElementById('kr-count') ? document.getElementById('kr-count').innerText : null,
};
"""
_REJECT_BUTTON_JS = """
const card = Array.from(document.querySelectorAll('.card[data-id]')).find(c => c.getAttribute('data-id') === arguments[0]);
return card ? card.querySelector('button.reject') : null;
"""


def review_in_chromium(path: Path, reject: list[str], downloads: Path, timeout: float = 60.0) -> dict:
    """Load the report page, read what it shows, click Reject on the cards of ``reject`` (by
    their ids) and then the Download button, and wait for the file to land in ``downloads``.

    Returns ``{"before", "after"}`` (``_CARDS_JS``'s view before and after the clicks) and
    ``"file"``: the downloaded file's path (None if none came within ``timeout``).
    """
    from selenium.webdriver.common.by import By

    downloads.mkdir(parents=True, exist_ok=True)
    with _chromium(path, timeout, downloads) as driver:
        before = driver.execute_script(_CARDS_JS)
        for row_id in reject:
            button = driver.execute_script(_REJECT_BUTTON_JS, row_id)
            if button is None:
                raise AssertionError(f"no card for {row_id!r} on the page")
            driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", button)
            button.click()
        after = driver.execute_script(_CARDS_JS)
        driver.find_element(By.ID, "kr-download").click()
        deadline = time.monotonic() + timeout
        found = None
        while found is None and time.monotonic() < deadline:  # the download is the browser's, not ours
            done = [p for p in downloads.iterdir() if not p.name.endswith(".crdownload")]
            found = done[0] if done else None
            if found is None:
                time.sleep(0.1)
        return {"before": before, "after": after, "file": found}
