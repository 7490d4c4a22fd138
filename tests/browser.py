"""Opens a local HTML file in headless Chromium so tests can check what a person would see.

Not a test module: tests import ``open_in_chromium`` and ``chromium_available`` from here. The
browser runs fully offline: Debian's chromium and chromedriver are named explicitly so
selenium-manager never tries to download a driver, and every background network feature is off.
"""

from __future__ import annotations

import shutil
import tempfile
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
return {images: imgs.length, loaded: ok.length,
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


def open_in_chromium(path: Path, screenshot: Path | None = None, timeout: float = 60.0) -> dict:
    """Load ``file://path`` headless; report image counts, broken images' alt text and the title.

    Returns ``{"images", "loaded", "broken", "title", "text"}``; ``text`` is the body's rendered
    text (what is visible, not the markup), for checking banners and escaping.

    With ``screenshot``, saves a 1280x2000 PNG of the page (tall enough for header and grid).
    """
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
    driver = None
    try:
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
        driver.set_page_load_timeout(timeout)
        driver.get(Path(path).resolve().as_uri())
        WebDriverWait(driver, timeout).until(
            lambda d: d.execute_script("return document.readyState") == "complete"
        )
        result = dict(driver.execute_script(_IMAGES_JS))
        result["title"] = driver.title
        if screenshot is not None:
            driver.set_window_size(1280, 2000)
            driver.save_screenshot(str(screenshot))
        return result
    finally:
        if driver is not None:
            driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
