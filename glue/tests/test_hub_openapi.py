"""The hub's OpenAPI document is true: it describes every route and only routes (the web
pages and their assets aside, docs/pages.md), it is what ``/api/v1/openapi.json`` serves,
and the hub, fuzzed from it by schemathesis on both backends (bounded: a few examples per
operation), never answers 500 and answers what the document says (status codes, content
types, response schemas)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import ignored_auth, positive_data_acceptance
from support import BACKENDS, Hub, make_user, query_db
from test_hub import make_batch, offer, put, register

from fieldgate.hub.app import create_app
from fieldgate.hub.backends import open_storage
from fieldgate.hub.openapi import document

T0 = 1_767_225_600_000


def routes() -> set[tuple[str, str]]:
    app = create_app("/nonexistent/hub.db")  # the database is opened on first request only
    out = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint.startswith(("pages.", "assets.")):  # web pages, not the API
            continue
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        out |= {(path, m.lower()) for m in (rule.methods or set()) - {"HEAD", "OPTIONS"}}
    return out


def test_every_route_is_documented_and_nothing_else() -> None:
    doc = document()
    documented = {(path, m) for path, item in doc["paths"].items() for m in item}
    assert documented == routes()
    for path, item in doc["paths"].items():
        for method, op in item.items():
            assert op["responses"], (path, method)
            assert "security" in op, (path, method)


def test_the_hub_serves_its_document(hub: Hub) -> None:
    r = requests.get(f"{hub.url}/api/v1/openapi.json", timeout=60)
    assert r.status_code == 401
    auth = make_user(hub.db, "reader", ["default"])
    r = requests.get(f"{hub.url}/api/v1/openapi.json", auth=auth, timeout=60)
    assert r.status_code == 200
    assert r.json() == document()


@pytest.fixture(scope="module", params=BACKENDS)
def fuzz_hub(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Hub, dict[str, str]]]:
    """One hub per backend for the whole fuzz run, with a gateway holding readings, an
    admin (HTTP Basic for the read API) and the gateway's key (for /batches)."""
    workdir = tmp_path_factory.mktemp("fuzz")
    if request.param == "postgresql":
        server = request.getfixturevalue("pg_server")
        name = server.new_database()
        db = server.url(name)
    else:
        db = str(workdir / "hub.db")
    hub = Hub(workdir / "hub", db)
    hub.start()
    try:
        key = register(hub, "GW-F")
        manifest, body, _ = make_batch("b-0001", 100, serial="GW-F")
        assert put(offer(hub, key, manifest).json()["upload_url"], body).status_code == 201
        st = open_storage(db)
        try:
            st.ingest("GW-F", "b-2", (("TH-001", T0 + i * 1000, "m", i * 1.5) for i in range(500)))
        finally:
            st.close()
        user, password = make_user(db, "fuzzer", admin=True)
        import base64

        basic = base64.b64encode(f"{user}:{password}".encode()).decode()
        yield hub, {"basic": f"Basic {basic}", "bearer": f"Bearer {key}"}
    finally:
        hub.stop()
        if request.param == "postgresql":
            server.drop_database(name)


#: Bounded: the examples the document gives, the coverage phase (every boundary: it is what
#: found a NUL in a name crashing PostgreSQL), then up to max_examples generated cases per
#: operation. Logging in with a name nobody has costs a full scrypt check on purpose (the
#: answer must take as long as for a real user), so that operation gets fewer cases.
schema = schemathesis.openapi.from_dict(document())
# batch zips are bytes like any other
schemathesis.serializer.alias("application/zip", "application/octet-stream")
LOGIN = "/api/v1/login"


def check(case: schemathesis.Case, hub: Hub, auth: dict[str, str]) -> None:
    """Send a generated request with the credentials its operation needs; no 500, and the
    answer is what the document says."""
    headers = {}
    security = case.operation.definition.raw.get("security")
    if security == [{"gatewayKey": []}]:
        headers["Authorization"] = auth["bearer"]
    elif security:
        headers["Authorization"] = auth["basic"]
    response = case.call(base_url=hub.url, headers=headers, timeout=60)
    assert response.status_code < 500, (case.path, response.status_code, response.text[:300])
    # not here: a request can match every pattern of the document and still be wrong in a
    # way no schema says (from after to, February 30, more buckets than one request may
    # have: 400s naming the parameter, each tested in test_hub_query.py); and wrong
    # credentials on every endpoint (the url_map walk in test_hub_access.py), which cost
    # a full scrypt check each
    case.validate_response(
        response, headers=headers, excluded_checks=[positive_data_acceptance, ignored_auth]
    )
    # start each case with no failed logins recorded, so that the address's limit
    # (test_hub_access.py) does not turn the 401s of later cases into 429s
    query_db(hub.db, "DELETE FROM login_failures")


@schema.exclude(path=LOGIN).parametrize()
@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_fuzzed_from_the_document(
    case: schemathesis.Case, fuzz_hub: tuple[Hub, dict[str, str]]
) -> None:
    check(case, *fuzz_hub)


@schema.include(path=LOGIN).parametrize()
@settings(max_examples=4, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_login_fuzzed_from_the_document(
    case: schemathesis.Case, fuzz_hub: tuple[Hub, dict[str, str]]
) -> None:
    check(case, *fuzz_hub)


def test_fuzz_left_the_hub_sound(fuzz_hub: tuple[Hub, dict[str, str]], tmp_path: Path) -> None:
    hub, _ = fuzz_hub
    assert "internal error" not in hub.log_text()
    assert "Traceback" not in hub.log_text()
