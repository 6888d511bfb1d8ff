"""The collector's MQTT connection: one persistent session to the local broker.

A fixed client id, MQTT v5 with ``clean_start`` off and a session that never expires (what
MQTT 3.1.1's clean session off means; it takes over a 3.1.1 session of the same id with its
backlog), subscribed at QoS 1 to the native topic and every input's filter, with
``manual_ack``: while the collector is down (or paused) the broker keeps queuing for it, and
a message is acknowledged only when the collector says so (after its commit). MQTT v5
because the broker's arrival stamp (``fg-ts``, docs/arrival-stamp.md) is a v5 user
property; the CONNECT also sets Receive Maximum, the number of messages the broker may send
before it sees acknowledgements, to twice ``mqtt.commit_max_messages``. The link uses paho's
external-loop API: the collector's loop calls :meth:`MqttLink.pump`, which waits on the
broker socket (and one other file, the store writer's pipe), reads messages into
:attr:`MqttLink.inbox` and writes what is queued.

Reading is lean (:mod:`fieldgate.mqttwire`): one ``recv`` takes what the socket holds, the
PUBLISH packets in it go straight into the inbox, and every other packet is handed to
paho's own packet handler, which keeps the session (login, subscriptions, keepalive,
disconnects). The acknowledgements of a commit go out as one queued write. Both use paho
internals (``_in_packet``, ``_packet_handle``, ``_packet_queue``, ``_loop_rc_handle``) of
the pinned paho-mqtt 2.x; a paho without them is read through its public ``loop_read`` and
acknowledged with ``ack``, as before (slower, the same behaviour).

Each connection has a *generation*: messages read on a connection that has since been lost
are never acknowledged (their message ids mean nothing on the next connection); the broker
sends them again and the store's unique key keeps them single.
"""

from __future__ import annotations

import logging
import select
import ssl
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from fieldgate import mqttwire, store
from fieldgate.config import Config, MqttConfig
from fieldgate.errors import ConfigError
from fieldgate.stamp import arrival_ms, session_properties

log = logging.getLogger("fieldgate.collector")

#: How often paho's housekeeping (keepalive pings) runs.
MISC_EVERY_SECS = 1.0

Message = tuple[int, int, str, bytes, int, int | None]
"""(mid, qos, topic, payload, received_at epoch ms, the broker's arrival stamp or None) of
one message read."""

#: The largest Receive Maximum MQTT v5 allows.
RECEIVE_MAXIMUM_LIMIT = 65535
#: Bytes asked of the socket per read (a few hundred small messages).
READ_CHUNK = 262144
#: The paho internals the lean read path uses (see the module's docstring).
PAHO_INTERNALS = (
    "_in_packet",
    "_packet_handle",
    "_packet_queue",
    "_loop_rc_handle",
    "_last_bytes_received",
)
_IDLE_IN_PACKET: dict[str, Any] = {
    "command": 0,
    "have_remaining": 0,
    "remaining_count": [],
    "remaining_mult": 1,
    "remaining_length": 0,
    "packet": bytearray(b""),
    "to_process": 0,
    "pos": 0,
}


def read_password(cfg: Config) -> str | None:
    """The collector's MQTT password (None without a login); ConfigError when the settings
    cannot work. Checked before anything starts."""
    m = cfg.mqtt
    if m.password_file and not m.username:
        raise ConfigError(f"{cfg.path}: mqtt.password_file is set but mqtt.username is not")
    if m.tls_ca_file and not Path(m.tls_ca_file).is_file():
        raise ConfigError(f"{cfg.path}: mqtt.tls_ca_file: {m.tls_ca_file} does not exist")
    if m.qos != 1:
        log.warning(
            "mqtt.qos is %d; the collector subscribes at QoS 1 (with QoS 2 paho confirms "
            "receipt before the reading is committed, which a crash could turn into a loss)",
            m.qos,
        )
    return cfg.secret("mqtt.password_file") if m.password_file else None


def describe_refusal(reason: ReasonCode | int) -> str:
    """A broker's reason code in words (``not authorized``)."""
    text = str(getattr(reason, "getName", lambda: reason)()).strip()
    return text[:1].lower() + text[1:] if text else f"reason code {reason}"


def _no_op(*_args: object) -> None:
    """A paho socket hook that needs no action (see ``MqttLink._make_client``)."""


class MqttLink:
    """The session's connection state; paho's callbacks run inside :meth:`pump`."""

    def __init__(
        self,
        m: MqttConfig,
        password: str | None,
        *,
        topics: list[str],
        on_up: Callable[[], None],
        stale: list[str] | None = None,
        on_subscribed: Callable[[], None] | None = None,
    ) -> None:
        self.m = m
        self.broker = f"{m.host}:{m.port}"
        #: The subscriptions: the native topic's filter and every input's.
        self.topics = topics
        #: Filters the session may still hold from an earlier configuration: unsubscribed.
        self.stale = [t for t in stale or [] if t not in topics]
        #: Called when the broker accepted the login (the subscription is on its way).
        self.on_up = on_up
        #: Called when the broker granted every subscription.
        self.on_subscribed = on_subscribed
        #: "down", "connecting" (CONNECT sent, waiting for CONNACK) or "up".
        self.state = "down"
        self.connecting_since = 0.0
        self.refusal: str | None = None
        self.disconnect_reason: str | None = None
        self.generation = 0
        #: Messages read and not yet taken (:meth:`take`), in arrival order.
        self.inbox: list[Message] = []
        self.inbox_generation = 0
        self.inbox_started = 0.0
        self._next_misc = 0.0
        self.client = self._make_client(password)
        #: Read and acknowledge through mqttwire (else through paho's public API).
        self.lean = all(hasattr(self.client, name) for name in PAHO_INTERNALS)
        #: Bytes read from the socket and not yet cut into packets, and that socket (bytes,
        #: not a bytearray: its slices are the topics and payloads kept, without a copy more).
        self._buf = b""
        self._buf_sock: object = None
        self._buf_at = 0
        #: The last read stopped at its limit: complete packets may wait in the buffer.
        self._more = False
        #: Topics as bytes -> text (a device publishes on the same few topics).
        self._topics: dict[bytes, str] = {}

    def _make_client(self, password: str | None) -> mqtt.Client:
        m = self.m
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=m.client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=True,
        )
        if m.username:
            client.username_pw_set(m.username, password)
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
            words = describe_refusal(reason)
            if reason.value in (134, 135):  # mosquitto answers a wrong password with 135
                words = "bad user name or password" + (
                    " (not authorized)" if reason.value == 135 else ""
                )
            self.refusal = f"broker {self.broker} refused the login: {words}"
            return
        self.state = "up"
        self.refusal = None
        if self.stale:
            client.unsubscribe(self.stale)
            log.info("unsubscribed from %s (no longer configured)", ", ".join(self.stale))
        # Retain Handling 1: a retained message comes with a new subscription only, not each
        # time a restarted collector subscribes its persistent session again.
        options = SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)
        client.subscribe([(t, options) for t in self.topics])
        log.info(
            "connected to broker %s as %s (%s session)",
            self.broker,
            self.m.client_id,
            "resumed" if flags.session_present else "new",
        )
        self.on_up()

    def _on_subscribe(
        self,
        _client: mqtt.Client,
        _userdata: object,
        _mid: int,
        reasons: list[ReasonCode],
        _props: Properties | None,
    ) -> None:
        refused = [(t, r) for t, r in zip(self.topics, reasons, strict=False) if r.is_failure]
        for topic, reason in refused:
            log.error(
                "broker %s refused the subscription to %s: %s",
                self.broker,
                topic,
                describe_refusal(reason),
            )
        if not refused and len(reasons) == len(self.topics) and self.on_subscribed:
            self.on_subscribed()

    def _on_disconnect(
        self,
        _client: mqtt.Client,
        _userdata: object,
        _flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        _props: Properties | None,
    ) -> None:
        # The loop sees the closed socket and decides what to do; keep the broker's words.
        if reason.is_failure and self.state == "up":
            self.disconnect_reason = describe_refusal(reason)

    def _on_message(self, _client: mqtt.Client, _userdata: object, msg: mqtt.MQTTMessage) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            topic = repr(msg._topic)  # paho keeps the raw bytes only there
        if not self.inbox:
            self.inbox_started = time.monotonic()
            self.inbox_generation = self.generation
        self.inbox.append(
            (msg.mid, msg.qos, topic, msg.payload, store.now_ms(), arrival_ms(msg.properties))
        )

    # ---- connecting and losing -------------------------------------------------------------

    def connect(self) -> str | None:
        """One connection attempt (TCP + CONNECT); the cause when it failed at once, else
        None (the CONNACK arrives through :meth:`pump`)."""
        try:
            self.client.connect(
                self.m.host,
                self.m.port,
                keepalive=self.m.keepalive_secs,
                clean_start=False,
                properties=self._connect_properties(),
            )
        except ssl.SSLError as exc:
            return f"TLS to broker {self.broker} failed: {exc.reason or exc}"
        except OSError as exc:
            cause = exc.strerror or str(exc) or type(exc).__name__
            return f"cannot reach broker {self.broker}: {cause}"
        except ValueError as exc:
            return f"cannot connect to broker {self.broker}: {exc}"
        self.state = "connecting"
        self.connecting_since = time.monotonic()
        self.refusal = None
        self.disconnect_reason = None
        return None

    def _connect_properties(self) -> Properties:
        """A session that never expires (docs/arrival-stamp.md), and the broker's window of
        unacknowledged messages: two commits' worth."""
        props = session_properties()
        props.ReceiveMaximum = min(RECEIVE_MAXIMUM_LIMIT, max(20, 2 * self.m.commit_max_messages))
        return props

    def lost(self) -> None:
        """The connection is gone: what was read on it is never acknowledged."""
        if self.state != "down":
            self.generation += 1
        self.state = "down"

    def drop(self) -> None:
        """Say goodbye if the socket still works; paho closes it (or the next connect does)."""
        if self.client.socket() is not None:
            try:
                self.client.disconnect()
                self.client.loop_write()
            except Exception:  # a dying socket; nothing to keep
                log.debug("disconnect of a dead connection", exc_info=True)
        self.lost()

    def failure_cause(self, rc: mqtt.MQTTErrorCode) -> str:
        """Why the connection (or the login) failed, in one sentence."""
        detail = self.disconnect_reason or mqtt.error_string(rc).rstrip(".").lower()
        if self.refusal:
            return self.refusal
        if self.state == "up":
            return f"lost the connection to broker {self.broker}: {detail}"
        return f"broker {self.broker} closed the connection during login: {detail}"

    def disconnect(self, deadline: float) -> None:
        """End the session cleanly (it stays on the broker), writing until ``deadline``."""
        if self.state != "up":
            return
        self.client.disconnect()
        while self.client.want_write() and time.monotonic() < deadline:
            if self.client.loop_write() != mqtt.MQTT_ERR_SUCCESS:
                break

    # ---- traffic ---------------------------------------------------------------------------

    def pump(
        self, timeout: float, other: Connection, on_other: Callable[[], None], limit: int
    ) -> tuple[int, mqtt.MQTTErrorCode]:
        """Wait up to ``timeout`` for the broker socket or ``other`` (then ``on_other()``);
        read at most ``limit`` messages into the inbox; write what is queued.

        Returns how many messages arrived and paho's result: anything but success means the
        connection failed (the caller decides what to do).
        """
        sock = self.client.socket()
        if sock is None:
            return 0, mqtt.MQTT_ERR_NO_CONN
        wlist = [sock] if self.client.want_write() else []
        if self._more and self._buf_sock is sock:
            timeout = 0.0  # packets already read wait in the buffer
        try:
            readable, writable, _ = select.select([sock, other], wlist, [], timeout)
        except (OSError, ValueError):
            return 0, mqtt.MQTT_ERR_CONN_LOST
        if other in readable:
            on_other()
            if self.state == "down":
                return 0, mqtt.MQTT_ERR_SUCCESS
        before = len(self.inbox)
        rc = mqtt.MQTT_ERR_SUCCESS
        if self.lean:
            if sock in readable or (self._more and self._buf_sock is sock):
                rc = self._read_lean(sock, sock in readable, limit)
        elif sock in readable:
            while len(self.inbox) - before < limit:
                count = len(self.inbox)
                rc = self.client.loop_read()
                if rc != mqtt.MQTT_ERR_SUCCESS or len(self.inbox) == count:
                    break
        if rc == mqtt.MQTT_ERR_SUCCESS and (writable or self.client.want_write()):
            rc = self.client.loop_write()
        now = time.monotonic()
        if rc == mqtt.MQTT_ERR_SUCCESS and now >= self._next_misc:
            self._next_misc = now + MISC_EVERY_SECS
            rc = self.client.loop_misc()
        if rc == mqtt.MQTT_ERR_SUCCESS and self.client.socket() is None:
            rc = mqtt.MQTT_ERR_CONN_LOST
        return len(self.inbox) - before, rc

    def take(self) -> tuple[list[Message], int]:
        """The inbox's messages and the generation of the connection they were read on (only
        the current one's may be acknowledged); the inbox starts empty again."""
        messages, self.inbox = self.inbox, []
        return messages, self.inbox_generation

    def ack(self, acks: list[tuple[int, int]]) -> mqtt.MQTTErrorCode:
        """Acknowledge (mid, qos) pairs in order and write them out."""
        if self.lean and all(qos < 2 for _, qos in acks):
            mids = [mid for mid, qos in acks if qos == 1]
            if mids:
                self.client._packet_queue(mqttwire.PUBACK, mqttwire.pubacks(mids), 0, 1)
        else:
            for mid, qos in acks:
                self.client.ack(mid, qos)
        if self.client.want_write():
            return self.client.loop_write()
        return mqtt.MQTT_ERR_SUCCESS

    # ---- the lean read path (fieldgate.mqttwire) ---------------------------------------------

    def _read_lean(self, sock: Any, readable: bool, limit: int) -> mqtt.MQTTErrorCode:
        """Read what the socket holds (when ``readable``) and take at most ``limit``
        messages from the buffer; other packets go to paho."""
        if self._buf_sock is not sock:  # a new connection: nothing of the old one is kept
            self._buf = b""
            self._buf_sock = sock
            self._more = False
        if readable and not self._more:  # (a packet larger than a read takes several)
            try:
                data = sock.recv(READ_CHUNK)
                while getattr(sock, "pending", None) and sock.pending():  # TLS: whole records
                    data += sock.recv(READ_CHUNK)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                data = None
            except OSError:
                return self._paho_read()  # paho reads the error again and reports it
            if data == b"":
                return self._paho_read()  # closed: paho sees the end and reports it
            if data:
                self._buf += data
                self._buf_at = store.now_ms()
                self.client._last_bytes_received = mqtt.time_func()
        return self._take(limit)

    def _paho_read(self) -> mqtt.MQTTErrorCode:
        self._buf = b""
        self._more = False
        return self.client.loop_read()

    def _take(self, limit: int) -> mqtt.MQTTErrorCode:
        """Cut the buffered packets: PUBLISH into the inbox (at most ``limit``), the rest to
        paho, in the order they came."""
        buf = self._buf
        try:
            packets, _ = mqttwire.cut(buf, 0, limit)
        except mqttwire.Malformed as exc:
            log.warning("broker %s sent a malformed packet: %s", self.broker, exc)
            return self.client._loop_rc_handle(mqtt.MQTT_ERR_PROTOCOL)
        self._more = len(packets) == limit
        if not packets:
            return mqtt.MQTT_ERR_SUCCESS
        inbox = self.inbox
        if not inbox:
            self.inbox_started = time.monotonic()
            self.inbox_generation = self.generation
        append = inbox.append
        topics = self._topics
        at = self._buf_at
        decode = mqttwire.decode_publish
        rc = mqtt.MQTT_ERR_SUCCESS
        done = 0
        for first, start, end in packets:
            done = end
            got = decode(buf, first, start, end) if first & 0xF0 == mqttwire.PUBLISH else None
            if got is None:
                rc = self._to_paho(first, bytearray(buf[start:end]))
                if rc != mqtt.MQTT_ERR_SUCCESS or self._buf_sock is not self.client.socket():
                    break
                continue
            mid, qos, raw_topic, payload, stamp = got
            topic = topics.get(raw_topic)
            if topic is None:
                try:
                    topic = raw_topic.decode("utf-8")
                except UnicodeDecodeError:
                    topic = repr(raw_topic)
                if len(topics) >= 10_000:
                    topics.clear()
                topics[raw_topic] = topic
            append((mid, qos, topic, payload, at, stamp))
        if self._buf is buf:  # (a connection lost meanwhile starts empty)
            self._buf = buf[done:]
        return rc

    def _to_paho(self, first: int, body: bytearray) -> mqtt.MQTTErrorCode:
        """One packet through paho's own handler, as its ``loop_read`` would."""
        client = self.client
        client._in_packet = {
            **_IDLE_IN_PACKET,
            "command": first,
            "have_remaining": 1,
            "remaining_length": len(body),
            "packet": body,
            "remaining_count": [],
        }
        try:
            rc = client._packet_handle()
        except MalformedPacket as exc:
            log.warning("broker %s sent a malformed packet: %s", self.broker, exc)
            rc = mqtt.MQTT_ERR_PROTOCOL
        finally:
            client._in_packet = {**_IDLE_IN_PACKET, "remaining_count": [], "packet": bytearray()}
        if rc != mqtt.MQTT_ERR_SUCCESS:
            return client._loop_rc_handle(rc)
        return rc
