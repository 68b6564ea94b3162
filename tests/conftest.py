"""Shared fixtures: a real exFAT file system on a loop device, a sample Immich library.

The exFAT fixtures need root, a loop device and an exFAT driver (the kernel's, or
exfat-fuse). Under CI (``CI=true``) a missing piece fails the test loudly; on a
developer's machine it skips, saying why.

Two watches: the session fails if it leaves behind a loop device, a mount or a process
(``leak_check``), and a test with ``no_blocked_loop`` fails if an asyncio event loop,
in the test or in the product it runs, was blocked for 100 ms or more.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import pytest

import helpers
import stack as st
from helpers import (
    SAMPLE_ASSETS,
    ExfatDisk,
    LoopWatch,
    MachineState,
    Server,
    _kernel_has_exfat,
    mount_exfat,
    need,
    tz_for,
    unmount,
    write_dump,
)

# The local time the suite runs at ---------------------------------------------------------
# No test may depend on the hour or the time zone it runs in: `--local-time 00:30` (or
# 23:59) sets TZ, for this process and every command the tests start, to a zone in which
# the local time is that now (to the nearest quarter hour: real zones, and exFAT, know no
# finer offset). .ci/run runs the suite so, at 00:30 and at 23:55.

def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--local-time", metavar="HH:MM",
                     help="run in a time zone where the local time is HH:MM now")

@pytest.fixture(autouse=True)
def _damage_is_told() -> Iterator[None]:
    """A damaged state file found in this process must be told (``state.take_damages``
    at a boundary); one left untold fails the test, and is not left for the next."""
    from immich_usb_backup import state

    state.take_damages()
    yield
    untold = state.take_damages()
    if untold:
        pytest.fail(f"a damaged state file was found and never told: {untold}")

def pytest_configure(config: pytest.Config) -> None:
    local = config.getoption("--local-time")
    if local:
        from datetime import UTC

        os.environ["TZ"] = tz_for(local, datetime.now(UTC))
        time.tzset()
        print(f"local time {datetime.now().astimezone():%Y-%m-%d %H:%M %z} "
              f"(TZ={os.environ['TZ']})", file=sys.stderr)

@pytest.fixture
def make_exfat(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., ExfatDisk]]:
    """Factory: ``make_exfat(size_mb=256, label="Backup", marker=True)`` -> mounted disk."""
    need(os.geteuid() == 0, "needs root for loop devices and mounts")
    need(Path("/dev/loop-control").exists(), "needs /dev/loop-control")
    need(shutil.which("mkfs.exfat") is not None, "needs mkfs.exfat (exfatprogs)")
    need(_kernel_has_exfat() or shutil.which("mount.exfat-fuse") is not None,
         "needs the exfat kernel driver or exfat-fuse")
    made: list[ExfatDisk] = []

    def make(size_mb: int = 256, label: str = "Backup", marker: bool = True) -> ExfatDisk:
        base = tmp_path_factory.mktemp("exfat")
        image = base / "disk.img"
        with open(image, "wb") as f:
            f.truncate(size_mb * 1024 * 1024)
        subprocess.run(["mkfs.exfat", "-L", label, str(image)], check=True,
                       capture_output=True)
        device = subprocess.run(["losetup", "-f", "--show", str(image)], check=True,
                                capture_output=True, text=True).stdout.strip()
        mount_point = base / "mnt"
        mount_point.mkdir()
        disk = ExfatDisk(image, device, mount_point, label)
        made.append(disk)
        mount_exfat(device, mount_point)
        if marker:
            disk.marker.mkdir()
        return disk

    yield make
    problems = []
    for disk in made:
        try:
            try:
                unmount(disk.mount_point)
            finally:
                st.detach(disk.device, disk.image, partitioned=False)
        except Exception as exc:  # every disk is cleaned up; the first problem is told
            problems.append(exc)
    if problems:
        raise problems[0]

@pytest.fixture
def server(tmp_path: Path) -> Server:
    """An Immich upload location with real sample photos, a fresh dump and config files."""
    root = tmp_path / "server"
    upload = root / "immich"
    for folder in ("upload", "library", "profile", "thumbs", "encoded-video", "backups"):
        (upload / folder).mkdir(parents=True)
        (upload / folder / ".immich").write_bytes(b"")
    photos = upload / "upload" / "9f1d6c1a-user" / "ab" / "cd"
    photos.mkdir(parents=True)
    nature = SAMPLE_ASSETS / "albums" / "nature"
    if nature.is_dir():
        for jpg in sorted(nature.glob("*.jpg")):
            shutil.copy2(jpg, photos / jpg.name)
    else:  # a plain clone without ../shared: still real bytes, just not photos
        for i in range(9):
            (photos / f"IMG_{i:04d}.jpg").write_bytes(os.urandom(50_000 + i))
    (upload / "profile" / "9f1d6c1a-user.jpg").write_bytes(os.urandom(2000))
    (upload / "thumbs" / "t1.webp").write_bytes(os.urandom(3000))
    write_dump(upload / "backups", datetime.now())
    etc = root / "etc" / "immich"
    etc.mkdir(parents=True)
    (etc / "immich-config.json").write_text('{"backup": {"database": {"enabled": true}}}\n')
    (etc / "docker-compose.yml").write_text("services: {}\n")
    state = root / "state"
    srv = Server(root, upload, etc, state, root / "config.toml")
    srv.write_config()
    return srv

@pytest.fixture
def no_blocked_loop(monkeypatch: pytest.MonkeyPatch) -> Iterator[LoopWatch]:
    """Fail the test if an asyncio event loop was blocked for 100 ms or more, in this
    process or in the product it runs (``run_cli``, a daemon, anything started with this
    process's environment: PYTHONASYNCIODEBUG=1 is set for the test, and what the
    subprocess wrote is given to ``note_loop_blocks``)."""
    monkeypatch.setenv("PYTHONASYNCIODEBUG", "1")
    watch = LoopWatch()
    helpers._watch = watch  # one test at a time
    try:
        with watch.in_process():
            yield watch
    finally:
        helpers._watch = None
    if watch.blocks:
        pytest.fail("the event loop was blocked for 100 ms or more (asyncio debug mode):\n  "
                    + "\n  ".join(watch.blocks), pytrace=False)

@pytest.fixture(scope="session", autouse=True)
def leak_check(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Fail the run if it leaves a loop device of a test image attached, a mount of the
    tests in place or a process of the tests running (compared with the session's start):
    an image left attached is a disk that the next run's daemon, or another UDisks2,
    finds and mounts."""
    basetemp = tmp_path_factory.getbasetemp()
    start = MachineState.now(basetemp)
    yield
    left: list[str] = []
    for _ in range(50):  # a helper may take a moment to go after its unmount
        left = MachineState.now(basetemp).left_since(start)
        if not left:
            return
        time.sleep(0.1)
    pytest.fail("the test session left behind (found at its end, in the teardown of its "
                "last test, which need not be the one to blame; each must be cleaned up by "
                "the test or fixture that made it):\n  " + "\n  ".join(left), pytrace=False)

@pytest.fixture(scope="module")
def real_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[st.Stack]:
    """A system D-Bus, udevd and UDisks2 (tests/stack.py): used as they are when the
    machine runs them, else started, for the tests of one module. Only the images under
    this session's tmp dir look like USB disks, not a person's own disks nor images an
    earlier run may have left attached. ``DBUS_SYSTEM_BUS_ADDRESS`` points at its bus."""
    missing = st.missing_pieces()
    need(not missing, f"the real stack needs: {', '.join(missing)}")
    s = st.Stack(tmp_path_factory.mktemp("stack"), tmp_path_factory.getbasetemp())
    try:
        s.start()
        os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = s.bus_address
        yield s
    finally:
        os.environ.pop("DBUS_SYSTEM_BUS_ADDRESS", None)
        s.stop()
