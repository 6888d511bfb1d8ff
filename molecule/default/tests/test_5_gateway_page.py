"""The gateway page ("fieldgate web", enabled on gw1 only): served on the management address,
reachable from the management side (this machine), dropped from the sensor network; and the
Prometheus textfile the timer writes, read with Prometheus' own parser."""

from __future__ import annotations

import json
import urllib.request

from prometheus_client.parser import text_string_to_metric_families
from support import get_host, probe_from, probe_here, send_readings, wait_for

PORT = 8081  # fieldgate_web_port's default
TEXTFILE = "/var/lib/prometheus/node-exporter/fieldgate.prom"


def page(address: str, path: str) -> tuple[int, str]:
    with urllib.request.urlopen(f"http://{address}:{PORT}{path}", timeout=10) as r:
        return r.status, r.read().decode()


def test_the_page_listens_on_the_management_address_only(net):
    gw1 = get_host("gw1")
    listening = [s for s in gw1.socket.get_listening_sockets() if s.endswith(f":{PORT}")]
    assert listening == [f"tcp://{net['hosts']['gw1']['nets']['mgmt']}:{PORT}"]
    assert gw1.supervisor("fieldgate:fieldgate-web").is_running


def test_the_page_shows_the_latest_reading_from_the_management_side(sensor, net):
    sent = send_readings(sensor, net, "gw1", n=3, repeat=1)
    address = net["hosts"]["gw1"]["nets"]["mgmt"]

    def shown() -> dict | None:
        data = json.loads(page(address, "/api/v1/latest")[1])
        devices = {d["device"]: d for d in data["devices"]}
        d = devices.get(sent["device"])
        return d if d and d["last_ts"] >= sent["base"] + sent["n"] - 1 else None

    device = wait_for("the readings on the gateway page", shown)
    assert device["metrics"]["temp_c"]["value"] == 22.5  # the last of the three
    status, html = page(address, "/")
    assert status == 200 and f'data-device="{sent["device"]}"' in html
    status, html = page(address, f"/devices/{sent['device']}")
    assert status == 200 and "uPlot.iife.min.js" in html
    status, text = page(address, "/api/v1/status")
    assert json.loads(text)["site"] == sent["serial"]


def test_the_page_is_dropped_from_the_sensor_network(sensor, net):
    # the sensor zone reaches the gateway only on its sensor address: the firewall drops it
    assert probe_from(sensor, net["hosts"]["gw1"]["nets"]["sensor"], PORT) == "filtered"
    # and the management zone reaches it (the port is open, the answer comes)
    assert probe_here(net["hosts"]["gw1"]["nets"]["mgmt"], PORT) == "open"


def test_the_page_is_off_by_default(net):
    assert probe_here(net["hosts"]["gw2"]["nets"]["mgmt"], PORT) == "filtered"
    gw2 = get_host("gw2")
    assert not [s for s in gw2.socket.get_listening_sockets() if s.endswith(f":{PORT}")]


def test_the_prometheus_textfile_is_written_and_parses(net):
    gw1 = get_host("gw1")
    assert gw1.service("fieldgate-prometheus.timer").is_enabled
    wait_for("the metrics file", lambda: gw1.file(TEXTFILE).exists)
    f = gw1.file(TEXTFILE)
    assert f.mode == 0o644 and f.user == "root"
    families = {m.name: m for m in text_string_to_metric_families(f.content_string)}
    assert families["fieldgate_info"].samples[0].labels == {"site": "MOL-GW-0001"}
    assert families["fieldgate_store_exists"].samples[0].value == 1
    assert families["fieldgate_collector_state"].samples[0].labels == {"state": "running"}
    assert "fieldgate_input_messages" in families and "fieldgate_backlog_readings" in families
    # no temporary file is left beside it; gw2 has no timer
    assert gw1.check_output("ls -A /var/lib/prometheus/node-exporter") == "fieldgate.prom"
    assert not get_host("gw2").file("/etc/systemd/system/fieldgate-prometheus.timer").exists
