"""Heartbeats (docs/contract.md §11): ``POST /api/v1/heartbeat`` at a real hub on both
backends, and the real uploader sending one every interval, with or without batches."""

from __future__ import annotations

import json
import time
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families
from support import ConfigFactory, Hub, make_user, start_fieldgate, stop_process, wait_until
from test_hub import register

from fieldgate import store
from fieldgate.config import load_config
from fieldgate.hub.uploads import MAX_HEARTBEAT_BYTES

T0 = 1_767_225_600_000


def beat(hub: Hub, key: str, body: bytes | dict, **headers: str) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(
        f"{hub.url}/api/v1/heartbeat",
        data=data,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json", **headers},
        timeout=30,
    )


def summary(hub: Hub, serial: str, auth: tuple[str, str]) -> dict:  # type: ignore[type-arg]
    r = requests.get(f"{hub.url}/api/v1/gateways/{serial}", auth=auth, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def gauges(hub: Hub, auth: tuple[str, str]) -> dict[tuple[str, str], float]:
    """(metric name, serial) -> value of /metrics' per-gateway samples."""
    r = requests.get(f"{hub.url}/metrics", auth=auth, timeout=30)
    assert r.status_code == 200, r.text
    return {
        (s.name, s.labels["serial"]): s.value
        for fam in text_string_to_metric_families(r.text)
        for s in fam.samples
        if "serial" in s.labels
    }


def test_the_hub_keeps_the_last_heartbeat(hub: Hub) -> None:
    key = register(hub, "GW-HB")
    admin = make_user(hub.db, "admin", admin=True)
    assert summary(hub, "GW-HB", admin)["last_heartbeat"] is None
    status = {"site": "GW-HB", "upload": {"interval_secs": 30}, "readings": {"unbatched": 7}}
    r = beat(hub, key, status)
    assert r.status_code == 204, r.text
    got = summary(hub, "GW-HB", admin)
    assert got["status"] == status
    assert got["last_heartbeat"] is not None
    # the next one replaces it
    assert beat(hub, key, {**status, "readings": {"unbatched": 0}}).status_code == 204
    assert summary(hub, "GW-HB", admin)["status"]["readings"] == {"unbatched": 0}


def test_heartbeats_are_refused_without_a_key_or_a_status(hub: Hub) -> None:
    key = register(hub, "GW-HB")
    admin = make_user(hub.db, "admin", admin=True)
    assert beat(hub, "not-a-key", {}).status_code == 401
    r = requests.post(f"{hub.url}/api/v1/heartbeat", json={}, timeout=30)
    assert r.status_code == 401
    for body in (b"[1, 2]", b"not json", b"\xff\xfe", b"[" * 50_000):
        r = beat(hub, key, body)
        assert r.status_code == 400, (body[:10], r.text)
        assert "JSON object" in r.json()["error"]
    big = {"pad": "x" * MAX_HEARTBEAT_BYTES}
    r = beat(hub, key, big)
    assert r.status_code == 413
    assert str(MAX_HEARTBEAT_BYTES) in r.json()["error"]
    # chunked, without a length: the limit still holds
    chunks = (json.dumps(big).encode()[i : i + 8192] for i in range(0, 70_000, 8192))
    r = requests.post(
        f"{hub.url}/api/v1/heartbeat",
        data=chunks,
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert r.status_code == 413
    assert summary(hub, "GW-HB", admin)["last_heartbeat"] is None
    assert "Traceback" not in hub.log_text()


def test_an_idle_gateway_stays_alive_and_a_stopped_one_turns_late(
    hub: Hub, config_file: ConfigFactory, tmp_path: Path
) -> None:
    """Nothing to upload: the uploader still beats every interval (2 s) and the hub calls
    the gateway alive; stopped, it turns late once 3 intervals passed without one."""
    config = config_file(overrides={"upload": {"url": hub.url, "interval_secs": 2}})
    hub.register(config)
    admin = make_user(hub.db, "admin", admin=True)
    proc = start_fieldgate("upload", config=config, log=tmp_path / "upload.log")
    try:
        wait_until(
            lambda: summary(hub, "GW-TEST", admin)["last_heartbeat"] is not None,
            what="the first heartbeat",
        )
        first = summary(hub, "GW-TEST", admin)
        assert first["status"]["site"] == "GW-TEST"
        assert first["status"]["upload"]["interval_secs"] == 2
        assert first["batches"] == 0 and first["rows"] == 0
        wait_until(
            lambda: summary(hub, "GW-TEST", admin)["last_heartbeat"] != first["last_heartbeat"],
            what="the next heartbeat",
        )
        # alive for longer than 3 intervals without a batch
        for _ in range(8):
            assert gauges(hub, admin)[("fieldgate_hub_gateway_late", "GW-TEST")] == 0
            time.sleep(1)
    finally:
        assert stop_process(proc) == 0
    assert gauges(hub, admin)[("fieldgate_hub_gateway_late", "GW-TEST")] == 0
    wait_until(
        lambda: gauges(hub, admin)[("fieldgate_hub_gateway_late", "GW-TEST")] == 1,
        timeout=30,
        what="the stopped gateway to turn late",
    )
    g = gauges(hub, admin)
    assert g[("fieldgate_hub_gateway_last_heartbeat_age_seconds", "GW-TEST")] >= 3 * 2
    assert g[("fieldgate_hub_gateway_silent", "GW-TEST")] == 0


def test_a_refused_heartbeat_never_stops_the_uploads(
    hub: Hub, config_file: ConfigFactory, tmp_path: Path
) -> None:
    """The hub refuses every heartbeat (the status has grown past its limit: a huge event
    message); the batches still go, and the refusal is logged once."""
    config = config_file(overrides={"upload": {"url": hub.url, "interval_secs": 1}})
    cfg = load_config(str(config))
    hub.register(config)
    conn = store.open_store(cfg.store.path, "GW-TEST")
    with store.transaction(conn):
        store.add_event(conn, "test", "x" * (MAX_HEARTBEAT_BYTES + 10))
        store.insert_readings(
            conn, [("TH-001", T0 + i * 1000, "t", float(i)) for i in range(150)], source="t"
        )
    log = tmp_path / "upload.log"
    proc = start_fieldgate("upload", config=config, log=log)
    try:
        wait_until(lambda: hub.readings("GW-TEST") == 150, what="the first batch")
        wait_until(lambda: "heartbeat not sent" in log.read_text(), what="the refusal")
        with store.transaction(conn):
            # the refused status grows by a few hundred bytes: the same failure, not news
            store.add_event(conn, "test", "y" * 300)
            store.insert_readings(
                conn,
                [("TH-001", T0 + i * 1000, "t", float(i)) for i in range(150, 200)],
                source="t",
            )
        wait_until(lambda: hub.readings("GW-TEST") == 200, what="the batch after the refusals")
        time.sleep(2.5)  # more refused heartbeats
    finally:
        conn.close()
        assert stop_process(proc) == 0
    text = log.read_text()
    assert text.count("heartbeat not sent") == 1, text
    assert "413" in text
    admin = make_user(hub.db, "admin", admin=True)
    assert summary(hub, "GW-TEST", admin)["last_heartbeat"] is None


def test_the_fleet_shows_the_last_pull_run_and_a_failed_one_needs_attention(hub: Hub) -> None:
    key = register(hub, "GW-PULL")
    admin = make_user(hub.db, "admin", admin=True)
    status = {
        "site": "GW-PULL",
        "upload": {"interval_secs": 300},
        "collector": {"state": {"value": "running"}},
        "pull": {"state": "recorded", "result": "failed", "changed": 2, "age_secs": 60.0},
    }
    assert beat(hub, key, status).status_code == 204
    page = requests.get(f"{hub.url}/", auth=admin, timeout=30).text
    assert 'data-serial="GW-PULL" data-state="attention"' in page
    assert '<td class="pull">pull failed, 2 changed, ' in page
    status["pull"] = {**status["pull"], "result": "ok", "changed": 0}
    assert beat(hub, key, status).status_code == 204
    page = requests.get(f"{hub.url}/", auth=admin, timeout=30).text
    assert 'data-serial="GW-PULL" data-state="ok"' in page
    assert '<td class="pull">pull ok, 0 changed, ' in page
    # a gateway converged by push (no pull run recorded) shows none
    status["pull"] = {"state": "none"}
    assert beat(hub, key, status).status_code == 204
    page = requests.get(f"{hub.url}/", auth=admin, timeout=30).text
    assert '<td class="pull">\u2013</td>' in page
