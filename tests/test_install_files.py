"""The files a non-Nix install copies into the system, checked with the system's own tools.

- ``systemd/immich-usb-backup.service``: ``systemd-analyze verify`` accepts it without a
  single warning, and it keeps its hardening.
- ``udev/90-immich-usb-backup.rules``: on a real udevd (the stack of ``stack.py``), a USB
  exFAT file system is marked as a candidate, kept from desktop auto-mounters and pulls in
  the service; a USB ext4 one is not.

This machine has no systemd as PID 1, so the unit cannot be started here (TESTBED.md).
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import stack as st
from helpers import REPO, need

# The real stack (dbus, udevd, UDisks2), module-scoped, and plugged disks pulled at the end.
from test_daemon_e2e import plugs  # noqa: F401 - a fixture for pytest

UNIT = REPO / "systemd" / "immich-usb-backup.service"
RULE = REPO / "udev" / "90-immich-usb-backup.rules"
INSTALLED_RULE = Path("/etc/udev/rules.d") / RULE.name
# stack.TEST_RULE (99-...) makes loop devices look like USB disks, but udev runs the rules
# of all its folders in the lexical order of their file names: 99-... runs after our
# 90-..., so our rule would never see its ID_BUS=usb. On a real disk ID_BUS comes from
# 60-persistent-storage.rules, long before 90. The same test rule under a name that sorts
# before ours puts the test machine in that situation, without touching the product rule.
EARLY_TEST_RULE = Path("/etc/udev/rules.d/89-immich-usb-backup-test-loop-usb.rules")
assert EARLY_TEST_RULE.name < RULE.name < st.TEST_RULE.name

PRODUCT_EXEC = "/usr/local/bin/immich-usb-backup"
SERVICE = "immich-usb-backup.service"


# The systemd unit --------------------------------------------------------------------

def unit_settings(text: str) -> dict[str, list[str]]:
    """``{"Section.Key": [values...]}`` of a unit file (comments and blank lines skipped)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def test_the_unit_passes_systemd_analyze_verify_without_a_warning(tmp_path: Path) -> None:
    need(shutil.which("systemd-analyze") is not None, "needs systemd-analyze (systemd)")
    binary = Path(sys.executable).parent / "immich-usb-backup"
    need(binary.is_file(), f"needs the installed program at {binary}")
    text = UNIT.read_text()
    assert f"ExecStart={PRODUCT_EXEC} daemon\n" in text
    # verify checks that ExecStart's program exists: point it at the real one
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace(f"ExecStart={PRODUCT_EXEC} ", f"ExecStart={binary} "))

    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                       text=True, timeout=60)

    # verify exits 0 even for unknown keys and bad values (only warned about on stderr),
    # so stderr must be empty as well. Nothing is filtered: a Wants=/After= unit that is
    # not installed (udisks2.service on a machine without UDisks2) is loaded as "not
    # found" without a word (checked with systemd 252 and udisks2.service moved away), so
    # no warning is expected from it either.
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr == "", r.stderr


def test_the_unit_keeps_its_hardening() -> None:
    s = unit_settings(UNIT.read_text())

    def one(key: str) -> str:
        values = s.get(key, [])
        assert len(values) == 1, f"{key}: {values}"
        return values[0]

    assert one("Service.Type") == "notify"
    assert one("Service.NotifyAccess") == "main"
    assert one("Service.ExecStart") == f"{PRODUCT_EXEC} daemon"
    assert one("Service.Restart") == "on-failure"
    assert one("Service.KillMode") == "mixed"
    assert one("Service.TimeoutStopSec") in ("120", "120s")
    assert one("Service.StateDirectory") == "immich-usb-backup"
    for key in ("Unit.After", "Unit.Wants"):
        assert "udisks2.service" in " ".join(s.get(key, [])).split(), key
    assert one("Service.ProtectSystem") == "strict"
    assert one("Service.ReadWritePaths").split() == ["-/run/media", "-/media"]
    assert one("Service.ProtectHome") == "read-only"
    assert one("Service.PrivateTmp") == "yes"
    assert one("Service.NoNewPrivileges") == "yes"
    assert sorted(one("Service.RestrictAddressFamilies").split()) == sorted(
        ["AF_UNIX", "AF_NETLINK", "AF_INET", "AF_INET6"])
    for key in ("ProtectKernelTunables", "ProtectKernelModules", "ProtectControlGroups",
                "RestrictNamespaces", "RestrictSUIDSGID", "RestrictRealtime"):
        assert one(f"Service.{key}") == "yes", key
    # blkid reads the plugged disk's block device: nothing may shut devices out
    for key in ("PrivateDevices", "DevicePolicy", "DeviceAllow", "ProtectClock"):
        assert f"Service.{key}" not in s, f"{key} would keep blkid from the disk"
    assert one("Install.WantedBy") == "multi-user.target"


# The udev rule on a real udevd -------------------------------------------------------

@contextlib.contextmanager
def installed(path: Path, text: str) -> Iterator[None]:
    """``path`` holds ``text`` (udev reloaded) for the block; then it is as it was."""
    before = path.read_bytes() if path.exists() else None
    path.write_text(text)
    try:
        subprocess.run(["udevadm", "control", "--reload"], check=True, capture_output=True)
        yield
    finally:
        if before is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(before)
        subprocess.run(["udevadm", "control", "--reload"], capture_output=True)


def properties(output: str) -> dict[str, str]:
    """``KEY=value`` lines of udevadm's output as a dict (log lines are skipped)."""
    return dict(m.groups() for m in re.finditer(r"^([A-Z][A-Z0-9_]*)=(.*)$", output, re.M))


def udev_test(device: str, action: str) -> dict[str, str]:
    """The properties the rules on disk now give ``device`` for an ``action`` event
    (``udevadm test``: runs no RUN programs, but does write udev's database entry for
    the device, so a check of what the real udevd did reads the database before this, or
    after a real event)."""
    syspath = f"/sys/class/block/{Path(device).name}"
    r = subprocess.run(["udevadm", "test", f"--action={action}", syspath],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return properties(r.stdout)


def udev_info(device: str) -> dict[str, str]:
    """The properties in udev's database for ``device``: what the real events left."""
    r = subprocess.run(["udevadm", "info", "--query=property", f"--name={device}"],
                       capture_output=True, text=True, check=True)
    return properties(r.stdout)


def assert_marked(props: dict[str, str]) -> None:
    assert props.get("IMMICH_USB_BACKUP_CANDIDATE") == "1", props
    assert props.get("UDISKS_AUTO") == "0", props
    assert SERVICE in props.get("SYSTEMD_WANTS", "").split(), props


def assert_not_marked(props: dict[str, str]) -> None:
    assert "IMMICH_USB_BACKUP_CANDIDATE" not in props, props
    assert "UDISKS_AUTO" not in props, props
    assert SERVICE not in props.get("SYSTEMD_WANTS", "").split(), props


def test_the_udev_rule_marks_a_usb_exfat_partition_and_not_a_usb_ext4_one(
    real_stack: st.Stack, plugs: list[st.Plug], tmp_path: Path  # noqa: F811
) -> None:
    # formatted before any rule of this test is in place
    exfat = st.make_image(tmp_path / "exfat.img", "Backup", partitioned=True, marker=False)
    ext4 = st.make_image(tmp_path / "ext4.img", "Linux", partitioned=True, fs="ext4",
                         marker=False)

    with installed(INSTALLED_RULE, RULE.read_text()):
        plugs.append(st.plug(exfat))
        st.settle()
        exfat_dev = plugs[-1].device
        # Only the stack's 99- test rule: ID_BUS=usb is set after our rule ran, as for a
        # disk that is not USB when the rule looks: it is not marked.
        late = udev_test(exfat_dev, "add")
        assert late.get("ID_FS_TYPE") == "exfat", late
        assert_not_marked(late)

        with installed(EARLY_TEST_RULE, st.TEST_RULE_TEXT):
            # a USB exFAT partition, as it is plugged in: marked
            props = udev_test(exfat_dev, "add")
            assert props.get("ID_BUS") == "usb", props
            assert props.get("ID_FS_TYPE") == "exfat", props
            assert props.get("DEVTYPE") == "partition", props
            assert_marked(props)
            assert_marked(udev_test(exfat_dev, "change"))

            # a USB ext4 partition: the same bus, another file system: not marked
            plugs.append(st.plug(ext4))
            st.settle()
            props = udev_test(plugs[-1].device, "add")
            assert props.get("ID_BUS") == "usb", props
            assert props.get("ID_FS_TYPE") == "ext4", props
            assert_not_marked(props)

            # the real udevd, after a real event (a card reader's "change" when a card
            # goes in): its database says so too
            ext4_dev = plugs[-1].device
            subprocess.run(["udevadm", "trigger", "--action=change", exfat_dev, ext4_dev],
                           check=True, capture_output=True)
            st.settle()
            assert_marked(udev_info(exfat_dev))
            info = udev_info(ext4_dev)
            assert info.get("ID_BUS") == "usb", info
            assert_not_marked(info)


def test_the_udev_rule_marks_a_whole_usb_disk_formatted_without_a_partition_table(
    real_stack: st.Stack, plugs: list[st.Plug], tmp_path: Path  # noqa: F811
) -> None:
    """An SD card or a stick formatted without a partition table: the file system is on
    the disk itself, and it arrives by a change event (TESTBED.md: loop devices do)."""
    image = st.make_image(tmp_path / "whole.img", "Card", marker=False)

    with installed(INSTALLED_RULE, RULE.read_text()), \
            installed(EARLY_TEST_RULE, st.TEST_RULE_TEXT):
        plugs.append(st.plug(image))
        st.settle()
        device = plugs[-1].device

        # what the real udevd made of the events of the plug (read before udevadm test,
        # which writes the database itself)
        assert_marked(udev_info(device))
        props = udev_test(device, "change")
        assert props.get("DEVTYPE") == "disk", props
        assert props.get("ID_FS_TYPE") == "exfat", props
        assert_marked(props)


ATA_USB_RULE = (
    "# a USB hard disk that udev (systemd 252+) reports as ata, with its USB driver\n"
    'SUBSYSTEM=="block", KERNEL=="loop*", ENV{ID_FS_TYPE}=="exfat", '
    'ENV{ID_BUS}="ata", ENV{ID_USB_DRIVER}="uas"\n'
)
INTERNAL_ATA_RULE = (
    "# an internal disk: ata, no USB driver\n"
    'SUBSYSTEM=="block", KERNEL=="loop*", ENV{ID_FS_TYPE}=="exfat", ENV{ID_BUS}="ata"\n'
)


def test_the_udev_rule_marks_a_usb_disk_that_udev_reports_as_ata_but_not_an_internal_one(
    real_stack: st.Stack, plugs: list[st.Plug], tmp_path: Path  # noqa: F811
) -> None:
    image = st.make_image(tmp_path / "ssd.img", "SSD", partitioned=True, marker=False)

    with installed(INSTALLED_RULE, RULE.read_text()):
        plugs.append(st.plug(image))
        st.settle()
        device = plugs[-1].device
        # (the stack's own 99- rule sets ID_BUS=usb afterwards, too late for our 90- rule:
        # what our rule saw is ID_BUS=ata from the 89- rule below)
        with installed(EARLY_TEST_RULE, ATA_USB_RULE):
            props = udev_test(device, "add")
            assert props.get("ID_USB_DRIVER") == "uas", props
            assert_marked(props)
        with installed(EARLY_TEST_RULE, INTERNAL_ATA_RULE):
            props = udev_test(device, "add")
            assert "ID_USB_DRIVER" not in props, props
            assert_not_marked(props)
