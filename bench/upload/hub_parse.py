"""Micro-benchmark: the hub's parse of an upload's readings.csv, Python columns against pyarrow.

The readings of ``bench/upload/run.py`` (50 devices x 4 metrics, one a minute; values of
three decimals) are cut into batches of 50,000, each rendered and zipped by the uploader's
own code (:func:`fieldgate.batchfile.render_csv`, :func:`~fieldgate.batchfile.write_zip`).
Then, in one process, alternating ``--passes`` times, every batch zip is opened as the hub
opens an upload (:func:`~fieldgate.batchfile.open_batch`) and read:

- ``unzip+sha``: readings.csv decompressed through the hub's limits and SHA-256 only (what
  both parses below include);
- ``columns``: :meth:`BatchZip.columns` consumed (the hub's parse today, without the
  storage's name check per new series);
- ``table``: :meth:`BatchZip.table` (pyarrow, the names checked once per distinct name).

It prints the process's CPU seconds per million readings for each (the better pass, all
passes in brackets), the ratio columns / table, the load average before and after, and the
CPU cost of importing pyarrow in a fresh interpreter (``--imports`` times). The tables are
checked to hold exactly the rows of the columns. Run from the repository root:

    .venv/bin/python bench/upload/hub_parse.py [--rows N] [--batch-rows N] [--passes N]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from fieldgate import batchfile
from fieldgate.batchfile import BatchZip, Row

SERIAL = "GW-BENCH"


def readings(rows: int) -> list[Row]:
    devices = [f"TH-{i:03d}" for i in range(50)]
    metrics = ["temperature", "humidity", "pressure", "battery"]
    per_ts = len(devices) * len(metrics)
    t0 = 1_767_225_600_000
    return [
        (
            devices[(i % per_ts) // len(metrics)],
            t0 + (i // per_ts) * 60_000,
            metrics[i % len(metrics)],
            round(20 + (i % 997) * 0.013, 3),
        )
        for i in range(rows)
    ]


def write_batches(
    tmp: Path, rows: list[Row], batch_rows: int
) -> list[tuple[Path, dict[str, object]]]:
    out = []
    for n, start in enumerate(range(0, len(rows), batch_rows)):
        part = rows[start : start + batch_rows]
        csv = batchfile.render_csv(part)
        batch_id = f"{n + 1:08d}-20260101T000000Z"
        m = batchfile.build_manifest(
            batch_id=batch_id,
            serial=SERIAL,
            rows=len(part),
            sha256=batchfile.csv_sha256(csv),
            first_ts=part[0][1],
            last_ts=part[-1][1],
            mode="LIVE",
            type="readings",
            created_at=1_767_225_600_000,
            first_id=start + 1,
            last_id=start + len(part),
        )
        path = tmp / batchfile.file_name(SERIAL, batch_id)
        batchfile.write_zip(path, csv, m)
        out.append((path, m))
    return out


def unzip_sha(batch: BatchZip, m: dict[str, object]) -> int:
    with batch.zf.open(batchfile.CSV_NAME) as member:
        raw = batchfile._Hashing(member, int(m["rows"]) + 1)
        batchfile.check_sha256(raw.drain(), m)
        return raw.lines


def by_columns(batch: BatchZip, m: dict[str, object]) -> int:
    return sum(len(cols.ts) for cols in batch.columns(m))


def by_table(batch: BatchZip, m: dict[str, object]) -> int:
    return batch.table(m).num_rows


WAYS: dict[str, Callable[[BatchZip, dict[str, object]], int]] = {
    "unzip+sha": unzip_sha,
    "columns": by_columns,
    "table": by_table,
}


def timed(
    way: Callable[[BatchZip, dict[str, object]], int], zips: list
) -> tuple[float, int]:
    n = 0
    cpu = time.process_time()
    for path, m in zips:
        with batchfile.open_batch(path) as batch:
            n += way(batch, m)
    return time.process_time() - cpu, n


def same_rows(zips: list) -> None:
    for path, m in zips:
        with batchfile.open_batch(path) as batch:
            rows = [r for cols in batch.columns(m) for r in zip(*cols, strict=True)]
            table = batch.table(m)
        if rows != list(zip(*table.to_pydict().values(), strict=True)):
            raise SystemExit(
                f"{path.name}: table() does not hold the rows of columns()"
            )


def import_cost(times: int) -> list[float]:
    code = (
        "import time; t = time.process_time(); import pyarrow, pyarrow.csv, pyarrow.compute; "
        "print(time.process_time() - t)"
    )
    return [
        float(
            subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, check=True
            ).stdout
        )
        for _ in range(times)
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--batch-rows", type=int, default=50_000)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--imports", type=int, default=5)
    args = ap.parse_args()
    load0 = os.getloadavg()[0]
    imports = import_cost(args.imports)
    with tempfile.TemporaryDirectory(prefix="hub-parse-") as d:
        zips = write_batches(Path(d), readings(args.rows), args.batch_rows)
        same_rows(zips[:2])
        per_m: dict[str, list[float]] = {name: [] for name in WAYS}
        for _ in range(args.passes):
            for name, way in WAYS.items():
                cpu, n = timed(way, zips)
                if n not in (args.rows, args.rows + len(zips)):  # lines, or readings
                    raise SystemExit(f"{name}: {n} readings of {args.rows}")
                per_m[name].append(cpu / args.rows * 1e6)
    load1 = os.getloadavg()[0]
    print(
        f"{args.rows} readings in {len(zips)} batches of {args.batch_rows}, {args.passes} "
        f"passes; load average {load0:.1f} -> {load1:.1f}"
    )
    print("CPU-s per million readings (best, [every pass]):")
    for name, cpus in per_m.items():
        print(f"  {name:10} {min(cpus):6.3f}  [{', '.join(f'{c:.3f}' for c in cpus)}]")
    ratio = min(per_m["columns"]) / min(per_m["table"])
    print(f"  columns / table: {ratio:.2f}x")
    net = [min(per_m[k]) - min(per_m["unzip+sha"]) for k in ("columns", "table")]
    print(
        f"  the parse alone (less unzip+sha): columns {net[0]:.3f}, table {net[1]:.3f}"
    )
    print(
        f"importing pyarrow (+ csv, compute) in a fresh interpreter: CPU-s "
        f"{min(imports):.3f} [{', '.join(f'{c:.3f}' for c in imports)}]"
    )


if __name__ == "__main__":
    main()
