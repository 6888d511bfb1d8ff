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

stage "ansible lint and syntax"
bash scripts/lint.sh

stage "glue tests (pytest)"
(cd glue && python -m pytest -p no:cacheprovider -q -ra -n auto --dist loadfile)

stage "molecule"
bash scripts/molecule.sh

stage "all tests passed in ${SECONDS}s"
