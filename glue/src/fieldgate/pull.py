"""Pull mode: the gateway converges itself with ``ansible-pull`` and records how it went.

The ``fieldgate_pull`` role runs ``fieldgate pull-run --result-file FILE -- ansible-pull …``
from a systemd timer. :func:`run_and_record` runs the command, passes its output through
(to the journal), reads the outcome from Ansible's play recap and writes it to the result
file as one small JSON object, atomically, also when the run failed. ``fieldgate status``
reads it back (:func:`pull_status`, from ``pull.result_file``), so it reaches the hub with
every heartbeat.

What is recorded never holds a value of the run: the recap's counts, the exit status, the
commit checked out, and for a failure the name of the task that failed or Ansible's one-line
``ERROR!`` (cut at :data:`REASON_CHARS`), never a task's output.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from fieldgate import store
from fieldgate.errors import FieldgateError
from fieldgate.fsutil import atomic_write, load_small_json

#: The result file is a few hundred bytes; anything larger is not ours.
MAX_BYTES = 16 * 1024
#: The longest reason recorded.
REASON_CHARS = 200

_RECAP = re.compile(
    r"^(?P<host>\S+)\s+:\s+ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+"
    r"unreachable=(?P<unreachable>\d+)\s+failed=(?P<failed>\d+)"
    r"(?:\s+skipped=(?P<skipped>\d+))?"
)
_TASK = re.compile(r"^(?:TASK|RUNNING HANDLER) \[(?P<name>.*)\] \*+$")
_FATAL = re.compile(r"^fatal: \[[^\]]+\]")
_ERROR = re.compile(r"^(?:\[ERROR\]: |ERROR! )(?P<msg>.+)")
# the git module's answer to ansible-pull's checkout: "after": "<sha>"
_COMMIT = re.compile(r'"after":\s*"(?P<sha>[0-9a-f]{40})"')
_COUNTS = ("ok", "changed", "unreachable", "failed", "skipped")


class RecapReader:
    """Reads a run's output line by line and keeps what the result needs."""

    def __init__(self) -> None:
        self.recaps: dict[str, dict[str, int]] = {}
        self.commit: str | None = None
        self.task: str | None = None
        self.failed_task: str | None = None
        self.error: str | None = None
        self._in_recap = False

    def feed(self, line: str) -> None:
        line = line.rstrip("\r\n")
        if line.startswith("PLAY RECAP"):
            self._in_recap = True
            return
        if self._in_recap:
            m = _RECAP.match(line)
            if m:
                self.recaps[m["host"]] = {k: int(m[k] or 0) for k in _COUNTS}
            return
        if m := _TASK.match(line):
            self.task = m["name"]
        elif _FATAL.match(line) and self.failed_task is None:
            self.failed_task = self.task or "(no task)"
        elif (m := _ERROR.match(line)) and self.error is None:
            self.error = m["msg"][:REASON_CHARS]
        elif m := _COMMIT.search(line):
            self.commit = m["sha"]

    def totals(self) -> dict[str, int] | None:
        """The recap's counts summed over its hosts (pull mode converges one), or None when
        no playbook ran to its recap."""
        if not self.recaps:
            return None
        return {k: sum(r[k] for r in self.recaps.values()) for k in _COUNTS}


def outcome(
    reader: RecapReader, exit_code: int, started_ms: int, finished_ms: int
) -> dict[str, Any]:
    """The result record of a finished run."""
    totals = reader.totals()
    ok = exit_code == 0 and (totals is None or not (totals["failed"] or totals["unreachable"]))
    record: dict[str, Any] = {
        "result": "ok" if ok else "failed",
        "started_ms": started_ms,
        "finished_ms": finished_ms,
        "duration_secs": round((finished_ms - started_ms) / 1000, 1),
        "exit_code": exit_code,
        "hosts": sorted(reader.recaps),
        "commit": reader.commit,
        "played": totals is not None,
        **(totals or {k: 0 for k in _COUNTS}),
    }
    if not ok:
        if reader.failed_task:
            reason = f"task failed: {reader.failed_task}"
        elif reader.error:
            reason = reader.error
        elif exit_code < 0:
            reason = f"stopped by signal {-exit_code}"
        else:
            reason = f"exit status {exit_code}"
        record["reason"] = reason[:REASON_CHARS]
    elif totals is None:
        record["reason"] = "no playbook ran (the checkout had not changed)"
    return record


def run_and_record(argv: Sequence[str], result_file: Path, out: IO[str] | None = None) -> int:
    """Run ``argv`` (ansible-pull and its options), pass its output through to ``out``
    (standard output: the journal under systemd), write the result to ``result_file`` and
    return the command's exit status. SIGTERM and SIGINT are passed on to the command."""
    out = out or sys.stdout
    if not argv:
        raise FieldgateError("pull-run: give the command to run after --")
    if not result_file.parent.is_dir():
        raise FieldgateError(f"pull-run: {result_file.parent} is not a directory")
    reader = RecapReader()
    started = store.now_ms()
    env = {**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0"}
    env["ANSIBLE_STDOUT_CALLBACK"] = "ansible.builtin.default"  # the recap this reads
    try:
        proc = subprocess.Popen(
            list(argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            env=env,
        )
    except OSError as exc:
        reader.error = f"cannot run {argv[0]}: {exc.strerror or exc}"
        _write(result_file, outcome(reader, 127, started, store.now_ms()))
        raise FieldgateError(reader.error) from exc

    def forward(signum: int, _frame: Any) -> None:
        proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            reader.feed(line)
        out.flush()
        code = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    _write(result_file, outcome(reader, code, started, store.now_ms()))
    return code


def _write(path: Path, record: dict[str, Any]) -> None:
    # readable by the service user: status (and the heartbeat) runs as it
    atomic_write(path, (json.dumps(record, sort_keys=True) + "\n").encode(), mode=0o644)


def pull_status(path: str | None) -> dict[str, Any] | None:
    """The last pull run for ``status`` (None when ``pull.result_file`` is not set).

    ``{"file", "state": "none" | "recorded" | "unreadable", "result": "ok" | "failed",
    "last_run", "age_secs", "duration_secs", "changed", "ok", "failed", "unreachable",
    "skipped", "exit_code", "commit", "played", "reason"}``; ``none``: no pull run has
    finished on this gateway (it is converged by push).
    """
    if not path:
        return None
    return load_small_json(path, MAX_BYTES, "a pull-run result", _recorded, {})


def _recorded(data: Any) -> dict[str, Any]:
    if data["result"] not in ("ok", "failed"):
        raise ValueError(f"result {data['result']!r}")
    finished = int(data["finished_ms"])
    commit = data.get("commit")
    reason = data.get("reason")
    return {
        "state": "recorded",
        "result": data["result"],
        "last_run": store.iso_utc(finished),
        "age_secs": round(max(0, store.now_ms() - finished) / 1000, 1),
        "duration_secs": float(data["duration_secs"]),
        "exit_code": int(data["exit_code"]),
        "played": bool(data["played"]),
        **{k: int(data[k]) for k in _COUNTS},
        "commit": commit if isinstance(commit, str) and re.fullmatch("[0-9a-f]{40}", commit)
        else None,
        "reason": str(reason)[:REASON_CHARS] if reason is not None else None,
    }  # fmt: skip


def render_pull(p: dict[str, Any] | None) -> list[str]:
    """The line of ``status`` (none when no result file is configured)."""
    if p is None:
        return []
    if p["state"] == "none":
        return ["pull run        never (this gateway is converged by push)"]
    if p["state"] == "unreadable":
        return [f"pull run        unknown: {p['file']}: {p['error']}"]
    commit = f", commit {p['commit'][:12]}" if p["commit"] else ""
    when = f"at {p['last_run']} ({store.age_text(p['age_secs'])} ago)"
    if p["result"] == "ok" and p["played"]:
        what = f"ok, changed={p['changed']} in {p['duration_secs']:.0f} s"
    elif p["result"] == "ok":
        what = f"ok, {p['reason']}"
    else:
        what = f"FAILED after {p['duration_secs']:.0f} s: {p['reason']}"
    return [f"pull run        {what} {when}{commit}"]
