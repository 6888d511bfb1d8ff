"""The gateway page in a real browser (headless Chromium, phone-sized): the latest readings
hide an inactive device unless ?all=true, a device's chart draws the day's points. The
``browser`` fixture fails a test whose pages log a JavaScript error and keeps screenshots."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from browser import PHONE
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from fieldgate import store
from fieldgate.config import load_config
from fieldgate.web.server import WebServer

DAY = 86_400_000


@pytest.fixture
def gateway(config_file) -> Iterator[tuple[WebServer, int]]:
    cfg = load_config(str(config_file(overrides={"web": {"hide_inactive_after_days": 7}})))
    cfg = dataclasses.replace(cfg, web=dataclasses.replace(cfg.web, port=0))
    now = store.now_ms()
    conn = store.open_store(Path(cfg.store.path), cfg.site.serial)
    with store.transaction(conn):
        # TH-001: a day of readings every 10 minutes (144 points per metric)
        store.insert_readings(
            conn,
            [("TH-001", now - i * 600_000, "temperature", 20 + (i % 12) / 4) for i in range(144)]
            + [("TH-001", now - i * 600_000, "humidity", 50 - i / 10) for i in range(144)],
            source="test",
        )
        store.insert_readings(conn, [("TH-002", now - 10 * DAY, "temperature", 3.5)], source="t")
    conn.close()
    server = WebServer(cfg)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server, now
    finally:
        server.shutdown()
        server.server_close()


def fits_the_screen(browser) -> bool:
    inner, scroll = browser.driver.execute_script(
        "return [window.innerWidth, document.documentElement.scrollWidth]"
    )
    assert inner == PHONE[0]
    return scroll <= inner


def devices_shown(browser) -> list[str]:
    return [
        e.get_attribute("data-device")
        for e in browser.driver.find_elements(By.CSS_SELECTOR, "section.device")
    ]


def test_latest_readings_hide_an_inactive_device_unless_all(browser, gateway):
    server, _ = gateway
    browser.get(server.url + "/")
    assert devices_shown(browser) == ["TH-001"]
    note = browser.driver.find_element(By.CSS_SELECTOR, ".hidden-note").text
    assert "1 device silent for more than 7 days not shown" in note
    cells = browser.driver.find_elements(By.CSS_SELECTOR, "section.device td.value")
    assert [c.text for c in cells] == ["50", "20"]  # humidity, temperature at the latest ts
    assert fits_the_screen(browser)  # nothing wider than the phone's screen
    browser.shot("latest")
    browser.driver.find_element(By.LINK_TEXT, "show all devices").click()
    WebDriverWait(browser.driver, 10).until(lambda d: len(devices_shown(browser)) == 2)
    assert devices_shown(browser) == ["TH-001", "TH-002"]
    browser.shot("latest-all")


def test_device_chart_draws_the_days_points(browser, gateway):
    server, now = gateway
    browser.get(server.url + "/")
    browser.driver.find_element(By.LINK_TEXT, "roof-temp").click()
    WebDriverWait(browser.driver, 10).until(
        lambda d: d.execute_script("return !!(window.fieldgateCharts && fieldgateCharts.humidity)")
    )
    data = browser.driver.execute_script(
        "var c = window.fieldgateCharts; var out = {};"
        "Object.keys(c).forEach(function (m) { out[m] = c[m].data; }); return out;"
    )
    assert sorted(data) == ["humidity", "temperature"]
    xs, ys = data["temperature"]
    assert len(xs) == len(ys) == 144
    assert xs[0] == (now - 143 * 600_000) / 1000 and xs[-1] == now / 1000
    assert ys[-1] == 20 and ys[0] == 20 + (143 % 12) / 4
    assert data["humidity"][1][-1] == 50
    # uPlot drew them: a canvas per chart, of the phone's width, with its series' legend
    canvases = browser.driver.find_elements(By.CSS_SELECTOR, ".plot canvas")
    assert len(canvases) == 2
    assert all(0 < c.size["width"] <= PHONE[0] for c in canvases)
    assert fits_the_screen(browser)
    legends = [e.text for e in browser.driver.find_elements(By.CSS_SELECTOR, ".u-legend")]
    assert ["humidity" in legends[0], "temperature" in legends[1]] == [True, True]
    browser.shot("device")
