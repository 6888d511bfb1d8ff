#!/usr/bin/python3
"""Network probes run on the sensor test host: TCP port state and a minimal MQTT 3.1.1 client.

Why a hand-written client: the sensor host stands for a field device and must not get
packages from anywhere but the base tree, which has Python. The protocol parts used here
(CONNECT/CONNACK, PUBLISH QoS 1/PUBACK, DISCONNECT) are a few bytes each (MQTT 3.1.1 §3).

  probe.py port HOST PORT                 prints open | closed | filtered
  probe.py connect HOST PORT [-u U -P P]  prints the CONNACK return code (0 = accepted)
  probe.py garbage HOST PORT -u U -P P   logs in, then sends bytes that are no MQTT packet;
                                          prints the CONNACK code once the broker has closed
                                          the connection (a protocol error it logs)
  probe.py publish HOST PORT -u U -P P -t TOPIC -m PAYLOAD [-m ...]
                                          publishes each payload with QoS 1, waits for PUBACK;
                                          exit 0 only when every message was acknowledged
  probe.py stream HOST PORT -u U -P P -t TOPIC --acked FILE [--rate N]
                                          a sensor that keeps publishing until SIGTERM: reading
                                          n (1, 2, ...) is {"ts": start_ms + n, "metrics":
                                          {"seq": n}}, QoS 1, one every 1/N s; each PUBACK
                                          appends "n epoch_ms" to FILE at once. A reading whose
                                          PUBACK does not come (broker gone, host off) is not
                                          sent again; the connection is retried every 0.5 s
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import struct
import sys
import time
from pathlib import Path


def port_state(host: str, port: int, timeout: float) -> str:
    """open (handshake done), closed (refused: RST or ICMP) or filtered (no answer: dropped)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return "open"
    except ConnectionRefusedError:
        return "closed"
    except TimeoutError:
        return "filtered"
    except OSError as exc:  # e.g. EHOSTUNREACH from an ICMP reject
        return f"closed ({exc.strerror})"


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("!H", len(b)) + b


def _packet(kind: int, body: bytes) -> bytes:
    return bytes([kind]) + _remaining_length(len(body)) + body


def _read_packet(sock: socket.socket) -> tuple[int, bytes]:
    head = _recv(sock, 1)[0]
    mult, length = 1, 0
    while True:
        b = _recv(sock, 1)[0]
        length += (b & 0x7F) * mult
        mult *= 128
        if not b & 0x80:
            break
    return head, _recv(sock, length) if length else b""


def _recv(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("connection closed by the broker")
        data += chunk
    return data


def mqtt_connect(host: str, port: int, user: str | None, password: str | None, *,
                 client_id: str, timeout: float) -> tuple[socket.socket, int]:  # fmt: skip
    """Open a session; returns the socket and the CONNACK return code (MQTT 3.1.1 §3.2.2.3)."""
    sock = socket.create_connection((host, port), timeout=timeout)
    flags = 0x02  # clean session
    payload = _str(client_id)
    if user is not None:
        flags |= 0x80
        payload += _str(user)
        if password is not None:
            flags |= 0x40
            payload += _str(password)
    body = _str("MQTT") + bytes([4, flags]) + struct.pack("!H", 30) + payload
    sock.sendall(_packet(0x10, body))
    try:
        head, rest = _read_packet(sock)
    except ConnectionError:
        return sock, -1
    if head >> 4 != 2 or len(rest) != 2:
        raise ConnectionError(f"unexpected reply to CONNECT: {head:#x}")
    return sock, rest[1]


def publish_qos1(sock: socket.socket, topic: str, mid: int, payload: bytes) -> bool:
    """One QoS 1 PUBLISH; True when the broker acknowledged it (MQTT 3.1.1 §3.3, §3.4)."""
    sock.sendall(_packet(0x32, _str(topic) + struct.pack("!H", mid) + payload))
    head, rest = _read_packet(sock)
    return head >> 4 == 4 and struct.unpack("!H", rest[:2])[0] == mid


def stream(a: argparse.Namespace) -> int:
    """Publish numbered readings until SIGTERM, recording each acknowledged one at once."""
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    start_ms = int(time.time() * 1000)
    counts = {"published": 0, "acked": 0, "not_sent": 0}
    sock: socket.socket | None = None
    retry_at = 0.0
    next_at = time.monotonic()
    seq = 0
    with Path(a.acked).open("a", buffering=1) as acked:
        while not stopping:
            time.sleep(max(0.0, next_at - time.monotonic()))
            next_at = max(next_at + 1 / a.rate, time.monotonic() - 1)  # no burst after a stall
            seq += 1
            if sock is None and time.monotonic() >= retry_at:
                try:
                    sock, code = mqtt_connect(a.host, a.port, a.user, a.password,
                                              client_id=a.client_id, timeout=a.timeout)  # fmt: skip
                    if code != 0:
                        sock.close()
                        sock = None
                except OSError:
                    sock = None
                if sock is None:
                    retry_at = time.monotonic() + 0.5
            if sock is None:
                counts["not_sent"] += 1
                continue
            payload = json.dumps({"ts": start_ms + seq, "metrics": {"seq": seq}}).encode()
            counts["published"] += 1
            try:
                ok = publish_qos1(sock, a.topic, seq % 65535 + 1, payload)
            except OSError:  # also ConnectionError and a PUBACK timeout
                ok = False
            if ok:
                counts["acked"] += 1
                acked.write(f"{seq} {int(time.time() * 1000)}\n")
            else:
                sock.close()
                sock = None
    if sock is not None:
        sock.sendall(_packet(0xE0, b""))
        sock.close()
    print(json.dumps({"start_ms": start_ms, "last_seq": seq, **counts}))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("port")
    ps = sub.add_parser("stream")
    connect, garbage, publish = (sub.add_parser(c) for c in ("connect", "garbage", "publish"))
    for sp in (pp, connect, garbage, publish, ps):
        sp.add_argument("host")
        sp.add_argument("port", type=int)
        sp.add_argument("--timeout", type=float, default=3.0)
        if sp is not pp:
            sp.add_argument("-u", "--user")
            sp.add_argument("-P", "--password")
            sp.add_argument("-i", "--client-id", default="fieldgate-probe")
        if sp.prog.endswith(("publish", "stream")):
            sp.add_argument("-t", "--topic", required=True)
        if sp.prog.endswith("publish"):
            sp.add_argument("-m", "--message", action="append", required=True)
    ps.add_argument("--acked", required=True, help="file the acknowledged readings go to")
    ps.add_argument("--rate", type=float, default=20.0, help="readings per second")
    a = p.parse_args()
    if a.cmd == "stream":
        return stream(a)
    if a.cmd == "port":
        print(port_state(a.host, a.port, a.timeout))
        return 0
    sock, code = mqtt_connect(
        a.host, a.port, a.user, a.password, client_id=a.client_id, timeout=a.timeout
    )
    if a.cmd == "connect":
        print(code)
        sock.close()
        return 0
    if a.cmd == "garbage":
        sock.sendall(b"\xff\x00")  # packet type 15 (reserved in MQTT 3.1.1)
        try:
            while sock.recv(4096):  # until the broker closes the connection
                pass
        except ConnectionResetError:
            pass
        sock.close()
        print(code)
        return 0
    if code != 0:
        print(f"connection refused by the broker: CONNACK {code}", file=sys.stderr)
        return 1
    for mid, message in enumerate(a.message, start=1):
        if not publish_qos1(sock, a.topic, mid, message.encode()):
            print(f"no PUBACK for message {mid}", file=sys.stderr)
            return 1
    sock.sendall(_packet(0xE0, b""))  # DISCONNECT
    sock.close()
    print(f"published {len(a.message)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
