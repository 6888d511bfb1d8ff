"""The collector bench's fastest peer: mq-bridge (Rust MQTT core) draining into the store.

mq-bridge (PyPI ``mq-bridge``, a dev requirement, not one of the glue's) reads the
persistent QoS 1 session in its Rust core and hands batches of up to 1,000 messages to
Python (``Consumer.poll_batch``); each batch is parsed (``json.loads``) and inserted with
one ``executemany`` into a store of the same schema and durability as ``fieldgate
collect``'s (``fieldgate.store.open_store``: WAL, ``synchronous=FULL``, the readings'
unique key), and acknowledged (``Consumer.ack``) only after its commit. No validation, no
rejected table: the least a batched collector on this broker can do.

``register`` connects once so the broker creates the session; ``drain`` runs until N
messages are committed and prints one JSON line: seconds from the connection to the last
commit, CPU seconds, peak PSS (kB) of this process.

    python bench/collector/mqb_peer.py register|drain PORT CLIENT_ID TOPIC DB N
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

from fieldgate import store
from fieldgate.readings import INSERT_READING_SQL
from mq_bridge import Consumer

BATCH = 1000


def consumer(port: int, client_id: str, topic: str, backlog: int) -> Consumer:
    """mq-bridge on the persistent session. Mosquitto sends a resumed v5 session's whole
    backlog at once, and mq-bridge's MQTT reader stops (until the broker drops it for a
    missed keepalive) once its internal channel (``queue_capacity``, default 100) is full:
    the channel has to hold the backlog (20,000 stalled on 100,000 messages)."""
    return Consumer.from_config(
        {
            "mqtt": {
                "url": f"tcp://127.0.0.1:{port}",
                "topic": topic,
                "client_id": client_id,
                "qos": 1,
                "protocol": "v5",
                "clean_session": False,
                "session_expiry_interval": 0xFFFFFFFF,
                "queue_capacity": backlog + BATCH,
                "max_inflight": 2 * BATCH,
            }
        }
    )


def pss_kb() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def drain(c: Consumer, db: Path, n: int, started: float) -> dict[str, float]:
    conn = store.open_store(db, "GW-BENCH")
    done = 0
    peak = 0
    device = "TH-001"
    while done < n:
        messages, token = c.poll_batch(max=BATCH, timeout_ms=1000)
        if token is None:
            continue
        at = store.now_ms()
        rows = []
        for m in messages:
            doc = json.loads(m.payload)
            ts = doc["ts"]
            for metric, value in doc["metrics"].items():
                rows.append((device, ts, metric, float(value), at, "mqtt"))
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(INSERT_READING_SQL, rows)
        conn.execute("COMMIT")
        c.ack(token)
        done += len(messages)
        if done % (10 * BATCH) < len(messages):
            peak = max(peak, pss_kb())
    elapsed = time.monotonic() - started
    peak = max(peak, pss_kb())
    conn.close()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "secs": elapsed,
        "cpu": usage.ru_utime + usage.ru_stime,
        "pss_kb": peak,
        "messages": done,
    }


def main() -> int:
    what, port, client_id, topic, db, n = sys.argv[1:7]
    started = time.monotonic()
    c = consumer(int(port), client_id, topic, int(n))
    try:
        if what == "register":
            time.sleep(1.0)  # the SUBACK
            return 0
        print(json.dumps(drain(c, Path(db), int(n), started)), flush=True)
        return 0
    finally:
        c.close()


if __name__ == "__main__":
    sys.exit(main())
