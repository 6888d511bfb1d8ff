"""Benchmark: ``fieldgate status --json`` on a large store against the same on a small one.

Builds two gateway stores with fieldgate's own writes (``store.insert_readings`` in
transactions of 500,000 readings; readings of 50 devices x 4 metrics, one a minute): a
small one of ``--small`` readings (default 10,000) and a large one of ``--rows`` readings
(default 5,000,000). In each, ``batches.cut_all`` cuts ``--batches`` batches (default 3)
of ``upload.batch_max_rows`` readings, the first of them is marked uploaded, and
``--rejected`` messages (default 1,000, 20 reasons) are kept in ``rejected``: the rest
of the readings wait for a batch, as on a gateway that has been offline. Then it runs
``fieldgate status --json`` (a new process, as an operator over SSH and the heartbeat run
it) ``--repeat`` times (default 5) on each store, alternately, and prints the median
times and the ratio large / small (target: close to 1.0: status costs the same whatever
the store's size), first with the store in the page cache, then with the store's pages
dropped from the cache before each run (``posix_fadvise`` of the store file alone, as
after a reboot or on a Pi whose small memory holds little of a large store). Run from the repository root:

    .venv/bin/python bench/status/run.py [--rows N] [--small N] [--repeat N] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from fieldgate import batches, config, store

FIELDGATE = str(Path(sys.executable).with_name("fieldgate"))
SERIAL = "GW-BENCH"
DEVICES = [f"TH-{i:03d}" for i in range(50)]
METRICS = ["temperature", "humidity", "pressure", "battery"]


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def write_config(work: Path, name: str, batch_rows: int) -> Path:
    (work / name).mkdir()
    path = work / name / "fieldgate.yml"
    path.write_text(
        yaml.safe_dump(
            {
                "site": {"serial": SERIAL},
                "store": {"path": str(work / name / "store.db")},
                "upload": {
                    "batch_max_rows": batch_rows,
                    "pending_dir": str(work / name / "pending"),
                    "uploaded_dir": str(work / name / "uploaded"),
                },
            }
        )
    )
    return path


def build(cfg_path: Path, rows: int, cut: int, rejected: int) -> float:
    """The store of ``cfg_path`` with ``rows`` readings; seconds it took."""
    t0 = time.perf_counter()
    cfg = config.load_config(str(cfg_path))
    conn = store.open_store(cfg.store.path, SERIAL)
    per_ts = len(DEVICES) * len(METRICS)
    start_ms = 1_767_225_600_000
    chunk = 500_000
    for start in range(0, rows, chunk):
        batch = []
        for i in range(start, min(rows, start + chunk)):
            step, k = divmod(i, per_ts)
            dev, m = divmod(k, len(METRICS))
            batch.append(
                (
                    DEVICES[dev],
                    start_ms + step * 60_000,
                    METRICS[m],
                    20 + i % 997 * 0.013,
                )
            )
        with store.transaction(conn):
            store.insert_readings(conn, batch, source="bench")
    with store.transaction(conn):
        for i in range(rejected):
            store.insert_rejected(
                conn,
                source="mqtt",
                topic="fieldgate/TH-001/readings",
                payload=b"{",
                reason=f"not JSON (reason {i % 20})",
            )
    made = batches.cut_all(conn, cfg, limit=cut)
    if made:
        with store.transaction(conn):
            conn.execute(
                "UPDATE batches SET state = 'uploaded', uploaded_at = ? WHERE batch_id = ?",
                (store.now_ms(), made[0].batch_id),
            )
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return time.perf_counter() - t0


def evict(db: Path) -> None:
    """Drop the store's pages from the page cache (this file's only: other processes'
    caches stay), as after a reboot or when other work pushed them out."""
    for path in (db, Path(f"{db}-wal")):
        if path.exists():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def status_secs(cfg_path: Path, *, cold: bool) -> tuple[float, dict]:
    if cold:
        evict(cfg_path.with_name("store.db"))
    t0 = time.perf_counter()
    out = subprocess.run(
        [FIELDGATE, "--config", str(cfg_path), "status", "--json"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return time.perf_counter() - t0, json.loads(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=5_000_000)
    ap.add_argument("--small", type=int, default=10_000)
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--batch-rows", type=int, default=2_000)
    ap.add_argument("--rejected", type=int, default=1_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(
        dir=args.workdir, prefix="fieldgate-bench-status-"
    ) as tmp:
        work = Path(tmp)
        print(f"load average at start: {load()}")
        stores = {}
        for name, rows in (("small", args.small), ("large", args.rows)):
            cfg_path = write_config(work, name, args.batch_rows)
            secs = build(cfg_path, rows, args.batches, args.rejected)
            size = (work / name / "store.db").stat().st_size
            print(
                f"{name}: {rows:,} readings built in {secs:.1f} s ({size / 1e6:.0f} MB)"
            )
            stores[name] = cfg_path
        for name, rows in (("small", args.small), ("large", args.rows)):
            _, got = status_secs(stores[name], cold=False)
            shown = got["readings"]
            print(
                f"{name} store's status: readings {shown['total']:,}, unbatched "
                f"{shown['unbatched']:,}, {len(got['devices'])} devices, rejected "
                f"{got['rejected']['total']:,}, {got['batches']['pending']} batches pending"
            )
            if shown["total"] != rows:
                print(f"  wrong: the {name} store holds {rows:,} readings")
                return 1
        ratios = {}
        for cache in ("warm", "cold"):
            times: dict[str, list[float]] = {"small": [], "large": []}
            for _ in range(args.repeat):
                for name, cfg_path in stores.items():
                    times[name].append(status_secs(cfg_path, cold=cache == "cold")[0])
            for name in stores:
                print(
                    f"status --json, {name} store, {cache} page cache: median "
                    f"{statistics.median(times[name]):.3f} s of {args.repeat} "
                    f"({', '.join(f'{t:.3f}' for t in times[name])})"
                )
            ratios[cache] = statistics.median(times["large"]) / statistics.median(
                times["small"]
            )
        print(f"load average at end: {load()}")
        for cache, ratio in ratios.items():
            print(
                f"status time, {args.rows:,} readings / {args.small:,} readings, {cache} page "
                f"cache: {ratio:.2f}x (target: close to 1.0)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
