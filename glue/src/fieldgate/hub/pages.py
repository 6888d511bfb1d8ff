"""The hub's web pages (docs/pages.md): log in and out, the fleet, one gateway.

Server-rendered (Jinja templates in ``templates/``); the only JavaScript draws the charts
(``static/hub/charts.js`` with the vendored uPlot, both in the package: hubs may sit on
closed networks). A page needs a user like the read API (:mod:`fieldgate.hub.auth`):
without one it sends the browser to the login form. A gateway outside the user's domains
is a 404, as in the API.

- ``GET /``: the fleet (:mod:`fieldgate.hub.overview`): problems first, sortable by any
  column (``?sort=COLUMN&desc=1``);
- ``GET /gateways/<serial>[?device=D][&window=1h|6h|1d|7d|30d][&to=T]``: the gateway's
  status, its devices and metrics with the latest value and its age, and a chart of each
  metric of one device over the window (ending at ``to``, default the device's latest
  reading), drawn from the read API: raw readings when the window holds at most
  :data:`RAW_POINTS` of them, else the server's buckets (``every=``) of about
  :data:`CHART_BUCKETS` per window (whole rollup buckets from a whole one once they are
  that wide, so that a week is read from the rollups); a CSV link per metric downloads the
  window's raw readings;
- ``GET/POST /login``, ``POST /logout``: forms with a CSRF token kept in the session.

Every page is sent with a Content-Security-Policy that allows only this hub's own scripts,
styles and images (no inline script), ``X-Frame-Options: DENY`` and ``Cache-Control:
no-store``.
"""

from __future__ import annotations

import hmac
import math
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from flask import Blueprint, Response, redirect, render_template, request, session, url_for
from markupsafe import Markup, escape

from fieldgate import __version__
from fieldgate.hub import auth
from fieldgate.hub.fleet import visible_gateway
from fieldgate.hub.overview import STATES, GatewayView, view
from fieldgate.hub.query import parse_time
from fieldgate.hub.sqlstore import ROLLUP_MS
from fieldgate.hub.web import ApiError, storage
from fieldgate.store import age_text, iso_utc, now_ms

STATIC = Path(__file__).resolve().parent.parent / "static"

pages = Blueprint("pages", __name__, template_folder="templates")
#: The pages' scripts and styles (no user needed: they hold no data).
assets = Blueprint("assets", __name__, static_folder=str(STATIC), static_url_path="/static")

#: The chart windows a gateway page offers, in seconds.
WINDOWS = {"1h": 3600, "6h": 6 * 3600, "1d": 86400, "7d": 7 * 86400, "30d": 30 * 86400}
DEFAULT_WINDOW = "1d"
#: A window holding at most this many readings (estimated from the series' extent) is
#: drawn from raw readings; a fuller one from buckets.
RAW_POINTS = 2000
#: About this many buckets per window when the server buckets.
CHART_BUCKETS = 1000
#: The fleet's sortable columns: name -> key of a GatewayView.
SORTS = {
    "state": lambda v: (v.rank, v.serial),
    "serial": lambda v: v.serial,
    "domain": lambda v: (v.domain, v.serial),
    "contact": lambda v: (-(v.last_contact or 0), v.serial),
    "backlog": lambda v: (v.backlog or 0, v.serial),
    "rejected": lambda v: (v.rejected or 0, v.serial),
    "disk": lambda v: (v.disk_percent or 0, v.serial),
    "rows": lambda v: (v.rows, v.serial),
}
POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


def csrf_token() -> str:
    """This session's CSRF token (created on first use)."""
    token = session.get("csrf")
    if not isinstance(token, str):
        token = session["csrf"] = secrets.token_urlsafe(32)
    return token


def _check_csrf() -> None:
    sent = request.form.get("csrf", "")
    known = session.get("csrf")
    if not isinstance(known, str) or not hmac.compare_digest(sent.encode(), known.encode()):
        raise ApiError(400, "the form expired or did not come from this hub; load it again")


def _safe_next(target: str | None) -> str:
    """Where to go after logging in: a path on this hub only."""
    if target and target.startswith("/") and not target.startswith(("//", "/\\")):
        return target
    return url_for("pages.fleet_page")


@pages.before_request
def need_user() -> Response | None:
    if request.endpoint in ("pages.login_page", "pages.login_form"):
        return None
    try:
        auth.caller()
    except ApiError as exc:
        if exc.status == 401:
            return redirect(url_for("pages.login_page", next=request.full_path.rstrip("?")))
        raise
    return None


@pages.after_request
def page_headers(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = POLICY
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["Cache-Control"] = "no-store"
    return response


@pages.errorhandler(ApiError)
def page_error(exc: ApiError) -> tuple[str, int, dict[str, str]]:
    headers = {k: v for k, v in exc.headers.items() if k == "Retry-After"}
    return (
        render_template("hub/error.html", status=exc.status, message=exc.message),
        (exc.status),
        headers,
    )


@pages.context_processor
def page_globals() -> dict[str, Any]:
    who = None
    try:
        who = auth.caller() if request.endpoint not in ("pages.login_form",) else None
    except ApiError:
        who = None
    return {"csrf_token": csrf_token, "who": who, "version": __version__}


@pages.get("/login")
def login_page() -> str:
    return render_template("hub/login.html", next=_safe_next(request.args.get("next")))


@pages.post("/login")
def login_form() -> Response | tuple[str, int, dict[str, str]]:
    _check_csrf()
    name, password = request.form.get("name", ""), request.form.get("password", "")
    target = _safe_next(request.form.get("next"))
    try:
        if not name or not password:
            raise ApiError(400, "give a user name and a password")
        auth.log_in(name, password)
    except ApiError as exc:
        if exc.status not in (400, 401, 429):
            raise
        headers = {k: v for k, v in exc.headers.items() if k == "Retry-After"}
        page = render_template("hub/login.html", next=target, error=exc.message, name=name)
        return page, exc.status, headers
    csrf_token()  # a fresh token for the logged-in session (log_in cleared the old one)
    return redirect(target)


@pages.post("/logout")
def logout_form() -> Response:
    _check_csrf()
    auth.log_out()
    return redirect(url_for("pages.login_page"))


def _sorted(views: list[GatewayView], sort: str, desc: bool) -> list[GatewayView]:
    key = SORTS.get(sort, SORTS["state"])
    return sorted(views, key=key, reverse=desc)


#: What a figure the gateway did not report shows (an en dash).
NONE = "\u2013"


def _count(v: float | None) -> str:
    return NONE if v is None else f"{v:.0f}"


def _fleet_row(v: GatewayView, href: str) -> Markup:
    """One row of the fleet table, written here rather than in the template: a thousand
    rows cost a template a few hundred thousand lookups (measured: bench/hub/pages.py).
    Every value from the gateway or the database goes through ``escape``."""
    e = escape
    state, serial = e(v.state), e(v.serial)
    title = (iso_utc(v.last_contact) if v.last_contact else "never") + (
        f"; upload interval {v.interval_secs:g} s"
    )
    pending = f" <small>({v.pending_batches:.0f} batches)</small>" if v.pending_batches else ""
    refused = f" <small>({v.refused_by_hub:.0f} by the hub)</small>" if v.refused_by_hub else ""
    disk = NONE if v.disk_percent is None else f"{v.disk_percent:.0f} %"
    pull = NONE
    if v.pull is not None:
        changed = "" if v.pull_changed is None else f", {v.pull_changed:.0f} changed"
        pull = f"pull {v.pull}{changed}, {age_text(v.pull_age_secs)} ago"
    return Markup(  # noqa: S704 (every value is escaped or a number formatted here)
        f'<tr class="gateway {state}" data-serial="{serial}" data-state="{state}">'
        f'<th scope="row"><a href="{e(href + quote(v.serial, safe=""))}">{serial}</a></th>'
        f'<td><span class="state {state}">{state}</span></td>'
        f'<td class="num" title="{e(title)}">{e(age_text(v.contact_age_secs))}</td>'
        f'<td class="num">{_count(v.backlog)}{pending}</td>'
        f'<td class="num">{_count(v.rejected)}{refused}</td>'
        f'<td class="num">{disk}</td><td>{e(v.collector or NONE)}</td>'
        f'<td>{e(v.export or NONE)}</td><td class="pull">{e(pull)}</td>'
        f'<td class="num">{v.rows}</td>'
        f'<td>{e(v.domain)}</td><td class="err">{e(v.last_error or "")}</td></tr>\n'
    )


@pages.get("/")
def fleet_page() -> str:
    now = now_ms()
    views = [view(d, now) for d in storage().gateways(auth.caller().visible, brief=True)]
    sort = request.args.get("sort", "state")
    sort = sort if sort in SORTS else "state"
    desc = request.args.get("desc") == "1"
    counts = {s: sum(1 for v in views if v.state == s) for s in STATES}
    href = url_for("pages.gateway_page", serial="-")[:-1]
    return render_template(
        "hub/fleet.html",
        rows=[_fleet_row(v, href) for v in _sorted(views, sort, desc)],
        counts=counts,
        sort=sort,
        desc=desc,
    )


def _chart(serial: str, series: dict[str, Any], start: int, end: int) -> dict[str, Any]:
    """What the page needs to draw one metric (``series``: its extent): the read API URLs
    of its chart and CSV."""
    device, metric = series["device"], series["metric"]
    base = {"serial": serial, "device": device, "metric": metric, "from": start, "to": end}
    first, last = series["first_ts"], series["last_ts"]
    overlap = max(0, min(end, last + 1) - max(start, first))
    expected = series["count"] * overlap / max(1, last + 1 - first)
    params = dict(base)
    if expected > RAW_POINTS:
        every = max(1, math.ceil((end - start) / CHART_BUCKETS))  # ms
        if every >= ROLLUP_MS:
            # whole rollup buckets from a whole one: the database reads one row per bucket
            # instead of its readings (fieldgate.hub.sqlstore)
            every = max(1, round(every / ROLLUP_MS)) * ROLLUP_MS
            params["from"] = start // ROLLUP_MS * ROLLUP_MS
            params["to"] = -(-end // ROLLUP_MS) * ROLLUP_MS
        params["every"] = math.ceil(every / 1000)
    return {
        "metric": metric,
        "data_url": "/api/v1/readings?" + urlencode(params),
        "csv_url": "/api/v1/readings?" + urlencode({**base, "format": "csv"}),
        "bucketed": "every" in params,
        "every": params.get("every"),
        "filename": f"{serial}-{device}-{metric}-{start}-{end}.csv",
    }


@pages.get("/gateways/<serial>")
def gateway_page(serial: str) -> str:
    d = visible_gateway(serial)
    now = now_ms()
    st = storage()
    gw = view(d, now)
    series = st.latest(d["serial"])
    devices = sorted({s[0] for s in series})
    device = request.args.get("device") or (devices[0] if devices else None)
    if device is not None and device not in devices:
        raise ApiError(404, f"gateway {d['serial']} has no readings of device {device!r:.60}")
    window = request.args.get("window", DEFAULT_WINDOW)
    if window not in WINDOWS:
        raise ApiError(400, f"window={window!r:.20} is not one of {', '.join(WINDOWS)}")
    charts: list[dict[str, Any]] = []
    start = end = 0
    if device is not None:
        extent = {e["metric"]: e for e in st.extent(d["serial"], device)}
        latest_ts = max(e["last_ts"] for e in extent.values())
        end = parse_time("to", request.args["to"]) if request.args.get("to") else latest_ts + 1
        start = max(0, end - WINDOWS[window] * 1000)
        charts = [_chart(d["serial"], e, start, end) for e in extent.values()]
    return render_template(
        "hub/gateway.html",
        gw=gw,
        d=d,
        series=[
            {
                "device": dev,
                "metric": metric,
                "value": value,
                "ts": ts,
                "age": age_text((now - ts) / 1000),
                "count": count,
            }
            for dev, metric, ts, value, count in series
        ],
        devices=devices,
        device=device,
        window=window,
        windows=list(WINDOWS),
        charts=charts,
        start=start,
        end=end,
        age_text=age_text,
        iso=iso_utc,
    )
