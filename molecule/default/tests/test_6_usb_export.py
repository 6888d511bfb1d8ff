"""USB export on gw1: a loop-backed ext4 drive with Password.txt, handed over as udev would."""

from __future__ import annotations

import contextlib
import hashlib
import re
import shlex
import subprocess
import tempfile
from pathlib import Path

from support import count, gateway_config, get_host, run_state, send_readings, wait_for

TS = r"\d{8}T\d{6}\+0000"


@contextlib.contextmanager
def drive_mounted(device: str, readonly: bool):
    """Mount the drive image's loop device on this machine for a moment."""
    with tempfile.TemporaryDirectory(prefix="fg-usb-") as mnt:
        subprocess.run(["mount", "-o", "ro" if readonly else "rw", device, mnt], check=True)
        try:
            yield Path(mnt)
        finally:
            subprocess.run(["umount", mnt], check=True)


def udev_run_command(host, devnode: str, action: str) -> str:
    """What the installed udev rule runs for this device and action: its RUN+= program with
    %k expanded, in the environment the rule's ENV{...}= assignments give it."""
    rules = host.check_output(
        "grep -l -s usb-event /etc/udev/rules.d/*.rules /lib/udev/rules.d/*.rules"
    )
    text = host.file(rules.split()[0]).content_string
    env = dict(re.findall(r'ENV\{(\w+)\}="([^"]*)"', text))
    run = re.search(rf'ACTION=="{action}",\s*RUN\+="([^"]*)"', text)
    assert run, f"no RUN+= for ACTION=={action} in {rules}"
    command = (
        run.group(1)
        .replace("%k", devnode.rsplit("/", 1)[1])
        .replace("$kernel", devnode.rsplit("/", 1)[1])
    )
    assignments = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    return f"env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin {assignments} {command}"


def led(host, led_path: str) -> dict[str, str]:
    files = "trigger brightness delay_on delay_off"
    out = host.check_output(f"cd {shlex.quote(led_path)} && grep -H . {files} 2>/dev/null || true")
    return dict(line.split(":", 1) for line in out.splitlines())


def test_export_to_usb_drive(sensor, net):
    gw = get_host("gw1")
    # Readings that must be in the export.
    sent = send_readings(sensor, net, "gw1", n=3, repeat=1)
    wait_for("the readings in the gateway store", lambda: count(gw, sent["db"], sent["where"]) == 6)
    cfg = gateway_config(gw)
    serial = cfg["site"]["serial"]
    device = run_state()["hosts"]["gw1"]["usb"]["device"]
    password = gw.file(cfg["export"]["password_file"]).content_string.strip()
    log_file = cfg["export"].get("log_file", "/var/log/fieldgate/usb_exporter.log")
    led_path = cfg["export"]["led_path"]

    with drive_mounted(device, readonly=False) as mnt:
        (mnt / "Password.txt").write_text(f"  {password}\n")
        (mnt / "notes.txt").write_text("kept as it is\n")
        before = {
            p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in mnt.iterdir() if p.is_file()
        }
    log_before = int(gw.check_output(f"cat {shlex.quote(log_file)} 2>/dev/null | wc -l"))

    assert gw.run(udev_run_command(gw, device, "add")).rc == 0
    try:
        check_export(
            gw, device=device, serial=serial, password=password, led_path=led_path,
            before=before, log_file=log_file, log_before=log_before, where=sent["where"],
        )  # fmt: skip
    finally:  # the drive is pulled in any case, so success/error do not hold past this test
        assert gw.run(udev_run_command(gw, device, "remove")).rc == 0

    def normal() -> bool:
        state = led(gw, led_path)
        return state.get("trigger") in ("none", None) and state.get("brightness", "0") != "0"

    wait_for("the LED back to normal operation", normal)
    lines = gw.check_output(f"tail -n +{log_before + 1} {shlex.quote(log_file)}").splitlines()
    order = [next((i for i, line in enumerate(lines) if f"led: {s}" in line), None)
             for s in ("in_progress", "success", "normal_operation")]  # fmt: skip
    assert None not in order and order == sorted(order), f"LED states in the log: {lines}"


def check_export(
    gw, *, device, serial, password, led_path, before, log_file, log_before, where
) -> None:
    """The export finished with success, and the drive holds exactly what CONTRACT §7 says."""

    def new_log() -> list[str]:
        return gw.check_output(f"tail -n +{log_before + 1} {shlex.quote(log_file)}").splitlines()

    wait_for("the export to finish", lambda: any("led: success" in line for line in new_log()))
    state = led(gw, led_path)
    assert (state.get("trigger"), state.get("delay_on"), state.get("delay_off")) == (
        "timer",
        "250",
        "250",
    ), state

    with drive_mounted(device, readonly=True) as mnt:
        # Nothing that was on the drive is overwritten or removed (earlier exports included).
        for name, digest in before.items():
            assert hashlib.sha256((mnt / name).read_bytes()).hexdigest() == digest, name
        names = sorted(p.name for p in mnt.iterdir() if p.is_file() and p.name not in before)
        db = [n for n in names if re.fullmatch(rf"data_store-{re.escape(serial)}-{TS}\.db", n)]
        site = [n for n in names if re.fullmatch(rf"site_config-{re.escape(serial)}-{TS}\.yaml", n)]
        sums = [n for n in names if re.fullmatch(rf"export-{re.escape(serial)}-{TS}\.sha256", n)]
        assert len(names) == 3 and len(db) == len(site) == len(sums) == 1, names
        listed = {}
        for line in (mnt / sums[0]).read_text().splitlines():
            digest, name = line.split(maxsplit=1)
            listed[name.lstrip("*")] = digest
        assert set(listed) == {db[0], site[0]}
        for name, digest in listed.items():
            assert hashlib.sha256((mnt / name).read_bytes()).hexdigest() == digest, name
        assert password not in (mnt / site[0]).read_text()
        query = f"PRAGMA integrity_check; SELECT COUNT(*) FROM readings WHERE {where};"  # noqa: S608 (the test's own values)
        check = subprocess.run(
            ["sqlite3", "-readonly", str(mnt / db[0]), query],
            capture_output=True,
            text=True,
            check=True,
        )
        assert check.stdout.split() == ["ok", "6"]
