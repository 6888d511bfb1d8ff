#!/usr/bin/env bash
# Lint and static checks of the Ansible side of fieldgate (called by scripts/test.sh):
#   1. yamllint and ansible-lint --offline (profile production, nothing skipped)
#   2. ansible-playbook --syntax-check of every playbook
#   3. the udev rule rendered from the udev_rules role passes `udevadm verify`
#      (udevadm 254 from bookworm-backports, unpacked into .bundle/tools; Debian 12's lacks verify)
#   4. the configuration rendered from the example inventory is accepted by the glue
#      (`fieldgate check-config`)
#   5. negative checks: a bad inventory fails at validation, before any change, naming the
#      variable (and the good inventory passes the same validation)
#   6. generated files are current: the roles' name patterns (scripts/gen_names.py, from
#      glue/src/fieldgate/names.py) and the role READMEs (scripts/gen_role_docs.py, from each
#      role's argument specs and defaults, which must agree); the roles' probe wrappers
#      templates/state-sha1s.j2 are one file
#   7. the offline bundle's architecture checks: a bundle directory of arm64 files passes; a
#      wheel or .deb of another architecture is refused; a dependency with a wheel for
#      amd64 only is fetched for amd64 and refused for arm64 in one line (by the role too)
#   8. a host takes the bundle of its architecture (x86_64 -> amd64) and a host of an unknown
#      architecture is refused in one line
# Needs: .venv (scripts/bootstrap.sh), apt-get and dpkg-deb. Leaves nothing behind but the
# udevadm cache in .bundle/tools.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PATH="$ROOT/.venv/bin:$PATH"
export ANSIBLE_CONFIG="$ROOT/ansible.cfg"
export ANSIBLE_NOCOLOR=1
WORK=$(mktemp -d /tmp/fieldgate-lint.XXXXXX)
# Ansible's own temporary and cache files stay in WORK.
export ANSIBLE_LOCAL_TEMP="$WORK/ansible-tmp" ANSIBLE_REMOTE_TEMP="$WORK/ansible-remote-tmp"
export ANSIBLE_HOME="$WORK/ansible-home"
trap '[ -n "${LINT_KEEP:-}" ] || rm -rf "$WORK"' EXIT

step() { printf '\n--- lint: %s\n' "$1"; }
fail() { printf 'lint: FAILED: %s\n' "$1" >&2; exit 1; }

step "generated files are current (name patterns, role READMEs); the roles' state-sha1s.j2 are one file"
python scripts/gen_names.py --check || fail "the roles' name patterns are not generated from glue/src/fieldgate/names.py"
python scripts/gen_role_docs.py --check || fail "a role README is not generated from its argument specs and defaults"
# The probes' template wrapper is the same file in each role that has it (one lookup renders
# all of a role's templates for its expected state; see the file).
for f in roles/*/templates/state-sha1s.j2; do
  cmp -s "$f" roles/shorewall/templates/state-sha1s.j2 || fail "$f differs from roles/shorewall/templates/state-sha1s.j2"
done
# The checks themselves must be able to fail: a copy with a changed pattern and a changed
# default is refused by both.
GEN="$WORK/gen"
mkdir -p "$GEN/glue"
cp -r roles playbooks inventories "$GEN/"
cp -r glue/src "$GEN/glue/"
sed -i 's/{0,63}/{0,31}/' "$GEN/glue/src/fieldgate/names.py"
sed -i 's/^udev_rules_usb_export_state: present$/udev_rules_usb_export_state: absent/' "$GEN/roles/udev_rules/defaults/main.yml"
if python scripts/gen_names.py --root "$GEN" --check 2>"$WORK/gen.err"; then fail "gen_names.py --check accepted a stale pattern"; fi
grep -q "not current with glue/src/fieldgate/names.py: roles/fieldgate/vars/main/names.yml" "$WORK/gen.err" \
  || { cat "$WORK/gen.err"; fail "gen_names.py --check failed for another reason than the stale pattern"; }
if python scripts/gen_role_docs.py --root "$GEN" --check 2>"$WORK/gen.err"; then fail "gen_role_docs.py --check accepted a default the specs disagree with"; fi
grep -q "udev_rules_usb_export_state: the spec's default 'present' differs from defaults/main.yml" "$WORK/gen.err" \
  || { cat "$WORK/gen.err"; fail "gen_role_docs.py --check failed for another reason than the disagreeing default"; }
echo "ok  generated files are current (a stale pattern and a disagreeing default are refused)"

step "yamllint"
yamllint --strict .

step "ansible-lint (production profile, offline)"
ansible-lint --offline --profile production

step "syntax check of every playbook"
for pb in playbooks/*.yml; do
  ansible-playbook -i inventories/example --syntax-check "$pb" >/dev/null || fail "syntax check of $pb"
  echo "ok  $pb"
done

step "offline bundle: files of another architecture and dependencies without a wheel are refused"
BT=(python "$ROOT/roles/fieldgate_bundle/files/bundle_arch.py")
FX="$WORK/bundle-fixture"
mkdir -p "$FX/arm64/debs" "$FX/arm64/wheels" "$FX/arm64/plugins" "$FX/index" "$WORK/bad/wheels" "$WORK/bad/debs" "$WORK/bad/plugins"
# fake_deb NAME ARCH DIR: a minimal Debian package of that architecture
fake_deb() {
  local d="$WORK/deb-$1-$2"
  mkdir -p "$d/DEBIAN"
  printf 'Package: %s\nVersion: 1.0\nArchitecture: %s\nMaintainer: lint <lint@localhost>\nDescription: lint fixture\n' "$1" "$2" > "$d/DEBIAN/control"
  dpkg-deb --build --root-owner-group "$d" "$3/${1}_1.0_$2.deb" >/dev/null
}
# A bundle directory of arm64 files: the glue, a CPython 3.11 aarch64 wheel, an abi3 one, an
# arm64 and an "all" package, and an aarch64 shared library as its stamp plugin (the C library
# of Debian's arm64 cross toolchain, which the plugin is built with).
for w in fieldgate-0.1.0-py3-none-any.whl \
         pyyaml-6.0.4-cp311-cp311-manylinux2014_aarch64.manylinux_2_17_aarch64.manylinux_2_28_aarch64.whl \
         cryptography-46.0.3-cp311-abi3-manylinux_2_34_aarch64.whl; do
  : > "$FX/arm64/wheels/$w"
done
fake_deb fg-native arm64 "$FX/arm64/debs"
fake_deb fg-data all "$FX/arm64/debs"
cp /usr/aarch64-linux-gnu/lib/libc.so.6 "$FX/arm64/plugins/fieldgate_stamp-lint-aarch64-linux-gnu.so"
"${BT[@]}" check --arch arm64 "$FX/arm64" >/dev/null || fail "the bundle check refused a bundle of arm64 files"
echo "ok  a bundle of arm64 files passes"
# expect_refused WHAT EXPECTED-TEXT FILE: the good bundle with FILE added is refused, naming it
expect_refused() {
  local bad="$WORK/bundle-bad" out
  rm -rf "$bad" && cp -r "$FX/arm64" "$bad"
  cp "$3" "$bad/$(basename "$(dirname "$3")")/"
  if out=$("${BT[@]}" check --arch arm64 "$bad" 2>&1); then fail "the bundle check accepted $1"; fi
  grep -qF -- "$2" <<<"$out" || { echo "$out"; fail "bundle check: '$2' not in the refusal of $1"; }
  echo "ok  $1 -> $out"
}
w=pyyaml-6.0.4-cp311-cp311-manylinux_2_17_x86_64.whl; : > "$WORK/bad/wheels/$w"
expect_refused "an x86_64 wheel" "wheels/$w does not install on arm64 (aarch64, CPython 3.11, glibc 2.36)" "$WORK/bad/wheels/$w"
w=orjson-3.11.0-cp311-cp311-manylinux_2_39_aarch64.whl; : > "$WORK/bad/wheels/$w"
expect_refused "a wheel for a newer glibc" "wheels/$w does not install on arm64" "$WORK/bad/wheels/$w"
w=markupsafe-3.0.4-cp312-cp312-manylinux_2_17_aarch64.whl; : > "$WORK/bad/wheels/$w"
expect_refused "a wheel for another Python" "wheels/$w does not install on arm64" "$WORK/bad/wheels/$w"
: > "$WORK/bad/wheels/pyserial-3.5.tar.gz"
expect_refused "a source distribution" "wheels/pyserial-3.5.tar.gz is not a wheel" "$WORK/bad/wheels/pyserial-3.5.tar.gz"
fake_deb fg-native amd64 "$WORK/bad/debs"
expect_refused "an amd64 package" "debs/fg-native_1.0_amd64.deb is for amd64, not arm64 or all" "$WORK/bad/debs/fg-native_1.0_amd64.deb"
p=fieldgate_stamp-lint-x86_64-linux-gnu.so; cp "$(readlink -f /lib/x86_64-linux-gnu/libc.so.6)" "$WORK/bad/plugins/$p"
expect_refused "an x86_64 plugin" "plugins/$p is ELF machine 62, not aarch64 (ELF machine 183)" "$WORK/bad/plugins/$p"

# A dependency with a wheel for amd64 only (a real, minimal wheel in a local index): fetched for
# amd64, refused for arm64 in one line naming it and the platform.
python - "$FX/index" <<'PY'
import sys
import zipfile

name, tag = "fgxnative", "cp311-cp311-manylinux_2_17_x86_64"
dist = f"{name}-1.0.dist-info"
with zipfile.ZipFile(f"{sys.argv[1]}/{name}-1.0-{tag}.whl", "w") as z:
    z.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    z.writestr(f"{dist}/WHEEL", f"Wheel-Version: 1.0\nGenerator: lint\nRoot-Is-Purelib: false\nTag: {tag}\n")
    z.writestr(f"{dist}/RECORD", "")
PY
only_index=(--pip-arg=--no-index --pip-arg=--find-links "--pip-arg=$FX/index")
glue=(--glue-wheel "$FX/arm64/wheels/fieldgate-0.1.0-py3-none-any.whl")
"${BT[@]}" wheels --arch amd64 --dest "$WORK/wheels-amd64" "${glue[@]}" "${only_index[@]}" fgxnative >/dev/null \
  || fail "the amd64 wheel of the fixture dependency was not fetched"
[ -f "$WORK/wheels-amd64/fgxnative-1.0-cp311-cp311-manylinux_2_17_x86_64.whl" ] || fail "the amd64 wheel is not in the wheelhouse"
if out=$("${BT[@]}" wheels --arch arm64 --dest "$WORK/wheels-arm64" "${glue[@]}" "${only_index[@]}" fgxnative 2>&1); then
  fail "a dependency without an arm64 wheel was accepted"
fi
expected="fieldgate_bundle: no wheel of fgxnative for arm64 (aarch64, CPython 3.11, glibc 2.36)"
if [ "$(wc -l <<<"$out")" != 1 ] || ! grep -qF "$expected" <<<"$out"; then
  echo "$out"; fail "the refusal is not one line naming fgxnative and arm64"
fi
echo "ok  a dependency with an amd64 wheel only: fetched for amd64; arm64 -> $out"
# The role fails the play with that line: a glue whose one dependency is fgxnative, no .debs
# (its source is the real glue's, which builds the stamp plugin of the amd64 bundle).
mkdir -p "$WORK/fakeglue/src"
ln -s "$ROOT/glue/src/fieldgate" "$WORK/fakeglue/src/fieldgate"
printf '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"\n\n[project]\nname = "fieldgate"\nversion = "0.1.0"\ndependencies = ["fgxnative"]\n' \
  > "$WORK/fakeglue/pyproject.toml"
: > "$WORK/fakeglue/README.md"
cat > "$WORK/bundle-vars.yml" <<EOF
fieldgate_bundle_dir: $WORK/bundle
fieldgate_bundle_glue_dir: $WORK/fakeglue
fieldgate_bundle_debs: false
fieldgate_bundle_extras: []
fieldgate_bundle_pip_extra_args: [--no-index, --find-links, $FX/index]
EOF
if ansible-playbook playbooks/bundle.yml -e "@$WORK/bundle-vars.yml" >"$WORK/bundle.log" 2>&1; then
  cat "$WORK/bundle.log"; fail "bundle.yml accepted a dependency without an arm64 wheel"
fi
awk '/^\[ERROR\]:/{on=1} /^Origin:/{on=0} on' "$WORK/bundle.log" > "$WORK/bundle.msg"
grep -qF "$expected" "$WORK/bundle.msg" || { cat "$WORK/bundle.log"; fail "bundle.yml did not fail with '$expected'"; }
[ -s "$WORK/bundle/fieldgate-bundle-amd64.tar.sha256" ] || { cat "$WORK/bundle.log"; fail "bundle.yml did not pack the amd64 bundle first"; }
echo "ok  bundle.yml packs amd64, then stops -> $(tr '\n' ' ' < "$WORK/bundle.msg")"

step "udev rule passes udevadm verify"
UDEVADM_DIR="$ROOT/.bundle/tools/udevadm-254"
if [ ! -x "$UDEVADM_DIR/bin/udevadm" ]; then
  apt_dir="$WORK/apt"
  mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$WORK/debs"
  : > "$apt_dir/status"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main" \
    > "$apt_dir/sources.list"
  apt_opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
            -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::State::status=$apt_dir/status"
            -o "Dir::Cache=$apt_dir/cache" -o Debug::NoLocking=1 -o APT::Sandbox::User=root)
  apt-get "${apt_opts[@]}" -qq update
  (cd "$WORK/debs" && apt-get "${apt_opts[@]}" -qq download udev libsystemd-shared)
  rm -rf "$UDEVADM_DIR.tmp" && mkdir -p "$UDEVADM_DIR.tmp"
  for deb in "$WORK"/debs/*.deb; do dpkg-deb -x "$deb" "$UDEVADM_DIR.tmp"; done
  rm -rf "$UDEVADM_DIR" && mv "$UDEVADM_DIR.tmp" "$UDEVADM_DIR"
fi
udevadm_verify() {
  LD_LIBRARY_PATH="$UDEVADM_DIR/usr/lib/$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo x86_64-linux-gnu)/systemd" \
    "$UDEVADM_DIR/bin/udevadm" verify "$@"
}
ansible -i localhost, -c local localhost -m ansible.builtin.template \
  -a "src=$ROOT/roles/udev_rules/templates/etc/udev/rules.d/fieldgate-usb-export.rules.j2 dest=$WORK/90-fieldgate-usb-export.rules mode=0644" \
  -e "@$ROOT/roles/udev_rules/defaults/main.yml" -e "ansible_python_interpreter=$ROOT/.venv/bin/python" >/dev/null
udevadm_verify "$WORK/90-fieldgate-usb-export.rules" || fail "udevadm verify of the rendered USB export rule"
# The check itself must be able to fail: a broken rule is refused.
printf 'ACTION="add", SUBSYSTEM=="block", RUN+="/bin/true"\n' > "$WORK/99-broken.rules"
if udevadm_verify "$WORK/99-broken.rules" >/dev/null 2>&1; then
  fail "udevadm verify accepted a broken rule file"
fi
echo "ok  udevadm verify (a broken rule is refused)"

# A local inventory for the validation checks: one gateway and one hub, connection local,
# the real group_vars/host_vars layout of inventories/example.
INV="$WORK/inventory"
mkdir -p "$INV/host_vars"
cp -r inventories/example/group_vars "$INV/"
cat > "$INV/hosts.yml" <<EOF
all:
  children:
    gateways:
      hosts:
        gw-north:
    hubs:
      hosts:
        hub:
  vars:
    ansible_connection: local
    ansible_python_interpreter: $ROOT/.venv/bin/python
EOF
cp inventories/example/host_vars/gw-north.yml "$INV/host_vars/gw-north.yml"

step "the rendered configuration is accepted by the glue"
cat > "$WORK/render.yml" <<EOF
- name: Render the glue configuration of each example gateway
  hosts: gateways
  connection: local
  gather_facts: false
  vars:
    ansible_python_interpreter: $ROOT/.venv/bin/python
  tasks:
    - name: Load the fieldgate role's defaults and checks
      ansible.builtin.include_role:
        name: fieldgate
        tasks_from: validate
        public: true
    - name: Render the configuration
      ansible.builtin.template:
        src: $ROOT/roles/fieldgate/templates/etc/fieldgate/fieldgate.yaml.j2
        dest: "{{ render_dir | default('$WORK') }}/{{ inventory_hostname }}.yaml"
        mode: "0640"
EOF
ansible-playbook -i inventories/example "$WORK/render.yml" >"$WORK/render.log" 2>&1 \
  || { cat "$WORK/render.log"; fail "rendering the example configurations"; }
for cfg in "$WORK"/gw-*.yaml; do
  fieldgate --config "$cfg" check-config || fail "the glue refused the configuration rendered for $(basename "$cfg" .yaml)"
  fieldgate --config "$cfg" status >/dev/null || fail "fieldgate status with the configuration rendered for $(basename "$cfg" .yaml)"
done

step "bad inventory fails at validation, naming the variable"
# Positive control: the good inventory passes the validation plays.
ansible-playbook -i "$INV" playbooks/site.yml --tags validate >"$WORK/good.log" 2>&1 \
  || { cat "$WORK/good.log"; fail "the good inventory did not pass validation"; }
echo "ok  the example inventory passes validation"
# The gateway page on: the validation play gathers no facts, so the management interface's
# address is not known there; the glue's check of the rendered web section must still pass.
ansible-playbook -i "$INV" playbooks/site.yml --tags validate -e fieldgate_web_enabled=true >"$WORK/good-web.log" 2>&1 \
  || { cat "$WORK/good-web.log"; fail "the example inventory with the gateway page on did not pass validation"; }
echo "ok  the example inventory with the gateway page on passes validation"

# expect_bad NAME EXPECTED-TEXT  (the override YAML comes on stdin; extra vars beat host vars)
expect_bad() {
  local name=$1 expected=$2 log="$WORK/bad-$1.log"
  cat > "$WORK/bad-$name.yml"
  if ansible-playbook -i "$INV" playbooks/site.yml --check -e "@$WORK/bad-$name.yml" >"$log" 2>&1; then
    cat "$log"; fail "$name: the bad inventory was accepted"
  fi
  # The error message itself (between "[ERROR]:" and "Origin:") must name the variable.
  awk '/^\[ERROR\]:/{on=1} /^Origin:/{on=0} on' "$log" > "$WORK/bad-$name.msg"
  grep -qF -- "$expected" "$WORK/bad-$name.msg" || { cat "$log"; fail "$name: the failure does not name '$expected'"; }
  grep -q "Validation of arguments failed\|Action failed" "$WORK/bad-$name.msg" \
    || { cat "$log"; fail "$name: not refused by argument validation or an assertion"; }
  # Nothing ran after the validation plays.
  if grep -q -E '^PLAY \[(Gateways|Hub)\]' "$log"; then
    cat "$log"; fail "$name: the run went past validation"
  fi
  echo "ok  $name -> $(head -c 300 "$WORK/bad-$name.msg" | tr '\n' ' ' | sed 's/^\[ERROR\]: Task failed: //')"
}

expect_bad device-without-serial "fieldgate_devices" <<'EOF'
fieldgate_devices:
  - alias: roof-temp
EOF
grep -q "serial" "$WORK/bad-device-without-serial.msg" || fail "device-without-serial: the message does not name 'serial'"

expect_bad network-ups-without-port "apcupsd_device" <<'EOF'
apcupsd_upstype: net
apcupsd_upscable: ether
apcupsd_device: ups-host.site.example
EOF

expect_bad network-ups-usb-cable "apcupsd_upscable" <<'EOF'
apcupsd_upstype: net
apcupsd_device: ups-host.site.example:3551
EOF

expect_bad unknown-led-type "fieldgate_led_type" <<'EOF'
fieldgate_led_type: gpio
EOF

expect_bad led-path-not-a-led "fieldgate_led_path" <<'EOF'
fieldgate_led_type: sysfs
fieldgate_led_path: /tmp/led
EOF

expect_bad listener-port-out-of-range "mosquitto_listeners[0].port" <<'EOF'
mosquitto_listeners:
  - port: 70000
EOF

# the collector's listener would share 127.0.0.1:1883 with the example's loopback device listener
expect_bad collector-port-taken "mosquitto_collector_port" <<'EOF'
fieldgate_mqtt_port: 1883
EOF

expect_bad rule-port-out-of-range "shorewall_rules[0].dport" <<'EOF'
shorewall_rules:
  - action: ACCEPT
    source: sensor
    dest: $FW
    proto: tcp
    dport: "99999"
EOF

expect_bad rule-unknown-zone "shorewall_rules[0]" <<'EOF'
shorewall_rules:
  - action: ACCEPT
    source: dmz
    dest: $FW
    proto: tcp
    dport: "1883"
EOF
grep -q "dmz" "$WORK/bad-rule-unknown-zone.msg" || fail "rule-unknown-zone: the message does not name the zone"

expect_bad interface-unknown-zone "shorewall_interfaces" <<'EOF'
shorewall_interfaces:
  - zone: lan
    name: eth2
EOF

# A device without an MQTT account can no longer be declared: the broker's accounts are
# derived from fieldgate_devices. What the one declaration can get wrong instead:
expect_bad device-without-password "mqtt_password" <<'EOF'
fieldgate_devices:
  - serial: TH-001
EOF

expect_bad device-with-empty-password "fieldgate_devices" <<'EOF'
fieldgate_devices:
  - serial: TH-001
    mqtt_password: ""
EOF
grep -q "TH-001" "$WORK/bad-device-with-empty-password.msg" || fail "device-with-empty-password: the message does not name the device"

expect_bad device-named-like-collector "fieldgate_mqtt_username" <<'EOF'
fieldgate_devices:
  - serial: collector
    mqtt_password: not-empty
EOF

# ':' was accepted in serials once; the glue's one name pattern (glue/src/fieldgate/names.py)
# refuses it now, and the roles check with the same pattern.
expect_bad serial-with-colon "fieldgate_serial" <<'EOF'
fieldgate_serial: "GW:0001"
EOF

expect_bad csv-column-not-a-metric "csv_columns" <<'EOF'
fieldgate_devices:
  - serial: FLOW-17
    format: csv
    csv_columns: [ts, "flow lpm"]
    mqtt_password: not-empty
EOF

# Device inputs (gw-north has a Tasmota device and a Zigbee2MQTT bridge account): each
# mistake fails with one line naming the input.
expect_bad input-unknown-format "fieldgate_mqtt_inputs[1].format" <<'EOF'
fieldgate_mqtt_inputs:
  - topic: "tele/{device}/SENSOR"
    format: tasmota
  - topic: "zigbee2mqtt/{device}"
    format: zigbee
EOF
grep -q "is not a format" "$WORK/bad-input-unknown-format.msg" || fail "input-unknown-format: the message does not say why"

expect_bad input-device-twice "fieldgate_mqtt_inputs[0].topic" <<'EOF'
fieldgate_mqtt_inputs:
  - topic: "tele/{device}/{device}"
    format: tasmota
  - topic: "zigbee2mqtt/{device}"
    format: zigbee2mqtt
EOF
grep -q "{device} may appear only once" "$WORK/bad-input-device-twice.msg" || fail "input-device-twice: the message does not say why"

expect_bad input-outside-accounts "fieldgate_mqtt_inputs[2].topic" <<'EOF'
fieldgate_mqtt_inputs:
  - topic: "tele/{device}/SENSOR"
    format: tasmota
  - topic: "zigbee2mqtt/{device}"
    format: zigbee2mqtt
  - topic: "shellies/{device}/events/rpc"
    format: shelly
EOF
grep -q "outside every account" "$WORK/bad-input-outside-accounts.msg" || fail "input-outside-accounts: the message does not say why"

expect_bad account-topic-read-by-no-input "fieldgate_mqtt_accounts[zigbee2mqtt].topics[0]" <<'EOF'
fieldgate_mqtt_inputs:
  - topic: "tele/{device}/SENSOR"
    format: tasmota
EOF

expect_bad program-stopwaitsecs-too-short "fieldgate_stopwaitsecs" <<'EOF'
fieldgate_stopwaitsecs: 5
EOF

expect_bad web-port-out-of-range "fieldgate_web_port" <<'EOF'
fieldgate_web_enabled: true
fieldgate_web_port: 70000
EOF

expect_bad web-open-to-no-zone "fieldgate_web_firewall_sources" <<'EOF'
fieldgate_web_enabled: true
fieldgate_web_firewall_sources: []
EOF

expect_bad unknown-upload-mode "fieldgate_upload_mode" <<'EOF'
fieldgate_upload_mode: FAST
EOF

expect_bad hub-port-out-of-range "hub_port" <<'EOF'
hub_port: 0
EOF

# Modbus devices: a good map passes the same validation; the mistakes are refused naming the
# variable, whether the argument specs, an assertion or the glue's own check (run on the
# control node against the configuration rendered from the inventory) finds them.
MODBUS_DEVICES='fieldgate_devices:
  - serial: SDM630-0042
    alias: main-meter
  - serial: TH-001
    mqtt_password: not-empty
fieldgate_mqtt_inputs: []
fieldgate_mqtt_accounts: []'
# (gw-north's Tasmota and Zigbee2MQTT inputs need its Tasmota device and bridge account, which
# these device lists replace: the inputs go too.)
printf 'fieldgate_mqtt_inputs: []\nfieldgate_mqtt_accounts: []\n' > "$WORK/no-inputs.yml"
cat > "$WORK/good-modbus.yml" <<EOF
$MODBUS_DEVICES
fieldgate_modbus_devices:
  - device: main-meter
    host: 192.0.2.20
    registers:
      - {metric: voltage_l1, address: 0, table: input, type: float32}
      - {metric: relay, address: 3, table: coil}
  - device: TH-001
    serial: /dev/ttyUSB0
    baudrate: 9600
    parity: N
    registers:
      - {metric: temperature, address: 0, table: holding, type: int16, scale: 0.1}
EOF
ansible-playbook -i "$INV" playbooks/site.yml --tags validate -e "@$WORK/good-modbus.yml" >"$WORK/good-modbus.log" 2>&1 \
  || { cat "$WORK/good-modbus.log"; fail "a good Modbus inventory did not pass validation"; }
echo "ok  a good Modbus inventory passes validation"
# docs/modbus.md's worked example: its inventory passes validation and renders exactly the
# poll.modbus of its glue configuration.
doc_block() {  # the fenced block after a marker in docs/modbus.md
  awk -v m="$1" 'index($0, m) {on=1; next} on && /^```/ {if (inside) exit; inside=1; next} inside' docs/modbus.md
}
doc_block "<!-- inventory: sdm630" > "$WORK/doc-inventory.yml"
doc_block "<!-- example: sdm630" > "$WORK/doc-config.yml"
ansible-playbook -i "$INV" playbooks/site.yml --tags validate -e "@$WORK/doc-inventory.yml" -e "@$WORK/no-inputs.yml" \
  >"$WORK/doc-inventory.log" 2>&1 \
  || { cat "$WORK/doc-inventory.log"; fail "the inventory of docs/modbus.md did not pass validation"; }
mkdir -p "$WORK/doc-render"
ansible-playbook -i inventories/example "$WORK/render.yml" --limit gw-north -e "@$WORK/doc-inventory.yml" -e "@$WORK/no-inputs.yml" \
  -e "render_dir=$WORK/doc-render" >"$WORK/doc-render.log" 2>&1 \
  || { cat "$WORK/doc-render.log"; fail "rendering the inventory of docs/modbus.md"; }
python - "$WORK/doc-render/gw-north.yaml" "$WORK/doc-config.yml" <<'PY' || fail "docs/modbus.md: its inventory does not render its configuration"
import sys, yaml
rendered, documented = (yaml.safe_load(open(p)) for p in sys.argv[1:])
if rendered["poll"]["modbus"] != documented["poll"]["modbus"]:
    sys.exit(f"rendered {rendered['poll']['modbus']}\ndocumented {documented['poll']['modbus']}")
PY
fieldgate --config "$WORK/doc-render/gw-north.yaml" check-config >/dev/null || fail "the glue refused the docs' rendered configuration"
echo "ok  docs/modbus.md's inventory passes validation and renders its poll.modbus"

expect_bad modbus-type-does-not-fit-table "fieldgate_modbus_devices[0].registers[1].type" <<EOF
$MODBUS_DEVICES
fieldgate_modbus_devices:
  - device: main-meter
    host: 192.0.2.20
    registers:
      - {metric: voltage_l1, address: 0, table: input, type: float32}
      - {metric: relay, address: 3, table: coil, type: int16}
EOF

expect_bad modbus-unknown-device "fieldgate_modbus_devices[1].device" <<EOF
$MODBUS_DEVICES
fieldgate_modbus_devices:
  - device: main-meter
    host: 192.0.2.20
    registers:
      - {metric: power, address: 0, table: input, type: float32}
  - device: INV-9
    host: 192.0.2.21
    registers:
      - {metric: power, address: 0, table: input, type: float32}
EOF

expect_bad modbus-address-out-of-range "fieldgate_modbus_devices[0].registers[0].address" <<EOF
$MODBUS_DEVICES
fieldgate_modbus_devices:
  - device: main-meter
    host: 192.0.2.20
    registers:
      - {metric: energy, address: 65534, table: input, type: float64}
EOF

expect_bad modbus-unknown-table "table" <<EOF
$MODBUS_DEVICES
fieldgate_modbus_devices:
  - device: main-meter
    host: 192.0.2.20
    registers:
      - {metric: power, address: 0, table: holdings, type: float32}
EOF
grep -q "fieldgate_modbus_devices" "$WORK/bad-modbus-unknown-table.msg" \
  || fail "modbus-unknown-table: the message does not name fieldgate_modbus_devices"

expect_bad modbus-tcp-and-rtu "fieldgate_modbus_devices[0]" <<EOF
$MODBUS_DEVICES
fieldgate_modbus_devices:
  - device: main-meter
    host: 192.0.2.20
    serial: /dev/ttyUSB0
    registers:
      - {metric: power, address: 0, table: input, type: float32}
EOF

expect_bad modbus-firewall-zone-unknown "fieldgate_modbus_devices[0]" <<EOF
$MODBUS_DEVICES
fieldgate_modbus_devices:
  - device: main-meter
    host: 192.0.2.20
    firewall_zone: dmz
    registers:
      - {metric: power, address: 0, table: input, type: float32}
EOF

expect_bad outbound-zone-policy-unknown-zone "shorewall_outbound_zone_policies" <<'EOF'
shorewall_outbound_zone_policies:
  - zone: dmz
    policy: REJECT
EOF

expect_bad hub-host-not-in-inventory "fieldgate_hub_host" <<'EOF'
fieldgate_hub_host: hub-elsewhere
EOF

expect_bad hub-postgresql-without-password "hub_postgresql_password" <<'EOF'
hub_database: postgresql
hub_postgresql_password: ""
EOF

expect_bad hub-postgresql-url-with-password "hub_postgresql_url" <<'EOF'
hub_database: postgresql
hub_postgresql_password: from-the-vault
hub_postgresql_url: postgresql://hub:secret@db.example.org:5432/hub
EOF

step "each host takes the bundle of its architecture; an unknown one is refused"
# This machine is an x86_64 gateway of the lint inventory: it asks for the amd64 bundle
# (missing here), and, when only aarch64 is known, is refused for its architecture.
arch_check() {
  local name=$1 expected=$2; shift 2
  if ansible-playbook -i "$INV" playbooks/site.yml --check --limit gw-north -e fieldgate_offline_bundle=true \
       -e "fieldgate_offline_bundle_dir=$WORK/no-bundle" "$@" >"$WORK/arch-$name.log" 2>&1; then
    cat "$WORK/arch-$name.log"; fail "$name: the run was not refused"
  fi
  awk '/^\[ERROR\]:/{on=1} /^Origin:/{on=0} on' "$WORK/arch-$name.log" > "$WORK/arch-$name.msg"
  grep -qF -- "$expected" "$WORK/arch-$name.msg" || { cat "$WORK/arch-$name.log"; fail "$name: the failure does not say '$expected'"; }
  echo "ok  $name -> $(head -c 300 "$WORK/arch-$name.msg" | tr '\n' ' ' | sed 's/^\[ERROR\]: Task failed: //')"
}
arch_check x86_64-takes-amd64 "$WORK/no-bundle/fieldgate-bundle-amd64.tar.sha256 is missing"
arch_check unknown-architecture "gw-north is x86_64, for which there is no offline bundle (known: aarch64)" \
  -e '{"fieldgate_offline_architectures": {"aarch64": "arm64"}}'

printf '\nlint: all checks passed\n'
