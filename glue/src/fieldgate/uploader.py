"""``fieldgate upload`` and ``register``: store-and-forward to the hub (docs/contract.md §6).

Each cycle cuts the unbatched readings into batches and sends the pending ones oldest
first, with the two-step protocol: ``POST /api/v1/batches`` (manifest, Bearer key) →
``201 {"upload_url"}`` → ``PUT upload_url`` (the zip) → ``201``; or ``200 {"state":
"stored"}`` when the hub already has the batch (a crash between the hub's 201 and our mark).
Only after the hub said stored is the batch marked uploaded and its file moved on.
Every ``upload.interval_secs``, with or without batches, the uploader posts the gateway's
``status --json`` to ``POST /api/v1/heartbeat`` (the hub calls a gateway late without one
for 3 intervals); a heartbeat that fails is logged and never holds up the uploads.

Failures are of two kinds:
- transient (hub unreachable, timeout, 5xx, 408/429, an expired upload URL, a body cut
  off): retried with capped exponential backoff and jitter, forever;
- refused (a 4xx retrying cannot fix: bad key, manifest rejected): logged once with the
  hub's reason, counted in ``upload.rejected_by_hub`` for ``status``, the batch kept and
  tried again at the longest backoff (a fixed key file is picked up without a restart).

A damaged upload (400: not a zip, cut off; 409: checksum mismatch) is checked against the
file here: a sound file is sent again (the bytes broke on the way), a rotten one is
regenerated from the store when its readings are still there.
"""

from __future__ import annotations

import contextlib
import email.utils
import fcntl
import logging
import math
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import urljoin

import requests

from fieldgate import __version__, batches, fsutil, store
from fieldgate.batches import Batch, crash_point
from fieldgate.config import Config
from fieldgate.daemon import StopFlag
from fieldgate.errors import FieldgateError
from fieldgate.redact import origin, redact
from fieldgate.retry import Backoff, root_cause

log = logging.getLogger("fieldgate.uploader")

#: Attempts per batch for ``upload --once`` before it reports the batch as not delivered.
ONCE_ATTEMPTS = 4


_DIGITS = re.compile(r"\d+")


class Transient(Exception):
    """A failure retrying can fix."""


class Refused(Exception):
    """The hub refused the batch for a reason retrying will not fix."""


class Damaged(Exception):
    """The hub found the zip damaged (400) or its CSV not matching the sha256 (409): either
    the bytes broke in transit (send again) or the file on disk rotted (regenerate)."""


def _hub_error(resp: requests.Response, credential: str = "") -> str:
    """The hub's one-sentence reason, or the HTTP status when it sent none; whatever of
    ``credential`` (the upload URL) the hub echoes, hidden."""
    try:
        body = resp.json()
        if isinstance(body, dict) and body.get("error"):
            return redact(f"HTTP {resp.status_code}: {body['error']}", credential)
    except ValueError:
        pass
    return redact(f"HTTP {resp.status_code} {resp.reason}", credential)


def _classify(resp: requests.Response, what: str, credential: str = "") -> Exception:
    status = resp.status_code
    reason = f"{what}: {_hub_error(resp, credential)}"
    if status >= 500 or status in (408, 425, 429):
        return Transient(reason)
    return Refused(reason)


class HubClient:
    """The gateway side of docs/contract.md §6 over one ``requests.Session``."""

    def __init__(self, cfg: Config) -> None:
        if not cfg.upload.url:
            raise FieldgateError(f"{cfg.path}: upload.url is not set; nowhere to upload to")
        self.cfg = cfg
        self.base = cfg.upload.url.rstrip("/") + "/"
        self.timeout = cfg.upload.timeout_secs
        self.session = requests.Session()
        self.session.headers["User-Agent"] = f"fieldgate/{__version__}"

    def close(self) -> None:
        self.session.close()

    def _key(self) -> str:
        # Read every time: re-registering fixes a refused key without a restart.
        return self.cfg.secret("upload.key_file")

    def _request(
        self, method: str, url: str, *, credential: bool = False, **kw: Any
    ) -> requests.Response:
        """One request; Transient with a one-line cause. A ``credential`` URL (an upload
        URL) is named by its origin, and hidden in every text of the failure."""
        shown = origin(url) if credential else url
        try:
            return self.session.request(method, url, timeout=self.timeout, **kw)
        except requests.Timeout:
            cause = f"no answer within {self.timeout:g} s"
        except requests.ConnectionError as exc:
            cause = f"cannot reach the hub: {root_cause(exc)}"
        except requests.RequestException as exc:
            cause = str(exc)
        text = f"{method} {shown}: {cause}"
        raise Transient(redact(text, url) if credential else redact(text)) from None

    def offer(self, manifest: dict[str, Any]) -> str | None:
        """POST the manifest; the upload URL, or None when the hub already stored the batch."""
        url = urljoin(self.base, "api/v1/batches")
        resp = self._request(
            "POST", url, json=manifest, headers={"Authorization": f"Bearer {self._key()}"}
        )
        body = _json(resp)
        if resp.status_code == 200 and body.get("state") == "stored":
            return None
        if resp.status_code == 201 and body.get("upload_url"):
            given = str(body["upload_url"])
            try:
                return urljoin(self.base, given)
            except ValueError:  # e.g. "http://[…": a hub's bug, a credential all the same
                raise Transient(
                    f"POST {url}: the upload URL in the answer is not a URL "
                    f"({redact(origin(given), given)})"
                ) from None
        if resp.status_code in (200, 201):
            # the answer may hold an upload URL, whole or relative: hidden before it is cut
            given = str(body.get("upload_url") or "")
            answer = redact(resp.text, urljoin(self.base, given) if given else "", given)
            raise Transient(f"POST {url}: unexpected answer {answer[:200]!r}")
        raise _classify(resp, "the hub refused the batch manifest")

    def put(self, upload_url: str, path: Path) -> None:
        """PUT the zip to the upload URL; returns once the hub stored it."""
        with path.open("rb") as body:
            resp = self._request(
                "PUT",
                upload_url,
                credential=True,
                data=body,
                headers={"Content-Type": "application/zip"},
            )
        if resp.status_code in (200, 201):
            return
        if resp.status_code in (401, 403):
            # An upload URL expires; a fresh one is one POST away.
            raise Transient(f"the hub refused the upload URL: {_hub_error(resp, upload_url)}")
        if resp.status_code in (400, 409):
            raise Damaged(f"the hub refused the batch file: {_hub_error(resp, upload_url)}")
        raise _classify(resp, "the hub refused the batch file", upload_url)

    def heartbeat(self, status: dict[str, Any]) -> None:
        """POST the gateway's status to the hub (docs/contract.md §11)."""
        url = urljoin(self.base, "api/v1/heartbeat")
        resp = self._request(
            "POST", url, json=status, headers={"Authorization": f"Bearer {self._key()}"}
        )
        if resp.status_code not in (200, 204):
            raise _classify(resp, "the hub refused the heartbeat")

    def register(self, serial: str, pin: str) -> str:
        url = urljoin(self.base, "api/v1/register")
        resp = self._request("POST", url, json={"pin": pin, "serial": serial})
        if resp.status_code == 201 and _json(resp).get("gateway_key"):
            return str(_json(resp)["gateway_key"])
        if resp.status_code == 429:
            # too many attempts for this serial or address: waiting is the only fix
            wait = _retry_after(resp)
            when = f"retry after {wait} s" if wait is not None else "retry later"
            said = _json(resp).get("error")
            raise FieldgateError(
                f"the hub at {self.cfg.upload.url} refused the registration: rate limited, "
                f"{when}" + (f" ({said})" if said else "")
            )
        raise FieldgateError(
            f"the hub at {self.cfg.upload.url} refused the registration: {_hub_error(resp)}"
        )


def _retry_after(resp: requests.Response) -> int | None:
    """``Retry-After`` in seconds (delay-seconds or an HTTP date), None when absent or
    unreadable."""
    value = resp.headers.get("Retry-After", "").strip()
    if value.isdigit():
        return int(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0, math.ceil(when.timestamp() - time.time()))


def _json(resp: requests.Response) -> dict[str, Any]:
    try:
        body = resp.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


@contextlib.contextmanager
def uploader_lock(cfg: Config) -> Iterator[None]:
    """One uploader per pending directory (two would cut the same readings)."""
    pending, _ = batches.ensure_dirs(cfg)
    lock_path = pending / ".lock"
    fd: IO[bytes] = lock_path.open("ab")
    try:
        try:
            fcntl.flock(fd.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FieldgateError(
                f"another 'fieldgate upload' is running for {pending} (lock {lock_path})"
            ) from None
        yield
    finally:
        fd.close()


class Uploader:
    """The state of one uploader process: its store connection, hub client and counters."""

    def __init__(self, cfg: Config, conn: sqlite3.Connection) -> None:
        self.cfg = cfg
        self.conn = conn
        self.client = HubClient(cfg) if cfg.upload.mode != "PASS" else None
        self.backoff = Backoff(
            cfg.upload.retry_initial_secs, cfg.upload.retry_max_secs, jitter=True
        )
        self._logged_refusal: tuple[str, str] | None = None
        self._heartbeat_error: str | None = None

    def close(self) -> None:
        if self.client:
            self.client.close()

    def heartbeat(self) -> None:
        """Send this gateway's status to the hub; a failure is logged (once until the next
        success), never raised: heartbeats never stop uploads."""
        if self.client is None:
            return
        # here, not at the top: ``upload --once`` never sends a heartbeat
        from fieldgate.status import collect_status

        try:
            self.client.heartbeat(collect_status(self.cfg))
        except Exception as exc:  # any cause: the uploads go on
            reason = str(exc) or type(exc).__name__
            # The same failure with other figures (a refused heartbeat's size grows with the
            # status) is not news: logged again only when the kind of failure changes.
            kind = _DIGITS.sub("#", reason)
            if kind != self._heartbeat_error:
                log.warning("heartbeat not sent: %s", reason)
                self._heartbeat_error = kind
            return
        if self._heartbeat_error is not None:
            log.info("heartbeat sent again")
            self._heartbeat_error = None

    def deliver(self, batch: Batch) -> None:
        """Send one batch until the hub has it, then mark it; raises Transient or Refused."""
        pending_dir, _ = batches.ensure_dirs(self.cfg)
        path = pending_dir / batch.file
        if self.client is not None:
            manifest = batch.manifest(self.cfg.site.serial)
            upload_url = self.client.offer(manifest)
            if upload_url is None:
                log.info("batch %s: the hub already has it", batch.batch_id)
            else:
                self.client.put(upload_url, path)
            crash_point("after_put")
        self.mark_uploaded(batch)

    def mark_uploaded(self, batch: Batch) -> None:
        """Mark a batch the hub stored; in PASS mode, one passed without sending, recorded as
        PASS whatever mode it was cut in (prune deletes only readings a hub stored)."""
        now = store.now_ms()
        passed = self.client is None
        with store.transaction(self.conn):
            self.conn.execute(
                "UPDATE batches SET state = 'uploaded', uploaded_at = ?, last_error = NULL, "
                "attempts = attempts + 1, mode = CASE WHEN ? THEN 'PASS' ELSE mode END "
                "WHERE batch_id = ?",
                (now, passed, batch.batch_id),
            )
            verb = "passed (PASS mode, not sent)" if self.cfg.upload.mode == "PASS" else "uploaded"
            store.set_state(self.conn, "upload.last_success", f"batch {batch.batch_id} {verb}")
        batches.finish_file(self.cfg, batch)
        log.info("batch %s: %s (%d readings)", batch.batch_id, verb, batch.rows)
        self._logged_refusal = None

    def record_failure(self, batch: Batch, exc: Exception) -> None:
        """Keep the cause where ``status`` shows it; log a refusal only once."""
        msg = f"batch {batch.batch_id}: {exc}"
        refused = isinstance(exc, Refused)
        with store.transaction(self.conn):
            self.conn.execute(
                "UPDATE batches SET attempts = attempts + 1, last_error = ? WHERE batch_id = ?",
                (str(exc), batch.batch_id),
            )
            store.set_state(self.conn, "upload.last_error", msg)
            if refused and self._logged_refusal != (batch.batch_id, str(exc)):
                state = store.get_state(self.conn).get("upload.rejected_by_hub")
                count = int(state[0]) + 1 if state else 1
                store.set_state(self.conn, "upload.rejected_by_hub", str(count))
                store.add_event(self.conn, "upload", msg)
        if refused:
            if self._logged_refusal != (batch.batch_id, str(exc)):
                log.error("%s; the batch is kept and retried later", msg)
                self._logged_refusal = (batch.batch_id, str(exc))
        else:
            log.warning("%s; retrying", msg)

    def attempt(self, batch: Batch) -> Exception | None:
        """One delivery attempt with the 409 repair; the failure, or None on success."""
        try:
            self.deliver(batch)
        except Damaged as exc:
            problem = batches.file_problem(self.cfg, batch)
            if problem is None:  # the file is sound: the bytes broke on the way
                failure: Exception = Transient(f"{exc} (the file here is sound; sending again)")
            elif batches.regenerate(self.conn, self.cfg, batch):
                log.warning("batch %s: %s; regenerated from the store", batch.batch_id, problem)
                failure = Transient(f"{exc} ({problem}; regenerated from the store)")
            else:
                failure = Refused(f"{exc} ({problem}; its readings are no longer in the store)")
            self.record_failure(batch, failure)
            return failure
        except (Transient, Refused) as exc:
            self.record_failure(batch, exc)
            return exc
        except FieldgateError as exc:  # the key file went missing or unreadable
            failure = Refused(str(exc))
            self.record_failure(batch, failure)
            return failure
        except OSError as exc:  # the batch file itself (unreadable, vanished)
            failure = Transient(f"reading {exc.filename}: {exc.strerror}")
            self.record_failure(batch, failure)
            batches.repair(self.conn, self.cfg, batch)
            return failure
        return None

    def drain(self, stop: StopFlag) -> Exception | None:
        """Cut every unbatched reading and send every pending batch, oldest first.

        A cutter thread (its own store connection) cuts batches while this thread sends
        the ones already cut, so zipping and the hub's ingest overlap. Sending stops at the
        first failure and returns it; the cutter still finishes (the backlog is on disk in
        batches either way).
        """
        cutter = Cutter(self.cfg, stop)
        cutter.start()
        try:
            while not stop.is_set():
                pending = batches.pending_batches(self.conn)
                if not pending:
                    if cutter.finished():
                        cutter.join()
                        if not batches.pending_batches(self.conn):
                            return None
                        continue
                    cutter.wait_for_batch(0.5)
                    continue
                for batch in pending:
                    if stop.is_set():
                        return None
                    failure = self.attempt(batch)
                    if failure is not None:
                        return failure
                    self.backoff.reset()
            return None
        finally:
            cutter.join()


class Cutter(threading.Thread):
    """Cuts all unbatched readings into batches in the background, one commit per batch."""

    def __init__(self, cfg: Config, stop: StopFlag) -> None:
        super().__init__(name="fieldgate-cutter", daemon=True)
        self.cfg = cfg
        self.stop = stop
        self.error: BaseException | None = None
        self._cut = threading.Condition()
        self._done = False

    def run(self) -> None:
        try:
            conn = store.open_store(
                self.cfg.store.path, busy_timeout_ms=self.cfg.store.busy_timeout_ms
            )
            try:
                while not self.stop.is_set():
                    batch = batches.cut_batch(conn, self.cfg)
                    if batch is None:
                        break
                    log.info("cut batch %s: %d readings", batch.batch_id, batch.rows)
                    with self._cut:
                        self._cut.notify_all()
            finally:
                conn.close()
        except BaseException as exc:  # re-raised in the sending thread by join()
            self.error = exc
        finally:
            with self._cut:
                self._done = True
                self._cut.notify_all()

    def finished(self) -> bool:
        with self._cut:
            return self._done

    def wait_for_batch(self, timeout: float) -> None:
        with self._cut:
            if not self._done:
                self._cut.wait(timeout)

    def join(self, timeout: float | None = None) -> None:
        super().join(timeout)
        if self.error is not None:
            error, self.error = self.error, None
            raise error


#: Seconds a stop request waits for the step in flight (a POST or PUT to a slow hub)
#: before the process exits anyway; docs/contract.md §3 allows 10 s in all.
STOP_GRACE_SECS = 8.0
#: How often the main thread looks at the stop flag while the work runs (a stop is seen
#: this late at most: with STOP_GRACE_SECS, 8.5 s in all, within §3's 10 s).
STOP_POLL_SECS = 0.5


def serve(cfg: Config, *, once: bool, stop: StopFlag) -> int:
    """Run the uploader until ``stop`` (or, with ``once``, until everything is delivered).

    The work runs in a thread so that a stop is honoured within seconds even while a
    request to a hub that stopped answering is in flight: abandoning it is safe, since a
    batch is only marked after the hub said stored (the next start asks again and gets
    ``200 stored``), and every store write is a transaction.
    """
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["rc"] = _run(cfg, once, stop)
        except BaseException as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=work, name="fieldgate-upload", daemon=True)
    worker.start()
    while worker.is_alive():
        # Returns as soon as the work ends (not at the next tick: ``--once`` exits at once);
        # a stop (the signal handler runs meanwhile) is seen within STOP_POLL_SECS.
        worker.join(STOP_POLL_SECS)
        if stop.is_set():
            worker.join(STOP_GRACE_SECS)
            if worker.is_alive():
                log.warning(
                    "stopping with a request to the hub in flight; the batch is sent again "
                    "at the next start"
                )
                return 0
    worker.join()
    if "error" in outcome:
        raise outcome["error"]
    return int(outcome.get("rc", 0))


def _run(cfg: Config, once: bool, stop: StopFlag) -> int:
    conn = store.open_store(
        cfg.store.path, cfg.site.serial, busy_timeout_ms=cfg.store.busy_timeout_ms
    )
    try:
        with uploader_lock(cfg):
            batches.recover(conn, cfg)
            up = Uploader(cfg, conn)
            try:
                if once:
                    return _once(up, stop)
                _forever(up, stop)
            finally:
                up.close()
    finally:
        conn.close()
    return 0


def _once(up: Uploader, stop: StopFlag) -> int:
    failure: Exception | None = None
    attempts = 0
    while not stop.is_set():
        failure = up.drain(stop)
        if failure is None:
            break
        attempts += 1
        if isinstance(failure, Refused) or attempts >= ONCE_ATTEMPTS:
            break
        stop.wait(up.backoff.next())
    left = batches.pending_batches(up.conn)
    if failure is not None and left:
        rows = sum(b.rows for b in left)
        raise FieldgateError(
            f"{len(left)} batches ({rows} readings) not delivered, kept in "
            f"{up.cfg.upload.pending_dir}: {failure}"
        )
    log.info("upload --once: nothing left to send")
    return 0


def _forever(up: Uploader, stop: StopFlag) -> None:
    cfg = up.cfg
    log.info(
        "uploader started: mode %s, hub %s, every %g s",
        cfg.upload.mode,
        cfg.upload.url if cfg.upload.mode != "PASS" else "(none: PASS mode)",
        cfg.upload.interval_secs,
    )
    beat = time.monotonic()  # the first heartbeat goes after the first drain
    while not stop.is_set():
        failure = up.drain(stop)
        if failure is None:
            up.backoff.reset()
            wait = cfg.upload.interval_secs
        elif isinstance(failure, Refused):
            wait = cfg.upload.retry_max_secs
        else:
            wait = up.backoff.next()
        # a heartbeat every interval, whether or not there was anything to send, also
        # while a refused batch waits the longest backoff
        until = time.monotonic() + wait
        while not stop.is_set():
            now = time.monotonic()
            if now >= beat:
                up.heartbeat()
                beat = time.monotonic() + cfg.upload.interval_secs
            if now >= until:
                break
            stop.wait(max(0.0, min(until, beat) - time.monotonic()))
    log.info("uploader stopped (%s)", stop.signal_name or "stop requested")


def write_key_file(path: Path, key: str) -> None:
    """Write the gateway key atomically with mode 0600 (never readable by others, not even
    for an instant)."""
    if not path.parent.is_dir():
        raise FieldgateError(f"upload.key_file: directory {path.parent} does not exist")
    fsutil.atomic_write(path, (key + "\n").encode("utf-8"), mode=0o600)


def register(cfg: Config, pin: str) -> Path:
    """Exchange a one-time PIN for this gateway's key; write the key file, return its path."""
    client = HubClient(cfg)
    try:
        try:
            key = client.register(cfg.site.serial, pin.strip())
        except Transient as exc:
            raise FieldgateError(str(exc)) from None
    finally:
        client.close()
    path = Path(cfg.upload.key_file)
    write_key_file(path, key)
    return path


__all__ = ["HubClient", "Uploader", "register", "serve", "write_key_file"]
