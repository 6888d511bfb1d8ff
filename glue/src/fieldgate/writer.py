"""The collector's store writer: a child process that validates and commits message batches,
and :class:`WriterChannel`, the collector's end of the pipe to it.

Why a second process: paho's packet handling and the validation plus SQLite work each cost
about as much CPU per message, and the GIL would serialise them in threads. With the writer
in its own process, the collector reads and acknowledges batch k+1 from the broker while the
writer validates and commits batch k, on the other core.

Protocol over a :mod:`multiprocessing` pipe (batches are answered strictly in order):

- parent -> writer: ``("batch", seq, [(topic, payload, received_at, stamp), ...])``
  (``stamp``: the broker's arrival stamp ``fg-ts``, or None), ``("stop",)``
- writer -> parent: ``("ready",)`` or ``("error", text)`` once at start, then for every batch
  ``("done", seq, new_readings, rejected, [(topic, reason), ...])`` or
  ``("failed", seq, "full" | "error", text)`` (nothing of that batch is committed).

The writer ignores SIGTERM/SIGINT (the collector decides when to stop) and exits when the
pipe closes, so a killed collector never leaves it behind.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import sqlite3
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from fieldgate import store
from fieldgate.config import Config
from fieldgate.diskguard import is_disk_full
from fieldgate.errors import FieldgateError
from fieldgate.formats import SampleError
from fieldgate.inputs import (
    TOPIC_CACHE_MAX,
    Counters,
    Input,
    InputCounts,
    InputTable,
    device_rows,
    read_message,
)
from fieldgate.readings import (
    Outcome,
    Received,
    Rules,
    native_rows,
    reading_rows,
    store_rejections,
)

log = logging.getLogger("fieldgate.collector.writer")

SOURCE = "mqtt"
HEARTBEAT_SECS = 5.0
#: Reasons sent back per batch for the collector's log (the store keeps them all).
REASONS_BACK = 3
#: Batches handed to the writer and not yet answered, at most.
MAX_SENT = 4

Item = tuple[str, bytes, int, int | None]
"""(topic, payload, received_at epoch ms, the broker's arrival stamp or None) of a message."""

#: Logged once per writer when readings need a stamp the broker did not give.
UNSTAMPED_WARNING = (
    "messages arrive without the broker's arrival stamp (fg-ts): readings without a time "
    "of their own get the collector's receive time instead, so a backlog drained late "
    "carries the drain time and a message redelivered after a crash may be stored twice; "
    "load the stamp plugin in the broker (the lines 'fieldgate broker-conf' prints, "
    "docs/arrival-stamp.md)"
)
#: Topics whose last stand-in stamp is remembered (strictly increasing per topic).
FALLBACK_TOPICS_MAX = 100_000

Target = tuple[str, str, Input, str | None]
"""(input key, device serial, input, the topic's ``{metric}``) of a topic whose messages
may take a cheap path (:meth:`MessageReader.fast_target`)."""


class MessageReader:
    """Reads the messages of batches: input, decoding, validation, time, counters."""

    def __init__(self, cfg: Config, state: dict[str, tuple[str, int]]) -> None:
        self.rules = Rules.from_config(cfg)
        self.table = InputTable(cfg)
        self.counters = Counters.from_state(state)
        self._fallback: dict[str, int] = {}
        self._warned = False
        #: Topics -> :meth:`fast_target` (devices publish on the same few topics).
        self._targets: dict[str, Target | None] = {}

    def stand_in(self, topic: str, received_at: int) -> int:
        """The collector's receive time as a stamp: like the broker's, strictly increasing
        per topic, so two messages of one topic in one millisecond stay two readings."""
        last = self._fallback.get(topic)
        stamp = received_at if last is None or received_at > last else last + 1
        if len(self._fallback) >= FALLBACK_TOPICS_MAX:
            self._fallback.clear()
        self._fallback[topic] = stamp
        return stamp

    def read(self, topic: str, payload: bytes, at: int, stamp: int | None) -> Received:
        """One message as readings and/or a rejection; never raises (a message that
        crashed the writer would be sent again after every restart)."""
        try:
            found = self.table.match(topic)
            if found is None:
                reason = f"topic {topic!r} matches no input (mqtt.inputs, the native topic)"
                return Received(topic, payload, at, Outcome(device=None, reason=reason))
            inp, device, metric = found
            if stamp is not None:
                used = stamp
            elif inp.decoder is None:
                used = at  # native payloads carry their own ts: no stand-in needed
            else:
                used = self.stand_in(topic, at)
            outcome = read_message(inp, device, metric, payload, self.rules, stamp=used, now_ms=at)
            if stamp is None and outcome.stamped and not self._warned:
                self._warned = True
                log.warning("%s", UNSTAMPED_WARNING)
            return Received(topic, payload, at, outcome, inp.key)
        except Exception as exc:
            log.exception("unexpected error while validating a message on %s", topic)
            reason = f"internal error while validating: {exc!r}"
            return Received(topic, payload, at, Outcome(device=None, reason=reason))

    def fast_target(self, topic: str) -> Target | None:
        """Where a topic's messages may take a cheap path: the native input's topic of a
        device that resolves and is not a CSV device (:func:`fieldgate.readings.native_rows`),
        or a device format's topic whose device resolves
        (:func:`fieldgate.inputs.device_rows`); None for every other topic."""
        try:
            return self._targets[topic]
        except KeyError:
            pass
        target = None
        found = self.table.match(topic)
        if found is not None and found[1] is not None:
            inp, name, metric = found
            try:
                serial, dev_cfg = self.rules.resolve(name)
            except SampleError:
                serial, dev_cfg = None, None
            native_csv = inp.decoder is None and dev_cfg is not None and dev_cfg.format == "csv"
            if serial is not None and not native_csv:
                target = (inp.key, serial, inp, metric)
        if len(self._targets) >= TOPIC_CACHE_MAX:
            self._targets.clear()
        self._targets[topic] = target
        return target

    def count(
        self,
        received: list[Received],
        stamps: list[int | None],
        plain: dict[str, int],
        new: dict[str, int],
        skipped: dict[str, int] | None = None,
    ) -> dict[str, InputCounts]:
        """Add a batch to the per-input counters: the messages read the long way
        (``received``, with their stamps), the number of plain ones (cheap paths: no reason,
        the broker's stamp where one was needed) and of their values that were not
        readings (``skipped``) per input, the new readings per input. Returns the previous
        values of those touched (to undo should the commit fail)."""
        before: dict[str, InputCounts] = {}
        counters = self.counters

        def touch(key: str) -> InputCounts:
            c = counters.get(key)
            if key not in before:
                before[key] = InputCounts(**c.__dict__)
            return c

        for key, n in plain.items():
            touch(key).messages += n
        for key, n in (skipped or {}).items():
            touch(key).skipped += n
        for r, stamp in zip(received, stamps, strict=True):
            if not r.input:
                continue
            c = touch(r.input)
            c.messages += 1
            c.skipped += r.outcome.skipped
            if r.outcome.reason is not None:
                c.rejected += 1
            if stamp is None and r.outcome.stamped:
                c.unstamped += 1
        for key, n in new.items():
            if key:
                touch(key).readings += n
        return before


def commit_batch(
    conn: sqlite3.Connection, reader: MessageReader, items: list[Item]
) -> tuple[Any, ...]:
    """Validate and store one batch in one transaction; the reply for the collector.

    The usual message goes straight into its input's rows: a native one through
    :func:`fieldgate.readings.native_rows`, a device format's (with the broker's arrival
    stamp) through its decoder and :func:`fieldgate.inputs.device_rows`; every other one
    is read the long way (:meth:`MessageReader.read`: reasons, stand-in stamps), which
    stores exactly what the cheap paths would have. Each input's readings are inserted in
    arrival order with one multi-row statement per 128 of them.
    """
    rows: dict[str, list[object]] = {}
    plain: dict[str, int] = {}
    skipped: dict[str, int] = {}
    received: list[Received] = []
    stamps: list[int | None] = []
    rules = reader.rules
    target = reader.fast_target
    for topic, payload, at, stamp in items:
        fast = target(topic)
        if fast is not None:
            key, serial, inp, metric = fast
            into = rows.get(key)
            if into is None:
                into = rows[key] = []
            if inp.decoder is None:
                if native_rows(payload, serial, at, rules, source=SOURCE, into=into):
                    plain[key] = plain.get(key, 0) + 1
                    continue
            elif stamp is not None:
                n = device_rows(
                    inp,
                    serial,
                    metric,
                    payload,
                    rules,
                    stamp=stamp,
                    at=at,
                    source=SOURCE,
                    into=into,
                )
                if n is not None:
                    plain[key] = plain.get(key, 0) + 1
                    if n:
                        skipped[key] = skipped.get(key, 0) + n
                    continue
        r = reader.read(topic, payload, at, stamp)
        received.append(r)
        stamps.append(stamp)
        if r.outcome.readings:
            reading_rows((r,), SOURCE, rows.setdefault(r.input, []))
    new_by_input: dict[str, int] = {}
    before: dict[str, InputCounts] = {}
    try:
        conn.execute("BEGIN IMMEDIATE")
        new = 0
        for key, flat in rows.items():
            got = store.insert_reading_rows(conn, flat)
            new_by_input[key] = got
            new += got
        store_rejections(conn, received, SOURCE)
        before = reader.count(received, stamps, plain, new_by_input, skipped)
        for key, value in reader.counters.changed():
            store.set_state(conn, key, value)
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        store.rollback_quietly(conn)
        reader.counters.by_input.update(before)
        return ("full" if is_disk_full(exc) else "error", str(exc))
    bad = [(r.topic, r.outcome.reason) for r in received if r.outcome.reason is not None]
    return ("done", new, len(bad), bad[:REASONS_BACK])


def _heartbeat(conn: sqlite3.Connection) -> None:
    try:
        with store.transaction(conn):
            store.set_state(conn, "collector.heartbeat", store.iso_now())
    except sqlite3.Error:
        store.rollback_quietly(conn)


def writer_main(cfg: Config, pipe: Connection, parent_end: Connection | None = None) -> None:
    """The writer process: open the store, then commit batches until told to stop."""
    if parent_end is not None:
        parent_end.close()  # else the pipe never reports EOF when the collector dies
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        conn = store.open_store(
            cfg.store.path, cfg.site.serial, busy_timeout_ms=cfg.store.busy_timeout_ms
        )
    except FieldgateError as exc:
        pipe.send(("error", str(exc)))
        return
    reader = MessageReader(cfg, store.get_state(conn))
    pipe.send(("ready",))
    next_heartbeat = 0.0
    try:
        while True:
            try:
                msg = pipe.recv()
            except (EOFError, OSError):
                return  # the collector is gone
            if msg[0] == "stop":
                return
            _, seq, items = msg
            result = commit_batch(conn, reader, items)
            if result[0] == "done":
                pipe.send(("done", seq, *result[1:]))
                now = time.monotonic()
                if now >= next_heartbeat:
                    next_heartbeat = now + HEARTBEAT_SECS
                    _heartbeat(conn)
            else:
                pipe.send(("failed", seq, *result))
    finally:
        conn.close()


def start_writer(cfg: Config) -> tuple[multiprocessing.process.BaseProcess, Connection]:
    """Fork the writer and wait until its store is open; FieldgateError if it cannot be."""
    ctx = multiprocessing.get_context("fork")
    parent_end, child_end = ctx.Pipe(duplex=True)
    proc = ctx.Process(
        target=writer_main,
        args=(cfg, child_end, parent_end),
        name="fieldgate-writer",
        daemon=True,
    )
    proc.start()
    child_end.close()
    if not parent_end.poll(60):
        proc.kill()
        raise FieldgateError("the collector's store writer did not start within 60 s")
    try:
        first = parent_end.recv()
    except EOFError:
        proc.join(5)
        raise FieldgateError(
            f"the collector's store writer exited at start (status {proc.exitcode})"
        ) from None
    if first[0] == "error":
        proc.join(5)
        raise FieldgateError(first[1])
    return proc, parent_end


@dataclass(slots=True)
class Sent:
    """A batch handed to the writer, waiting for its commit before its acks go out."""

    seq: int
    generation: int
    acks: list[tuple[int, int]]  # (mid, qos) in arrival order
    count: int


class WriterChannel:
    """The collector's end of the writer: batches go out, answers come back in order."""

    def __init__(self, cfg: Config) -> None:
        self.proc, self.pipe = start_writer(cfg)
        #: Batches sent and not yet answered, oldest first.
        self.sent: deque[Sent] = deque()
        self._seq = 0

    def full(self) -> bool:
        """As many batches are out as the writer may hold (wait for answers first)."""
        return len(self.sent) >= MAX_SENT

    def send(self, items: list[Item], generation: int, acks: list[tuple[int, int]]) -> None:
        """Hand one batch of messages to the writer (one transaction, one fsync)."""
        self._seq += 1
        try:
            self.pipe.send(("batch", self._seq, items))
        except (OSError, ValueError) as exc:
            raise FieldgateError(f"the collector's store writer is gone: {exc}") from None
        self.sent.append(Sent(self._seq, generation, acks, len(items)))

    def answers(self, wait: float = 0.0) -> Iterator[tuple[Sent, tuple[Any, ...]]]:
        """Each answered batch with the writer's reply, in order (waiting up to ``wait`` for
        the first): ``("done", seq, new, rejected, reasons)`` or ``("failed", seq, kind,
        text)``."""
        try:
            if not self.pipe.poll(wait):
                return
            while self.sent and self.pipe.poll():
                reply = self.pipe.recv()
                sent = self.sent.popleft()
                if reply[1] != sent.seq:
                    raise FieldgateError(
                        f"the store writer answered batch {reply[1]}, expected {sent.seq}"
                    )
                yield sent, reply
        except (EOFError, OSError) as exc:
            raise FieldgateError(
                f"the collector's store writer died (exit status {self.proc.exitcode}): "
                f"{exc or 'pipe closed'}"
            ) from None

    def stop(self) -> None:
        """Ask the writer to finish; kill it if it does not within seconds."""
        try:
            self.pipe.send(("stop",))
        except (OSError, ValueError):
            log.debug("writer already gone")
        self.proc.join(5)
        if self.proc.is_alive():
            log.warning("the store writer did not stop; terminating it")
            self.proc.kill()
            self.proc.join(5)
        self.pipe.close()
