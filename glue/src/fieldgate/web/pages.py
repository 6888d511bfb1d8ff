"""The gateway page's HTML: small server-rendered pages that work on a phone.

Every value from the store or the configuration is escaped here; the charts' data travels
as JSON inside the page (``<`` escaped, so no reading can close the script element) and is
drawn by the vendored uPlot (``static/vendor/uplot``) and ``static/gateway/device.js``.
"""

from __future__ import annotations

import json
import math
from html import escape
from typing import Any
from urllib.parse import quote

from fieldgate import store
from fieldgate.web.queries import DeviceDay, Latest


def age_text(ms: int) -> str:
    """A duration in milliseconds as :func:`fieldgate.store.age_text` writes an age."""
    return store.age_text(max(0, ms) / 1000)


def finite(value: float) -> float | None:
    """A value JSON can carry (an infinity in the store becomes null: a gap)."""
    return value if math.isfinite(value) else None


def value_text(value: float) -> str:
    return f"{value:.6g}"


def device_url(device: str) -> str:
    return "/devices/" + quote(device, safe="")


def _page(site: str, title: str, body: str, *, scripts: tuple[str, ...] = ()) -> str:
    tags = "".join(f'<script src="{escape(s)}"></script>' for s in scripts)
    css = '<link rel="stylesheet" href="/static/gateway/gateway.css">'
    if scripts:
        css += '<link rel="stylesheet" href="/static/vendor/uplot/uPlot.min.css">'
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)} · {escape(site)}</title>{css}</head>"
        f'<body><header><span class="site">{escape(site)}</span><nav>'
        '<a href="/">Latest readings</a><a href="/status">Status</a></nav></header>'
        f"<main><h1>{escape(title)}</h1>{body}</main>{tags}</body></html>\n"
    )


def latest_page(site: str, page: Latest, *, show_all: bool) -> str:
    """Every active device (every device with ``show_all``) and its latest readings."""
    parts: list[str] = []
    if not page.devices:
        parts.append('<p class="empty">No device has sent a reading yet.</p>')
    for d in page.devices:
        name = escape(d.alias or d.device)
        serial = f' <span class="serial">{escape(d.device)}</span>' if d.alias else ""
        age = page.now - d.last_ts
        inactive = age > page.hide_inactive_after_days * 86_400_000
        rows = "".join(
            f'<tr><th scope="row">{escape(m)}</th><td class="value">{value_text(v)}</td>'
            f'<td class="age" title="{store.iso_utc(ts)}">{age_text(page.now - ts)} ago</td></tr>'
            for m, ts, v in d.metrics
        )
        parts.append(
            f'<section class="device{" inactive" if inactive else ""}" '
            f'data-device="{escape(d.device)}">'
            f'<h2><a href="{device_url(d.device)}">{name}</a>{serial}</h2>'
            f'<p class="when">last reading {age_text(age)} ago, '
            f"<time>{store.iso_utc(d.last_ts)}</time></p>"
            f'<table class="readings"><tbody>{rows}</tbody></table></section>'
        )
    days = f"{page.hide_inactive_after_days:g}"
    if page.hidden:
        parts.append(
            f'<p class="hidden-note">{page.hidden} device{"s" if page.hidden != 1 else ""} '
            f"silent for more than {days} days not shown: "
            '<a href="/?all=true">show all devices</a></p>'
        )
    elif show_all:
        parts.append(
            f'<p class="hidden-note">All devices, also those silent for more than {days} days: '
            '<a href="/">only active devices</a></p>'
        )
    return _page(site, "Latest readings", "".join(parts))


def chart_data(day: DeviceDay) -> dict[str, Any]:
    """uPlot's data per metric: ``[[ts seconds…], [values…]]`` (bucket means when bucketed)."""
    series = {}
    for metric, points in day.metrics.items():
        if day.every is None:
            series[metric] = [[ts / 1000 for ts, _ in points], [finite(v) for _, v in points]]
        else:
            series[metric] = [[p[0] / 1000 for p in points], [finite(p[3]) for p in points]]
    return {"device": day.device, "every": day.every, "series": series}


def script_json(data: Any) -> str:
    """JSON safe inside ``<script type="application/json">``."""
    return (
        json.dumps(data, separators=(",", ":"), allow_nan=False)
        .replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
    )


def device_page(site: str, day: DeviceDay) -> str:
    """The device's last day as one chart per metric."""
    name = day.alias or day.device
    api = f"/api/v1/devices/{quote(day.device, safe='')}/day"
    how = (
        f"averaged over {day.every} s buckets (about {len(max(day.metrics.values(), key=len))}"
        " points per chart)"
        if day.every
        else "every reading"
    )
    charts = "".join(
        f'<section class="chart"><h2>{escape(m)}</h2>'
        f'<div class="plot" data-metric="{escape(m)}"></div></section>'
        for m in day.metrics
    )
    body = (
        f'<p class="when">{escape(day.device)}: the 24 hours up to its last reading, '
        f"<time>{store.iso_utc(day.start)}</time> to <time>{store.iso_utc(day.end)}</time>, "
        f'{how}. <a href="{api}">JSON</a></p>{charts}'
        f'<script type="application/json" id="chart-data">{script_json(chart_data(day))}</script>'
    )
    return _page(
        site,
        name,
        body,
        scripts=("/static/vendor/uplot/uPlot.iife.min.js", "/static/gateway/device.js"),
    )


def status_page(site: str, text: str) -> str:
    """What ``fieldgate status`` prints."""
    return _page(
        site,
        "Status",
        f'<pre class="status">{escape(text)}</pre>'
        '<p><a href="/api/v1/status">JSON</a> (what <code>fieldgate status --json</code> '
        "prints)</p>",
    )


def message_page(site: str, title: str, text: str) -> str:
    return _page(site, title, f"<p>{escape(text)}</p>")
