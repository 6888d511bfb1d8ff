"""The selector loop that drives every Modbus TCP bus (``fieldgate.modbus.tcploop``), at its
edges, against real sockets: answers that arrive in pieces, a device that closes the
connection in the middle of an answer or between polls, one device that never answers
beside two that do (pymodbus's own server), and a device given by host name."""

from __future__ import annotations

import select
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from modbus_sim import (
    Memory,
    Simulator,
    never_answer,
    poll_round,
    poll_tcp_once,
    simulator,
    take_polls,
    tcp_loop,
    tcp_targets,
    words,
)
from support import free_port, wait_until

from fieldgate.modbus.tcploop import TcpLoop

REG = [{"metric": "x", "address": 0, "table": "holding", "type": "uint32"}]


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with simulator() as s:
        yield s


def device(port: int, name: str = "MB-1", host: str = "127.0.0.1", **more: Any) -> dict[str, Any]:
    return {"device": name, "host": host, "port": port, "registers": REG, **more}


def recv_request(conn: socket.socket) -> tuple[int, int, int, int, int]:
    """One 12-byte read request: (transaction id, unit, function, start, count)."""
    data = b""
    while len(data) < 12:
        chunk = conn.recv(12 - len(data))
        assert chunk, "the poller closed the connection before a whole request"
        data += chunk
    tid, protocol, length, unit, function, start, count = struct.unpack(">HHHBBHH", data)
    assert (protocol, length) == (0, 6)
    return tid, unit, function, start, count


def answer(tid: int, unit: int, function: int, data: bytes) -> bytes:
    pdu = bytes([function, len(data)]) + data
    return struct.pack(">HHHB", tid, 0, len(pdu) + 1, unit) + pdu


@contextmanager
def peer(script: Callable[[socket.socket], None], connections: int = 1) -> Iterator[int]:
    """A Modbus TCP peer on loopback: for each of ``connections`` connections it accepts, runs
    ``script(conn)`` and closes it. Yields its port; any failure in a script fails the test."""
    server = socket.create_server(("127.0.0.1", 0))
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            with server:
                for _ in range(connections):
                    conn, _ = server.accept()
                    with conn:
                        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        script(conn)
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
        thread.join(30)
        assert not thread.is_alive(), "the peer did not finish"
        assert not errors, errors
    finally:
        server.close()


def received(loop: TcpLoop, n: int) -> Callable[[], bool]:
    """Whether the loop's first bus holds ``n`` bytes of the answer it awaits."""
    return lambda: len(loop.links[0].got) >= n


def test_an_answer_in_pieces_is_read_whole() -> None:
    state: dict[str, TcpLoop] = {}

    def script(conn: socket.socket) -> None:
        for value in (7, 8):  # two polls on one connection: the second answered at once
            tid, unit, function, start, count = recv_request(conn)
            assert (unit, function, start, count) == (1, 3, 0, 2)
            reply = answer(tid, unit, function, struct.pack(">I", 4_000_000_000 + value))
            if value == 8:
                conn.sendall(reply)
                continue
            sent = 0
            # cut inside the transaction id, inside the length, after the header, in the data
            for piece in (reply[:1], reply[1:5], reply[5:7], reply[7:10], reply[10:]):
                conn.sendall(piece)
                sent += len(piece)
                if sent < len(reply):  # the poller has read this piece before the next comes
                    wait_until(received(state["loop"], sent), what=f"{sent} bytes read")

    with peer(script) as port:
        (target,) = tcp_targets([device(port)])
        loop, handoff = tcp_loop([target])
        state["loop"] = loop
        try:
            (first,) = poll_round(loop, handoff)
            (second,) = poll_round(loop, handoff)
        finally:
            loop.close()
    assert (first.error, first.requests) == (None, 1)
    assert [r[:2] for r in first.readings] == [("x", 4_000_000_007.0)]
    assert second.error is None and [r[1] for r in second.readings] == [4_000_000_008.0]


def test_a_peer_closing_mid_answer_is_a_failed_read_and_the_next_poll_reconnects() -> None:
    state: dict[str, TcpLoop] = {}
    connection = iter(range(2))

    def script(conn: socket.socket) -> None:
        tid, unit, function, _, _ = recv_request(conn)
        reply = answer(tid, unit, function, struct.pack(">I", 5))
        if next(connection) == 0:
            conn.sendall(reply[:9])  # the header and part of the PDU, then the close
            wait_until(received(state["loop"], 9), what="the first 9 bytes read")
            return
        conn.sendall(reply)

    with peer(script, connections=2) as port:
        (target,) = tcp_targets([device(port)])
        loop, handoff = tcp_loop([target])
        state["loop"] = loop
        try:
            (broken,) = poll_round(loop, handoff)
            (again,) = poll_round(loop, handoff)
        finally:
            loop.close()
    assert broken.kind == "connect"
    assert broken.error == f"127.0.0.1:{port} closed the connection reading holding 0-1"
    assert again.error is None and [r[1] for r in again.readings] == [5.0]


def test_a_close_between_polls_is_not_a_failed_poll() -> None:
    """A gateway that closes idle connections: the next poll connects again, quietly."""
    closed = threading.Event()
    connection = iter(range(2))

    def script(conn: socket.socket) -> None:
        tid, unit, function, _, _ = recv_request(conn)
        conn.sendall(answer(tid, unit, function, struct.pack(">I", 6)))
        if next(connection) == 0:
            conn.shutdown(socket.SHUT_RDWR)
            closed.set()

    with peer(script, connections=2) as port:
        (target,) = tcp_targets([device(port)])
        loop, handoff = tcp_loop([target])
        try:
            (first,) = poll_round(loop, handoff)
            wait_until(closed.is_set, what="the peer's close")
            sock = loop.links[0].sock
            assert sock is not None
            wait_until(lambda: bool(select.select([sock], [], [], 0)[0]), what="the close seen")
            (second,) = poll_round(loop, handoff)
        finally:
            loop.close()
    assert first.error is None and second.error is None, (first.error, second.error)
    assert [r[1] for r in second.readings] == [6.0]


def test_a_device_that_never_answers_holds_only_its_own_bus(sim: Simulator) -> None:
    ports = [free_port() for _ in range(3)]
    hang = Memory()
    hang.put("holding", 0, words("uint32", 0))
    sim.tcp(ports[0], [hang.device(1, action=never_answer)])
    for value, port in enumerate(ports[1:], 1):
        mem = Memory()
        mem.put("holding", 0, words("uint32", value))
        sim.tcp(port, [mem.device(1)])
    hanging, *healthy = tcp_targets(
        [
            device(ports[0], "HANG-1", timeout_secs=300),
            device(ports[1], "OK-1"),
            device(ports[2], "OK-2"),
        ]
    )
    loop, handoff = tcp_loop([hanging], [healthy[0]], [healthy[1]])
    stop = threading.Event()
    loop.start(stop, once=True)
    try:
        # both healthy devices are stored while the silent one still waits for its answer
        polls = take_polls(handoff, 2)
        assert sorted((p.target.device, p.error, [r[1] for r in p.readings]) for p in polls) == [
            ("OK-1", None, [1.0]),
            ("OK-2", None, [2.0]),
        ]
        assert loop.links[0].state == "awaiting"
    finally:
        stop.set()
        assert loop.thread is not None
        loop.thread.join(30)
        loop.close()
    assert not loop.thread.is_alive()


def test_a_timeout_is_named_and_the_others_are_read(sim: Simulator) -> None:
    ports = [free_port() for _ in range(2)]
    hang = Memory()
    hang.put("holding", 0, words("uint32", 0))
    sim.tcp(ports[0], [hang.device(1, action=never_answer)])
    mem = Memory()
    mem.put("holding", 0, words("uint32", 9))
    sim.tcp(ports[1], [mem.device(1)])
    hanging, healthy = tcp_targets(
        [device(ports[0], "HANG-1", timeout_secs=0.5), device(ports[1], "OK-1")]
    )
    slow, good = poll_tcp_once([hanging], [healthy])
    assert (slow.kind, slow.error) == ("timeout", "no answer within 0.5 s reading holding 0-1")
    assert good.error is None and [r[1] for r in good.readings] == [9.0]


def test_a_device_given_by_host_name_is_resolved_and_read(sim: Simulator) -> None:
    port = free_port()
    mem = Memory()
    mem.put("holding", 0, words("uint32", 12))
    sim.tcp(port, [mem.device(1)])
    closed = free_port()
    (named, refused) = tcp_targets(
        [device(port, host="localhost"), device(closed, "DEAD-1", host="localhost")]
    )
    # localhost may be ::1 first, where nothing listens: the next address is tried
    polled, dead = poll_tcp_once([named], [refused])
    assert polled.error is None and [r[1] for r in polled.readings] == [12.0]
    assert (dead.kind, dead.error) == (
        "connect",
        f"cannot connect to localhost:{closed}: Connection refused",
    )
