"""The headless browser the HTML tests (and the atlas example's screenshot) drive."""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager

from llm_heatmap.errors import InputError


@contextmanager
def headless_chromium(width: int = 1440, height: int = 960):
    """A selenium driver of Debian's headless Chromium, offline, with a throw-away profile."""
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    try:
        from selenium import webdriver
    except ImportError:
        raise InputError("the screenshot needs selenium; install it with pip install selenium.") from None
    if not (chromium and chromedriver):
        raise InputError("the screenshot needs chromium and chromedriver; install them with make browser.")
    profile = tempfile.mkdtemp(prefix="llm-heatmap-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=chromedriver))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
