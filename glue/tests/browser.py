"""A real browser for the page tests: Debian's headless Chromium driven through Selenium and
the chromedriver of the same build (both installed by scripts/bootstrap.sh).

``browser`` gives a :class:`Browser` whose window is phone-sized unless the test asks for
``browser.resize(...)``; :meth:`Browser.shot` saves a screenshot under ``artifacts/screenshots/``
at the repository's top (``$FIELDGATE_ARTIFACTS`` overrides), kept after the run. When the test
ends, every JavaScript error the pages logged fails it: a page that throws is a broken page.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
#: A phone's viewport (CSS pixels): the pages must work on it.
PHONE = (390, 844)
DESKTOP = (1280, 900)


def artifacts_dir() -> Path:
    """Where screenshots are kept (created on first use)."""
    default = Path(__file__).resolve().parents[2] / "artifacts"
    path = Path(os.environ.get("FIELDGATE_ARTIFACTS", default)) / "screenshots"
    path.mkdir(parents=True, exist_ok=True)
    return path


class Browser:
    """One headless Chromium, its JavaScript console and the test's screenshots."""

    def __init__(self, test_name: str) -> None:
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in (
            "--headless=new",
            "--no-sandbox",  # root in CI
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            f"--window-size={PHONE[0]},{PHONE[1]}",
        ):
            options.add_argument(arg)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
        self.driver.set_page_load_timeout(30)
        # Headless Chromium keeps a window at least 500 px wide whatever --window-size says:
        # a phone's viewport is set through the DevTools protocol instead.
        self.driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": PHONE[0], "height": PHONE[1], "deviceScaleFactor": 2, "mobile": True},
        )
        self._name = re.sub(r"[^A-Za-z0-9_.-]+", "_", test_name)
        self.console: list[dict] = []

    def get(self, url: str) -> None:
        self.driver.get(url)

    def resize(self, width: int, height: int) -> None:
        """A desktop-sized (non-phone) viewport of ``width`` x ``height`` CSS pixels."""
        self.driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )

    def shot(self, label: str) -> Path:
        """Save a screenshot of the current page as ``<test>-<label>.png``."""
        path = artifacts_dir() / f"{self._name}-{label}.png"
        self.driver.save_screenshot(str(path))
        return path

    def js_errors(self) -> list[str]:
        """The console's errors so far (read once: the driver hands each entry out once)."""
        self.console.extend(self.driver.get_log("browser"))
        return [e["message"] for e in self.console if e.get("level") == "SEVERE"]

    def quit(self) -> None:
        self.driver.quit()


@pytest.fixture
def browser(request: pytest.FixtureRequest) -> Iterator[Browser]:
    b = Browser(request.node.name)
    try:
        yield b
        errors = b.js_errors()
        assert not errors, f"the pages logged JavaScript errors: {errors}"
    finally:
        b.quit()
