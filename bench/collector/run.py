"""Benchmark: draining a broker backlog with ``fieldgate collect`` against its baselines.

Starts a real Mosquitto that loads what ``fieldgate broker-conf`` prints (the arrival-stamp
plugin; persistence on, ``max_queued_messages 0`` so nothing is dropped,
``max_inflight_messages 2000``), registers persistent sessions, publishes the same backlog of
N QoS 1 messages (default 100,000) of two metrics each in three forms, and times in one run:

- ``mosquitto_sub -c -q 1 -C N``: the broker's delivery limit (C client, acks each message);
- SQLite's own insert ceiling: the 2N readings of the native backlog, built beforehand,
  into a store of the collector's schema and durability (WAL, ``synchronous=FULL``),
  ``executemany`` of 1,000 rows per transaction;
- mq-bridge (``mqb_peer.py``; PyPI ``mq-bridge``, a dev requirement): its Rust MQTT core
  on a persistent v5 session, batches of 1,000 parsed with ``json.loads`` and inserted
  with one ``executemany`` into the same schema, acknowledged after the commit;
- ``fieldgate collect``: the native form (``fieldgate/TH-001/readings``), the Tasmota form
  (``tele/TH-001/SENSOR``: ``Time`` in each payload, a ``TempUnit`` string to skip) and the
  Zigbee2MQTT form (``zigbee2mqtt/TH-001``: no time, so every reading takes the broker's
  arrival stamp), each from its own MQTT v5 session, until the store holds 2N readings;
- ``fieldgate collect`` before this change (``--before REF``, default ``main``, run from a
  ``git archive`` of that commit's glue with this venv; skipped when REF's glue is this
  one): the native form;
- a naive collector (paho, auto-ack, one SQLite commit per message: the usual pattern).

Prints msgs/s for each, the CPU each collector process spent per message, and the ratios
(targets: fieldgate native >= 1.0x mq-bridge and >= 0.5x the SQLite ceiling, >= 0.3x
mosquitto_sub and >= 5x the naive collector; tasmota and zigbee2mqtt each >= 0.8x native;
on a machine busy with other work the wall-clock rates swing, so the ratios of CPU time
per message are printed beside them), checks every message was stored exactly once, and
reports the native collector's peak summed PSS (collector + store writer, target <= 40 MB;
VmHWM, printed too, counts the forked writer's shared pages twice). The naive drain is
slow (one fsync per message), so by default it runs for at most ``--naive-secs`` and its
rate is measured on what it drained; ``--naive-secs 0`` drains it completely. Exit status
1 when a target is missed.

``--formats`` runs the three forms' drains alone (no baselines) and prints issue 16's
two ratios.

Run from the repository root:

    .venv/bin/python bench/collector/run.py [--messages N] [--naive-secs S] [--before REF]
    .venv/bin/python bench/collector/run.py --formats [--messages N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import yaml
from fieldgate import store
from fieldgate.readings import INSERT_READING_SQL

FIELDGATE = str(Path(sys.executable).with_name("fieldgate"))
REPO = Path(__file__).resolve().parents[2]
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
TICKS = os.sysconf("SC_CLK_TCK")
MQB_PEER = Path(__file__).with_name("mqb_peer.py")
#: Rows per transaction of the SQLite ceiling.
CEILING_ROWS = 1000


@dataclass(frozen=True)
class Form:
    """One form of the backlog: its topic, how the i-th payload looks, its input."""

    name: str
    topic: str
    prefix: (
        str  # the collector's topic_prefix (distinct, so native topics do not cross)
    )
    inputs: tuple[dict, ...]

    def payload(self, i: int) -> str:
        t = 20 + i % 10
        if self.name == "tasmota":
            when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(T0 // 1000 + i))
            return json.dumps(
                {
                    "Time": when,
                    "AM2301": {"Temperature": t, "Humidity": 45.5},
                    "TempUnit": "C",
                }
            )
        if self.name == "zigbee2mqtt":
            return json.dumps({"temperature": t, "humidity": 45.5})
        return json.dumps(
            {"ts": T0 + i, "metrics": {"temperature": t, "humidity": 45.5}}
        )


NATIVE = Form("native", "fieldgate/TH-001/readings", "fieldgate", ())
TASMOTA = Form(
    "tasmota",
    "tele/TH-001/SENSOR",
    "fg-t",
    ({"topic": "tele/{device}/SENSOR", "format": "tasmota"},),
)
Z2M = Form(
    "zigbee2mqtt",
    "zigbee2mqtt/TH-001",
    "fg-z",
    ({"topic": "zigbee2mqtt/{device}", "format": "zigbee2mqtt"},),
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"bench: mosquitto did not listen on port {port}")


def broker_conf() -> str:
    p = subprocess.run(
        [FIELDGATE, "broker-conf"], capture_output=True, text=True, check=False
    )
    if p.returncode != 0:
        raise SystemExit(f"bench: fieldgate broker-conf failed: {p.stderr.strip()}")
    return p.stdout


def start_broker(work: Path, port: int) -> subprocess.Popen[bytes]:
    conf = work / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\n"
        "allow_anonymous true\n"
        "persistence true\n"
        f"persistence_location {work}/\n"
        "max_queued_messages 0\n"
        "max_queued_bytes 0\n"
        "max_inflight_messages 2000\n"
        + ("user root\n" if os.geteuid() == 0 else "")
        + f"log_dest file {work}/mosquitto.log\n"
        + broker_conf()
    )
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stderr=subprocess.DEVNULL)
    wait_for_port(port)
    return proc


def session_sub(port: int, client_id: str, topic: str) -> list[str]:
    """``mosquitto_sub`` on the persistent QoS 1 session ``client_id`` (MQTT 3.1.1)."""
    return [
        "mosquitto_sub",
        "-p",
        str(port),
        "-c",
        "-i",
        client_id,
        "-q",
        "1",
        "-t",
        topic,
    ]


def register_v311_session(port: int, client_id: str, topic: str) -> None:
    subprocess.run([*session_sub(port, client_id, topic), "-E"], check=True)


def publish_backlog(port: int, form: Form, n: int) -> float:
    """Publish n QoS 1 messages of a form, waiting for every PUBACK; returns seconds.

    (``mosquitto_pub -l`` of Debian 12's 2.0.11 exits before all QoS 1 lines are delivered.)
    """
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{form.name}"
    )
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    started = time.monotonic()
    try:
        for first in range(
            0, n, 10_000
        ):  # message ids wrap at 65535: wait chunk by chunk
            infos = [
                client.publish(form.topic, form.payload(i), qos=1)
                for i in range(first, min(n, first + 10_000))
            ]
            for info in infos:
                info.wait_for_publish(timeout=120)
                if not info.is_published():
                    raise SystemExit(
                        "bench: the broker did not acknowledge every message"
                    )
    finally:
        client.disconnect()
        client.loop_stop()
    return time.monotonic() - started


def drain_mosquitto_sub(port: int, client_id: str, n: int) -> float:
    started = time.monotonic()
    subprocess.run(
        [*session_sub(port, client_id, NATIVE.topic), "-C", str(n)],
        stdout=subprocess.DEVNULL,
        check=True,
    )
    return time.monotonic() - started


def sqlite_ceiling(db: Path, n: int) -> float:
    """SQLite's own insert rate for the same rows (msgs/s): the 2n readings of the native
    backlog, built beforehand, into a store of the same schema and durability
    (``fieldgate.store.open_store``: WAL, ``synchronous=FULL``), ``executemany`` of
    1,000 rows per transaction."""
    conn = store.open_store(db, "GW-BENCH")
    at = store.now_ms()
    rows = []
    for i in range(n):
        doc = json.loads(NATIVE.payload(i))
        for metric, value in doc["metrics"].items():
            rows.append(("TH-001", doc["ts"], metric, float(value), at, "mqtt"))
    started = time.monotonic()
    for first in range(0, len(rows), CEILING_ROWS):
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(INSERT_READING_SQL, rows[first : first + CEILING_ROWS])
        conn.execute("COMMIT")
    secs = time.monotonic() - started
    conn.close()
    if count(db) != 2 * n:
        raise SystemExit("bench: the SQLite ceiling did not store every row")
    return n / secs


def peer(what: str, port: int, db: Path, n: int) -> dict[str, float]:
    """Run mq-bridge (``mqb_peer.py``) on its session ``bench-mqb``; its report."""
    p = subprocess.run(
        [
            sys.executable,
            str(MQB_PEER),
            what,
            str(port),
            "bench-mqb",
            NATIVE.topic,
            str(db),
            str(n),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if p.returncode != 0:
        raise SystemExit(f"bench: mq-bridge {what} failed: {p.stderr.strip()[-2000:]}")
    return json.loads(p.stdout) if what == "drain" else {}


def drain_naive(
    port: int, client_id: str, db: Path, n: int, max_secs: float
) -> tuple[int, float]:
    """The usual collector: paho with automatic acks, one INSERT + COMMIT per message."""
    conn = sqlite3.connect(str(db), isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute(
        "CREATE TABLE readings (device TEXT, ts INTEGER, metric TEXT, value REAL, "
        "UNIQUE (device, ts, metric))"
    )
    done = {"n": 0}

    def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        doc = json.loads(msg.payload)
        device = msg.topic.split("/")[1]
        conn.execute("BEGIN")
        for metric, value in doc["metrics"].items():
            conn.execute(
                "INSERT OR IGNORE INTO readings VALUES (?, ?, ?, ?)",
                (device, doc["ts"], metric, float(value)),
            )
        conn.execute("COMMIT")
        done["n"] += 1

    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False
    )
    client.on_message = on_message
    started = time.monotonic()
    client.connect("127.0.0.1", port)
    deadline = started + max_secs if max_secs > 0 else float("inf")
    while done["n"] < n and time.monotonic() < deadline:
        client.loop(timeout=0.1)
    elapsed = time.monotonic() - started
    client.disconnect()
    conn.close()
    return done["n"], elapsed


def count(db: Path, table: str = "readings") -> int:
    if not db.exists():
        return 0
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()


def stored_at_least(db: Path, rows: int) -> bool:
    """The store holds ``rows`` readings: the largest id first (cheap while a collector
    runs beside it), the count to be sure."""
    if not db.exists():
        return False
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        top = conn.execute("SELECT max(id) FROM readings").fetchone()[0] or 0
    except sqlite3.OperationalError:
        return False
    finally:
        conn.close()
    return top >= rows and count(db) >= rows


def vm_hwm_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def pss_kb(pid: int) -> int:
    """Proportional set size: shared pages (the forked writer's) counted once in a sum."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def family_pss_kb(pid: int) -> int:
    """Summed PSS of a process and its children."""
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        kids = []
    return pss_kb(pid) + sum(pss_kb(int(c)) for c in kids)


def cpu_secs(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


@dataclass
class Collector:
    """One ``fieldgate collect`` of the bench: its config, store and how it is started."""

    name: str
    work: Path
    port: int
    form: Form
    #: Glue sources to run instead of the installed package (the ``--before`` commit's).
    src: Path | None = None

    def __post_init__(self) -> None:
        d = self.work / self.name
        d.mkdir()
        self.db = d / "data_store.db"
        self.log = d / "collector.log"
        mqtt_cfg: dict = {
            "host": "127.0.0.1",
            "port": self.port,
            "client_id": f"bench-{self.name}",
            "topic_prefix": self.form.prefix,
        }
        if self.form.inputs:
            mqtt_cfg["inputs"] = list(self.form.inputs)
        cfg = {
            "site": {"serial": "GW-BENCH"},
            "store": {"path": str(self.db)},
            "mqtt": mqtt_cfg,
            "devices": {"list": [{"serial": "TH-001"}]},
            "log": {"level": "WARNING"},
        }
        self.config = d / "fieldgate.yaml"
        self.config.write_text(yaml.safe_dump(cfg))

    def start(self) -> subprocess.Popen[bytes]:
        env = {**os.environ, "FIELDGATE_CONFIG": str(self.config)}
        cmd = [FIELDGATE, "collect"]
        if self.src is not None:
            env["PYTHONPATH"] = str(self.src)
            cmd = [sys.executable, "-m", "fieldgate", "collect"]
        with self.log.open("ab") as out:
            return subprocess.Popen(cmd, stdout=out, stderr=out, env=env)

    def state(self) -> str | None:
        if not self.db.exists():
            return None
        conn = sqlite3.connect(str(self.db), timeout=30)
        try:
            row = conn.execute(
                "SELECT value FROM state WHERE key = 'collector.state'"
            ).fetchone()
            return row[0] if row else None
        except sqlite3.OperationalError:
            return None
        finally:
            conn.close()

    def register(self) -> None:
        """Run once so the broker creates the persistent session, then stop."""
        proc = self.start()
        deadline = time.monotonic() + 30
        while self.state() != "running":
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"bench: {self.name} did not start; see {self.log}")
            time.sleep(0.05)
        time.sleep(0.5)  # the SUBACK
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)

    def running_since(self) -> float:
        """When the collector's state last became ``running`` (epoch seconds)."""
        conn = sqlite3.connect(str(self.db), timeout=30)
        try:
            row = conn.execute(
                "SELECT updated_at FROM state WHERE key = 'collector.state' AND value = 'running'"
            ).fetchone()
        finally:
            conn.close()
        if row is None:
            raise SystemExit(f"bench: {self.name} never reported running")
        return int(row[0]) / 1000

    def drain(self, n: int) -> Drained:
        """Start; wait until the store holds 2n readings; stop."""
        started = time.monotonic()
        proc = self.start()
        pss_peak = 0
        next_pss = 0.0
        try:
            while not stored_at_least(self.db, 2 * n):
                if time.monotonic() >= next_pss:
                    next_pss = time.monotonic() + 0.25
                    pss_peak = max(pss_peak, family_pss_kb(proc.pid))
                if proc.poll() is not None:
                    raise SystemExit(f"bench: {self.name} exited; see {self.log}")
                if time.monotonic() - started > 900:
                    raise SystemExit(
                        f"bench: {self.name} did not drain the backlog in 900 s"
                    )
                time.sleep(0.05)
            done_wall = time.time()
            elapsed = time.monotonic() - started
            children = (
                Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            )
            hwm = (vm_hwm_kb(proc.pid), sum(vm_hwm_kb(int(c)) for c in children))
            pss_peak = max(pss_peak, family_pss_kb(proc.pid))
            cpu = (cpu_secs(proc.pid), sum(cpu_secs(int(c)) for c in children))
            from_connect = done_wall - self.running_since()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        return Drained(
            self.name,
            n,
            from_connect,
            elapsed,
            hwm,
            cpu,
            count(self.db),
            count(self.db, "rejected"),
            pss_peak,
        )


@dataclass
class Drained:
    name: str
    n: int
    secs: float  # from the broker connection to the last reading stored
    wall: float  # counting interpreter start-up
    hwm_kb: tuple[int, int]  # collector, store writer
    cpu: tuple[float, float]  # CPU seconds: collector, store writer
    stored: int
    rejected: int
    pss_kb: int = 0  # peak summed PSS of the collector and its writer

    @property
    def rate(self) -> float:
        return self.n / self.secs

    def line(self) -> str:
        us = [c / self.n * 1e6 for c in self.cpu]
        return (
            f"{self.name:<20} {self.n:>7} msgs in {self.secs:7.2f} s = {self.rate:9.0f} msgs/s "
            f"(CPU per message: collector {us[0]:.0f} us, writer {us[1]:.0f} us; "
            f"{self.n / self.wall:.0f} msgs/s counting start-up)"
        )


def before_sources(work: Path, ref: str) -> Path | None:
    """The glue of commit ``ref`` unpacked into ``work`` (None: it is this glue)."""

    def tree(rev: str) -> str:
        return subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", f"{rev}:glue/src"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()

    if (
        tree(ref) == tree("HEAD")
        and not subprocess.run(
            ["git", "-C", str(REPO), "diff", "--quiet", "HEAD", "--", "glue/src"],
            check=False,
        ).returncode
    ):
        return None
    dest = work / "before-src"
    dest.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", ref, "glue/src"],
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest / "glue" / "src"


def format_ratios(drained: dict[str, Drained]) -> list[tuple[str, bool]]:
    """Issue 16's line: each device form's drain rate against the native one's."""
    native = drained["native"]
    results = []
    for name in ("tasmota", "zigbee2mqtt"):
        r = drained[name].rate / native.rate
        cpu = sum(native.cpu) / sum(drained[name].cpu)
        text = (
            f"{name} / native = {r:.2f}x (target >= 0.8x; by CPU per message, which "
            f"other load on the machine does not skew: {cpu:.2f}x)"
        )
        results.append((text, r >= 0.8))
    return results


def stored_all(drained: dict[str, Drained], n: int) -> list[tuple[str, bool]]:
    return [
        (
            f"{d.name}: stored {d.stored} readings for {n} messages, {d.rejected} rejected",
            d.stored == 2 * n and d.rejected == 0,
        )
        for d in drained.values()
    ]


def report(results: list[tuple[str, bool]]) -> int:
    """Print each target as PASS or FAIL; the exit status (1: one was missed)."""
    for text, ok in results:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    return 0 if all(ok for _, ok in results) else 1


def finish(broker: subprocess.Popen[bytes], work: Path, keep: bool) -> None:
    broker.send_signal(signal.SIGTERM)
    broker.wait(30)
    if keep:
        print(f"work directory kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


def formats_only(n: int, keep: bool) -> int:
    """``--formats``: the native, Tasmota and Zigbee2MQTT drains alone, and their ratios."""
    work = Path(tempfile.mkdtemp(prefix="fieldgate-bench-collector-"))
    port = free_port()
    print(f"load average before the run: {Path('/proc/loadavg').read_text().strip()}")
    broker = start_broker(work, port)
    try:
        collectors = [
            Collector("native", work, port, NATIVE),
            Collector("tasmota", work, port, TASMOTA),
            Collector("zigbee2mqtt", work, port, Z2M),
        ]
        for c in collectors:
            c.register()
        for form in (NATIVE, TASMOTA, Z2M):
            secs = publish_backlog(port, form, n)
            print(
                f"published {n} QoS 1 messages ({form.name} form, 2 metrics) in {secs:.1f} s"
            )
        drained = {c.name: c.drain(n) for c in collectors}
        for d in drained.values():
            print(d.line())
        print(
            f"load average after the run: {Path('/proc/loadavg').read_text().strip()}"
        )
        return report(format_ratios(drained) + stored_all(drained, n))
    finally:
        finish(broker, work, keep)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--naive-secs", type=float, default=60.0)
    ap.add_argument(
        "--before", default="main", help="git ref of the collector to compare with"
    )
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument(
        "--formats",
        action="store_true",
        help="only the three forms' drains and issue 16's ratios (tasmota and zigbee2mqtt "
        "each >= 0.8x native)",
    )
    args = ap.parse_args()
    if args.formats:
        return formats_only(args.messages, args.keep)
    n = args.messages
    work = Path(tempfile.mkdtemp(prefix="fieldgate-bench-collector-"))
    port = free_port()
    print(f"load average before the run: {os.getloadavg()[0]:.2f}")
    broker = start_broker(work, port)
    try:
        before_src = before_sources(work, args.before)
        collectors = [
            Collector("native", work, port, NATIVE),
            Collector("tasmota", work, port, TASMOTA),
            Collector("zigbee2mqtt", work, port, Z2M),
        ]
        old = None
        if before_src is not None:
            old = Collector("before", work, port, NATIVE, src=before_src)
        else:
            print(f"before ({args.before}): same glue as this checkout, not run")
        register_v311_session(port, "bench-sub", NATIVE.topic)
        register_v311_session(port, "bench-naive", NATIVE.topic)
        peer("register", port, work / "mqb.db", n)
        for c in [*collectors, *([old] if old else [])]:
            c.register()
        for form in (NATIVE, TASMOTA, Z2M):
            secs = publish_backlog(port, form, n)
            print(
                f"published {n} QoS 1 messages ({form.name} form, 2 metrics) in {secs:.1f} s"
            )

        sub_rate = n / drain_mosquitto_sub(port, "bench-sub", n)
        print(f"{'mosquitto_sub':<20} {n:>7} msgs {'':>16}= {sub_rate:9.0f} msgs/s")
        ceiling = sqlite_ceiling(work / "ceiling.db", n)
        print(
            f"{'SQLite ceiling':<20} {n:>7} msgs {'':>16}= {ceiling:9.0f} msgs/s "
            f"({2 * n} rows, executemany {CEILING_ROWS} rows per transaction, WAL, FULL)"
        )
        mqb = peer("drain", port, work / "mqb.db", n)
        mqb_rate = n / mqb["secs"]
        print(
            f"{'mq-bridge':<20} {n:>7} msgs in {mqb['secs']:7.2f} s = {mqb_rate:9.0f} msgs/s "
            f"(CPU per message {mqb['cpu'] / n * 1e6:.0f} us; PSS {mqb['pss_kb'] / 1024:.1f} MB)"
        )
        if count(work / "mqb.db") != 2 * n:
            raise SystemExit("bench: mq-bridge did not store every reading")
        drained: dict[str, Drained] = {}
        for c in collectors:
            drained[c.name] = c.drain(n)
            print(drained[c.name].line())
        if old is not None:
            drained["before"] = old.drain(n)
            print(drained["before"].line())
        naive_n, naive_secs = drain_naive(
            port, "bench-naive", work / "naive.db", n, args.naive_secs
        )
        naive_rate = naive_n / naive_secs
        partial = "" if naive_n == n else f" (stopped after {args.naive_secs:g} s)"
        print(
            f"{'naive collector':<20} {naive_n:>7} msgs in {naive_secs:7.2f} s = "
            f"{naive_rate:9.0f} msgs/s{partial}"
        )
        print(f"load average after the run: {os.getloadavg()[0]:.2f}")

        native = drained["native"]
        results = [
            (
                f"fieldgate / mq-bridge = {native.rate / mqb_rate:.2f}x (target >= 1.0x; "
                + f"by CPU per message: {mqb['cpu'] / sum(native.cpu):.2f}x)",
                native.rate / mqb_rate >= 1.0,
            ),
            (
                f"fieldgate / SQLite ceiling = {native.rate / ceiling:.2f}x (target >= 0.5x)",
                native.rate / ceiling >= 0.5,
            ),
            (
                f"fieldgate / mosquitto_sub = {native.rate / sub_rate:.2f}x (target >= 0.3x)",
                native.rate / sub_rate >= 0.3,
            ),
            (
                f"fieldgate / naive = {native.rate / naive_rate:.1f}x (target >= 5x)",
                native.rate / naive_rate >= 5,
            ),
        ]
        results += format_ratios(drained)
        if "before" in drained:
            b = drained["before"]
            cpu_ratio = (sum(native.cpu) / n) / (sum(b.cpu) / n)
            print(
                f"native after / before ({args.before}, MQTT 3.1.1): rate "
                f"{native.rate / b.rate:.2f}x, CPU per message {cpu_ratio:.2f}x "
                f"(collector {native.cpu[0] / b.cpu[0]:.2f}x, writer {native.cpu[1] / b.cpu[1]:.2f}x)"
            )
        rss_mb = sum(native.hwm_kb) / 1024
        rss_text = (
            f"collector peak RSS (VmHWM) = {rss_mb:.1f} MB: main process "
            f"{native.hwm_kb[0] / 1024:.1f} MB + store writer "
            f"{native.hwm_kb[1] / 1024:.1f} MB (target <= 60 MB)"
        )
        results.append((rss_text, rss_mb <= 60))
        pss_mb = native.pss_kb / 1024
        pss_text = (
            f"collector summed PSS (collector + store writer, peak) = {pss_mb:.1f} MB"
        )
        results.append((f"{pss_text} (target <= 40 MB)", pss_mb <= 40))
        return report(results + stored_all(drained, n))
    finally:
        finish(broker, work, args.keep)


if __name__ == "__main__":
    sys.exit(main())
