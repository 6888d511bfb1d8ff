"""``fieldgate collect``: the MQTT collector. A reading that reached the broker is never lost.

How:

- A persistent session (:mod:`fieldgate.mqttlink`): while the collector is down (or paused)
  the broker keeps queuing for it (the broker needs ``max_queued_messages`` high or 0, see
  docs/collecting.md).
- ``manual_ack``: a message is acknowledged only after the readings it carries (or its
  ``rejected`` row) are committed, in arrival order (MQTT 5 §4.6). A crash before the ack
  means the broker sends it again; the store's unique key makes that harmless, also for
  readings without a time of their own: they take the broker's arrival stamp (``fg-ts``),
  which a redelivery carries unchanged (docs/arrival-stamp.md).
- Every input (the native topic and ``mqtt.inputs``, :mod:`fieldgate.inputs`) is one
  subscription of the same session; the store writer matches each message to its input.
- Group commit: messages are collected into one transaction (one fsync) until
  ``mqtt.commit_max_messages`` are held, ``mqtt.commit_max_ms`` have passed, or the stream
  pauses while the writer is idle; then the whole batch is handed to the store writer
  (:mod:`fieldgate.writer`, a child process) and acknowledged once it reports the commit.
  The broker sends at most the client's Receive Maximum before it sees acks, so that
  bounds a batch. At most ``commit_max_messages`` messages are read from the socket before
  a commit, so memory stays bounded whatever the broker sends. The collector's CONNECT sets
  that window (Receive Maximum) to twice ``commit_max_messages``.
- One thread: the network I/O (paho's external-loop API) and the writer's answers run in
  the main loop, which also watches the stop flag (SIGTERM), the disk guard and the
  heartbeat.
"""

from __future__ import annotations

import logging
import sqlite3
import time

import paho.mqtt.client as mqtt

from fieldgate import store
from fieldgate.config import Config
from fieldgate.daemon import StopFlag
from fieldgate.diskguard import DiskGuard
from fieldgate.inputs import InputTable
from fieldgate.live import LiveState
from fieldgate.mqttlink import MqttLink, read_password
from fieldgate.retry import Backoff
from fieldgate.writer import Sent, WriterChannel

log = logging.getLogger("fieldgate.collector")

HEARTBEAT_SECS = 5.0
#: A commit is made as soon as the socket has been quiet this long.
IDLE_FLUSH_SECS = 0.002
CONNACK_TIMEOUT_SECS = 15.0
#: Time allowed to commit, acknowledge and disconnect on SIGTERM (docs/contract.md §3: the
#: whole stop within 10 s).
STOP_GRACE_SECS = 5.0
#: The store's state key listing the session's subscriptions, one per line.
SUBSCRIPTIONS_KEY = "collector.subscriptions"


class StateBoard:
    """``collector.state``, its heartbeat and its events in the store; never fatal.

    An event that cannot be written (a full disk) is kept and written with the next state
    that can, stamped with the time it happened.
    """

    def __init__(self, conn: sqlite3.Connection, live: LiveState | None = None) -> None:
        self.conn = conn
        self.live = live
        self.state = ""
        self.unrecorded: list[str] = []
        self._next_heartbeat = 0.0

    def set(self, state: str, *, event: str | None = None) -> None:
        """Publish ``state`` (and optionally an event)."""
        if self.live is not None:
            self.live.set(state)  # shown by status also when the store cannot take it
        if event:
            self.unrecorded.append(event)
        if state == self.state and not self.unrecorded:
            return
        try:
            with store.transaction(self.conn):
                store.set_state(self.conn, "collector.state", state)
                store.set_state(self.conn, "collector.heartbeat", store.iso_now())
                for text in self.unrecorded:
                    store.add_event(self.conn, "collector", text)
            self.unrecorded.clear()
            self.state = state
        except sqlite3.Error as exc:
            log.warning("cannot record collector state %r in the store: %s", state, exc)
            store.rollback_quietly(self.conn)
            self.unrecorded = [
                e if e.endswith(")") and " (at " in e else f"{e} (at {store.iso_now()})"
                for e in self.unrecorded
            ]

    def heartbeat(self) -> None:
        """Refresh ``collector.heartbeat`` every :data:`HEARTBEAT_SECS`."""
        now = time.monotonic()
        if now < self._next_heartbeat:
            return
        self._next_heartbeat = now + HEARTBEAT_SECS
        try:
            with store.transaction(self.conn):
                store.set_state(self.conn, "collector.heartbeat", store.iso_now())
        except sqlite3.Error as exc:
            store.rollback_quietly(self.conn)
            log.debug("heartbeat not recorded: %s", exc)


class Collector:
    """The collector's main loop; :meth:`run` collects until the stop flag is set."""

    def __init__(self, cfg: Config, stop: StopFlag, live: LiveState | None = None) -> None:
        self.cfg = cfg
        self.stop = stop
        password = read_password(cfg)
        # Fork the writer before this process opens the store or any socket.
        self.writer = WriterChannel(cfg)
        self.conn = store.open_store(
            cfg.store.path, cfg.site.serial, busy_timeout_ms=cfg.store.busy_timeout_ms
        )
        self.board = StateBoard(self.conn, live)
        self.guard = DiskGuard.for_store(cfg)
        self.backoff = Backoff(1.0, cfg.mqtt.reconnect_max_secs)
        self.link = MqttLink(
            cfg.mqtt,
            password,
            topics=InputTable(cfg).filters,
            stale=self._subscribed_before(),
            on_up=self._connected,
            on_subscribed=self._subscribed,
        )
        self.pause_reason: str | None = None
        self.retry_at = 0.0
        self.stats = {"messages": 0, "readings": 0, "rejected": 0, "commits": 0}

    # ---- the connection ----------------------------------------------------------------------

    def _subscribed_before(self) -> list[str]:
        """The subscriptions recorded by the last run (the session keeps them)."""
        value = store.get_state(self.conn).get(SUBSCRIPTIONS_KEY, ("", 0))[0]
        return [t for t in value.split("\n") if t]

    def _subscribed(self) -> None:
        """Record the session's subscriptions, so a filter dropped from the configuration is
        unsubscribed at the next start."""
        try:
            with store.transaction(self.conn):
                store.set_state(self.conn, SUBSCRIPTIONS_KEY, "\n".join(self.link.topics))
            self.link.stale = []
        except sqlite3.Error as exc:
            store.rollback_quietly(self.conn)
            log.warning("cannot record the subscriptions in the store: %s", exc)

    def _connected(self) -> None:
        self.backoff.reset()
        self.board.set("running")

    def _try_connect(self) -> None:
        """One connection attempt; the CONNACK arrives through the loop."""
        if not self.board.state.startswith("connecting"):
            self.board.set("connecting")  # keep the cause of the last failure until success
        cause = self.link.connect()
        if cause is not None:
            self._retry_later(cause)

    def _retry_later(self, cause: str) -> None:
        delay = self.backoff.next()
        log.error("%s; retrying in %g s", cause, delay)
        self.board.set(f"connecting: {cause}")
        self.retry_at = time.monotonic() + delay
        self.link.drop()

    def _connection_failed(self, rc: mqtt.MQTTErrorCode) -> None:
        was_connected = self.link.state == "up"
        cause = self.link.failure_cause(rc)
        if self.link.inbox:
            self.flush()  # commit what arrived; it is not acked and will come again
        self.link.lost()
        if was_connected:
            log.warning("%s; reconnecting", cause)
            self.backoff.reset()
            self.board.set(f"connecting: {cause}")
            self.retry_at = time.monotonic() + self.backoff.next()
            self.link.drop()
        else:
            self._retry_later(cause)

    # ---- the writer --------------------------------------------------------------------------

    def flush(self) -> None:
        """Hand the held messages to the writer as one batch (one transaction, one fsync).

        Their acks go out, in arrival order, when the writer reports the commit
        (:meth:`_replies`).
        """
        while self.link.inbox and self.writer.full():
            self._replies(wait=1.0)
        if not self.link.inbox:
            return
        messages, generation = self.link.take()
        acks = [(mid, qos) for mid, qos, _, _, _, _ in messages]
        if generation != self.link.generation:
            acks = []  # from a dead connection: never acked
        self.writer.send([(t, p, at, st) for _, _, t, p, at, st in messages], generation, acks)

    def _replies(self, wait: float = 0.0) -> None:
        """Take the writer's answers; ack committed batches, pause on a failed one."""
        for sent, reply in self.writer.answers(wait):
            if reply[0] == "done":
                self._committed(sent, *reply[2:])
            else:
                self._store_failed(reply[2], reply[3], sent.count)

    def _committed(
        self, sent: Sent, new: int, rejected: int, reasons: list[tuple[str, str]]
    ) -> None:
        s = self.stats
        s["messages"] += sent.count
        s["readings"] += new
        s["rejected"] += rejected
        s["commits"] += 1
        for topic, reason in reasons:
            log.warning("rejected message on %s: %s", topic, reason)
        if rejected > len(reasons):
            log.warning("... and %d more rejected messages in this commit", rejected - len(reasons))
        if self.link.state == "up" and sent.generation == self.link.generation and sent.acks:
            rc = self.link.ack(sent.acks)
            if rc != mqtt.MQTT_ERR_SUCCESS:
                self._connection_failed(rc)

    def _settle(self, timeout: float) -> None:
        """Hand over the held messages and wait until every batch is answered (or timeout)."""
        self.flush()
        deadline = time.monotonic() + timeout
        while self.writer.sent and time.monotonic() < deadline:
            self._replies(wait=min(0.5, max(0.0, deadline - time.monotonic())))

    # ---- pausing -----------------------------------------------------------------------------

    def _store_failed(self, kind: str, text: str, count: int) -> None:
        if self.pause_reason is not None:
            return  # already paused; this batch was not acked either
        if kind == "full":
            reason = "paused: disk full (the store could not commit)"
            self.guard.paused = True
            self.guard.measure()
        else:
            reason = f"paused: store error: {text}"
        log.error(
            "%s; %d messages not acknowledged (the broker keeps them); retrying later",
            reason,
            count,
        )
        self._pause(reason, event=f"intake {reason}")
        self.retry_at = time.monotonic() + self.backoff.next()

    def _pause(self, reason: str, *, event: str) -> None:
        if self.link.state != "down":
            self.link.drop()
        self.pause_reason = reason
        self.board.set(reason, event=event)

    def _pause_for_disk(self) -> None:
        reason = self.guard.describe()
        log.warning("%s: intake paused; messages stay queued on the broker", reason)
        self._settle(STOP_GRACE_SECS)  # commit and ack what is held before leaving
        if self.pause_reason is None:
            self._pause(reason, event=f"intake {reason}")

    def _check_disk(self) -> None:
        if self.guard.check() is True:
            self._pause_for_disk()
        elif (
            self.pause_reason is not None
            and not self.guard.paused
            and time.monotonic() >= self.retry_at
        ):
            disk = self.pause_reason.startswith("paused: disk")
            text = self.guard.resumed_text() if disk else "retrying the store: intake resumed"
            log.warning("%s", text)
            self.pause_reason = None
            self.retry_at = 0.0
            self.board.set("connecting", event=text)

    # ---- the loop ----------------------------------------------------------------------------

    def run(self) -> int:
        """Collect until the stop flag is set; returns the exit status."""
        log.info(
            "collecting %s from broker %s into %s",
            ", ".join(self.link.topics),
            self.link.broker,
            self.cfg.store.path,
        )
        self.guard.check(force=True)
        if self.guard.paused:
            self._pause_for_disk()
        try:
            while not self.stop.is_set():
                self._turn()
        finally:
            self._shutdown()
        return 0

    def _turn(self) -> None:
        """One turn of the loop: pause, wait to reconnect, connect, or move messages."""
        self._check_disk()
        if self.pause_reason is not None:
            self._idle(min(0.5, self.guard.interval_secs))
        elif self.link.state == "down":
            if time.monotonic() < self.retry_at:
                self._idle(min(0.5, self.retry_at - time.monotonic()))
            else:
                self._try_connect()
        elif (
            self.link.state == "connecting"
            and time.monotonic() - self.link.connecting_since > CONNACK_TIMEOUT_SECS
        ):
            self._retry_later(f"broker {self.link.broker} did not answer the login")
        else:
            self._cycle()
            self.board.heartbeat()

    def _idle(self, secs: float) -> None:
        """Wait (for a stop, or answers from the writer about batches still out)."""
        if self.writer.sent:
            self._replies(wait=max(0.0, secs))
        else:
            self.stop.wait(max(0.0, secs))

    def _cycle(self) -> None:
        """Read what arrives; commit when the batch is full, old or the line idle."""
        m = self.cfg.mqtt
        inbox = self.link.inbox
        if inbox:
            left = m.commit_max_ms / 1000 - (time.monotonic() - self.link.inbox_started)
            timeout = max(0.0, min(IDLE_FLUSH_SECS, left))
        else:
            timeout = 0.25
        got, rc = self.link.pump(timeout, self.writer.pipe, self._replies, m.commit_max_messages)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            self._connection_failed(rc)
        inbox = self.link.inbox
        if not inbox:
            return
        age_ms = (time.monotonic() - self.link.inbox_started) * 1000
        # A quiet socket commits at once while the writer is idle; while it is busy with
        # earlier batches the messages wait for its answer (which wakes the loop) and go as
        # one larger batch: fewer commits under load, no later than the writer could start.
        if (
            (got == 0 and not self.writer.sent)
            or len(inbox) >= m.commit_max_messages
            or age_ms >= m.commit_max_ms
            or self.link.state != "up"
        ):
            self.flush()

    def _shutdown(self) -> None:
        """Commit, acknowledge, disconnect (the session stays on the broker), record it."""
        deadline = time.monotonic() + STOP_GRACE_SECS
        try:
            self._settle(STOP_GRACE_SECS)
            self.link.disconnect(deadline)
        except Exception:  # stopping: log and finish the stop
            log.exception("error while stopping")
        finally:
            s = self.stats
            log.info(
                "stopped%s: %d messages, %d new readings, %d rejected, %d commits",
                f" on {self.stop.signal_name}" if self.stop.signal_name else "",
                s["messages"],
                s["readings"],
                s["rejected"],
                s["commits"],
            )
            self.writer.stop()
            self.board.set("stopped", event=None)
            self.conn.close()
