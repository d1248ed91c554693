"""A page of viz/ opened in the `browser` fixture (conftest.py), once its script has drawn everything."""

from __future__ import annotations

import time
from pathlib import Path


def open_rendered(driver, path: Path, timeout: float = 30.0) -> None:
    """Load `path`, wait for `document.body.dataset.ready`, and fail on any error the page logged."""
    driver.get(path.resolve().as_uri())
    deadline = time.monotonic() + timeout
    while driver.execute_script("return document.body && document.body.dataset.ready") != "1":
        assert time.monotonic() < deadline, f"page never finished rendering: {driver.get_log('browser')}"
        time.sleep(0.05)
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


def wait_drawn(driver, timeout: float = 60.0) -> None:
    """Wait until the page has redrawn every thumbnail after a change of its options (`dataset.drawn`)."""
    deadline = time.monotonic() + timeout
    while driver.execute_script("return document.body.dataset.drawn") != "1":
        assert time.monotonic() < deadline, f"page never finished redrawing: {driver.get_log('browser')}"
        time.sleep(0.02)
