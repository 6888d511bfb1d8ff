"""Retrying what failed: capped exponential backoff, and the root cause of a network error.

The collector (broker reconnects, store pauses), the uploader (hub requests) and the poller
(node fetches) all wait and word their failures the same way through this module.
"""

from __future__ import annotations

import random


class Backoff:
    """Capped exponential backoff: ``initial``, twice that, … up to ``cap`` seconds.

    With ``jitter`` each delay is drawn uniformly from [delay/2, delay], so that many
    gateways retrying one hub do not knock in step. :meth:`reset` after a success.
    """

    def __init__(self, initial: float, cap: float, *, jitter: bool = False) -> None:
        self.initial = initial
        self.cap = cap
        self.jitter = jitter
        self.attempt = 0

    def next(self) -> float:
        """The delay before the next attempt (and count this attempt)."""
        delay = min(self.cap, self.initial * (2**self.attempt))
        self.attempt = min(self.attempt + 1, 62)
        if self.jitter:
            return random.uniform(delay / 2, delay)  # noqa: S311 (jitter, not crypto)
        return delay

    def reset(self) -> None:
        self.attempt = 0


def root_cause(exc: BaseException) -> str:
    """The innermost cause of a (``requests``/``urllib3``/socket) error in a few words.

    Follows ``__cause__``/``__context__`` down to the first OS error that has a message
    (``Connection refused``, ``Name or service not known``), else the innermost exception's
    text without its ``[Errno n]`` prefix.
    """
    inner: BaseException = exc
    seen = {id(exc)}
    while True:
        nxt = inner.__cause__ or inner.__context__
        if nxt is None or id(nxt) in seen:
            break
        seen.add(id(nxt))
        inner = nxt
        if isinstance(inner, OSError) and inner.strerror:
            return inner.strerror
    if isinstance(inner, OSError) and inner.strerror:
        return inner.strerror
    text = str(inner) or type(inner).__name__
    return text.rsplit(": ", 1)[-1] if "Errno" in text else text
