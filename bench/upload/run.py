"""Benchmark: the whole upload pipeline against a plain local CSV + zip export of the same rows.

Loads N readings (default 1,000,000) into a fresh gateway store, then times in one run:

- baseline: read the readings from the store, write them as CSV, zip the CSV (deflate at
  the level batch files use) into one local file;
- pipeline: ``fieldgate upload --once`` against a real ``fieldgate hub serve`` on loopback:
  cut batches (CSV + zip + fsync + store transaction), POST manifest, PUT zip, the hub
  verifies and ingests each batch into its SQLite database.

The baseline and the pipeline run ``--repeat`` times (default 3), alternately, each
pipeline with a fresh copy of the store and a fresh hub: this machine's CPU seconds for the
same work move by a third within minutes, so one pair cannot decide a ratio that sits near
its target. Each pair prints rows/s for both, the ratio pipeline/baseline (target: at least
0.7) and the CPU seconds of uploader + hub against the baseline's (target: at most 2x; the
hub's split into its start, the upload and its stop); the verdict is the median of each
ratio over the pairs, beside every pair's. Each run checks that the hub holds exactly N
readings. fieldgate's modules are byte-compiled first, as an installed wheel's are. Run
from the repository root:

    .venv/bin/python bench/upload/run.py [--rows N] [--batch-rows N] [--workers N]
        [--repeat N] [--profile]
"""

from __future__ import annotations

import argparse
import compileall
import csv
import io
import os
import resource
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import NamedTuple

import yaml
from fieldgate import batchfile, store

FIELDGATE = str(Path(sys.executable).with_name("fieldgate"))
SERIAL = "GW-BENCH"
PROFILER = Path(__file__).with_name("profile_uploader.py")


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
    raise SystemExit(f"bench: the hub did not start on port {port}")


def load(db: Path, rows: int) -> None:
    """N readings: 50 devices x 4 metrics, one sample a minute, values like real sensors."""
    conn = store.open_store(db, SERIAL)
    devices = [f"TH-{i:03d}" for i in range(50)]
    metrics = ["temperature", "humidity", "pressure", "battery"]
    per_ts = len(devices) * len(metrics)
    t0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z

    def gen() -> object:
        for i in range(rows):
            step, k = divmod(i, per_ts)
            dev, m = divmod(k, len(metrics))
            yield (
                devices[dev],
                t0 + step * 60_000,
                metrics[m],
                round(20 + (i % 997) * 0.013, 3),
            )

    with store.transaction(conn):
        store.insert_readings(conn, gen(), source="bench")  # type: ignore[arg-type]
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def baseline(
    db: Path, out: Path, level: int = batchfile.ZIP_LEVEL
) -> tuple[float, float]:
    """Export every reading to CSV inside one zip; returns wall and CPU seconds."""
    t = time.perf_counter()
    cpu = time.process_time()
    conn = sqlite3.connect(str(db))
    cur = conn.execute("SELECT device, ts, metric, value FROM readings ORDER BY id")
    with (
        zipfile.ZipFile(
            out, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=level
        ) as zf,
        zf.open(batchfile.CSV_NAME, "w", force_zip64=True) as member,
    ):
        text = io.TextIOWrapper(member, encoding="utf-8", newline="")
        w = csv.writer(text, lineterminator="\n")
        w.writerow(batchfile.CSV_HEADER)
        while chunk := cur.fetchmany(50_000):
            w.writerows(chunk)
        text.flush()
        text.detach()
    with out.open("rb+") as f:
        os.fsync(f.fileno())
    conn.close()
    return time.perf_counter() - t, time.process_time() - cpu


def _tree_cpu(pid: int) -> float:
    """CPU seconds a running process and its live children used so far (from /proc): what
    the hub spent starting, before the upload begins."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        # itself, or one of its children (ppid)
        if stat.parent.name == str(pid) or fields[1] == str(pid):
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload]
    if p.returncode != 0:
        raise SystemExit(
            f"bench: {' '.join(cmd[:3])} failed: {p.stderr.strip()[-500:]}"
        )
    return p


def compile_glue(src: Path) -> None:
    """Byte-compile fieldgate's modules under ``src``, as pip does when it installs the wheel
    on a gateway or hub: without it, where ``PYTHONDONTWRITEBYTECODE`` is set (this
    machine's sessions), every process of the pipeline compiles them again as it starts
    (about 0.06 CPU-s each for the uploader and the hub)."""
    if not compileall.compile_dir(src / "fieldgate", quiet=1):
        raise SystemExit(f"bench: cannot byte-compile {src / 'fieldgate'}")


def hub_command(src: Path | None) -> tuple[list[str], dict[str, str] | None]:
    """How to run ``fieldgate hub``: this tree's, or the glue/src of another tree."""
    if src is None:
        return [FIELDGATE, "hub"], None
    code = "import sys; from fieldgate.cli import main; sys.exit(main())"
    return [sys.executable, "-c", code, "hub"], {**os.environ, "PYTHONPATH": str(src)}


class Run(NamedTuple):
    """One pipeline run: wall seconds, CPU seconds of the uploader and of the hub (its
    start and stop included), the hub's CPU seconds during the upload alone, and how many
    readings the hub holds afterwards."""

    wall: float
    uploader_cpu: float
    hub_cpu: float
    hub_during: float
    held: int


def pipeline(
    root: Path,
    db: Path,
    batch_rows: int,
    workers: int,
    profile: bool = False,
    hub_src: Path | None = None,
) -> Run:
    """Batch + upload + hub ingest of every reading (:class:`Run`). With
    ``profile`` the uploader runs under cProfile (profile_uploader.py): slower, and its
    summary is printed. ``hub_src``: run the hub of that glue/src instead of this tree's."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    hub_db = root / "hub.db"
    hub_log = (root / "hub.log").open("wb")
    hub_cmd, hub_env = hub_command(hub_src)
    hub = subprocess.Popen(
        [
            *hub_cmd,
            "serve",
            "--db",
            str(hub_db),
            "--listen",
            f"127.0.0.1:{port}",
            "--workers",
            str(workers),
        ],
        stdout=hub_log,
        stderr=subprocess.STDOUT,
        env=hub_env,
    )
    try:
        wait_for_port(port)
        cfg = root / "fieldgate.yaml"
        cfg.write_text(
            yaml.safe_dump(
                {
                    "site": {"serial": SERIAL},
                    "store": {"path": str(db)},
                    "upload": {
                        "url": f"http://127.0.0.1:{port}",
                        "key_file": str(root / "gateway_key"),
                        "batch_max_rows": batch_rows,
                        "pending_dir": str(root / "pending"),
                        "uploaded_dir": str(root / "uploaded"),
                    },
                    "log": {"level": os.environ.get("BENCH_LOG", "WARNING")},
                }
            )
        )
        pin = run(
            [*hub_cmd, "pin", "--db", str(hub_db), "--serial", SERIAL], env=hub_env
        ).stdout
        run([FIELDGATE, "--config", str(cfg), "register", "--pin", pin.strip()])
        hub_start = _tree_cpu(hub.pid)
        cpu0 = _children_cpu()
        t = time.perf_counter()
        uploader = [FIELDGATE]
        if profile:
            uploader = [sys.executable, str(PROFILER), str(root / "uploader.prof")]
        up = run([*uploader, "--config", str(cfg), "upload", "--once"])
        if os.environ.get("BENCH_LOG") or profile:
            print(up.stderr)
        elapsed = time.perf_counter() - t
        uploader_cpu = _children_cpu() - cpu0
        hub_running = _tree_cpu(hub.pid)
    finally:
        hub.terminate()
        hub.wait(30)
        hub_log.close()
    cpu = _children_cpu() - cpu0
    print(
        f"  CPU seconds: uploader {uploader_cpu:.2f}, hub {cpu - uploader_cpu:.2f} (with its "
        f"start and stop: {hub_start:.2f} before the upload began, "
        f"{hub_running - hub_start:.2f} during it, "
        f"{cpu - uploader_cpu - hub_running:.2f} to stop)"
    )
    conn = sqlite3.connect(str(hub_db))
    held = conn.execute(
        "SELECT COUNT(*) FROM readings WHERE serial = ?", (SERIAL,)
    ).fetchone()[0]
    conn.close()
    return Run(
        elapsed, uploader_cpu, cpu - uploader_cpu, hub_running - hub_start, int(held)
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument(
        "--batch-rows", type=int, default=50_000, help="upload.batch_max_rows"
    )
    ap.add_argument("--workers", type=int, default=2, help="hub workers")
    ap.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="baseline / pipeline pairs, alternately; the median of each ratio is the verdict",
    )
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="run the uploader under cProfile and print where its CPU goes (one pair; not "
        "for timing)",
    )
    ap.add_argument(
        "--hub-ref",
        help="first run the pipeline against the hub of this git ref (the same uploader), "
        "and print both hubs' CPU seconds",
    )
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fieldgate-bench-upload-"))
    try:
        t = time.perf_counter()
        base_db = root / "baseline.db"
        load(base_db, args.rows)
        print(f"loaded {args.rows} readings in {time.perf_counter() - t:.1f} s")
        compile_glue(Path(store.__file__).parents[1])
        load_before = os.getloadavg()[0]
        ref_hub = None
        if args.hub_ref:
            src = root / "ref"
            src.mkdir()
            archive = subprocess.run(
                ["git", "archive", args.hub_ref, "glue/src"],
                capture_output=True,
                check=True,
            ).stdout
            subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
            compile_glue(src / "glue" / "src")
            ref_db = root / "ref.db"
            shutil.copyfile(base_db, ref_db)
            print(f"hub of {args.hub_ref}:")
            ref = pipeline(
                root / "ref-run", ref_db, args.batch_rows, args.workers,
                hub_src=src / "glue" / "src",
            )  # fmt: skip
            ref_hub = ref.hub_cpu
            if ref.held != args.rows:
                print(f"FAIL: {args.hub_ref}'s hub holds {ref.held} readings")
                return 1
            print("this tree's hub:")
        # per pair: the wall ratio, the CPU ratio, the CPU ratio with the hub in service
        pairs: list[tuple[float, float, float]] = []
        hub_cpus: list[float] = []
        for n in range(1, (1 if args.profile else args.repeat) + 1):
            pipe_db = root / f"pipeline{n}.db"
            shutil.copyfile(base_db, pipe_db)
            b, b_cpu = baseline(base_db, root / "baseline.zip")
            r = pipeline(
                root / f"run{n}", pipe_db, args.batch_rows, args.workers, args.profile
            )
            pipe_db.unlink()
            if r.held != args.rows:
                print(f"FAIL: the hub holds {r.held} readings, expected {args.rows}")
                return 1
            p, p_cpu = r.wall, r.uploader_cpu + r.hub_cpu
            pairs.append(
                (b / p, p_cpu / b_cpu, (r.uploader_cpu + r.hub_during) / b_cpu)
            )
            hub_cpus.append(r.hub_cpu)
            print(
                f"pair {n}: baseline (store -> CSV -> zip, local) {b:.2f} s, "
                f"{args.rows / b:.0f} rows/s, {b_cpu:.2f} CPU-s; pipeline (batch + upload + "
                f"hub ingest, {args.batch_rows} rows/batch) {p:.2f} s, {args.rows / p:.0f} "
                f"rows/s, {p_cpu:.2f} CPU-s (uploader {r.uploader_cpu:.2f} + hub "
                f"{r.hub_cpu:.2f}); ratio {b / p:.2f}, CPU {p_cpu / b_cpu:.2f}x; "
                f"load {os.getloadavg()[0]:.1f}",
                flush=True,
            )

        def median(i: int) -> float:
            return sorted(pair[i] for pair in pairs)[len(pairs) // 2]

        print(
            f"ratio pipeline/baseline: {median(0):.2f} (target >= 0.7), "
            f"the median of {len(pairs)} pairs"
        )
        print(
            f"CPU seconds pipeline (uploader + hub) / baseline: {median(1):.2f}x "
            f"(target <= 2), the median of {len(pairs)} pairs"
        )
        print(
            f"  the hub in service (its start and stop left out, which a hub pays once a "
            f"boot; the uploader whole): {median(2):.2f}x"
        )
        every = ", ".join(f"{w:.2f} / {c:.2f}x" for w, c, _ in pairs)
        print(
            f"every pair (ratio / CPU): {every}; {os.cpu_count()} cores, load average "
            f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
        )
        b6, _ = baseline(base_db, root / "baseline6.zip", level=6)
        print(
            f"(for reference: the same export at zip's default deflate level 6 takes {b6:.2f} s, "
            f"{args.rows / b6:.0f} rows/s)"
        )
        print(f"the hub held {args.rows} readings after each run")
        if ref_hub is not None:
            hub_cpu = sorted(hub_cpus)[len(hub_cpus) // 2]
            print(
                f"hub CPU seconds: this tree {hub_cpu:.2f} (the median of {len(hub_cpus)}), "
                f"{args.hub_ref} {ref_hub:.2f} ({hub_cpu / ref_hub:.2f}x)"
            )
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
