"""Serial lines' client, and what every Modbus read shares: failures as :class:`ReadError`
with a kind, function codes, exception names, the answer's length check.

A *bus* is what requests must take turns on: one TCP endpoint (host:port, which may be a
gateway to several units) or one serial port (an RS-485 line of several units). The poller
gives each serial line one thread and one :class:`BusClient`, so requests on a line never
overlap; every Modbus TCP bus is driven by one selector thread
(:mod:`fieldgate.modbus.tcploop`), one request outstanding per connection.

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


def exception_error(code: int, read: Read) -> ReadError:
    """The failure of a read the device answered with Modbus exception ``code``."""
    name = EXCEPTION_NAMES.get(code, "unknown exception")
    return ReadError("exception", f"Modbus exception {code} ({name}) reading {read.describe()}")


def whole_answer(read: Read, raw: bytes) -> bytes:
    """The data of ``read``'s answer (``raw``, as the device sent it): ``read.count`` registers
    of 2 bytes, or ``read.count`` bits packed 8 a byte; ReadError when it holds fewer."""
    if read.table in ("coil", "discrete"):
        got, size = len(raw) * 8, (read.count + 7) // 8
    else:
        got, size = len(raw) // 2, 2 * read.count
    if got < read.count:
        raise ReadError("io", f"short answer reading {read.describe()}: {got} of {read.count}")
    return raw[:size]


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
    """Reads from the units of one serial line, one request at a time (the caller's thread).
    Modbus TCP buses are read by :mod:`fieldgate.modbus.tcploop`."""

    def __init__(self, dev: ModbusDevice, port: str | None = None) -> None:
        """``dev`` is any device of the line; ``port`` the serial port's resolved path."""
        assert dev.serial is not None, "a Modbus TCP device is read by fieldgate.modbus.tcploop"
        self.requests = 0
        self._received = b""
        self._last_io = 0.0
        baudrate, parity, stopbits, bytesize = dev.line
        self.name = port or str(dev.serial)
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
        """The answer's data of one planned read, as the device sent it (:func:`whole_answer`);
        ReadError on any failure."""
        try:
            return whole_answer(read, self._read_rtu(unit, read, timeout))
        except ReadError as exc:
            if exc.kind == "io":
                self.close()
            raise

    def _read_rtu(self, unit: int, read: Read, timeout: float) -> bytes:
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
            raise exception_error(getattr(response, "exception_code", 0), read)
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
        self.client.close()
