"""Credentials kept out of every message: one function, used where URLs and the errors of
``requests`` become text.

An upload URL is a credential until it expires (whoever has it can PUT a batch). The
gateway treats the upload URL a hub hands out as opaque (docs/contract.md §6): its token
may be a path segment (the reference hub: ``/api/v1/uploads/<token>``), a query value or
user info. So the client names a credential URL by its origin only and passes every text
it makes from one through :func:`redact` with that URL; messages of ``urllib3`` and
``requests`` themselves, which the client does not word, lose every URL's path and query
(:class:`RedactingFilter`, on every log handler).

A polled node's URL may carry ``user:password@``: :func:`without_userinfo` is how it is
shown and stored (the ``rejected`` row's topic, the poller's log lines).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from urllib.parse import quote, unquote, urlsplit

#: The token of a fieldgate upload URL, wherever a text carries one.
UPLOAD_TOKEN_RE = re.compile(r"(/api/v1/uploads/)[^\s?/#'\"]+")
#: Path segments and query values this long are taken for tokens (a random token is 43).
TOKEN_MIN_CHARS = 12
HIDDEN = "…"
#: An absolute URL in running text: scheme, optional user info, host, then path and query.
#: The user info of an absolute URL: up to the last ``@`` before the path, query or fragment.
USERINFO_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/?#]*@")
URL_RE = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)(?:[^\s/?#@'\"]*@)?([^\s/?#'\"]*)([^\s'\")>]*)")


def origin(url: str) -> str:
    """How a credential URL is named in a message: ``scheme://host:port/…``."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # not a URL at all
        return HIDDEN
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{port}/{HIDDEN}" if parts.scheme else HIDDEN


def without_userinfo(url: str) -> str:
    """``url`` without its ``user:password@`` (the rest as it is: it names the node)."""
    return USERINFO_RE.sub(r"\1", url)


def redact(text: str, *credentials: str) -> str:
    """``text`` with every credential in it hidden: each credential URL given (whole, as
    ``requests`` re-quotes it, its path and query as ``urllib3`` prints them, its user info
    and each long path segment or query value, quoted or not) and the token of every
    fieldgate upload URL."""
    for url in credentials:
        if not url:
            continue
        for whole in {url, _requote(url)}:
            text = text.replace(whole, origin(url))
        for piece in sorted(_pieces(url), key=len, reverse=True):
            text = text.replace(piece, HIDDEN)
    return UPLOAD_TOKEN_RE.sub(rf"\1{HIDDEN}", text)


def redact_urls(text: str) -> str:
    """``text`` with the user info, path and query of every URL in it hidden."""
    return URL_RE.sub(lambda m: f"{m[1]}{m[2]}{f'/{HIDDEN}' if m[3] else ''}", text)


def _requote(url: str) -> str:
    """``url`` as ``requests`` sends it (``requote_uri``: what is not allowed, escaped)."""
    return quote(url, safe="!#$%&'()*+,/:;=?@[]~")


def _pieces(url: str) -> set[str]:
    """The parts of a credential URL that are secret on their own."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return {url}
    found: set[str] = set()
    for tail in (parts.path, parts.path + (f"?{parts.query}" if parts.query else "")):
        if tail.strip("/"):
            found.update(_forms(tail))
    if parts.query:
        found.update(_forms(parts.query))
    words: Iterable[str] = [
        *parts.path.split("/"),
        *(v for kv in parts.query.split("&") for v in kv.split("=", 1)),
        *(x for x in (parts.username, parts.password) if x),
    ]
    for word in words:
        if len(word) >= TOKEN_MIN_CHARS or word in (parts.username, parts.password):
            found.update(_forms(word))
    found.discard("")
    return found


def _forms(text: str) -> set[str]:
    return {text, quote(text, safe="/"), unquote(text), _requote(text)}


class RedactingFilter(logging.Filter):
    """A log handler's filter: fieldgate upload tokens out of every record, and every URL's
    path and query out of the records of ``urllib3`` and ``requests`` (they print whole
    URLs, e.g. "Failed to parse headers (url=…)" for a hub's malformed answer)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = UPLOAD_TOKEN_RE.sub(rf"\1{HIDDEN}", message)
        if record.name.startswith(("urllib3", "requests")):
            cleaned = redact_urls(cleaned)
        if record.exc_info and record.name.startswith(("urllib3", "requests")):
            record.exc_info = None  # its traceback would quote the URL again
            record.exc_text = None
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True
