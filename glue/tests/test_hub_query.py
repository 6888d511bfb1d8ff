"""The read API on both backends (docs/contract.md §11): raw readings streamed as JSON or
CSV, statistics per time bucket computed by the database, the extent, RFC 3339 and epoch
times, and a clear 400 for every bad parameter. JSON answers are validated against the
hub's own OpenAPI document."""

from __future__ import annotations

import csv
import io
import statistics
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
import requests
from support import Hub, make_user

from fieldgate.hub.backends import open_storage
from fieldgate.hub.openapi import document
from fieldgate.hub.query import MAX_BUCKETS

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
SERIAL = "GW-Q"
#: One reading every 10 s for a day, and a second metric, and a device with odd names.
N = 8640


def values(i: int) -> float:
    return round(20 + ((i * 37) % 101) / 7, 6)


@pytest.fixture
def data_hub(hub: Hub) -> Iterator[tuple[Hub, tuple[str, str]]]:
    st = open_storage(hub.db)
    try:
        rows = [("TH-1", T0 + i * 10_000, "temperature", values(i)) for i in range(N)]
        rows += [("TH-1", T0 + i * 60_000, "humidity", 50.0 + i % 7) for i in range(1440)]
        rows += [("od.d-dev", T0, "m:0.tC", -0.0)]
        rows += [("TH-2", T0, "wide", 1.0), ("TH-2", T0 + 2 * 86_400_000, "wide", 2.0)]
        assert st.ingest(SERIAL, "b-1", iter(rows)) == len(rows)
    finally:
        st.close()
    yield hub, make_user(hub.db, "reader", ["default"])


def read(hub: Hub, auth: tuple[str, str], **params: Any) -> requests.Response:
    return requests.get(f"{hub.url}/api/v1/readings", params=params, auth=auth, timeout=120)


def validate(body: Any, schema_name: str) -> None:
    """``body`` is valid against a schema of the hub's OpenAPI document."""
    doc = document()
    schema = {**doc["components"]["schemas"][schema_name], "components": doc["components"]}
    jsonschema.validate(body, schema, cls=jsonschema.Draft4Validator)


def test_raw_readings_json_and_csv(data_hub: tuple[Hub, tuple[str, str]]) -> None:
    hub, auth = data_hub
    q = {"serial": SERIAL, "device": "TH-1", "metric": "temperature"}
    r = read(hub, auth, **q)
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "application/json"
    got = r.json()["readings"]
    assert got == [{"ts": T0 + i * 10_000, "value": values(i)} for i in range(N)]
    for item in got[:50]:
        validate(item, "Reading")
    # from inclusive, to exclusive; epoch ms and RFC 3339 name the same instants
    part = read(hub, auth, **q, **{"from": T0 + 20_000, "to": T0 + 60_000}).json()["readings"]
    assert [x["ts"] for x in part] == [T0 + 20_000, T0 + 30_000, T0 + 40_000, T0 + 50_000]
    for start, end in (
        ("2026-01-01T00:00:20Z", "2026-01-01T00:01:00Z"),
        ("2026-01-01T01:00:20+01:00", "2026-01-01T01:01:00.000+01:00"),
        ("2026-01-01t00:00:19.9991z", "2026-01-01T00:00:59.9999Z"),
    ):
        assert read(hub, auth, **q, **{"from": start, "to": end}).json()["readings"] == part
    assert read(hub, auth, **q, **{"from": T0 + 5, "to": T0 + 5}).json() == {"readings": []}
    r = read(hub, auth, **q, format="csv", to=T0 + 30_000)
    assert r.headers["Content-Type"].startswith("text/csv")
    assert (
        r.text
        == f"ts,value\n{T0},{values(0)}\n{T0 + 10_000},{values(1)}\n{T0 + 20_000},{values(2)}\n"
    )
    empty = read(hub, auth, **q, format="csv", to=T0)
    assert empty.text == "ts,value\n"


def test_buckets_are_computed_by_the_database(data_hub: tuple[Hub, tuple[str, str]]) -> None:
    hub, auth = data_hub
    q = {"serial": SERIAL, "device": "TH-1", "metric": "temperature"}
    for every, start in ((60, None), (3600, T0 + 25_000), (86_400, None), (7, T0 + 3)):
        params = {**q, "every": every}
        if start is not None:
            params["from"] = start
        r = read(hub, auth, **params)
        assert r.status_code == 200, r.text[:300]
        origin = start or 0
        expected: dict[int, list[float]] = {}
        for i in range(N):
            ts = T0 + i * 10_000
            if ts >= origin:
                b = origin + (ts - origin) // (every * 1000) * every * 1000
                expected.setdefault(b, []).append(values(i))
        got = r.json()["readings"]
        assert [g["ts"] for g in got] == sorted(expected)
        for g in got:
            vs = expected[g["ts"]]
            assert (g["min"], g["max"], g["count"]) == (min(vs), max(vs), len(vs))
            assert g["mean"] == pytest.approx(statistics.fmean(vs), rel=1e-12)
        for g in got[:20]:
            validate(g, "Bucket")
    r = read(hub, auth, **q, every=3600, format="csv")
    rows = list(csv.reader(io.StringIO(r.text)))
    assert rows[0] == ["ts", "min", "max", "mean", "count"]
    assert len(rows) == 25 and rows[1][0] == str(T0) and rows[1][4] == "360"


def test_extent(data_hub: tuple[Hub, tuple[str, str]]) -> None:
    hub, auth = data_hub
    r = requests.get(f"{hub.url}/api/v1/extent", params={"serial": SERIAL}, auth=auth, timeout=60)
    assert r.status_code == 200
    body = r.json()
    validate(body, "Extent")
    assert body == {
        "serial": SERIAL,
        "series": [
            {
                "device": "TH-1",
                "metric": "humidity",
                "first_ts": T0,
                "last_ts": T0 + 1439 * 60_000,
                "count": 1440,
            },
            {
                "device": "TH-1",
                "metric": "temperature",
                "first_ts": T0,
                "last_ts": T0 + (N - 1) * 10_000,
                "count": N,
            },
            {
                "device": "TH-2",
                "metric": "wide",
                "first_ts": T0,
                "last_ts": T0 + 2 * 86_400_000,
                "count": 2,
            },
            {"device": "od.d-dev", "metric": "m:0.tC", "first_ts": T0, "last_ts": T0, "count": 1},
        ],
    }
    r = requests.get(
        f"{hub.url}/api/v1/extent",
        params={"serial": SERIAL, "device": "od.d-dev", "format": "csv"},
        auth=auth,
        timeout=60,
    )
    assert list(csv.reader(io.StringIO(r.text))) == [
        ["device", "metric", "first_ts", "last_ts", "count"],
        ["od.d-dev", "m:0.tC", str(T0), str(T0), "1"],
    ]


#: (parameters over serial, device and metric of a series (None: left out), status, words)
BAD: list[tuple[dict[str, Any], int, str]] = [
    ({"serial": None}, 400, "the parameter serial is missing"),
    ({"device": None}, 400, "the parameter device is missing"),
    ({"metric": ""}, 400, "the parameter metric is missing"),
    ({"from": T0 + 10, "to": T0}, 400, "is after to"),
    ({"every": "0"}, 400, "every='0' must be a whole number of seconds, at least 1"),
    ({"every": "-5"}, 400, "at least 1"),
    ({"every": "1.5"}, 400, "whole number of seconds"),
    ({"every": "99999999999999"}, 400, "more than the"),
    (
        {"device": "TH-2", "metric": "wide", "every": "1"},
        400,
        f"gives up to 172801 buckets, more than the {MAX_BUCKETS} one request may have",
    ),
    ({"from": "yesterday"}, 400, "from='yesterday' is not a time"),
    ({"to": "2026-13-01T00:00:00Z"}, 400, "is not a valid date and time"),
    ({"to": "2026-01-01T00:00:00"}, 400, "is not a time"),
    ({"to": "2026-01-01 00:00:00Z"}, 400, "is not a time"),
    ({"from": "1960-01-01T00:00:00Z"}, 400, "is outside 1970"),
    ({"to": "99999999999999999999"}, 400, "outside 1970"),
    ({"format": "xml"}, 400, "format='xml' is not known; use json or csv"),
    ({"form": "1"}, 400, "unknown parameter 'form'"),
    ({"metric": "x" * 300}, 400, "the parameter metric must be 1 to 256 characters"),
    ({"metric": "pressure"}, 404, f"gateway {SERIAL} has no readings of 'TH-1' 'pressure'"),
    ({"serial": "GW-NONE"}, 404, "no gateway GW-NONE on this hub"),
]


def test_bad_parameters_get_a_clear_answer(data_hub: tuple[Hub, tuple[str, str]]) -> None:
    hub, auth = data_hub
    for params, status, words in BAD:
        q = {"serial": SERIAL, "device": "TH-1", "metric": "temperature", **params}
        r = read(hub, auth, **{k: v for k, v in q.items() if v is not None})
        assert r.status_code == status, (params, r.text[:300])
        assert words in r.json()["error"], (params, r.json())
        validate(r.json(), "Error")


def test_a_repeated_parameter_is_refused(data_hub: tuple[Hub, tuple[str, str]]) -> None:
    hub, auth = data_hub
    r = requests.get(
        f"{hub.url}/api/v1/readings?serial={SERIAL}&serial=GW-X&device=TH-1&metric=humidity",
        auth=auth,
        timeout=60,
    )
    assert r.status_code == 400
    assert r.json()["error"] == "the parameter serial is given more than once"


def test_a_long_range_is_streamed_whole(hub: Hub) -> None:
    """300,000 raw readings in one answer: fetched from the database in chunks and sent
    in pieces (the hub never holds them all)."""
    n = 300_000
    st = open_storage(hub.db)
    try:
        st.ingest(SERIAL, "big", (("D", T0 + i * 1000, "m", i * 0.25) for i in range(n)))
    finally:
        st.close()
    auth = make_user(hub.db, "reader", ["default"])
    with requests.get(
        f"{hub.url}/api/v1/readings",
        params={"serial": SERIAL, "device": "D", "metric": "m", "format": "csv"},
        auth=auth,
        stream=True,
        timeout=300,
    ) as r:
        assert r.status_code == 200
        assert "Content-Length" not in r.headers  # streamed, not built in memory
        lines = 0
        last = b""
        for line in r.iter_lines():
            lines += 1
            last = line
    assert lines == n + 1
    assert last == f"{T0 + (n - 1) * 1000},{(n - 1) * 0.25}".encode()
    # a client that stops reading early leaves the hub able to answer at once
    with requests.get(
        f"{hub.url}/api/v1/readings",
        params={"serial": SERIAL, "device": "D", "metric": "m"},
        auth=auth,
        stream=True,
        timeout=60,
    ) as r:
        next(r.iter_content(4096))
    for _ in range(4):
        r = requests.get(
            f"{hub.url}/api/v1/readings",
            params={"serial": SERIAL, "device": "D", "metric": "m", "every": 86_400},
            auth=auth,
            timeout=60,
        )
        assert r.json()["readings"][0]["count"] == 86_400
