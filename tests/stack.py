"""The real stack for end-to-end tests: a system D-Bus, udevd, UDisks2, plugged disks.

Brought up as shared/TESTBED.md describes, by the tests themselves, and taken down again.
Test-machine setup only (never product code): a udev rule that makes loop devices with
exFAT look like USB disks, and ``/sbin/mount.exfat`` pointing at exfat-fuse when the
kernel has no exFAT driver.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import select
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

UDEVD = "/lib/systemd/systemd-udevd"
UDISKSD = "/usr/libexec/udisks2/udisksd"
DBUS_SYSTEM_CONF = "/usr/share/dbus-1/system.conf"
TEST_RULE = Path("/etc/udev/rules.d/99-immich-usb-backup-test-loop-usb.rules")
TEST_RULE_TEXT = (
    '# immich-usb-backup tests: loop devices with exFAT or ext4 look like USB disks\n'
    'SUBSYSTEM=="block", KERNEL=="loop*", ENV{ID_FS_TYPE}=="exfat|ext4", ENV{ID_BUS}="usb"\n'
)
MOUNT_EXFAT = Path("/sbin/mount.exfat")


def missing_pieces() -> list[str]:
    """What this machine lacks for the real stack."""
    out = []
    if os.geteuid() != 0:
        out.append("root")
    for path in (UDEVD, UDISKSD, DBUS_SYSTEM_CONF, "/dev/loop-control"):
        if not Path(path).exists():
            out.append(path)
    for tool in ("dbus-daemon", "udevadm", "losetup", "partx", "sfdisk", "mkfs.exfat",
                 "busctl"):
        if shutil.which(tool) is None:
            out.append(tool)
    return out


def _run(*argv: str, check: bool = True) -> str:
    return subprocess.run(argv, check=check, capture_output=True, text=True).stdout


def settle() -> None:
    _run("udevadm", "settle", "--timeout=30", check=False)


def _kernel_has_exfat() -> bool:
    return "exfat" in Path("/proc/filesystems").read_text().split()


@dataclass
class Stack:
    workdir: Path
    bus_address: str = ""
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    undo: list[tuple[str, Path]] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": self.bus_address}

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        socket_path = self.workdir / "system_bus_socket"
        self.bus_address = f"unix:path={socket_path}"
        bus_log = open(self.workdir / "dbus.log", "wb")  # noqa: SIM115 - lives with the bus
        self.procs.append(subprocess.Popen(
            ["dbus-daemon", f"--config-file={DBUS_SYSTEM_CONF}", "--nofork", "--nopidfile",
             f"--address={self.bus_address}"],
            stdout=bus_log, stderr=bus_log))
        _wait(socket_path.exists, "the system bus socket")
        if not _udevd_running():
            self.procs.append(subprocess.Popen([UDEVD], stdout=subprocess.DEVNULL,
                                               stderr=subprocess.DEVNULL))
            _wait(_udevd_running, "udevd")
        if not TEST_RULE.exists():
            TEST_RULE.write_text(TEST_RULE_TEXT)
            self.undo.append(("unlink", TEST_RULE))
        _run("udevadm", "control", "--reload")
        _run("udevadm", "trigger", "--action=add", "--subsystem-match=block", check=False)
        settle()
        if not _kernel_has_exfat() and not MOUNT_EXFAT.exists():
            MOUNT_EXFAT.symlink_to(shutil.which("mount.exfat-fuse") or
                                   "/usr/sbin/mount.exfat-fuse")
            self.undo.append(("unlink", MOUNT_EXFAT))
        log = open(self.workdir / "udisksd.log", "wb")  # noqa: SIM115 - lives with udisksd
        self.procs.append(subprocess.Popen([UDISKSD], env=self.env, stdout=log, stderr=log))

        def owned() -> bool:
            r = subprocess.run(["busctl", f"--address={self.bus_address}", "status",
                                "org.freedesktop.UDisks2"], capture_output=True)
            return r.returncode == 0

        _wait(owned, "UDisks2 on the bus", timeout=30)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for _, path in reversed(self.undo):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if _udevd_running():
            _run("udevadm", "control", "--reload", check=False)


def _udevd_running() -> bool:
    return subprocess.run(["udevadm", "control", "--ping", "--timeout=2"],
                          capture_output=True).returncode == 0


def _wait(predicate, what: str, timeout: float = 15) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


def wait_for(predicate, what: str, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    _wait(predicate, what, timeout)


def is_mounted(device: str) -> bool:
    real = os.path.realpath(device)
    for line in Path("/proc/self/mounts").read_text().splitlines():
        if line.split(" ", 1)[0] in (device, real):
            return True
    return False


def fuse_helpers_running() -> bool:
    """Is an exfat-fuse process still alive (zombies left to a PID 1 that does not reap
    them do not count)?"""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm = text[text.find("(") + 1 : text.rfind(")")]
        state = text[text.rfind(")") + 2 :][:1]
        if comm.startswith("mount.exfat") and state != "Z":
            return True
    return False


@dataclass
class Image:
    """A disk image: exFAT (or ext4), whole-disk or with one partition."""

    path: Path
    label: str
    partitioned: bool = False
    fs: str = "exfat"

    def digest(self) -> str:
        """sha256 of the image: proves a disk was not written to."""
        h = hashlib.sha256()
        with open(self.path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        return h.hexdigest()


def make_image(path: Path, label: str, *, size_mb: int = 128, partitioned: bool = False,
               fs: str = "exfat", marker: bool = True, files: dict[str, bytes] | None = None,
               ) -> Image:
    """Build a disk image, the way a person prepares a disk on another computer."""
    with open(path, "wb") as f:
        f.truncate(size_mb * 1024 * 1024)
    if partitioned:
        subprocess.run(["sfdisk", "--quiet", str(path)], input="label: dos\n,,7\n",
                       text=True, check=True, capture_output=True)
    # format and fill it through a loop device that no udev rule marks as USB yet
    with _attached(path, partitioned) as dev:
        if fs == "exfat":
            _run("mkfs.exfat", "-L", label, dev)
        else:
            _run("mkfs.ext4", "-q", "-L", label, dev)
        if marker or files:
            mnt = path.with_suffix(".prep")
            mnt.mkdir(exist_ok=True)
            if fs == "exfat" and not _kernel_has_exfat():
                _run("mount.exfat-fuse", dev, str(mnt))
            else:
                _run("mount", dev, str(mnt))
            try:
                if marker:
                    (mnt / "immich-server-backups").mkdir()
                for rel, data in (files or {}).items():
                    (mnt / rel).parent.mkdir(parents=True, exist_ok=True)
                    (mnt / rel).write_bytes(data)
            finally:
                _run("umount", str(mnt))
                _wait(lambda: not is_mounted(dev), "the preparation mount to go")
                mnt.rmdir()
    return Image(path, label, partitioned, fs)


@contextlib.contextmanager
def _attached(path: Path, partitioned: bool) -> Iterator[str]:
    loop = _run("losetup", "-f", "--show", str(path)).strip()
    try:
        if partitioned:
            _run("partx", "-a", loop)
            settle()
            yield f"{loop}p1"
        else:
            settle()
            yield loop
    finally:
        settle()
        _wait(lambda: not fuse_helpers_running(), "exfat-fuse to exit", timeout=30)
        if partitioned:
            _run("partx", "-d", loop, check=False)
        _run("losetup", "-d", loop, check=False)
        settle()


@dataclass
class Plug:
    """An image attached as a disk: ``device`` is what the daemon sees."""

    image: Image
    loop: str
    device: str

    def pull(self) -> None:
        """Unplug, as a person pulls the cable once the disk is safe to unplug."""
        _wait(lambda: not is_mounted(self.device), f"{self.device} to be unmounted", 60)
        _wait(lambda: not fuse_helpers_running(), "exfat-fuse to exit", timeout=30)
        if self.image.partitioned:
            _run("partx", "-d", self.loop, check=False)
        _run("losetup", "-d", self.loop, check=False)
        settle()


def plug(image: Image) -> Plug:
    """Attach ``image``: udev reports the disk (and its partition) as a USB disk would."""
    loop = _run("losetup", "-f", "--show", str(image.path)).strip()
    device = loop
    if image.partitioned:
        _run("partx", "-a", loop)
        device = f"{loop}p1"
    return Plug(image, loop, device)


class MountWatcher:
    """Records every mount of a device while it is active, with its options.

    /proc/self/mountinfo wakes poll() with POLLPRI on every mount change, so even a mount
    that lasts milliseconds (the daemon looking for the marker) is seen.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.seen: list[tuple[str, str]] = []  # (mount point, options)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        with open("/proc/self/mountinfo", "rb") as f:
            poller = select.poll()
            poller.register(f, select.POLLPRI | select.POLLERR)
            while not self._stop.is_set():
                f.seek(0)
                for line in f.read().decode(errors="replace").splitlines():
                    left, _, right = line.partition(" - ")
                    rf, lf = right.split(), left.split()
                    if len(rf) >= 2 and rf[1] == self.device:
                        entry = (lf[4], lf[5])
                        if entry not in self.seen:
                            self.seen.append(entry)
                poller.poll(100)

    def stop(self) -> list[tuple[str, str]]:
        self._stop.set()
        self._thread.join()
        return self.seen
