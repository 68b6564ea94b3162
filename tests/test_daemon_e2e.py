"""The daemon end to end on the real stack: udevd, UDisks2 on a system bus, exFAT disks.

A disk is "plugged" by attaching a disk image to a loop device (with a partition table:
``partx -a`` makes udev announce the partition, as for a USB stick); a test-only udev rule
makes loop devices look like USB disks. The daemon runs as a real subprocess.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import stack as st
from helpers import LoopWatch, Server, note_loop_blocks, run_cli, tree
from immich_usb_backup import history


@pytest.fixture(autouse=True)
def _loop_never_blocked(no_blocked_loop: LoopWatch) -> LoopWatch:
    """Every test fails if the daemon's (or a command's) event loop was blocked for
    100 ms (conftest). Set up first, so checked last: after the daemons stopped."""
    return no_blocked_loop


class Daemon:
    """``immich-usb-backup daemon`` as systemd would run it (with NOTIFY_SOCKET)."""

    def __init__(self, server: Server, stack: st.Stack, workdir: Path) -> None:
        self.server = server
        self.log_path = workdir / "daemon.log"
        self.notify_path = workdir / "notify.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        env = {**stack.env, "NOTIFY_SOCKET": str(self.notify_path)}
        self.log_file = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "immich_usb_backup", "-c", str(server.config_path), "-v",
             "daemon"],
            env=env, stdout=self.log_file, stderr=subprocess.STDOUT)
        self.messages: list[str] = []

    def wait_notify(self, wanted: str, timeout: float = 30) -> None:
        self.notify.settimeout(timeout)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            data = self.notify.recv(4096).decode()
            self.messages += data.split("\n")
            if wanted in self.messages:
                return
        raise AssertionError(f"no {wanted} from the daemon; got {self.messages}")

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        if self.notify.fileno() != -1:
            self.notify.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                while data := self.notify.recv(4096):
                    self.messages += data.decode().split("\n")
            self.notify.close()
            self.log_file.close()
        return rc


@pytest.fixture
def start_daemon(real_stack: st.Stack, server: Server, tmp_path: Path,
                 plugs: list[st.Plug]) -> Iterator[Callable[[], Daemon]]:
    """Start the daemon; it is stopped at the end of the test, before the test's disks are
    pulled (``plugs`` is set up first, so torn down last), and its log is checked for a
    blocked event loop."""
    started: list[Daemon] = []

    def start() -> Daemon:
        workdir = tmp_path / f"daemon-{len(started) + 1}"
        workdir.mkdir()
        d = Daemon(server, real_stack, workdir)
        started.append(d)
        d.wait_notify("READY=1")
        return d

    yield start
    problems = []
    for d in started:
        try:
            d.stop()
        except Exception as exc:  # every daemon is stopped; the first problem is told
            problems.append(exc)
        note_loop_blocks(f"daemon ({d.log_path})", d.log)
    if problems:
        raise problems[0]


@pytest.fixture
def plugs() -> Iterator[list[st.Plug]]:
    """Plugged disks, unmounted and detached at the end of the test whatever happened
    (the teardown fails if one cannot be: a disk left attached is found by the next run)."""
    out: list[st.Plug] = []
    yield out
    problems = []
    for p in out:
        try:
            p.remove()
        except Exception as exc:
            problems.append(exc)
    if problems:
        raise problems[0]


def records(server: Server) -> list[dict[str, Any]]:
    return history.last_records(server.state, None)


def wait_records(server: Server, n: int, timeout: float = 90) -> list[dict[str, Any]]:
    st.wait_for(lambda: len(records(server)) >= n, f"{n} history records", timeout)
    return records(server)


@contextlib.contextmanager
def opened(image: st.Image) -> Iterator[Path]:
    """Mount an image read-only to look at it (no daemon may be running)."""
    with st._attached(image.path, image.partitioned) as dev:
        mnt = image.path.with_suffix(".look")
        mnt.mkdir(exist_ok=True)
        if image.fs == "exfat" and not st._kernel_has_exfat():
            subprocess.run(["mount.exfat-fuse", "-o", "ro", dev, str(mnt)], check=True,
                           capture_output=True)
        else:
            subprocess.run(["mount", "-o", "ro", dev, str(mnt)], check=True)
        try:
            yield mnt
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
            st.wait_for(lambda: not st.is_mounted(dev), "the look mount to go", 30)


def approve_in_config(server: Server, *uuids: str, extra: str = "") -> None:
    listed = ", ".join(f'"{u}"' for u in uuids)
    server.write_config(f"[disks]\napproved = [{listed}]\n{extra}")


def uuid_of(image: st.Image) -> str:
    dev = "" if image.partitioned else str(image.path)
    out = subprocess.run(["blkid", "-p", "-o", "value", "-s", "UUID", dev or "/dev/null"],
                         capture_output=True, text=True).stdout.strip()
    if not out:  # a partitioned image: probe the partition at its offset
        out = subprocess.run(
            ["blkid", "-p", "-o", "value", "-s", "UUID", "--offset", str(1024 * 1024),
             str(image.path)], capture_output=True, text=True).stdout.strip()
    assert out, f"no UUID found in {image.path}"
    return out


# Plug and backup ---------------------------------------------------------------------

def test_plugging_an_approved_partitioned_disk_backs_up_unmounts_and_records_success(
    start_daemon, server: Server, plugs: list[st.Plug], tmp_path: Path
) -> None:
    image = st.make_image(tmp_path / "disk.img", "Backup", partitioned=True,
                          files={"My Notes.txt": b"mine\n"})
    approve_in_config(server, uuid_of(image))
    daemon = start_daemon()

    plugs.append(st.plug(image))
    (rec,) = wait_records(server, 1)

    assert rec["status"] == "success", rec
    assert rec["trigger"] == "plug"
    assert rec["disk"]["label"] == "Backup"
    st.wait_for(lambda: f"unmounted {plugs[0].device}" in daemon.log, "the unmount", 30)
    assert not st.is_mounted(plugs[0].device)
    assert daemon.stop() == 0
    plugs[0].pull()
    plugs.clear()
    with opened(image) as mnt:
        assert tree(mnt / "immich-server-backups" / "library") == tree(server.upload)
        assert (mnt / "My Notes.txt").read_bytes() == b"mine\n"


def test_an_unmarked_disk_is_left_exactly_as_found(
    start_daemon, server: Server, plugs: list[st.Plug], tmp_path: Path
) -> None:
    image = st.make_image(tmp_path / "disk.img", "Holiday", marker=False,
                          files={"photo.jpg": b"x" * 1000})
    approve_in_config(server)  # nothing approved; nothing to look at but the marker
    digest = image.digest()
    daemon = start_daemon()

    plugs.append(st.plug(image))
    watcher = st.MountWatcher(plugs[0].device)
    st.wait_for(lambda: "left alone" in daemon.log, "the daemon to look at the disk", 30)
    mounts = watcher.stop()

    assert mounts, "the daemon looked for the marker without mounting?"
    assert all(opts.split(",")[0] == "ro" for _, opts in mounts), mounts  # read-only only
    assert not st.is_mounted(plugs[0].device)
    assert records(server) == []
    assert daemon.stop() == 0
    plugs[0].pull()
    plugs.clear()
    assert image.digest() == digest  # not a byte written, not even the dirty flag


def test_an_ext4_usb_disk_is_ignored_and_never_mounted(
    start_daemon, server: Server, plugs: list[st.Plug], tmp_path: Path
) -> None:
    image = st.make_image(tmp_path / "disk.img", "linux", fs="ext4")
    digest = image.digest()
    daemon = start_daemon()

    plugs.append(st.plug(image))
    watcher = st.MountWatcher(plugs[0].device)
    st.wait_for(lambda: f"ignored {plugs[0].device}: bus=usb fs=ext4" in daemon.log,
                "the event", 30)
    time.sleep(1)  # what would a mount attempt need? far less than this

    assert watcher.stop() == []  # never mounted, not even to look
    assert not st.is_mounted(plugs[0].device)
    assert records(server) == []
    daemon.stop()
    plugs[0].pull()
    plugs.clear()
    assert image.digest() == digest


def test_a_marked_but_unapproved_disk_is_refused_with_the_command_to_approve_it(
    start_daemon, server: Server, plugs: list[st.Plug], tmp_path: Path
) -> None:
    image = st.make_image(tmp_path / "disk.img", "Stranger")
    uuid = uuid_of(image)
    digest = image.digest()
    daemon = start_daemon()

    plugs.append(st.plug(image))
    (rec,) = wait_records(server, 1)

    assert rec["status"] == "refused"
    assert f"immich-usb-backup approve UUID={uuid}" in rec["problems"][0]
    assert "not approved" in daemon.log
    time.sleep(1)  # several change events per plug: still told only once
    assert len(records(server)) == 1
    assert not st.is_mounted(plugs[0].device)
    daemon.stop()
    plugs[0].pull()
    plugs.clear()
    assert image.digest() == digest


def test_approve_then_plug_backs_up_a_disk_with_a_label_with_a_space_and_an_umlaut(
    start_daemon, real_stack: st.Stack, server: Server, plugs: list[st.Plug], tmp_path: Path
) -> None:
    image = st.make_image(tmp_path / "disk.img", "Bäckup Disk", marker=False)
    plugs.append(st.plug(image))
    st.settle()
    r = run_cli("approve", plugs[0].device, config=server.config_path)
    assert r.returncode == 1 and "--create-marker" in r.stderr
    r = run_cli("approve", plugs[0].device, "--create-marker", config=server.config_path)
    assert r.returncode == 0, r.stderr
    assert "approved Bäckup Disk" in r.stdout
    assert not st.is_mounted(plugs[0].device)
    r = run_cli("disks", "--json", config=server.config_path)
    (row,) = [d for d in json.loads(r.stdout) if d["device"] == plugs[0].device]
    assert row["label"] == "Bäckup Disk" and row["approved"] is True
    plugs[0].pull()
    plugs.clear()
    start_daemon()

    plugs.append(st.plug(image))
    (rec,) = wait_records(server, 1)

    assert rec["status"] == "success", rec
    assert rec["disk"]["label"] == "Bäckup Disk"
    assert "Bäckup Disk" in rec["target"]


def test_a_disk_already_mounted_by_someone_else_is_backed_up_and_left_mounted(
    start_daemon, real_stack: st.Stack, server: Server, plugs: list[st.Plug], tmp_path: Path
) -> None:
    image = st.make_image(tmp_path / "disk.img", "Desk")
    approve_in_config(server, uuid_of(image))
    plugs.append(st.plug(image))
    st.settle()
    object_path = f"/org/freedesktop/UDisks2/block_devices/{Path(plugs[0].device).name}"
    subprocess.run(["busctl", f"--address={real_stack.bus_address}", "call",
                    "org.freedesktop.UDisks2", object_path,
                    "org.freedesktop.UDisks2.Filesystem", "Mount", "a{sv}", "0"],
                   check=True, capture_output=True)
    assert st.is_mounted(plugs[0].device)

    daemon = start_daemon()  # finds it at start-up (coldplug)
    (rec,) = wait_records(server, 1)

    assert rec["status"] == "success", rec
    assert "already mounted" in daemon.log
    time.sleep(0.5)
    assert st.is_mounted(plugs[0].device)


def test_a_second_disk_plugged_during_a_backup_is_queued_and_backed_up_after(
    start_daemon, server: Server, plugs: list[st.Plug], tmp_path: Path
) -> None:
    (server.upload / "upload" / "video.mp4").write_bytes(os.urandom(3 * 1024 * 1024))
    first = st.make_image(tmp_path / "one.img", "One")
    second = st.make_image(tmp_path / "two.img", "Two")
    approve_in_config(server, uuid_of(first), uuid_of(second),
                      extra="[library]\nbwlimit_kib = 2048\n")
    start_daemon()

    plugs.append(st.plug(first))
    st.wait_for(lambda: json.loads(run_cli("status", "--json", config=server.config_path)
                                   .stdout)["state"] == "running", "the first backup", 30)
    plugs.append(st.plug(second))
    one, two = wait_records(server, 2, timeout=120)

    assert [one["disk"]["label"], two["disk"]["label"]] == ["One", "Two"]
    assert one["status"] == two["status"] == "success"
    assert one["finished_at"] <= two["started_at"]


# The disk key: a stranger's disk with an approved UUID gets nothing ----------------------

def copy_serial(image: st.Image, uuid: str) -> None:
    """Give ``image`` the volume serial ``uuid`` (XXXX-XXXX), as anyone can with
    ``tune.exfat -I``."""
    subprocess.run(["tune.exfat", "-I", "0x" + uuid.replace("-", ""), str(image.path)],
                   check=True, capture_output=True)


def test_a_disk_with_a_copied_serial_and_marker_is_refused_read_only_and_told(
    start_daemon, server: Server, plugs: list[st.Plug], tmp_path: Path
) -> None:
    from test_notify import Hook

    real = st.make_image(tmp_path / "real.img", "Backup")
    uuid = uuid_of(real)
    # a stranger's disks (made before the daemon runs: making one attaches it), given the
    # approved disk's serial and the marker folder: one with a key of its own, one without
    stranger = st.make_image(tmp_path / "stranger.img", "Backup",
                             files={"immich-server-backups/disk-key.txt":
                                    b"immich-usb-backup disk key\n" + b"0" * 64 + b"\n"})
    bare = st.make_image(tmp_path / "bare.img", "Backup")
    for image in (stranger, bare):
        copy_serial(image, uuid)
        assert uuid_of(image) == uuid
    digests = {stranger.path: stranger.digest(), bare.path: bare.digest()}
    hook = Hook()
    try:
        approve_in_config(server, uuid, extra=f'\n[notify]\nurls = ["{hook.url()}"]\n')
        daemon = start_daemon()
        plugs.append(st.plug(real))  # the first plug of a disk never backed up: its key
        (first,) = wait_records(server, 1)
        assert first["status"] == "success", first
        st.wait_for(lambda: not st.is_mounted(plugs[0].device), "the unmount", 30)
        plugs.pop().pull()
        sent = len(hook.wait_for(2))  # started, finished

        for image, why in ((stranger, "its key does not match"), (bare, "its key is missing")):
            plugs.append(st.plug(image))
            watcher = st.MountWatcher(plugs[0].device)
            st.wait_for(lambda n=sent: len(hook.received) > n, "the message", 60)
            mounts = watcher.stop()
            rec = records(server)[-1]
            assert rec["status"] == "refused", rec
            assert (f"a disk claiming to be Backup (UUID {uuid}) was refused: {why}"
                    in rec["problems"][0])
            assert rec["files_transferred"] == 0
            msg = hook.received[sent]
            assert why in msg["message"] and msg["title"] == "Immich backup: refused on Backup"
            sent += 1
            assert mounts and all(opts.split(",")[0] == "ro" for _, opts in mounts), mounts
            st.wait_for(lambda: not st.is_mounted(plugs[0].device), "the unmount", 30)
            plugs.pop().pull()
            assert image.digest() == digests[image.path]  # not a byte written
        assert daemon.proc.poll() is None
        assert len(records(server)) == 3
        daemon.stop()
    finally:
        hook.close()
    with opened(real) as mnt:  # the real disk has its key, the state its hash
        key = (mnt / "immich-server-backups" / "disk-key.txt").read_text().splitlines()[1]
    assert hashlib.sha256(key.encode()).hexdigest() in (server.state / "disks.toml").read_text()


def test_a_damaged_approvals_file_is_kept_aside_recorded_told_and_the_daemon_stays_up(
    start_daemon, server: Server, plugs: list[st.Plug], tmp_path: Path
) -> None:
    from test_notify import Hook

    image = st.make_image(tmp_path / "disk.img", "Backup")
    uuid = uuid_of(image)
    cut = f'[[disk]]\nuuid = "{uuid}"\nlabel = "Backup"\napproved_at = "2026-'
    hook = Hook()
    try:
        server.write_config(f'[notify]\nurls = ["{hook.url()}"]\n')
        server.state.mkdir(parents=True, exist_ok=True)
        (server.state / "disks.toml").write_text(cut)  # a half-written line
        daemon = start_daemon()  # its reminder check reads the approvals at once

        (rec,) = wait_records(server, 1)
        assert rec["status"] == "failed" and rec["trigger"] == "schedule"
        assert "disks.toml was damaged" in rec["problems"][0]
        assert "approve each backup disk again" in rec["problems"][0]
        (aside,) = server.state.glob("disks.toml.damaged-*")
        assert aside.read_text() == cut
        (msg,) = hook.wait_for(1)
        assert "disks.toml was damaged" in msg["message"]

        plugs.append(st.plug(image))  # the next plug is not silent: approve it again
        _, again = wait_records(server, 2)
        assert again["status"] == "refused" and "not approved" in again["problems"][0]
        st.wait_for(lambda: not st.is_mounted(plugs[0].device), "the unmount", 30)
        plugs.pop().pull()

        (server.state / "disks.toml").write_text(cut)  # damaged while the daemon runs
        plugs.append(st.plug(image))
        *_, third = wait_records(server, 3)
        assert third["status"] == "refused" and "disks.toml was damaged" in third[
            "problems"][0]
        assert third["disk"]["uuid"] == uuid and third["files_transferred"] == 0
        assert len(list(server.state.glob("disks.toml.damaged-*"))) == 2
        assert daemon.proc.poll() is None
    finally:
        hook.close()


# Interruptions -------------------------------------------------------------------------

def _wait_copying(server: Server) -> None:
    def copying() -> bool:
        s = json.loads(run_cli("status", "--json", config=server.config_path).stdout)
        return s["state"] == "running" and s.get("phase") == "library" and s["percent"] > 1
    st.wait_for(copying, "the library copy to start", 60)


def test_a_disk_pulled_mid_backup_stops_rsync_records_interrupted_and_next_plug_finishes(
    start_daemon, server: Server, plugs: list[st.Plug], tmp_path: Path
) -> None:
    (server.upload / "upload" / "video.mp4").write_bytes(os.urandom(8 * 1024 * 1024))
    image = st.make_image(tmp_path / "disk.img", "Pulled", partitioned=True)
    approve_in_config(server, uuid_of(image), extra="[library]\nbwlimit_kib = 1024\n")
    daemon = start_daemon()
    plugs.append(st.plug(image))
    _wait_copying(server)

    # the kernel's remove event for the partition, as when the cable is pulled
    subprocess.run(["udevadm", "trigger", "--action=remove", plugs[0].device], check=True)
    (rec,) = wait_records(server, 1)

    assert rec["status"] == "interrupted"
    assert "removed during the backup" in daemon.log
    r = subprocess.run(["pgrep", "-f", "rsync.*immich-server-backups"], capture_output=True,
                       text=True)
    assert r.stdout == ""
    assert daemon.proc.poll() is None  # no crash
    st.wait_for(lambda: "is gone" in daemon.log, "the daemon to let go of the disk", 30)
    # the kernel device is still there (only its remove event was sent): clean up the
    # stale mount as UDisks2 does for a device that vanished, then really unplug
    subprocess.run(["umount", plugs[0].device], check=True)
    plugs[0].pull()
    plugs.clear()

    server.write_config(f'[disks]\napproved = ["{uuid_of(image)}"]\n')  # full speed again
    daemon.stop()
    start_daemon()
    plugs.append(st.plug(image))
    _, again = wait_records(server, 2, timeout=120)
    assert again["status"] == "success", again


def test_sigterm_mid_backup_stops_unmounts_records_and_exits_zero(
    start_daemon, server: Server, plugs: list[st.Plug], tmp_path: Path
) -> None:
    (server.upload / "upload" / "video.mp4").write_bytes(os.urandom(8 * 1024 * 1024))
    image = st.make_image(tmp_path / "disk.img", "Stopped")
    approve_in_config(server, uuid_of(image), extra="[library]\nbwlimit_kib = 1024\n")
    daemon = start_daemon()
    plugs.append(st.plug(image))
    _wait_copying(server)

    rc = daemon.stop()

    assert rc == 0
    (rec,) = records(server)
    assert rec["status"] == "interrupted"
    assert "STOPPING=1" in daemon.messages
    assert not st.is_mounted(plugs[0].device)


# The command line with device targets -----------------------------------------------

def test_run_with_a_device_or_uuid_mounts_backs_up_and_unmounts(
    real_stack: st.Stack, server: Server, plugs: list[st.Plug], tmp_path: Path
) -> None:
    image = st.make_image(tmp_path / "disk.img", "ByUUID")
    plugs.append(st.plug(image))
    st.settle()

    r = run_cli("run", plugs[0].device, config=server.config_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not st.is_mounted(plugs[0].device)

    r = run_cli("run", f"UUID={uuid_of(image)}", config=server.config_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not st.is_mounted(plugs[0].device)
    assert [x["status"] for x in records(server)] == ["success", "success"]


def test_verify_with_a_device_mounts_it_read_only_checks_and_unmounts(
    real_stack: st.Stack, server: Server, plugs: list[st.Plug], tmp_path: Path
) -> None:
    image = st.make_image(tmp_path / "disk.img", "Drawer")
    plugs.append(st.plug(image))
    st.settle()
    r = run_cli("run", plugs[0].device, config=server.config_path)
    assert r.returncode == 0, r.stdout + r.stderr
    digest = image.digest()
    watcher = st.MountWatcher(plugs[0].device)

    r = run_cli("verify", f"UUID={uuid_of(image)}", config=server.config_path)

    mounts = watcher.stop()
    assert r.returncode == 0, r.stdout + r.stderr
    assert "verify OK" in r.stdout
    assert mounts and all(opts.split(",")[0] == "ro" for _, opts in mounts), mounts
    assert not st.is_mounted(plugs[0].device)
    assert image.digest() == digest  # not a byte written


def test_run_approved_for_a_timer_backs_up_every_approved_disk_left_plugged_in(
    real_stack: st.Stack, server: Server, plugs: list[st.Plug], tmp_path: Path
) -> None:
    r = run_cli("run", "approved", "--trigger", "schedule", config=server.config_path)
    assert r.returncode == 0, r.stderr
    assert "no approved disk is connected" in r.stdout
    approved = st.make_image(tmp_path / "one.img", "Kept")
    other = st.make_image(tmp_path / "two.img", "Other")
    approve_in_config(server, uuid_of(approved))
    plugs.append(st.plug(approved))
    plugs.append(st.plug(other))
    st.settle()

    r = run_cli("run", "approved", "--trigger", "schedule", config=server.config_path)

    assert r.returncode == 0, r.stdout + r.stderr
    (rec,) = records(server)
    assert rec["trigger"] == "schedule" and rec["status"] == "success"
    assert rec["disk"]["label"] == "Kept"
    assert not st.is_mounted(plugs[0].device)
    assert not st.is_mounted(plugs[1].device)


def test_run_with_a_device_that_is_not_connected_fails_clearly(
    real_stack: st.Stack, server: Server
) -> None:
    r = run_cli("run", "UUID=0000-0000", config=server.config_path)
    assert r.returncode == 1
    assert "backup FAILED" in r.stdout and "  disk:     UUID=0000-0000" in r.stdout
    assert (r.stdout + r.stderr).count("no disk UUID=0000-0000 is connected") == 1
    (rec,) = records(server)  # recorded, so the history shows the attempt
    assert rec["status"] == "failed" and rec["target"] == "UUID=0000-0000"


def test_an_approved_disk_that_cannot_be_mounted_is_recorded_failed_with_the_reason(
    start_daemon, server: Server, plugs: list[st.Plug], tmp_path: Path
) -> None:
    image = st.make_image(tmp_path / "disk.img", "Broken")
    approve_in_config(server, uuid_of(image))
    with open(image.path, "r+b") as f:  # damage both boot checksums: blkid still says
        for sector in (11, 23):  # exFAT, a mount refuses it
            f.seek(sector * 512)
            f.write(b"\xff\xff\xff\xff")
    daemon = start_daemon()

    plugs.append(st.plug(image))
    (rec,) = wait_records(server, 1)

    assert rec["status"] == "failed"
    assert "could not be used" in rec["problems"][0]
    assert "Mount" in rec["problems"][0]
    assert daemon.proc.poll() is None


def test_losing_the_system_bus_makes_the_daemon_exit_with_failure_for_a_restart(
    real_stack: st.Stack, server: Server, tmp_path: Path
) -> None:
    address = f"unix:path={tmp_path}/bus"
    bus = subprocess.Popen(["dbus-daemon", f"--config-file={st.DBUS_SYSTEM_CONF}",
                            "--nofork", "--nopidfile", f"--address={address}"])
    st.wait_for((tmp_path / "bus").exists, "the bus", 15)
    notify = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    sock.settimeout(30)
    env = {**real_stack.env, "DBUS_SYSTEM_BUS_ADDRESS": address, "NOTIFY_SOCKET": str(notify)}
    proc = subprocess.Popen([sys.executable, "-m", "immich_usb_backup", "-c",
                             str(server.config_path), "daemon"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert b"READY=1" in sock.recv(4096)
        bus.terminate()
        bus.wait(timeout=10)
        out, _ = proc.communicate(timeout=30)
    finally:
        sock.close()
        if proc.poll() is None:
            proc.kill()
        if bus.poll() is None:
            bus.kill()
    note_loop_blocks("daemon", out)
    assert proc.returncode == 1
    assert "lost the connection to the system bus" in out


# udisks.mounted(): the one way to mount, use and unmount ------------------------------

def test_mounted_reports_a_busy_disk_as_busy_and_leaves_it_mounted(
    real_stack: st.Stack, plugs: list[st.Plug], tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from immich_usb_backup.udisks import UDisks, mounted

    plugs.append(st.plug(st.make_image(tmp_path / "disk.img", "Busy")))
    st.settle()

    async def use_while_a_file_is_open() -> tuple[str, Path]:
        udisks = await UDisks.connect()
        try:
            info = await udisks.wait_for_filesystem(plugs[0].device)
            async with mounted(udisks, info) as mount:
                assert mount.ours
                holder = open(mount.mount_point / "immich-server-backups" / "x", "wb")  # noqa: SIM115, ASYNC230
            state = mount.state
            holder.close()
            await mount.udisks.unmount(info.object_path)  # what a person does later
            return state, mount.mount_point
        finally:
            udisks.close()

    with caplog.at_level("WARNING", logger="immich_usb_backup.udisks"):
        state, _where = asyncio.run(use_while_a_file_is_open())

    assert state == "busy"
    assert any(f"could not unmount {plugs[0].device}" in r.getMessage()
               for r in caplog.records), caplog.text
    assert not st.is_mounted(plugs[0].device)


def test_mounted_finishes_the_unmount_when_cancelled_during_it(
    real_stack: st.Stack, plugs: list[st.Plug], tmp_path: Path,
) -> None:
    from immich_usb_backup.udisks import UDisks, mounted

    plugs.append(st.plug(st.make_image(tmp_path / "disk.img", "Stop")))
    st.settle()
    mounted_at: list[Path] = []

    async def main() -> None:
        udisks = await UDisks.connect()
        in_use = asyncio.Event()
        try:
            info = await udisks.wait_for_filesystem(plugs[0].device)

            async def use() -> None:
                async with mounted(udisks, info) as mount:
                    mounted_at.append(mount.mount_point)
                    in_use.set()
                    await asyncio.sleep(3600)

            task = asyncio.create_task(use())
            await in_use.wait()
            task.cancel()  # the first: leaves the block, starts the sync and unmount
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            task.cancel()  # a second one, during the sync or the unmount
            with contextlib.suppress(asyncio.CancelledError):
                await task
            # the shielded unmount goes on by itself
            for _ in range(300):
                if not st.is_mounted(plugs[0].device):
                    break
                await asyncio.sleep(0.1)
        finally:
            udisks.close()

    asyncio.run(main())
    assert mounted_at, "never mounted"
    assert not st.is_mounted(plugs[0].device)


# A disk in the drawer: the daemon's reminder -------------------------------------------

def test_the_daemon_reminds_once_a_day_and_a_successful_plug_clears_it(
    start_daemon, server: Server, plugs: list[st.Plug], tmp_path: Path
) -> None:
    from immich_usb_backup import clock, overview
    from test_notify import Hook
    from test_reminders import run_record, write_state

    hook = Hook()
    try:
        run_id = "5e1f" * 8  # the disk holds the last run's id: it is this server's disk
        image = st.make_image(tmp_path / "disk.img", "Drawer", files={
            "immich-server-backups/backup-info.toml":
                f'[backup]\nrun_id = "{run_id}"\n'.encode()})
        uuid = uuid_of(image)
        last = run_record(uuid, "Drawer", 0, run_id=run_id)  # 9 days and an hour ago
        last["started_at"] = last["finished_at"] = (
            clock.now() - timedelta(days=9, hours=1)).isoformat(timespec="seconds")
        write_state(server.state, [last], [])
        approve_in_config(server, uuid, extra=f'\n[notify]\nurls = ["{hook.url()}"]\n')

        t0 = time.monotonic()
        daemon = start_daemon()
        (msg,) = hook.wait_for(1, timeout=5)
        assert time.monotonic() - t0 < 5
        assert msg["title"] == "Immich backup: no backup for 9 days"
        assert "plug in Drawer (last backed up 9 days ago)" in msg["message"]
        daemon.stop()
        start_daemon()  # the same day: none
        time.sleep(2)
        assert len(hook.received) == 1

        plugs.append(st.plug(image))  # a successful backup
        wait_records(server, 2)
        assert records(server)[-1]["status"] == "success"
        overview.mark_sent(server.state, clock.now() - timedelta(days=1))
        start_daemon()  # a new day, but the disk was just backed up
        time.sleep(2)
        titles = [m["title"] for m in hook.received]
        assert titles.count("Immich backup: no backup for 9 days") == 1, titles
    finally:
        hook.close()


def test_a_timers_run_refuses_a_disk_with_an_approved_uuid_and_no_key(
    real_stack: st.Stack, server: Server, plugs: list[st.Plug], tmp_path: Path
) -> None:
    from immich_usb_backup import approvals

    image = st.make_image(tmp_path / "disk.img", "Backup")
    uuid = uuid_of(image)
    approve_in_config(server, uuid)
    approvals.set_key(server.state, uuid, "a" * 64, "2026-11-30T10:00:00+00:00")
    digest = image.digest()
    plugs.append(st.plug(image))
    st.settle()

    r = run_cli("run", "approved", "--trigger", "schedule", config=server.config_path)

    assert r.returncode == 1, r.stdout + r.stderr
    (rec,) = records(server)
    assert rec["status"] == "refused" and rec["trigger"] == "schedule"
    assert "its key is missing" in rec["problems"][0]
    st.wait_for(lambda: not st.is_mounted(plugs[0].device), "the unmount", 30)
    plugs.pop().pull()
    assert image.digest() == digest
