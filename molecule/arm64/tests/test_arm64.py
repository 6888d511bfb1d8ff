"""An arm64 gateway deployed from the arm64 bundle, beside an amd64 hub.

gw is a Debian 12 arm64 host (what Raspberry Pi OS 64-bit is), its programs emulated by
qemu-user-static; the hub and the sensor host are amd64. site.yml gave each host the bundle of
its own architecture. The tests check that it did (the bundle's sha256 on each host, the
bundle's contents per architecture, the compiled modules of gw's glue are aarch64 code) and
that readings flow: the sensor publishes to gw, gw stores each reading once and the hub
holds it once.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "default" / "tests"))

from support import count, gateway_config, get_host, hub_db, publish, run_state, sql, wait_for

# The default scenario's check of both archives' contents, run here too (same bundle).
from test_0_bundle import MACHINES, archive_sha256
from test_0_bundle import test_bundle_holds_only_files_of_its_architecture as test_bundle  # noqa: F401

GW_VARS = yaml.safe_load(
    (Path(__file__).resolve().parents[1] / "inventory" / "host_vars" / "gw.yml").read_text()
)
BUNDLE_ON_HOST = "/var/cache/fieldgate-bundle"
AARCH64_ELF = 183  # e_machine of aarch64 code


@pytest.fixture(scope="module")
def gw() -> Any:
    return get_host("gw")


@pytest.fixture(scope="module")
def hub() -> Any:
    return get_host("hub")


@pytest.mark.parametrize(("name", "arch"), [("gw", "arm64"), ("hub", "amd64")])
def test_each_host_took_the_bundle_of_its_architecture(name: str, arch: str) -> None:
    host = get_host(name)
    assert host.check_output("uname -m") == MACHINES[arch]
    assert host.check_output("dpkg --print-architecture") == arch
    installed = host.file(f"{BUNDLE_ON_HOST}/.bundle.sha256").content_string.strip()
    assert installed == archive_sha256(arch)


ELF_MACHINES = """
import pathlib, sys
found = {}
for p in pathlib.Path(sys.argv[1]).rglob("*.so"):
    head = p.read_bytes()[:20]
    found[str(p)] = int.from_bytes(head[18:20], "little") if head[:4] == b"\\x7fELF" else -1
print(__import__("json").dumps(found))
"""


def test_glue_runs_aarch64_code_on_gw(gw: Any) -> None:
    venv = "/opt/fieldgate/venv"
    out = gw.check_output(
        f"{venv}/bin/python -c "
        + shlex.quote("import platform, yaml; print(platform.machine(), yaml.__with_libyaml__)")
    )
    assert out == "aarch64 True"  # PyYAML's C extension from the aarch64 wheel loads
    machines = json.loads(gw.check_output(f"python3 -c {shlex.quote(ELF_MACHINES)} {venv}"))
    assert machines, "no compiled module in the glue's virtualenv"
    assert set(machines.values()) == {AARCH64_ELF}, machines


def test_services_run_on_gw(gw: Any) -> None:
    for service in ("mosquitto", "supervisor", "shorewall"):
        assert gw.service(service).is_running, service
    states = {
        line.split()[0]: line.split()[1]
        for line in gw.run("supervisorctl status").stdout.splitlines()
        if line.strip()
    }
    assert states, "no supervisor programs"
    assert set(states.values()) == {"RUNNING"}, states
    assert gw.run("systemctl --failed --no-legend --plain").stdout.strip() == ""


def test_readings_reach_the_store_and_the_hub_exactly_once(gw: Any, hub: Any) -> None:
    net = run_state()
    cfg = gateway_config(gw)
    device = GW_VARS["fieldgate_devices"][0]
    n = 5
    base = int(time.time() * 1000)
    readings = [{"ts": base + i, "metrics": {"temp_c": 20.5 + i, "rh": 40 + i}} for i in range(n)]
    topic = f"{cfg['mqtt']['topic_prefix']}/{device['serial']}/readings"
    sensor = get_host("sensor")
    for _ in range(2):  # each reading published twice: the store keeps it once
        res = publish(sensor, net["hosts"]["gw"]["nets"]["sensor"],
                      (device["serial"], device["mqtt_password"]), topic, readings)  # fmt: skip
        assert res.rc == 0, res.stderr
    where = f"device = '{device['serial']}' AND ts BETWEEN {base} AND {base + n - 1}"
    db = cfg["store"]["path"]
    wait_for("the readings in gw's store", lambda: count(gw, db, where) == 2 * n, timeout=300)
    hub_path = hub_db(hub)
    hub_where = f"serial = '{GW_VARS['fieldgate_serial']}' AND {where}"
    wait_for("the readings at the hub", lambda: count(hub, hub_path, hub_where) >= 2 * n,
             timeout=300)  # fmt: skip
    query = f"SELECT metric, ts, value FROM readings WHERE {hub_where} ORDER BY ts, metric"  # noqa: S608
    rows = sql(hub, hub_path, query)
    assert len(rows) == 2 * n  # 5 readings x 2 metrics, each published twice
    assert rows[0] == {"metric": "rh", "ts": base, "value": 40.0}
    assert count(gw, db, where) == 2 * n
    # all of them went up: none lies above the last batch's id range (the store's unbatched
    # readings, fieldgate.membership.UNBATCHED; docs/store.md)
    unbatched = " AND id > (SELECT COALESCE(MAX(last_id), 0) FROM batches)"
    assert count(gw, db, where + unbatched) == 0
