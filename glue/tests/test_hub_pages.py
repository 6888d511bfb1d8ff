"""The hub's web pages in a real browser (headless Chromium, phone-sized), on both backends:
log in, the fleet with a late gateway, a gateway's charts and CSV, domains, log out; and
``/metrics`` read with Prometheus' own parser."""

from __future__ import annotations

import csv
import io
import json
import re
import time
from typing import Any

import pytest
import requests
from browser import Browser
from prometheus_client.parser import text_string_to_metric_families
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from support import Hub, make_user
from test_hub import register

from fieldgate.hub.backends import open_storage
from fieldgate.hub.pages import CHART_BUCKETS, POLICY
from fieldgate.hub.sqlstore import ROLLUP_MS

T0 = 1_767_225_600_000


def beat(hub: Hub, key: str, status: dict[str, Any]) -> None:
    r = requests.post(
        f"{hub.url}/api/v1/heartbeat",
        json=status,
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert r.status_code == 204, r.text


def status(serial: str, interval: float, **extra: Any) -> dict[str, Any]:
    """A status as ``fieldgate status --json`` writes it (the parts the fleet reads)."""
    return {
        "site": serial,
        "disk": {"used_percent": 41.5},
        "readings": {"total": 10, "unbatched": 12},
        "rejected": {"total": 3, "top_reasons": []},
        "collector": {"state": {"value": "running"}},
        "batches": {"pending": 1},
        "upload": {"mode": "LIVE", "interval_secs": interval, "last_error": None},
        "export": {"state": {"value": "normal_operation"}},
        **extra,
    }


def log_in(b: Browser, hub: Hub, name: str, password: str, path: str = "/") -> None:
    b.get(hub.url + path)
    assert "/login" in b.driver.current_url
    b.driver.find_element(By.ID, "name").send_keys(name)
    b.driver.find_element(By.ID, "password").send_keys(password)
    b.driver.find_element(By.ID, "login").click()
    WebDriverWait(b.driver, 30).until(lambda d: "/login" not in d.current_url)


def fleet_rows(b: Browser) -> list[tuple[str, str]]:
    return [
        (tr.get_attribute("data-serial"), tr.get_attribute("data-state"))
        for tr in b.driver.find_elements(By.CSS_SELECTOR, "#fleet tr.gateway")
    ]


def fits_the_screen(b: Browser) -> bool:
    """Nothing makes the page wider than the phone (wide tables scroll in their box)."""
    return bool(
        b.driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    )


def test_log_in_see_the_late_gateway_and_log_out(hub: Hub, browser: Browser) -> None:
    late, fine = register(hub, "GW-LATE"), register(hub, "GW-FINE")
    register(hub, "GW-NEW")  # registered, never heard from since
    beat(hub, late, status("GW-LATE", 1))
    user, password = make_user(hub.db, "ops", admin=True)
    time.sleep(3.2)  # three of GW-LATE's 1 s intervals without a heartbeat
    beat(hub, fine, status("GW-FINE", 60))

    browser.get(hub.url + "/")
    assert "/login" in browser.driver.current_url  # no user: the login form
    browser.shot("login")
    log_in(browser, hub, user, password)
    rows = fleet_rows(browser)
    assert dict(rows) == {"GW-LATE": "late", "GW-FINE": "ok", "GW-NEW": "never"}
    assert [s for s, _ in rows] == ["GW-LATE", "GW-NEW", "GW-FINE"]  # problems first
    late_row = browser.driver.find_element(By.CSS_SELECTOR, 'tr[data-serial="GW-LATE"]')
    cells = [td.text for td in late_row.find_elements(By.TAG_NAME, "td")]
    assert cells[0] == "late"
    assert cells[2:5] == ["12 (1 batches)", "3", "42 %"]
    assert cells[5:7] == ["running", "normal_operation"]
    assert fits_the_screen(browser)
    browser.shot("fleet")

    # sortable: by gateway, then the other way
    browser.driver.find_element(By.LINK_TEXT, "Gateway").click()
    WebDriverWait(browser.driver, 30).until(lambda d: "sort=serial" in d.current_url)
    assert [s for s, _ in fleet_rows(browser)] == ["GW-FINE", "GW-LATE", "GW-NEW"]
    browser.driver.find_element(By.PARTIAL_LINK_TEXT, "Gateway").click()
    WebDriverWait(browser.driver, 30).until(lambda d: "desc=1" in d.current_url)
    assert [s for s, _ in fleet_rows(browser)] == ["GW-NEW", "GW-LATE", "GW-FINE"]

    browser.driver.find_element(By.ID, "logout").click()
    WebDriverWait(browser.driver, 30).until(lambda d: "/login" in d.current_url)
    browser.get(hub.url + "/")
    assert "/login" in browser.driver.current_url  # the session is gone
    browser.shot("logged-out")


def chart_data(b: Browser) -> dict[str, list[list[float]]]:
    """The data each uPlot chart of the page holds, by metric (once every chart is drawn)."""
    WebDriverWait(b.driver, 30).until(
        lambda d: d.execute_script(
            "return [...document.querySelectorAll('figure.chart')]"
            ".every(f => f.dataset.points !== undefined || f.dataset.error !== undefined)"
        )
    )
    errors = b.driver.execute_script(
        "return [...document.querySelectorAll('figure.chart')].map(f => f.dataset.error)"
        ".filter(e => e)"
    )
    assert not errors
    return dict(
        b.driver.execute_script(
            "return window.fieldgateCharts.map(u => [u.fieldgateMetric, u.data])"
        )
    )


def bucketed(
    rows: list[tuple[str, int, str, float]], start: int, end: int, every_secs: int
) -> dict[int, list[float]]:
    """The values of ``rows`` in [start, end) per bucket of ``every_secs`` from ``start``."""
    out: dict[int, list[float]] = {}
    for _, ts, _, v in rows:
        if start <= ts < end:
            out.setdefault(
                start + (ts - start) // (every_secs * 1000) * every_secs * 1000, []
            ).append(v)
    return out


def fetch_in_page(b: Browser, url: str) -> str:
    """GET ``url`` from the page with the browser's session (what a click downloads)."""
    return str(
        b.driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "fetch(arguments[0], {credentials: 'same-origin'})"
            ".then(r => r.text()).then(done, e => done('ERROR ' + e));",
            url,
        )
    )


def test_a_gateway_page_charts_its_metrics_and_downloads_csv(hub: Hub, browser: Browser) -> None:
    key = register(hub, "GW-C")
    beat(hub, key, status("GW-C", 60))
    # TH-1: "few" 600 readings (drawn raw), "many" 20,000 at 1 Hz (drawn as buckets)
    few = [("TH-1", T0 + 19_400_000 + i * 1000, "few", i * 0.5) for i in range(600)]
    many = [("TH-1", T0 + i * 1000, "many", float(i % 100)) for i in range(20_000)]
    st = open_storage(hub.db)
    try:
        st.ingest("GW-C", "b-1", few + many + [("TH-2", T0, "other", 1.0)])
    finally:
        st.close()
    user, password = make_user(hub.db, "ops", ["default"])
    log_in(browser, hub, user, password, "/gateways/GW-C?window=1d")
    assert browser.driver.find_element(By.ID, "state").text == "ok"
    latest = browser.driver.find_elements(By.CSS_SELECTOR, "#latest tbody tr")
    assert [r.find_element(By.TAG_NAME, "th").text for r in latest] == ["TH-1", "TH-1", "TH-2"]
    assert [r.find_elements(By.TAG_NAME, "td")[1].text for r in latest] == ["299.5", "99", "1"]

    charts = chart_data(browser)
    assert set(charts) == {"few", "many"}
    xs, values = charts["few"]  # raw: every reading, at its time
    assert xs == [ts / 1000 for _, ts, _, _ in few]
    assert values == [v for *_, v in few]
    # bucketed by the server: about CHART_BUCKETS buckets over the day, each the min,
    # mean and max of its readings (counted here from the readings themselves)
    end = T0 + 19_999_000 + 1  # the window ends at the device's latest reading
    buckets = bucketed(many, end - 86_400_000, end, -(-86_400 // CHART_BUCKETS))
    xs, maxes, means, mins = charts["many"]
    assert xs == [b / 1000 for b in sorted(buckets)]
    assert maxes == [max(buckets[b]) for b in sorted(buckets)]
    assert mins == [min(buckets[b]) for b in sorted(buckets)]
    assert means == pytest.approx([sum(buckets[b]) / len(buckets[b]) for b in sorted(buckets)])
    assert fits_the_screen(browser)
    browser.driver.execute_script("document.querySelector('figure.chart').scrollIntoView()")
    browser.shot("gateway-1d")

    # the CSV link of "few" holds exactly its readings in the window
    link = browser.driver.find_element(
        By.CSS_SELECTOR, 'figure[data-metric="few"] a.csv'
    ).get_attribute("href")
    text = fetch_in_page(browser, link)
    got = list(csv.reader(io.StringIO(text)))
    assert got[0] == ["ts", "value"]
    assert [(int(ts), float(v)) for ts, v in got[1:]] == [(ts, v) for _, ts, _, v in few]

    # a shorter window: the last hour holds 3,600 of "many" (bucketed) and all of "few"
    browser.driver.find_element(By.LINK_TEXT, "1h").click()
    WebDriverWait(browser.driver, 30).until(lambda d: "window=1h" in d.current_url)
    charts = chart_data(browser)
    assert len(charts["few"][0]) == 600
    buckets = bucketed(many, end - 3_600_000, end, -(-3600 // CHART_BUCKETS))
    assert charts["many"][0] == [b / 1000 for b in sorted(buckets)]
    browser.shot("gateway-1h")

    # a week: whole ten-minute buckets, read from the rollups
    browser.driver.find_element(By.LINK_TEXT, "7d").click()
    WebDriverWait(browser.driver, 30).until(lambda d: "window=7d" in d.current_url)
    charts = chart_data(browser)
    first = (end - 7 * 86_400_000) // ROLLUP_MS * ROLLUP_MS
    buckets = bucketed(many, first, end, ROLLUP_MS // 1000)
    xs, maxes, means, mins = charts["many"]
    assert xs == [b / 1000 for b in sorted(buckets)]
    assert (maxes, mins) == (
        [max(buckets[b]) for b in sorted(buckets)],
        [min(buckets[b]) for b in sorted(buckets)],
    )
    assert means == pytest.approx([sum(buckets[b]) / len(buckets[b]) for b in sorted(buckets)])

    # another device
    browser.driver.find_element(By.LINK_TEXT, "TH-2").click()
    WebDriverWait(browser.driver, 30).until(lambda d: "device=TH-2" in d.current_url)
    assert chart_data(browser) == {"other": [[T0 / 1000], [1.0]]}


def test_a_domain_limited_user_sees_only_their_gateways(hub: Hub, browser: Browser) -> None:
    for serial, domain in (("GW-N1", "north"), ("GW-N2", "north"), ("GW-S1", "south")):
        key = register(hub, serial)
        assert hub.cli("gateway", "domain", serial, domain).returncode == 0
        beat(hub, key, status(serial, 60))
    st = open_storage(hub.db)
    try:
        st.ingest("GW-S1", "b-1", [("TH-9", T0, "secret", 42.0)])
    finally:
        st.close()
    user, password = make_user(hub.db, "northerner", ["north"])
    log_in(browser, hub, user, password)
    assert sorted(s for s, _ in fleet_rows(browser)) == ["GW-N1", "GW-N2"]
    assert "GW-S1" not in browser.driver.page_source
    browser.get(hub.url + "/gateways/GW-S1")
    assert browser.driver.find_element(By.TAG_NAME, "h1").text == "404"
    assert "secret" not in browser.driver.page_source
    browser.shot("other-domain")
    # the browser logs the 404 itself as an error: the only one expected here
    assert [e for e in browser.js_errors() if "GW-S1 - " not in e or "404" not in e] == []
    browser.console.clear()
    r = requests.get(f"{hub.url}/gateways/GW-S1", auth=(user, password), timeout=30)
    assert r.status_code == 404
    r = requests.get(f"{hub.url}/gateways/GW-NOPE", auth=(user, password), timeout=30)
    assert r.status_code == 404
    r = requests.get(f"{hub.url}/gateways/GW-N1", auth=(user, password), timeout=30)
    assert r.status_code == 200
    assert r.headers["Content-Security-Policy"] == POLICY
    assert r.headers["X-Frame-Options"] == "DENY"


def test_the_login_form_wants_its_csrf_token_and_a_right_password(hub: Hub) -> None:
    user, password = make_user(hub.db, "ops", admin=True)
    s = requests.Session()
    page = s.get(f"{hub.url}/login", timeout=30)
    token = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert token
    r = s.post(f"{hub.url}/login", data={"name": user, "password": password}, timeout=30)
    assert r.status_code == 400  # no token: a form from elsewhere
    other = requests.Session()  # a token of another session is no good either
    r = other.post(
        f"{hub.url}/login",
        data={"name": user, "password": password, "csrf": token.group(1)},
        timeout=30,
    )
    assert r.status_code == 400
    r = s.post(
        f"{hub.url}/login",
        data={"name": user, "password": "wrong", "csrf": token.group(1)},
        timeout=30,
    )
    assert r.status_code == 401
    assert "wrong user name or password" in r.text
    r = s.post(
        f"{hub.url}/login",
        data={
            "name": user,
            "password": password,
            "csrf": token.group(1),
            "next": "//evil.example/",
        },
        timeout=30,
        allow_redirects=False,
    )
    assert r.status_code == 302
    assert r.headers["Location"] == "/"  # never to another site
    cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
    assert s.get(f"{hub.url}/", timeout=30).status_code == 200
    # logging out needs the token too
    assert s.post(f"{hub.url}/logout", timeout=30).status_code == 400
    assert s.get(f"{hub.url}/", timeout=30, allow_redirects=False).status_code == 200


def test_metrics_for_prometheus(hub: Hub) -> None:
    keys = {serial: register(hub, serial) for serial in ("GW-M1", "GW-M2")}
    assert hub.cli("gateway", "domain", "GW-M2", "south").returncode == 0
    beat(hub, keys["GW-M1"], status("GW-M1", 30))
    st = open_storage(hub.db)
    try:
        st.ingest("GW-M1", "b-1", [("TH-1", T0 + i, "t", 1.0) for i in range(25)])
        st.ingest("GW-M1", "b-2", [("TH-1", T0 + 100 + i, "t", 1.0) for i in range(5)])
    finally:
        st.close()
    assert requests.get(f"{hub.url}/metrics", timeout=30).status_code == 401
    admin = make_user(hub.db, "admin", admin=True)
    r = requests.get(f"{hub.url}/metrics", auth=admin, timeout=30)
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    types = {name: f.type for name, f in families.items()}
    assert types["fieldgate_hub_gateway_batches_stored"] == "counter"
    assert types["fieldgate_hub_gateway_backlog_readings"] == "gauge"

    def value(name: str, **labels: str) -> float | None:
        for s in families[name.removesuffix("_total")].samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
        return None

    assert value("fieldgate_hub_gateway_backlog_readings", serial="GW-M1", domain="default") == 12
    assert value("fieldgate_hub_gateway_rejected_readings", serial="GW-M1") == 3
    assert value("fieldgate_hub_gateway_pending_batches", serial="GW-M1") == 1
    assert value("fieldgate_hub_gateway_disk_used_percent", serial="GW-M1") == 41.5
    assert value("fieldgate_hub_gateway_upload_interval_seconds", serial="GW-M1") == 30
    assert value("fieldgate_hub_gateway_readings", serial="GW-M1") == 30
    assert value("fieldgate_hub_gateway_batches_stored_total", serial="GW-M1") == 2
    assert value("fieldgate_hub_gateway_late", serial="GW-M1") == 0
    assert 0 <= value("fieldgate_hub_gateway_last_heartbeat_age_seconds", serial="GW-M1") < 60
    # GW-M2 never sent a heartbeat: no age, no backlog; it counts as "never"
    assert value("fieldgate_hub_gateway_last_heartbeat_age_seconds", serial="GW-M2") is None
    assert value("fieldgate_hub_gateway_backlog_readings", serial="GW-M2") is None
    assert value("fieldgate_hub_gateways", state="never") == 1
    assert value("fieldgate_hub_gateways", state="ok") == 1
    assert value("fieldgate_hub_batches_stored_total") == 2
    assert value("fieldgate_hub_readings") == 30
    # a user of one domain sees its gateways only
    south = make_user(hub.db, "south", ["south"])
    r = requests.get(f"{hub.url}/metrics", auth=south, timeout=30)
    serials = {
        s.labels.get("serial")
        for f in text_string_to_metric_families(r.text)
        for s in f.samples
        if "serial" in s.labels
    }
    assert serials == {"GW-M2"}
    assert json.dumps(r.text).count("GW-M1") == 0
