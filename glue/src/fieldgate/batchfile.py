"""The batch file: the one format a gateway and the hub exchange (docs/contract.md §6).

A batch is a zip named ``<serial>-<batch_id>.zip`` holding ``readings.csv``
(``device,ts,metric,value``, values in Python's round-trip float notation) and
``manifest.yaml`` (``batch_id``, ``serial``, ``rows``, ``sha256`` of the CSV, ``first_ts``,
``last_ts``, ``mode``, ``type``, then ``created_at``, ``first_id``, ``last_id``,
``fieldgate_version``). The gateway writes it (:mod:`fieldgate.batches`), the hub reads and
checks it (:mod:`fieldgate.hub.app`): both sides use this module, so they cannot drift.

Checks raise :class:`BatchFileError` with one sentence and the HTTP status the hub answers
it with (400 not a zip, 409 checksum mismatch, 422 anything else not acceptable).
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import itertools
import math
import re
import struct
import sys
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NamedTuple

import yaml

from fieldgate import __version__, fsutil
from fieldgate.names import ALLOWED, BATCH_ID_RE, is_name

if TYPE_CHECKING:
    import pyarrow as pa

CSV_NAME = "readings.csv"
MANIFEST_NAME = "manifest.yaml"
CSV_HEADER = ("device", "ts", "metric", "value")
SUFFIX = ".zip"
#: Deflate level of batch zips: level 1 is several times faster than the default 6 and
#: CSV of readings still shrinks to about a quarter.
ZIP_LEVEL = 1
#: The most readings one batch may announce.
MAX_ROWS = 10_000_000
#: Readings the hub accepts: ts in [0, 2**53) ms, a finite value.
MAX_TS = 2**53
MAX_FLOAT = 1.7976931348623157e308
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
#: Modes a sent batch may carry (PASS batches are never sent).
SENT_MODES = ("LIVE", "TEST")
#: The keys a manifest may carry (:func:`build_manifest`'s); any other key is refused.
MANIFEST_KEYS = frozenset(
    (
        "batch_id",
        "serial",
        "rows",
        "sha256",
        "first_ts",
        "last_ts",
        "mode",
        "type",
        "created_at",
        "first_id",
        "last_id",
        "fieldgate_version",
    )
)

# What a batch zip may hold: each limit is checked before the work it would cost, from
# what was read so far, never from the sizes a zip's headers claim (docs/hub.md, limits).
#: The zip's central directory (a batch zip's is about 200 bytes: two members).
MAX_DIRECTORY_BYTES = 64 * 1024
#: Members of a batch zip (it has two).
MAX_MEMBERS = 16
#: manifest.yaml, decompressed (a gateway's is about 400 bytes).
MAX_MANIFEST_BYTES = 64 * 1024
#: One line of readings.csv, decompressed: two names of at most 64 characters, a ts, a value.
MAX_LINE_BYTES = 1024

Row = tuple[str, int, str, float]
"""(device, ts epoch ms, metric, value)"""


class BatchFileError(Exception):
    """A batch (manifest, zip or CSV) that is not acceptable; ``status`` for the hub."""

    status = 422


class NotAZip(BatchFileError):
    """The bytes are not a (complete) zip archive."""

    status = 400


class TooLarge(BatchFileError):
    """A part of the batch is larger than the hub accepts (:data:`MAX_MANIFEST_BYTES`…)."""

    status = 413


class ChecksumMismatch(BatchFileError):
    """readings.csv does not have the announced SHA-256."""

    status = 409


# ---- names ---------------------------------------------------------------------------------


def file_name(serial: str, batch_id: str) -> str:
    """``<serial>-<batch_id>.zip``."""
    return f"{serial}-{batch_id}{SUFFIX}"


def batch_id_of(name: str, serial: str) -> str | None:
    """The batch id in a file name of ``serial``'s, or None for any other name."""
    prefix = f"{serial}-"
    if not (name.startswith(prefix) and name.endswith(SUFFIX)):
        return None
    return name[len(prefix) : -len(SUFFIX)]


# ---- readings.csv --------------------------------------------------------------------------

_CSV_SPECIAL = frozenset(',"\r\n')


def render_csv(rows: Iterable[Row]) -> bytes:
    """The CSV of readings; deterministic, so a regenerated batch has the same sha256.

    Values use Python's shortest round-trip float repr, so the hub stores exactly the
    gateway's double. The output is what ``csv.writer`` writes; names without a comma,
    quote or line break (all of them, in practice) take a faster path that formats lines
    directly.
    """
    rows = list(rows)
    names = {r[0] for r in rows} | {r[2] for r in rows}
    if any(_CSV_SPECIAL.intersection(name) or not name for name in names):
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(CSV_HEADER)
        w.writerows(rows)
        return buf.getvalue().encode("utf-8")
    lines = [f"{d},{ts},{m},{v!r}\n" for d, ts, m, v in rows]
    return (",".join(CSV_HEADER) + "\n" + "".join(lines)).encode("utf-8")


def csv_sha256(csv_bytes: bytes) -> str:
    """The ``sha256`` a manifest records for its readings.csv."""
    return hashlib.sha256(csv_bytes).hexdigest()


def decode_csv(csv_bytes: bytes) -> str:
    """readings.csv as text (it must be UTF-8)."""
    try:
        return csv_bytes.decode("utf-8")
    except UnicodeDecodeError:
        raise BatchFileError("readings.csv is not UTF-8 text") from None


def parse_csv(text: str) -> Iterator[Row]:
    """The readings of ``readings.csv``, lazily; BatchFileError naming the line.

    A reading needs a device and a metric, an integer ts in [0, 2**53) and a finite value.
    """
    return parse_csv_lines(io.StringIO(text, newline=""))


def parse_csv_lines(lines: Iterable[str]) -> Iterator[Row]:
    """:func:`parse_csv` over the lines of readings.csv as they come (a stream)."""
    for cols in parse_csv_columns(lines):
        yield from zip(*cols, strict=True)


class Columns(NamedTuple):
    """A run of readings as four columns (row i is ``devices[i], ts[i], metrics[i],
    values[i]``): how the hub parses and stores them without a Python object per row."""

    devices: Sequence[str]
    ts: Sequence[int]
    metrics: Sequence[str]
    values: Sequence[float]


_HEADER_LINE = ",".join(CSV_HEADER)
#: How much of readings.csv (characters, about 25,000 readings) is parsed at a time.
CHUNK_CHARS = 1 << 20


def parse_csv_columns(lines: Iterable[str], chunk_chars: int = CHUNK_CHARS) -> Iterator[Columns]:
    """:func:`parse_csv` as :class:`Columns` of about ``chunk_chars`` characters each, over
    the lines of readings.csv as they come (a stream, or any iterable of lines).

    Each chunk is checked as a whole: its lines split and converted by ``str`` and
    ``map`` (no Python code per reading), the range checks as ``min``/``max``/``sum`` of a
    column, the names once per distinct name. A chunk that does not pass (or that has a
    quoted field) is parsed again reading by reading with :mod:`csv`, which names the
    first bad line exactly as before.
    """
    stream = iter(lines) if not isinstance(lines, io.TextIOBase) else lines
    first = next(stream, None)
    if first is None or first.rstrip("\r\n") != _HEADER_LINE:
        header = next(csv.reader([first]), None) if first is not None else None
        if header is None or tuple(header) != CSV_HEADER:
            raise BatchFileError(f"readings.csv must start with the header {','.join(CSV_HEADER)}")
    line = 1  # lines read so far
    while chunk := _next_lines(stream, chunk_chars):
        text = "".join(chunk)
        cols = None if '"' in text else _fast_columns(text, chunk)
        if cols is None:
            if '"' in text:  # a quoted field may span lines: the slow path from here on
                yield from _slow_columns(itertools.chain(chunk, stream), line)
                return
            cols = next(_slow_columns(chunk, line, whole=True))
        line += len(chunk)
        yield cols
        del chunk, text, cols  # the next chunk reuses their memory while it is cached


def _next_lines(stream: Iterator[str], chars: int) -> list[str]:
    if isinstance(stream, io.TextIOBase):
        return stream.readlines(chars)
    return list(itertools.islice(stream, max(1, chars // 40)))


def _fast_columns(text: str, chunk: list[str]) -> Columns | None:
    """The chunk's readings, or None when any line needs a closer look."""
    if "\r" in text or set(map(str.count, chunk, itertools.repeat(","))) != {3}:
        return None
    fields = text.replace("\n", ",").split(",")
    if text.endswith("\n"):
        fields.pop()
    devices, metrics = fields[0::4], fields[2::4]
    try:
        ts = list(map(int, fields[1::4]))
        values = list(map(float, fields[3::4]))
    except ValueError:
        return None
    if (
        len(values) != len(chunk)
        or min(ts) < 0
        or max(ts) >= MAX_TS
        or not math.isfinite(sum(values))  # NaN and inf propagate (a sum that overflows
        or "" in set(devices)  # is checked again, reading by reading)
        or "" in set(metrics)
    ):
        return None
    return Columns(devices, ts, metrics, values)


def _slow_columns(lines: Iterable[str], line: int, *, whole: bool = False) -> Iterator[Columns]:
    """Readings checked one by one (BatchFileError naming the line), in chunks of columns;
    ``line`` is how many lines precede ``lines``; ``whole``: all of them in one chunk."""
    reader = csv.reader(lines)
    max_ts, max_float = MAX_TS, MAX_FLOAT  # locals: this loop runs for every reading
    rows: list[Row] = []
    size = sys.maxsize if whole else CHUNK_CHARS // 40
    try:
        for device, ts_s, metric, value_s in reader:
            ts = int(ts_s)
            value = float(value_s)
            if not (device and metric and 0 <= ts < max_ts and -max_float <= value <= max_float):
                raise BatchFileError(
                    f"readings.csv line {line + reader.line_num}: reading out of range "
                    f"({device!r:.40}, {ts}, {metric!r:.40}, {value})"
                )
            rows.append((device, ts, metric, value))
            if len(rows) >= size:
                yield Columns(*zip(*rows, strict=True))
                rows = []
    except UnicodeDecodeError:
        raise  # the stream's bytes, not a value: the caller names it
    except ValueError:
        raise BatchFileError(
            f"readings.csv line {line + reader.line_num}: expected device,ts,metric,value with "
            "an integer ts and a numeric value"
        ) from None
    if rows or whole:
        yield Columns(*zip(*rows, strict=True)) if rows else Columns([], [], [], [])


def columns_of(rows: Iterable[Row] | Iterable[Columns], size: int = 25_000) -> Iterator[Columns]:
    """Readings as :class:`Columns`: given as columns already, or rows gathered ``size`` at
    a time (no checks: those are the parser's)."""
    it = iter(rows)
    first = next(it, None)
    if first is None:
        return
    if isinstance(first, Columns):
        yield first
        yield from it  # type: ignore[misc]
        return
    it = itertools.chain([first], it)
    while batch := list(itertools.islice(it, size)):
        yield Columns(*zip(*batch, strict=True))


# ---- manifest.yaml -------------------------------------------------------------------------


def _iso_micro(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def build_manifest(
    *,
    batch_id: str,
    serial: str,
    rows: int,
    sha256: str,
    first_ts: int | None,
    last_ts: int | None,
    mode: str,
    type: str,
    created_at: int,
    first_id: int | None,
    last_id: int | None,
) -> dict[str, Any]:
    """The manifest sent to the hub and stored in the zip (the contract's keys first)."""
    return {
        "batch_id": batch_id,
        "serial": serial,
        "rows": rows,
        "sha256": sha256,
        "first_ts": first_ts,
        "last_ts": last_ts,
        "mode": mode,
        "type": type,
        "created_at": _iso_micro(created_at),
        "first_id": first_id,
        "last_id": last_id,
        "fieldgate_version": __version__,
    }


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_manifest(m: Any) -> dict[str, Any]:
    """A manifest as a gateway announces it, validated; BatchFileError names the field."""
    if not isinstance(m, dict):
        raise BatchFileError("the manifest must be a JSON object")
    unknown = sorted(str(k) for k in m if k not in MANIFEST_KEYS)
    if unknown:
        raise BatchFileError(
            f"manifest: unknown key {unknown[0]!r:.70}"
            + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
        )
    rows = m.get("rows")
    checks = (
        (
            "batch_id",
            isinstance(m.get("batch_id"), str) and bool(BATCH_ID_RE.fullmatch(m["batch_id"])),
            f"a batch id ({ALLOWED['batch_id']})",
        ),
        ("serial", is_name(m.get("serial")), "a gateway serial"),
        ("rows", _is_int(rows) and 1 <= rows <= MAX_ROWS, f"an integer from 1 to {MAX_ROWS}"),
        (
            "sha256",
            isinstance(m.get("sha256"), str) and bool(SHA256_RE.fullmatch(m["sha256"])),
            "64 lowercase hex digits",
        ),
        (
            "first_ts",
            m.get("first_ts") is None or _is_int(m["first_ts"]),
            "an integer (epoch ms) or null",
        ),
        (
            "last_ts",
            m.get("last_ts") is None or _is_int(m["last_ts"]),
            "an integer (epoch ms) or null",
        ),
        ("mode", m.get("mode") in SENT_MODES, "LIVE or TEST (PASS batches are not sent)"),
        ("type", is_name(m.get("type")), f"a name ({ALLOWED['name']})"),
    )
    for key, ok, what in checks:
        if key not in m:
            raise BatchFileError(f"manifest: {key} is missing")
        if not ok:
            raise BatchFileError(f"manifest: {key} must be {what}, got {m[key]!r:.60}")
    return m


#: The manifest keys the zip's manifest.yaml must repeat exactly as announced.
PINNED_KEYS = ("batch_id", "serial", "rows", "sha256")


def check_contents(csv_bytes: bytes, inner: dict[str, Any], announced: dict[str, Any]) -> None:
    """The zip's CSV has the announced sha256 and its manifest.yaml names the same batch."""
    check_sha256(csv_sha256(csv_bytes), announced)
    check_inner_manifest(inner, announced)


def check_sha256(sha: str, announced: dict[str, Any]) -> None:
    """readings.csv, whose SHA-256 is ``sha``, is the announced one (ChecksumMismatch)."""
    if sha != announced["sha256"]:
        raise ChecksumMismatch(
            f"checksum mismatch: readings.csv has sha256 {sha}, the manifest says "
            f"{announced['sha256']}"
        )


def check_inner_manifest(inner: dict[str, Any], announced: dict[str, Any]) -> None:
    """The zip's manifest.yaml names the announced batch (:data:`PINNED_KEYS`)."""
    for key in PINNED_KEYS:
        if inner.get(key) != announced[key]:
            raise BatchFileError(
                f"manifest.yaml says {key} {inner.get(key)!r:.70} but the batch was "
                f"announced with {announced[key]!r}"
            )


# ---- the zip -------------------------------------------------------------------------------


def write_zip(
    path: Path,
    csv_bytes: bytes,
    manifest: dict[str, Any],
    *,
    tmp: Path | None = None,
    midway: Callable[[], None] | None = None,
) -> None:
    """Write the batch zip to ``path`` durably (temporary name, fsync, rename, fsync dir).

    ``midway`` runs when half the CSV is on disk (the crash tests' seam).
    """
    with (
        fsutil.atomic_file(path, tmp=tmp) as raw,
        zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=ZIP_LEVEL) as zf,
    ):
        half = len(csv_bytes) // 2
        with zf.open(CSV_NAME, "w", force_zip64=True) as member:
            member.write(csv_bytes[:half])
            raw.flush()
            if midway is not None:
                midway()
            member.write(csv_bytes[half:])
        zf.writestr(MANIFEST_NAME, yaml.safe_dump(manifest, sort_keys=False, allow_unicode=True))


def read_zip(source: Path | bytes) -> tuple[bytes, dict[str, Any]]:
    """readings.csv and the parsed manifest.yaml of a batch zip (a file or its bytes).

    NotAZip for a truncated or corrupted archive, BatchFileError for a zip without the two
    members or with a manifest that is not a YAML mapping; OSError reading a file.
    """
    with open_batch(io.BytesIO(source) if isinstance(source, bytes) else source) as batch:
        try:
            csv_bytes = batch.zf.read(CSV_NAME)
        except _ZIP_ERRORS as exc:
            raise NotAZip(f"the batch zip is corrupted ({exc})") from None
        return csv_bytes, batch.manifest


#: What zipfile raises for an archive damaged inside a member.
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError)


class _Hashing(io.RawIOBase):
    """A member of a zip read through SHA-256 (and counted) on its way to the CSV parser.

    It refuses, as the bytes are decompressed, more than ``max_lines`` lines and a line
    that runs on past :data:`MAX_LINE_BYTES` across a read (a shorter read holds at most
    one read's bytes): what it passes on is bounded by ``max_lines`` and the read size,
    whatever the zip claims, so a zip bomb is refused after its first read, not after its
    4 GiB. The checks cost two searches per read, not per row; the name rules refuse long
    names inside a read (:func:`fieldgate.hub.sqlstore.check_names`)."""

    def __init__(self, member: IO[bytes], max_lines: int) -> None:
        self.member = member
        self.sha = hashlib.sha256()
        self.size = 0
        self.max_lines = max_lines
        self.lines = 0
        self.open_line = 0  # bytes since the last line break

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        data = self.member.read(len(buf))
        n = len(data)
        last = data.rfind(b"\n")
        if last < 0:
            self.open_line += n
            longest = self.open_line
        else:
            self.lines += data.count(b"\n")
            longest = max(self.open_line + data.find(b"\n"), n - last - 1)
            self.open_line = n - last - 1
        if longest > MAX_LINE_BYTES:
            raise BatchFileError(
                f"readings.csv has a line longer than {MAX_LINE_BYTES} bytes "
                f"(line {self.lines + 1})"
            )
        if self.lines > self.max_lines:
            raise BatchFileError(
                f"readings.csv holds more than the {self.max_lines - 1} readings the "
                "manifest announces"
            )
        buf[:n] = data
        self.sha.update(data)
        self.size += n
        return n

    def drain(self) -> str:
        """Read what is left (under the same limits); the SHA-256 of the whole member."""
        buf = bytearray(1 << 16)
        while self.readinto(buf):
            pass
        return self.sha.hexdigest()


class BatchZip:
    """An open batch zip: its manifest.yaml is read; readings.csv is streamed on demand."""

    def __init__(self, zf: zipfile.ZipFile, manifest: dict[str, Any]) -> None:
        self.zf = zf
        self.manifest = manifest

    def readings(self, announced: dict[str, Any]) -> Iterator[Row]:
        """The rows of readings.csv: :meth:`columns` row by row."""
        for cols in self.columns(announced):
            yield from zip(*cols, strict=True)

    def columns(self, announced: dict[str, Any]) -> Iterator[Columns]:
        """The readings of readings.csv as :class:`Columns`, parsed as they are
        decompressed (the file is never whole in memory). Its SHA-256 is checked against
        ``announced`` when the last row has been read (ChecksumMismatch): a caller storing
        rows in one transaction rolls back. A row or decoding error in a file that is not
        the announced one is reported as the checksum mismatch it is."""
        try:
            member = self.zf.open(CSV_NAME)
        except _ZIP_ERRORS as exc:
            raise NotAZip(f"the batch zip is corrupted ({exc})") from None
        raw = _Hashing(member, announced["rows"] + 1)
        text = io.TextIOWrapper(io.BufferedReader(raw, 1 << 16), encoding="utf-8", newline="")
        try:
            yield from parse_csv_columns(text)
        except (BatchFileError, UnicodeDecodeError) as exc:
            try:
                sha = raw.drain()
            except _ZIP_ERRORS as zexc:
                raise NotAZip(f"the batch zip is corrupted ({zexc})") from None
            check_sha256(sha, announced)
            if isinstance(exc, UnicodeDecodeError):
                raise BatchFileError("readings.csv is not UTF-8 text") from None
            raise
        except _ZIP_ERRORS as exc:
            raise NotAZip(f"the batch zip is corrupted ({exc})") from None
        finally:
            member.close()
        check_sha256(raw.sha.hexdigest(), announced)

    def table(self, announced: dict[str, Any]) -> pa.Table:
        """The readings of readings.csv as a pyarrow Table of :func:`arrow_schema`
        (``device`` and ``metric`` dictionary-encoded strings, ``ts`` int64, ``value``
        float64, in file order; chunked as pyarrow read it, a dictionary per chunk),
        parsed as it is decompressed through the same limits as :meth:`columns`, its
        SHA-256 checked against ``announced`` (ChecksumMismatch), and every name checked
        by the hub's rules (IngestError, :func:`fieldgate.hub.sqlstore.check_names`).

        pyarrow parses it strictly (the exact header, no quoting, no empty lines, the
        column types given, no null values); the ranges are checked on whole columns and the
        names once per distinct name. Anything it refuses (or a name the hub refuses) is
        parsed again from the zip by :meth:`columns`, as the hub does it with that, so an
        error is the same sentence naming the same line, and a file that only the Python
        parser accepts (a quoted field, a lone CR line break, ``+5``) gives the same rows.
        Needs pyarrow (the ``hub`` extra)."""
        import pyarrow as pa

        try:
            member = self.zf.open(CSV_NAME)
        except _ZIP_ERRORS as exc:
            raise NotAZip(f"the batch zip is corrupted ({exc})") from None
        raw = _Hashing(member, announced["rows"] + 1)
        try:
            table = _arrow_table(io.BufferedReader(raw, 1 << 16))
            sha = raw.drain() if table is not None else ""
        except (BatchFileError, pa.ArrowException, *_ZIP_ERRORS):  # UnicodeDecodeError too
            table = None  # (pyarrow passes on the exceptions of the stream's reads)
        finally:
            member.close()
        if table is None:
            return self._table_of_columns(announced)
        check_sha256(sha, announced)
        return table

    def _table_of_columns(self, announced: dict[str, Any]) -> pa.Table:
        """:meth:`table` by :meth:`columns` (a Python object per reading, one chunk at a
        time), the names checked as the hub checks them while it stores the chunks: the
        error the hub gives."""
        import pyarrow as pa

        from fieldgate.hub.sqlstore import check_names

        schema = arrow_schema()
        parts: list[pa.RecordBatch] = []
        checked: set[tuple[str, str]] = set()
        for cols in self.columns(announced):
            for pair in dict.fromkeys(zip(cols.devices, cols.metrics, strict=True)):
                if pair not in checked:
                    check_names(*pair)
                    checked.add(pair)
            parts.append(pa.RecordBatch.from_arrays(list(cols), schema=schema))
        return pa.Table.from_batches(parts, schema=schema)


#: The header line pyarrow's parse accepts (anything else the Python parse judges).
_HEADER_LINES = tuple(_HEADER_LINE.encode() + end for end in (b"\n", b"\r\n", b""))


def arrow_schema() -> pa.Schema:
    """readings.csv's columns as a pyarrow schema: what :meth:`BatchZip.table` gives (and
    :data:`fieldgate.hub.table.SCHEMA`, the hub's Table of readings). The names are
    dictionary-encoded (int32 indices into the distinct names): a batch holds few of
    them, and pyarrow's parse gives them so without a string per reading."""
    import pyarrow as pa

    name = pa.dictionary(pa.int32(), pa.string())
    types = (name, pa.int64(), name, pa.float64())
    return pa.schema(list(zip(CSV_HEADER, types, strict=True)))


def _arrow_table(stream: io.BufferedReader) -> pa.Table | None:
    """readings.csv parsed by pyarrow with the checks of :func:`parse_csv_columns` and the
    hub's name rules, on whole columns and distinct names; None for anything it does not
    accept as exactly what the Python parse would give (which then judges it)."""
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    from fieldgate.hub.sqlstore import check_device, check_metric
    from fieldgate.hub.storage import IngestError

    if stream.readline(MAX_LINE_BYTES + 2) not in _HEADER_LINES:
        return None
    ahead = stream.peek(1)
    schema = arrow_schema()
    if not ahead:  # no readings
        return schema.empty_table()
    if ahead[0] == 0xEF:  # pyarrow drops a UTF-8 BOM here; Python keeps it in the name
        return None
    table = pacsv.read_csv(
        stream,
        read_options=pacsv.ReadOptions(column_names=schema.names, use_threads=False),
        parse_options=pacsv.ParseOptions(
            quote_char=False, escape_char=False, ignore_empty_lines=False
        ),
        convert_options=pacsv.ConvertOptions(
            column_types=schema,
            null_values=[],
            true_values=[],
            false_values=[],
            strings_can_be_null=False,
        ),
    )
    if any(column.null_count for column in table.columns):
        return None
    if table.num_rows:
        ts = pc.min_max(table["ts"])
        if ts["min"].as_py() < 0 or ts["max"].as_py() >= MAX_TS:
            return None
        if not pc.all(pc.is_finite(table["value"])).as_py():
            return None
    try:  # unique() of a dictionary column: the names some reading has, in file order
        for check, column in ((check_device, "device"), (check_metric, "metric")):
            for name in pc.unique(table[column]).to_pylist():
                check(name)
    except IngestError:
        return None
    return table


class _ManifestLoader(yaml.SafeLoader):
    """YAML's safe loader without anchors and aliases: a manifest has none, and an alias
    bomb of a few hundred bytes costs seconds of CPU per nesting level to expand."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise BatchFileError("manifest.yaml uses YAML anchors or aliases; it may not")
        return super().compose_node(parent, index)


def load_manifest(text: bytes) -> Any:
    """manifest.yaml parsed without anchors and aliases (BatchFileError if it has any)."""
    try:
        return yaml.load(text, Loader=_ManifestLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError:
        raise BatchFileError("manifest.yaml is not valid YAML") from None


_EOCD = struct.Struct("<4s4xHHIIH")  # end of central directory: entries, directory size
_ZIP64_LOCATOR = struct.Struct("<4s4xQ4x")
_ZIP64_EOCD = struct.Struct("<4s28xQQQ")


def check_directory(fp: IO[bytes]) -> None:
    """Refuse a zip whose central directory is larger than :data:`MAX_DIRECTORY_BYTES` or
    lists more than :data:`MAX_MEMBERS` members, from its end record, before zipfile reads
    the directory into memory (a 256 MB zip of empty members would cost gigabytes)."""
    fp.seek(0, io.SEEK_END)
    size = fp.tell()
    tail_len = min(size, _EOCD.size + 0xFFFF)
    fp.seek(size - tail_len)
    tail = fp.read(tail_len)
    fp.seek(0)
    at = len(tail) - _EOCD.size  # zipfile's order: no comment first, then the last one
    if at < 0 or tail[at : at + 4] != b"PK\x05\x06":
        at = tail.rfind(b"PK\x05\x06", 0, max(0, len(tail) - _EOCD.size))
    if at < 0:
        return  # not a zip: zipfile says so
    _, _, entries, dir_size, _, _ = _EOCD.unpack_from(tail, at)
    if at >= _ZIP64_LOCATOR.size:
        sig, offset = _ZIP64_LOCATOR.unpack_from(tail, at - _ZIP64_LOCATOR.size)
        if sig == b"PK\x06\x07" and offset < size:
            fp.seek(offset)
            record = fp.read(_ZIP64_EOCD.size)
            fp.seek(0)
            if len(record) == _ZIP64_EOCD.size and record[:4] == b"PK\x06\x06":
                _, entries, dir_size, _ = _ZIP64_EOCD.unpack(record)
    if dir_size > MAX_DIRECTORY_BYTES or entries > MAX_MEMBERS:
        raise TooLarge(
            f"the batch zip lists {entries} members in {dir_size} bytes; a batch has at most "
            f"{MAX_MEMBERS} in {MAX_DIRECTORY_BYTES}"
        )


@contextmanager
def open_batch(source: Path | IO[bytes]) -> Iterator[BatchZip]:
    """A batch zip (a file, or a seekable binary file object such as a spooled upload)
    with its manifest.yaml read and checked to be a mapping.

    NotAZip for a truncated or corrupted archive, TooLarge for a zip directory or a
    manifest.yaml larger than the limits, BatchFileError for a zip without the two members
    or with a manifest that is not a YAML mapping without anchors; OSError reading a file.
    """
    try:
        zf = zipfile.ZipFile(source) if isinstance(source, Path) else _open_zip(source)
    except zipfile.BadZipFile:
        raise NotAZip("the upload is not a zip archive (truncated or corrupted)") from None
    with zf:
        names = set(zf.namelist())
        if len(zf.infolist()) > MAX_MEMBERS:
            raise TooLarge(f"the batch zip has more than {MAX_MEMBERS} members")
        for name in (CSV_NAME, MANIFEST_NAME):
            if name not in names:
                raise BatchFileError(f"the batch zip has no {name}")
        try:
            with zf.open(MANIFEST_NAME) as member:
                manifest_text = member.read(MAX_MANIFEST_BYTES + 1)
        except _ZIP_ERRORS as exc:
            raise NotAZip(f"the batch zip is corrupted ({exc})") from None
        if len(manifest_text) > MAX_MANIFEST_BYTES:
            raise TooLarge(f"manifest.yaml is larger than {MAX_MANIFEST_BYTES} bytes")
        inner = load_manifest(manifest_text)
        if not isinstance(inner, dict):
            raise BatchFileError("manifest.yaml is not a mapping")
        yield BatchZip(zf, inner)


def _open_zip(fp: IO[bytes]) -> zipfile.ZipFile:
    check_directory(fp)
    return zipfile.ZipFile(fp)
