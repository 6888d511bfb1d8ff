#!/usr/bin/env bash
# Run `molecule test` for every Molecule scenario (or only those named as arguments) on
# systemd-nspawn test hosts. Needs root and the .venv of scripts/bootstrap.sh.
# Scenarios in OPTIONAL run only when named (arm64: an emulated arm64 gateway, too slow for
# every run): `bash scripts/molecule.sh arm64`.
#
# Molecule and Ansible write only inside a throw-away work directory (HOME, Ansible's local
# temp); on exit, also after a failure or Ctrl-C, every test host still up is taken down
# (processes, mounts, loop devices, veths, network namespace) and the work directory removed.
# Journals of the test hosts are kept in $FIELDGATE_MOLECULE_LOGS (default .work/molecule-logs).
# Each output line is prefixed with the seconds since the scenario started.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
export PATH="$root/.venv/bin:$PATH"
[ "$(id -u)" = 0 ] || { echo "molecule.sh: run as root (test hosts are systemd-nspawn containers)" >&2; exit 1; }

work=$(mktemp -d /var/tmp/fieldgate-molecule.XXXXXX)
export HOME="$work/home" ANSIBLE_HOME="$work/ansible" ANSIBLE_LOCAL_TEMP="$work/ansible-tmp"
export FIELDGATE_MOLECULE_LOGS=${FIELDGATE_MOLECULE_LOGS:-$root/.work/molecule-logs}
mkdir -p "$HOME" "$FIELDGATE_MOLECULE_LOGS"
# The code under test is a snapshot of glue/ taken now, and the bundle is built in a directory
# of its own (kept between runs: the Debian packages are only fetched again when the package
# list changes): edits in the working tree during the run cannot change what is tested.
export FIELDGATE_MOLECULE_GLUE_DIR="$work/glue"
export FIELDGATE_MOLECULE_BUNDLE_DIR=${FIELDGATE_MOLECULE_BUNDLE_DIR:-$root/.work/molecule-bundle}
rsync -a --exclude '__pycache__' --exclude '*.egg-info' --exclude '.pytest_cache' glue/ "$work/glue/"

cleanup() {
  local state
  while IFS= read -r state; do
    echo "molecule.sh: taking down leftover test hosts of $(dirname "$state")" >&2
    python3 molecule/shared/testhosts.py --run-dir "$(dirname "$state")" down \
      --save-journals "$FIELDGATE_MOLECULE_LOGS/leftover" || true
  done < <(find "$work" -name state.json -path '*/testhosts/*' 2>/dev/null)
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

OPTIONAL=(arm64)
if [ $# -gt 0 ]; then
  scenarios=("$@")
else
  scenarios=()
  for f in molecule/*/molecule.yml; do
    s=$(basename "$(dirname "$f")")
    [[ " ${OPTIONAL[*]} " == *" $s "* ]] || scenarios+=("$s")
  done
fi

# The cached base trees (one per architecture the scenarios' platforms name) are built once,
# outside the timed scenarios.
python3 molecule/shared/testhosts.py base >/dev/null
for arch in $(for s in "${scenarios[@]}"; do sed -n 's/^ *arch: *\([a-z0-9]*\).*/\1/p' "molecule/$s/molecule.yml"; done | sort -u); do
  python3 molecule/shared/testhosts.py base --arch "$arch" >/dev/null
done

failed=()
for s in "${scenarios[@]}"; do
  echo "==== molecule test -s $s"
  start=$SECONDS
  if molecule test -s "$s" 2>&1 | while IFS= read -r line; do
       printf '[%4ds] %s\n' $((SECONDS - start)) "$line"
     done; test "${PIPESTATUS[0]}" = 0; then
    echo "==== scenario $s passed in $((SECONDS - start))s"
  else
    echo "==== scenario $s FAILED after $((SECONDS - start))s (journals: $FIELDGATE_MOLECULE_LOGS/$s)"
    failed+=("$s")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "molecule.sh: failed scenarios: ${failed[*]}" >&2
  exit 1
fi
echo "molecule.sh: all scenarios passed: ${scenarios[*]}"
