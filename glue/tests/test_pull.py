"""Pull mode's record: ``fieldgate pull-run`` around a real ``ansible-pull`` from a local git
repository (a file path, no network), and what ``status`` makes of the result file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from support import FIELDGATE, ConfigFactory, run_fieldgate

ANSIBLE_PULL = str(Path(sys.executable).parent / "ansible-pull")

PLAYBOOK = """\
- name: A gateway converging itself
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Write the marker
      ansible.builtin.copy:
        content: "converged\\n"
        dest: "{{ marker }}"
        mode: "0644"
    - name: Fail when asked to
      ansible.builtin.command: /bin/sh -c 'echo the-task-output-Zq81; exit 3'
      changed_when: false
      when: fail | bool
"""


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def _repo(tmp_path: Path) -> Path:
    repo = tmp_path / "site.git"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    (repo / "local.yml").write_text(PLAYBOOK)
    _git(repo, "add", "local.yml")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@example.org", "commit", "-qm", "site")
    return repo


def _pull(
    tmp_path: Path, repo: str, result: Path, *, fail: bool = False
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOME": str(tmp_path / "home"), "ANSIBLE_LOCAL_TEMP": str(tmp_path / "at")}
    return subprocess.run(
        [
            FIELDGATE, "pull-run", "--result-file", str(result),
            "--", ANSIBLE_PULL, "-U", repo, "-d", str(tmp_path / "checkout"), "-C", "main",
            "-e", f"marker={tmp_path / 'marker'}", "-e", f"fail={fail}", "local.yml",
        ],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )  # fmt: skip


def test_a_pull_run_is_recorded_and_a_second_one_changes_nothing(
    tmp_path: Path, config_file: ConfigFactory
) -> None:
    repo = _repo(tmp_path)
    result = tmp_path / "pull-result.json"
    first = _pull(tmp_path, str(repo), result)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "PLAY RECAP" in first.stdout  # the output is passed through
    rec = json.loads(result.read_text())
    assert rec["result"] == "ok" and rec["played"] and rec["changed"] == 1, rec
    assert rec["commit"] == _git(repo, "rev-parse", "HEAD")
    assert rec["failed"] == 0 and rec["exit_code"] == 0
    assert rec["finished_ms"] >= rec["started_ms"]
    assert oct(result.stat().st_mode & 0o777) == "0o644"

    second = _pull(tmp_path, str(repo), result)
    assert second.returncode == 0, second.stdout + second.stderr
    rec = json.loads(result.read_text())
    assert (rec["result"], rec["changed"]) == ("ok", 0), rec

    config = config_file(overrides={"pull": {"result_file": str(result)}})
    status = json.loads(run_fieldgate("status", "--json", config=config).stdout)["pull"]
    assert status["state"] == "recorded"
    assert (status["result"], status["changed"], status["played"]) == ("ok", 0, True)
    assert status["commit"] == rec["commit"] and status["reason"] is None
    assert status["duration_secs"] == rec["duration_secs"]
    text = run_fieldgate("status", config=config).stdout
    assert "pull run        ok, changed=0 in " in text
    assert f"commit {rec['commit'][:12]}" in text


def test_a_failed_run_names_the_task_and_keeps_its_output_out(
    tmp_path: Path, config_file: ConfigFactory
) -> None:
    repo = _repo(tmp_path)
    result = tmp_path / "pull-result.json"
    run = _pull(tmp_path, str(repo), result, fail=True)
    assert run.returncode != 0
    rec = json.loads(result.read_text())
    assert rec["result"] == "failed" and rec["failed"] == 1, rec
    assert rec["reason"] == "task failed: Fail when asked to"
    assert "Zq81" not in result.read_text()  # the task's output is in the journal only
    assert "the-task-output-Zq81" in run.stdout
    config = config_file(overrides={"pull": {"result_file": str(result)}})
    text = run_fieldgate("status", config=config).stdout
    assert "pull run        FAILED after " in text
    assert ": task failed: Fail when asked to at " in text


def test_a_repository_that_cannot_be_checked_out_is_a_failed_run(tmp_path: Path) -> None:
    result = tmp_path / "pull-result.json"
    run = _pull(tmp_path, str(tmp_path / "no-such-repo"), result)
    assert run.returncode != 0
    rec = json.loads(result.read_text())
    assert rec["result"] == "failed" and not rec["played"], rec
    assert rec["reason"]


def test_a_command_that_does_not_exist_is_recorded_in_one_line(tmp_path: Path) -> None:
    result = tmp_path / "pull-result.json"
    run = run_fieldgate(
        "pull-run", "--result-file", str(result), "--", str(tmp_path / "no-ansible-pull")
    )
    assert run.returncode == 1
    assert run.stderr.startswith("fieldgate: error: cannot run ")
    assert json.loads(result.read_text())["result"] == "failed"


def test_status_without_a_run_and_with_a_file_that_is_not_a_result(
    tmp_path: Path, config_file: ConfigFactory
) -> None:
    missing = tmp_path / "none.json"
    config = config_file(overrides={"pull": {"result_file": str(missing)}}, name="a.yaml")
    assert json.loads(run_fieldgate("status", "--json", config=config).stdout)["pull"] == {
        "file": str(missing),
        "state": "none",
    }
    assert "pull run        never (this gateway is converged by push)" in (
        run_fieldgate("status", config=config).stdout
    )
    bad = tmp_path / "bad.json"
    bad.write_text('{"result": "splendid"}')
    config = config_file(overrides={"pull": {"result_file": str(bad)}}, name="b.yaml")
    assert f"pull run        unknown: {bad}: not a pull-run result" in (
        run_fieldgate("status", config=config).stdout
    )
    huge = tmp_path / "huge.json"
    huge.write_bytes(b" " * (64 * 1024))
    config = config_file(overrides={"pull": {"result_file": str(huge)}}, name="c.yaml")
    got = json.loads(run_fieldgate("status", "--json", config=config).stdout)["pull"]
    assert got["state"] == "unreadable" and "larger than" in got["error"]


def test_status_leaves_pull_out_when_no_result_file_is_configured(
    config_file: ConfigFactory,
) -> None:
    config = config_file()
    assert json.loads(run_fieldgate("status", "--json", config=config).stdout)["pull"] is None
    assert "pull run" not in run_fieldgate("status", config=config).stdout
