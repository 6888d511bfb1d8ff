"""Every Modbus TCP bus driven by one thread: non-blocking sockets and one selector.

A TCP bus (one ``host:port``, which may be a gateway to several units) is a small state
machine (:class:`_Link`): idle until one of its devices is due, then, read by read, connect
if needed, send the 12-byte request, wait for the whole answer (its MBAP header says how long
it is) or the device's timeout, decode it, send the next. One request is outstanding per
connection (many TCP gateways serve one at a time) and the devices of a bus take turns, as on
a bus thread; buses never wait for each other, because no call here blocks: a device that
does not answer only holds its own bus until its timeout. Host names are resolved by a small
pool of helper threads (``getaddrinfo`` blocks); an address is used as it is.

Why one thread rather than one per bus: on loopback or a LAN an answer arrives in tens of
microseconds, and fifty bus threads each waking for every answer and handing the GIL around
cost the poller more than the reads (docs/benchmarks.md, "Modbus"). The selector wakes once
for whatever answers arrived together.

The framing (Modbus Messaging on TCP/IP Implementation Guide V1.0b §3.1): a read request is
the MBAP header (transaction id, protocol 0, length of what follows, unit id) and the PDU
(function code, first address, count); the answer must carry the request's transaction id
and unit id (pymodbus checks the same), its byte count must match its length, and anything
else (a different function code, bytes past the answer, a header that is not Modbus TCP's)
is a garbled answer; ``function | 0x80`` with one byte is the device's exception code. After
any failure other than an exception code the connection is closed, so a late answer can
never be taken for the next one; bytes or a close from the device while no request is
outstanding close it too (the next poll connects again).
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import ipaddress
import itertools
import math
import os
import selectors
import socket
import struct
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from fieldgate.daemon import StopFlag
from fieldgate.modbus.client import FUNCTION_CODES, ReadError, exception_error, whole_answer
from fieldgate.modbus.poller import (
    Handoff,
    Polled,
    Schedule,
    Target,
    begin_poll,
    end_poll,
    internal_error,
    take_answer,
    take_failure,
)
from fieldgate.retry import root_cause

#: MBAP header and read request: 12 bytes in all.
_REQUEST = struct.Struct(">HHHBBHH")
_HEADER = struct.Struct(">HHHB")
#: The longest Modbus TCP answer: the 7-byte header and a PDU of 253 bytes.
_MAX_ADU = 260
#: The longest the loop sleeps without looking at its stop flag.
STOP_CHECK_SECS = 0.25
#: Threads that resolve host names (a device given by address needs none).
RESOLVERS = 2
#: A poll in progress is handed to the store thread once this many of its readings are
#: not handed yet: a coalesced read's answer brings tens of values, a map read one register
#: at a time would otherwise wake the store thread for every single value.
HANDOFF_MIN_READINGS = 16

_IDLE, _RESOLVING, _CONNECTING, _AWAITING = "idle", "resolving", "connecting", "awaiting"


def answer_length(got: bytes, tid: int, unit: int) -> int:
    """The whole answer's length from its first 7 bytes (or more); ValueError when they are
    not a Modbus TCP header or not the answer to transaction ``tid`` of ``unit``."""
    rtid, protocol, length, runit = _HEADER.unpack_from(got)
    if protocol != 0 or not 2 <= length <= _MAX_ADU - 6:
        raise ValueError(f"not a Modbus TCP header: {got[:7].hex()}")
    if (rtid, runit) != (tid, unit):
        raise ValueError(
            f"answer for unit {runit}, transaction {rtid} (asked unit {unit}, transaction {tid})"
        )
    return 6 + length


class _Link:
    """One Modbus TCP bus: its connection, its devices' turns and the poll in progress."""

    def __init__(self, loop: TcpLoop, name: str, host: str, port: int, targets: list[Target]):
        self.loop, self.name, self.host, self.port = loop, name, host, port
        self.targets = targets
        self.endpoint = f"{host}:{port}"  # as error messages name it
        self.sock: socket.socket | None = None
        self.state = _IDLE
        self.tid = 0
        self.requests = 0
        #: bumped at every change of state: a timer set before the change is stale
        self.token = 0
        self.deadline = math.inf
        self.queue: list[Target] = []  # --once: the devices still to poll
        self.schedule: Schedule | None = None
        self.polled: Polled | None = None
        self.n = 0  # the read of the poll in progress
        self.handed = 0  # how many of its readings the store thread was given so far
        self.got = b""  # the answer so far
        self.need = _HEADER.size
        self.out = b""  # the part of the request not sent yet
        self.addresses: list[Any] = []
        self.tried = 0
        self.first_error = ""
        self.resolved: Future[list[Any]] | None = None

    # -- the devices' turns ------------------------------------------------------------------

    def advance(self, now: float) -> None:
        """Start the next poll if one is due, else set a timer for it (the link is idle)."""
        if self.schedule is None:
            if self.queue:
                self.loop.handoff.polling(self.name)
                self.begin(self.queue.pop(0), now)
            return
        t, due = self.schedule.next()
        if due <= now:
            self.loop.handoff.polling(self.name)
            self.begin(t, now)
        else:
            self.loop.timer(due, self)

    def begin(self, t: Target, now: float) -> None:
        self.polled = begin_poll(t)
        self.n = self.handed = 0
        self.next_read(now)

    def next_read(self, now: float) -> None:
        """Send the poll's next read, or finish the poll."""
        polled = self.polled
        assert polled is not None
        t = polled.target
        if self.n >= len(t.reads):
            self.finish(now)
        elif self.sock is None:
            self.connect(now)
        else:
            self.send(now)

    def finish(self, now: float) -> None:
        polled = self.polled
        assert polled is not None
        self.polled = None
        self.set_state(_IDLE, math.inf)
        end_poll(polled)
        if self.schedule is not None:
            self.loop.handoff.put(polled, self.name, self.schedule.done(polled, time.monotonic()))
        else:
            self.loop.handoff.put(polled, self.name, None if self.queue else math.inf)
        self.loop.ready.append(self)  # its next poll: from the loop, not deeper in this stack

    def fail(self, exc: ReadError, now: float) -> None:
        """The read in progress failed: close unless it was an exception code, go on or stop."""
        polled = self.polled
        assert polled is not None
        if exc.kind != "exception":
            self.close()
        if take_failure(polled, exc):
            self.n += 1
            self.next_read(now)
        else:
            self.finish(now)

    def crashed(self, exc: Exception, now: float) -> None:
        """An unexpected error (a bug) ends the poll as a failed one; the bus goes on."""
        polled = self.polled
        self.close()
        if polled is None:  # between polls: the next one connects again
            return
        internal_error(polled.target, exc, polled)
        self.finish(now)

    def set_state(self, state: str, deadline: float) -> None:
        self.state = state
        self.deadline = deadline
        self.token += 1
        if deadline < math.inf:
            self.loop.timer(deadline, self)

    def expired(self, now: float) -> None:
        """The timer of the current state ran out."""
        if self.state == _IDLE:
            self.advance(now)
            return
        polled = self.polled
        assert polled is not None
        t = polled.target
        what = t.reads[self.n].describe()
        if self.state in (_RESOLVING, _CONNECTING):
            self.connect_failed("timed out", now)
            return
        got = self.got
        self.close()
        if not got:
            self.fail(ReadError("timeout", f"no answer within {t.timeout:g} s reading {what}"), now)
        else:
            self.fail(_garbled(what, got), now)

    # -- connecting ------------------------------------------------------------------------

    def connect(self, now: float) -> None:
        polled = self.polled
        assert polled is not None
        timeout = polled.target.timeout
        self.tried, self.first_error = 0, ""
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            self.resolved = self.loop.resolve(self.host, self.port)
            self.set_state(_RESOLVING, now + timeout)
            return
        self.addresses = socket.getaddrinfo(
            self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST
        )
        self.try_address(now)

    def on_resolved(self, now: float) -> None:
        future, self.resolved = self.resolved, None
        assert future is not None
        try:
            self.addresses = future.result()
        except OSError as exc:
            self.connect_failed(root_cause(exc), now)
            return
        self.try_address(now)

    def try_address(self, now: float) -> None:
        """Connect to the next address (as ``socket.create_connection`` tries them in turn)."""
        polled = self.polled
        assert polled is not None
        family, type_, proto, _, address = self.addresses[self.tried]
        self.tried += 1
        sock = socket.socket(family, type_, proto)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        code = sock.connect_ex(address)
        self.sock = sock
        self.loop.watch(self, selectors.EVENT_WRITE)
        if code in (0, errno.EINPROGRESS):
            self.set_state(_CONNECTING, now + polled.target.timeout)
        else:
            self.connect_failed(os.strerror(code), now)

    def on_connected(self, now: float) -> None:
        assert self.sock is not None
        code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self.connect_failed(os.strerror(code), now)
            return
        self.loop.watch(self, selectors.EVENT_READ)
        self.send(now)

    def connect_failed(self, cause: str, now: float) -> None:
        self.close()
        self.first_error = self.first_error or cause
        if self.tried < len(self.addresses) and cause != "timed out":
            self.try_address(now)
            return
        self.fail(
            ReadError("connect", f"cannot connect to {self.endpoint}: {self.first_error}"), now
        )

    # -- one read --------------------------------------------------------------------------

    def send(self, now: float) -> None:
        polled = self.polled
        assert polled is not None and self.sock is not None
        t = polled.target
        read = t.reads[self.n]
        self.tid = self.tid % 0xFFFF + 1
        self.got, self.need = b"", _HEADER.size
        self.requests += 1
        polled.requests += 1
        self.out = _REQUEST.pack(
            self.tid, 0, 6, t.cfg.unit, FUNCTION_CODES[read.table], read.start, read.count
        )
        self.set_state(_AWAITING, now + t.timeout)
        self.on_writable(now)

    def on_writable(self, now: float) -> None:
        assert self.sock is not None
        try:
            sent = self.sock.send(self.out)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self.broken(exc, now)
            return
        self.out = self.out[sent:]
        self.loop.watch(self, selectors.EVENT_READ | (selectors.EVENT_WRITE if self.out else 0))

    def on_readable(self, now: float) -> None:
        assert self.sock is not None
        try:
            chunk = self.sock.recv(_MAX_ADU)
        except BlockingIOError:
            return
        except OSError as exc:
            self.broken(exc, now)
            return
        if self.state != _AWAITING:  # a close or stray bytes between requests
            self.close()
            return
        polled = self.polled
        assert polled is not None
        what = polled.target.reads[self.n].describe()
        if not chunk:
            self.close()
            self.fail(
                ReadError("connect", f"{self.endpoint} closed the connection reading {what}"), now
            )
            return
        self.got += chunk
        got = self.got
        try:
            if self.need == _HEADER.size and len(got) >= _HEADER.size:
                self.need = answer_length(got, self.tid, polled.target.cfg.unit)
            if len(got) < self.need:
                return
            if len(got) > self.need:
                raise ValueError(f"{len(got) - self.need} bytes more than the answer's length")
        except ValueError as exc:
            self.close()
            self.fail(ReadError("io", f"unusable answer reading {what}: {exc}"), now)
            return
        self.answered(got[_HEADER.size :], now)

    def answered(self, pdu: bytes, now: float) -> None:
        polled = self.polled
        assert polled is not None
        read = polled.target.reads[self.n]
        function = FUNCTION_CODES[read.table]
        self.set_state(_IDLE, math.inf)  # between two requests of the poll
        if pdu[0] == function | 0x80 and len(pdu) == 2:
            self.fail(exception_error(pdu[1], read), now)
            return
        if pdu[0] != function or len(pdu) < 2 or pdu[1] != len(pdu) - 2:
            self.fail(_garbled(read.describe(), self.got), now)
            return
        try:
            data = whole_answer(read, pdu[2:])
        except ReadError as exc:
            self.fail(exc, now)
            return
        take_answer(polled, self.n, data)
        self.n += 1
        ready = len(polled.readings)
        if self.n < len(polled.target.reads) and ready - self.handed >= HANDOFF_MIN_READINGS:
            self.handed = ready  # stored while the next read is answered
            self.loop.handoff.progress(polled)
        self.next_read(now)

    def broken(self, exc: OSError, now: float) -> None:
        polled = self.polled
        self.close()
        if polled is None or self.state != _AWAITING:
            return  # between requests: the next poll connects again
        what = polled.target.reads[self.n].describe()
        self.fail(ReadError("connect", f"{self.endpoint}: {root_cause(exc)} reading {what}"), now)

    def close(self) -> None:
        if self.sock is not None:
            self.loop.unwatch(self)
            self.sock.close()
            self.sock = None


def _garbled(what: str, got: bytes) -> ReadError:
    return ReadError("io", f"garbled answer reading {what} ({len(got)} bytes: {got[:16].hex()})")


class TcpLoop:
    """The thread that polls every Modbus TCP bus (``buses``: name -> its devices)."""

    def __init__(self, buses: dict[str, list[Target]], handoff: Handoff) -> None:
        self.handoff = handoff
        self.links: list[_Link] = []
        for name, targets in buses.items():
            cfg = targets[0].cfg
            assert cfg.host is not None
            self.links.append(_Link(self, name, cfg.host, cfg.port_or_default, targets))
        self.selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._timers: list[tuple[float, int, int, _Link]] = []
        #: links whose poll ended: the loop starts their next one
        self.ready: list[_Link] = []
        self._seq = itertools.count()
        self._resolvers: ThreadPoolExecutor | None = None
        self.thread: threading.Thread | None = None
        self.origin = 0.0

    @property
    def names(self) -> list[str]:
        return [link.name for link in self.links]

    def start(
        self, stop: threading.Event | StopFlag, *, once: bool, origin: float | None = None
    ) -> None:
        """Poll in a new thread: each device once, or on its schedule until ``stop``, the
        schedules starting at ``origin`` (monotonic; default now)."""
        self.origin = time.monotonic() if origin is None else origin
        for link in self.links:
            self.handoff.polling(link.name)
        self.thread = threading.Thread(
            target=self._run, args=(stop, once), name="modbus tcp", daemon=True
        )
        self.thread.start()

    def _run(self, stop: threading.Event | StopFlag, once: bool) -> None:
        self._timers.clear()
        for link in self.links:
            if once:
                link.queue = list(link.targets)
                link.schedule = None
            else:
                link.schedule = Schedule(link.targets, self.origin)
        self._select(0)  # what happened since the last --once round: a close by the device
        self.ready = list(self.links)
        try:
            while not stop.is_set():
                while self.ready:
                    link = self.ready.pop()
                    try:
                        link.advance(time.monotonic())
                    except Exception as exc:
                        link.crashed(exc, time.monotonic())
                if once and all(link.state == _IDLE and not link.queue for link in self.links):
                    return
                wait = STOP_CHECK_SECS
                if self.ready:
                    wait = 0.0
                elif self._timers:
                    wait = min(wait, max(0.0, self._timers[0][0] - time.monotonic()))
                self._select(wait)
                self._expire(time.monotonic())
        finally:
            if not once:
                self.close()

    def _select(self, wait: float) -> None:
        for key, mask in self.selector.select(wait):
            link = key.data
            now = time.monotonic()
            if link is None:
                self._woken(now)
            else:
                self._event(link, mask, now)

    def _event(self, link: _Link, mask: int, now: float) -> None:
        try:
            if link.state == _CONNECTING:
                link.on_connected(now)
            elif mask & selectors.EVENT_READ:
                link.on_readable(now)
            elif mask & selectors.EVENT_WRITE and link.sock is not None:
                link.on_writable(now)
        except Exception as exc:
            link.crashed(exc, now)

    def _woken(self, now: float) -> None:
        try:
            while self._wake_r.recv(64):
                pass
        except BlockingIOError:
            pass
        for link in self.links:
            if link.state == _RESOLVING and link.resolved is not None and link.resolved.done():
                try:
                    link.on_resolved(now)
                except Exception as exc:
                    link.crashed(exc, now)

    def _expire(self, now: float) -> None:
        while self._timers and self._timers[0][0] <= now:
            _, _, token, link = heapq.heappop(self._timers)
            if token != link.token:
                continue  # set for a state the link has left
            try:
                link.expired(now)
            except Exception as exc:
                link.crashed(exc, now)

    def timer(self, when: float, link: _Link) -> None:
        heapq.heappush(self._timers, (when, next(self._seq), link.token, link))

    def watch(self, link: _Link, events: int) -> None:
        assert link.sock is not None
        try:
            key = self.selector.get_key(link.sock)
        except KeyError:
            self.selector.register(link.sock, events, link)
            return
        if key.events != events:
            self.selector.modify(link.sock, events, link)

    def unwatch(self, link: _Link) -> None:
        assert link.sock is not None
        with contextlib.suppress(KeyError):
            self.selector.unregister(link.sock)

    def resolve(self, host: str, port: int) -> Future[list[Any]]:
        if self._resolvers is None:
            self._resolvers = ThreadPoolExecutor(RESOLVERS, thread_name_prefix="modbus resolve")
        future = self._resolvers.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
        future.add_done_callback(lambda _f: self._wake())
        return future

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # already woken (the pair is full), or closed
            self._wake_w.send(b"x")

    def close(self) -> None:
        """Close every connection (after :meth:`start` with ``once``; a run closes its own)."""
        for link in self.links:
            link.close()
            link.state = _IDLE
            link.polled = None
        if self._resolvers is not None:
            self._resolvers.shutdown(wait=False, cancel_futures=True)
            self._resolvers = None
