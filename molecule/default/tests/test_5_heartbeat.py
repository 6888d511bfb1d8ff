"""Heartbeats on deployed hosts: every gateway's uploader posts its status to the hub every
upload interval (5 s in this inventory), so the hub lists each with a fresh heartbeat and
its status, the fleet page and /metrics call none of them late."""

from __future__ import annotations

import time
from typing import Any

import requests
from prometheus_client.parser import text_string_to_metric_families
from support import GATEWAYS, group_vars, host_vars


def get(net: dict[str, Any], path: str) -> requests.Response:
    url = f"http://{net['hosts']['hub']['nets']['mgmt']}:8080{path}"
    admin = (group_vars("hubs")["hub_admin_user"], group_vars("hubs")["hub_admin_password"])
    return requests.get(url, auth=admin, timeout=60)


def test_every_gateway_sends_its_status_every_interval(net):
    serials = {host_vars(gw)["fieldgate_serial"] for gw in GATEWAYS}
    interval = group_vars("gateways")["fieldgate_upload_interval_secs"]
    deadline = time.monotonic() + 6 * interval
    while True:
        gateways = {g["serial"]: g for g in get(net, "/api/v1/gateways").json()["gateways"]}
        beating = {s for s in serials if gateways.get(s, {}).get("last_heartbeat")}
        if beating == serials or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert beating == serials
    first = {s: gateways[s]["last_heartbeat"] for s in serials}
    for s in serials:
        status = gateways[s]["status"]
        assert status["site"] == s
        assert status["upload"]["interval_secs"] == interval
        assert status["collector"]["state"]["value"] == "running"
    time.sleep(2 * interval)  # more heartbeats came meanwhile
    gateways = {g["serial"]: g for g in get(net, "/api/v1/gateways").json()["gateways"]}
    assert all(gateways[s]["last_heartbeat"] > first[s] for s in serials)

    metrics = get(net, "/metrics")
    assert metrics.status_code == 200
    late = {
        s.labels["serial"]: s.value
        for f in text_string_to_metric_families(metrics.text)
        for s in f.samples
        if s.name == "fieldgate_hub_gateway_late"
    }
    assert all(late[s] == 0 for s in serials), late
    page = get(net, "/")
    assert page.status_code == 200
    for s in serials:
        assert f'data-serial="{s}" data-state="late"' not in page.text
        assert f'data-serial="{s}"' in page.text
