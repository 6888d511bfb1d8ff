"""Coalescing (plan_reads) and decoding (Decoder): pure functions, checked against hand-made
words and against pymodbus's own converter."""

from __future__ import annotations

import math
import random
import struct
from dataclasses import dataclass

import pytest
from pymodbus.client import ModbusTcpClient

from fieldgate.modbus.plan import Read, Span, plan_reads
from fieldgate.modbus.registers import (
    TYPES,
    WIDTH,
    Decoder,
    answer_struct,
    describe_words,
    pack_registers,
)


def spans(table: str, *pairs: tuple[int, int]) -> list[Span]:
    return [Span(table, address, width) for address, width in pairs]


def covered(reads: list[Read], all_spans: list[Span]) -> None:
    """Every span lies whole inside the read that lists it, and each span is read once."""
    seen = sorted(i for r in reads for i in r.members)
    assert seen == list(range(len(all_spans)))
    for r in reads:
        for i in r.members:
            s = all_spans[i]
            assert s.table == r.table
            assert r.start <= s.address and s.address + s.width <= r.start + r.count


def test_contiguous_registers_are_one_read() -> None:
    s = spans("input", *((a, 2) for a in range(0, 60, 2)))  # 30 float32, 60 registers
    reads = plan_reads(s)
    assert reads == [Read("input", 0, 60, tuple(range(30)))]


def test_gaps_up_to_max_gap_are_bridged_and_longer_ones_split() -> None:
    s = spans("holding", (0, 1), (11, 1), (23, 2))  # gaps of 10 and 11 unused registers
    assert plan_reads(s, max_gap=10) == [
        Read("holding", 0, 12, (0, 1)),
        Read("holding", 23, 2, (2,)),
    ]
    assert plan_reads(s, max_gap=11) == [Read("holding", 0, 25, (0, 1, 2))]
    assert plan_reads(s, max_gap=0) == [
        Read("holding", 0, 1, (0,)),
        Read("holding", 11, 1, (1,)),
        Read("holding", 23, 2, (2,)),
    ]


def test_max_gap_zero_still_joins_adjacent_values() -> None:
    s = spans("holding", (0, 2), (2, 4), (6, 1))
    assert plan_reads(s, max_gap=0) == [Read("holding", 0, 7, (0, 1, 2))]


def test_the_protocol_limit_is_never_exceeded_and_values_are_not_split() -> None:
    # 63 float32 back to back: 126 registers do not fit one read of 125
    s = spans("holding", *((a, 2) for a in range(0, 126, 2)))
    reads = plan_reads(s, max_read_registers=125)
    assert [(r.start, r.count) for r in reads] == [(0, 124), (124, 2)]
    covered(reads, s)


def test_device_limit_below_the_protocols() -> None:
    s = spans("input", *((a, 2) for a in range(0, 160, 2)))
    reads = plan_reads(s, max_read_registers=80)  # e.g. Eastron: 40 values per request
    assert [(r.start, r.count) for r in reads] == [(0, 80), (80, 80)]
    assert plan_reads(s, max_read_registers=200) == plan_reads(s, max_read_registers=125)


def test_bits_are_planned_against_2000() -> None:
    s = spans("coil", (0, 1), (1999, 1), (2000, 1))
    reads = plan_reads(s, max_gap=5000)
    assert [(r.start, r.count) for r in reads] == [(0, 2000), (2000, 1)]
    d = spans("discrete", (5, 1), (9, 1))
    assert plan_reads(d) == [Read("discrete", 5, 5, (0, 1))]


def test_tables_are_planned_separately_in_a_fixed_order() -> None:
    s = [
        Span("input", 0, 2),
        Span("holding", 2, 1),
        Span("coil", 1, 1),
        Span("holding", 0, 2),
        Span("discrete", 0, 1),
    ]
    reads = plan_reads(s)
    assert [(r.table, r.start, r.count, r.members) for r in reads] == [
        ("coil", 1, 1, (2,)),
        ("discrete", 0, 1, (4,)),
        ("holding", 0, 3, (3, 1)),
        ("input", 0, 2, (0,)),
    ]


def test_overlapping_spans_share_a_read() -> None:
    s = spans("holding", (10, 2), (10, 2), (11, 1))
    assert plan_reads(s) == [Read("holding", 10, 2, (0, 1, 2))]


def test_unsorted_map_at_the_top_of_the_address_space() -> None:
    s = spans("holding", (65532, 4), (65000, 1), (65530, 1))
    reads = plan_reads(s, max_gap=1000)  # the gap fits, 536 registers do not
    assert reads == [Read("holding", 65000, 1, (1,)), Read("holding", 65530, 6, (2, 0))]


def test_a_60_register_map_is_a_handful_of_requests() -> None:
    # the shape of a typical meter map: runs of float32 with reserved holes of 2-8 registers
    rng = random.Random(11)
    s: list[Span] = []
    address = 0
    while len(s) < 30:
        s.append(Span("input", address, 2))
        address += 2 + (rng.choice([0, 0, 0, 2, 4, 8]))
    reads = plan_reads(s)
    covered(reads, s)
    assert len(reads) <= 3, reads
    assert all(r.count <= 125 for r in reads)


@pytest.mark.parametrize("seed", range(40))
def test_random_maps_are_covered_within_the_limits(seed: int) -> None:
    rng = random.Random(seed)
    tables = ["coil", "discrete", "holding", "input"]
    s = []
    for _ in range(rng.randint(1, 80)):
        table = rng.choice(tables)
        width = 1 if table in ("coil", "discrete") else rng.choice([1, 2, 4])
        s.append(Span(table, rng.randint(0, 3000), width))
    max_gap = rng.choice([0, 1, 10, 50])
    max_regs = rng.choice([4, 10, 125])
    reads = plan_reads(s, max_gap=max_gap, max_read_registers=max_regs, max_read_bits=64)
    covered(reads, s)
    for r in reads:
        assert r.count <= (64 if r.table in ("coil", "discrete") else max_regs)
        members = sorted(r.members, key=lambda i: s[i].address)
        end = s[members[0]].address
        for i in members:  # no gap inside a read is wider than max_gap
            assert s[i].address - end <= max_gap
            end = max(end, s[i].address + s[i].width)
    # greedy: never more reads than reading each span alone
    assert len(reads) <= len(s)


def test_describe() -> None:
    assert Read("holding", 100, 60, (0,)).describe() == "holding 100-159"
    assert Read("coil", 7, 1, (0,)).describe() == "coil 7"


@dataclass(frozen=True)
class Reg:
    metric: str
    address: int
    table: str
    type: str | None
    word_order: str = "big"
    scale: float = 1.0
    offset: float = 0.0


# Hand-made words (Modbus: big-endian bytes in a register; ``big`` word order = high word first).
VECTORS = [
    ("int16", "big", [0xFF38], -200),
    ("uint16", "big", [0xFF38], 65336),
    ("int32", "big", [0xFFFE, 0x1DC0], -123456),
    ("int32", "little", [0x1DC0, 0xFFFE], -123456),
    ("uint32", "big", [0x0001, 0xE240], 123456),
    ("uint32", "little", [0xE240, 0x0001], 123456),
    ("float32", "big", [0x4048, 0xF5C3], struct.unpack(">f", bytes.fromhex("4048F5C3"))[0]),
    ("float32", "little", [0xF5C3, 0x4048], struct.unpack(">f", bytes.fromhex("4048F5C3"))[0]),
    ("int64", "big", [0xFFFF, 0xFFFF, 0xFFFF, 0xFFFE], -2),
    ("int64", "little", [0xFFFE, 0xFFFF, 0xFFFF, 0xFFFF], -2),
    ("uint64", "big", [0x0000, 0x0001, 0x0000, 0x0000], 2**32),
    ("uint64", "little", [0x0000, 0x0000, 0x0001, 0x0000], 2**32),
    ("float64", "big", [0x4009, 0x21FB, 0x5444, 0x2D18], math.pi),
    ("float64", "little", [0x2D18, 0x5444, 0x21FB, 0x4009], math.pi),
    ("bool", "big", [0x0000], 0),
    ("bool", "big", [0x0100], 1),
]


@pytest.mark.parametrize(("type_", "order", "words", "expected"), VECTORS)
def test_decoding_hand_made_words(
    type_: str, order: str, words: list[int], expected: float
) -> None:
    d = Decoder.of(Reg("m", 0, "holding", type_, order))
    assert d.width == WIDTH[type_] == len(words)
    assert d.raw(words) == expected
    assert d.value(words) == float(expected)


@pytest.mark.parametrize(("type_", "order", "words", "expected"), VECTORS)
def test_decoding_inside_a_longer_read(
    type_: str, order: str, words: list[int], expected: float
) -> None:
    # the poller packs a read's registers once and decodes each value at its place in it
    around = [0xDEAD, 0xBEEF, 0x1234]
    data = pack_registers([*around, *words, *around])
    d = Decoder.of(Reg("m", 3, "holding", type_, order, scale=2.0, offset=1.0))
    assert d.raw_at(data, 3) == expected
    assert d.value_at(data, 3) == float(expected) * 2.0 + 1.0


def test_bits_decode_to_0_and_1() -> None:
    d = Decoder.of(Reg("m", 0, "coil", None))
    assert (d.type, d.width) == ("bool", 1)
    assert (d.value([True]), d.value([False])) == (1.0, 0.0)


def test_scale_and_offset() -> None:
    d = Decoder.of(Reg("m", 0, "input", "int16", scale=0.1, offset=-40))
    assert d.value([250]) == pytest.approx(250 * 0.1 - 40)
    assert d.value([0xFFF6]) == pytest.approx(-10 * 0.1 - 40)


def test_non_finite_values_come_through_for_the_caller_to_reject() -> None:
    d = Decoder.of(Reg("m", 0, "input", "float32"))
    assert math.isnan(d.value([0x7FC0, 0x0000]))
    assert d.value([0x7F80, 0x0000]) == math.inf
    big = Decoder.of(Reg("m", 0, "input", "float64", scale=1e300))
    assert big.value([0x7FEF, 0xFFFF, 0xFFFF, 0xFFFF]) == math.inf  # overflow by scaling


PYMODBUS = ModbusTcpClient.DATATYPE
SAMPLES = {
    "int16": [-32768, -1, 0, 12345, 32767],
    "uint16": [0, 1, 54321, 65535],
    "int32": [-(2**31), -123456789, 0, 2**31 - 1],
    "uint32": [0, 3_000_000_000, 2**32 - 1],
    "int64": [-(2**63), -9_000_000_000_000, 2**63 - 1],
    "uint64": [0, 2**53 + 1, 2**64 - 1],
    "float32": [-1.5, 0.0, 3.25, 1e-30, 6.5e37],
    "float64": [-2.5e-300, math.pi, 1e300],
}


@pytest.mark.parametrize("order", ["big", "little"])
@pytest.mark.parametrize("type_", [t for t in TYPES if t != "bool"])
def test_decoding_agrees_with_pymodbus(type_: str, order: str) -> None:
    d = Decoder.of(Reg("m", 0, "holding", type_, order))
    kind = getattr(PYMODBUS, type_.upper())
    for value in SAMPLES[type_]:
        words = ModbusTcpClient.convert_to_registers(value, kind, word_order=order)
        assert d.raw(words) == ModbusTcpClient.convert_from_registers(words, kind, word_order=order)
        if type_.startswith("float"):
            assert d.raw(words) == pytest.approx(value, rel=1e-6)
        else:
            assert d.raw(words) == value


def test_describe_words() -> None:
    assert describe_words([0x7FC0, 0]) == "0x7fc0 0x0000"
    assert describe_words([True, False]) == "1 0"


def test_one_struct_per_answer_decodes_as_value_by_value() -> None:
    # the poller unpacks a whole answer at once where it can; the values must be the same
    regs = [
        Reg("a", 10, "holding", "int16", scale=0.5, offset=-1),
        Reg("b", 11, "holding", "uint32"),
        Reg("c", 20, "holding", "float64"),  # after a hole of 7 unused registers
        Reg("d", 24, "holding", "uint16", "little"),  # one register: word order is moot
        Reg("e", 25, "holding", "float32", scale=10.0),
    ]
    decoders = [Decoder.of(r) for r in regs]
    rng = random.Random(11)
    words = [rng.randrange(0x10000) for _ in range(17)]
    words[10:14] = struct.unpack(">4H", struct.pack(">d", -1.25))  # c and e finite
    words[15:17] = struct.unpack(">2H", struct.pack(">f", 230.5))
    data = pack_registers(words)
    whole = answer_struct(decoders, 10)
    assert whole is not None
    by_value = [d.value_at(data, d.address - 10) for d in decoders]
    assert [
        float(raw) * d.scale + d.offset
        for d, raw in zip(decoders, whole.unpack_from(data), strict=True)
    ] == by_value


@pytest.mark.parametrize(
    "regs",
    [
        [Reg("a", 0, "holding", "int32", "little")],  # its words must be swapped first
        [Reg("a", 0, "holding", "bool")],  # 0 or 1, not the register's number
        [Reg("a", 0, "coil", None)],  # bits
        [Reg("a", 0, "holding", "int32"), Reg("b", 1, "holding", "int16")],  # overlapping
    ],
)
def test_answers_one_struct_cannot_decode_go_value_by_value(regs: list[Reg]) -> None:
    assert answer_struct([Decoder.of(r) for r in regs], 0) is None
