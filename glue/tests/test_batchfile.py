"""The batch file format both ends use (fieldgate.batchfile): names, CSV, manifest, zip."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import pytest

from fieldgate import batchfile
from fieldgate.batchfile import BatchFileError, ChecksumMismatch, NotAZip

T0 = 1_767_225_600_000
ROWS = [("TH-001", T0, "temperature", 21.5), ("TH-001", T0, "rh", 0.1)]


def manifest(csv_bytes: bytes, **over: Any) -> dict[str, Any]:
    m = batchfile.build_manifest(
        batch_id="00000001-20260101T000000Z",
        serial="GW-0001",
        rows=len(ROWS),
        sha256=batchfile.csv_sha256(csv_bytes),
        first_ts=ROWS[0][1],
        last_ts=ROWS[-1][1],
        mode="LIVE",
        type="readings",
        created_at=1_767_225_600_123,
        first_id=1,
        last_id=2,
    )
    m.update(over)
    return m


def test_file_name_round_trip() -> None:
    name = batchfile.file_name("GW-0001", "00000042-20261121T081513Z")
    assert name == "GW-0001-00000042-20261121T081513Z.zip"
    assert batchfile.batch_id_of(name, "GW-0001") == "00000042-20261121T081513Z"
    assert batchfile.batch_id_of(name, "GW-0002") is None
    assert batchfile.batch_id_of("GW-0001-x.zip.tmp", "GW-0001") is None


def test_csv_round_trip_keeps_every_double() -> None:
    text = batchfile.render_csv(ROWS).decode()
    assert text.splitlines()[0] == "device,ts,metric,value"
    assert list(batchfile.parse_csv(text)) == ROWS


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("dev,ts,metric,value\n", "must start with the header device,ts,metric,value"),
        ("", "must start with the header"),
        ("device,ts,metric,value\nA,1,x\n", "line 2: expected device,ts,metric,value"),
        ("device,ts,metric,value\nA,1.5,x,1\n", "line 2: expected"),
        ("device,ts,metric,value\nA,-1,x,1\n", "line 2: reading out of range"),
        ("device,ts,metric,value\nA,1,x,nan\n", "line 2: reading out of range"),
        ("device,ts,metric,value\n,1,x,1\n", "line 2: reading out of range"),
    ],
)
def test_parse_csv_names_the_bad_line(text: str, reason: str) -> None:
    with pytest.raises(BatchFileError, match=reason):
        list(batchfile.parse_csv(text))


@pytest.mark.parametrize("chunk_chars", [1, 200, 1 << 20])
def test_columns_in_chunks_are_the_rows_of_the_file(chunk_chars: int) -> None:
    rows = [(f"TH-{i % 7}", T0 + i, "rh" if i % 2 else "t", i * 0.5) for i in range(500)]
    # two values whose sum overflows (each is finite): the chunk is checked row by row
    rows[100:102] = [("TH-1", T0, "big", 1.7e308), ("TH-1", T0 + 1, "big", 1.7e308)]
    rows[300] = ("TH,1", T0, 'x"y', 1.0)  # quoted fields: parsed row by row from here on
    text = batchfile.render_csv(rows).decode()
    for form in (text, text.replace("\n", "\r\n"), text.rstrip("\n")):
        chunks = list(batchfile.parse_csv_columns(io.StringIO(form, newline=""), chunk_chars))
        assert [r for c in chunks for r in zip(*c, strict=True)] == rows
        assert list(batchfile.parse_csv(form)) == rows


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("TH-1,1.5,t,1\n", "expected device,ts,metric,value"),
        ("TH-1,1,t\n", "expected device,ts,metric,value"),
        ("TH-1,1,t,1,2\n", "expected device,ts,metric,value"),
        ("\n", "expected device,ts,metric,value"),
        ("TH-1,1,t,inf\n", "reading out of range"),
        ("TH-1,9007199254740992,t,1\n", "reading out of range"),
        (",1,t,1\n", "reading out of range"),
        ("TH-1,1,,1\n", "reading out of range"),
    ],
)
@pytest.mark.parametrize("chunk_chars", [256, 1 << 20])  # many chunks; one
def test_a_bad_line_is_named_in_whichever_chunk_it_is(
    bad: str, reason: str, chunk_chars: int
) -> None:
    lines = batchfile.render_csv([("TH-1", T0 + i, "t", 1.0) for i in range(1000)]).decode()
    text = "".join([*lines.splitlines(keepends=True)[:700], bad, *lines.splitlines(True)[701:]])
    with pytest.raises(BatchFileError, match=f"line 701: {reason}"):
        list(batchfile.parse_csv_columns(io.StringIO(text, newline=""), chunk_chars))


def test_decode_csv_refuses_non_utf8() -> None:
    with pytest.raises(BatchFileError, match="not UTF-8"):
        batchfile.decode_csv(b"\xff\xfe")


def test_manifest_keys_in_contract_order() -> None:
    m = manifest(batchfile.render_csv(ROWS))
    assert list(m)[:8] == [
        "batch_id", "serial", "rows", "sha256", "first_ts", "last_ts", "mode", "type"
    ]  # fmt: skip
    assert m["created_at"] == "2026-01-01T00:00:00.123000Z"
    assert batchfile.check_manifest(dict(m, mode="TEST")) is not None
    # what a gateway writes is exactly what the hub accepts: a key added to one side only
    # would get every batch refused
    assert set(m) == batchfile.MANIFEST_KEYS
    with pytest.raises(BatchFileError, match="manifest: unknown key 'note'"):
        batchfile.check_manifest(dict(m, note="x"))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"batch_id": None}, "manifest: batch_id must be a batch id"),
        ({"serial": "GW:1"}, "manifest: serial must be a gateway serial"),
        ({"rows": 0}, "manifest: rows must be an integer from 1 to 10000000"),
        ({"rows": True}, "manifest: rows must be an integer"),
        ({"sha256": "ABC"}, "manifest: sha256 must be 64 lowercase hex digits"),
        ({"first_ts": "x"}, "manifest: first_ts must be an integer"),
        ({"mode": "PASS"}, "manifest: mode must be LIVE or TEST"),
        ({"type": ""}, "manifest: type must be a name"),
        ({"type": "a\x00b"}, "manifest: type must be a name"),
        ({"serial": "GW-1\n"}, "manifest: serial must be a gateway serial"),
    ],
)
def test_check_manifest_names_the_field(change: dict[str, Any], reason: str) -> None:
    with pytest.raises(BatchFileError, match=reason) as info:
        batchfile.check_manifest(manifest(b"", **change))
    assert info.value.status == 422


def test_check_manifest_names_a_missing_field() -> None:
    m = manifest(b"")
    del m["type"]
    with pytest.raises(BatchFileError, match="manifest: type is missing"):
        batchfile.check_manifest(m)


def test_zip_written_durably_and_read_back(tmp_path: Path) -> None:
    csv_bytes = batchfile.render_csv(ROWS)
    m = manifest(csv_bytes)
    path = tmp_path / batchfile.file_name("GW-0001", m["batch_id"])
    calls: list[int] = []
    batchfile.write_zip(path, csv_bytes, m, midway=lambda: calls.append(1))
    assert calls == [1]
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    data, inner = batchfile.read_zip(path)
    assert (data, inner) == (csv_bytes, m)
    assert batchfile.read_zip(path.read_bytes()) == (data, inner)
    batchfile.check_contents(data, inner, m)


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_read_zip_refusals() -> None:
    good = _zip({"readings.csv": b"x", "manifest.yaml": b"a: 1\n"})
    with pytest.raises(NotAZip) as info:
        batchfile.read_zip(good[: len(good) // 2])
    assert info.value.status == 400
    with pytest.raises(BatchFileError, match=r"has no manifest\.yaml"):
        batchfile.read_zip(_zip({"readings.csv": b"x"}))
    with pytest.raises(BatchFileError, match="not a mapping"):
        batchfile.read_zip(_zip({"readings.csv": b"x", "manifest.yaml": b"- 1\n"}))
    with pytest.raises(BatchFileError, match="not valid YAML"):
        batchfile.read_zip(_zip({"readings.csv": b"x", "manifest.yaml": b"a: [\n"}))


def test_check_contents_refusals() -> None:
    csv_bytes = batchfile.render_csv(ROWS)
    m = manifest(csv_bytes)
    with pytest.raises(ChecksumMismatch, match=r"checksum mismatch: readings\.csv has sha256") as e:
        batchfile.check_contents(csv_bytes + b"X,1,y,2\n", m, m)
    assert e.value.status == 409
    with pytest.raises(BatchFileError, match=r"manifest\.yaml says rows 3 but the batch was"):
        batchfile.check_contents(csv_bytes, dict(m, rows=3), m)
