"""The hub's storage on both backends below the web app: retention, the last heartbeat,
schema migration (an old SQLite hub database comes along), and choosing and opening a
PostgreSQL database (URLs, passwords, one clear line for every mistake)."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from pathlib import Path

import pytest
import requests
from support import Hub, make_user, query_db, run_fieldgate, wait_until

from fieldgate import store
from fieldgate.errors import FieldgateError
from fieldgate.hub.backends import open_storage
from fieldgate.hub.sqlite_storage import MIGRATIONS
from fieldgate.hub.storage import IngestError
from fieldgate.store import now_ms

DAY = 86_400_000


def test_retention_deletes_old_readings_in_small_batches(hub_db: str) -> None:
    st = open_storage(hub_db)
    now = now_ms()
    old = [("D1", now - 40 * DAY + i * 1000, "t", float(i)) for i in range(1200)]
    new = [("D1", now - DAY + i * 1000, "t", float(i)) for i in range(300)]
    other = [("D2", now - 35 * DAY + i, "h", 1.0) for i in range(50)]
    assert st.ingest("GW-R", "b-1", iter(old + new + other)) == 1550
    assert st.ingest("GW-R", "b-t", iter([("D3", now - 50 * DAY, "x", 1.0)]), test=True) == 1
    calls: list[float] = []
    from fieldgate.hub.retention import prune

    deleted, cutoff = prune(st, 30, batch_rows=500, pause=lambda secs: calls.append(secs) or False)
    assert deleted == 1251
    assert now - 30 * DAY - 5000 < cutoff <= now_ms() - 30 * DAY
    assert len(calls) >= 4  # 1200 in batches of 500 and two more series, a pause after each
    assert st.extent("GW-R") == [
        {"device": "D1", "metric": "t", "first_ts": new[0][1], "last_ts": new[-1][1], "count": 300}
    ]
    gw = st.gateway("GW-R")
    assert gw is not None
    assert (gw["rows"], gw["test_rows"]) == (300, 0)
    assert query_db(hub_db, "SELECT COUNT(*) FROM readings") == [(300,)]
    assert prune(st, 30)[0] == 0
    # a late batch with old readings is taken again by the next pass
    assert st.ingest("GW-R", "b-2", iter(old[:10])) == 10
    assert prune(st, 30)[0] == 10
    st.close()


def test_hub_prune_and_serve_with_retention(hub_db: str, tmp_path: Path) -> None:
    st = open_storage(hub_db)
    now = now_ms()
    st.ingest("GW-R", "b-1", iter([("D", now - 10 * DAY + i, "t", 1.0) for i in range(100)]))
    st.ingest("GW-R", "b-2", iter([("D", now - 3 * DAY + i, "t", 1.0) for i in range(100)]))
    st.close()
    r = run_fieldgate("hub", "prune", "--db", hub_db, "--days", "7")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("pruned 100 readings older than ")
    assert r.stdout.endswith(" (7 days)\n")
    hub = Hub(tmp_path / "hub", hub_db, extra_args=["--retention-days", "2"])
    hub.start()
    try:
        wait_until(lambda: hub.readings("GW-R") == 0, timeout=60, what="retention at the hub")
        wait_until(lambda: "retention: deleted 100 readings" in hub.log_text(), timeout=30)
        auth = make_user(hub.db, "root", admin=True)
        r = requests.get(f"{hub.url}/api/v1/extent?serial=GW-R", auth=auth, timeout=60)
        assert r.json() == {"serial": "GW-R", "series": []}
    finally:
        hub.stop()
    for args, words in (
        (("--days", "0"), "--days must be more than 0"),
        (("--days", "x"), "invalid float value"),
    ):
        r = run_fieldgate("hub", "prune", "--db", hub_db, *args)
        assert r.returncode != 0 and words in r.stderr, r.stderr


def test_the_last_heartbeat_is_kept(hub: Hub) -> None:
    """What the heartbeat endpoint (the web pages' issue) will store, ready in both
    backends and shown by the gateway summaries."""
    st = open_storage(hub.db)
    st.create_pin("GW-H", 60)
    st.record_heartbeat("GW-H", {"collector": {"state": "running"}, "backlog": 12})
    st.close()
    auth = make_user(hub.db, "root", admin=True)
    gw = requests.get(f"{hub.url}/api/v1/gateways/GW-H", auth=auth, timeout=60).json()
    assert gw["status"] == {"collector": {"state": "running"}, "backlog": 12}
    assert gw["last_heartbeat"] is not None
    assert gw["last_seen"] == gw["last_heartbeat"]


def test_names_with_nul_are_refused_on_both_backends(hub_db: str) -> None:
    st = open_storage(hub_db)
    for row in (("D\x00", 1, "t", 1.0), ("D", 1, "t\x00", 1.0)):
        with pytest.raises(IngestError, match="not acceptable"):
            st.ingest("GW-N", f"b-{row[0]!r}{row[2]!r}", iter([("D", 0, "t", 1.0), row]))
    assert query_db(hub_db, "SELECT COUNT(*) FROM readings") == [(0,)]
    st.close()


def test_sqlite_ingests_queue_on_a_lock_file_the_hub_user_can_open(tmp_path: Path) -> None:
    # root (``hub import``) ingests into the database of the hub's user: the lock file it
    # creates goes to that user, who can still take it
    db = tmp_path / "hub.db"
    open_storage(str(db)).close()
    os.chown(db, 65534, 65534)
    st = open_storage(str(db))
    assert st.ingest("GW-L", "b-1", iter([("D", 0, "t", 1.0)])) == 1
    st.close()
    lock = tmp_path / "hub.db-ingest"
    assert (lock.stat().st_uid, lock.stat().st_gid, lock.stat().st_mode & 0o777) == (
        65534,
        65534,
        0o644,
    )
    # while the lock is held (SQLite itself is free), an ingest waits until it is let go
    st = open_storage(str(db))
    with lock.open("rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        waiting = threading.Thread(
            target=lambda: st.ingest("GW-L", "b-2", iter([("D", 1, "t", 1.0)]))
        )
        waiting.start()
        waiting.join(1.0)
        assert waiting.is_alive()
        assert query_db(str(db), "SELECT COUNT(*) FROM readings") == [(1,)]
    waiting.join(30)
    assert not waiting.is_alive()
    assert query_db(str(db), "SELECT COUNT(*) FROM readings") == [(2,)]
    st.close()


def test_sqlite_refuses_a_bad_batch_before_it_waits_for_the_lock(tmp_path: Path) -> None:
    # a batch is read and checked before its ingest queues for the write lock: a hostile
    # name or a wrong count is refused while another ingest holds the lock (it would wait
    # for as long as that took if it were refused inside the transaction)
    db = tmp_path / "hub.db"
    st = open_storage(str(db))
    assert st.ingest("GW-Q", "b-0", iter([("D", 0, "t", 1.0)])) == 1
    refused: list[str] = []

    def bad_batches() -> None:
        for rows, expected in (
            ([("D", 1, "t", 1.0), ("bad name", 2, "t", 1.0)], None),
            ([("D", 1, "t", 1.0), ("D", 2, "t", 1.0)], 3),
        ):
            try:
                st.ingest("GW-Q", f"b-{len(refused) + 1}", iter(rows), expected_rows=expected)
            except IngestError as exc:
                refused.append(str(exc))

    with (tmp_path / "hub.db-ingest").open("rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        t = threading.Thread(target=bad_batches)
        t.start()
        t.join(120)  # under any load: it never needs the lock held here
        assert not t.is_alive(), "an ingest of a bad batch waited for the ingest lock"
    assert len(refused) == 2
    assert "'bad name' is not acceptable" in refused[0]
    assert "announces 3 readings but readings.csv holds 2" in refused[1]
    assert query_db(str(db), "SELECT COUNT(*) FROM readings") == [(1,)]
    assert query_db(str(db), "SELECT COUNT(*) FROM batches") == [(1,)]
    st.close()


def test_an_old_sqlite_hub_database_is_migrated(tmp_path: Path) -> None:
    """A hub database of schema version 1 (one wide readings table) keeps every reading,
    batch and key when this version opens it."""
    db = tmp_path / "hub.db"
    conn = sqlite3.connect(db, isolation_level=None)
    for statement in store._statements(MIGRATIONS[1]):
        conn.execute(statement)
    conn.execute("INSERT INTO meta VALUES ('hub_schema_version', '1')")
    conn.execute(
        "INSERT INTO gateways (serial, created_at, rows, batches) VALUES ('GW-1', 1, 5, 2)"
    )
    conn.execute(
        "INSERT INTO gateway_keys (key_hash, serial, created_at) VALUES ('abc', 'GW-1', 1)"
    )
    for seq, batch, test in ((1, "b-1", 0), (2, "b-2", 1)):
        conn.execute(
            "INSERT INTO batches (seq, serial, batch_id, state, rows, new_rows, test, stored_at) "
            "VALUES (?, 'GW-1', ?, 'stored', 3, 3, ?, 1)",
            (seq, batch, test),
        )
    rows = [
        ("GW-1", "TH-1", 1000, "t", 1.5, "b-1", 0),
        ("GW-1", "TH-1", 2000, "t", 2.5, "b-1", 0),
        ("GW-1", "TH-2", 1000, "h", 40.0, "b-1", 0),
        ("GW-1", "TH-1", 3000, "t", 3.5, "b-2", 1),
        ("GW-1", "TH-2", 500, "h", 41.0, "b-2", 1),
    ]
    conn.executemany("INSERT INTO readings VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    conn.close()
    st = open_storage(str(db))
    assert sorted(query_db(str(db), "SELECT * FROM readings")) == sorted(rows)
    assert st.extent("GW-1") == [
        {"device": "TH-1", "metric": "t", "first_ts": 1000, "last_ts": 3000, "count": 3},
        {"device": "TH-2", "metric": "h", "first_ts": 500, "last_ts": 1000, "count": 2},
    ]
    gw = st.gateway("GW-1")
    assert gw is not None and gw["domain"] == "default" and gw["rows"] == 5
    assert st.ingest("GW-1", "b-3", iter([("TH-1", 1000, "t", 9.0), ("TH-1", 4000, "t", 4.0)])) == 1
    version = [(str(max(MIGRATIONS)),)]
    assert query_db(str(db), "SELECT value FROM meta WHERE key = 'hub_schema_version'") == version
    st.close()


def test_opening_postgresql(pg_server: object, tmp_path: Path) -> None:
    import pgserver

    server: pgserver.PgServer = pg_server  # type: ignore[assignment]
    name, other, empty = (server.new_database() for _ in range(3))
    url = server.url(name)
    try:
        secret = tmp_path / "pgpass"
        secret.write_text(pgserver.PASSWORD + "\n")
        env = {"PGPASSWORD": ""}
        r = run_fieldgate(
            "hub",
            "pin",
            "--db",
            url,
            "--db-password-file",
            str(secret),
            "--serial",
            "GW-1",
            "--create",
            env=env,
        )
        assert r.returncode == 0, r.stderr
        host = url.split("@")[1]
        for args, words in (
            (
                ("--db", f"postgresql://{pgserver.USER}:hunter2@{host}"),
                "contains a password; give it in --db-password-file, PGPASSWORD or ~/.pgpass",
            ),
            (
                ("--db", url, "--db-password-file", str(tmp_path / "none")),
                "cannot read the database",
            ),
            (("--db", url), "cannot connect to the hub database postgresql://127.0.0.1:"),
            (("--db", url + "_nope"), "cannot connect"),
            (
                ("--db", str(tmp_path / "x.db"), "--db-password-file", str(secret)),
                "is for a postgresql",
            ),
        ):
            r = run_fieldgate("hub", "user", "list", *args, env={"PGPASSWORD": "wrong"})
            assert r.returncode == 1, r
            assert r.stderr.startswith("fieldgate: error: ") and r.stderr.count("\n") == 1, r.stderr
            assert words in r.stderr, r.stderr
            assert "hunter2" not in r.stderr and "wrong" not in r.stderr
        # a database of another program is not taken over; an empty one is not created
        # by commands that only read
        server.psql("CREATE TABLE stuff (x int)", other)
        with pytest.raises(FieldgateError, match="is not a fieldgate hub database"):
            open_storage(server.url(other))
        with pytest.raises(FieldgateError, match="holds no hub tables yet"):
            open_storage(server.url(empty), create=False)
        server.psql("UPDATE meta SET value = '99' WHERE key = 'hub_schema_version'", name)
        with pytest.raises(FieldgateError, match="schema version 99, newer than this fieldgate"):
            open_storage(url)
    finally:
        for db in (name, other, empty):
            server.drop_database(db)
