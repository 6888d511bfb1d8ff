"""The hub's Table of readings (:mod:`fieldgate.hub.table`): one shape whatever the hub was
given, and the (device, metric) pairs found from the names' dictionaries."""

from __future__ import annotations

import io
import zipfile

import pyarrow as pa

from fieldgate import batchfile
from fieldgate.batchfile import Columns, Row
from fieldgate.hub.table import SCHEMA, pairs_of, readings_table, table_columns

T0 = 1_767_225_600_000
# a device first seen late, names in another order per chunk of pyarrow's parse
ROWS: list[Row] = [
    (f"TH-{(i // 7) % 11 if i < 40_000 else 99}", T0 + i, f"m{(i * 5) % 3}", i * 0.5)
    for i in range(60_000)
]


def parsed(rows: list[Row]) -> pa.Table:
    """``rows`` through a batch zip and :meth:`BatchZip.table` (pyarrow's parse)."""
    csv = batchfile.render_csv(rows)
    m = {"batch_id": "00000001-20260101T000000Z", "serial": "GW-0001", "rows": len(rows)}
    m["sha256"] = batchfile.csv_sha256(csv)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(batchfile.CSV_NAME, csv)
        zf.writestr(batchfile.MANIFEST_NAME, repr(m).replace("'", '"'))
    with batchfile.open_batch(io.BytesIO(buf.getvalue())) as batch:
        return batch.table(batch.manifest)


def test_every_input_gives_one_table_of_the_schema() -> None:
    table = parsed(ROWS)
    assert table["device"].num_chunks > 1  # a dictionary per chunk: unified by the hub
    plain = pa.table(list(zip(*ROWS, strict=True)), names=SCHEMA.names)  # names as strings
    columns = [Columns(*map(list, zip(*ROWS[i : i + 7_000], strict=True))) for i in (0, 7_000)]
    for given, rows in ((table, ROWS), (plain, ROWS), (ROWS, ROWS), (columns, ROWS[:14_000])):
        got = readings_table(given)
        assert got.schema == SCHEMA
        assert [tuple(r.values()) for r in got.to_pylist()] == rows
    assert readings_table([]).schema == SCHEMA


def test_pairs_are_found_from_the_dictionaries() -> None:
    table = readings_table(parsed(ROWS))
    pairs, index = pairs_of(table)
    expected = list(dict.fromkeys((d, m) for d, _, m, _ in ROWS))
    assert pairs == expected
    assert index.type == pa.int32()
    assert [pairs[i] for i in index.to_pylist()] == [(d, m) for d, _, m, _ in ROWS]
    assert pairs_of(readings_table([])) == ([], pa.array([], pa.int32()))


def test_postgresql_gets_plain_strings() -> None:
    cols = list(table_columns(parsed(ROWS[:100])))
    assert [type(v) for v in (cols[0].devices[0], cols[0].metrics[0])] == [str, str]
    assert [r for c in cols for r in zip(*c, strict=True)] == ROWS[:100]
