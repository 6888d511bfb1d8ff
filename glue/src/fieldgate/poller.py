"""``fieldgate poll [--once]``: readings from HTTP nodes that cannot publish to the broker,
and from Modbus devices (:mod:`fieldgate.modbus.poller`, run beside the nodes by
:func:`serve` and :func:`poll_once`).

Every node in ``poll.nodes`` is fetched (HTTP GET) every ``poll.interval_secs`` with a timeout
(the node's ``timeout_secs`` or ``poll.timeout_secs``). Each fetch runs in its own worker
thread and each node keeps its own schedule, so a dead or slow node never delays the others:
while a node's request is still out, its next turn is skipped, not queued. A body is read
in the node's ``format`` like an input's payload (docs/inputs.md: the native payloads of
docs/contract.md §4 by default, or an ISEMS node's CSV log, a device's JSON status page …),
validated by :mod:`fieldgate.readings` and stored in the main thread (one store connection,
one transaction per node response); readings without a time of their own take the time the
answer arrived. Bodies over ``mqtt.max_payload_bytes`` are rejected like oversized MQTT
messages.

``--once`` polls every node and Modbus device once and exits: 0 when every one answered with
readings, otherwise 1 with one line naming each failed node and device and why.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import requests

from fieldgate import __version__, store
from fieldgate.config import Config, PollNode
from fieldgate.daemon import StopFlag
from fieldgate.errors import ConfigError
from fieldgate.inputs import poll_input, read_message
from fieldgate.readings import Outcome, Received, Rules, store_outcomes
from fieldgate.retry import root_cause

if TYPE_CHECKING:
    from fieldgate.modbus.poller import DeviceResult, ModbusPoller

log = logging.getLogger("fieldgate.poller")


@dataclass
class Fetched:
    """What one request to a node gave: a body, or the reason there is none."""

    node: PollNode
    body: bytes | None
    error: str | None
    received_at: int


@dataclass
class NodeResult:
    """How one poll of a node ended, after validation and storage."""

    node: str
    ok: bool
    detail: str
    new_readings: int = 0


def fetch(node: PollNode, timeout: float, max_bytes: int) -> Fetched:
    """GET the node's URL; never raises (every failure becomes ``error``)."""
    headers = {"User-Agent": f"fieldgate/{__version__}", "Accept": "application/json, text/csv"}
    received_at = store.now_ms()
    try:
        with requests.get(node.url, timeout=timeout, stream=True, headers=headers) as resp:
            if resp.status_code != 200:
                reason = f" {resp.reason}" if resp.reason else ""
                return Fetched(node, None, f"HTTP {resp.status_code}{reason}", received_at)
            deadline = time.monotonic() + timeout
            chunks: list[bytes] = []
            size = 0
            for chunk in resp.iter_content(chunk_size=65536):
                chunks.append(chunk)
                size += len(chunk)
                if size > max_bytes:  # keep one byte over: the validator rejects it by size
                    break
                if time.monotonic() > deadline:
                    return Fetched(
                        node, None, f"timed out after {timeout:g} s (body too slow)", received_at
                    )
            return Fetched(node, b"".join(chunks), None, store.now_ms())
    except requests.Timeout:
        return Fetched(node, None, f"timed out after {timeout:g} s", received_at)
    except requests.ConnectionError as exc:
        return Fetched(node, None, f"cannot connect: {root_cause(exc)}", received_at)
    except requests.RequestException as exc:
        return Fetched(node, None, f"request failed: {root_cause(exc)}", received_at)


def _readings_text(outcome: Outcome) -> str:
    skipped = f", {outcome.skipped} values skipped (not numbers)" if outcome.skipped else ""
    return f"{len(outcome.readings)} readings{skipped}"


class Poller:
    """The nodes, their schedules and the store; :meth:`run` and :meth:`once` drive it."""

    def __init__(self, cfg: Config) -> None:
        if not cfg.poll.nodes:
            raise ConfigError(f"{cfg.path}: poll.nodes is empty: there is nothing to poll")
        self.cfg = cfg
        self.rules = Rules.from_config(cfg)
        self.inputs = {node.name: poll_input(node) for node in cfg.poll.nodes}
        self.conn = store.open_store(
            cfg.store.path, cfg.site.serial, busy_timeout_ms=cfg.store.busy_timeout_ms
        )
        #: Answers from the fetch threads, stored by the main thread.
        self.answers: queue.Queue[Fetched] = queue.Queue()
        self.last: dict[str, NodeResult] = {}

    def timeout(self, node: PollNode) -> float:
        return node.timeout_secs if node.timeout_secs is not None else self.cfg.poll.timeout_secs

    def submit(self, node: PollNode) -> None:
        """Fetch a node in its own daemon thread (a hung node cannot hold up a stop)."""

        def work() -> None:
            self.answers.put(fetch(node, self.timeout(node), self.rules.max_payload_bytes))

        threading.Thread(target=work, name=f"poll-{node.name}", daemon=True).start()

    def store_result(self, fetched: Fetched) -> NodeResult:
        """Validate and store one node's answer; the outcome for the log and status."""
        node = fetched.node
        if fetched.body is None:
            result = NodeResult(node.name, False, fetched.error or "no answer")
        else:
            at = fetched.received_at
            outcome = read_message(
                self.inputs[node.name],
                node.device,
                None,
                fetched.body,
                self.rules,
                stamp=at,
                now_ms=at,
            )
            item = Received(node.shown_url, fetched.body, at, outcome)
            try:
                with store.transaction(self.conn):
                    new = store_outcomes(self.conn, [item], source=f"poll:{node.name}")
                    store.set_state(
                        self.conn,
                        f"poller.node.{node.name}",
                        f"ok: {_readings_text(outcome)}"
                        if outcome.reason is None
                        else f"rejected: {outcome.reason}",
                    )
            except Exception:
                store.rollback_quietly(self.conn)
                raise
            if outcome.reason is None:
                result = NodeResult(node.name, True, _readings_text(outcome), new)
            elif outcome.readings:
                result = NodeResult(node.name, True, f"partly rejected: {outcome.reason}", new)
            else:
                result = NodeResult(node.name, False, f"rejected: {outcome.reason}")
        self.last[node.name] = result
        return result

    def publish_state(self, prefix: str) -> None:
        failed = [r for r in self.last.values() if not r.ok]
        summary = f"{len(self.last) - len(failed)} ok, {len(failed)} failed"
        if failed:
            summary += " (" + "; ".join(f"{r.node}: {r.detail}" for r in failed) + ")"
        with store.transaction(self.conn):
            store.set_state(self.conn, "poller.state", f"{prefix}: {summary}")

    def once(self) -> list[NodeResult]:
        """Poll every node once, concurrently; store every answer; publish the outcome."""
        for node in self.cfg.poll.nodes:
            self.submit(node)
        results = {}
        for _ in self.cfg.poll.nodes:
            fetched = self.answers.get()
            results[fetched.node.name] = self.store_result(fetched)
        self.publish_state("last --once run")
        for r in results.values():
            if r.ok:
                log.info("node %s: %s", r.node, r.detail)
        return [results[node.name] for node in self.cfg.poll.nodes]

    def run(self, stop: StopFlag) -> None:
        """Poll each node every interval until stopped; one slow node delays no other."""
        try:
            self._loop(stop)
        finally:
            with store.transaction(self.conn):
                store.set_state(self.conn, "poller.state", "stopped")
            log.info("stopped%s", f" on {stop.signal_name}" if stop.signal_name else "")

    def _loop(self, stop: StopFlag) -> None:
        interval = self.cfg.poll.interval_secs
        due = {node.name: 0.0 for node in self.cfg.poll.nodes}
        busy: set[str] = set()
        log.info("polling %d nodes every %g s", len(self.cfg.poll.nodes), interval)
        self.publish_state("running")
        while not stop.is_set():
            now = time.monotonic()
            for node in self.cfg.poll.nodes:
                if node.name in busy or now < due[node.name]:
                    continue
                self.submit(node)
                busy.add(node.name)
                due[node.name] = now + interval
            next_due = min(
                (t for name, t in due.items() if name not in busy), default=now + interval
            )
            wait_secs = max(0.05, min(0.5, next_due - time.monotonic()))
            try:
                fetched = self.answers.get(timeout=wait_secs)
            except queue.Empty:
                continue
            busy.discard(fetched.node.name)
            result = self.store_result(fetched)
            level = (
                logging.INFO if result.ok and "rejected" not in result.detail else logging.WARNING
            )
            log.log(
                level, "node %s (%s): %s", fetched.node.name, fetched.node.shown_url, result.detail
            )
            self.publish_state("running")

    def close(self) -> None:
        self.conn.close()


def _pollers(cfg: Config) -> tuple[Poller | None, ModbusPoller | None]:
    """The HTTP nodes' poller and the Modbus devices' (pymodbus is imported only for them)."""
    if not cfg.poll.nodes and not cfg.poll.modbus:
        raise ConfigError(
            f"{cfg.path}: poll.nodes and poll.modbus are empty: there is nothing to poll"
        )
    modbus = None
    if cfg.poll.modbus:
        from fieldgate.modbus.poller import ModbusPoller

        modbus = ModbusPoller(cfg)
    return (Poller(cfg) if cfg.poll.nodes else None), modbus


def poll_once(cfg: Config) -> tuple[list[NodeResult], list[DeviceResult]]:
    """Poll every HTTP node and every Modbus device once, side by side; store every answer."""
    nodes, modbus = _pollers(cfg)
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="modbus") as beside:
            devices = beside.submit(modbus.once) if modbus else None
            results = nodes.once() if nodes else []
            return results, devices.result() if devices else []
    finally:
        if nodes:
            nodes.close()
        if modbus:
            modbus.close()


def serve(cfg: Config, stop: StopFlag) -> None:
    """Poll the HTTP nodes here and the Modbus devices in a second thread until ``stop``;
    should either fail, both stop and the error is raised."""
    nodes, modbus = _pollers(cfg)
    try:
        if nodes is None:
            assert modbus is not None
            modbus.run(stop)
            return
        with ThreadPoolExecutor(1, thread_name_prefix="modbus") as beside:
            running = beside.submit(_until_failure, modbus, stop) if modbus else None
            try:
                nodes.run(stop)
            finally:
                stop.set()  # also when the nodes' loop failed: the Modbus thread ends
            if running:
                running.result()  # a Modbus poller that failed fails the command
    finally:
        if nodes:
            nodes.close()


def _until_failure(modbus: ModbusPoller, stop: StopFlag) -> None:
    """Run the Modbus poller; should it fail, stop the HTTP nodes too (the error is raised)."""
    try:
        modbus.run(stop)
    finally:
        stop.set()
