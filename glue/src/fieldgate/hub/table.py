"""A batch's readings as one pyarrow Table, and what the SQLite backend cuts from it.

The hub takes a batch's readings as a :class:`pyarrow.Table` with the columns
``device`` (dictionary-encoded string), ``ts`` (int64), ``metric`` (dictionary-encoded
string) and ``value`` (float64), in the order of the file (:data:`SCHEMA`);
:func:`readings_table` makes one of anything
:meth:`~fieldgate.hub.storage.HubStorage.ingest` accepts (rows, :class:`Columns`, a
Table), in this one place. :func:`cut_blocks` groups a Table per series and cuts the
blocks and rollups of :mod:`fieldgate.hub.sqlite_storage` with ``pyarrow.compute``: no
Python object per reading.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import NamedTuple

import pyarrow as pa
import pyarrow.compute as pc

from fieldgate.batchfile import Columns, Row, arrow_schema, columns_of

#: The Table's schema (the columns of readings.csv).
SCHEMA = arrow_schema()
Readings = Iterable[Row] | Iterable[Columns] | pa.Table


def readings_table(rows: Readings) -> pa.Table:
    """The readings as one Table of :data:`SCHEMA` (no checks: those are the parser's,
    :meth:`fieldgate.batchfile.BatchZip.table` for uploads)."""
    if isinstance(rows, pa.Table):  # one chunk per column: the cut's kernels want arrays
        return rows.select(SCHEMA.names).cast(SCHEMA).combine_chunks()
    parts = [
        pa.table([pa.array(c, f.type) for c, f in zip(cols, SCHEMA, strict=True)], schema=SCHEMA)
        for cols in columns_of(rows)
    ]
    return pa.concat_tables(parts) if parts else SCHEMA.empty_table()


def table_columns(table: pa.Table, size: int = 25_000) -> Iterator[Columns]:
    """A Table as :class:`Columns` of ``size`` readings (the PostgreSQL backend's COPY)."""
    for part in table.to_batches(size):
        yield Columns(*(part.column(n).to_pylist() for n in SCHEMA.names))


def pairs_of(table: pa.Table) -> tuple[list[tuple[str, str]], pa.Array]:
    """The distinct (device, metric) pairs of a Table of :data:`SCHEMA` in order of
    appearance, and per reading the index of its pair (int32): from the names' dictionary
    indices (a code per reading: device index * metric names + metric index), not from
    the strings."""
    device, metric = (table[n].combine_chunks() for n in ("device", "metric"))
    width = len(metric.dictionary)
    codes = pc.add(pc.multiply(device.indices.cast(pa.int64()), width), metric.indices)
    enc = pc.dictionary_encode(codes)
    devices, metrics = device.dictionary.to_pylist(), metric.dictionary.to_pylist()
    pairs = [(devices[c // width], metrics[c % width]) for c in enc.dictionary.to_pylist()]
    return pairs, enc.indices


class Run(NamedTuple):
    """One series' readings of a batch, in ts order without repeats."""

    series: int
    first_ts: int
    last_ts: int
    count: int
    last_value: float
    points: str  # JSON text [[ts-first_ts,value],...]: ts as offsets from the first
    start: int  # its rows in the cut's ``readings``
    end: int


class Cut(NamedTuple):
    """A batch grouped per series by :func:`cut_blocks`."""

    runs: list[Run]
    #: (series, bucket, min, max, sum, count) of the readings per series and rollup bucket
    rollups: list[tuple[int, int, float, float, float, int]]
    #: the readings sorted by (series, ts), a reading held twice in the batch dropped
    #: (the first in file order kept): columns ``s``, ``ts``, ``v``
    readings: pa.Table


def value_texts(values: pa.Array) -> pa.Array:
    """Each double as JSON text that SQLite's JSON parser reads back as the same REAL.

    pyarrow's cast is the shortest text that round-trips (``0.1``, ``1e+300``), except that
    an integral value comes out as an integer literal (``3``, ``-0``), which SQL would read
    as an INTEGER (and ``-0`` as 0): those get ``.0`` (a large one has an exponent and
    stays as it is)."""
    text = pc.cast(values, pa.string())
    integral = pc.equal(pc.floor(values), values)  # few, usually: only those are looked at
    if not pc.any(integral).as_py():
        return text
    some = text.filter(integral)
    fixed = pc.if_else(
        pc.match_substring(some, "e"), some, pc.binary_join_element_wise(some, ".0", "")
    )
    return pc.replace_with_mask(text, integral, fixed)


def cut_blocks(
    table: pa.Table, series_of_pair: pa.Array, pair_index: pa.Array, rollup_ms: int
) -> Cut:
    """Group a batch per series (``series_of_pair[pair_index[i]]`` is reading i's series
    id): sorted by (series, ts) stably, a repeat of a (series, ts) dropped (the first in
    the file kept), each series' run with its JSON text (its ts as offsets from its first:
    a quarter less text than epoch ms), and the statistics per series and rollup bucket
    (``rollup_ms`` wide)."""
    t = pa.table(
        {
            "s": pc.take(series_of_pair, pair_index),
            "ts": table["ts"].combine_chunks(),
            "v": table["value"].combine_chunks(),
        }
    )
    # sort_indices is stable: readings of one (series, ts) keep their file order
    t = t.take(pc.sort_indices(t, sort_keys=[("s", "ascending"), ("ts", "ascending")]))
    n = t.num_rows
    if n > 1:
        s, ts = t["s"].combine_chunks(), t["ts"].combine_chunks()
        again = pc.and_(
            pc.equal(s.slice(1), s.slice(0, n - 1)), pc.equal(ts.slice(1), ts.slice(0, n - 1))
        )
        if pc.any(again).as_py():
            t = t.filter(pa.concat_arrays([pa.array([True]), pc.invert(again)]))
    s, ts, v = (t[c].combine_chunks() for c in ("s", "ts", "v"))
    if not len(s):
        return Cut([], [], t)
    ree = pc.run_end_encode(s)
    sids = ree.values.to_pylist()
    ends = ree.run_ends.to_pylist()
    starts = [0, *ends[:-1]]
    lasts = pa.array([e - 1 for e in ends], pa.int64())
    firsts = pc.take(ts, pa.array(starts, pa.int64()))
    firsts_ts = firsts.to_pylist()
    lasts_ts = pc.take(ts, lasts).to_pylist()
    last_values = pc.take(v, lasts).to_pylist()
    offsets = pc.subtract(
        ts, pc.run_end_decode(pa.RunEndEncodedArray.from_arrays(ree.run_ends, firsts))
    )
    # "offset,value" per reading, joined by "],[" per series and wrapped in "[[" "]]" (a
    # third of the cost of "[ts,value]" per reading joined by ",")
    items = pc.binary_join_element_wise(pc.cast(offsets, pa.string()), value_texts(v), ",")
    lists = pa.ListArray.from_arrays(pa.array([*starts, len(s)], pa.int32()), items)
    texts = pc.binary_join_element_wise("[[", pc.binary_join(lists, "],["), "]]", "").to_pylist()
    runs = [
        Run(*fields)
        for fields in zip(
            sids,
            firsts_ts,
            lasts_ts,
            [e - b for b, e in zip(starts, ends, strict=True)],
            last_values,
            texts,
            starts,
            ends,
            strict=True,
        )
    ]
    bucket = pc.multiply(pc.divide(ts, rollup_ms), rollup_ms)
    stats = (
        pa.table({"s": s, "b": bucket, "v": v})
        .group_by(["s", "b"])
        .aggregate([("v", "min"), ("v", "max"), ("v", "sum"), ("v", "count")])
    )
    rollups = list(
        zip(
            *(stats[c].to_pylist() for c in ("s", "b", "v_min", "v_max", "v_sum", "v_count")),
            strict=True,
        )
    )
    return Cut(runs, rollups, t)


def decode_points(texts: list[str], bases: list[int]) -> tuple[pa.Array, pa.Array]:
    """The readings of blocks' JSON texts (as :func:`cut_blocks` writes them: ``[[ts,v],
    ...]``, nothing else; each ts an offset from the block's base, one base per text) as a
    ts (int64, base added) and a value (float64) array, in order. The texts are cut by
    ``pyarrow.compute`` and the numbers parsed by its casts (exact: the shortest
    round-trip texts parse back to the same doubles)."""
    if not texts:
        return pa.array([], pa.int64()), pa.array([], pa.float64())
    inner = pc.binary_slice(pa.array(texts, pa.large_binary()), 2, -2)
    split = pc.split_pattern(pc.replace_substring(inner, "],[", ","), ",")
    pairs = pa.FixedSizeListArray.from_arrays(split.flatten().cast(pa.large_string()), 2)
    ts = pc.cast(pc.list_element(pairs, 0), pa.int64())
    if any(bases):  # each pair's text's base, by the pairs' list per text
        per_text = pa.ListArray.from_arrays(pc.divide(split.offsets, 2), pairs)
        ts = pc.add(ts, pc.take(pa.array(bases, pa.int64()), pc.list_parent_indices(per_text)))
    return ts, pc.cast(pc.list_element(pairs, 1), pa.float64())


def bucket_sums(
    ts: pa.Array, values: pa.Array, span: tuple[int, int], every: int, origin: int
) -> list[tuple[int, float, float, float, int]]:
    """(bucket, min, max, sum, count) of the readings with start <= ts < end per bucket of
    ``every`` counted from ``origin`` (as SQL's integer division: towards zero)."""
    start, end = span
    keep = pc.and_(pc.greater_equal(ts, start), pc.less(ts, end))
    ts, values = ts.filter(keep), values.filter(keep)
    if not len(ts):
        return []
    bucket = pc.add(pc.multiply(pc.divide(pc.subtract(ts, origin), every), every), origin)
    stats = (
        pa.table({"b": bucket, "v": values})
        .group_by("b")
        .aggregate([("v", "min"), ("v", "max"), ("v", "sum"), ("v", "count")])
    )
    return list(
        zip(
            *(stats[c].to_pylist() for c in ("b", "v_min", "v_max", "v_sum", "v_count")),
            strict=True,
        )
    )
