"""Users and domains at the hub, on both backends: who may read what, HTTP Basic and login
sessions, failed logins rate-limited across workers, and the ``hub user`` and ``hub gateway
domain`` commands (docs/contract.md §11)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from support import Hub, make_user, query_db
from test_hub import make_batch, offer, put, register

from fieldgate.hub.auth import ADDRESS_LIMIT, USER_LIMIT
from fieldgate.hub.backends import open_storage

T0 = 1_767_225_600_000


@pytest.fixture
def fleet(hub: Hub) -> Iterator[Hub]:
    """Two gateways with readings, GW-A in domain east and GW-B in domain west."""
    for serial, domain in (("GW-A", "east"), ("GW-B", "west")):
        key = register(hub, serial)
        manifest, body, _ = make_batch("b-0001", 50, serial=serial)
        assert put(offer(hub, key, manifest).json()["upload_url"], body).status_code == 201
        r = hub.cli("gateway", "domain", serial, domain)
        assert r.returncode == 0, r.stderr
        assert r.stdout == f"gateway {serial} moved from domain default to {domain}\n"
    yield hub


def get(
    hub: Hub, path: str, auth: tuple[str, str] | None = None, **kw: object
) -> requests.Response:
    return requests.get(f"{hub.url}{path}", auth=auth, timeout=60, **kw)  # type: ignore[arg-type]


#: Every read of one gateway's data, with {s} for the serial.
READS = (
    "/api/v1/gateways/{s}",
    "/api/v1/readings?serial={s}&device=TH-001&metric=temperature",
    "/api/v1/readings?serial={s}&device=TH-001&metric=temperature&every=60",
    "/api/v1/readings?serial={s}&device=TH-001&metric=temperature&format=csv",
    "/api/v1/extent?serial={s}",
    "/api/v1/extent?serial={s}&device=TH-001&format=csv",
)


def test_a_user_sees_only_the_gateways_of_their_domains(fleet: Hub) -> None:
    hub = fleet
    east = make_user(hub.db, "eve", ["east"])
    both = make_user(hub.db, "bo", ["east", "west"])
    nobody = make_user(hub.db, "nell", ["north"])
    admin = make_user(hub.db, "root", admin=True)

    def serials(auth: tuple[str, str]) -> list[str]:
        r = get(hub, "/api/v1/gateways", auth)
        assert r.status_code == 200, r.text
        return [g["serial"] for g in r.json()["gateways"]]

    assert serials(east) == ["GW-A"]
    assert serials(both) == ["GW-A", "GW-B"]
    assert serials(nobody) == []
    assert serials(admin) == ["GW-A", "GW-B"]
    for path in READS:
        assert get(hub, path.format(s="GW-A"), east).status_code == 200, path
        assert get(hub, path.format(s="GW-B"), admin).status_code == 200, path
        for who in (east, nobody):
            other = get(hub, path.format(s="GW-B"), who)
            missing = get(hub, path.format(s="GW-NONE"), who)
            # another domain's gateway looks exactly like one that does not exist
            assert other.status_code == missing.status_code == 404, path
            assert other.json()["error"] == missing.json()["error"].replace("GW-NONE", "GW-B")
    assert get(hub, "/api/v1/gateways/GW-A", east).json()["domain"] == "east"


def test_no_endpoint_but_the_gateways_and_health_answers_without_a_user(fleet: Hub) -> None:
    """Walk the application's url_map: every endpoint needs a user, except those gateways
    call (with their keys or upload tokens), health, logging in and out, and the pages'
    scripts and styles; a page without a user sends the browser to the login form."""
    from fieldgate.hub.app import create_app

    open_without_user = {
        "health.health",
        "uploads.register",
        "uploads.offer_batch",
        "uploads.put_batch",
        "uploads.heartbeat",
        "account.login",
        "account.logout",
        "pages.login_page",
        "pages.login_form",
        "pages.logout_form",
        "assets.static",
    }
    answering = {"health.health", "pages.login_page"}
    app = create_app(fleet.db)
    walker = make_user(fleet.db, "walker", ["east"])
    seen = set()
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:\w+:)?(\w+)>", lambda m: "GW-A" if m[1] == "serial" else "x", rule.rule)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            seen.add(rule.endpoint)
            url = f"{fleet.url}{path}?serial=GW-A"
            r = requests.request(method, url, timeout=60, allow_redirects=False)
            if rule.endpoint in open_without_user:
                assert r.status_code != 200 or rule.endpoint in answering, (path, r.text)
                continue
            if rule.endpoint.startswith("pages."):
                for auth in (None, (walker[0], "x")):
                    r = requests.request(method, url, auth=auth, timeout=60, allow_redirects=False)
                    assert r.status_code == 302, (method, path, r.status_code)
                    assert r.headers["Location"].startswith("/login?next="), r.headers
                continue
            assert r.status_code == 401, (method, path, r.status_code, r.text)
            assert r.headers["WWW-Authenticate"].startswith("Basic")
            assert "GW-A" not in r.text
            bad = requests.request(method, f"{fleet.url}{path}", auth=(walker[0], "x"), timeout=60)
            assert bad.status_code == 401, (method, path)
    assert {"query.readings", "fleet.gateways", "metrics.scrape", "pages.fleet_page"} <= seen
    assert {"pages.gateway_page"} <= seen
    assert open_without_user <= seen


def test_login_session_cookie(fleet: Hub) -> None:
    hub = fleet
    name, password = make_user(hub.db, "eve", ["east"])
    s = requests.Session()
    assert s.get(f"{hub.url}/api/v1/gateways", timeout=60).status_code == 401
    r = s.post(f"{hub.url}/api/v1/login", json={"name": name, "password": "wrong-one"}, timeout=60)
    assert r.status_code == 401
    assert r.json() == {"error": "wrong user name or password"}
    r = s.post(f"{hub.url}/api/v1/login", data={"name": name, "password": password}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json() == {"name": "eve", "admin": False, "domains": ["east"]}
    cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in cookie
    assert "SameSite=Lax" in cookie
    assert "Secure" not in cookie  # plain HTTP here; over HTTPS it is Secure
    assert password not in cookie
    # the session holds in every worker (the signing key is in the database)
    for _ in range(6):
        r = s.get(f"{hub.url}/api/v1/gateways", headers={"Connection": "close"}, timeout=60)
        assert [g["serial"] for g in r.json()["gateways"]] == ["GW-A"]
    assert s.get(f"{hub.url}/api/v1/gateways/GW-B", timeout=60).status_code == 404
    # a tampered cookie is no session
    forged = requests.Session()
    value = s.cookies["fieldgate_session"]
    forged.cookies.set("fieldgate_session", value[:-2] + ("AA" if value[-2:] != "AA" else "BB"))
    assert forged.get(f"{hub.url}/api/v1/gateways", timeout=60).status_code == 401
    # a new password ends every session started with the old one
    r = hub.cli("user", "add", "--update", "eve", "--domains", "east", stdin="a-new-password\n")
    assert r.stdout == "updated user eve: password\n", r.stderr
    assert s.get(f"{hub.url}/api/v1/gateways", timeout=60).status_code == 401
    r = s.post(
        f"{hub.url}/api/v1/login", json={"name": "eve", "password": "a-new-password"}, timeout=60
    )
    assert r.status_code == 200
    assert s.post(f"{hub.url}/api/v1/logout", timeout=60).status_code == 204
    assert s.get(f"{hub.url}/api/v1/gateways", timeout=60).status_code == 401
    assert password not in hub.dump() and "a-new-password" not in hub.dump()


def test_session_cookie_is_secure_behind_a_tls_proxy(hub_db: str, tmp_path: Path) -> None:
    hub = Hub(tmp_path / "hub", hub_db, extra_args=["--trusted-proxies", "1"])
    hub.start()
    try:
        name, password = make_user(hub.db, "eve", ["east"])
        r = requests.post(
            f"{hub.url}/api/v1/login",
            json={"name": name, "password": password},
            headers={"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.7"},
            timeout=60,
        )
        assert r.status_code == 200
        assert "Secure" in r.headers["Set-Cookie"]
    finally:
        hub.stop()


def test_failed_logins_are_rate_limited_per_name_across_workers(fleet: Hub) -> None:
    hub = fleet
    name, password = make_user(hub.db, "eve", ["east"])
    for _ in range(USER_LIMIT):  # new connections: the workers take turns
        r = get(hub, "/api/v1/gateways", (name, "wrong"), headers={"Connection": "close"})
        assert r.status_code == 401
    r = get(hub, "/api/v1/gateways", (name, password))  # even the right password now
    assert r.status_code == 429
    assert "too many failed logins for this user name" in r.json()["error"]
    assert 1 <= int(r.headers["Retry-After"]) <= 15 * 60
    login = requests.post(
        f"{hub.url}/api/v1/login", json={"name": name, "password": password}, timeout=60
    )
    assert login.status_code == 429
    # another user from the same address is not held up
    other = make_user(hub.db, "bo", ["west"])
    assert get(hub, "/api/v1/gateways", other).status_code == 200
    # the failures are in the database, for every worker and hub process to see
    assert query_db(hub.db, "SELECT COUNT(*) FROM login_failures WHERE key = ?", ("user:eve",)) == [
        (USER_LIMIT,)
    ]


def test_failed_logins_are_rate_limited_per_address(fleet: Hub) -> None:
    hub = fleet
    users = [
        make_user(hub.db, f"u{i}", ["east"]) for i in range(ADDRESS_LIMIT // (USER_LIMIT - 1) + 1)
    ]
    failures = 0
    for name, _ in users:
        for _ in range(USER_LIMIT - 1):
            if failures == ADDRESS_LIMIT:
                break
            assert get(hub, "/api/v1/gateways", (name, "wrong")).status_code == 401
            failures += 1
    fresh = make_user(hub.db, "late", ["east"])
    r = get(hub, "/api/v1/gateways", fresh)
    assert r.status_code == 429
    assert "for this address" in r.json()["error"]
    assert int(r.headers["Retry-After"]) >= 1


def test_a_success_forgets_the_name_s_failures(fleet: Hub) -> None:
    hub = fleet
    name, password = make_user(hub.db, "eve", ["east"])
    for _ in range(USER_LIMIT - 1):
        assert get(hub, "/api/v1/gateways", (name, "wrong")).status_code == 401
    assert get(hub, "/api/v1/gateways", (name, password)).status_code == 200
    for _ in range(USER_LIMIT - 1):
        assert get(hub, "/api/v1/gateways", (name, "wrong")).status_code == 401
    assert get(hub, "/api/v1/gateways", (name, password)).status_code == 200


def test_malformed_credentials_are_one_clear_401(fleet: Hub) -> None:
    for header in ("Basic !!!", "Basic " + "bm9jb2xvbg==", "Bearer some-gateway-key"):
        r = get(fleet, "/api/v1/gateways", headers={"Authorization": header})
        assert r.status_code == 401, header
        assert r.json()["error"] in (
            "malformed HTTP Basic credentials",
            "this needs a user: HTTP Basic credentials or a login session",
        )


def test_hub_user_commands(hub_db: str) -> None:
    """``hub user add/remove/list`` with the real scrypt cost; the password only ever on
    standard input; every mistake one line; ``add --update`` idempotent (what the Ansible
    role runs every time)."""
    from support import run_fieldgate

    def hub(*args: str, stdin: str | None = None) -> tuple[int, str, str]:
        r = run_fieldgate("hub", *args, "--db", hub_db, stdin=stdin)
        return r.returncode, r.stdout, r.stderr

    code, _, err = hub("user", "add", "alice", "--domains", "east", stdin="correct horse\n")
    assert code == 1, err
    assert "--create creates" in err or "holds no hub tables yet" in err, err
    add = ("user", "add", "alice", "--create", "--domains", "west,east")
    code, out, err = hub(*add, stdin="correct horse\n")
    assert (code, out, err) == (0, "added user alice (domains: east, west)\n", "")
    assert hub("user", "add", "root", "--admin", stdin="battery staple\n")[0] == 0
    code, _, err = hub("user", "add", "alice", "--domains", "east", stdin="another one\n")
    assert code == 1
    assert err == "fieldgate: error: user alice exists; use 'hub user add --update' to change it\n"
    update = ("user", "add", "--update", "alice", "--domains", "east,west")
    assert hub(*update, stdin="correct horse\n") == (0, "user alice unchanged\n", "")
    assert hub("user", "add", "--update", "alice", "--domains", "east", stdin="correct horse\n")[
        1
    ] == ("updated user alice: domains\n")
    for args, stdin, message in (
        (("user", "add", "bob"), "long enough\n", "a user who is not --admin needs --domains"),
        (("user", "add", "bob", "--domains", "east"), "", "no password on standard input"),
        (("user", "add", "bob", "--domains", "east"), "short\n", "at least 8 characters"),
        (("user", "add", "b/b", "--domains", "east"), "long enough\n", "not a valid user name"),
        (("user", "add", "bob", "--domains", "e st"), "long enough\n", "not a valid domain"),
        (("user", "remove", "nobody"), None, "there is no user 'nobody'"),
        (("gateway", "domain", "GW-1", "no such"), None, "not a valid domain"),
    ):
        code, out, err = hub(*args, stdin=stdin)
        assert code == 1, (args, out, err)
        assert err.startswith("fieldgate: error: ") and err.count("\n") == 1, err
        assert message in err, err
    code, out, _ = hub("user", "list")
    assert out.splitlines() == ["alice  user   east", "root   admin  -"]
    listed = json.loads(hub("user", "list", "--json")[1])
    assert [(u["name"], u["admin"], u["domains"]) for u in listed] == [
        ("alice", False, ["east"]),
        ("root", True, []),
    ]
    assert hub("user", "remove", "alice") == (0, "removed user alice\n", "")
    assert [u["name"] for u in json.loads(hub("user", "list", "--json")[1])] == ["root"]
    st = open_storage(hub_db)
    try:
        stored = st.user("root")
        assert stored is not None
        assert stored.password_hash.startswith("scrypt$131072$8$1$")
        assert "battery staple" not in stored.password_hash
    finally:
        st.close()
    assert hub("gateway", "domain", "GW-1", "east") == (
        0,
        "gateway GW-1 (not registered yet) is in domain east\n",
        "",
    )
    assert hub("gateway", "domain", "GW-1", "east")[1] == "gateway GW-1 is in domain east already\n"
