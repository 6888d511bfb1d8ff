"""Benchmark: ``fieldgate export`` against a plain ``cp`` of the store, under live ingest.

Builds a store of about ``--size-mb`` MB (default 500), makes a fresh ext4 filesystem on a
loop device as the "drive", starts ingest at about ``--rate`` readings/s (default 1,000) in
another process that writes the store directly with the collector's commit pattern (small
transactions, ``synchronous=FULL``), and times in the same run, on the same filesystem:

- ``cp``: a plain copy of the database file, and the same followed by ``sync`` of the copy
  (the data on the drive, as the export guarantees it);
- ``fieldgate export --to``: snapshot (one-step online backup), fsync, ``integrity_check``
  and SHA-256, site config, checksum file, renames.

Prints both times and the ratios export/copy (target: export <= 1.5 x the plain copy), and
what the writer committed meanwhile. Needs root (loop device, mount). From the repository
root:

    .venv/bin/python bench/export/run.py [--size-mb 500] [--rate 1000] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from fieldgate import store

FIELDGATE = str(Path(sys.executable).with_name("fieldgate"))
SERIAL = "GW-BENCH"
BYTES_PER_ROW = 110  # measured: readings with their two indexes (686 MB at 80)
VERIFY = ("integrity_check", "quick_check")

WRITER = """
import json, signal, sys, time
from fieldgate import store
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
conn = store.open_store(sys.argv[1], sys.argv[2])
rate, batch = float(sys.argv[3]), 50
period = batch / rate
t0, i, longest, commits = 1_800_000_000_000, 0, 0.0, 0
print("ready", flush=True)
while not stop:
    started = time.monotonic()
    with store.transaction(conn):
        store.insert_readings(
            conn, [("LIVE-1", t0 + (i + k) * 1000, "temperature", 21.5) for k in range(batch)],
            source="bench",
        )
    longest = max(longest, time.monotonic() - started)
    commits += 1
    i += batch
    time.sleep(max(0.0, period - (time.monotonic() - started)))
print(json.dumps({"rows": i, "commits": commits, "longest_commit_s": round(longest, 4)}))
"""


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def build_store(db: Path, size_mb: int) -> None:
    """Readings of 50 devices x 4 metrics, one a minute, until the file is about size_mb."""
    rows = size_mb * 1024 * 1024 // BYTES_PER_ROW
    conn = store.open_store(db, SERIAL)
    devices = [f"TH-{i:03d}" for i in range(50)]
    metrics = ["temperature", "humidity", "pressure", "battery"]
    per_ts = len(devices) * len(metrics)
    t0 = 1_767_225_600_000
    chunk = 500_000
    for start in range(0, rows, chunk):
        batch = []
        for i in range(start, min(rows, start + chunk)):
            step, k = divmod(i, per_ts)
            dev, m = divmod(k, len(metrics))
            batch.append(
                (
                    devices[dev],
                    t0 + step * 60_000,
                    metrics[m],
                    round(20 + i % 997 * 0.013, 3),
                )
            )
        with store.transaction(conn):
            store.insert_readings(conn, batch, source="bench")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def drop_caches() -> None:
    """Start every timing from the disk, not from the page cache."""
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed(cmd: list[str]) -> float:
    started = time.monotonic()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - started


def timed_export(config: Path, target: Path) -> tuple[float, list[str]]:
    """Run ``fieldgate export``; its time and the step lines it logged (with durations)."""
    env = {"FIELDGATE_CONFIG": str(config), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    started = time.monotonic()
    p = subprocess.run(
        [FIELDGATE, "export", "--to", str(target)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    secs = time.monotonic() - started
    steps = [
        line.split(": ", 1)[-1] for line in p.stderr.splitlines() if " in " in line
    ]
    return secs, steps


def write_config(path: Path, db: Path, secrets: Path, verify: str) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "site": {"serial": SERIAL},
                "store": {"path": str(db)},
                "export": {
                    "password_file": str(secrets / "export_password"),
                    "led_path": None,
                    "verify": verify,
                },
            }
        )
    )
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=500, help="store size to build (MB)")
    ap.add_argument(
        "--rate", type=float, default=1000, help="ingest readings per second"
    )
    ap.add_argument(
        "--workdir", type=Path, default=None, help="where the store and image go"
    )
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fieldgate-bench-export-", dir=args.workdir))
    loop = ""
    point = work / "drive"
    writer: subprocess.Popen[str] | None = None
    try:
        db = work / "data_store.db"
        t = time.monotonic()
        build_store(db, args.size_mb)
        size = db.stat().st_size
        print(f"store: {size / 1e6:.0f} MB built in {time.monotonic() - t:.0f} s")

        image = work / "drive.img"
        with image.open("wb") as f:
            f.truncate(3 * size + (256 << 20))
        sh("mkfs.ext4", "-q", "-F", str(image))
        loop = sh("losetup", "--find", "--show", str(image)).strip()
        point.mkdir()
        sh("mount", "-t", "ext4", loop, str(point))
        secrets = work / "secrets"
        secrets.mkdir()
        (secrets / "export_password").write_text("bench\n")
        configs = {v: write_config(work / f"{v}.yaml", db, secrets, v) for v in VERIFY}

        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(db), SERIAL, str(args.rate)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "ready"
        time.sleep(2)  # ingest settles

        drop_caches()
        cp_plain = timed(["cp", str(db), str(point / "plain.db")])
        t = time.monotonic()
        subprocess.run(["sync", str(point / "plain.db")], check=True)
        cp_synced = cp_plain + (time.monotonic() - t)
        (point / "plain.db").unlink()
        subprocess.run(["sync", "-f", str(point)], check=True)

        exports: dict[str, tuple[float, list[str]]] = {}
        for verify, config in configs.items():
            target = point / f"export-{verify}"
            target.mkdir()
            drop_caches()
            exports[verify] = timed_export(config, target)

        writer.send_signal(signal.SIGTERM)
        out, _ = writer.communicate(timeout=60)
        report = json.loads(out.strip().splitlines()[-1])
        writer = None
        ok = all(
            subprocess.run(
                ["sha256sum", "-c", p.name],
                cwd=p.parent,
                capture_output=True,
                check=False,
            ).returncode
            == 0
            for p in point.glob("export-*/export-*.sha256")
        )
        print(f"target: ext4 on {loop} (image file on the same disk as the store)")
        print(
            f"ingest: direct store writes in another process at {args.rate:.0f} rows/s"
        )
        print(
            f"  during the run: {report['rows']} rows in {report['commits']} commits, "
            f"longest commit {report['longest_commit_s'] * 1000:.0f} ms"
        )
        print(f"cp                                {cp_plain:7.2f} s")
        print(f"cp + sync                         {cp_synced:7.2f} s")
        for verify, (secs, steps) in exports.items():
            print(
                f"fieldgate export ({verify:<15}) {secs:7.2f} s   "
                f"ratio to cp + sync {secs / cp_synced:5.2f}, to cp {secs / cp_plain:5.2f}"
            )
            for step in steps:
                print(f"    {step}")
        print(
            f"sha256sum -c of every export: {'OK' if ok else 'FAILED'}   (target: ratio <= 1.5)"
        )
        return 0 if ok else 1
    finally:
        if writer is not None:
            writer.kill()
            writer.wait()
        if loop:
            subprocess.run(["umount", str(point)], check=False)
            subprocess.run(["losetup", "-d", loop], check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
