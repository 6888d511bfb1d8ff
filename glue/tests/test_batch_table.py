"""``BatchZip.table()`` (pyarrow) against the hub's Python parse (``BatchZip.columns()`` with
the storage's name check per new series): one corpus of readings.csv files, valid and
malformed, read both ways from real zips; the same acceptance, the same rows (bit for bit)
and the same error, class and sentence."""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pytest

from fieldgate import batchfile
from fieldgate.batchfile import BatchZip
from fieldgate.hub.sqlstore import check_names

T0 = 1_767_225_600_000
HEADER = b"device,ts,metric,value\n"
ROWS = [
    (f"TH-{i % 7}", T0 + i, "rh" if i % 3 else "temperature:0.tC", i * 0.37) for i in range(300)
]
GOOD = batchfile.render_csv(ROWS)
# enough readings for several of the Python parse's chunks (about 25,000 readings each)
MANY = batchfile.render_csv(
    [(f"TH-{i % 13}", T0 + i, f"m{i % 5}", (i - 30_000) * 1.25e-3) for i in range(60_000)]
)
LINES = GOOD.splitlines(keepends=True)


def with_line(line: bytes, at: int = 100, csv: bytes = GOOD) -> bytes:
    """``csv`` with its line ``at`` (1 is the header) replaced by ``line``."""
    lines = csv.splitlines(keepends=True)
    return b"".join([*lines[: at - 1], line, *lines[at:]])


def readings(*lines: bytes) -> bytes:
    return HEADER + b"".join(lines)


def batch_zip(csv: bytes, rows: int | None = None, *, sha: str | None = None) -> bytes:
    """A batch zip of ``csv`` announcing ``rows`` readings (its line count less the header)."""
    rows = rows if rows is not None else max(1, csv.count(b"\n") - 1)
    m = {
        "batch_id": "00000001-20260101T000000Z",
        "serial": "GW-0001",
        "rows": rows,
        "sha256": sha or batchfile.csv_sha256(csv),
    }
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("readings.csv", csv)
        zf.writestr("manifest.yaml", repr(m).replace("'", '"'))
    return buf.getvalue()


def corrupted(body: bytes) -> bytes:
    """The zip with one byte of readings.csv's compressed data changed (a CRC error or a
    deflate error when it is read)."""
    start = body.index(b"readings.csv") + len("readings.csv")
    at = start + 200
    return body[:at] + bytes([body[at] ^ 0xFF]) + body[at + 1 :]


def bomb() -> bytes:
    """64 MiB of line breaks in a zip of about 64 kB."""
    csv = HEADER + b"\n" * (64 << 20)
    return batch_zip(csv, 1000, sha="0" * 64)


Outcome = tuple[str, Any]


def outcome(call: Callable[[], list[tuple[str, int, str, str]]]) -> Outcome:
    try:
        return "rows", call()
    except Exception as exc:  # the class and the sentence are what is compared
        return type(exc).__name__, str(exc)


def manifest_of(body: bytes) -> dict[str, Any]:
    with batchfile.open_batch(io.BytesIO(body)) as batch:
        return batch.manifest


def by_columns(body: bytes) -> list[tuple[str, int, str, str]]:
    """The hub's parse before pyarrow: columns(), each new (device, metric) checked as the
    storage checks it while it stores the chunks."""
    rows: list[tuple[str, int, str, str]] = []
    seen: set[tuple[str, str]] = set()
    with batchfile.open_batch(io.BytesIO(body)) as batch:
        for cols in batch.columns(batch.manifest):
            for pair in dict.fromkeys(zip(cols.devices, cols.metrics, strict=True)):
                if pair not in seen:
                    check_names(*pair)
                    seen.add(pair)
            rows += [(d, t, m, repr(v)) for d, t, m, v in zip(*cols, strict=True)]
    return rows


def by_table(body: bytes) -> list[tuple[str, int, str, str]]:
    with batchfile.open_batch(io.BytesIO(body)) as batch:
        table = batch.table(batch.manifest)
    name = pa.dictionary(pa.int32(), pa.string())  # the names dictionary-encoded, both ways
    assert table.schema == pa.schema(
        [("device", name), ("ts", pa.int64()), ("metric", name), ("value", pa.float64())]
    )
    return [(d, t, m, repr(v)) for d, t, m, v in zip(*table.to_pydict().values(), strict=True)]


CR = GOOD.replace(b"\n", b"\r")
VALID = {
    "rendered": GOOD,
    "many-chunks": MANY,
    "crlf": GOOD.replace(b"\n", b"\r\n"),
    "no-final-newline": GOOD.rstrip(b"\n"),
    "header-only": HEADER,
    "header-only-crlf": b"device,ts,metric,value\r\n",
    "header-without-newline": HEADER.rstrip(),
    "extreme-values": readings(
        b"TH-1,0,t,5e-324\n",
        b"TH-1,9007199254740991,t,-1.7976931348623157e308\n",
        b"TH-1,1,t,-0.0\n",
        b"TH-1,2,t,1E5\n",
        b"TH-1,3,t,5.\n",
        b"TH-1,4,t,.5\n",
        b"TH-1,5,t,2.4e-324\n",
        b"TH-1,6,t,0.1000000000000000055511151231257827\n",
        b"TH-1,007,t,+.5\n",
    ),
    # what only Python's int() and float() accept: read again by the Python parse
    "python-only-numbers": readings(
        b"TH-1,+5,t,1\n", b"TH-1, 6 ,t, 2 \n", b"TH-1,1_000,t,1_0.5\n", b"TH-1,\xd9\xa3,t,1\n"
    ),
    "quoted-fields": readings(b'"TH-1",5,"t",1.5\n', b'TH-1,"6",t,"2.5"\n'),
    "quoted-header": b'"device","ts",metric,value\n' + GOOD[len(HEADER) :],
    "quoted-header-only": b'"device","ts",metric,value\n',
    # lone CR line breaks (a file of them is one line to the limits: at most 1024 bytes)
    "lone-cr": b"".join(LINES[:20]).replace(b"\n", b"\r"),
}
BAD = {
    "empty": b"",
    "bad-header": b"dev,ts,metric,value\n" + GOOD[len(HEADER) :],
    "header-order": b"device,metric,ts,value\n" + GOOD[len(HEADER) :],
    "bom-header": b"\xef\xbb\xbf" + GOOD,
    "bom-first-reading": HEADER + b"\xef\xbb\xbf" + GOOD[len(HEADER) :],
    "three-fields": with_line(b"TH-1,1,t\n"),
    "five-fields": with_line(b"TH-1,1,t,1,2\n"),
    "trailing-comma": with_line(b"TH-1,1,t,1,\n"),
    "empty-line": with_line(b"\n"),
    "blank-last-line": GOOD + b"\n",
    "crlf-empty-line": with_line(b"\r\n", csv=GOOD.replace(b"\n", b"\r\n")),
    "ts-float": with_line(b"TH-1,1.5,t,1\n"),
    "ts-text": with_line(b"TH-1,notatime,t,1\n"),
    "ts-empty": with_line(b"TH-1,,t,1\n"),
    "ts-negative": with_line(b"TH-1,-1,t,1\n"),
    "ts-2**53": with_line(b"TH-1,9007199254740992,t,1\n"),
    "ts-2**63": with_line(b"TH-1,9223372036854775808,t,1\n"),
    "value-empty": with_line(b"TH-1,1,t,\n"),
    "value-text": with_line(b"TH-1,1,t,warm\n"),
    "value-hex": with_line(b"TH-1,1,t,0x10\n"),
    "nan": with_line(b"TH-1,1,t,nan\n"),
    "inf": with_line(b"TH-1,1,t,inf\n"),
    "-Infinity": with_line(b"TH-1,1,t,-Infinity\n"),
    "1e400": with_line(b"TH-1,1,t,1e400\n"),
    "empty-device": with_line(b",1,t,1\n"),
    "empty-metric": with_line(b"TH-1,1,,1\n"),
    "device-space": with_line(b"TH 1,1,t,1\n"),
    "device-colon": with_line(b"TH:1,1,t,1\n"),
    "metric-space": with_line(b"TH-1,1,t t,1\n"),
    "metric-65": with_line(b"TH-1,1," + b"m" * 65 + b",1\n"),
    "device-nul": with_line(b"TH\x00,1,t,1\n"),
    "value-nul": with_line(b"TH-1,1,t,1\x00\n"),
    "quote-inside": with_line(b'T"H,1,t,1\n'),
    "quoted-comma": with_line(b'"TH,1",1,t,1\n'),
    "quoted-newline": with_line(b'"TH\n1",1,t,1\n'),
    "unterminated-quote": with_line(b'"TH-1,1,t,1\n'),
    "non-utf8-name": with_line(b"TH-\xff,1,t,1\n"),
    "non-utf8-value": with_line(b"TH-1,1,t,1\xff\n"),
    "latin1-name": with_line(b"TH-\xe9,1,t,1\n"),
    "bad-name-then-bad-line": with_line(
        b"TH-1,1,x,1\n", 60_000, with_line(b"TH 1,1,t,1\n", 5, MANY)
    ),
    "bad-line-then-bad-name": with_line(b"TH 1,1,t,1\n", 60_000, with_line(b"TH-1,1,x\n", 5, MANY)),
    "bad-line-late": with_line(b"TH-1,1,t,nan\n", 59_000, MANY),
}
# (body of the zip) -> the cases whose zip is not simply batch_zip(csv)
ZIPS = {
    "too-many-lines": batch_zip(GOOD, 200),
    "too-many-lines-crlf": batch_zip(GOOD.replace(b"\n", b"\r\n"), 10),
    "overlong-line": batch_zip(with_line(b"TH-1,1," + b"m" * 100_000 + b",1\n")),
    "overlong-cr-file": batch_zip(CR),
    "zip-bomb": bomb(),
    "checksum-mismatch": batch_zip(GOOD, sha="0" * 64),
    "checksum-and-bad-line": batch_zip(with_line(b"TH-1,x,t,1\n"), sha="0" * 64),
    "checksum-and-bad-name": batch_zip(with_line(b"TH 1,1,t,1\n"), sha="0" * 64),
    "checksum-and-bom": batch_zip(b"\xef\xbb\xbf" + GOOD, sha="0" * 64),
    "another-batchs-csv": batch_zip(GOOD, sha=batchfile.csv_sha256(with_line(b"TH-1,1,t,1\n"))),
    "corrupted-member": corrupted(batch_zip(MANY)),
}
CASES = {
    **{f"valid-{k}": (batch_zip(v), True) for k, v in VALID.items()},
    **{f"bad-{k}": (batch_zip(v), False) for k, v in BAD.items()},
    **{f"bad-{k}": (v, False) for k, v in ZIPS.items()},
}


@pytest.mark.parametrize(("body", "valid"), list(CASES.values()), ids=list(CASES))
def test_table_accepts_and_refuses_exactly_as_columns(body: bytes, valid: bool) -> None:
    expected = outcome(lambda: by_columns(body))
    got = outcome(lambda: by_table(body))
    assert got == expected
    assert (expected[0] == "rows") == valid, expected


@pytest.mark.parametrize(
    "csv", [GOOD, MANY, GOOD.replace(b"\n", b"\r\n"), GOOD.rstrip(b"\n"), HEADER]
)
def test_a_valid_batch_is_read_by_pyarrow_alone(
    csv: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rendered forms take pyarrow's path (no Python object per reading): the Python
    parse is not run again."""

    def again(self: BatchZip, announced: dict[str, Any]) -> None:
        raise AssertionError("parsed again by columns()")

    monkeypatch.setattr(BatchZip, "_table_of_columns", again)
    body = batch_zip(csv)
    with batchfile.open_batch(io.BytesIO(body)) as batch:
        table = batch.table(batch.manifest)
    assert table.num_rows == max(0, csv.count(b"\n") - (1 if csv.endswith(b"\n") else 0))


def test_the_corpus_covers_the_errors_it_names() -> None:
    """Each kind of refusal the hub words is among the cases (so the comparison above is
    not of a handful of header errors)."""
    errors = {outcome(lambda b=body: by_columns(b)) for body, valid in CASES.values() if not valid}
    kinds = {name for name, _ in errors}
    assert kinds >= {"BatchFileError", "ChecksumMismatch", "IngestError", "NotAZip"}
    text = " ".join(str(e) for _, e in errors)
    for words in (
        "must start with the header",
        "expected device,ts,metric,value",
        "reading out of range",
        "is not UTF-8 text",
        "holds more than the",
        "has a line longer than 1024 bytes",
        "device name",
        "metric name",
        "checksum mismatch",
        "the batch zip is corrupted",
    ):
        assert words in text, words


def test_a_gateway_imports_the_batch_code_without_pyarrow() -> None:
    """pyarrow is the hub extra's: the gateway's side of the batch file never imports it."""
    code = (
        "import sys; import fieldgate.batchfile, fieldgate.batches, fieldgate.uploader; "
        "print(sorted(m for m in sys.modules if m.startswith('pyarrow')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout == "[]\n"
