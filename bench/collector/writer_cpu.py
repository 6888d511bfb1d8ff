"""The store writer's CPU per message, in process, per payload format against native.

Feeds batches of 1,000 messages of one form at a time through the writer's own
``commit_batch`` into a real store (WAL, ``synchronous=FULL``), every message stamped by
the broker as in a drain, each form in turn for several rounds, and prints the lowest CPU
time per message of each form (``time.process_time``: other load on the machine does not
count) and its ratio to the native form's in the same run. The forms are those of
``bench/collector/run.py`` (native, Tasmota with ``Time``, a nested sensor and
``TempUnit``; Zigbee2MQTT without a time) plus a Shelly ``NotifyStatus`` and an ESPHome
``value``. Timings only, no targets: ``run.py`` holds issue 16's line.

Run from the repository root:

    .venv/bin/python bench/collector/writer_cpu.py [--rounds R] [--batches B]

(``PYTHONPATH=<other glue>/src`` measures another commit's writer the same way.)
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from fieldgate import store
from fieldgate.config import parse_config
from fieldgate.writer import MessageReader, commit_batch

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
BATCH = 1000


def _tasmota(i: int) -> bytes:
    when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(T0 // 1000 + i))
    doc = {"Time": when, "AM2301": {"Temperature": 20 + i % 10, "Humidity": 45.5}}
    return json.dumps({**doc, "TempUnit": "C"}).encode()


def _shelly(i: int) -> bytes:
    params = {"ts": T0 / 1000 + i + 0.25, "temperature:0": {"id": 0, "tC": 20 + i % 10}}
    return json.dumps({"method": "NotifyStatus", "params": params}).encode()


#: name -> (topic, the i-th payload): each message of two metrics, like the drain's, except
#: ESPHome (one value per message) and Shelly (one, its ``id`` left out).
FORMS: dict[str, tuple[str, Callable[[int], bytes]]] = {
    "native": (
        "fieldgate/TH-001/readings",
        lambda i: json.dumps(
            {"ts": T0 + i, "metrics": {"temperature": 20 + i % 10, "humidity": 45.5}}
        ).encode(),
    ),
    "tasmota": ("tele/TH-001/SENSOR", _tasmota),
    "zigbee2mqtt": (
        "zigbee2mqtt/TH-001",
        lambda i: json.dumps({"temperature": 20 + i % 10, "humidity": 45.5}).encode(),
    ),
    "shelly": ("shelly/TH-001/events/rpc", _shelly),
    "esphome": (
        "TH-001/sensor/temperature/state",
        lambda i: f"{20 + i % 10}.5".encode(),
    ),
}

INPUTS = [
    {"topic": "tele/{device}/SENSOR", "format": "tasmota"},
    {"topic": "zigbee2mqtt/{device}", "format": "zigbee2mqtt"},
    {"topic": "shelly/{device}/events/rpc", "format": "shelly"},
    {"topic": "{device}/sensor/{metric}/state", "format": "value"},
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="rounds over every form")
    ap.add_argument(
        "--batches", type=int, default=10, help="batches of 1,000 per round"
    )
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fieldgate-bench-writer-"))
    cfg = parse_config(
        {
            "site": {"serial": "GW-BENCH"},
            "store": {"path": str(work / "store.db")},
            "mqtt": {"inputs": INPUTS},
            "devices": {"list": [{"serial": "TH-001"}]},
        }
    )
    conn = store.open_store(cfg.store.path, "GW-BENCH")
    reader = MessageReader(cfg, {})
    print(
        f"load average before: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}"
    )
    best: dict[str, float] = {}
    n = 0
    for _ in range(args.rounds):
        for name, (topic, payload) in FORMS.items():
            spent = 0.0
            for _ in range(args.batches):
                at = store.now_ms()
                items = [(topic, payload(n + k), at, T0 + n + k) for k in range(BATCH)]
                n += BATCH
                started = time.process_time()
                result = commit_batch(conn, reader, items)
                spent += time.process_time() - started
                if result[0] != "done" or result[2]:
                    raise SystemExit(f"bench: {name}: {result}")
            us = spent / (args.batches * BATCH) * 1e6
            best[name] = min(best.get(name, us), us)
    conn.close()
    for p in work.iterdir():
        p.unlink()
    os.rmdir(work)
    print(
        f"load average after:  {' '.join(Path('/proc/loadavg').read_text().split()[:3])}"
    )
    print(
        f"writer CPU per message, lowest of {args.rounds} rounds of {args.batches} batches:"
    )
    for name, us in best.items():
        print(f"  {name:<12} {us:5.2f} us  ({us / best['native']:.2f}x native)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
