"""Modbus devices polled on their own schedules: a thread per serial line, one thread for
every Modbus TCP bus, one store writer.

- A *bus* (one TCP host:port, or one serial port by its resolved path) has one connection;
  its devices take turns, one request at a time (RS-485 is half-duplex and many TCP gateways
  serve one request at a time). A serial line gets a thread of its own (:class:`Bus`); the
  TCP buses are driven together by one selector thread (:mod:`fieldgate.modbus.tcploop`),
  which never blocks on one of them. Different buses never wait for each other, so a slow or
  dead device delays only the devices behind the same bus.
- Each device is polled every ``interval_secs`` on a fixed grid (a late poll does not shift
  the ones after it; slots missed while the bus was busy are skipped and counted as late).
  A poll reads the device's coalesced plan (:mod:`fieldgate.modbus.plan`); its readings are
  stamped with the poll's start (epoch ms) and stored with source ``modbus:<device>``.
- A device that does not answer (timeout, refused connection, missing serial port, CRC error,
  garbled answer) stops that poll at the first failed read and is retried with backoff: its
  interval, doubled per consecutive failure, up to ``retry_max_secs``. A Modbus exception code
  ends only its own read: the other reads of the poll go on and the poll counts as failed. If
  some read of the poll was answered with values the device keeps its schedule; if every read
  got an exception (a unit in fault, a TCP gateway whose serial device is silent: codes 10
  and 11) it is retried with backoff like one that does not answer. A poll with values resets
  the backoff.
- A value that decodes to NaN or infinity is not stored: the other values are, and the poll
  leaves one ``rejected`` row naming each bad value with its raw words.
- The bus threads (the serial lines' and the TCP loop) hand each poll to the thread that
  runs :meth:`ModbusPoller.run` (or :meth:`ModbusPoller.once`), which owns the store
  connection (:class:`Handoff`); the TCP loop also hands over a poll in progress after an
  answer but the last once enough of its readings wait
  (``tcploop.HANDOFF_MIN_READINGS``), so that its readings are stored while the next
  request is answered (a coalesced round's polls all end in its last third: storing only whole polls
  left most readings for after the last answer). A round's polls are stored in one
  transaction as they arrive while the other buses are still reading: their readings, any
  ``rejected`` rows, then the devices' facts for ``fieldgate status``
  (``poller.modbus.device.<device>``, JSON) and the summary (``poller.modbus.state``; see
  :mod:`fieldgate.modbus.report`). Every bus's schedule starts at one origin, so the devices
  of one interval are due together; the commit comes when no bus is polling or due any
  more, or :data:`ROUND_HOLD_SECS` after the round's first poll: one fsync a round.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
import struct
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

from fieldgate import store
from fieldgate.config import Config, ModbusDevice
from fieldgate.daemon import StopFlag
from fieldgate.errors import ConfigError
from fieldgate.modbus.client import BusClient, ReadError, quiet_pymodbus
from fieldgate.modbus.plan import Read, Span, plan_reads
from fieldgate.modbus.registers import (
    BIT_TABLES,
    Decoder,
    answer_struct,
    describe_words,
    registers_at,
)
from fieldgate.modbus.report import STATE_KEY, device_key
from fieldgate.retry import Backoff

log = logging.getLogger("fieldgate.modbus")

#: How long a stop waits for polls in flight before the store is closed.
STOP_GRACE_SECS = 3.0
#: At most this many bad values are spelled out in one rejection reason.
MAX_REASONS = 5
#: At most this many polls share one store transaction.
MAX_BATCH = 500
#: A round's polls are stored in one transaction, committed when the round is complete or
#: this long after its first poll arrived (the write lock is held at most this long).
ROUND_HOLD_SECS = 0.25


@dataclass(frozen=True)
class Target:
    """A configured device, resolved: its canonical name, schedule and read plan."""

    cfg: ModbusDevice
    device: str
    bus: str
    interval: float
    timeout: float
    reads: tuple[Read, ...]
    decoders: tuple[Decoder, ...]

    @property
    def source(self) -> str:
        return f"modbus:{self.device}"

    @cached_property
    def answers(self) -> tuple[struct.Struct | None, ...]:
        """Per read: one struct for every value of its answer, or None (decoded one by one)."""
        return tuple(
            answer_struct([self.decoders[i] for i in r.members], r.start) for r in self.reads
        )

    @property
    def where(self) -> str:
        return f"{self.cfg.bus} unit {self.cfg.unit}"


def build_targets(cfg: Config, *, coalesce: bool = True) -> list[Target]:
    """The devices of ``poll.modbus`` with their plans (the configuration is already valid);
    ``coalesce=False`` reads every value with a request of its own (the benchmark's baseline)."""
    targets = []
    for dev in cfg.poll.modbus:
        decoders = tuple(Decoder.of(r) for r in dev.registers)
        if coalesce:
            reads = plan_reads(
                [Span(d.table, d.address, d.width) for d in decoders],
                max_gap=dev.max_gap,
                max_read_registers=dev.max_read_registers,
                max_read_bits=dev.max_read_bits,
            )
        else:
            reads = [Read(d.table, d.address, d.width, (i,)) for i, d in enumerate(decoders)]
        # two names of one serial port (a /dev/serial/by-id link and its tty) are one bus
        bus = dev.bus if dev.serial is None else f"rtu {os.path.realpath(dev.serial)}"
        targets.append(
            Target(
                cfg=dev,
                device=cfg.devices.resolve(dev.device) or dev.device,
                bus=bus,
                interval=dev.interval_secs or cfg.poll.interval_secs,
                timeout=dev.timeout_secs or cfg.poll.timeout_secs,
                reads=tuple(reads),
                decoders=decoders,
            )
        )
    return targets


def group_buses(targets: Sequence[Target], path: str) -> dict[str, list[Target]]:
    """Targets by bus; ConfigError when two names of one serial port disagree on the line."""
    buses: dict[str, list[Target]] = {}
    for t in targets:
        on_bus = buses.setdefault(t.bus, [])
        for other in on_bus:
            if t.cfg.serial is not None and other.cfg.line != t.cfg.line:
                raise ConfigError(
                    f"{path}: poll.modbus: {t.device} ({t.cfg.serial}) and {other.device} "
                    f"({other.cfg.serial}) are the same serial port with different line settings"
                )
            if other.cfg.unit == t.cfg.unit:
                raise ConfigError(
                    f"{path}: poll.modbus: {t.device} and {other.device} are both unit "
                    f"{t.cfg.unit} on {t.bus}"
                )
        on_bus.append(t)
    return buses


@dataclass
class Polled:
    """One poll of one device as its bus's thread saw it."""

    target: Target
    ts: int  # the poll time: epoch ms when it started
    finished_at: int = 0
    #: the readings, (metric, value, received_at) with received_at when the answer of its
    #: read arrived; stored as the device's readings at ``ts`` (``insert_device_readings``)
    readings: list[tuple[str, float, int]] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)  # one text per non-finite value
    bad_raw: dict[str, str] = field(default_factory=dict)  # metric -> raw words
    error: str | None = None
    kind: str | None = None
    errors: int = 0  # failed reads in this poll
    answered: int = 0  # reads of this poll answered with values
    requests: int = 0
    late: int = 0  # slots of this device skipped after this poll: it or its bus overran
    retry_in: float | None = None  # seconds to the next attempt after a failure
    #: the store thread's: how many of ``readings`` are stored (a poll's first answers are
    #: stored while its bus reads the next), and how many of those were new
    stored: int = 0
    new: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None and (bool(self.readings) or not self.bad)

    @property
    def backs_off(self) -> bool:
        """Whether the next attempt waits for the backoff: no read of this poll was answered
        with values (no answer at all, or an exception code for every read)."""
        return self.kind is not None and not self.answered


def poll_device(client: BusClient, t: Target) -> Polled:
    """Read a device's plan once over a serial line and decode it; never raises (a bug becomes
    a failed poll, so a bus thread never dies and ``--once`` never waits for a poll that will
    not come). Modbus TCP devices are read by :mod:`fieldgate.modbus.tcploop`, with the same
    :func:`begin_poll`, :func:`take_answer`, :func:`take_failure` and :func:`end_poll`."""
    try:
        return _poll_device(client, t)
    except Exception as exc:
        client.close()
        return internal_error(t, exc)


def internal_error(t: Target, exc: Exception, polled: Polled | None = None) -> Polled:
    """A poll that an unexpected error ended (logged): a failed poll of kind ``io``;
    ``polled``: the poll in progress, which keeps what it read so far (default: a new one)."""
    log.exception("modbus %s: unexpected error while polling", t.device)
    if polled is None:
        now = store.now_ms()
        polled = Polled(t, now, now)
    polled.error, polled.kind = f"internal error: {exc!r}", "io"
    polled.errors += 1
    return polled


def _poll_device(client: BusClient, t: Target) -> Polled:
    polled = begin_poll(t)
    for n, read in enumerate(t.reads):
        before = client.requests
        try:
            data = client.read(t.cfg.unit, read, t.timeout)
        except ReadError as exc:
            polled.requests += client.requests - before
            if take_failure(polled, exc):
                continue
            break  # not answering: the rest of this poll would only wait as long again
        polled.requests += client.requests - before
        take_answer(polled, n, data)
    return end_poll(polled)


def begin_poll(t: Target) -> Polled:
    """A poll of ``t`` starting now (its readings' time)."""
    return Polled(t, store.now_ms())


def take_failure(polled: Polled, exc: ReadError) -> bool:
    """Note a failed read; whether the poll goes on with its next read (only after a Modbus
    exception code: a device that does not answer would only make the others wait again)."""
    polled.errors += 1
    if polled.error is None:
        polled.error, polled.kind = str(exc), exc.kind
    return exc.kind == "exception"


def take_answer(polled: Polled, n: int, data: bytes) -> None:
    """Decode the answer (``data``, as the device sent it) of the poll's ``n``-th read into the
    poll's readings, received now."""
    t = polled.target
    read = t.reads[n]
    rows = polled.readings
    decoders = t.decoders
    received = store.now_ms()
    polled.answered += 1
    whole = t.answers[n]
    if whole is not None:  # every value of the answer unpacked at once
        for i, raw in zip(read.members, whole.unpack_from(data), strict=True):
            d = decoders[i]
            value = float(raw) * d.scale + d.offset
            if math.isfinite(value):
                rows.append((d.metric, value, received))
            else:
                _bad(polled, d, value, data, d.address - read.start)
        return
    bits = read.table in BIT_TABLES
    for i in read.members:  # every value decoded from the answer's bytes
        d = decoders[i]
        at = d.address - read.start
        value = d.bit_value_at(data, at) if bits else d.value_at(data, at)
        if math.isfinite(value):
            rows.append((d.metric, value, received))
        else:  # only registers: a bit times a finite scale is finite
            _bad(polled, d, value, data, at)


def end_poll(polled: Polled) -> Polled:
    """The poll, finished now."""
    if polled.errors > 1 and polled.error is not None:
        polled.error += f" (and {polled.errors - 1} more failed reads)"
    polled.finished_at = store.now_ms()
    return polled


def _bad(polled: Polled, d: Decoder, value: float, data: bytes, at: int) -> None:
    """Note a value that is not finite (at register ``at`` of its read's answer)."""
    raw = describe_words(registers_at(data, at, d.width))
    shown = "NaN" if math.isnan(value) else str(value)
    polled.bad.append(f"{d.metric} ({d.type} {d.table} {d.address}): {shown} ({raw})")
    polled.bad_raw[d.metric] = raw


class Handoff:
    """Polls handed from the bus threads to the thread that stores them, and whether a round is
    complete: no poll waiting, no bus polling and none due (so one commit can store it all).
    A bus may also hand over a poll in progress whose answers so far are decoded
    (:meth:`progress`): their readings are stored while it reads on."""

    def __init__(self, buses: int) -> None:
        self.buses = buses
        self._cond = threading.Condition()
        self._polls: list[Polled] = []
        self._growing: list[Polled] = []
        #: bus -> when (monotonic) it polls next; a bus that is polling has no entry
        self._next: dict[str, float] = {}

    def polling(self, bus: str) -> None:
        with self._cond:
            self._next.pop(bus, None)

    def put(self, polled: Polled, bus: str, next_poll: float | None) -> None:
        """Hand over a poll; ``next_poll``: when the bus polls next (None: at once)."""
        with self._cond:
            self._polls.append(polled)
            if next_poll is not None:
                self._next[bus] = next_poll
            self._cond.notify()

    def progress(self, polled: Polled) -> None:
        """A poll in progress has new readings (its bus goes on with its next read)."""
        with self._cond:
            self._growing.append(polled)
            self._cond.notify()

    def take(
        self, timeout: float, limit: int = MAX_BATCH
    ) -> tuple[list[Polled], list[Polled], bool]:
        """The polls waiting, the polls in progress with new readings (after waiting up to
        ``timeout`` for either) and whether the round is complete with them."""
        with self._cond:
            if not self._polls and not self._growing:
                self._cond.wait(timeout)
            polls, self._polls = self._polls[:limit], self._polls[limit:]
            growing, self._growing = self._growing, []
            return polls, growing, self._complete()

    def _complete(self) -> bool:
        if self._polls or len(self._next) < self.buses:
            return False
        return min(self._next.values(), default=math.inf) > time.monotonic()


class Bus:
    """The thread that polls the devices of one serial line in turn."""

    def __init__(self, name: str, targets: list[Target], handoff: Handoff) -> None:
        self.name = name
        self.targets = targets
        self.handoff = handoff
        self.stop: threading.Event | StopFlag = threading.Event()
        port = name.removeprefix("rtu ") if name.startswith("rtu ") else None
        self.client = BusClient(targets[0].cfg, port)
        self.thread: threading.Thread | None = None
        self.origin = 0.0

    def start(
        self, stop: threading.Event | StopFlag, *, once: bool, origin: float | None = None
    ) -> None:
        """Poll in a new thread: each device once, or on its schedule until ``stop``, the
        schedules starting at ``origin`` (monotonic; default now)."""
        self.stop = stop
        self.origin = time.monotonic() if origin is None else origin
        self.handoff.polling(self.name)
        target = self._once if once else self._run
        self.thread = threading.Thread(target=target, name=f"modbus {self.name}", daemon=True)
        self.thread.start()

    def _once(self) -> None:
        for i, t in enumerate(self.targets, 1):  # the connection stays open for the next round
            last = i == len(self.targets)
            self.handoff.put(poll_device(self.client, t), self.name, math.inf if last else None)

    def _run(self) -> None:
        schedule = Schedule(self.targets, self.origin)
        try:
            while not self.stop.is_set():
                t, due = schedule.next()
                wait = due - time.monotonic()
                if wait > 0:
                    self.stop.wait(wait)
                    continue
                self.handoff.polling(self.name)
                polled = poll_device(self.client, t)
                self.handoff.put(polled, self.name, schedule.done(polled, time.monotonic()))
        finally:
            self.client.close()

    def close(self) -> None:
        """Close the bus's connection (after :meth:`start` with ``once``)."""
        self.client.close()


class Schedule:
    """When each device of one bus is due: a fixed grid of its interval from ``origin``
    (monotonic), slots missed while the bus was busy skipped and counted as late, and after a
    poll that backs off, the device's interval doubled per consecutive failure."""

    def __init__(self, targets: list[Target], origin: float) -> None:
        self.targets = targets
        self.due = {t.device: origin for t in targets}
        self.backoff = {
            t.device: Backoff(t.interval, max(t.interval, t.cfg.retry_max_secs)) for t in targets
        }

    def next(self) -> tuple[Target, float]:
        """The device due first, and when."""
        t = min(self.targets, key=lambda x: self.due[x.device])
        return t, self.due[t.device]

    def done(self, polled: Polled, now: float) -> float:
        """Schedule the next poll of ``polled``'s device (noting ``late`` and ``retry_in`` in
        ``polled``); when the bus polls next."""
        t = polled.target
        if not polled.backs_off:
            self.backoff[t.device].reset()
            nxt = self.due[t.device] + t.interval
            if nxt <= now:  # the bus was busy: skip the missed slots, keep the grid
                polled.late = math.ceil((now - nxt) / t.interval)
                nxt += polled.late * t.interval
        else:
            polled.retry_in = self.backoff[t.device].next()
            nxt = now + polled.retry_in
        self.due[t.device] = nxt
        return min(self.due.values())


@dataclass
class DeviceResult:
    """How one poll of a device ended, after storage (``poll --once`` reports these)."""

    device: str
    ok: bool
    detail: str
    new_readings: int = 0


@dataclass
class _Stats:
    """What ``fieldgate status`` shows of a device: counters since this poller started, and
    the last success and error (kept across restarts)."""

    since: int
    where: str
    polls: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    by_kind: Counter[str] = field(default_factory=Counter)
    requests: int = 0
    readings: int = 0
    rejected_values: int = 0
    late: int = 0
    last_poll: int | None = None
    last_success: int | None = None
    last_error: str | None = None
    last_error_at: int | None = None
    next_attempt: int | None = None
    last_reason: str | None = None  # of the last rejection, for the log only

    def fact(self) -> str:
        return json.dumps(
            {
                "where": self.where,
                "since": self.since,
                "polls": self.polls,
                "failures": self.failures,
                "consecutive_failures": self.consecutive_failures,
                "failures_by_kind": dict(sorted(self.by_kind.items())),
                "requests": self.requests,
                "readings": self.readings,
                "rejected_values": self.rejected_values,
                "late": self.late,
                "last_poll": self.last_poll,
                "last_success": self.last_success,
                "last_error": self.last_error,
                "last_error_at": self.last_error_at,
                "next_attempt": self.next_attempt,
            },
            sort_keys=True,
        )


class ModbusPoller:
    """The Modbus devices, their buses and the store; :meth:`run` and :meth:`once` drive it.

    The store connection belongs to the thread that calls :meth:`run` or :meth:`once`.
    """

    def __init__(self, cfg: Config, *, coalesce: bool = True) -> None:
        if not cfg.poll.modbus:
            raise ConfigError(f"{cfg.path}: poll.modbus is empty: there is nothing to poll")
        self.cfg = cfg
        self.targets = build_targets(cfg, coalesce=coalesce)
        self.buses = group_buses(self.targets, cfg.path)
        quiet_pymodbus()
        # Create or migrate the store now, so that a bad store fails the command at start.
        conn = self._connect()
        try:
            known = store.get_state(conn)
        finally:
            conn.close()
        now = store.now_ms()
        self.stats = {t.device: _Stats(since=now, where=t.where) for t in self.targets}
        for t in self.targets:
            self._restore(self.stats[t.device], known.get(device_key(t.device)))
        self.handoff = Handoff(len(self.buses))
        from fieldgate.modbus.tcploop import TcpLoop  # it builds on this module

        #: One thread per serial line, one for every TCP bus; kept across :meth:`once` calls
        #: (their connections too).
        tcp = {name: ts for name, ts in self.buses.items() if ts[0].cfg.host is not None}
        self.bus_workers: list[Bus | TcpLoop] = [
            Bus(name, ts, self.handoff) for name, ts in self.buses.items() if name not in tcp
        ]
        if tcp:
            self.bus_workers.append(TcpLoop(tcp, self.handoff))
        #: when the running poller's schedules start (monotonic), every bus's grid from it
        self.origin = 0.0

    def _connect(self) -> sqlite3.Connection:
        return store.open_store(
            self.cfg.store.path,
            self.cfg.site.serial,
            busy_timeout_ms=self.cfg.store.busy_timeout_ms,
        )

    @staticmethod
    def _restore(stats: _Stats, fact: tuple[str, int] | None) -> None:
        if fact is None:
            return
        try:
            old = json.loads(fact[0])
        except ValueError:
            return
        if isinstance(old, dict):
            stats.last_success = old.get("last_success")
            stats.last_error = old.get("last_error")
            stats.last_error_at = old.get("last_error_at")

    def once(self) -> list[DeviceResult]:
        """Poll every device once (the buses concurrently) and store every poll."""
        stop = threading.Event()
        for bus in self.bus_workers:
            bus.start(stop, once=True)
        conn = self._connect()
        try:
            results: dict[str, DeviceResult] = {}
            while len(results) < len(self.targets):
                polls, growing, complete = self.handoff.take(0.5)
                if polls or growing:
                    for r in self.store_round(conn, polls, growing, complete, "last --once run"):
                        results[r.device] = r
        finally:
            conn.close()
        return [results[t.device] for t in self.targets]

    def run(self, stop: threading.Event | StopFlag) -> None:
        """Poll every device on its schedule until ``stop`` is set."""
        log.info(
            "polling %d Modbus device%s on %d bus%s",
            len(self.targets),
            "" if len(self.targets) == 1 else "s",
            len(self.buses),
            "" if len(self.buses) == 1 else "es",
        )
        conn = self._connect()
        try:
            with store.transaction(conn):
                store.set_state(conn, STATE_KEY, f"running: {self.summary()}")
            # one origin for every bus: devices of one interval are due together, their polls
            # finish together and share a commit
            self.origin = origin = time.monotonic()
            for bus in self.bus_workers:
                bus.start(stop, once=False, origin=origin)
            while not stop.is_set():
                polls, growing, complete = self.handoff.take(0.5)
                if polls or growing:
                    self.store_round(conn, polls, growing, complete, "running")
            deadline = time.monotonic() + STOP_GRACE_SECS
            for bus in self.bus_workers:
                assert bus.thread is not None
                bus.thread.join(max(0.0, deadline - time.monotonic()))
            # what was read during the stop is stored too
            polls, growing, _ = self.handoff.take(0)
            if polls or growing:
                self.store_round(conn, polls, growing, True, "stopping")
            with store.transaction(conn):
                store.set_state(conn, STATE_KEY, "stopped")
        finally:
            conn.close()

    def close(self) -> None:
        """Close the buses' connections (after :meth:`once`; :meth:`run` closes its own)."""
        for bus in self.bus_workers:
            bus.close()

    def store_round(
        self,
        conn: sqlite3.Connection,
        polls: list[Polled],
        growing: list[Polled],
        complete: bool,
        prefix: str,
    ) -> list[DeviceResult]:
        """Store ``polls`` (finished), the readings so far of ``growing`` (polls in progress)
        and the rest of their round in one transaction: readings as their answers arrive and
        each poll's rejection as it ends (while the other buses are still reading), then the
        devices' facts and the summary, and one commit when the round is ``complete`` (no bus
        polling or due) or :data:`ROUND_HOLD_SECS` after the first poll (a slow device's poll
        then gets a commit of its own)."""
        deadline = time.monotonic() + ROUND_HOLD_SECS
        stored: list[tuple[Polled, int, str]] = []
        #: device -> its fact, written as its poll is stored (not all after the last poll)
        facts: dict[str, str] = {}
        #: device -> readings new in this transaction, counted once at its end
        new: Counter[str] = Counter()
        with store.transaction(conn):
            while True:
                for polled in growing:
                    self._store_rows(conn, polled, new)
                for polled in polls:
                    stored.append((polled, *self._store_poll(conn, polled, new)))
                    device = polled.target.device
                    facts[device] = self.stats[device].fact()
                remaining = deadline - time.monotonic()
                if complete or remaining <= 0 or len(stored) >= MAX_BATCH:
                    break
                polls, growing, complete = self.handoff.take(remaining, MAX_BATCH - len(stored))
            if new:
                store.count_new_readings(conn, sum(new.values()), new)
            store.set_states(
                conn,
                [
                    *((device_key(d), fact) for d, fact in facts.items()),
                    (STATE_KEY, f"{prefix}: {self.summary()}"),
                ],
            )
        results = []
        for polled, level, detail in stored:
            t = polled.target
            if polled.new < len(polled.readings):  # the unique key kept the first: say so
                log.warning(
                    "modbus %s: %d of %d readings were already stored with the same time %d "
                    "(did the clock step back?)",
                    t.device,
                    len(polled.readings) - polled.new,
                    len(polled.readings),
                    polled.ts,
                )
            if log.isEnabledFor(level):  # a healthy device's polls are DEBUG: skipped cheaply
                retry = "" if polled.retry_in is None else f"; next try in {polled.retry_in:g} s"
                log.log(level, "modbus %s (%s): %s%s", t.device, t.where, detail, retry)
            results.append(DeviceResult(t.device, polled.ok, detail, polled.new))
        return results

    @staticmethod
    def _store_rows(conn: sqlite3.Connection, polled: Polled, new: Counter[str]) -> None:
        """Insert the readings of ``polled`` not stored yet, counting the new ones in ``new``
        (by device)."""
        end = len(polled.readings)  # the bus thread may be appending more: not those yet
        if end > polled.stored:
            t = polled.target
            rows = polled.readings[polled.stored : end]
            added = store.insert_device_readings(
                conn, t.device, polled.ts, t.source, rows, count=False
            )
            polled.stored = end
            polled.new += added
            new[polled.target.device] += added

    def _store_poll(
        self, conn: sqlite3.Connection, polled: Polled, new: Counter[str]
    ) -> tuple[int, str]:
        """Count a poll and write the rest of its readings and any rejection (inside the
        round's transaction; the new readings counted in ``new``): (log level, log detail)."""
        reason, level, detail = self._account(polled)
        t = polled.target
        self._store_rows(conn, polled, new)
        if reason is not None:
            store.insert_rejected(
                conn,
                source=t.source,
                topic=t.where,
                payload=json.dumps({"ts": polled.ts, "raw": polled.bad_raw}, sort_keys=True),
                reason=reason,
                received_at=polled.finished_at,
            )
        self.stats[t.device].readings += polled.new
        return level, detail

    def _account(self, polled: Polled) -> tuple[str | None, int, str]:
        """Count a poll in its device's facts: (rejection reason, log level, log detail)."""
        s = self.stats[polled.target.device]
        was_failing = s.consecutive_failures
        previous_error, previous_reason = s.last_error, s.last_reason
        s.polls += 1
        s.requests += polled.requests
        s.late += polled.late
        s.last_poll = polled.ts
        s.rejected_values += len(polled.bad)
        reason = None
        if polled.bad:
            shown = "; ".join(polled.bad[:MAX_REASONS])
            more = len(polled.bad) - MAX_REASONS
            tail = f"; and {more} more" if more > 0 else ""
            stored = f", the other {len(polled.readings)} stored" if polled.readings else ""
            total = len(polled.bad) + len(polled.readings)
            reason = f"{len(polled.bad)} of {total} values not finite{stored}: {shown}{tail}"
        s.last_reason = reason
        if polled.ok:
            s.consecutive_failures = 0
            s.last_success = polled.finished_at
            s.next_attempt = None
            detail = f"{len(polled.readings)} readings in {polled.requests} requests"
            level = logging.INFO if s.polls == 1 else logging.DEBUG
            if reason is not None:
                detail += f", partly rejected: {reason}"
                if reason != previous_reason:
                    level = logging.WARNING
            if was_failing:
                detail += f" (answering again after {was_failing} failed polls)"
                level = max(level, logging.INFO)
            return reason, level, detail
        s.failures += 1
        s.consecutive_failures += 1
        s.by_kind[polled.kind or "rejected"] += 1
        s.last_error = polled.error or f"rejected: {reason}"
        s.last_error_at = polled.finished_at
        s.next_attempt = (
            None if polled.retry_in is None else polled.finished_at + int(polled.retry_in * 1000)
        )
        detail = s.last_error
        if polled.readings:
            detail += f"; {len(polled.readings)} readings stored"
        n = s.consecutive_failures
        # every change, then 1, 2, 4, 8 … failures in a row: a device that stays broken does
        # not fill the log (status always has the latest)
        changed = n == 1 or s.last_error != previous_error
        level = logging.WARNING if changed or n & (n - 1) == 0 else logging.DEBUG
        if n > 1:
            detail += f" ({n} failed polls in a row)"
        return reason, level, detail

    def summary(self) -> str:
        """``2 ok, 1 failing (MTR-3: …)``: the line ``fieldgate status`` shows for Modbus."""
        failing = [(d, s) for d, s in self.stats.items() if s.consecutive_failures and s.polls]
        polled = sum(1 for s in self.stats.values() if s.polls)
        summary = f"{polled - len(failing)} ok, {len(failing)} failing"
        if polled < len(self.stats):
            summary += f", {len(self.stats) - polled} not polled yet"
        if failing:
            summary += " (" + "; ".join(f"{d}: {s.last_error}" for d, s in failing) + ")"
        return summary
