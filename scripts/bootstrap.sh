#!/usr/bin/env bash
# Install everything fieldgate's demo and tests need on a fresh Debian 12 machine (run as root):
# Debian packages (Mosquitto, SQLite shell, PostgreSQL 15 for the hub's tests, test-host and
# drive-image tools, socat for the Modbus RTU tests' pseudo-terminal pairs,
# headless Chromium for the page tests) and a virtualenv
# .venv with the pinned Python tooling and the glue installed editable. Safe to run again:
# it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  python3 python3-venv python3-dev gcc
  mosquitto mosquitto-clients sqlite3 postgresql
  # headers `fieldgate broker-conf` builds the broker's arrival-stamp plugin with, and the
  # cross compiler of the arm64 bundle's plugin
  mosquitto-dev libmosquitto-dev gcc-aarch64-linux-gnu libc6-dev-arm64-cross
  # a stopped clock for the broker in the stamp tests (LD_PRELOAD); bench/broker's callgrind part
  libfaketime valgrind
  debootstrap systemd-container iproute2 iptables openssh-client rsync qemu-user-static
  fusefat exfat-fuse dosfstools exfatprogs e2fsprogs util-linux bindfs
  dpkg-dev xz-utils ca-certificates
  socat
  # the page tests drive the hub's and the gateway's pages in a real browser (headless
  # Chromium through Selenium and the chromedriver of the same build)
  chromium chromium-driver fonts-dejavu-core
)

if [ "$(id -u)" != 0 ]; then
  echo "bootstrap: run as root (it installs Debian packages and later boots test hosts)" >&2
  exit 1
fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "bootstrap: installing Debian packages: ${missing[*]}"
  # Installing a daemon's package must not start it on this machine (mosquitto would grab
  # port 1883, postgresql 5432; the tests start their own servers): a temporary policy-rc.d
  # forbids service starts during the install.
  created_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 0755 /usr/sbin/policy-rc.d
    created_policy=1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  [ "$created_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
fi

# The Python interpreter of the venv: Debian's python3 (3.11 on Debian 12).
PY=${FIELDGATE_PYTHON:-python3}
stamp_src=$(cat requirements-dev.txt glue/pyproject.toml | sha256sum | cut -c1-16)
if [ ! -x .venv/bin/python ] || [ "$(cat .venv/.fieldgate-stamp 2>/dev/null)" != "$stamp_src" ]; then
  echo "bootstrap: preparing .venv (pinned tooling and the glue)"
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements-dev.txt
  .venv/bin/python -m pip install -q -e 'glue[hub,test]'
  echo "$stamp_src" > .venv/.fieldgate-stamp
fi
echo "bootstrap: ready"
