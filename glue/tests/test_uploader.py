"""The uploader end to end: real gateway store, real ``fieldgate upload`` processes, a real hub
(gunicorn) on loopback, real HTTP; crashes placed with SIGKILL, faults with a loopback proxy."""

from __future__ import annotations

import contextlib
import datetime
import email.utils
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from support import (
    ConfigFactory,
    Hub,
    batch_of_each_reading,
    free_port,
    run_fieldgate,
    start_fieldgate,
    stop_process,
    wait_until,
)

from fieldgate import batches, batchfile, store
from fieldgate.config import Config, load_config
from fieldgate.hub.uploads import PIN_SERIAL_LIMIT
from fieldgate.membership import OF_BATCH
from fieldgate.uploader import HubClient, Transient, _retry_after

SERIAL = "GW-TEST"
T0 = 1_767_225_600_000


def rows(n: int, start: int = 0) -> list[store.Reading]:
    devices = ("TH-001", "TH-002", "CSV-001")
    return [
        (devices[i % 3], T0 + (start + i) * 1000, "temperature", round(15 + (start + i) * 0.01, 2))
        for i in range(n)
    ]


def fill(cfg: Config, readings: list[store.Reading]) -> None:
    conn = store.open_store(cfg.store.path, cfg.site.serial)
    with store.transaction(conn):
        store.insert_readings(conn, readings, source="test")
    conn.close()


def gateway_config(config_file: ConfigFactory, hub_url: str, **upload: object) -> Path:
    return config_file(overrides={"upload": {"url": hub_url, **upload}})


def status(config: Path) -> dict:  # type: ignore[type-arg]
    r = run_fieldgate("status", "--json", config=config)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def hub_rows(hub: Hub) -> set[tuple[str, int, str, float]]:
    return {
        (d, ts, m, v)
        for d, ts, m, v in hub.query(
            "SELECT device, ts, metric, value FROM readings WHERE serial = ?", (SERIAL,)
        )
    }


def gateway_batches(cfg: Config) -> list[tuple[str, str, int]]:
    conn = sqlite3.connect(cfg.store.path)
    try:
        return conn.execute(
            "SELECT batch_id, state, rows FROM batches ORDER BY batch_id"
        ).fetchall()
    finally:
        conn.close()


def one_line_error(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("fieldgate: error: ")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_100k_readings_arrive_exactly_once_however_often_sent(
    hub: Hub, config_file: ConfigFactory
) -> None:
    config = gateway_config(config_file, hub.url, batch_max_rows=20000)
    cfg = load_config(str(config))
    hub.register(config)
    data = rows(100_000)
    fill(cfg, data)
    r = run_fieldgate("upload", "--once", config=config)
    assert r.returncode == 0, r.stderr
    assert hub.readings(SERIAL) == 100_000
    assert hub_rows(hub) == set(data)
    sent = gateway_batches(cfg)
    assert [(s, n) for _, s, n in sent] == [("uploaded", 20000)] * 5
    assert len(list(Path(cfg.upload.uploaded_dir).glob(f"{SERIAL}-*.zip"))) == 5

    # again: the same five batches offered once more (as after a lost local mark)
    conn = sqlite3.connect(cfg.store.path)
    with conn:
        conn.execute("UPDATE batches SET state = 'pending'")
    conn.close()
    for p in Path(cfg.upload.uploaded_dir).glob(f"{SERIAL}-*.zip"):
        shutil.move(p, Path(cfg.upload.pending_dir) / p.name)
    r = run_fieldgate("upload", "--once", config=config)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("the hub already has it") == 5
    assert hub.readings(SERIAL) == 100_000

    # and again: the same readings cut into new batches by another store of this site
    other = config_file(
        name="other.yaml",
        overrides={
            "store": {"path": str(Path(cfg.store.path).with_name("other.db"))},
            "upload": {
                "url": hub.url,
                "batch_max_rows": 30000,
                "pending_dir": str(Path(cfg.upload.pending_dir).with_name("other-pending")),
                "uploaded_dir": str(Path(cfg.upload.uploaded_dir).with_name("other-uploaded")),
            },
        },
    )
    fill(load_config(str(other)), data)
    r = run_fieldgate("upload", "--once", config=other)
    assert r.returncode == 0, r.stderr
    assert hub.readings(SERIAL) == 100_000
    assert hub.query("SELECT SUM(new_rows) FROM batches WHERE serial = ?", (SERIAL,)) == [
        (100_000,)
    ]


def test_hub_down_then_back_everything_arrives_in_order(
    hub: Hub, config_file: ConfigFactory, tmp_path: Path
) -> None:
    config = gateway_config(config_file, hub.url, batch_max_rows=700)
    cfg = load_config(str(config))
    hub.register(config)
    hub.stop()
    log = tmp_path / "upload.log"
    proc = start_fieldgate("upload", config=config, log=log)
    try:
        sent: list[store.Reading] = []
        for k in range(4):  # readings keep coming while the hub is away
            chunk = rows(1000, start=k * 1000)
            fill(cfg, chunk)
            sent += chunk
            time.sleep(0.3)
        wait_until(
            lambda: status(config)["upload"]["last_error"] is not None,
            what="the uploader to report the hub unreachable",
        )
        s = status(config)
        assert "cannot reach the hub" in s["upload"]["last_error"]["value"]
        wait_until(lambda: status(config)["readings"]["unbatched"] == 0, what="all cut")
        s = status(config)
        assert s["batches"]["pending"] >= 6  # 4000 readings in batches of at most 700
        pending = [n for _, state, n in gateway_batches(cfg) if state == "pending"]
        assert sum(pending) == 4000
        assert max(pending) <= 700
        assert s["batches"]["oldest_pending_age_secs"] >= 0
        assert hub.readings(SERIAL) == 0
        hub.start()
        more = rows(500, start=4000)
        fill(cfg, more)
        sent += more
        wait_until(lambda: hub.readings(SERIAL) == 4500, timeout=120, what="all at the hub")
        rc = stop_process(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 0
    text = log.read_text()
    assert "uploader stopped (SIGTERM)" in text
    assert "retrying" in text
    # in order: the hub stored the batches in the order the gateway cut them, and each batch
    # holds the gateway's readings of that batch
    gw = gateway_batches(cfg)
    assert all(state == "uploaded" for _, state, _ in gw)
    arrived = [b for (b,) in hub.query("SELECT batch_id FROM batches ORDER BY seq")]
    assert arrived == [b for b, _, _ in gw]
    conn = sqlite3.connect(cfg.store.path)
    for batch_id in arrived:
        at_gw = set(
            conn.execute(
                f"SELECT device, ts, metric, value FROM readings WHERE {OF_BATCH}",  # noqa: S608
                (batch_id, batch_id),
            )
        )
        at_hub = set(
            hub.query(
                "SELECT device, ts, metric, value FROM readings WHERE batch_id = ?", (batch_id,)
            )
        )
        assert at_gw == at_hub
    order = batch_of_each_reading(conn)
    conn.close()
    assert None not in order
    assert order == sorted(order)  # oldest readings in the oldest batches
    assert hub_rows(hub) == set(sent)


def test_killed_between_hub_201_and_local_mark_no_duplicate(
    hub: Hub, config_file: ConfigFactory
) -> None:
    config = gateway_config(config_file, hub.url, batch_max_rows=1000)
    cfg = load_config(str(config))
    hub.register(config)
    fill(cfg, rows(2500))
    r = run_fieldgate("upload", "--once", config=config, env={batches.CRASH_ENV: "after_put"})
    assert r.returncode == -signal.SIGKILL
    # the hub stored the first batch; the gateway never marked it
    assert hub.readings(SERIAL) == 1000
    first = gateway_batches(cfg)[0]
    assert first[1] == "pending"
    r = run_fieldgate("upload", "--once", config=config)
    assert r.returncode == 0, r.stderr
    assert f"batch {first[0]}: the hub already has it" in r.stderr
    assert hub.readings(SERIAL) == 2500
    assert hub.query("SELECT COUNT(*), SUM(rows), SUM(new_rows) FROM batches") == [(3, 2500, 2500)]
    assert [s for _, s, _ in gateway_batches(cfg)] == ["uploaded"] * 3


def test_wrong_key_is_refused_logged_once_counted_and_batch_kept(
    hub: Hub, config_file: ConfigFactory, tmp_path: Path
) -> None:
    config = gateway_config(config_file, hub.url, retry_max_secs=0.2)
    cfg = load_config(str(config))
    fill(cfg, rows(300))
    r = run_fieldgate("upload", "--once", config=config)
    assert r.returncode == 1
    line = one_line_error(r.stderr)
    assert "gateway key is not valid" in line
    assert "not delivered, kept in" in line
    s = status(config)
    assert s["upload"]["rejected_by_hub"]["value"] == "1"
    assert "gateway key is not valid" in s["upload"]["last_error"]["value"]
    assert s["batches"]["pending"] == 1
    assert len(list(Path(cfg.upload.pending_dir).glob(f"{SERIAL}-*.zip"))) == 1
    assert "POST /api/v1/batches -> 401" in hub.log_text()
    assert hub.readings(SERIAL) == 0

    # the daemon keeps the batch, says so once, and picks up a fixed key without a restart
    log = tmp_path / "upload.log"
    proc = start_fieldgate("upload", config=config, log=log)
    try:
        wait_until(lambda: hub.log_text().count("-> 401") >= 5, what="several refused retries")
        # logged once for the batch, and once for the heartbeats the same key cannot send
        lines = [x for x in log.read_text().splitlines() if "gateway key is not valid" in x]
        assert len(lines) == 2, lines
        assert sum("refused the batch manifest" in x for x in lines) == 1
        assert sum("heartbeat not sent" in x for x in lines) == 1
        hub.register(config)
        wait_until(lambda: hub.readings(SERIAL) == 300, what="delivery after registration")
        assert stop_process(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert status(config)["batches"]["pending"] == 0


def test_corrupted_batch_file_is_refused_then_regenerated(
    hub: Hub, config_file: ConfigFactory
) -> None:
    config = gateway_config(config_file, hub.url, batch_max_rows=400)
    cfg = load_config(str(config))
    hub.register(config)
    data = rows(1000)
    fill(cfg, data)
    conn = store.open_store(cfg.store.path, SERIAL)
    cut = batches.cut_all(conn, cfg)
    conn.close()
    victim = Path(cfg.upload.pending_dir) / cut[1].file
    csv_bytes, manifest = batchfile.read_zip(victim)
    bad = csv_bytes.replace(b",temperature,", b",temperature,9", 1)
    assert bad != csv_bytes
    victim.unlink()
    batches.write_zip(victim, bad, manifest)  # bit rot on the gateway's disk
    r = run_fieldgate("upload", "--once", config=config)
    assert r.returncode == 0, r.stderr
    assert "checksum mismatch" in r.stderr
    assert "regenerated from the store" in r.stderr
    assert "-> 409" in hub.log_text()
    assert hub.readings(SERIAL) == 1000
    assert hub_rows(hub) == set(data)  # the good values, not the rotten ones


def test_expired_upload_url_both_sides(
    tmp_path: Path, config_file: ConfigFactory, hub_db: str
) -> None:
    hub = Hub(tmp_path / "hub", hub_db, extra_args=["--upload-ttl-secs", "1"])
    hub.start()
    try:
        config = gateway_config(config_file, hub.url, batch_max_rows=100)
        cfg = load_config(str(config))
        hub.register(config)
        fill(cfg, rows(150))
        conn = store.open_store(cfg.store.path, SERIAL)
        cut = batches.cut_all(conn, cfg)
        conn.close()
        client = HubClient(cfg)
        url = client.offer(cut[0].manifest(SERIAL))
        assert url is not None
        time.sleep(1.5)
        with pytest.raises(Transient, match="upload URL expired"):
            client.put(url, Path(cfg.upload.pending_dir) / cut[0].file)
        client.close()
        assert hub.readings(SERIAL) == 0
        assert "expired" in hub.log_text()
        r = run_fieldgate("upload", "--once", config=config)  # fresh URLs, used at once
        assert r.returncode == 0, r.stderr
        assert hub.readings(SERIAL) == 150
    finally:
        hub.stop()


class LoopbackServer:
    """A TCP server on a free loopback port; each accepted connection goes to ``accepted``."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.sock.settimeout(0.1)
        self.held: list[socket.socket] = []
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.accepted(conn)

    def accepted(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.stopping = True
        self.thread.join(5)
        for c in self.held:
            c.close()
        self.sock.close()


class CuttingProxy(LoopbackServer):
    """A loopback TCP proxy that cuts the first PUT short (a link dropping mid-upload)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.cut = 0
        super().__init__()

    def accepted(self, conn: socket.socket) -> None:
        threading.Thread(target=self._pipe_pair, args=(conn,), daemon=True).start()

    def _pipe_pair(self, client: socket.socket) -> None:
        up = socket.create_connection(self.upstream)
        back = threading.Thread(target=self._copy, args=(up, client), daemon=True)
        back.start()
        budget: int | None = None
        try:
            while data := client.recv(65536):
                if budget is None and self.cut == 0 and b"PUT /api/v1/uploads/" in data:
                    self.cut = 1
                    budget = data.index(b"\r\n\r\n") + 4 + 3000
                if budget is not None:
                    up.sendall(data[:budget])
                    budget -= len(data[:budget])
                    if budget <= 0:
                        up.shutdown(socket.SHUT_WR)  # the hub sees a short body
                        back.join(10)  # its answer is relayed
                        # then the end of the stream; wait for the client to stop sending
                        # before closing, or the reset would discard the answer on its way
                        client.shutdown(socket.SHUT_WR)
                        client.settimeout(0.5)
                        with contextlib.suppress(TimeoutError):
                            while client.recv(65536):
                                pass
                        return
                else:
                    up.sendall(data)
        except OSError:
            pass
        finally:
            for s in (up, client):
                with contextlib.suppress(OSError):
                    s.close()

    @staticmethod
    def _copy(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass


@pytest.fixture
def cutting_proxy(hub: Hub) -> Iterator[CuttingProxy]:
    proxy = CuttingProxy((hub.host, hub.port))
    yield proxy
    proxy.close()


def test_body_cut_off_in_transit_is_refused_and_resent(
    hub: Hub, cutting_proxy: CuttingProxy, config_file: ConfigFactory
) -> None:
    config = gateway_config(config_file, f"http://127.0.0.1:{cutting_proxy.port}")
    cfg = load_config(str(config))
    hub.register(config)
    data = rows(20000)
    fill(cfg, data)
    r = run_fieldgate("upload", "--once", config=config)
    assert r.returncode == 0, r.stderr
    assert cutting_proxy.cut == 1
    assert "the file here is sound; sending again" in r.stderr
    assert "cut off after" in hub.log_text()
    assert hub.readings(SERIAL) == 20000
    assert hub_rows(hub) == set(data)


class ConnectionRecorder(LoopbackServer):
    """A listening socket that records every connection made to it."""

    def __init__(self) -> None:
        self.connections = 0
        super().__init__()

    def accepted(self, conn: socket.socket) -> None:
        self.connections += 1
        conn.close()


def test_pass_mode_makes_no_network_call(config_file: ConfigFactory) -> None:
    recorder = ConnectionRecorder()
    try:
        config = gateway_config(
            config_file, f"http://127.0.0.1:{recorder.port}", mode="PASS", batch_max_rows=100
        )
        cfg = load_config(str(config))
        fill(cfg, rows(250))
        r = run_fieldgate("upload", "--once", config=config)
        assert r.returncode == 0, r.stderr
        # the same URL does answer when something connects (the recorder works)
        socket.create_connection(("127.0.0.1", recorder.port)).close()
        wait_until(lambda: recorder.connections == 1, what="the probe connection")
    finally:
        recorder.close()
    assert recorder.connections == 1  # only the probe: the uploader never connected
    assert [s for _, s, _ in gateway_batches(cfg)] == ["uploaded"] * 3
    assert len(list(Path(cfg.upload.uploaded_dir).glob(f"{SERIAL}-*.zip"))) == 3
    assert "PASS" in status(config)["upload"]["last_success"]["value"]


def test_test_mode_is_flagged_at_the_hub(hub: Hub, config_file: ConfigFactory) -> None:
    config = gateway_config(config_file, hub.url, mode="TEST", delete_batch_on_upload=True)
    cfg = load_config(str(config))
    hub.register(config)
    fill(cfg, rows(120))
    r = run_fieldgate("upload", "--once", config=config)
    assert r.returncode == 0, r.stderr
    assert hub.query("SELECT COUNT(*), SUM(test) FROM readings") == [(120, 120)]
    assert hub.query("SELECT mode, test FROM batches") == [("TEST", 1)]
    # delete_batch_on_upload: nothing kept on the gateway's disk
    assert list(Path(cfg.upload.uploaded_dir).glob("*.zip")) == []
    assert list(Path(cfg.upload.pending_dir).glob(f"{SERIAL}-*.zip")) == []


def test_register_writes_a_private_key_file_and_a_used_pin_is_refused(
    hub: Hub, config_file: ConfigFactory
) -> None:
    config = gateway_config(config_file, hub.url)
    cfg = load_config(str(config))
    key_file = Path(cfg.upload.key_file)
    key_file.unlink()
    pin = hub.pin(SERIAL)
    r = run_fieldgate("register", "--pin", pin, config=config)
    assert r.returncode == 0, r.stderr
    assert str(key_file) in r.stdout
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_text().strip()
    assert len(key) >= 40
    assert key not in r.stdout + r.stderr
    r = run_fieldgate("register", "--pin", pin, config=config)
    assert r.returncode == 1
    assert "already used" in one_line_error(r.stderr)
    assert key_file.read_text().strip() == key  # the good key is kept
    assert list(key_file.parent.glob(".*tmp")) == []


def test_register_reads_the_pin_from_standard_input_or_a_file(
    hub: Hub, config_file: ConfigFactory, tmp_path: Path
) -> None:
    config = gateway_config(config_file, hub.url)
    key_file = Path(load_config(str(config)).upload.key_file)
    key_file.unlink()
    r = run_fieldgate("register", "--pin-file", "-", config=config, stdin=hub.pin(SERIAL) + "\n")
    assert r.returncode == 0, r.stderr
    first = key_file.read_text().strip()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    # from a file: registering again replaces the key
    pin_file = tmp_path / "pin"
    pin_file.write_text(hub.pin(SERIAL))
    r = run_fieldgate("register", "--pin-file", str(pin_file), config=config)
    assert r.returncode == 0, r.stderr
    assert key_file.read_text().strip() not in ("", first)


def test_register_names_the_rate_limit_and_when_to_retry_in_one_line(
    hub: Hub, config_file: ConfigFactory
) -> None:
    """Issue 15 leftover: a 429 from the hub (too many attempts for this serial) said only
    the HTTP status; the line names the limit and the hub's Retry-After."""
    config = gateway_config(config_file, hub.url)
    key_file = Path(load_config(str(config)).upload.key_file)
    key_file.unlink()
    pin = hub.pin(SERIAL)
    for i in range(PIN_SERIAL_LIMIT):
        r = requests.post(
            f"{hub.url}/api/v1/register", json={"pin": f"wrong-{i}", "serial": SERIAL}, timeout=60
        )
        assert r.status_code == 403
    r = run_fieldgate("register", "--pin-file", "-", config=config, stdin=pin + "\n")
    assert r.returncode == 1
    line = one_line_error(r.stderr)
    m = re.fullmatch(
        rf"fieldgate: error: the hub at {re.escape(hub.url)} refused the registration: "
        r"rate limited, retry after (\d+) s \(too many registration attempts for this "
        r"gateway; try again in (\d+) s\)",
        line,
    )
    assert m, line
    assert 0 < int(m[1]) <= 15 * 60 and m[1] == m[2]
    assert not key_file.exists()


@pytest.mark.parametrize(
    ("stdin", "says"),
    [
        ("", "no PIN in standard input"),
        (" \n", "no PIN in standard input"),
        ("7" * 2000, "standard input holds more than 1024 bytes: not a PIN"),
    ],
)
def test_register_refuses_what_is_not_a_pin_in_one_line(
    config_file: ConfigFactory, stdin: str, says: str
) -> None:
    config = gateway_config(config_file, f"http://127.0.0.1:{free_port()}")
    r = run_fieldgate("register", "--pin-file", "-", config=config, stdin=stdin)
    assert r.returncode == 1
    line = one_line_error(r.stderr)
    assert says in line
    assert "7777" not in line  # nothing of what was read is echoed


def test_register_pin_options_exclude_each_other(config_file: ConfigFactory) -> None:
    config = gateway_config(config_file, f"http://127.0.0.1:{free_port()}")
    r = run_fieldgate("register", "--pin-file", "/nonexistent/pin", config=config)
    assert r.returncode == 1
    assert "--pin-file: /nonexistent/pin does not exist" in one_line_error(r.stderr)
    r = run_fieldgate("register", "--pin", "1", "--pin-file", "-", config=config, stdin="2")
    assert r.returncode == 2
    assert "not allowed with argument" in r.stderr
    r = run_fieldgate("register", config=config)
    assert r.returncode == 2
    assert "one of the arguments --pin --pin-file is required" in r.stderr


def test_unreachable_hub_is_one_line(config_file: ConfigFactory) -> None:
    config = gateway_config(config_file, f"http://127.0.0.1:{free_port()}")
    r = run_fieldgate("register", "--pin", "12345-67890", config=config)
    assert r.returncode == 1
    assert "cannot reach the hub" in one_line_error(r.stderr)
    cfg = load_config(str(config))
    fill(cfg, rows(10))
    r = run_fieldgate("upload", "--once", config=config)
    assert r.returncode == 1
    line = one_line_error(r.stderr)
    assert "1 batches (10 readings) not delivered" in line
    assert "cannot reach the hub" in line
    assert "Connection refused" in line


def test_second_uploader_is_refused(config_file: ConfigFactory, tmp_path: Path) -> None:
    config = gateway_config(config_file, f"http://127.0.0.1:{free_port()}", mode="PASS")
    log = tmp_path / "first.log"
    first = start_fieldgate("upload", config=config, log=log)
    try:
        wait_until(lambda: "uploader started" in log.read_text(), what="the first uploader")
        r = run_fieldgate("upload", "--once", config=config)
        assert r.returncode == 1
        assert "another 'fieldgate upload' is running" in one_line_error(r.stderr)
        assert stop_process(first) == 0
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()


class BlackHole(LoopbackServer):
    """Accepts connections and never answers (a hub that hangs)."""

    def accepted(self, conn: socket.socket) -> None:
        self.held.append(conn)


def test_sigterm_stops_promptly_with_a_request_in_flight(
    config_file: ConfigFactory, tmp_path: Path
) -> None:
    hole = BlackHole()
    try:
        config = gateway_config(config_file, f"http://127.0.0.1:{hole.port}", timeout_secs=600)
        cfg = load_config(str(config))
        fill(cfg, rows(50))
        log = tmp_path / "upload.log"
        proc = start_fieldgate("upload", config=config, log=log)
        try:
            wait_until(lambda: len(hole.held) == 1, what="the POST to the hanging hub")
            assert stop_process(proc) == 0  # fails if it takes longer than 15 s
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    finally:
        hole.close()
    assert "request to the hub in flight" in log.read_text()
    assert status(config)["batches"]["pending"] == 1  # kept for the next start


def test_repeated_sigkill_at_arbitrary_moments_loses_and_duplicates_nothing(
    hub: Hub, config_file: ConfigFactory, tmp_path: Path
) -> None:
    import random

    config = gateway_config(config_file, hub.url, batch_max_rows=400)
    cfg = load_config(str(config))
    hub.register(config)
    data: list[store.Reading] = []
    rnd = random.Random(3)
    log = tmp_path / "upload.log"
    for k in range(6):
        chunk = rows(4000, start=k * 4000)  # readings keep coming between the crashes
        fill(cfg, chunk)
        data += chunk
        proc = start_fieldgate("upload", config=config, log=log)
        time.sleep(rnd.uniform(0.3, 0.9))  # wherever it is: cutting, sending, marking
        proc.kill()
        proc.wait()
    r = run_fieldgate("upload", "--once", config=config)
    assert r.returncode == 0, r.stderr
    assert hub.readings(SERIAL) == 24_000
    assert hub_rows(hub) == set(data)
    gw = gateway_batches(cfg)
    assert all(state == "uploaded" for _, state, _ in gw)
    assert sum(n for _, _, n in gw) == 24_000
    assert hub.query("SELECT COUNT(*), SUM(new_rows) FROM batches") == [(len(gw), 24_000)]
    pending = Path(cfg.upload.pending_dir)
    assert [p.name for p in pending.iterdir() if p.name != ".lock"] == []
    assert len(list(Path(cfg.upload.uploaded_dir).glob(f"{SERIAL}-*.zip"))) == len(gw)


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and its children (the hub's gunicorn master and workers)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        text = (task / "children").read_text().split()
        children += [int(c) for c in text]
    for p in [pid, *children]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def test_hub_killed_mid_ingest_then_back_nothing_lost_or_doubled(
    hub: Hub, config_file: ConfigFactory, tmp_path: Path
) -> None:
    config = gateway_config(config_file, hub.url, batch_max_rows=2000)
    cfg = load_config(str(config))
    hub.register(config)
    data = rows(60_000)
    fill(cfg, data)
    log = tmp_path / "upload.log"
    proc = start_fieldgate("upload", config=config, log=log)
    try:
        wait_until(lambda: hub.readings(SERIAL) > 0, what="the first batches at the hub")
        assert hub.proc is not None
        _kill_tree(hub.proc.pid)  # a power cut on the hub, wherever its ingest is
        hub.proc.wait()
        hub.proc = None
        wait_until(lambda: "cannot reach the hub" in log.read_text(), what="the uploader noticing")
        hub.start()
        wait_until(lambda: hub.readings(SERIAL) == 60_000, timeout=180, what="all at the hub")
        assert stop_process(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert hub_rows(hub) == set(data)
    assert hub.query("SELECT COUNT(*), SUM(new_rows) FROM batches") == [(30, 60_000)]


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("120", 120), (None, None), ("soon", None), ("Wed, 21 Oct 2015 07:28:00 GMT", 0)],
)
def test_retry_after_is_read_as_seconds_or_a_date(header: str | None, seconds: int | None) -> None:
    resp = requests.Response()
    resp.status_code = 429
    if header is not None:
        resp.headers["Retry-After"] = header
    assert _retry_after(resp) == seconds
    future = email.utils.format_datetime(
        datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=90), usegmt=True
    )
    resp.headers["Retry-After"] = future
    assert 0 < (_retry_after(resp) or 0) <= 91
