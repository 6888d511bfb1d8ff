"""Benchmark: the gateway page (``fieldgate web``) on a large store, against a baseline.

One run builds a store of D devices x M metrics x T readings each (default 50 x 10 x 10,000
= 5,000,000 rows, one reading every 10 s; device i's last reading is i x 2.4 h old), starts
the real ``fieldgate web`` on loopback and times, median of 5 after one warm-up request:

- ``GET /`` (every device's latest readings: a skip-scan of the index, then each device's
  last readings) against the **baseline**: the plain query a first version would write,
  ``SELECT device, metric, MAX(ts), value FROM readings GROUP BY device, metric``, timed
  on a read-only connection in this process (its ratio baseline/page is printed);
- ``GET /devices/DEV-000`` (a day of 8,640 readings per metric, charted as buckets),
  ``GET /api/v1/devices/DEV-000/day`` (the raw day as JSON, 86,400 readings),
  ``GET /api/v1/latest`` and ``GET /status`` (what ``fieldgate status`` counts: O(rows)).

Run from the repository root:

    .venv/bin/python bench/web/run.py [--devices 50] [--metrics 10] [--readings 10000]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
import yaml
from fieldgate import store

FIELDGATE = str(Path(sys.executable).with_name("fieldgate"))
BASELINE_SQL = (
    "SELECT device, metric, MAX(ts), value FROM readings GROUP BY device, metric"
)


def build(db: Path, devices: int, metrics: int, readings: int) -> int:
    conn = store.open_store(db, "GW-BENCH")
    now = store.now_ms()
    conn.execute("PRAGMA synchronous = OFF")
    with store.transaction(conn):
        conn.execute(
            f"""
            WITH RECURSIVE d(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM d WHERE i < {devices - 1}),
                 t(j) AS (SELECT 0 UNION ALL SELECT j + 1 FROM t WHERE j < {readings - 1}),
                 m(k) AS (SELECT 0 UNION ALL SELECT k + 1 FROM m WHERE k < {metrics - 1})
            INSERT INTO readings (device, ts, metric, value, received_at, source)
            SELECT printf('DEV-%03d', d.i), {now} - d.i * 8640000 - ({readings} - 1 - t.j) * 10000,
                   'm' || m.k, t.j * 0.5 + m.k, {now}, 'bench'
            FROM t, d, m ORDER BY t.j, d.i, m.k
            """
        )
    n = conn.execute("SELECT COUNT(*) FROM readings").fetchone()[0]
    conn.close()
    return n


def timed(fn, runs: int = 5) -> tuple[float, float]:
    """(first, median of ``runs`` after it) in ms."""
    t = time.perf_counter()
    fn()
    first = (time.perf_counter() - t) * 1000
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return first, statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=50)
    ap.add_argument("--metrics", type=int, default=10)
    ap.add_argument("--readings", type=int, default=10_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fieldgate-bench-web-") as tmp:
        db = Path(tmp) / "data_store.db"
        t = time.perf_counter()
        rows = build(db, args.devices, args.metrics, args.readings)
        print(
            f"store: {rows:,} readings, {db.stat().st_size / 1e6:.0f} MB, built in "
            f"{time.perf_counter() - t:.0f} s"
        )
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        config = Path(tmp) / "fieldgate.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "site": {"serial": "GW-BENCH"},
                    "store": {"path": str(db)},
                    "web": {"listen_address": "127.0.0.1", "port": port},
                }
            )
        )
        env = {**os.environ, "FIELDGATE_CONFIG": str(config)}
        proc = subprocess.Popen(
            [FIELDGATE, "web"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 30
            while True:
                try:
                    requests.get(base + "/favicon.ico", timeout=5)
                    break
                except requests.ConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
            _, baseline = timed(lambda: conn.execute(BASELINE_SQL).fetchall(), runs=3)
            print(f"baseline GROUP BY device, metric: {baseline:8.1f} ms (median of 3)")
            page = 0.0
            for path in (
                "/",
                "/api/v1/latest",
                "/devices/DEV-000",
                "/api/v1/devices/DEV-000/day",
                "/status",
            ):
                size = 0

                def get(path: str = path) -> None:
                    nonlocal size
                    r = requests.get(base + path, timeout=120)
                    r.raise_for_status()
                    size = len(r.content)

                first, median = timed(get)
                if path == "/":
                    page = median
                print(
                    f"GET {path:<30} first {first:8.1f} ms, median {median:8.1f} ms, "
                    f"{size / 1000:7.0f} kB"
                )
            print(
                f"latest readings page vs baseline query: {baseline / page:.0f}x faster"
            )
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)
    print("loadavg", Path("/proc/loadavg").read_text().strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
