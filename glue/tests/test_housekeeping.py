"""A gateway that runs for years: collection, upload and prune cycles keep the store file and
the batch directory at a steady size, nothing the hub has not stored is deleted, and the USB
export log is rotated."""

from __future__ import annotations

import json
import signal
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from support import (
    Broker,
    ConfigFactory,
    Hub,
    count_rows,
    publish,
    run_fieldgate,
    start_fieldgate,
    stop_process,
    wait_until,
)

from fieldgate.config import Config, load_config
from fieldgate.usb.watcher import ExportLog

T0 = 1_767_225_600_000  # 2026-01-01
DAY = 86_400_000
RETENTION_DAYS = 3
DAYS = 12
MESSAGES_PER_DAY = 300
METRICS = ("temperature", "humidity", "pressure")


@dataclass(frozen=True)
class Footprint:
    """What a day of running leaves on the gateway's disk, after the daily prune: the store's
    file and its write-ahead log apart (the prune empties the log, but the running collector
    may write its heartbeat into it before the figures are taken)."""

    store_bytes: int
    wal_bytes: int
    uploaded_dir_bytes: int
    readings: int
    batches: int
    rejected: int
    events: int


def footprint(cfg: Config) -> Footprint:
    uploaded = list(Path(cfg.upload.uploaded_dir).glob("*.zip"))
    db = Path(cfg.store.path)
    wal = db.with_name(db.name + "-wal")
    return Footprint(
        db.stat().st_size,
        wal.stat().st_size if wal.exists() else 0,
        sum(p.stat().st_size for p in uploaded),
        count_rows(db, "readings"),
        count_rows(db, "batches"),
        count_rows(db, "rejected"),
        count_rows(db, "events"),
    )


def day_of_messages(day: int) -> list[tuple[str, bytes | str]]:
    """A day of readings from one device (three metrics each) and one malformed message."""
    messages: list[tuple[str, bytes | str]] = [
        (
            "fieldgate/TH-001/readings",
            json.dumps(
                {
                    "ts": T0 + day * DAY + i * 1000,
                    "metrics": {m: 20.0 + day + i / 1000 for m in METRICS},
                }
            ),
        )
        for i in range(MESSAGES_PER_DAY)
    ]
    messages.append(("fieldgate/TH-001/readings", b"{not json"))
    return messages


def a_day_passes(cfg: Config) -> None:
    """Move every time the gateway recorded one day into the past: for prune, the same as the
    clock moving a day on."""
    conn = sqlite3.connect(cfg.store.path, timeout=30)
    with conn:
        conn.execute(
            "UPDATE batches SET created_at = created_at - ?, uploaded_at = uploaded_at - ?",
            (DAY, DAY),
        )
        conn.execute("UPDATE rejected SET received_at = received_at - ?", (DAY,))
        conn.execute("UPDATE events SET at = at - ?", (DAY,))
    conn.close()


def test_a_store_at_steady_state_stops_growing(
    mosquitto: Broker, hub: Hub, config_file: ConfigFactory, tmp_path: Path
) -> None:
    config = config_file(
        broker=mosquitto,
        overrides={
            "store": {"retention_days": RETENTION_DAYS},
            "upload": {"url": hub.url, "batch_max_rows": 400},
        },
    )
    cfg = load_config(str(config))
    hub.register(config)
    db = Path(cfg.store.path)
    rows_per_day = MESSAGES_PER_DAY * len(METRICS)
    collector = start_fieldgate("collect", config=config, log=tmp_path / "collect.log")
    days: list[Footprint] = []
    try:
        wait_until(
            lambda: count_rows(db, "state", "key = 'collector.state' AND value = 'running'") == 1,
            what="the collector subscribed",
        )
        for day in range(DAYS):
            a_day_passes(cfg)
            publish(mosquitto, day_of_messages(day))
            start, end = T0 + day * DAY, T0 + (day + 1) * DAY
            wait_until(
                lambda s=start, e=end: (
                    count_rows(db, "readings", f"ts >= {s} AND ts < {e}") == rows_per_day
                ),
                what=f"day {day} in the store",
            )
            wait_until(
                lambda d=day: count_rows(db, "rejected") == min(d, RETENTION_DAYS) + 1,
                what=f"day {day}'s malformed message kept",
            )
            r = run_fieldgate("upload", "--once", config=config)
            assert r.returncode == 0, r.stderr
            r = run_fieldgate("prune", config=config)
            assert r.returncode == 0, r.stderr
            days.append(footprint(cfg))
    finally:
        assert stop_process(collector, signal.SIGTERM) == 0
    for day, d in enumerate(days):  # the figures (pytest -s shows them)
        print(f"day {day:2d}: {d}")

    # every reading reached the hub once; the gateway deleted only what the hub had
    assert hub.readings("GW-TEST") == DAYS * rows_per_day
    # from the day a retention's worth is kept, the store holds as many readings every day
    full = days[RETENTION_DAYS - 1 :]
    assert {d.readings for d in full} == {RETENTION_DAYS * rows_per_day}, days
    assert {(d.batches, d.rejected) for d in full} == {(full[0].batches, RETENTION_DAYS)}, days
    # once the prune events of a retention are kept too, nothing grows any more: the store
    # file (freed pages are reused) and the uploaded batch files (their sizes differ by the
    # bytes their values compress to) stay where they are, day after day
    settled = days[2 * RETENTION_DAYS - 1 :]
    assert len({(d.readings, d.batches, d.rejected, d.events) for d in settled}) == 1, days
    # the readings' B-trees (deleted at the old end, appended at the new one) take one more
    # retention to settle: with batch membership by id range they allocate their last page
    # on day 7 (in a 30-day run the file then stays at that size from day 7 to day 29)
    filled = days[3 * RETENTION_DAYS - 1 :]
    assert max(d.store_bytes for d in filled) == filled[0].store_bytes, days
    # and the log holds at most the few pages written since the prune's checkpoint
    assert max(d.wal_bytes for d in filled) <= 64 * 1024, days
    assert max(d.uploaded_dir_bytes for d in settled) <= settled[0].uploaded_dir_bytes * 1.01


def test_the_usb_export_log_is_rotated_and_bounded(tmp_path: Path) -> None:
    path = tmp_path / "log" / "usb_exporter.log"
    log = ExportLog(path, max_bytes=2000, backups=2)
    try:
        for i in range(500):
            log.line(f"sdb1: step {i:04d}")
    finally:
        log.close()
    files = sorted(p.name for p in path.parent.iterdir())
    assert files == ["usb_exporter.log", "usb_exporter.log.1", "usb_exporter.log.2"]
    assert all((path.parent / f).stat().st_size <= 2000 for f in files)
    last = path.read_text().splitlines()[-1]
    assert last.endswith("sdb1: step 0499")
    assert last[:20].endswith("Z")  # one UTC-stamped line per step, as before
    # nothing lost between the files that are kept: the newest lines run on without a gap
    kept = [
        int(line.rsplit(" ", 1)[1])
        for f in reversed(files)
        for line in (path.parent / f).read_text().splitlines()
    ]
    assert kept == list(range(kept[0], 500))
