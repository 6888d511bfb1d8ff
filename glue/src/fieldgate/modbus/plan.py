"""Coalescing: a register map read in as few requests as the protocol and the device allow.

The rule (docs/modbus.md): per table, entries are sorted by address and read greedily into one
request while

- the unused addresses between the request so far and the next entry number at most
  ``max_gap`` (an unused address costs 2 bytes on the wire, a new request a round trip; the
  default of 10 bridges the reserved holes of typical meter maps), and
- the request stays within ``max_read_registers`` registers (protocol limit 125, function
  codes 3 and 4) or ``max_read_bits`` bits (protocol limit 2000, function codes 1 and 2).

A value is never split across requests. ``max_gap: 0`` reads only contiguous runs, for
devices that answer "illegal data address" when a read touches an unmapped address.
Greedy is optimal here: each request starts at the lowest entry not yet covered and reaches
as far as the limits let it, so no plan with fewer requests exists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fieldgate.modbus.registers import BIT_TABLES, PROTOCOL_MAX, TABLES


@dataclass(frozen=True, slots=True)
class Span:
    """Where one map entry lies: its table, first address and width in addresses."""

    table: str
    address: int
    width: int


@dataclass(frozen=True, slots=True)
class Read:
    """One read request: ``count`` addresses of ``table`` from ``start``; ``members`` are the
    indices (into the planned spans) of the entries it answers."""

    table: str
    start: int
    count: int
    members: tuple[int, ...]

    def describe(self) -> str:
        """``holding 100-159`` for logs and error messages."""
        last = self.start + self.count - 1
        where = str(self.start) if last == self.start else f"{self.start}-{last}"
        return f"{self.table} {where}"


def plan_reads(
    spans: Sequence[Span],
    *,
    max_gap: int = 10,
    max_read_registers: int = PROTOCOL_MAX["holding"],
    max_read_bits: int = PROTOCOL_MAX["coil"],
) -> list[Read]:
    """The requests that read every span: tables in the order coil, discrete, holding, input;
    addresses ascending. Spans may overlap (the same value read as two metrics)."""
    if max_gap < 0:
        raise ValueError("max_gap must not be negative")
    reads: list[Read] = []
    for table in TABLES:
        limit = min(
            max_read_bits if table in BIT_TABLES else max_read_registers, PROTOCOL_MAX[table]
        )
        order = sorted(
            (i for i, s in enumerate(spans) if s.table == table),
            key=lambda i: (spans[i].address, spans[i].width),
        )
        start = end = -1  # the request being built covers start..end-1
        members: list[int] = []
        for i in order:
            s = spans[i]
            if s.width > limit:
                raise ValueError(f"a value of {s.width} addresses cannot fit a read of {limit}")
            new_end = max(end, s.address + s.width)
            if members and s.address - end <= max_gap and new_end - start <= limit:
                end = new_end
                members.append(i)
                continue
            if members:
                reads.append(Read(table, start, end - start, tuple(members)))
            start, end, members = s.address, s.address + s.width, [i]
        if members:
            reads.append(Read(table, start, end - start, tuple(members)))
    return reads
