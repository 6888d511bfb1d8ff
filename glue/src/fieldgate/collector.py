"""``fieldgate collect``: the MQTT collector. A reading that reached the broker is never lost.

How:

- A persistent session: fixed client id, MQTT 3.1.1 with ``clean_session`` off, subscribed at
  QoS 1 to ``<topic_prefix>/+/readings``. While the collector is down (or paused) the broker
  keeps queuing for it (the broker needs ``max_queued_messages`` high or 0, see README).
- ``manual_ack``: a message is acknowledged only after the readings it carries (or its
  ``rejected`` row) are committed, in arrival order (MQTT 3.1.1 §4.6). A crash before the ack
  means the broker sends it again; the store's unique key makes that harmless.
- Group commit: messages are collected into one transaction (one fsync) until
  ``mqtt.commit_max_messages`` are held, ``mqtt.commit_max_ms`` have passed, or the stream
  pauses; then the whole batch is acknowledged at once. The broker sends at most its
  ``max_inflight_messages`` before it sees acks, so that setting bounds a batch (20 by default:
  set it to at least ``commit_max_messages`` on the broker). At most ``commit_max_messages``
  messages are read from the socket before a commit, so memory stays bounded whatever the
  broker sends. (MQTT 5 would let the client set this window itself, but paho's per-message
  property decoding costs a quarter of the collector's time.)
- One thread: the network I/O (paho's external-loop API), parsing and commits all run in the
  main loop, which also watches the stop flag (SIGTERM), the disk guard and the heartbeat.
"""

from __future__ import annotations

import logging
import select
import sqlite3
import ssl
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from fieldgate import store
from fieldgate.config import Config
from fieldgate.daemon import StopFlag
from fieldgate.diskguard import DiskGuard
from fieldgate.errors import ConfigError, FieldgateError
from fieldgate.retry import Backoff
from fieldgate.writer import start_writer

log = logging.getLogger("fieldgate.collector")

SOURCE = "mqtt"
HEARTBEAT_SECS = 5.0
#: A commit is made as soon as the socket has been quiet this long.
IDLE_FLUSH_SECS = 0.002
CONNACK_TIMEOUT_SECS = 15.0
#: Batches handed to the writer and not yet answered, at most.
MAX_SENT = 4
#: Time allowed to commit, acknowledge and disconnect on SIGTERM (CONTRACT: within 10 s).
STOP_GRACE_SECS = 5.0


@dataclass(slots=True)
class _Sent:
    """A batch handed to the writer, waiting for its commit before its acks go out."""

    seq: int
    generation: int
    acks: list[tuple[int, int]]  # (mid, qos) in arrival order
    count: int


def _describe_refusal(reason: ReasonCode | int) -> str:
    text = str(getattr(reason, "getName", lambda: reason)()).strip()
    return text[:1].lower() + text[1:] if text else f"reason code {reason}"


class Collector:
    """The collector's state and main loop; :meth:`run` collects until the stop flag is set."""

    def __init__(self, cfg: Config, stop: StopFlag) -> None:
        self.cfg = cfg
        self.stop = stop
        self.broker = f"{cfg.mqtt.host}:{cfg.mqtt.port}"
        self.topic = f"{cfg.mqtt.topic_prefix}/+/readings"
        self.password = self._read_credentials()
        if cfg.mqtt.tls_ca_file and not Path(cfg.mqtt.tls_ca_file).is_file():
            raise ConfigError(
                f"{cfg.path}: mqtt.tls_ca_file: {cfg.mqtt.tls_ca_file} does not exist"
            )
        if cfg.mqtt.qos != 1:
            log.warning(
                "mqtt.qos is %d; the collector subscribes at QoS 1 (with QoS 2 paho confirms "
                "receipt before the reading is committed, which a crash could turn into a loss)",
                cfg.mqtt.qos,
            )
        # Fork the writer before this process opens the store or any socket.
        self.writer, self.pipe = start_writer(cfg)
        self.conn = store.open_store(
            cfg.store.path, cfg.site.serial, busy_timeout_ms=cfg.store.busy_timeout_ms
        )
        self.guard = DiskGuard.for_store(cfg)
        #: Messages read but not yet handed to the writer: (mid, qos, topic, payload, at).
        self.batch: list[tuple[int, int, str, bytes, int]] = []
        self.batch_generation = 0
        self.sent: deque[_Sent] = deque()
        self.seq = 0
        self.batch_started = 0.0
        self.generation = 0
        #: "down", "connecting" (CONNECT sent, waiting for CONNACK) or "up".
        self.link = "down"
        self.connecting_since = 0.0
        self.refusal: str | None = None
        self.disconnect_reason: str | None = None
        self.pause_reason: str | None = None
        self.retry_at = 0.0
        self.backoff = Backoff(1.0, cfg.mqtt.reconnect_max_secs)
        self.state = ""
        self.unrecorded_events: list[str] = []
        self.next_heartbeat = 0.0
        self.next_misc = 0.0
        self.stats = {"messages": 0, "readings": 0, "rejected": 0, "commits": 0}
        self.client = self._make_client()

    # ---- setup -----------------------------------------------------------------------------

    def _read_credentials(self) -> str | None:
        m = self.cfg.mqtt
        if m.password_file and not m.username:
            raise ConfigError(
                f"{self.cfg.path}: mqtt.password_file is set but mqtt.username is not"
            )
        return self.cfg.secret("mqtt.password_file") if m.password_file else None

    def _make_client(self) -> mqtt.Client:
        m = self.cfg.mqtt
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=m.client_id,
            clean_session=False,
            protocol=mqtt.MQTTv311,
            manual_ack=True,
        )
        if m.username:
            client.username_pw_set(m.username, self.password)
        if m.tls_ca_file:
            client.tls_set(ca_certs=m.tls_ca_file, cert_reqs=ssl.CERT_REQUIRED)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.connect_timeout = 10.0
        # Our own select loop writes (loop_write): without this hook paho would make one
        # send call per queued PUBACK the moment it is queued, instead of per batch.
        client.on_socket_register_write = _no_op
        return client

    # ---- paho callbacks (run inside loop_read, in the main thread) ---------------------------

    def _on_connect(
        self,
        client: mqtt.Client,
        _userdata: object,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        _props: Properties | None,
    ) -> None:
        if reason.is_failure:
            words = _describe_refusal(reason)
            if reason.value in (134, 135):  # mosquitto answers a wrong password with 135
                words = "bad user name or password" + (
                    " (not authorized)" if reason.value == 135 else ""
                )
            self.refusal = f"broker {self.broker} refused the login: {words}"
            return
        self.link = "up"
        self.refusal = None
        self.backoff.reset()
        client.subscribe(self.topic, qos=1)
        log.info(
            "connected to broker %s as %s (%s session)",
            self.broker,
            self.cfg.mqtt.client_id,
            "resumed" if flags.session_present else "new",
        )
        self._set_state("running")

    def _on_subscribe(
        self,
        _client: mqtt.Client,
        _userdata: object,
        _mid: int,
        reasons: list[ReasonCode],
        _props: Properties | None,
    ) -> None:
        bad = [r for r in reasons if r.is_failure]
        if bad:
            log.error(
                "broker %s refused the subscription to %s: %s",
                self.broker,
                self.topic,
                _describe_refusal(bad[0]),
            )

    def _on_disconnect(
        self,
        _client: mqtt.Client,
        _userdata: object,
        _flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        _props: Properties | None,
    ) -> None:
        # The loop sees the closed socket and decides what to do; keep the broker's words.
        if reason.is_failure and self.link == "up":
            self.disconnect_reason = _describe_refusal(reason)

    def _on_message(self, _client: mqtt.Client, _userdata: object, msg: mqtt.MQTTMessage) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            topic = repr(msg._topic)  # paho keeps the raw bytes only there
        if not self.batch:
            self.batch_started = time.monotonic()
            self.batch_generation = self.generation
        self.batch.append((msg.mid, msg.qos, topic, msg.payload, store.now_ms()))

    # ---- state for status ------------------------------------------------------------------

    def _set_state(self, state: str, *, event: str | None = None) -> None:
        """Publish ``collector.state`` (and optionally an event); never fatal.

        An event that cannot be written (a full disk) is kept and written with the next state
        that can, stamped with the time it happened.
        """
        if event:
            self.unrecorded_events.append(event)
        if state == self.state and not self.unrecorded_events:
            return
        try:
            with store.transaction(self.conn):
                store.set_state(self.conn, "collector.state", state)
                store.set_state(self.conn, "collector.heartbeat", store.iso_now())
                for text in self.unrecorded_events:
                    store.add_event(self.conn, "collector", text)
            self.unrecorded_events.clear()
            self.state = state
        except sqlite3.Error as exc:
            log.warning("cannot record collector state %r in the store: %s", state, exc)
            store.rollback_quietly(self.conn)
            self.unrecorded_events = [
                e if e.endswith(")") and " (at " in e else f"{e} (at {store.iso_now()})"
                for e in self.unrecorded_events
            ]

    def _heartbeat(self) -> None:
        now = time.monotonic()
        if now < self.next_heartbeat:
            return
        self.next_heartbeat = now + HEARTBEAT_SECS
        try:
            with store.transaction(self.conn):
                store.set_state(self.conn, "collector.heartbeat", store.iso_now())
        except sqlite3.Error as exc:
            store.rollback_quietly(self.conn)
            log.debug("heartbeat not recorded: %s", exc)

    # ---- connection ------------------------------------------------------------------------

    def _lost(self) -> None:
        """The connection is gone: messages held from it are committed but never acked
        (their message ids mean nothing on the next connection)."""
        if self.link != "down":
            self.generation += 1
        self.link = "down"

    def _try_connect(self) -> None:
        """One connection attempt (TCP + CONNECT); the CONNACK arrives through the loop."""
        if not self.state.startswith("connecting"):
            self._set_state("connecting")  # keep the cause of the last failure until success
        try:
            self.client.connect(
                self.cfg.mqtt.host, self.cfg.mqtt.port, keepalive=self.cfg.mqtt.keepalive_secs
            )
        except ssl.SSLError as exc:
            self._retry_later(f"TLS to broker {self.broker} failed: {exc.reason or exc}")
            return
        except OSError as exc:
            cause = exc.strerror or str(exc) or type(exc).__name__
            self._retry_later(f"cannot reach broker {self.broker}: {cause}")
            return
        except ValueError as exc:
            self._retry_later(f"cannot connect to broker {self.broker}: {exc}")
            return
        self.link = "connecting"
        self.connecting_since = time.monotonic()
        self.refusal = None
        self.disconnect_reason = None

    def _retry_later(self, cause: str) -> None:
        delay = self.backoff.next()
        log.error("%s; retrying in %g s", cause, delay)
        self._set_state(f"connecting: {cause}")
        self.retry_at = time.monotonic() + delay
        self._drop_connection()

    def _drop_connection(self) -> None:
        """Say goodbye if the socket still works; paho closes it (or the next connect does)."""
        if self.client.socket() is not None:
            try:
                self.client.disconnect()
                self.client.loop_write()
            except Exception:  # a dying socket; nothing to keep
                log.debug("disconnect of a dead connection", exc_info=True)
        self._lost()

    # ---- the loop --------------------------------------------------------------------------

    def _pump(self, timeout: float) -> int:
        """Wait up to ``timeout`` for network traffic; returns how many messages arrived."""
        sock = self.client.socket()
        if sock is None:
            self._connection_failed(mqtt.MQTT_ERR_NO_CONN)
            return 0
        wlist = [sock] if self.client.want_write() else []
        try:
            readable, writable, _ = select.select([sock, self.pipe], wlist, [], timeout)
        except (OSError, ValueError):
            self._connection_failed(mqtt.MQTT_ERR_CONN_LOST)
            return 0
        if self.pipe in readable:
            self._replies()
            if self.link == "down":
                return 0
        before = len(self.batch)
        rc = mqtt.MQTT_ERR_SUCCESS
        if sock in readable:
            limit = self.cfg.mqtt.commit_max_messages
            while len(self.batch) - before < limit:
                count = len(self.batch)
                rc = self.client.loop_read()
                if rc != mqtt.MQTT_ERR_SUCCESS or len(self.batch) == count:
                    break
        if rc == mqtt.MQTT_ERR_SUCCESS and (writable or self.client.want_write()):
            rc = self.client.loop_write()
        now = time.monotonic()
        if rc == mqtt.MQTT_ERR_SUCCESS and now >= self.next_misc:
            self.next_misc = now + 1.0
            rc = self.client.loop_misc()
        if rc != mqtt.MQTT_ERR_SUCCESS or self.client.socket() is None:
            self._connection_failed(rc or mqtt.MQTT_ERR_CONN_LOST)
        return len(self.batch) - before

    def _connection_failed(self, rc: mqtt.MQTTErrorCode) -> None:
        was_connected = self.link == "up"
        detail = self.disconnect_reason or mqtt.error_string(rc).rstrip(".").lower()
        if self.refusal:
            cause = self.refusal
        elif was_connected:
            cause = f"lost the connection to broker {self.broker}: {detail}"
        else:
            cause = f"broker {self.broker} closed the connection during login: {detail}"
        if self.batch:
            self.flush()  # commit what arrived; it is not acked and will come again
        self._lost()
        if was_connected:
            log.warning("%s; reconnecting", cause)
            self.backoff.reset()
            self._set_state(f"connecting: {cause}")
            self.retry_at = time.monotonic() + self.backoff.next()
            self._drop_connection()
        else:
            self._retry_later(cause)

    def flush(self) -> None:
        """Hand the held messages to the writer as one batch (one transaction, one fsync).

        Their acks go out, in arrival order, when the writer reports the commit
        (:meth:`_replies`). At most ``MAX_SENT`` batches are out at once.
        """
        if not self.batch:
            return
        while len(self.sent) >= MAX_SENT:
            self._replies(wait=1.0)
        batch, self.batch = self.batch, []
        self.seq += 1
        generation = self.batch_generation
        if generation != self.generation:
            acks: list[tuple[int, int]] = []  # from a dead connection: never acked
        else:
            acks = [(mid, qos) for mid, qos, _, _, _ in batch]
        try:
            self.pipe.send(("batch", self.seq, [(t, p, at) for _, _, t, p, at in batch]))
        except (OSError, ValueError) as exc:
            raise FieldgateError(f"the collector's store writer is gone: {exc}") from None
        self.sent.append(_Sent(self.seq, generation, acks, len(batch)))

    def _replies(self, wait: float = 0.0) -> None:
        """Take the writer's answers; ack committed batches, pause on a failed one."""
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
                if reply[0] == "done":
                    self._committed(sent, *reply[2:])
                else:
                    self._store_failed(reply[2], reply[3], sent.count)
        except (EOFError, OSError) as exc:
            raise FieldgateError(
                f"the collector's store writer died (exit status {self.writer.exitcode}): "
                f"{exc or 'pipe closed'}"
            ) from None

    def _committed(
        self, sent: _Sent, new: int, rejected: int, reasons: list[tuple[str, str]]
    ) -> None:
        self.stats["messages"] += sent.count
        self.stats["readings"] += new
        self.stats["rejected"] += rejected
        self.stats["commits"] += 1
        for topic, reason in reasons:
            log.warning("rejected message on %s: %s", topic, reason)
        if rejected > len(reasons):
            log.warning("... and %d more rejected messages in this commit", rejected - len(reasons))
        if self.link == "up" and sent.generation == self.generation and sent.acks:
            for mid, qos in sent.acks:
                self.client.ack(mid, qos)
            if self.client.want_write():
                rc = self.client.loop_write()
                if rc != mqtt.MQTT_ERR_SUCCESS:
                    self._connection_failed(rc)

    def _settle(self, timeout: float) -> None:
        """Hand over the held messages and wait until every batch is answered (or timeout)."""
        self.flush()
        deadline = time.monotonic() + timeout
        while self.sent and time.monotonic() < deadline:
            self._replies(wait=min(0.5, max(0.0, deadline - time.monotonic())))

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
        if self.link != "down":
            self._drop_connection()
        self.pause_reason = reason
        self._set_state(reason, event=event)

    def _check_disk(self) -> None:
        change = self.guard.check()
        if change is True:
            reason = self.guard.describe()
            log.warning("%s: intake paused; messages stay queued on the broker", reason)
            self._settle(STOP_GRACE_SECS)  # commit and ack what is held before leaving
            if self.pause_reason is None:
                self._pause(reason, event=f"intake {reason}")
        elif (
            self.pause_reason is not None
            and not self.guard.paused
            and time.monotonic() >= self.retry_at
        ):
            disk = self.pause_reason.startswith(("paused: disk", "paused: disk full"))
            text = self.guard.resumed_text() if disk else "retrying the store: intake resumed"
            log.warning("%s", text)
            self.pause_reason = None
            self.retry_at = 0.0
            self._set_state("connecting", event=text)

    def run(self) -> int:
        """Collect until the stop flag is set; returns the exit status."""
        log.info(
            "collecting %s from broker %s into %s",
            self.topic,
            self.broker,
            self.cfg.store.path,
        )
        self.guard.check(force=True)
        if self.guard.paused:
            reason = self.guard.describe()
            log.warning("%s: intake paused; messages stay queued on the broker", reason)
            self._pause(reason, event=f"intake {reason}")
        try:
            while not self.stop.is_set():
                self._check_disk()
                if self.pause_reason is not None:
                    self._idle(min(0.5, self.guard.interval_secs))
                    continue
                if self.link == "down":
                    if time.monotonic() < self.retry_at:
                        self._idle(min(0.5, self.retry_at - time.monotonic()))
                        continue
                    self._try_connect()
                    continue
                if (
                    self.link == "connecting"
                    and time.monotonic() - self.connecting_since > CONNACK_TIMEOUT_SECS
                ):
                    self._retry_later(f"broker {self.broker} did not answer the login")
                    continue
                self._cycle()
                self._heartbeat()
        finally:
            self._shutdown()
        return 0

    def _idle(self, secs: float) -> None:
        """Wait (for a stop, or answers from the writer about batches still out)."""
        if self.sent:
            self._replies(wait=max(0.0, secs))
        else:
            self.stop.wait(max(0.0, secs))

    def _cycle(self) -> None:
        """One turn: read what arrives, commit when the batch is full, old or the line idle."""
        if self.batch:
            age = time.monotonic() - self.batch_started
            left = self.cfg.mqtt.commit_max_ms / 1000 - age
            timeout = max(0.0, min(IDLE_FLUSH_SECS, left))
        else:
            timeout = 0.25
        got = self._pump(timeout)
        if not self.batch:
            return
        age = time.monotonic() - self.batch_started
        if (
            got == 0
            or len(self.batch) >= self.cfg.mqtt.commit_max_messages
            or age * 1000 >= self.cfg.mqtt.commit_max_ms
            or self.link != "up"
        ):
            self.flush()

    def _shutdown(self) -> None:
        """Commit, acknowledge, disconnect (the session stays on the broker), record it."""
        deadline = time.monotonic() + STOP_GRACE_SECS
        try:
            self._settle(STOP_GRACE_SECS)
            if self.link == "up":
                self.client.disconnect()
                while self.client.want_write() and time.monotonic() < deadline:
                    if self.client.loop_write() != mqtt.MQTT_ERR_SUCCESS:
                        break
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
            self._stop_writer()
            self._set_state("stopped", event=None)
            self.conn.close()

    def _stop_writer(self) -> None:
        try:
            self.pipe.send(("stop",))
        except (OSError, ValueError):
            log.debug("writer already gone")
        self.writer.join(5)
        if self.writer.is_alive():
            log.warning("the store writer did not stop; terminating it")
            self.writer.kill()
            self.writer.join(5)
        self.pipe.close()


def _no_op(*_args: object) -> None:
    """A paho socket hook that needs no action (see ``_make_client``)."""
