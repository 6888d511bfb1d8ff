"""A power cut, end to end, as apcupsd on the gateway sees it.

gw's apcupsd reads its UPS over the network (UPSTYPE net) from the stand-in UPS on the ups
host (molecule/shared/ups_standin.py), which reports mains. The ups host is also a sensor
(`fieldgate-probe stream`): it publishes numbered QoS 1 readings to gw throughout and records
each one the broker acknowledged (PUBACK). The test switches the UPS to battery and waits:
apcupsd records the events, its hook stops the glue (which commits and acknowledges what it
holds), the system shutdown stops the broker (which saves what it queued meanwhile), and gw
powers itself off. Mains come back, gw boots again, and then every acknowledged reading is
in the store exactly once.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "default" / "tests"))

from support import WAIT_SECS, gateway_config, get_host, hosts_tool, run_state, sql, wait_for

HOST_VARS = yaml.safe_load(
    (Path(__file__).resolve().parents[1] / "inventory/host_vars/gw.yml").read_text()
)
SENSOR_UNIT = "powercut-sensor"
ACKED_FILE = "/var/tmp/powercut-acked"  # noqa: S108 (a file on the sensor test host)
RATE = 20  # readings per second
MOSQUITTO_LOG = "/var/log/mosquitto/mosquitto.log"  # Debian's mosquitto.conf: epoch-stamped
# The order of one power cut in gw's journal: (identifier, start of the message).
SEQUENCE = [
    ("apcupsd", "Power failure."),
    ("apcupsd", "Running on UPS batteries."),
    ("apcupsd", "Reached run time limit on batteries."),
    ("apcupsd", "Initiating system shutdown!"),
    ("fieldgate-apcupsd", "stopping the fieldgate daemons before shutdown"),
    ("fieldgate-apcupsd", "fieldgate daemons stopped"),
    ("systemd", "Stopping mosquitto.service"),
    ("systemd", "Stopped mosquitto.service"),
]


def collector_running(host) -> bool:  # type: ignore[no-untyped-def]
    out = host.run("supervisorctl status").stdout
    return any(line.split()[0].endswith("collect") and line.split()[1] == "RUNNING"
               for line in out.splitlines() if line.strip())  # fmt: skip


def acked(ups) -> dict[int, int]:  # type: ignore[no-untyped-def]
    """seq -> epoch ms of its PUBACK, as the sensor recorded them."""
    text = ups.run(f"cat {ACKED_FILE}").stdout
    return {int(s): int(ms) for s, ms in (line.split() for line in text.splitlines())}


def summary(ups) -> str:  # type: ignore[no-untyped-def]
    """The sensor's last line: {"start_ms", "last_seq", "published", "acked", "not_sent"}."""
    cmd = f"journalctl -u {SENSOR_UNIT} -o cat --no-pager | grep '^{{' | tail -n 1"
    return ups.run(cmd).stdout.strip()


def stored(gw, db: str, device: str, since_ms: int) -> dict[int, int]:  # type: ignore[no-untyped-def]
    """seq -> how many rows of it the store holds (of the readings stamped after since_ms)."""
    rows = sql(gw, db, f"SELECT CAST(value AS INTEGER) AS seq, COUNT(*) AS n FROM readings "  # noqa: S608 (the test's own values)
                       f"WHERE device = '{device}' AND metric = 'seq' AND ts > {since_ms} "
                       "GROUP BY value")  # fmt: skip
    return {r["seq"]: r["n"] for r in rows}


def previous_boot(gw) -> list[tuple[float, str, str]]:  # type: ignore[no-untyped-def]
    """(epoch s, identifier, message) of the boot before this one, from gw's journal."""
    out = gw.check_output("journalctl -b -1 -o json --no-pager")
    entries = []
    for line in out.splitlines():
        e = json.loads(line)
        if isinstance(e.get("MESSAGE"), str):
            entries.append((int(e["__REALTIME_TIMESTAMP"]) / 1e6, e.get("SYSLOG_IDENTIFIER", ""),
                            e["MESSAGE"]))  # fmt: skip
    return entries


def in_order(entries: list[tuple[float, str, str]], after: float) -> list[float]:
    """When each step of SEQUENCE happened: the first match after the step before it."""
    times: list[float] = []
    previous = "the UPS went on battery"
    for ident, start in SEQUENCE:
        at = next((at for at, who, message in entries
                   if at >= after and who == ident and message.startswith(start)),
                  None)  # fmt: skip
        assert at is not None, f"gw's journal has no {ident} {start!r} after {previous}"
        times.append(at)
        after, previous = at, repr(start)
    return times


def test_power_cut_end_to_end() -> None:
    net = run_state()
    gw, ups = get_host("gw"), get_host("ups")
    cfg = gateway_config(gw)
    db, prefix = cfg["store"]["path"], cfg["mqtt"]["topic_prefix"]
    device = HOST_VARS["fieldgate_devices"][0]
    timeout = HOST_VARS["apcupsd_timeout"]
    ups_address = f"{net['hosts']['ups']['nets']['sensor']}:3551"

    # apcupsd on gw reads the stand-in over the network, on mains
    wait_for("gw's apcupsd on mains from the network UPS",
             lambda: gw.run("apcaccess -u -p STATUS").stdout.split()[:1] == ["ONLINE"])  # fmt: skip
    assert gw.check_output("apcaccess -u -p MASTER") == ups_address

    # the sensor publishes throughout
    ups.run(f"rm -f {ACKED_FILE}")
    since_ms = int(time.time() * 1000)
    argv = ["systemd-run", f"--unit={SENSOR_UNIT}", "--collect", "fieldgate-probe", "stream",
            net["hosts"]["gw"]["nets"]["sensor"], "1883", "-u", device["serial"],
            "-P", device["mqtt_password"], "-t", f"{prefix}/{device['serial']}/readings",
            "--acked", ACKED_FILE, "--rate", str(RATE), "--timeout", "2"]  # fmt: skip
    ups.check_output(shlex.join(argv))
    wait_for("the sensor's first readings in gw's store",
             lambda: len(stored(gw, db, device["serial"], since_ms)) >= 2 * RATE)  # fmt: skip

    # mains fail; gw shuts itself down
    t_onbatt = time.time()  # before: apcupsd may poll while the command returns
    ups.check_output("fieldgate-ups-standin set onbatt")
    hosts_tool("wait-off", "gw", "--timeout", str(WAIT_SECS))
    t_off = time.time()

    # mains come back; gw boots again (as a UPS that cut the power restores it)
    ups.check_output("fieldgate-ups-standin set online")
    hosts_tool("boot", "gw")
    t_boot = time.time()
    gw = get_host("gw")
    wait_for("the collector after the boot", lambda: collector_running(gw))
    wait_for("readings acknowledged after the boot",
             lambda: sum(ms / 1000 > t_boot for ms in acked(ups).values()) >= 2 * RATE)  # fmt: skip
    ups.check_output(f"systemctl stop {SENSOR_UNIT}")
    sent = json.loads(wait_for("the sensor's summary", lambda: summary(ups)))
    acks = acked(ups)
    assert len(acks) == sent["acked"]

    # every reading the broker acknowledged is in the store, exactly once
    wait_for("every acknowledged reading in gw's store",
             lambda: not set(acks) - set(stored(gw, db, device["serial"], since_ms)))  # fmt: skip
    rows = stored(gw, db, device["serial"], since_ms)
    missing = sorted(set(acks) - set(rows))
    twice = {seq: n for seq, n in rows.items() if n > 1}
    invented = sorted(seq for seq in rows if not 1 <= seq <= sent["last_seq"])
    assert not missing, f"{len(missing)} acknowledged readings lost, e.g. {missing[:10]}"
    assert not twice, f"readings stored more than once: {dict(list(twice.items())[:10])}"
    assert not invented, f"readings in the store the sensor never sent: {invented[:10]}"

    # the events were recorded in the store: powerout, onbattery, then timeout and doshutdown
    # (apcupsd runs apccontrol for these two at once, so their hooks race)
    power = [
        r["message"]
        for r in sql(gw, db, "SELECT message FROM events WHERE kind = 'power' ORDER BY id")
    ]
    cut = power[len(power) - 1 - power[::-1].index("powerout") :] if "powerout" in power else []
    assert cut[:2] == ["powerout", "onbattery"], power
    assert {"timeout", "doshutdown"} <= set(cut[2:]), power

    # the shutdown went in this order, and only after apcupsd_timeout seconds on battery
    times = in_order(previous_boot(gw), after=t_onbatt)
    on_battery, time_limit = times[1], times[2]
    assert time_limit - on_battery >= timeout
    glue_stopped = times[5]
    queued = sum(ms / 1000 > glue_stopped for ms in acks.values() if ms / 1000 < t_off)

    # the broker saved what it had queued when the shutdown stopped it
    saved = [int(line.split(":")[0]) for line in gw.file(MOSQUITTO_LOG).content_string.splitlines()
             if "Saving in-memory database" in line]  # fmt: skip
    assert any(int(glue_stopped) <= at <= t_off for at in saved), (glue_stopped, t_off, saved)

    figures = {
        "readings published": sent["published"],
        "acknowledged (PUBACK)": len(acks),
        "acknowledged while the glue was stopped, before the halt": queued,
        "stored": len(rows),
        "acknowledged but not stored": len(missing),
        "stored twice": len(twice),
        "published, not acknowledged (broker going down)": sent["published"] - len(acks),
        "not sent (gateway unreachable)": sent["not_sent"],
        "s from ONBATT to apcupsd's power failure": round(times[0] - t_onbatt, 1),
        "s from power failure to on batteries": round(on_battery - times[0], 1),
        "s from on batteries to the time limit": round(time_limit - on_battery, 1),
        "s for the hook to stop the glue": round(glue_stopped - times[4], 1),
        "s from glue stopped to broker stopped": round(times[7] - glue_stopped, 1),
        "s from the shutdown to powered off": round(t_off - times[3], 1),
        "s from ONBATT to powered off": round(t_off - t_onbatt, 1),
    }
    print("\npower cut figures:\n" + "\n".join(f"  {k}: {v}" for k, v in figures.items()))
