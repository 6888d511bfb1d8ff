"""One client per bus; every failure becomes a :class:`ReadError` with a kind.

A *bus* is what requests must take turns on: one TCP endpoint (host:port, which may be a
gateway to several units) or one serial port (an RS-485 line of several units). The poller
gives each bus one thread and one :class:`BusClient`, so requests on a bus never overlap.

Modbus TCP is framed here (:class:`_TcpLink`): a read request is 12 bytes and its answer a
7-byte header, the function code, a byte count and the data, so one ``sendall`` and (nearly
always) one ``recv`` on the bus thread's socket do what pymodbus's sync client does through
its transaction manager, framer and PDU classes: about 30 µs of the poller's CPU per request
on the development VM against about 70 µs with pymodbus's client (docs/benchmarks.md).
Serial lines use pymodbus's sync RTU client (framing by silence, CRC), with ``retries=0``:
the poller decides about retries (backoff). pymodbus logs connection failures and swallows
the cause, so :class:`_Rtu` opens the port itself (as pymodbus does) and keeps the cause for
the error message. After any failure the connection is closed, so a late answer can never be
taken for the next one. Kinds of failure: ``connect`` (refused, unreachable, no such serial
port, closed by the device), ``timeout`` (no answer), ``crc`` (an RTU answer with a bad
checksum: pymodbus drops such frames and waits, so they surface as a timeout with bytes
received), ``io`` (a garbled, short or mismatched answer), ``exception`` (the device
answered with a Modbus exception code).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import time

import serial
from pymodbus.client import ModbusSerialClient
from pymodbus.exceptions import ConnectionException, ModbusException
from pymodbus.framer import FramerRTU
from pymodbus.pdu import ModbusPDU
from pymodbus.pdu.bit_message import ReadCoilsResponse, ReadDiscreteInputsResponse
from pymodbus.pdu.register_message import (
    ReadHoldingRegistersResponse,
    ReadInputRegistersResponse,
)

from fieldgate.config import ModbusDevice
from fieldgate.modbus.plan import Read
from fieldgate.retry import root_cause

KINDS = ("timeout", "connect", "crc", "io", "exception")

#: Modbus Application Protocol V1.1b3 §7.
EXCEPTION_NAMES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}

# pymodbus logs every failure at ERROR and every frame at DEBUG; the poller reports failures
# itself, once, with their cause. Its logger is quiet unless fieldgate runs at DEBUG.
_PYMODBUS_LOG = logging.getLogger("pymodbus")


def quiet_pymodbus() -> None:
    """Keep pymodbus's own log lines out of fieldgate's log unless the level is DEBUG."""
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        _PYMODBUS_LOG.setLevel(logging.CRITICAL)


class _Raw:
    """A read answer kept as the bytes the device sent (registers 2 bytes each, big-endian;
    bits packed 8 a byte, the first in the lowest bit): the poller decodes every value from
    this one buffer, so pymodbus does not build a list of ints (or bools) first, nor format
    it for a DEBUG line that is not written (its decoder calls ``str(pdu)`` for every
    answer). Registered with the client for function codes 1-4 (pymodbus's
    ``client.register``, meant for custom responses)."""

    raw = b""

    def decode(self, data: bytes) -> None:
        size = data[0]
        if size >= len(data):  # as pymodbus's own register decode refuses it
            raise ValueError(f"byte count {size} > length of packet {len(data)}")
        self.raw = bytes(data[1 : 1 + size])

    def __str__(self) -> str:
        return f"{type(self).__name__}(dev_id={self.dev_id}, {len(self.raw)} bytes)"  # type: ignore[attr-defined]


class _RawCoils(_Raw, ReadCoilsResponse):
    pass


class _RawDiscrete(_Raw, ReadDiscreteInputsResponse):
    pass


class _RawHolding(_Raw, ReadHoldingRegistersResponse):
    pass


class _RawInput(_Raw, ReadInputRegistersResponse):
    pass


_RAW_RESPONSES: tuple[type[ModbusPDU], ...] = (_RawCoils, _RawDiscrete, _RawHolding, _RawInput)


class ReadError(Exception):
    """A read that gave no values; ``kind`` is one of :data:`KINDS`, the text says why."""

    def __init__(self, kind: str, text: str) -> None:
        super().__init__(text)
        self.kind = kind


#: The function code that reads each table (Modbus Application Protocol V1.1b3 §6.1-6.4).
FUNCTION_CODES = {"coil": 1, "discrete": 2, "holding": 3, "input": 4}
#: Modbus TCP's MBAP header (transaction id, protocol id 0, length of what follows, unit id)
#: and a read request's PDU (function code, first address, count): 12 bytes in all.
_REQUEST = struct.Struct(">HHHBBHH")
_HEADER = struct.Struct(">HHHB")
#: The longest Modbus TCP answer: the 7-byte header and a PDU of 253 bytes.
_MAX_ADU = 260


class _PeerClosed(Exception):
    """The device closed the connection while an answer was awaited."""


class _TcpLink:
    """A Modbus TCP connection (Modbus Messaging on TCP/IP Implementation Guide V1.0b §3.1),
    one request outstanding at a time; its answer must carry the request's transaction id and
    unit id (as pymodbus requires too) and is read until the header's length is complete."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.sock: socket.socket | None = None
        self.tid = 0
        #: the bytes of the answer being read (so far), for error messages
        self.received = b""

    def connect(self, timeout: float) -> str | None:
        """Open the connection unless it is open; the cause when that fails."""
        if self.sock is not None:
            return None
        try:
            sock = socket.create_connection((self.host, self.port), timeout=timeout)
        except TimeoutError:
            return "timed out"
        except OSError as exc:
            return root_cause(exc)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        return None

    def exchange(self, unit: int, function: int, start: int, count: int, timeout: float) -> bytes:
        """Send one read request and return the answer's PDU (function code onwards).
        Raises TimeoutError (``received`` holds what came), _PeerClosed when the peer
        closed the connection, ValueError for an answer that is not this request's, OSError."""
        assert self.sock is not None
        self.tid = tid = self.tid % 0xFFFF + 1
        self.received = b""
        deadline = time.monotonic() + timeout
        self.sock.settimeout(timeout)
        self.sock.sendall(_REQUEST.pack(tid, 0, 6, unit, function, start, count))
        got = b""
        need = _HEADER.size
        while len(got) < need:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(_MAX_ADU)
            if not chunk:
                raise _PeerClosed
            got += chunk
            self.received = got
            if need == _HEADER.size and len(got) >= need:
                rtid, protocol, length, runit = _HEADER.unpack_from(got)
                if protocol != 0 or not 2 <= length <= _MAX_ADU - 6:
                    raise ValueError(f"not a Modbus TCP header: {got[:7].hex()}")
                if (rtid, runit) != (tid, unit):
                    raise ValueError(
                        f"answer for unit {runit}, transaction {rtid} "
                        f"(asked unit {unit}, transaction {tid})"
                    )
                need = 6 + length
        if len(got) > need:
            raise ValueError(f"{len(got) - need} bytes more than the answer's length")
        return got[_HEADER.size :]

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class _Rtu(ModbusSerialClient):
    """pymodbus's serial client, keeping the reason the port could not be opened."""

    connect_error = ""

    def connect(self) -> bool:
        if self.socket:
            return True
        p = self.comm_params
        try:
            # as ModbusSerialClient.connect: exclusive, so a second poller cannot share the line
            self.socket = serial.serial_for_url(
                p.host,
                timeout=p.timeout_connect,
                write_timeout=p.timeout_connect,
                bytesize=p.bytesize,
                stopbits=p.stopbits,
                baudrate=p.baudrate,
                parity=p.parity,
                exclusive=True,
            )
            self.socket.inter_byte_timeout = self.inter_byte_timeout
        except Exception as exc:  # pyserial lets termios.error through (a pty refuses parity)
            self.connect_error = _serial_cause(exc)
            self.socket = None
        return self.socket is not None


def _serial_cause(exc: Exception) -> str:
    """``No such file or directory`` rather than pyserial's message that repeats the path."""
    code = getattr(exc, "errno", None)
    if code is None and exc.args and isinstance(exc.args[0], int):
        code = exc.args[0]  # termios.error(22, 'Invalid argument')
    if not code:
        return root_cause(exc)
    text = os.strerror(code)
    if code == errno.EACCES:
        text += " (the user polling needs read and write access: group dialout)"
    return text


class BusClient:
    """Reads from the units of one bus, one request at a time (the caller's thread)."""

    def __init__(self, dev: ModbusDevice, port: str | None = None) -> None:
        """``dev`` is any device of the bus; ``port`` the serial port's resolved path."""
        self.requests = 0
        self._received = b""
        self._last_io = 0.0
        self.tcp: _TcpLink | None = None
        self.client: _Rtu | None = None
        if dev.host is not None:
            self.name = f"{dev.host}:{dev.port_or_default}"
            self.rtu = False
            self.tcp = _TcpLink(dev.host, dev.port_or_default)
            return
        baudrate, parity, stopbits, bytesize = dev.line
        self.name = port or str(dev.serial)
        self.rtu = True
        # Modbus over serial line V1.02 §2.5.1.1: 3.5 character times of silence between
        # frames (11 bits a character), 1.75 ms above 19200 baud.
        self.gap = 3.5 * 11 / baudrate if baudrate <= 19200 else 0.00175
        self.client = _Rtu(
            self.name,
            baudrate=baudrate,
            parity=parity,
            stopbits=stopbits,
            bytesize=bytesize,
            retries=0,
            trace_packet=self._trace,
        )
        for response in _RAW_RESPONSES:
            self.client.register(response)

    def _trace(self, sending: bool, data: bytes) -> bytes:
        if not sending:
            self._received = data  # pymodbus passes the whole answer buffer so far
        return data

    def read(self, unit: int, read: Read, timeout: float) -> bytes:
        """The answer's data of one planned read, as the device sent it: ``read.count``
        registers of 2 bytes (big-endian), or ``read.count`` bits packed 8 a byte (the first
        in the lowest bit of the first byte); ReadError on any failure."""
        if self.tcp is not None:
            raw = self._read_tcp(self.tcp, unit, read, timeout)
        else:
            raw = self._read_rtu(unit, read, timeout)
        if read.table in ("coil", "discrete"):
            got, size = len(raw) * 8, (read.count + 7) // 8
        else:
            got, size = len(raw) // 2, 2 * read.count
        if got < read.count:
            self.close()
            raise ReadError("io", f"short answer reading {read.describe()}: {got} of {read.count}")
        return raw[:size]

    def _read_tcp(self, link: _TcpLink, unit: int, read: Read, timeout: float) -> bytes:
        cause = link.connect(timeout)
        if cause is not None:
            raise ReadError("connect", f"cannot connect to {self.name}: {cause}")
        self.requests += 1
        function = FUNCTION_CODES[read.table]
        try:
            pdu = link.exchange(unit, function, read.start, read.count, timeout)
        except TimeoutError:
            self.close()
            got = link.received
            if not got:
                raise ReadError(
                    "timeout", f"no answer within {timeout:g} s reading {read.describe()}"
                ) from None
            raise self._garbled(read, got) from None
        except _PeerClosed:
            self.close()
            raise ReadError(
                "connect", f"{self.name} closed the connection reading {read.describe()}"
            ) from None
        except ValueError as exc:
            self.close()
            raise ReadError("io", f"unusable answer reading {read.describe()}: {exc}") from None
        except OSError as exc:
            self.close()
            raise ReadError(
                "connect", f"{self.name}: {root_cause(exc)} reading {read.describe()}"
            ) from None
        if pdu[0] == function | 0x80 and len(pdu) == 2:
            code = pdu[1]
            name = EXCEPTION_NAMES.get(code, "unknown exception")
            raise ReadError(
                "exception", f"Modbus exception {code} ({name}) reading {read.describe()}"
            )
        if pdu[0] != function or len(pdu) < 2 or pdu[1] != len(pdu) - 2:
            self.close()
            raise self._garbled(read, link.received)
        return pdu[2:]

    def _garbled(self, read: Read, got: bytes) -> ReadError:
        return ReadError(
            "io", f"garbled answer reading {read.describe()} ({len(got)} bytes: {got[:16].hex()})"
        )

    def _read_rtu(self, unit: int, read: Read, timeout: float) -> bytes:
        assert self.client is not None
        what = read.describe()
        # the sync client reads its timeout from comm_params for every connect and receive
        self.client.comm_params.timeout_connect = timeout
        if not self.client.connect():
            cause = self.client.connect_error or "failed"
            raise ReadError("connect", f"cannot open {self.name}: {cause}")
        silent = self._last_io + self.gap - time.monotonic()
        if silent > 0:
            time.sleep(silent)
        self._received = b""
        self.requests += 1
        call = {
            "coil": self.client.read_coils,
            "discrete": self.client.read_discrete_inputs,
            "holding": self.client.read_holding_registers,
            "input": self.client.read_input_registers,
        }[read.table]
        try:
            response = call(read.start, count=read.count, device_id=unit)
        except ModbusException as exc:
            self.close()
            raise self._no_answer(exc, what, timeout) from None
        except OSError as exc:
            self.close()
            raise ReadError("connect", f"{self.name}: {root_cause(exc)} reading {what}") from None
        except Exception as exc:  # whatever else an odd answer makes pymodbus raise
            self.close()
            raise ReadError("io", f"unusable answer reading {what}: {exc!r}") from None
        finally:
            self._last_io = time.monotonic()
        if response.isError():
            code = getattr(response, "exception_code", 0)
            name = EXCEPTION_NAMES.get(code, "unknown exception")
            raise ReadError("exception", f"Modbus exception {code} ({name}) reading {what}")
        raw: bytes = getattr(response, "raw", b"")
        return raw

    def _no_answer(self, exc: ModbusException, what: str, timeout: float) -> ReadError:
        got = self._received
        if isinstance(exc, ConnectionException):  # closed by the peer, or a failed send
            return ReadError("connect", f"{self.name} closed the connection reading {what}")
        if not got:
            return ReadError("timeout", f"no answer within {timeout:g} s reading {what}")
        if len(got) >= 4:
            crc = int.from_bytes(got[-2:], "big")
            if not FramerRTU.check_CRC(got[:-2], crc):
                return ReadError(
                    "crc", f"CRC error in the answer reading {what} ({len(got)} bytes)"
                )
        return ReadError(
            "io", f"garbled answer reading {what} ({len(got)} bytes: {got[:16].hex()})"
        )

    def close(self) -> None:
        if self.tcp is not None:
            self.tcp.close()
        if self.client is not None:
            self.client.close()
