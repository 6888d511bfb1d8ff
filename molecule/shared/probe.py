#!/usr/bin/python3
"""Network probes run on the sensor test host: TCP port state and a minimal MQTT 3.1.1 client.

Why a hand-written client: the sensor host stands for a field device and must not get
packages from anywhere but the base tree, which has Python. The protocol parts used here
(CONNECT/CONNACK, PUBLISH QoS 1/PUBACK, DISCONNECT) are a few bytes each (MQTT 3.1.1 §3).

  probe.py port HOST PORT                 prints open | closed | filtered
  probe.py connect HOST PORT [-u U -P P]  prints the CONNACK return code (0 = accepted)
  probe.py publish HOST PORT -u U -P P -t TOPIC -m PAYLOAD [-m ...]
                                          publishes each payload with QoS 1, waits for PUBACK;
                                          exit 0 only when every message was acknowledged
"""

from __future__ import annotations

import argparse
import socket
import struct
import sys


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


def mqtt_connect(host: str, port: int, user: str | None, password: str | None,
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("port")
    for sp in (pp, sub.add_parser("connect"), sub.add_parser("publish")):
        sp.add_argument("host")
        sp.add_argument("port", type=int)
        sp.add_argument("--timeout", type=float, default=3.0)
        if sp is not pp:
            sp.add_argument("-u", "--user")
            sp.add_argument("-P", "--password")
            sp.add_argument("-i", "--client-id", default="fieldgate-probe")
        if sp.prog.endswith("publish"):
            sp.add_argument("-t", "--topic", required=True)
            sp.add_argument("-m", "--message", action="append", required=True)
    a = p.parse_args()
    if a.cmd == "port":
        print(port_state(a.host, a.port, a.timeout))
        return 0
    sock, code = mqtt_connect(a.host, a.port, a.user, a.password, a.client_id, a.timeout)
    if a.cmd == "connect":
        print(code)
        sock.close()
        return 0
    if code != 0:
        print(f"connection refused by the broker: CONNACK {code}", file=sys.stderr)
        return 1
    for mid, message in enumerate(a.message, start=1):
        body = _str(a.topic) + struct.pack("!H", mid) + message.encode()
        sock.sendall(_packet(0x32, body))  # PUBLISH, QoS 1
        head, rest = _read_packet(sock)
        if head >> 4 != 4 or struct.unpack("!H", rest[:2])[0] != mid:
            print(f"no PUBACK for message {mid}", file=sys.stderr)
            return 1
    sock.sendall(_packet(0xE0, b""))  # DISCONNECT
    sock.close()
    print(f"published {len(a.message)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
