"""The collector's live state, asked over a local socket: what ``status`` shows when the
store cannot be written (a full disk) and whether a collector runs at all.

The collector records its state in the store (``collector.state``), but on a full disk
that write fails, and a collector that was killed leaves "running" behind. So the running
collector also answers on a Unix socket in the abstract namespace (no file, no disk space
needed) named after its store: one JSON line ``{"pid", "state", "since", "now"}``.
``status`` asks it; no answer means no collector runs on that store.

The socket is served by a thread that only reads the last published snapshot, so the
collector's message path pays nothing for it. ``status`` believes an answer only from a
process of root, of its own user or of the store's owner (``SO_PEERCRED``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import struct
import threading
from pathlib import Path
from typing import Any

from fieldgate import store

log = logging.getLogger("fieldgate.live")

#: How long ``status`` waits for the collector's answer.
ASK_TIMEOUT_SECS = 2.0
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def socket_name(store_path: str | Path) -> bytes:
    """The abstract socket name of the collector of the store at ``store_path``."""
    digest = hashlib.sha256(str(Path(store_path).resolve()).encode()).hexdigest()[:32]
    return f"\0fieldgate-collector-{digest}".encode()


class LiveState:
    """The collector's end: publish with :meth:`set`, served until :meth:`close`.

    A forked child (the store writer) closes its inherited copy of the socket at once, so
    that it never answers for a collector that is gone.
    """

    def __init__(self, store_path: str | Path) -> None:
        self.state = "starting"
        self.since = store.now_ms()
        self._snapshot = b""
        self._publish()
        self._sock: socket.socket | None = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.bind(socket_name(store_path))
        except OSError as exc:
            self._sock.close()
            self._sock = None
            log.warning(
                "cannot answer 'fieldgate status' on the collector's socket (%s): another "
                "collector runs on store %s?",
                exc.strerror,
                store_path,
            )
            return
        self._sock.listen(8)
        os.register_at_fork(after_in_child=self._forget)
        threading.Thread(target=self._serve, name="fieldgate-live", daemon=True).start()

    def set(self, state: str) -> None:
        """Publish ``state``; ``since`` moves only when the state changes."""
        if state != self.state:
            self.state = state
            self.since = store.now_ms()
            self._publish()

    def _publish(self) -> None:
        self._snapshot = json.dumps(
            {"pid": os.getpid(), "state": self.state, "since": self.since}
        ).encode()

    def _serve(self) -> None:
        sock = self._sock
        while sock is not None:
            try:
                peer, _ = sock.accept()
            except OSError:
                return  # closed
            with peer:
                peer.settimeout(1.0)
                with contextlib.suppress(OSError):
                    now = f',"now":{store.now_ms()}}}\n'.encode()
                    peer.sendall(self._snapshot[:-1] + now)

    def _forget(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
            self._sock = None


def ask(store_path: str | Path, timeout: float = ASK_TIMEOUT_SECS) -> dict[str, Any] | None:
    """The live state of the collector of ``store_path``, or None when none answers."""
    trusted = {0, os.getuid()}
    with contextlib.suppress(OSError):
        trusted.add(Path(store_path).stat().st_uid)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(socket_name(store_path))
            _, uid, _ = _CRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size)
            )
            if uid not in trusted:
                log.warning("ignoring the collector socket of store %s: uid %d", store_path, uid)
                return None
            data = b""
            while len(data) < 4096 and not data.endswith(b"\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
        except OSError:
            return None
    try:
        answer = json.loads(data)
    except ValueError:
        return None
    if not isinstance(answer, dict) or not isinstance(answer.get("state"), str):
        return None
    if not all(isinstance(answer.get(k), int) for k in ("pid", "since", "now")):
        return None
    return answer
