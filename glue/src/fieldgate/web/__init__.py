"""``fieldgate web``: the gateway's own read-only page for a technician on site.

:mod:`~fieldgate.web.queries` reads the store (read-only, never blocking the collector),
:mod:`~fieldgate.web.pages` renders HTML, :mod:`~fieldgate.web.server` serves both with the
standard library's HTTP server (no web framework on a gateway: docs/gateway-page.md).
"""
