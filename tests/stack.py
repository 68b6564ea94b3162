"""The real stack for end-to-end tests: a system D-Bus, udevd, UDisks2, plugged disks.

Brought up as shared/TESTBED.md describes, by the tests themselves, and taken down again;
a udevd or a UDisks2 that already answers (a desktop, a server) is used as it is and left
running. Test-machine setup only (never product code): a udev rule that makes loop devices
with exFAT look like USB disks (only those of this test session's images: any other disk
of the machine stays what it is), and ``/sbin/mount.exfat`` pointing at exfat-fuse when
the kernel has no exFAT driver.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import os
import select
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

UDEVD = "/lib/systemd/systemd-udevd"
UDISKSD = "/usr/libexec/udisks2/udisksd"
DBUS_SYSTEM_CONF = "/usr/share/dbus-1/system.conf"
SYSTEM_BUS_ADDRESS = "unix:path=/run/dbus/system_bus_socket"
UDISKS2 = "org.freedesktop.UDisks2"
TEST_RULE = Path("/etc/udev/rules.d/99-immich-usb-backup-test-loop-usb.rules")
MOUNT_EXFAT = Path("/sbin/mount.exfat")


def loop_usb_rule(images_under: Path) -> str:
    """The test-only udev rule: a loop device with exFAT or ext4 whose image lies under
    ``images_under`` looks like a USB disk (its partitions too: ``ATTRS`` looks at the
    parent loop device). Another loop device (a disk image a person attached, one left
    behind by an earlier run) is not touched."""
    return (
        "# immich-usb-backup tests: loop devices with exFAT or ext4 look like USB disks\n"
        f"# (only those of images under {images_under})\n"
        'SUBSYSTEM=="block", KERNEL=="loop*", ENV{ID_FS_TYPE}=="exfat|ext4", '
        f'ATTRS{{loop/backing_file}}=="{images_under}/*", ENV{{ID_BUS}}="usb"\n'
    )


# The rule text of the running stack: Stack.start narrows it to the session's own images.
TEST_RULE_TEXT = loop_usb_rule(Path(tempfile.gettempdir()) / f"pytest-of-{getpass.getuser()}")


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


class StackError(RuntimeError):
    """A command of the test stack failed; the message has its stderr."""


def _run(*argv: str, check: bool = True) -> str:
    r = subprocess.run(argv, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise StackError(f"{' '.join(argv)} exited {r.returncode}: {r.stderr.strip()}")
    return r.stdout


def settle() -> None:
    _run("udevadm", "settle", "--timeout=30", check=False)


def _kernel_has_exfat() -> bool:
    return "exfat" in Path("/proc/filesystems").read_text().split()


def udisks_answers(address: str) -> bool:
    """Does UDisks2 answer on the bus at ``address``?"""
    r = subprocess.run(["busctl", f"--address={address}", "status", UDISKS2],
                       capture_output=True, timeout=30)
    return r.returncode == 0


def running_udisks_bus() -> str | None:
    """The address of the machine's system bus if UDisks2 already answers there."""
    address = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or SYSTEM_BUS_ADDRESS
    if address.startswith("unix:path=") and not Path(address[len("unix:path="):]).exists():
        return None
    return address if udisks_answers(address) else None


@dataclass
class Stack:
    """The system bus, udevd and UDisks2 the tests talk to.

    A UDisks2 that already answers on the system bus is used (a second udisksd beside it
    would manage the same disks); else a private bus and a udisksd are started for the
    tests. udevd likewise. What was started is stopped by ``stop``; what was found running
    is left running. ``images_under``: the folder whose disk images look like USB disks.
    """

    workdir: Path
    images_under: Path
    bus_address: str = ""
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    undo: list[tuple[Path, bytes | None]] = field(default_factory=list)  # (file, before)
    reused: list[str] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": self.bus_address}

    def start(self) -> None:
        global TEST_RULE_TEXT  # noqa: PLW0603 - one stack at a time; read at call time
        self.workdir.mkdir(parents=True, exist_ok=True)
        existing = running_udisks_bus()
        if existing:
            self.bus_address = existing
            self.reused.append(f"UDisks2 on {existing}")
        else:
            socket_path = self.workdir / "system_bus_socket"
            self.bus_address = f"unix:path={socket_path}"
            bus_log = open(self.workdir / "dbus.log", "wb")  # noqa: SIM115 - lives with the bus
            self.procs.append(subprocess.Popen(
                ["dbus-daemon", f"--config-file={DBUS_SYSTEM_CONF}", "--nofork",
                 "--nopidfile", f"--address={self.bus_address}"],
                stdout=bus_log, stderr=bus_log))
            _wait(socket_path.exists, "the system bus socket")
        if _udevd_running():
            self.reused.append("udevd")
            started_udevd = False
        else:
            self.procs.append(subprocess.Popen([UDEVD], stdout=subprocess.DEVNULL,
                                               stderr=subprocess.DEVNULL))
            _wait(_udevd_running, "udevd")
            started_udevd = True
        TEST_RULE_TEXT = loop_usb_rule(self.images_under.resolve())
        self._write(TEST_RULE, TEST_RULE_TEXT)
        _run("udevadm", "control", "--reload")
        if started_udevd:  # a new udevd has an empty database: announce what is there
            _run("udevadm", "trigger", "--action=add", "--subsystem-match=block",
                 check=False)
        settle()
        if not _kernel_has_exfat() and not MOUNT_EXFAT.exists():
            MOUNT_EXFAT.symlink_to(shutil.which("mount.exfat-fuse") or
                                   "/usr/sbin/mount.exfat-fuse")
            self.undo.append((MOUNT_EXFAT, None))
        if not existing:
            log = open(self.workdir / "udisksd.log", "wb")  # noqa: SIM115 - lives with udisksd
            self.procs.append(subprocess.Popen([UDISKSD], env=self.env, stdout=log,
                                               stderr=log))
            _wait(lambda: udisks_answers(self.bus_address), "UDisks2 on the bus", timeout=30)

    def _write(self, path: Path, text: str) -> None:
        before = path.read_bytes() if path.exists() else None
        path.write_text(text)
        self.undo.append((path, before))

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
        for path, before in reversed(self.undo):
            if before is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(before)
        self.undo.clear()
        if _udevd_running():
            _run("udevadm", "control", "--reload", check=False)


def _udevd_running() -> bool:
    return subprocess.run(["udevadm", "control", "--ping", "--timeout=2"],
                          capture_output=True).returncode == 0


def _wait(predicate: Callable[[], object], what: str, timeout: float = 15) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise StackError(f"timed out waiting for {what}")


def wait_for(predicate: Callable[[], object], what: str, timeout: float = 60) -> None:
    _wait(predicate, what, timeout)


def is_mounted(device: str) -> bool:
    real = os.path.realpath(device)
    for line in Path("/proc/self/mounts").read_text().splitlines():
        if line.split(" ", 1)[0] in (device, real):
            return True
    return False


def _live_processes() -> Iterator[tuple[int, str, list[str]]]:
    """(pid, comm, argv) of every process that is not a zombie (PID 1 here does not reap
    orphans: a dead helper stays in the process table)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            argv = stat.with_name("cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        comm = text[text.find("(") + 1 : text.rfind(")")]
        state = text[text.rfind(")") + 2 :][:1]
        if state != "Z":
            yield int(stat.parent.name), comm, argv.split("\0")


def fuse_helpers_running(device: str) -> bool:
    """Is the exfat-fuse process of ``device`` still alive? Helpers of other disks (a
    person's own exFAT disk, mounted through FUSE as well) do not count."""
    names = {device, os.path.realpath(device)}
    return any(comm.startswith("mount.exfat") and names & set(argv)
               for _, comm, argv in _live_processes())


def backing_file(loop: str) -> str | None:
    """The image ``loop`` (``/dev/loopN``) is bound to, or None if it is free."""
    try:
        return Path(f"/sys/block/{Path(loop).name}/loop/backing_file").read_text().strip()
    except OSError:
        return None


def _holds(loop: str, image: Path) -> bool:
    """Is ``loop`` bound to ``image`` (and not, meanwhile, to another image)?"""
    name = backing_file(loop)
    return name is not None and name.removesuffix(" (deleted)") == str(image.resolve())


def _unmount_all(device: str) -> None:
    """Unmount every mount of ``device`` (lazily if it stays busy) and wait for its FUSE
    helper to finish writing."""
    for _ in range(20):
        if not is_mounted(device):
            break
        if subprocess.run(["umount", device], capture_output=True).returncode != 0:
            time.sleep(0.25)
    else:
        _run("umount", "--lazy", device, check=False)
    _wait(lambda: not is_mounted(device), f"{device} to be unmounted", 30)
    _wait(lambda: not fuse_helpers_running(device), f"exfat-fuse of {device} to exit", 30)


def detach(loop: str, image: Path, partitioned: bool) -> None:
    """Take ``loop`` away from ``image`` (its partition first) and wait until the kernel
    let it go. A loop device meanwhile free, or bound to another image, is left alone.

    Raise StackError if it stays bound: something still holds it open, and a loop device
    left behind is a disk that the next run (or another UDisks2) finds."""
    if not _holds(loop, image):
        return
    try:
        if partitioned:
            for _ in range(20):  # udev's probes may hold the partition for a moment
                if not Path(f"/sys/class/block/{Path(loop).name}p1").exists():
                    break
                if subprocess.run(["partx", "-d", loop], capture_output=True).returncode:
                    settle()
                    time.sleep(0.1)
    finally:
        _run("losetup", "-d", loop, check=False)
    # a device still open is only marked to go (autoclear) when its last user closes it
    _wait(lambda: not _holds(loop, image), f"{loop} ({image}) to be detached", 30)
    settle()


def attach(path: Path, partitioned: bool) -> tuple[str, str]:
    """Attach ``path`` to a free loop device: ``(loop, device)``, the device being the
    partition for a partitioned image. Nothing is left attached if this fails."""
    loop = _run("losetup", "-f", "--show", str(path)).strip()
    try:
        if not partitioned:
            return loop, loop
        part = Path(f"/sys/class/block/{Path(loop).name}p1")
        for _ in range(20):
            r = subprocess.run(["partx", "-a", loop], capture_output=True, text=True)
            if part.exists():
                break
            settle()
            time.sleep(0.1)
        else:
            raise StackError(f"partx -a {loop} exited {r.returncode}: {r.stderr.strip()}")
        return loop, f"{loop}p1"
    except BaseException:
        detach(loop, path, partitioned)
        raise


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
    # format and fill it through a loop device, before it is plugged as a disk
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
                _unmount_all(dev)
                mnt.rmdir()
    return Image(path, label, partitioned, fs)


@contextlib.contextmanager
def _attached(path: Path, partitioned: bool) -> Iterator[str]:
    """``path`` attached for the block (its partition's device if partitioned); whatever
    happens, unmounted and detached afterwards."""
    loop, dev = attach(path, partitioned)
    try:
        settle()
        yield dev
    finally:
        try:
            settle()
            _unmount_all(dev)
        finally:
            detach(loop, path, partitioned)


@dataclass
class Plug:
    """An image attached as a disk: ``device`` is what the daemon sees."""

    image: Image
    loop: str
    device: str

    def pull(self) -> None:
        """Unplug, as a person pulls the cable once the disk is safe to unplug.

        Raise StackError if the disk is not unmounted in time (it is detached anyway)."""
        try:
            _wait(lambda: not is_mounted(self.device), f"{self.device} to be unmounted", 60)
            _wait(lambda: not fuse_helpers_running(self.device),
                  f"exfat-fuse of {self.device} to exit", timeout=30)
        finally:
            detach(self.loop, self.image.path, self.image.partitioned)

    def remove(self) -> None:
        """Clean up after a test, whatever it left: unmount what is still mounted, then
        detach."""
        if _holds(self.loop, self.image.path):
            try:
                _unmount_all(self.device)
            finally:
                detach(self.loop, self.image.path, self.image.partitioned)


def plug(image: Image) -> Plug:
    """Attach ``image``: udev reports the disk (and its partition) as a USB disk would."""
    loop, device = attach(image.path, image.partitioned)
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
