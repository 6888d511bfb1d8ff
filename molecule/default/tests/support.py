"""Helpers for the default scenario's testinfra tests.

The tests talk to the converged test hosts over SSH (testinfra's ansible backend, Molecule's
inventory), probe the firewall from other hosts and from this machine, and read the
gateways' and the hub's SQLite files with the sqlite3 shell on the host that owns them.
What a test needs to know about a gateway comes from its rendered configuration
(/etc/fieldgate/fieldgate.yaml, CONTRACT §2) and from the scenario's inventory.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import testinfra
import yaml

EPHEMERAL = Path(os.environ.get("MOLECULE_EPHEMERAL_DIRECTORY", "."))
INVENTORY = os.environ.get("MOLECULE_INVENTORY_FILE", "")
TESTHOSTS = Path(__file__).resolve().parents[2] / "shared" / "testhosts.py"
CONFIG_PATH = "/etc/fieldgate/fieldgate.yaml"
FIELDGATE = "/opt/fieldgate/venv/bin/fieldgate"  # the fieldgate role's virtualenv
GATEWAYS = ["gw1", "gw2"]
# How long a test waits for something that happens asynchronously (collector commit,
# upload cycle, export); generous because two cores are shared with other test runs.
WAIT_SECS = 180

T = TypeVar("T")


def get_host(name: str) -> Any:
    """A testinfra host of this scenario by inventory name."""
    return testinfra.get_host(f"ansible://{name}", ansible_inventory=INVENTORY)


def run_state() -> dict[str, Any]:
    """The run's state written by testhosts.py: addresses, networks, USB images."""
    return json.loads((EPHEMERAL / "testhosts" / "state.json").read_text())


def host_vars(name: str) -> dict[str, Any]:
    """The scenario's literal host_vars of a host (secrets the tests must look for)."""
    path = Path(__file__).resolve().parents[1] / "inventory" / "host_vars" / f"{name}.yml"
    return yaml.safe_load(path.read_text()) or {}


def group_vars(name: str) -> dict[str, Any]:
    path = Path(__file__).resolve().parents[1] / "inventory" / "group_vars" / f"{name}.yml"
    return yaml.safe_load(path.read_text()) or {}


def gateway_config(host: Any) -> dict[str, Any]:
    """The gateway's rendered fieldgate configuration."""
    return yaml.safe_load(host.file(CONFIG_PATH).content_string)


def sql(host: Any, db: str, query: str) -> list[dict[str, Any]]:
    """Rows of a read-only query against a database on the host: an SQLite file, or the
    hub's PostgreSQL database (a postgresql:// URL of the host's own server, read as the
    postgres superuser over its Unix socket)."""
    if db.startswith("postgresql://"):
        name = urlsplit(db).path.lstrip("/")
        wrapped = f"SELECT COALESCE(json_agg(t), '[]') FROM ({query}) t"  # noqa: S608 (the caller's query, wrapped)
        out = host.check_output(
            "PGOPTIONS='-c default_transaction_read_only=on' runuser -u postgres --"
            " psql --no-psqlrc --quiet -At -v ON_ERROR_STOP=1 -d %s -c %s",
            name,
            wrapped,
        )
        return json.loads(out)  # json_agg may span lines
    out = host.check_output("sqlite3 -readonly -json %s %s", db, query)
    return json.loads(out) if out.strip() else []


def wait_for(what: str, probe: Callable[[], T], timeout: float = WAIT_SECS) -> T:
    """Poll until probe() returns something truthy; fail naming what never happened."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout:.0f} s waiting for {what}")
        time.sleep(1)


def probe_from(host: Any, address: str, port: int) -> str:
    """Port state seen from a test host: open, closed or filtered (dropped)."""
    return host.check_output("fieldgate-probe port %s %s --timeout 2", address, str(port))


def probe_here(address: str, port: int, timeout: float = 2) -> str:
    """Port state seen from this machine (the management side)."""
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return "open"
    except ConnectionRefusedError:
        return "closed"
    except TimeoutError:
        return "filtered"


def publish(sensor: Any, address: str, login: tuple[str, str], topic: str,
            messages: list[dict[str, Any]]) -> Any:  # fmt: skip
    """Publish JSON readings (QoS 1) from the sensor host as ``login`` (user, password);
    returns testinfra's command result."""
    user, password = login
    args = " ".join(f"-m {shlex.quote(json.dumps(m))}" for m in messages)
    client = f"probe-{int(time.time() * 1000)}"
    return sensor.run(
        f"fieldgate-probe publish {shlex.quote(address)} 1883 -u {shlex.quote(user)} "
        f"-P {shlex.quote(password)} -t {shlex.quote(topic)} -i {client} {args}"
    )


def device_password(gateway: str, serial: str) -> str:
    """The password of a device's or a bridge's broker account (the scenario's host_vars)."""
    hv = host_vars(gateway)
    for device in hv["fieldgate_devices"]:
        if device["serial"] == serial and "mqtt_password" in device:
            return device["mqtt_password"]
    for account in hv.get("fieldgate_mqtt_accounts", []):
        if account["username"] == serial:
            return account["password"]
    raise KeyError(f"no MQTT account for {serial} on {gateway}")


def native_devices(gateway: str) -> list[str]:
    """Serials of the gateway's devices that publish fieldgate's own payloads (an account of
    their own, no device topics)."""
    return [
        d["serial"]
        for d in host_vars(gateway)["fieldgate_devices"]
        if d.get("mqtt_password") and d.get("mqtt_account", True) and not d.get("mqtt_topics")
    ]


def hub_serve_args(hub: Any) -> list[str]:
    """The command line of the running `fieldgate hub serve`."""
    return hub.check_output("pgrep -a -f 'fieldgate hub serve' | grep -v pgrep | head -n 1").split()


def hub_db(hub: Any) -> str:
    """The hub's database, from the running `fieldgate hub serve --db DB` (CONTRACT §3):
    a SQLite path or a postgresql:// URL."""
    args = hub_serve_args(hub)
    return args[args.index("--db") + 1]


def hub_db_args(hub: Any) -> list[str]:
    """The database options of the running hub (--db, and --db-password-file with
    PostgreSQL), for other `fieldgate hub` commands on the hub host."""
    args = hub_serve_args(hub)
    out = ["--db", args[args.index("--db") + 1]]
    if "--db-password-file" in args:
        out += ["--db-password-file", args[args.index("--db-password-file") + 1]]
    return out


def hub_command(hub: Any, *args: str, stdin: str | None = None) -> str:
    """Run `fieldgate hub ARGS… <database options>` as the hub's user; its output."""
    cmd = ["runuser", "-u", "fieldgate-hub", "--", FIELDGATE, "hub", *args, *hub_db_args(hub)]
    line = shlex.join(cmd)
    if stdin is not None:
        line = f"printf '%s\\n' {shlex.quote(stdin)} | {line}"
    return hub.check_output(line)


def hosts_tool(*args: str) -> None:
    """Run the test-host tool against this run (e.g. restart a host)."""
    subprocess.run(
        ["python3", str(TESTHOSTS), "--run-dir", str(EPHEMERAL / "testhosts"), *args],
        check=True,
    )


def now_ms() -> int:
    return int(time.time() * 1000)


def send_readings(
    sensor: Any, net: dict[str, Any], gw: str, n: int = 5, repeat: int = 2
) -> dict[str, Any]:
    """Publish n two-metric readings of the gateway's last native device from the sensor host.

    Each message is sent `repeat` times (the duplicates must collapse). Returns what a test
    needs to find them again: device, serial, ts range, a WHERE clause, the store path.
    """
    host = get_host(gw)
    cfg = gateway_config(host)
    device = native_devices(gw)[-1]
    base = now_ms()
    readings = [{"ts": base + i, "metrics": {"temp_c": 20.5 + i, "rh": 40 + i}} for i in range(n)]
    topic = f"{cfg['mqtt']['topic_prefix']}/{device}/readings"
    address = net["hosts"][gw]["nets"]["sensor"]
    for _ in range(repeat):
        res = publish(sensor, address, (device, device_password(gw, device)), topic, readings)
        assert res.rc == 0, res.stderr
    return {
        "host": host, "serial": cfg["site"]["serial"], "device": device, "base": base, "n": n,
        "db": cfg["store"]["path"],
        "where": f"device = '{device}' AND ts BETWEEN {base} AND {base + n - 1}",
    }  # fmt: skip


def count(host: Any, db: str, where: str) -> int:
    return sql(host, db, f"SELECT COUNT(*) AS n FROM readings WHERE {where}")[0]["n"]  # noqa: S608 (the test's own values)


def await_at_hub(hub: Any, sent: dict[str, Any]) -> list[dict[str, Any]]:
    """Wait until the sent readings are stored at the gateway and at the hub; the hub's rows."""
    rows = 2 * sent["n"]  # two metrics per reading
    wait_for(
        "the readings in the gateway store",
        lambda: count(sent["host"], sent["db"], sent["where"]) == rows,
    )
    hub_path = hub_db(hub)
    hub_where = f"serial = '{sent['serial']}' AND {sent['where']}"
    wait_for("the readings at the hub", lambda: count(hub, hub_path, hub_where) >= rows)
    return sql(
        hub,
        hub_path,
        f"SELECT metric, ts, value FROM readings WHERE {hub_where} ORDER BY ts, metric",  # noqa: S608 (the test's own values)
    )
