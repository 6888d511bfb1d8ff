"""Real Modbus peers for the tests: pymodbus's own servers (TCP and RTU) on one asyncio loop in
a background thread, and socat pseudo-terminal pairs standing in for an RS-485 line.

Register values are built here with ``struct`` from the values a test expects, independently
of fieldgate's decoder.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import struct
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice
from support import stop_process, wait_until

from fieldgate.config import parse_config
from fieldgate.modbus.poller import Handoff, Polled, Target, build_targets
from fieldgate.modbus.tcploop import TcpLoop

SOCAT = shutil.which("socat") or "/usr/bin/socat"

STRUCT = {
    "int16": "h",
    "uint16": "H",
    "int32": "i",
    "uint32": "I",
    "float32": "f",
    "int64": "q",
    "uint64": "Q",
    "float64": "d",
}


def words(type_: str, value: float, order: str = "big") -> list[int]:
    """The registers a device sends for ``value``: big-endian bytes, then the word order."""
    data = struct.pack(">" + STRUCT[type_], value)
    regs = [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]
    return regs[::-1] if order == "little" else regs


def as_stored(type_: str, value: float) -> float:
    """What a device's value becomes once it went through its type (float32 rounds)."""
    if type_ == "float32":
        return struct.unpack(">f", struct.pack(">f", value))[0]
    return float(value)


@dataclass
class Memory:
    """One unit's four tables, filled address by address; unset addresses in between are 0."""

    coils: dict[int, bool] = field(default_factory=dict)
    discrete: dict[int, bool] = field(default_factory=dict)
    holding: dict[int, int] = field(default_factory=dict)
    input: dict[int, int] = field(default_factory=dict)

    def put(self, table: str, address: int, regs: list[int]) -> None:
        target = getattr(self, table)
        for i, w in enumerate(regs):
            target[address + i] = w

    def device(self, unit: int, action: Callable[..., Awaitable[Any]] | None = None) -> SimDevice:
        def bits(values: dict[int, bool]) -> list[SimData]:
            top = max(values, default=0)
            flat = [bool(values.get(a, False)) for a in range(top + 1)]
            return [SimData(0, values=flat, datatype=DataType.BITS)]

        def regs(values: dict[int, int]) -> list[SimData]:
            top = max(values, default=0)
            flat = [values.get(a, 0) for a in range(top + 1)]
            return [SimData(0, values=flat, datatype=DataType.REGISTERS)]

        return SimDevice(
            id=unit,
            simdata=(
                bits(self.coils),
                bits(self.discrete),
                regs(self.holding),
                regs(self.input),
            ),
            action=action,
        )


async def never_answer(*_args: Any) -> None:
    """A SimDevice action for a unit that takes requests and never answers."""
    await asyncio.sleep(3600)


async def device_failure(*_args: Any) -> ExcCodes:
    """A SimDevice action for a unit that answers every request with exception 4."""
    return ExcCodes.DEVICE_FAILURE


async def no_input_registers(function_code: int, *_args: Any) -> ExcCodes | None:
    """A SimDevice action for a unit that answers reads of input registers (function code 4)
    with exception 2 (illegal data address) and every other request normally."""
    return ExcCodes.ILLEGAL_ADDRESS if function_code == 4 else None


def corrupt_crc(sending: bool, data: bytes) -> bytes:
    """A server trace_packet that flips the last CRC byte of every answer."""
    if sending and data:
        return data[:-1] + bytes([data[-1] ^ 0xFF])
    return data


class Simulator:
    """pymodbus servers on one event loop in a daemon thread; ``close()`` shuts them down."""

    def __init__(self) -> None:
        logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.servers: list[Any] = []
        self.requests = 0  # requests received by every server, counted by trace_pdu

    def _count(self, sending: bool, pdu: Any) -> Any:
        if not sending:
            self.requests += 1
        return pdu

    def _start(self, make: Callable[[], Any]) -> Any:
        async def start() -> Any:
            server = make()
            await server.serve_forever(background=True)
            return server

        fut: Future[Any] = asyncio.run_coroutine_threadsafe(start(), self.loop)
        server = fut.result(30)
        self.servers.append(server)
        return server

    def tcp(self, port: int, devices: list[SimDevice]) -> None:
        """A Modbus TCP server on 127.0.0.1:port serving ``devices`` (by unit)."""
        self._start(
            lambda: ModbusTcpServer(devices, address=("127.0.0.1", port), trace_pdu=self._count)
        )

    def rtu(
        self,
        port: str,
        devices: list[SimDevice],
        *,
        baudrate: int = 19200,
        trace_packet: Callable[[bool, bytes], bytes] | None = None,
    ) -> None:
        """A Modbus RTU server on a serial port (8N1: a pty refuses parity)."""
        self._start(
            lambda: ModbusSerialServer(
                devices,
                port=port,
                baudrate=baudrate,
                parity="N",
                trace_packet=trace_packet,
                trace_pdu=self._count,
            )
        )

    def close(self) -> None:
        async def stop() -> None:
            for server in self.servers:
                await server.shutdown()
            # requests a never-answering unit still holds
            pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


@contextmanager
def simulator() -> Iterator[Simulator]:
    sim = Simulator()
    try:
        yield sim
    finally:
        sim.close()


@contextmanager
def pty_pair(directory: Path) -> Iterator[tuple[str, str]]:
    """``socat -d -d pty,raw,echo=0,link=A pty,raw,echo=0,link=B``: two serial ports joined
    like the two ends of a line. Yields (A, B) paths."""
    a, b = directory / "ttyA", directory / "ttyB"
    proc = subprocess.Popen(
        [SOCAT, "-d", "-d", f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while not (a.exists() and b.exists()):
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"socat did not make the pty pair: {err}")
            time.sleep(0.02)
        yield str(a), str(b)
    finally:
        stop_process(proc, signal.SIGTERM, timeout=10)


def tcp_targets(devices: list[dict[str, Any]]) -> list[Target]:
    """The poller's targets of ``poll.modbus`` entries (any device name allowed)."""
    cfg = parse_config(
        {
            "site": {"serial": "GW"},
            "devices": {"allow_unknown": True},
            "poll": {"modbus": devices},
        },
        "/etc/fieldgate/fieldgate.yaml",
    )
    return build_targets(cfg)


def tcp_loop(*buses: list[Target]) -> tuple[TcpLoop, Handoff]:
    """The poller's selector loop over ``buses`` (each a list of targets on one bus)."""
    named = {f"bus {i}": targets for i, targets in enumerate(buses)}
    handoff = Handoff(len(named))
    return TcpLoop(named, handoff), handoff


def take_polls(handoff: Handoff, n: int) -> list[Polled]:
    """The next ``n`` polls handed over (waiting for them)."""
    polls: list[Polled] = []

    def more() -> bool:
        polls.extend(handoff.take(0.1)[0])
        return len(polls) >= n

    wait_until(more, what=f"{n} polls")
    return polls


def poll_round(loop: TcpLoop, handoff: Handoff) -> list[Polled]:
    """One ``--once`` round of ``loop``: every device's poll, in the order of its buses."""
    order = [t for link in loop.links for t in link.targets]
    loop.start(threading.Event(), once=True)
    polls = take_polls(handoff, len(order))
    assert loop.thread is not None
    loop.thread.join(30)
    assert not loop.thread.is_alive()
    return sorted(polls, key=lambda p: order.index(p.target))


def poll_tcp_once(*buses: list[Target]) -> list[Polled]:
    """Poll every device of ``buses`` once through the selector loop, then close it."""
    loop, handoff = tcp_loop(*buses)
    try:
        return poll_round(loop, handoff)
    finally:
        loop.close()
