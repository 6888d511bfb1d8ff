"""No credential in a log line, a status field, a store row or an export.

Upload URLs are credentials until they expire. A hub on loopback hands out upload URLs of
every shape a hub may use (token in the path, in the query, as user info, relative) and
then fails in every way a hub or a network can: refusals that echo the URL, a dropped
connection, malformed headers (urllib3 logs the whole URL), a hang past the timeout, a
URL that cannot be parsed, a closed port, an unexpected answer holding the URL. The real
``fieldgate upload`` runs against it at DEBUG level; then every token, and the first 12
characters of each, is looked for in the log, ``status`` and ``status --json``, the store
file and its write-ahead log, and an export.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import signal
import socketserver
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import (
    ConfigFactory,
    query,
    run_fieldgate,
    start_fieldgate,
    stop_process,
    wait_until,
)

from fieldgate import store
from fieldgate.redact import RedactingFilter, origin, redact, redact_urls

T0 = 1_767_225_600_000


class HostileHub(socketserver.ThreadingTCPServer):
    """Answers ``POST /api/v1/batches`` with an upload URL (one scenario per POST, in turn)
    and fails the ``PUT`` that follows the way the scenario says."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.port = self.server_address[1]
        self.tokens: list[str] = []
        self.posts = 0
        self.puts: list[str] = []
        self.current: dict[str, str] = {}
        self.lock = threading.Lock()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def next_scenario(self) -> tuple[int, bytes]:
        """(status, body) for a POST: a fresh token in this scenario's URL."""
        with self.lock:
            n = self.posts
            self.posts += 1
            token = secrets.token_urlsafe(32)
            self.tokens.append(token)
            name, shape, put = SCENARIOS[n % len(SCENARIOS)]
            url = shape.format(port=self.port, token=token)
            self.current = {"name": name, "url": url, "token": token, "put": put}
        if put == "post-200-with-url":
            return 200, json.dumps({"upload_url": url, "note": f"use {url}"}).encode()
        if put == "post-201-token-in-text":
            return 201, json.dumps({"upload": f"{self.base}/api/v1/uploads/{token}"}).encode()
        return 201, json.dumps({"upload_url": url, "expires_at": "2099-01-01T00:00:00Z"}).encode()


#: The shapes of upload URLs a hub may hand out ({port} and {token} filled in).
PATH = "http://127.0.0.1:{port}/api/v1/uploads/{token}"
QUERY = "http://127.0.0.1:{port}/put?sig={token}&v=1"
USERINFO = "http://gw:{token}@127.0.0.1:{port}/put"
RELATIVE = "/api/v1/uploads/{token}"

#: (name, upload URL shape, how the PUT (or the POST) fails)
SCENARIOS: list[tuple[str, str, str]] = [
    ("403 echoing the URL", PATH, "403-echo"),
    ("500 text with the token", QUERY, "500-echo"),
    ("409 echoing the URL", USERINFO, "409-echo"),
    ("connection dropped", RELATIVE, "drop"),
    ("malformed headers", QUERY, "bad-headers"),
    ("hang past the timeout", PATH, "hang"),
    ("unparsable URL", "http://[{token}/put", "never-reached"),
    ("closed port", "http://127.0.0.1:9/x/{token}", "never-reached"),
    ("port out of range", "http://127.0.0.1:99999/x/{token}", "never-reached"),
    ("unexpected 200 holding the URL", QUERY, "post-200-with-url"),
    ("201 without upload_url, token in the text", PATH, "post-201-token-in-text"),
    ("401 echoing the URL, relative", RELATIVE, "401-echo"),
]


class Handler(socketserver.StreamRequestHandler):
    server: HostileHub

    def handle(self) -> None:
        line = self.rfile.readline().decode("latin-1").strip()
        if not line:
            return
        method, target, _ = line.split(" ", 2)
        length = 0
        while True:
            header = self.rfile.readline().decode("latin-1").strip()
            if not header:
                break
            name, _, value = header.partition(":")
            if name.lower() == "content-length":
                length = int(value)
        if length:
            self.rfile.read(length)
        if method == "POST":
            status, body = self.server.next_scenario()
            self.answer(status, body)
            return
        self.server.puts.append(target)
        cur = self.server.current
        url, token, put = cur["url"], cur["token"], cur["put"]
        if put == "500-echo":
            self.answer(500, f"boom at {url}".encode(), content_type="text/plain")
        elif put.endswith("-echo"):
            error = {"error": f"upload URL {url} (token {token}) refused"}
            self.answer(int(put.split("-")[0]), json.dumps(error).encode())
        elif put == "drop":
            return
        elif put == "bad-headers":
            self.wfile.write(
                b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\nthis line has no colon\r\n"
                b"Connection: close\r\n\r\n"
            )
        elif put == "hang":
            time.sleep(2.5)

    def answer(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        head = (
            f"HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        with contextlib.suppress(OSError):
            self.wfile.write(head.encode() + body)


@pytest.fixture
def hostile_hub() -> Iterator[HostileHub]:
    hub = HostileHub()
    thread = threading.Thread(target=hub.serve_forever, daemon=True)
    thread.start()
    yield hub
    hub.shutdown()
    hub.server_close()


def leaks(text: str | bytes, tokens: list[str]) -> list[str]:
    """The tokens found in ``text``, whole or by their first 12 characters."""
    data = text if isinstance(text, bytes) else text.encode("utf-8", "backslashreplace")
    return [t for t in tokens if t[:12].encode() in data]


def test_no_upload_token_reaches_a_log_status_store_or_export(
    hostile_hub: HostileHub, config_file: ConfigFactory, tmp_path: Path
) -> None:
    config = config_file(
        overrides={
            "upload": {"url": hostile_hub.base, "timeout_secs": 1, "interval_secs": 1},
            "log": {"level": "DEBUG"},
        }
    )
    db = tmp_path / "gw" / "var" / "data_store.db"
    conn = store.open_store(db, "GW-TEST")
    with store.transaction(conn):
        store.insert_readings(conn, [("TH-001", T0 + i, "t", i) for i in range(100)], source="t")
    conn.close()
    log = tmp_path / "upload.log"
    # what the uploader says of each failure; under load a POST may itself time out, so a
    # round can skip a scenario's PUT: wait for all of them rather than for a number of POSTs
    said = [
        "no answer within 1 s",
        "Failed to parse headers (url=http://127.0.0.1:",  # urllib3's own warning
        "cannot reach the hub",
        "unexpected answer",
        "HTTP 403: upload URL http://127.0.0.1:",
        "HTTP 409: upload URL http://127.0.0.1:",
    ]
    rounds = 2 * len(SCENARIOS)

    def every_failure_met() -> bool:
        text = log.read_text() if log.exists() else ""
        reached = hostile_hub.posts > rounds and len(hostile_hub.puts) >= 12
        return reached and all(s in text for s in said)

    proc = start_fieldgate("upload", config=config, log=log)
    try:
        wait_until(every_failure_met, timeout=300, what="every failure met, twice over")
    finally:
        assert stop_process(proc, signal.SIGTERM) == 0, log.read_text()
    tokens = hostile_hub.tokens
    assert len(tokens) > rounds
    text = log.read_text()
    # every scenario was met (what the uploader said about it), and the PUTs reached the hub
    assert [s for s in said if s not in text] == []
    assert len(hostile_hub.puts) >= 12
    assert any(p.startswith("/api/v1/uploads/") for p in hostile_hub.puts)  # the relative one
    assert leaks(text, tokens) == [], [ln for ln in text.splitlines() if leaks(ln, tokens)][:5]

    status = run_fieldgate("status", config=config)
    status_json = run_fieldgate("status", "--json", config=config)
    assert status.returncode == 0 and status_json.returncode == 0
    s = json.loads(status_json.stdout)
    assert s["upload"]["last_error"]["value"].startswith("batch ")
    assert leaks(status.stdout, tokens) == [] and leaks(status_json.stdout, tokens) == []

    errors = [e for (e,) in query(db, "SELECT last_error FROM batches")]
    assert errors and all(errors)
    for f in db.parent.glob("data_store.db*"):
        assert leaks(f.read_bytes(), tokens) == [], f

    target = tmp_path / "export"
    target.mkdir()
    r = run_fieldgate("export", "--to", str(target), config=config)
    assert r.returncode == 0, r.stderr
    exported = list(target.iterdir())
    assert any(f.suffix == ".db" for f in exported)
    for f in exported:
        assert leaks(f.read_bytes(), tokens) == [], f


TOKEN = "Zm9vYmFyYmF6cXV4cXV1eHF1dXhxdXV4cXV1eHF1dXg"


@pytest.mark.parametrize(
    ("url", "text", "expected"),
    [
        (
            f"http://hub:8080/api/v1/uploads/{TOKEN}",
            f"PUT http://hub:8080/api/v1/uploads/{TOKEN}: refused ({TOKEN})",
            "PUT http://hub:8080/…: refused (…)",
        ),
        (
            f"http://hub/put?sig={TOKEN}&v=1",
            f"Max retries exceeded with url: /put?sig={TOKEN}&v=1 (Caused by x)",
            "Max retries exceeded with url: … (Caused by x)",
        ),
        (
            f"http://gw:{TOKEN}@hub/put",
            f"to http://gw:{TOKEN}@hub/put and {TOKEN[:20]}",
            f"to http://hub/… and {TOKEN[:20]}",
        ),
        (f"http://hub/a b/{TOKEN}", f"url: /a%20b/{TOKEN}", "url: …"),
        ("", f"x /api/v1/uploads/{TOKEN}?a=1 y", "x /api/v1/uploads/…?a=1 y"),
    ],
)
def test_redact_hides_every_form_of_a_credential_url(url: str, text: str, expected: str) -> None:
    assert redact(text, url) == expected


def test_origin_and_urls_in_library_messages() -> None:
    assert (
        origin(f"http://gw:{TOKEN}@hub.example:8080/x?sig={TOKEN}") == "http://hub.example:8080/…"
    )
    assert origin("http://[::1]:8080/x") == "http://[::1]:8080/…"
    assert origin(f"http://[{TOKEN}/x") == "…"
    assert (
        redact_urls(f"(url=http://u:{TOKEN}@127.0.0.1:5/api?sig={TOKEN}): x http://h:1 ok")
        == "(url=http://127.0.0.1:5/…): x http://h:1 ok"
    )


def test_the_log_filter_cleans_library_records(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("urllib3.connectionpool")
    handler = logging.Handler()
    records: list[logging.LogRecord] = []
    handler.emit = records.append  # type: ignore[method-assign]
    handler.addFilter(RedactingFilter())
    logger.addHandler(handler)
    try:
        logger.warning("Failed to parse headers (url=%s): %s", f"http://h:1/p?sig={TOKEN}", "e")
        logging.getLogger("fieldgate.x").addHandler(handler)
        logging.getLogger("fieldgate.x").warning("at /api/v1/uploads/%s", TOKEN)
    finally:
        logger.removeHandler(handler)
        logging.getLogger("fieldgate.x").removeHandler(handler)
    assert [r.getMessage() for r in records] == [
        "Failed to parse headers (url=http://h:1/…): e",
        "at /api/v1/uploads/…",
    ]
