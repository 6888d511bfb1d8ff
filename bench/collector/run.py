"""Benchmark: draining a broker backlog with ``fieldgate collect`` against two baselines.

Starts a real Mosquitto (persistence on, ``max_queued_messages 0`` so nothing is dropped,
``max_inflight_messages 1000`` so the MQTT 3.1.1 baselines are not throttled by the default
of 20), registers three persistent sessions (QoS 1 on ``fieldgate/+/readings``), publishes a
backlog of N QoS 1 messages (default 100,000) of two metrics each, then times in one run:

- ``mosquitto_sub -c -q 1 -C N``: the broker's delivery limit (C client, acks each message);
- a naive collector (paho, auto-ack, one SQLite commit per message: the usual pattern);
- ``fieldgate collect`` (group commit, acks after commit), until the store holds 2N readings.

Prints msgs/s for each and the ratios (targets: fieldgate >= 0.3x mosquitto_sub and >= 5x the
naive collector), checks every message was stored exactly once, and reports the collector's
peak RSS (VmHWM; target <= 60 MB). The naive drain is slow (one fsync per message), so by
default it runs for at most ``--naive-secs`` and its rate is measured on what it drained;
``--naive-secs 0`` drains it completely. Exit status 1 when a target is missed.

Run from the repository root:

    .venv/bin/python bench/collector/run.py [--messages N] [--naive-secs S]
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
from pathlib import Path

import paho.mqtt.client as mqtt
import yaml

FIELDGATE = str(Path(sys.executable).with_name("fieldgate"))
TOPIC = "fieldgate/+/readings"
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


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
    )
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stderr=subprocess.DEVNULL)
    wait_for_port(port)
    return proc


def session_sub(port: int, client_id: str) -> list[str]:
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
        TOPIC,
    ]


def register_v311_session(port: int, client_id: str) -> None:
    """A persistent MQTT 3.1.1 session subscribed at QoS 1 (the baselines use 3.1.1)."""
    subprocess.run([*session_sub(port, client_id), "-E"], check=True)


def publish_backlog(port: int, n: int) -> float:
    """Publish n QoS 1 messages (two metrics each), waiting for every PUBACK; returns seconds.

    (``mosquitto_pub -l`` of Debian 12's 2.0.11 exits before all QoS 1 lines are delivered.)
    """
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-publisher")
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
                client.publish(
                    "fieldgate/TH-001/readings",
                    json.dumps(
                        {
                            "ts": T0 + i,
                            "metrics": {"temperature": 20 + i % 10, "humidity": 45.5},
                        }
                    ),
                    qos=1,
                )
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
        [*session_sub(port, client_id), "-C", str(n)],
        stdout=subprocess.DEVNULL,
        check=True,
    )
    return time.monotonic() - started


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


def count(db: Path, where: str = "1") -> int:
    if not db.exists():
        return 0
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        sql = f"SELECT COUNT(*) FROM readings WHERE {where}"
        return int(conn.execute(sql).fetchone()[0])
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()


def vm_hwm_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def fieldgate_config(work: Path, port: int) -> Path:
    (work / "gw").mkdir()
    cfg = {
        "site": {"serial": "GW-BENCH"},
        "store": {"path": str(work / "gw" / "data_store.db")},
        "mqtt": {"host": "127.0.0.1", "port": port, "client_id": "bench-fieldgate"},
        "devices": {"list": [{"serial": "TH-001"}]},
        "log": {"level": "WARNING"},
    }
    path = work / "fieldgate.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def state(db: Path) -> str | None:
    if not db.exists():
        return None
    conn = sqlite3.connect(str(db), timeout=30)
    try:
        row = conn.execute(
            "SELECT value FROM state WHERE key = 'collector.state'"
        ).fetchone()
        return row[0] if row else None
    except sqlite3.OperationalError:
        return None
    finally:
        conn.close()


def start_collector(config: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "FIELDGATE_CONFIG": str(config)}
    with log.open("ab") as out:
        return subprocess.Popen([FIELDGATE, "collect"], stdout=out, stderr=out, env=env)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)


def register_fieldgate_session(config: Path, db: Path, log: Path) -> None:
    """Run the collector once so the broker creates its persistent session, then stop it."""
    proc = start_collector(config, log)
    deadline = time.monotonic() + 30
    while state(db) != "running":
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit(f"bench: fieldgate collect did not start; see {log}")
        time.sleep(0.05)
    time.sleep(0.3)  # the SUBACK
    stop(proc)


def running_since(db: Path) -> float:
    """When the collector's state last became ``running`` (epoch seconds)."""
    conn = sqlite3.connect(str(db), timeout=30)
    try:
        row = conn.execute(
            "SELECT updated_at FROM state WHERE key = 'collector.state' AND value = 'running'"
        ).fetchone()
    finally:
        conn.close()
    if row is None:
        raise SystemExit("bench: the collector never reported running")
    return int(row[0]) / 1000


def drain_fieldgate(
    config: Path, db: Path, log: Path, n: int
) -> tuple[float, float, tuple[int, int]]:
    """Start the collector; wait until the store holds 2n readings.

    Returns (seconds from process start, seconds from the broker connection, and the VmHWM
    in kB of the collector and of its store-writer child).
    """
    started = time.monotonic()
    proc = start_collector(config, log)
    try:
        while count(db) < 2 * n:
            if proc.poll() is not None:
                raise SystemExit(f"bench: fieldgate collect exited; see {log}")
            if time.monotonic() - started > 600:
                raise SystemExit("bench: fieldgate did not drain the backlog in 600 s")
            time.sleep(0.05)
        done_wall = time.time()
        elapsed = time.monotonic() - started
        children = (
            Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        )
        hwm = (vm_hwm_kb(proc.pid), sum(vm_hwm_kb(int(c)) for c in children))
        from_connect = done_wall - running_since(db)
    finally:
        stop(proc)
    return elapsed, from_connect, hwm


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--naive-secs", type=float, default=60.0)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    n = args.messages
    work = Path(tempfile.mkdtemp(prefix="fieldgate-bench-collector-"))
    port = free_port()
    broker = start_broker(work, port)
    try:
        config = fieldgate_config(work, port)
        fg_db = work / "gw" / "data_store.db"
        fg_log = work / "collector.log"
        register_v311_session(port, "bench-sub")
        register_v311_session(port, "bench-naive")
        register_fieldgate_session(config, fg_db, fg_log)
        secs = publish_backlog(port, n)
        print(f"published {n} QoS 1 messages (2 metrics each) in {secs:.1f} s")

        sub_secs = drain_mosquitto_sub(port, "bench-sub", n)
        sub_rate = n / sub_secs
        print(
            f"mosquitto_sub    {n:>7} msgs in {sub_secs:7.2f} s = {sub_rate:9.0f} msgs/s"
        )

        fg_wall, fg_secs, hwm = drain_fieldgate(config, fg_db, fg_log, n)
        fg_rate = n / fg_secs
        print(
            f"fieldgate        {n:>7} msgs in {fg_secs:7.2f} s = {fg_rate:9.0f} msgs/s "
            f"(from its broker connection; {n / fg_wall:.0f} msgs/s over {fg_wall:.2f} s "
            "counting interpreter start-up)"
        )

        naive_n, naive_secs = drain_naive(
            port, "bench-naive", work / "naive.db", n, args.naive_secs
        )
        naive_rate = naive_n / naive_secs
        partial = "" if naive_n == n else f" (stopped after {args.naive_secs:g} s)"
        print(
            f"naive collector  {naive_n:>7} msgs in {naive_secs:7.2f} s = "
            f"{naive_rate:9.0f} msgs/s{partial}"
        )

        stored = count(fg_db)
        distinct = count(fg_db, "metric IN ('temperature', 'humidity')")
        conn = sqlite3.connect(str(fg_db))
        rejected = conn.execute("SELECT COUNT(*) FROM rejected").fetchone()[0]
        conn.close()
        ok_all = stored == 2 * n and distinct == 2 * n and rejected == 0
        r_sub = fg_rate / sub_rate
        r_naive = fg_rate / naive_rate
        rss_mb = sum(hwm) / 1024
        rss_text = (
            f"collector peak RSS (VmHWM) = {rss_mb:.1f} MB: main process "
            f"{hwm[0] / 1024:.1f} MB + store writer {hwm[1] / 1024:.1f} MB "
            "(target <= 60 MB)"
        )
        results = [
            (
                f"fieldgate / mosquitto_sub = {r_sub:.2f}x (target >= 0.3x)",
                r_sub >= 0.3,
            ),
            (f"fieldgate / naive = {r_naive:.1f}x (target >= 5x)", r_naive >= 5),
            (rss_text, rss_mb <= 60),
            (f"stored {stored} readings for {n} messages, {rejected} rejected", ok_all),
        ]
        for text, ok in results:
            print(f"{'PASS' if ok else 'FAIL'}  {text}")
        return 0 if all(ok for _, ok in results) else 1
    finally:
        broker.send_signal(signal.SIGTERM)
        broker.wait(30)
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
