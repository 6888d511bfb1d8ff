"""Modbus register maps: value types, their widths, which table they fit, and decoding.

Pure functions over plain values (no pymodbus, no fieldgate modules): the configuration
imports this module to check a map before anything starts, the poller to decode answers.

Decoding follows the Modbus Application Protocol (V1.1b3, §4.2): a register is 16 bits sent
big-endian (high byte first). Values of 32 and 64 bits span 2 or 4 consecutive registers;
``word_order: big`` puts the most significant register first (the spec's own convention,
"ABCD"), ``little`` the least significant first ("CDAB"). This is what pymodbus's
``convert_from_registers(..., word_order=...)`` does, which the unit tests check.

``bool`` on a coil or a discrete input is that bit; on a holding or input register it reads
one register, 0 is 0 and anything else is 1 (devices publish flags as 0/1 registers). Any
other type on a coil or discrete input is refused: a bit cannot hold it.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

TABLES = ("coil", "discrete", "holding", "input")
#: Tables of single bits (function codes 1 and 2); the others hold 16-bit registers (3, 4).
BIT_TABLES = frozenset({"coil", "discrete"})
_BIT_NAME = {"coil": "coil", "discrete": "discrete input"}
TYPES = ("int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64", "bool")

#: Registers a value of each type spans on a holding or input table.
WIDTH = {
    "bool": 1,
    "int16": 1,
    "uint16": 1,
    "int32": 2,
    "uint32": 2,
    "float32": 2,
    "int64": 4,
    "uint64": 4,
    "float64": 4,
}
_STRUCT = {
    "int16": struct.Struct(">h"),
    "uint16": struct.Struct(">H"),
    "int32": struct.Struct(">i"),
    "uint32": struct.Struct(">I"),
    "float32": struct.Struct(">f"),
    "int64": struct.Struct(">q"),
    "uint64": struct.Struct(">Q"),
    "float64": struct.Struct(">d"),
}
_WORDS = {n: struct.Struct(f">{n}H") for n in (1, 2, 4)}

#: The most one read request may ask for (Modbus Application Protocol V1.1b3, §6.1-6.4).
PROTOCOL_MAX = {"coil": 2000, "discrete": 2000, "holding": 125, "input": 125}
LAST_ADDRESS = 65535


class RegisterSpec(Protocol):
    """One entry of ``poll.modbus[].registers`` (``config.ModbusRegister`` has these)."""

    @property
    def metric(self) -> str: ...
    @property
    def address(self) -> int: ...
    @property
    def table(self) -> str: ...
    @property
    def type(self) -> str | None: ...
    @property
    def word_order(self) -> str: ...
    @property
    def scale(self) -> float: ...
    @property
    def offset(self) -> float: ...


def value_type(table: str, type_: str | None) -> str | None:
    """The type a register is read as: ``type``, or ``bool`` for a bit table without one."""
    if type_ is None and table in BIT_TABLES:
        return "bool"
    return type_


def width(table: str, type_: str) -> int:
    """Addresses a value occupies in its table (one bit, or 1, 2 or 4 registers)."""
    return 1 if table in BIT_TABLES else WIDTH[type_]


def map_problems(
    registers: Sequence[RegisterSpec], *, max_read_registers: int = 125, max_read_bits: int = 2000
) -> Iterator[tuple[str, str]]:
    """Every mistake in a register map as (key under the device, one sentence), in map order.

    Keys look like ``registers[3].type``. Checked: a type that does not fit its table, a value
    running past address 65535, a value wider than one read may be, duplicate metric names,
    overlapping registers read as different types, and scale/offset that are not usable numbers.
    """
    if not registers:
        yield "registers", "empty: a Modbus device needs at least one register to read"
        return
    seen_metric: dict[str, int] = {}
    #: per table: (first, last address, (address, type, word order), index) of each entry
    spans: dict[str, list[tuple[int, int, tuple[int, str, str], int]]] = {t: [] for t in TABLES}
    for i, reg in enumerate(registers):
        key = f"registers[{i}]"
        type_ = value_type(reg.table, reg.type)
        if type_ is None:
            yield f"{key}.type", f"required for holding and input registers ({', '.join(TYPES)})"
            continue
        if reg.table in BIT_TABLES and type_ != "bool":
            yield (
                f"{key}.type",
                f"a {_BIT_NAME[reg.table]} is a single bit: only bool fits, got {type_}",
            )
            continue
        n = width(reg.table, type_)
        last = reg.address + n - 1
        if last > LAST_ADDRESS:
            yield (
                f"{key}.address",
                f"{type_} at {reg.address} spans {reg.address}-{last}, past the last "
                f"address {LAST_ADDRESS}",
            )
            continue
        limit = max_read_bits if reg.table in BIT_TABLES else max_read_registers
        if n > limit:
            yield (
                f"{key}.type",
                f"{type_} spans {n} registers, more than max_read_registers ({limit}) allows "
                "in one read",
            )
            continue
        if reg.metric in seen_metric:
            yield (
                f"{key}.metric",
                f"{reg.metric!r} is already registers[{seen_metric[reg.metric]}]",
            )
            continue
        seen_metric[reg.metric] = i
        for name, number in (("scale", reg.scale), ("offset", reg.offset)):
            if not math.isfinite(number):
                yield f"{key}.{name}", f"must be a finite number, got {number}"
        if reg.scale == 0:
            yield f"{key}.scale", "must not be 0 (every value would be the offset)"
        same = (reg.address, type_, reg.word_order if n > 1 else "")
        for start, end, other, j in spans[reg.table]:
            if reg.address <= end and start <= last and other != same:
                yield (
                    f"{key}.address",
                    f"{reg.table} {_where(reg.address, last)} ({type_}) overlaps "
                    f"registers[{j}] ({reg.table} {_where(start, end)}, {other[1]}); "
                    "overlapping registers must be the same value read the same way",
                )
                break
        spans[reg.table].append((reg.address, last, same, i))


def _where(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}-{last}"


@dataclass(frozen=True, slots=True)
class Decoder:
    """How one map entry turns words (or a bit) into a value: ``raw * scale + offset``."""

    metric: str
    table: str
    address: int
    type: str
    width: int
    little: bool
    scale: float
    offset: float

    @classmethod
    def of(cls, reg: RegisterSpec) -> Decoder:
        type_ = value_type(reg.table, reg.type)
        if type_ is None:
            raise ValueError(f"register {reg.metric}: no type")  # map_problems refuses it first
        return cls(
            reg.metric,
            reg.table,
            reg.address,
            type_,
            width(reg.table, type_),
            reg.word_order == "little",
            reg.scale,
            reg.offset,
        )

    def raw(self, words: Sequence[int] | Sequence[bool]) -> int | float:
        """The unscaled value of this entry's words (or bit), as the device sent them."""
        if self.table in BIT_TABLES:
            return 1 if words[0] else 0
        return self.raw_at(pack_registers(words), 0)

    def value(self, words: Sequence[int] | Sequence[bool]) -> float:
        """The reading: ``raw * scale + offset``; may be NaN or infinite (the caller checks)."""
        return float(self.raw(words)) * self.scale + self.offset

    def raw_at(self, data: bytes, index: int) -> int | float:
        """The unscaled value of this entry when its first register is register ``index`` of
        ``data`` (the registers of one read as :func:`pack_registers` gives them)."""
        if self.type == "bool":
            return 1 if _WORDS[1].unpack_from(data, 2 * index)[0] else 0
        if self.little:
            regs = _WORDS[self.width].unpack_from(data, 2 * index)[::-1]
            return _STRUCT[self.type].unpack(_WORDS[self.width].pack(*regs))[0]
        return _STRUCT[self.type].unpack_from(data, 2 * index)[0]

    def value_at(self, data: bytes, index: int) -> float:
        """:meth:`value` of the entry at register ``index`` of one read's ``data``."""
        return float(self.raw_at(data, index)) * self.scale + self.offset

    def bit_value_at(self, data: bytes, index: int) -> float:
        """:meth:`value` of the bit ``index`` of one read's ``data`` as a coil or discrete
        input answer packs them: 8 a byte, the first in the lowest bit (V1.1b3, §6.1)."""
        return float(data[index >> 3] >> (index & 7) & 1) * self.scale + self.offset


def answer_struct(decoders: Sequence[Decoder], start: int) -> struct.Struct | None:
    """One struct that unpacks the raw values of ``decoders`` (in that order) from the answer
    of a register read from ``start``, the unused registers between them skipped: one
    ``unpack_from`` per answer instead of one per value. None when one struct cannot: bits,
    ``bool`` on a register (0 or 1, not the number), little-endian word order of a value
    wider than a register, or values not in ascending, non-overlapping order (the same
    registers read as two metrics)."""
    fmt, at = [">"], start
    for d in decoders:
        if d.table in BIT_TABLES or d.type == "bool" or (d.little and d.width > 1):
            return None
        if d.address < at:
            return None
        skip = 2 * (d.address - at)
        fmt.append(f"{skip}x{_STRUCT[d.type].format[1:]}" if skip else _STRUCT[d.type].format[1:])
        at = d.address + d.width
    return struct.Struct("".join(fmt))


def pack_registers(words: Sequence[int] | Sequence[bool]) -> bytes:
    """The registers of an answer as the device sent them: 2 bytes each, big-endian. A poll
    packs each read once and decodes every value of it from there (:meth:`Decoder.value_at`)."""
    return struct.pack(f">{len(words)}H", *words)


def registers_at(data: bytes, index: int, count: int) -> tuple[int, ...]:
    """``count`` registers from register ``index`` of one read's ``data``."""
    return struct.unpack_from(f">{count}H", data, 2 * index)


def describe_words(words: Sequence[int] | Sequence[bool]) -> str:
    """Raw words for a rejection reason: ``0x7fc0 0x0000`` (bits as 0/1)."""
    if words and isinstance(words[0], bool):
        return " ".join("1" if w else "0" for w in words)
    return " ".join(f"0x{w:04x}" for w in words)
