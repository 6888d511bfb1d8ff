"""The hub's gunicorn worker: ``gthread`` whose reads have deadlines, so slow or idle
clients cannot starve the hub.

gunicorn's ``gthread`` worker gives each connection to a thread, which then reads the
request from the socket without a time limit: a client that sends half a request line,
half its headers or a body byte now and then holds that thread for as long as it likes,
and ``workers * threads`` such clients make the hub unreachable (gunicorn 27 also lets a
thread wait up to 5 s for a new connection's first byte, so idle connections queued
everyone behind them). :class:`HubWorker` changes two things (measured and chosen in
docs/hub.md, "Slow and idle clients"):

- a request is read by the worker's event loop, not by a thread, until its headers and
  its body are in (at most :data:`PREFILL_BYTES` of the body): idle and slow clients wait
  there at the cost of a socket, and one that has not sent its request within
  ``read_timeout`` seconds is closed without ever taking a thread;
- the rest of a larger body is read by the thread through a :class:`DeadlineSocket`, in
  the manner of Apache's ``mod_reqtimeout``: ``read_timeout`` seconds plus one second for
  every ``min_body_rate`` bytes received; one write of the response may take at most
  ``send_timeout`` seconds (a client that stops reading a download).

A client that misses a deadline is logged with its address and its connection closed; a
body cut in a view answers ``408`` (:class:`fieldgate.hub.web.ClientTooSlow`). Plain HTTP
only: the hub leaves TLS to a reverse proxy (``--trusted-proxies``).
"""

from __future__ import annotations

import contextlib
import logging
import re
import selectors
import socket
import time
from collections import deque
from dataclasses import dataclass
from functools import partial
from typing import Any

from gunicorn.workers.gthread import ThreadWorker

from fieldgate.hub.web import ClientTooSlow

log = logging.getLogger("fieldgate.hub")


@dataclass
class ClientLimits:
    """How long a client may take (``fieldgate hub serve --client-timeout``,
    ``--min-body-rate``)."""

    #: Seconds for a request line and headers, and a body's grace before its rate counts.
    read_timeout: float = 15.0
    #: Bytes per second a body must average after its grace.
    min_body_rate: float = 4096.0
    #: Seconds one write of a response may take.
    send_timeout: float = 60.0


#: How much of a request body the worker's event loop reads before a thread takes over.
PREFILL_BYTES = 1 << 20
_LENGTH_RE = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_CHUNKED_RE = re.compile(rb"\r\ntransfer-encoding:[^\r\n]*chunked", re.IGNORECASE)
_EXPECT_RE = re.compile(rb"\r\nexpect:[ \t]*100-continue", re.IGNORECASE)

#: The limits of this hub process (set by :func:`fieldgate.hub.server.serve` before
#: gunicorn forks its workers).
LIMITS = ClientLimits()


class DeadlineSocket(socket.socket):
    """A client connection whose blocking reads and writes end at a deadline (see the
    module docstring); non-blocking use (the worker's event loop) is unchanged."""

    deadline: float | None = None
    body: bool = False
    received: int = 0
    cut: bool = False
    continued: bool = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: What the worker's event loop read of the request, for the thread's first read.
        self.prefetched = bytearray()

    def request_in(self) -> bool:
        """Whether :attr:`prefetched` holds the headers and the body, or enough of it
        (:data:`PREFILL_BYTES`) to give the request to a thread. Answers an
        ``Expect: 100-continue`` so that the client sends its body now (gunicorn may send
        a second ``100 Continue`` later, which HTTP/1.1 clients accept)."""
        buf = self.prefetched
        if len(buf) >= PREFILL_BYTES:
            return True
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = bytes(buf[:end])
        if not self.continued and _EXPECT_RE.search(head):
            self.continued = True
            with contextlib.suppress(OSError):
                socket.socket.send(self, b"HTTP/1.1 100 Continue\r\n\r\n")
        body = len(buf) - end - 4
        length = _LENGTH_RE.search(head)
        if length is not None:
            return body >= int(length.group(1))
        if _CHUNKED_RE.search(head):  # ends with the last chunk and an empty line
            return body > 0 and buf.endswith(b"\r\n\r\n")
        return True

    @classmethod
    def adopt(cls, sock: socket.socket) -> DeadlineSocket:
        """The same connection as a DeadlineSocket (``sock`` gives up its descriptor)."""
        timeout = sock.gettimeout()
        new = cls(sock.family, sock.type, sock.proto, fileno=sock.detach())
        new.settimeout(timeout)
        return new

    def new_request(self, seen_at: float) -> None:
        """A request starts: its headers are due ``read_timeout`` after ``seen_at``, when
        the worker's event loop saw its first bytes (not when a thread got to it)."""
        self.deadline, self.body, self.received = seen_at + LIMITS.read_timeout, False, 0

    def start_body(self) -> None:
        """The headers are in: the body's deadline starts now."""
        self.deadline, self.body, self.received = time.monotonic() + LIMITS.read_timeout, True, 0

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if self.prefetched:  # all of it: gunicorn's reader keeps what it did not ask for
            data, self.prefetched = bytes(self.prefetched), bytearray()
            return data
        prior = self.gettimeout()
        if prior == 0.0:  # non-blocking: the worker's event loop, not a request
            return super().recv(bufsize, flags)
        if self.deadline is None:  # a read outside a request (gunicorn's own)
            self.deadline = time.monotonic() + LIMITS.read_timeout
        # past the deadline only what the client already sent is read: a request that
        # waited in the worker's queue is not cut for that
        remaining = max(self.deadline - time.monotonic(), 0.0)
        self.settimeout(remaining if prior is None else min(prior, remaining))
        try:
            data = super().recv(bufsize, flags)
        except (TimeoutError, BlockingIOError):
            if time.monotonic() >= self.deadline:
                self._too_slow()
            raise
        finally:
            self.settimeout(prior)
        if self.body and data:
            self.received += len(data)
            self.deadline += len(data) / LIMITS.min_body_rate
        return data

    def sendall(self, data: Any, flags: int = 0) -> None:
        prior = self.gettimeout()
        if prior == 0.0:
            super().sendall(data, flags)
            return
        limit = LIMITS.send_timeout
        self.settimeout(limit if prior is None else min(prior, limit))
        try:
            super().sendall(data, flags)
        except TimeoutError:
            self._too_slow(sending=True)
        finally:
            self.settimeout(prior)

    def _too_slow(self, *, sending: bool = False) -> None:
        """Log the client once, stop reading from it, and end the request."""
        if sending:
            what = f"did not take the response within {LIMITS.send_timeout:g} s"
        elif self.body:
            what = (
                f"sent its request body too slowly ({self.received} bytes; at least "
                f"{LIMITS.min_body_rate:g} bytes/s after {LIMITS.read_timeout:g} s)"
            )
        else:
            what = f"did not send its request headers within {LIMITS.read_timeout:g} s"
        if not self.cut:
            self.cut = True
            log.warning("cut off client %s: it %s", _peer(self), what)
            with contextlib.suppress(OSError):  # later reads (gunicorn's drain, close) end now
                self.shutdown(socket.SHUT_RD)
        raise ClientTooSlow(what)


def _peer(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return "(gone)"
    return f"{host}:{port}"


def pre_request(worker: Any, req: Any) -> None:
    """gunicorn's hook once a request's headers are parsed: its body's deadline starts."""
    sock = getattr(req.unreader, "sock", None)
    if isinstance(sock, DeadlineSocket):
        sock.start_body()


class HubWorker(ThreadWorker):  # type: ignore[misc]
    """gunicorn's ``gthread`` worker that reads each request in its event loop until the
    headers and :data:`PREFILL_BYTES` of the body are in (or all of it), and only then
    gives it to a thread, which reads the rest of a larger body through the
    :class:`DeadlineSocket`'s deadlines. A connection that has not sent that much within
    ``read_timeout`` of its first chance is closed by the event loop without ever taking a
    thread."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Connections whose request is being read by the event loop, oldest first.
        self.filling: deque[Any] = deque()

    def enqueue_req(self, conn: Any) -> None:
        if conn.parser is not None and conn.parser.unreader.buf.getvalue():
            conn.seen_at = time.monotonic()
            super().enqueue_req(conn)  # the next request is read already (pipelined)
            return
        if not isinstance(conn.sock, DeadlineSocket):
            conn.sock = DeadlineSocket.adopt(conn.sock)
        conn.sock.setblocking(False)
        conn.sock.continued = False
        conn.seen_at = time.monotonic()
        conn.timeout = conn.seen_at + LIMITS.read_timeout
        self.filling.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._fill, conn))

    def _fill(self, conn: Any, _sock: Any) -> None:
        """The event loop's read of a request (see the class docstring)."""
        sock: DeadlineSocket = conn.sock
        try:
            data = socket.socket.recv(sock, 1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            sock.prefetched += data
            if not sock.request_in():
                return
        self.poller.unregister(sock)
        self.filling.remove(conn)
        if not data and not sock.prefetched:  # closed before sending anything
            self.nr_conns -= 1
            conn.close()
            return
        conn.data_ready = True  # gunicorn's thread reads at once (from sock.prefetched)
        super().enqueue_req(conn)

    def murder_pending(self) -> None:
        super().murder_pending()
        now = time.monotonic()
        while self.filling and self.filling[0].timeout <= now:
            conn = self.filling.popleft()
            with contextlib.suppress(OSError, KeyError, ValueError):
                self.poller.unregister(conn.sock)
            self.nr_conns -= 1
            got = len(conn.sock.prefetched)
            if got:
                log.warning(
                    "cut off client %s: it sent %d bytes of a request but not all of it "
                    "within %g s",
                    _peer(conn.sock),
                    got,
                    LIMITS.read_timeout,
                )
            conn.close()

    def handle(self, conn: Any) -> Any:
        conn.sock.new_request(conn.seen_at)
        return super().handle(conn)
