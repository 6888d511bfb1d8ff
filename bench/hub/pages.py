"""Benchmark: the hub's pages, against the bare health check and the JSON API of the same
data, in the same run, on SQLite and on PostgreSQL 15 (a durable server started here).

For each backend, a hub (``fieldgate hub serve``, 2 workers) over a database holding

- **a fleet** of G gateways (default 1,000), each with a heartbeat (a full status as
  ``fieldgate status --json`` writes it) and one stored batch;
- **a gateway with 7 days of 1 Hz readings** of one device and two metrics (604,800
  readings each).

A logged-in session (the login form's cookie, as a browser holds it) then asks N times
(default 7, after one warm-up) for: ``/api/v1/health`` (the baseline: no database work
beyond one count), ``/api/v1/gateways`` (the fleet as JSON), ``/`` (the fleet page),
``/gateways/GW-Q?window=7d`` (the gateway page) and the two chart data requests that page
makes (its 7 days bucketed by the server), plus the issue-12 query (``every=60`` over the
7 days, 10,080 buckets) for comparison. Then the cost of keeping the per-minute rollups:
a 250,000-reading batch ingested in process with and without their upkeep, alternating. Prints the median time of each (client wall time
over loopback: the server's time plus a loopback round trip), its ratio to the health
check, and the gateway page's total (HTML + both charts' data: what a viewer waits for,
counted as if the requests ran one after the other). Target: <= 200 ms per page.

Run from the repository root (as root: PostgreSQL runs as the postgres user):

    .venv/bin/python bench/hub/pages.py [--gateways 1000] [--days 7] [--repeat 7]
"""

from __future__ import annotations

import argparse
import html
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests
from fieldgate.hub.backends import open_storage
from fieldgate.hub.passwords import hash_password

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import T0, HubProc, load_week, pgserver, readings  # the hub bench's helpers

PASSWORD = "bench-password"


def a_status(serial: str, i: int) -> dict[str, Any]:
    """A status as ``fieldgate status --json`` writes it (about 2 KB)."""
    fact = {"value": "running", "updated": "2026-12-05T10:00:00Z", "age_secs": 3.0}
    return {
        "site": serial,
        "store": {
            "path": "/var/lib/fieldgate/data_store.db",
            "exists": True,
            "size_bytes": 10**8,
        },
        "disk": {"path": "/var/lib/fieldgate", "used_percent": 20 + i % 70},
        "readings": {"total": 10**6 + i, "unbatched": i % 500},
        "rejected": {
            "total": i % 7,
            "top_reasons": [{"reason": "not a number", "count": i % 7}],
        },
        "devices": [
            {
                "device": f"TH-{d:03d}",
                "readings": 10**4,
                "last_ts": T0,
                "last_reading": "x",
            }
            for d in range(8)
        ],
        "collector": {"state": fact, "heartbeat": fact},
        "poller": {"state": None},
        "inputs": [
            {"topic": "fieldgate/+/data", "format": "fieldgate", "messages": 10**5}
        ],
        "batches": {"pending": i % 3, "uploaded": 1000, "oldest_pending": None},
        "upload": {
            "mode": "LIVE",
            "interval_secs": 300,
            "last_success": fact,
            "last_error": {**fact, "value": "cannot reach the hub"}
            if i % 50 == 0
            else None,
            "rejected_by_hub": None,
        },
        "export": {"state": {**fact, "value": "normal_operation"}, "last_result": None},
        "power": {"last_event": None},
        "events": [{"at": "2026-12-05T09:00:00Z", "kind": "disk", "message": "ok"}] * 5,
    }


def fill(db: str, gateways: int, days: int) -> float:
    """The fleet and the 7-day gateway; seconds it took."""
    t = time.perf_counter()
    st = open_storage(db)
    try:
        for i in range(gateways):
            serial = f"GW-{i:04d}"
            st.set_domain(serial, f"domain-{i % 10}")
            st.ingest(
                serial,
                "b-1",
                [("TH-001", T0 + k * 1000, "t", 20.0 + k) for k in range(10)],
            )
            if i % 97 != 0:  # a few never sent a heartbeat
                st.record_heartbeat(serial, a_status(serial, i))
        load_week(st, days)
        st.record_heartbeat("GW-Q", a_status("GW-Q", 1))
        st.add_user("bench", hash_password(PASSWORD, n=2**10), [], admin=True)
    finally:
        st.close()
    return time.perf_counter() - t


def median_secs(session: requests.Session, url: str, repeat: int) -> tuple[float, str]:
    """Median wall time of GET url (after one warm-up), and the last answer's text."""
    times = []
    text = ""
    for k in range(repeat + 1):
        t = time.perf_counter()
        r = session.get(url, timeout=600)
        elapsed = time.perf_counter() - t
        if r.status_code != 200:
            raise SystemExit(f"bench: GET {url} -> {r.status_code}: {r.text[:300]}")
        text = r.text
        if k:
            times.append(elapsed)
    return statistics.median(times), text


def measure(
    label: str, db: str, root: Path, gateways: int, days: int, repeat: int
) -> None:
    loaded = fill(db, gateways, days)
    hub = HubProc(root / f"hub-{label}", db, None, ["--workers", "2"])
    hub.start()
    try:
        s = requests.Session()
        r = s.post(
            f"{hub.url}/api/v1/login", json={"name": "bench", "password": PASSWORD}
        )
        assert r.status_code == 200, r.text
        base = hub.url
        results: dict[str, float] = {}
        results["health (baseline)"], _ = median_secs(
            s, f"{base}/api/v1/health", repeat
        )
        results["fleet JSON /api/v1/gateways"], fleet_json = median_secs(
            s, f"{base}/api/v1/gateways", repeat
        )
        results["fleet page /"], page = median_secs(s, f"{base}/", repeat)
        shown = page.count('class="gateway ')
        assert shown == len(eval_json(fleet_json)) == gateways + 1, shown
        results["gateway page HTML (7d)"], gw = median_secs(
            s, f"{base}/gateways/GW-Q?window={days}d", repeat
        )
        charts = [html.unescape(u) for u in re.findall(r'data-src="([^"]+)"', gw)]
        assert len(charts) == 2, charts
        for k, url in enumerate(charts):
            secs, data = median_secs(s, base + url, repeat)
            buckets = eval_json(data, "readings")
            assert sum(b["count"] for b in buckets) == days * 86_400, url
            results[f"chart {k + 1} data ({len(buckets)} buckets)"] = secs
        q = (
            f"{base}/api/v1/readings?serial=GW-Q&device=TH-1&metric=temperature"
            f"&from={T0}&to={T0 + days * 86_400_000}&every=60"
        )
        results[f"every=60 over {days} days (issue 12)"], _ = median_secs(s, q, repeat)
    finally:
        hub.stop()
    health = results["health (baseline)"]
    total = sum(
        v for k, v in results.items() if k.startswith(("gateway page", "chart"))
    )
    print(
        f"\n{label}: loaded {gateways} gateways and 2 x {days * 86_400} readings in "
        f"{loaded:.0f} s; median of {repeat}, load {os.getloadavg()[0]:.1f}"
    )
    for name, secs in results.items():
        print(f"  {name:42s} {secs * 1000:8.1f} ms  {secs / health:6.1f} x health")
    print(
        f"  {'gateway page, HTML + both charts':42s} {total * 1000:8.1f} ms  (target <= 200 ms)"
    )
    print(
        f"  {'fleet page':42s} {results['fleet page /'] * 1000:8.1f} ms  (target <= 200 ms)"
    )


def eval_json(text: str, key: str = "gateways") -> list[dict[str, Any]]:
    import json

    return list(json.loads(text)[key])


def rollup_cost(label: str, db: str, rows: int, rounds: int) -> None:
    """Ingest wall time of a batch of ``rows`` readings (50 devices x 4 metrics, one a
    minute, like bench/hub/run.py) with the rollups kept, and with their upkeep switched
    off for the comparison, alternating, in the same database."""
    st = open_storage(db)
    times: dict[bool, list[float]] = {True: [], False: []}
    keep = st._add_rollups  # type: ignore[attr-defined]
    try:
        for k in range(rounds):
            for rollups in (False, True):
                st._add_rollups = keep if rollups else (lambda per_series: None)  # type: ignore[attr-defined]
                t = time.perf_counter()
                st.ingest(f"GW-R{k}-{rollups}", "b-1", readings(rows, T0))
                times[rollups].append(time.perf_counter() - t)
    finally:
        st.close()
    without, with_ = statistics.median(times[False]), statistics.median(times[True])
    print(
        f"  {label:10s}: {rows} readings per batch, median of {rounds}: without rollups "
        f"{without:.2f} s ({rows / without:,.0f} rows/s), with {with_:.2f} s "
        f"({rows / with_:,.0f} rows/s): {with_ / without:.2f} x"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gateways", type=int, default=1000)
    ap.add_argument("--days", type=int, default=7)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument(
        "--backend", choices=("sqlite", "postgresql", "both"), default="both"
    )
    ap.add_argument(
        "--ingest-rows", type=int, default=250_000, help="per batch (rollup cost)"
    )
    ap.add_argument("--ingest-rounds", type=int, default=3)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fieldgate-bench-pages-"))
    print(
        f"{os.cpu_count()} cores, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    server = None
    try:
        if args.backend in ("sqlite", "both"):
            measure(
                "sqlite",
                str(root / "hub.db"),
                root,
                args.gateways,
                args.days,
                args.repeat,
            )
        if args.backend in ("postgresql", "both"):
            server = pgserver.start(durable=True)
            os.environ["PGPASSWORD"] = pgserver.PASSWORD
            db = server.url(server.new_database())
            measure("postgresql", db, root, args.gateways, args.days, args.repeat)
        print("\ningest with the rollups kept against without (in process):")
        if args.backend in ("sqlite", "both"):
            rollup_cost(
                "sqlite", str(root / "ingest.db"), args.ingest_rows, args.ingest_rounds
            )
        if server is not None:
            db = server.url(server.new_database())
            rollup_cost("postgresql", db, args.ingest_rows, args.ingest_rounds)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
