"""The gateway page's HTTP server: the standard library's, read-only, a few threads.

A gateway (a Raspberry Pi) serves a technician or two on the management network, so no web
framework is installed for it (the hub extra's Flask, gunicorn and PostgreSQL driver stay
on the hub): :class:`http.server.ThreadingHTTPServer` with at most
``web.max_connections`` requests at a time (one more is answered 503), a socket timeout
against clients that send nothing, GET and HEAD only. Each request opens its own read-only
connection to the store (``query_only``; in WAL mode it never blocks the collector).

Routes: ``/`` (latest readings; ``?all=true`` also inactive devices), ``/devices/<device>``
(its last day as charts), ``/status``; JSON under ``/api/v1/``: ``latest``,
``devices/<device>/day`` (``?every=SECONDS``: buckets), ``status``; ``/static/…`` the
package's stylesheet, script and vendored uPlot.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from fieldgate.config import Config
from fieldgate.daemon import StopFlag
from fieldgate.errors import FieldgateError
from fieldgate.status import collect_status, render_text
from fieldgate.web import pages, queries

log = logging.getLogger("fieldgate.web")

#: Seconds a connection may stay silent before it is closed.
REQUEST_TIMEOUT_SECS = 10
#: The static files served, by URL path below /static/: what the pages load.
STATIC_FILES = {
    "gateway/gateway.css": "text/css; charset=utf-8",
    "gateway/device.js": "text/javascript; charset=utf-8",
    "vendor/uplot/uPlot.iife.min.js": "text/javascript; charset=utf-8",
    "vendor/uplot/uPlot.min.css": "text/css; charset=utf-8",
}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@dataclass
class Answer:
    status: int
    body: bytes
    content_type: str
    cache: str = "no-store"


class NotFound(Exception):
    """A page or device that does not exist (404 with this sentence)."""


def _html(text: str, status: int = 200) -> Answer:
    return Answer(status, text.encode(), "text/html; charset=utf-8")


def _json(data: Any, status: int = 200) -> Answer:
    body = json.dumps(data, separators=(",", ":"), allow_nan=False) + "\n"
    return Answer(status, body.encode(), "application/json")


class Site:
    """What the routes answer, from the configuration and the store."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.serial = cfg.site.serial

    def answer(self, path: str, query: dict[str, list[str]]) -> Answer:
        show_all = query.get("all", ["false"])[-1].lower() in ("true", "1", "yes")
        if path == "/favicon.ico":
            return Answer(204, b"", "image/x-icon", cache="max-age=86400")
        if path.startswith("/static/"):
            return self.static(path.removeprefix("/static/"))
        if path in ("/", "/index.html"):
            return self.with_store(lambda c: _html(self.latest_html(c, show_all)))
        if path == "/status":
            text = render_text(collect_status(self.cfg))
            return _html(pages.status_page(self.serial, text))
        if path == "/api/v1/status":
            return _json(collect_status(self.cfg))
        if path == "/api/v1/latest":
            return self.with_store(lambda c: _json(self.latest_json(c, show_all)), json_=True)
        parts = path.split("/")
        if len(parts) == 3 and parts[1] == "devices" and parts[2]:
            device = unquote(parts[2])
            return self.with_store(lambda c: _html(self.device_html(c, device)))
        if len(parts) == 6 and parts[1:4] == ["api", "v1", "devices"] and parts[5] == "day":
            device = unquote(parts[4])
            every = _every(query)
            return self.with_store(lambda c: _json(self.day_json(c, device, every)), json_=True)
        raise NotFound(f"no page {path}")

    def with_store(self, render: Callable[[Any], Answer], *, json_: bool = False) -> Answer:
        conn = queries.open_readonly(self.cfg)
        if conn is None:
            text = f"the store {self.cfg.store.path} does not exist yet: no reading received"
            if json_:
                return _json({"error": text}, 503)
            return _html(pages.message_page(self.serial, "No readings yet", text), 503)
        try:
            return render(conn)
        finally:
            conn.close()

    def latest_html(self, conn: Any, show_all: bool) -> str:
        page = queries.latest(conn, self.cfg, show_all=show_all)
        return pages.latest_page(self.serial, page, show_all=show_all)

    def latest_json(self, conn: Any, show_all: bool) -> dict[str, Any]:
        page = queries.latest(conn, self.cfg, show_all=show_all)
        return {
            "site": self.serial,
            "now": page.now,
            "hide_inactive_after_days": page.hide_inactive_after_days,
            "hidden": page.hidden,
            "devices": [
                {
                    "device": d.device,
                    "alias": d.alias,
                    "last_ts": d.last_ts,
                    "metrics": {m: {"ts": ts, "value": pages.finite(v)} for m, ts, v in d.metrics},
                }
                for d in page.devices
            ],
        }

    def device_html(self, conn: Any, device: str) -> str:
        every = queries.chart_every(conn, device, self.cfg.web.chart_max_points)
        day = queries.device_day(conn, self.cfg, device, every=every)
        if day is None:
            raise NotFound(f"no readings of device {device!r} in the store")
        return pages.device_page(self.serial, day)

    def day_json(self, conn: Any, device: str, every: int | None) -> dict[str, Any]:
        day = queries.device_day(conn, self.cfg, device, every=every)
        if day is None:
            raise NotFound(f"no readings of device {device!r} in the store")
        if every is None:
            metrics = {
                m: [{"ts": ts, "value": pages.finite(v)} for ts, v in points]
                for m, points in day.metrics.items()
            }
        else:
            metrics = {
                m: [
                    {
                        "ts": b,
                        "min": pages.finite(lo),
                        "max": pages.finite(hi),
                        "mean": pages.finite(mean),
                        "count": n,
                    }
                    for b, lo, hi, mean, n in points
                ]
                for m, points in day.metrics.items()
            }
        return {
            "site": self.serial,
            "device": day.device,
            "alias": day.alias,
            "from": day.start,
            "to": day.end,
            "every": day.every,
            "metrics": metrics,
        }

    def static(self, name: str) -> Answer:
        if name not in STATIC_FILES:
            raise NotFound(f"no file /static/{name}")
        data = resources.files("fieldgate").joinpath("static", *name.split("/")).read_bytes()
        return Answer(200, data, STATIC_FILES[name], cache="max-age=3600")


class BadRequest(Exception):
    """A malformed query (400 with this sentence)."""


def _every(query: dict[str, list[str]]) -> int | None:
    if "every" not in query:
        return None
    text = query["every"][-1]
    if not text.isdigit() or not 1 <= int(text) <= 86400:
        raise BadRequest(f"every: expected whole seconds from 1 to 86400, got {text[:20]!r}")
    return int(text)


class Handler(BaseHTTPRequestHandler):
    """GET and HEAD on :class:`Site`'s routes; everything else is refused."""

    server: WebServer
    timeout = REQUEST_TIMEOUT_SECS
    server_version = "fieldgate-web"
    sys_version = ""

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def _serve(self, *, head: bool) -> None:
        url = urlsplit(self.path)
        json_ = url.path.startswith("/api/")
        try:
            answer = self.server.site.answer(url.path, parse_qs(url.query))
        except NotFound as exc:
            answer = _error(404, str(exc), json_, self.server.site.serial)
        except BadRequest as exc:
            answer = _error(400, str(exc), json_, self.server.site.serial)
        except Exception:
            log.exception("%s failed", url.path)
            answer = _error(500, "the page failed; the cause is in the log", json_, "")
        self.send_response(answer.status)
        self.send_header("Content-Type", answer.content_type)
        self.send_header("Content-Length", str(len(answer.body)))
        self.send_header("Cache-Control", answer.cache)
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(answer.body)

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)


def _error(status: int, text: str, json_: bool, site: str) -> Answer:
    if json_:
        return _json({"error": text}, status)
    return _html(pages.message_page(site, HTTPStatus(status).phrase, text), status)


class WebServer(ThreadingHTTPServer):
    """At most ``max_connections`` requests in flight: a further connection is answered 503
    at once instead of starting one more thread on a small gateway."""

    daemon_threads = True

    def __init__(self, cfg: Config) -> None:
        self.site = Site(cfg)
        self._slots = threading.BoundedSemaphore(cfg.web.max_connections)
        host = cfg.web.listen_address
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            super().__init__((host, cfg.web.port), Handler)
        except OSError as exc:
            raise FieldgateError(
                f"web: cannot listen on {host}:{cfg.web.port} (web.listen_address, web.port): "
                f"{exc.strerror or exc}"
            ) from None

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.sendall(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                    b"Connection: close\r\nRetry-After: 1\r\n\r\n"
                )
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in str(host) else f"http://{host}:{port}"


def serve(cfg: Config, stop: StopFlag) -> int:
    """Serve until ``stop`` is set (SIGTERM, SIGINT): the listener closes at once, requests
    in flight are read-only and simply end."""
    server = WebServer(cfg)
    thread = threading.Thread(target=server.serve_forever, name="web", daemon=True)
    thread.start()
    log.info("serving the gateway page on %s", server.url)
    try:
        while not stop.wait(1):
            pass
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    log.info("stopped (%s)", stop.signal_name or "asked")
    return 0
