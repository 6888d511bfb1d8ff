"""The hub under hostile and unlucky input (issue 15), on both backends: each attack of the
adversarial pass against a real hub whose address space is capped (``prlimit --as``, so a
regression that reads a bomb into memory fails with a 500 instead of swapping), asserting
the status code, the hub's peak memory and a database without a trace of it.

Attacks: a zip whose readings.csv inflates to 4 GiB; members of 512 MiB from half a
megabyte; a zip directory of thousands of members; a YAML alias bomb and a 4 MB
manifest.yaml; a 20 MB JSON manifest and one with an unknown key; 100 kB metric names,
long names and device names with line breaks; 150 wrong PINs (one after the other, and at
once); idle, half-sent and trickling requests, more than the hub has threads."""

from __future__ import annotations

import contextlib
import hashlib
import io
import socket
import struct
import threading
import time
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from support import Hub, run_fieldgate
from test_hub import SERIAL, make_batch, offer, register, zip_of

from fieldgate import batchfile
from fieldgate.hub.backends import open_storage
from fieldgate.hub.storage import IngestError
from fieldgate.hub.uploads import PIN_ADDRESS_LIMIT, PIN_SERIAL_LIMIT

#: The hub's address-space cap. A worker peaks at about 190 MiB of address space serving
#: normal batches (docs/hub.md); every attack below would need more than this if the hub
#: held what it was sent.
CAP_BYTES = 640 * 1024 * 1024
#: glibc gives each thread its own 64 MiB malloc arena (address space, not memory): two
#: keep the cap about memory.
CAPPED_ENV = {"MALLOC_ARENA_MAX": "2"}
#: Seconds a client has for its request in the slow-client tests.
CLIENT_TIMEOUT = 2


@pytest.fixture
def capped_hub(hub_db: str, tmp_path: Path) -> Iterator[Hub]:
    h = Hub(
        tmp_path / "hub",
        hub_db,
        workers=1,
        extra_args=["--threads", "2", "--client-timeout", str(CLIENT_TIMEOUT)],
        prefix=["prlimit", f"--as={CAP_BYTES}", "--"],
        env=CAPPED_ENV,
    )
    h.start()
    yield h
    h.stop()


def workers_of(hub: Hub) -> list[int]:
    assert hub.proc is not None
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == hub.proc.pid:
                out.append(int(entry.name))
    return out


def peak_bytes(hub: Hub) -> int:
    """The largest peak resident memory (VmHWM) of the hub's processes."""
    assert hub.proc is not None
    peaks = []
    for pid in [hub.proc.pid, *workers_of(hub)]:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peaks.append(int(line.split()[1]) * 1024)
    return max(peaks)


def snapshot(hub: Hub) -> tuple[Any, ...]:
    """What the attacks must not change: readings, series, batches, keys, gateways."""
    return tuple(
        hub.query(f"SELECT COUNT(*) FROM {table}")[0][0]  # noqa: S608 (constant names)
        for table in ("samples", "series", "batches", "gateway_keys", "gateways")
    )


# ---- hostile zips ----------------------------------------------------------------------


def deflate_repeat(chunk: bytes, times: int) -> tuple[bytes, int, int]:
    """Raw deflate of ``chunk`` repeated ``times`` times, made without compressing it all
    (one fully flushed block repeated), with its CRC-32 and size."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(times):
        crc = zlib.crc32(chunk, crc)
    end = zlib.compressobj(9, zlib.DEFLATED, -15).flush(zlib.Z_FINISH)
    return block * times + end, crc, len(chunk) * times


def zip_raw(members: list[tuple[str, bytes, int, int]]) -> bytes:
    """A zip of already deflated members (name, data, crc, size), with zip64 sizes so
    that a member may inflate past 4 GiB."""
    out, directory = io.BytesIO(), io.BytesIO()
    for name, data, crc, size in members:
        offset = out.tell()
        raw = name.encode()
        extra = struct.pack("<HHQQ", 1, 16, size, len(data))
        fixed = (45, 0, 8, 0, 0x21, crc, 0xFFFFFFFF, 0xFFFFFFFF, len(raw), len(extra))
        out.write(struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", *fixed) + raw + extra + data)
        directory.write(
            struct.pack("<4sH", b"PK\x01\x02", 45)
            + struct.pack("<HHHHHIIIHH", *fixed)
            + struct.pack("<HHHII", 0, 0, 0, 0, offset)
            + raw
            + extra
        )
    at, cd = out.tell(), directory.getvalue()
    n = len(members)
    out.write(cd + struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, n, n, len(cd), at, 0))
    return out.getvalue()


def announced(batch_id: str, rows: int) -> dict[str, Any]:
    return {
        "batch_id": batch_id,
        "serial": SERIAL,
        "rows": rows,
        "sha256": hashlib.sha256(batch_id.encode()).hexdigest(),
        "first_ts": 0,
        "last_ts": 0,
        "mode": "LIVE",
        "type": "readings",
    }


def manifest_member(manifest: dict[str, Any]) -> tuple[str, bytes, int, int]:
    text = yaml.safe_dump(manifest).encode()
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return "manifest.yaml", c.compress(text) + c.flush(), zlib.crc32(text), len(text)


def upload(hub: Hub, key: str, manifest: dict[str, Any], body: bytes) -> requests.Response:
    r = offer(hub, key, manifest)
    assert r.status_code == 201, r.text
    return requests.put(r.json()["upload_url"], data=body, timeout=120)


def attack(hub: Hub, key: str, manifest: dict[str, Any], body: bytes) -> requests.Response:
    """Upload ``body`` as ``manifest``'s batch; the database must be as before."""
    before = snapshot(hub)
    t = time.monotonic()
    r = upload(hub, key, manifest, body)
    print(
        f"\n{manifest['batch_id']}: {len(body)} bytes -> {r.status_code} in "
        f"{time.monotonic() - t:.2f} s, hub peak {peak_bytes(hub) / 2**20:.0f} MiB: {r.text}"
    )
    assert snapshot(hub) == before
    assert peak_bytes(hub) < CAP_BYTES
    return r


def test_a_zip_bomb_of_4_gib_is_refused_after_its_first_read(capped_hub: Hub) -> None:
    key = register(capped_hub)
    csv, crc, size = deflate_repeat(b"\n" * (1 << 20), 4096)  # 4 GiB of (empty) lines
    assert size == 4 << 30
    m = announced("bomb-4g", 1000)
    body = zip_raw([("readings.csv", csv, crc, size), manifest_member(m)])
    assert len(body) < 5 << 20
    r = attack(capped_hub, key, m, body)
    assert r.status_code == 422
    assert "holds more than the 1000 readings the manifest announces" in r.json()["error"]


@pytest.mark.parametrize("member", ["readings.csv", "manifest.yaml"])
def test_a_member_of_512_mib_is_refused(capped_hub: Hub, member: str) -> None:
    key = register(capped_hub)
    m = announced(f"big-{member}", 10)
    data, crc, size = deflate_repeat(b" " * (1 << 20), 512)
    assert len(data) < 600_000
    members = [manifest_member(m), ("readings.csv", *deflate_repeat(b"x", 1))]
    members = [
        (member, data, crc, size) if name == member else (name, d, c, n)
        for name, d, c, n in members
    ]
    r = attack(capped_hub, key, m, zip_raw(members))
    if member == "manifest.yaml":
        assert r.status_code == 413
        assert r.json()["error"].startswith("manifest.yaml is larger than 65536 bytes")
    else:
        assert r.status_code == 422
        assert "readings.csv has a line longer than 1024 bytes" in r.json()["error"]


def test_a_zip_of_thousands_of_members_is_refused_before_its_directory_is_read(
    capped_hub: Hub,
) -> None:
    key = register(capped_hub)
    m = announced("many", 1)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("manifest.yaml", yaml.safe_dump(m))
        for i in range(5000):
            zf.writestr(f"m{i}", b"")
    r = attack(capped_hub, key, m, buf.getvalue())
    assert r.status_code == 413
    assert "lists 5001 members" in r.json()["error"]


ALIAS_BOMB = "\n".join(
    ["a: &a [x, x, x, x, x, x, x, x, x]"]
    + [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]" for i in range(8)]
)


def test_a_yaml_alias_bomb_is_refused_without_expanding_it(capped_hub: Hub) -> None:
    key = register(capped_hub)
    _, _, data = make_batch("alias", 3)
    m = announced("alias", 3) | {"sha256": hashlib.sha256(data).hexdigest()}
    text = yaml.safe_dump(m) + ALIAS_BOMB + "\n"
    assert len(text) < 1000
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("readings.csv", data)
        zf.writestr("manifest.yaml", text)
    r = attack(capped_hub, key, m, buf.getvalue())
    assert r.status_code == 422
    assert r.json()["error"] == (
        "manifest.yaml uses YAML anchors or aliases; it may not; nothing was stored"
    )


def test_a_4_mb_manifest_is_refused_unparsed(capped_hub: Hub) -> None:
    key = register(capped_hub)
    _, _, data = make_batch("fat", 3)
    m = announced("fat", 3) | {"sha256": hashlib.sha256(data).hexdigest()}
    fat = {**m, "notes": ["x" * 60] * 65_000}
    r = attack(capped_hub, key, m, zip_of(data, fat))
    assert r.status_code == 413
    assert "manifest.yaml is larger than 65536 bytes" in r.json()["error"]


def test_json_manifests_too_large_or_with_unknown_keys_are_refused(capped_hub: Hub) -> None:
    key = register(capped_hub)
    headers = {"Authorization": f"Bearer {key}"}
    url = f"{capped_hub.url}/api/v1/batches"
    before = snapshot(capped_hub)
    m = announced("json", 3)
    big = {**m, "extra": "x" * (20 << 20)}
    r = requests.post(url, json=big, headers=headers, timeout=60)
    assert r.status_code == 413, r.text
    assert (
        r.json()["error"]
        == f"the request body is {r.request.headers['Content-Length']} bytes; at most 262144"
    )
    r = requests.post(url, json={**m, "extra": 1}, headers=headers, timeout=60)
    assert r.status_code == 422
    assert r.json()["error"] == "manifest: unknown key 'extra'"
    deep = b'{"batch_id": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = requests.post(url, data=deep, headers=headers, timeout=60)
    assert r.status_code == 400
    assert snapshot(capped_hub) == before
    assert capped_hub.query("SELECT COUNT(*) FROM uploads") == [(0,)]
    assert peak_bytes(capped_hub) < CAP_BYTES


def csv_zip(rows: list[tuple[str, int, str, float]], batch_id: str, announce: int) -> Any:
    data = batchfile.render_csv(rows)
    m = announced(batch_id, announce) | {"sha256": hashlib.sha256(data).hexdigest()}
    return m, zip_of(data, m)


@pytest.mark.parametrize(
    ("rows", "announce", "error"),
    [
        pytest.param(
            [("TH-1", 1, "t", 1.0), ("TH-1", 2, "m" * 100_000, 1.0)],
            2,
            "readings.csv has a line longer than 1024 bytes (line 3)",
            id="100kB-metric",
        ),
        pytest.param(
            [("TH-1", 1, "t", 1.0), ("TH-1", 2, "m" * 65, 1.0)],
            2,
            "metric name 'mmmm",
            id="65-char-metric",
        ),
        pytest.param(
            [("TH-1", 1, "t", 1.0), ("TH\n1", 2, "t", 1.0), ("TH-1", 3, "t", 1.0)],
            4,  # the quoted line break makes a fifth line
            "device name 'TH\\n1' is not acceptable",
            id="device-newline",
        ),
        pytest.param(
            [("TH-1", 1, "t t", 1.0)],
            1,
            "metric name 't t' is not acceptable",
            id="metric-space",
        ),
    ],
)
def test_bad_names_are_refused(
    capped_hub: Hub, rows: list[tuple[str, int, str, float]], announce: int, error: str
) -> None:
    key = register(capped_hub)
    m, body = csv_zip(rows, "names", announce)
    r = attack(capped_hub, key, m, body)
    assert r.status_code == 422
    assert error in r.json()["error"]


def test_names_are_checked_by_the_storage_on_both_backends(hub_db: str) -> None:
    """``hub import`` and uploads share the check: a name with a line break, a space or
    more than 64 characters stores nothing."""
    st = open_storage(hub_db)
    try:
        for i, row in enumerate(
            [("TH-1\n", 1, "t", 1.0), ("TH 1", 1, "t", 1.0), ("TH-1", 1, "t" * 65, 1.0)]
        ):
            with pytest.raises(IngestError, match="is not acceptable"):
                st.ingest("GW-N", f"b-{i}", iter([("TH-1", 0, "t", 1.0), row]))
    finally:
        st.close()
    from support import query_db

    assert query_db(hub_db, "SELECT COUNT(*) FROM readings") == [(0,)]


# ---- PIN guessing ----------------------------------------------------------------------


def register_with(hub: Hub, pin: str, serial: str = SERIAL) -> requests.Response:
    return requests.post(
        f"{hub.url}/api/v1/register", json={"pin": pin, "serial": serial}, timeout=60
    )


def test_150_wrong_pins_lock_the_serial_and_the_right_pin_then_fails(capped_hub: Hub) -> None:
    pin = capped_hub.pin(SERIAL)
    codes = [register_with(capped_hub, f"{i:05d}-00000").status_code for i in range(150)]
    assert codes[:PIN_SERIAL_LIMIT] == [403] * PIN_SERIAL_LIMIT
    assert codes[PIN_SERIAL_LIMIT:] == [429] * (150 - PIN_SERIAL_LIMIT)
    r = register_with(capped_hub, pin)
    assert r.status_code == 429
    assert 0 < int(r.headers["Retry-After"]) <= 15 * 60
    assert r.json()["error"].startswith("too many registration attempts for this gateway")
    assert capped_hub.query("SELECT COUNT(*) FROM gateway_keys") == [(0,)]
    # another gateway is not locked by it, until this address has tried too often
    other = capped_hub.pin("GW-OTHER")
    assert register_with(capped_hub, other, "GW-OTHER").status_code == 201
    left = PIN_ADDRESS_LIMIT - PIN_SERIAL_LIMIT - 1
    codes = [register_with(capped_hub, "1-2", f"GW-{i}").status_code for i in range(left + 1)]
    assert codes == [403] * left + [429]
    r = register_with(capped_hub, capped_hub.pin("GW-LAST"), "GW-LAST")
    assert r.status_code == 429
    assert r.json()["error"].startswith("too many registration attempts for this address")


def test_wrong_pins_sent_at_once_get_no_more_checks_than_the_limit(
    hub_db: str, tmp_path: Path
) -> None:
    """Race-free across workers: 150 guesses at once against 4 workers of 4 threads get
    exactly the serial's limit of PIN checks."""
    hub = Hub(tmp_path / "hub", hub_db, workers=4, extra_args=["--threads", "4"])
    hub.start()
    try:
        pin = hub.pin(SERIAL)
        barrier = threading.Barrier(30)
        codes: list[int] = []

        def guess(i: int) -> None:
            barrier.wait()
            for j in range(5):
                codes.append(register_with(hub, f"{i:03d}{j:02d}-00000").status_code)

        threads = [threading.Thread(target=guess, args=(i,)) for i in range(30)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert len(codes) == 150
        assert set(codes) <= {403, 429}
        assert codes.count(403) == PIN_SERIAL_LIMIT  # exactly: checked and counted at once
        assert register_with(hub, pin).status_code == 429
        assert hub.query("SELECT COUNT(*) FROM gateway_keys") == [(0,)]
    finally:
        hub.stop()


# ---- slow and idle clients -------------------------------------------------------------

#: What each kind of slow client sends, then nothing more.
SLOW = {
    "idle": b"",
    "half-line": b"POST /api/v1/regi",
    "half-headers": b"POST /api/v1/register HTTP/1.1\r\nHost: hub\r\nContent-Type: applica",
    "half-body": (
        b"POST /api/v1/register HTTP/1.1\r\nHost: hub\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n{"
    ),
}


def test_slow_and_idle_clients_do_not_starve_the_hub(capped_hub: Hub) -> None:
    """Three times as many slow clients of each kind as the hub has threads (1 worker of
    2): a normal request is still answered, and every slow client is cut off after the
    client timeout."""
    clients = []
    for kind, data in SLOW.items():
        for _ in range(3 * 2):
            s = socket.create_connection((capped_hub.host, capped_hub.port))
            s.sendall(data)
            clients.append((kind, s))
    r = requests.get(f"{capped_hub.url}/api/v1/health", timeout=60)
    assert r.status_code == 200
    key = register(capped_hub)  # a gateway's whole upload, too
    manifest, body, _ = make_batch("b-0001", 10)
    assert upload(capped_hub, key, manifest, body).status_code == 201
    t = time.monotonic()
    for kind, s in clients:
        s.settimeout(CLIENT_TIMEOUT + 30)
        assert s.recv(1024) == b"", kind  # closed by the hub (no answer)
        s.close()
    print(f"\nslow clients cut within {time.monotonic() - t:.1f} s of the normal requests")
    log = capped_hub.log_text()
    assert log.count("cut off client") == 3 * 2 * 3, log[-3000:]


def test_a_body_trickling_below_the_minimum_rate_is_cut_with_408(
    hub_db: str, tmp_path: Path
) -> None:
    """A body larger than the event loop reads first, then a byte a second: 408."""
    hub = Hub(
        tmp_path / "hub",
        hub_db,
        workers=1,
        extra_args=["--threads", "2", "--client-timeout", "1", "--min-body-rate", "100000"],
    )
    hub.start()
    try:
        key = register(hub)
        manifest, _, _ = make_batch("slow", 10)
        url = offer(hub, key, manifest).json()["upload_url"]
        path = "/" + url.split("/", 3)[3]
        s = socket.create_connection((hub.host, hub.port))
        size = 3 << 20
        s.sendall(
            f"PUT {path} HTTP/1.1\r\nHost: hub\r\nContent-Length: {size}\r\n\r\n".encode()
            + b"\0" * (1 << 20)
        )
        s.settimeout(60)
        got = b""
        try:
            while b"\r\n\r\n" not in got:
                s.sendall(b"\0")
                got += s.recv(4096)
                time.sleep(0.5)
        except ConnectionError:
            pass
        with contextlib.suppress(OSError):
            while len(got.partition(b"\r\n\r\n")[2]) < 100 and (more := s.recv(4096)):
                got += more
        assert got.startswith(b"HTTP/1.1 408 "), got[:200]
        assert b"sent its request body too slowly" in got
        s.close()
        assert hub.query("SELECT COUNT(*) FROM batches") == [(0,)]
    finally:
        hub.stop()


# ---- a mistyped --db -------------------------------------------------------------------


def test_hub_commands_refuse_a_database_that_does_not_exist(tmp_path: Path) -> None:
    db = tmp_path / "hub.db"
    for args in (
        ("pin", "--serial", "GW-1"),
        ("user", "list"),
        ("gateway", "domain", "GW-1", "site-a"),
        ("prune", "--days", "30"),
    ):
        r = run_fieldgate("hub", *args, "--db", str(db))
        assert r.returncode == 1, args
        assert r.stderr == (
            f"fieldgate: error: hub database {db} does not exist (a mistyped --db?); "
            "--create creates a new one\n"
        )
    assert not db.exists()
    r = run_fieldgate("hub", "pin", "--serial", "GW-1", "--db", str(db), "--create")
    assert r.returncode == 0, r.stderr
    assert db.exists()
    r = run_fieldgate("hub", "pin", "--serial", "GW-1", "--db", str(db))
    assert r.returncode == 0, r.stderr


def test_a_missing_or_empty_postgresql_database_is_one_line(pg_server: Any) -> None:
    url = pg_server.url("no_such_hub_db")
    r = run_fieldgate("hub", "pin", "--serial", "GW-1", "--db", url)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1
    assert r.stderr.startswith("fieldgate: error: cannot connect to the hub database ")
    assert 'database "no_such_hub_db" does not exist' in r.stderr
    name = pg_server.new_database()
    try:
        url = pg_server.url(name)
        r = run_fieldgate("hub", "pin", "--serial", "GW-1", "--db", url)
        assert r.returncode == 1
        assert r.stderr.count("\n") == 1 and "holds no hub tables yet" in r.stderr
        r = run_fieldgate("hub", "pin", "--serial", "GW-1", "--db", url, "--create")
        assert r.returncode == 0, r.stderr
    finally:
        pg_server.drop_database(name)


def test_hub_serve_creates_a_new_database_and_says_so_once(hub_db: str, tmp_path: Path) -> None:
    hub = Hub(tmp_path / "hub", hub_db)
    hub.start()
    hub.stop()
    hub.start()
    hub.stop()
    log = hub.log_text()
    assert log.count("did not exist: created it") == 1, log
    missing = Hub(tmp_path / "other", str(tmp_path / "nowhere" / "hub.db"))
    with pytest.raises(RuntimeError, match=r"hub database directory .* does not exist"):
        missing.start()
