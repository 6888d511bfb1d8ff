#!/usr/bin/env bash
# Run every test of fieldgate on a Debian 12 machine (as root): installs what is missing,
# then lint (ruff, yamllint, ansible-lint, syntax checks), the glue's unit and integration
# tests against real Mosquitto/SQLite/HTTP/filesystems, and the Molecule scenarios on
# systemd-nspawn test hosts. This is what CI runs (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export PATH="$PWD/.venv/bin:$PATH"
SECONDS=0

stage() { printf '\n==== %s (t=%ss)\n' "$1" "$SECONDS"; }

stage "ruff"
ruff check glue bench scripts
ruff format --check glue bench scripts
# Python inside roles (the bundle's per-architecture steps) follows the scripts' settings.
mapfile -t role_py < <(find roles -name '*.py')
ruff check --config scripts/ruff.toml "${role_py[@]}"
ruff format --check --config scripts/ruff.toml "${role_py[@]}"
# Molecule's tests and test-host tools follow the glue's rules and format.
ruff check --config scripts/ruff.toml molecule
ruff format --check --config scripts/ruff.toml molecule

# Molecule runs beside lint and the glue tests: its scenarios spend most of their time waiting
# (test hosts booting, SSH round trips, services starting), not on the CPU. Its output goes to a
# file and is printed (then followed) after the glue tests, so the two never interleave. Every
# stage runs to its end; the run fails when any of them failed, naming them.
mol_log=$(mktemp /tmp/fieldgate-test-molecule.XXXXXX)
stage "molecule (in the background; its output is printed after the glue tests)"
# Started with job control: a process group of its own that does not ignore SIGINT, so that an
# interrupt here (passed on by stop_molecule) stops it and it takes its test hosts down.
set -m
bash scripts/molecule.sh >"$mol_log" 2>&1 &
mol=$!
set +m
stop_molecule() {
  if kill -0 "$mol" 2>/dev/null; then
    kill -INT -- "-$mol" 2>/dev/null || true
    wait "$mol" 2>/dev/null || true
    cat "$mol_log"
  fi
  rm -f "$mol_log"
}
trap stop_molecule EXIT
trap 'exit 130' INT TERM

failed=()
stage "ansible lint and syntax"
bash scripts/lint.sh || failed+=("lint")

stage "glue tests (pytest)"
(cd glue && python -m pytest -p no:cacheprovider -q -ra -n auto --dist loadfile) || failed+=("glue tests")

stage "molecule (started at the ruff stage's end; what it printed so far, then live)"
tail -n +1 -f --pid="$mol" "$mol_log"
wait "$mol" || failed+=("molecule")
rm -f "$mol_log"
trap - EXIT

if [ ${#failed[@]} -gt 0 ]; then
  stage "FAILED: ${failed[*]}"
  exit 1
fi
stage "all tests passed in ${SECONDS}s"
