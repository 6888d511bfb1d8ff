"""The hub's read API: a user limited to one gateway's domain reads that gateway's readings
and nothing of the other gateway; the admin of the inventory reads both; nobody reads
without credentials."""

from __future__ import annotations

from typing import Any

import requests
from support import GATEWAYS, await_at_hub, group_vars, hub_command, send_readings

READER = ("molecule-reader", "molecule-reader-Qp5sW1")


def get(net: dict[str, Any], path: str, auth: tuple[str, str] | None, **params: Any) -> Any:
    url = f"http://{net['hosts']['hub']['nets']['mgmt']}:8080{path}"
    return requests.get(url, params=params, auth=auth, timeout=60)


def readings(net: dict[str, Any], sent: dict[str, Any], auth: tuple[str, str]) -> Any:
    return get(
        net,
        "/api/v1/readings",
        auth,
        serial=sent["serial"],
        device=sent["device"],
        metric="rh",
        **{"from": sent["base"], "to": sent["base"] + sent["n"]},
    )


def test_a_domain_limited_user_reads_only_its_gateways_readings(sensor, hub, net):
    sent = {gw: send_readings(sensor, net, gw, n=3, repeat=1) for gw in GATEWAYS}
    for s in sent.values():
        await_at_hub(hub, s)
    mine, other = sent["gw1"], sent["gw2"]
    hub_command(hub, "gateway", "domain", mine["serial"], "molecule-site-one")
    hub_command(
        hub, "user", "add", READER[0], "--domains", "molecule-site-one", "--update",
        stdin=READER[1],
    )  # fmt: skip

    r = get(net, "/api/v1/gateways", READER)
    assert r.status_code == 200, r.text
    assert [g["serial"] for g in r.json()["gateways"]] == [mine["serial"]]
    assert r.json()["gateways"][0]["domain"] == "molecule-site-one"
    r = readings(net, mine, READER)
    assert r.status_code == 200, r.text
    assert r.json()["readings"] == [
        {"ts": mine["base"] + i, "value": 40.0 + i} for i in range(mine["n"])
    ]
    for path, params in (
        ("/api/v1/gateways/" + other["serial"], {}),
        ("/api/v1/extent", {"serial": other["serial"]}),
    ):
        assert get(net, path, READER, **params).status_code == 404, path
    assert readings(net, other, READER).status_code == 404

    admin = (group_vars("hubs")["hub_admin_user"], group_vars("hubs")["hub_admin_password"])
    r = get(net, "/api/v1/gateways", admin)
    assert {g["serial"] for g in r.json()["gateways"]} >= {mine["serial"], other["serial"]}
    assert len(readings(net, other, admin).json()["readings"]) == other["n"]

    assert get(net, "/api/v1/gateways", None).status_code == 401
    assert get(net, "/api/v1/readings", None, serial=mine["serial"]).status_code == 401
