"""Helpers the tests share: the real exFAT disk, the sample Immich server, the command
line, the watch for a blocked event loop, what the session leaves behind.

Imported by the tests and by conftest.py (which holds the fixtures and the hooks only).
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest

import stack as st

REPO = Path(__file__).resolve().parents[1]

def tz_for(local: str, now_utc: datetime) -> str:
    """A POSIX TZ value whose local time at ``now_utc`` is ``local`` (HH:MM), to the
    nearest quarter hour: every real zone is a whole number of quarter hours from UTC, and
    exFAT stores a time's zone in quarter hours, so a zone between them (UTC-3:46) makes
    exfat-fuse write every time a minute off (0:01 in 3:46 - 3:45) after a remount."""
    hours, minutes = (int(x) for x in local.split(":"))
    offset = (hours * 60 + minutes - now_utc.hour * 60 - now_utc.minute) % 1440
    offset = round(offset / 15) * 15 % 1440
    if offset > 720:
        offset -= 1440
    sign = "-" if offset >= 0 else "+"  # POSIX counts west of Greenwich as positive
    return f"IUB{sign}{abs(offset) // 60:02d}:{abs(offset) % 60:02d}"


SAMPLE_ASSETS = REPO.parent / "shared" / "sample-assets"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

def need(condition: bool, why: str) -> None:
    """Fail under CI, skip elsewhere, when the real stack is not available."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"real stack not available in CI: {why}")
    pytest.skip(why)

def _kernel_has_exfat() -> bool:
    try:
        return "exfat" in Path("/proc/filesystems").read_text().split()
    except OSError:
        return False

def mount_exfat(device: str, mount_point: Path) -> None:
    """Mount like a user's system would: the kernel driver, else exfat-fuse."""
    if _kernel_has_exfat():
        subprocess.run(["mount", "-t", "exfat", device, str(mount_point)], check=True)
    else:
        subprocess.run(["mount.exfat-fuse", device, str(mount_point)], check=True,
                       capture_output=True)

def _mounted_at(mount_point: Path) -> bool:
    return any(m.target == str(mount_point) for m in _mounts())

def _fuse_helper_of(mount_point: Path) -> bool:
    """Is the exfat-fuse process that serves ``mount_point`` still alive?"""
    return any(comm.startswith("mount.exfat") and str(mount_point) in argv
               for _, comm, argv in st._live_processes())

def unmount(mount_point: Path) -> None:
    for _ in range(50):
        r = subprocess.run(["umount", str(mount_point)], capture_output=True)
        if r.returncode == 0:
            break
        time.sleep(0.1)
    else:
        subprocess.run(["umount", "--lazy", str(mount_point)], capture_output=True)
    # exfat-fuse finishes writing after umount returns: wait for it before detaching
    st.wait_for(lambda: not _mounted_at(mount_point), f"{mount_point} to be unmounted", 30)
    st.wait_for(lambda: not _fuse_helper_of(mount_point),
                f"exfat-fuse of {mount_point} to exit", 30)

@dataclass
class ExfatDisk:
    image: Path
    device: str
    mount_point: Path
    label: str

    @property
    def marker(self) -> Path:
        return self.mount_point / "immich-server-backups"

    def remount(self) -> None:
        unmount(self.mount_point)
        mount_exfat(self.device, self.mount_point)

def dump_name(when: datetime) -> str:
    return f"immich-db-backup-{when:%Y%m%dT%H%M%S}-v1.130.0-pg14.17.sql.gz"

# An Immich database dump as small as one can be: its asset table, empty (a backup's asset
# check reads it), and PostgreSQL's completeness line. tests/immich_db.py makes real ones.
EMPTY_IMMICH_DUMP = (
    b"--\n-- PostgreSQL database dump\n--\n\n"
    b'COPY public.asset (id, "ownerId", "originalPath", checksum, "deletedAt", '
    b'"isExternal", "isOffline") FROM stdin;\n\\.\n\n'
    b"--\n-- PostgreSQL database dump complete\n--\n")

def write_dump(folder: Path, when: datetime, body: bytes = EMPTY_IMMICH_DUMP) -> Path:
    path = folder / dump_name(when)
    with gzip.open(path, "wb") as f:
        f.write(body)
    return path

@dataclass
class Server:
    """A sample Immich server: upload location, dumps, config files, state dir."""

    root: Path
    upload: Path
    etc: Path
    state: Path
    config_path: Path

    def write_config(self, extra: str = "") -> Path:
        self.config_path.write_text(
            f'[immich]\nupload_location = "{self.upload}"\n\n'
            f'[config_backup]\npaths = ["{self.etc}"]\n\n'
            f'[state]\ndir = "{self.state}"\n\n{extra}'
        )
        return self.config_path

def run_cli(
    *args: str, config: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run the real command line in a subprocess (under ``no_blocked_loop``: in asyncio's
    debug mode, its stderr checked for a blocked event loop)."""
    argv = [sys.executable, "-m", "immich_usb_backup"]
    if config is not None:
        argv += ["-c", str(config)]
    r = subprocess.run([*argv, *args], capture_output=True, text=True, timeout=timeout)
    note_loop_blocks(f"immich-usb-backup {' '.join(args)}", r.stderr)
    return r

def tree(root: Path) -> dict[str, bytes]:
    """Every regular file under ``root`` with its content, by relative path."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath, name)
            out[str(p.relative_to(root))] = p.read_bytes()
    return out

# A blocked event loop -----------------------------------------------------------------
# asyncio's debug mode (PYTHONASYNCIODEBUG=1) times every callback of the loop and logs
# "Executing <handle> took 0.312 seconds" on the asyncio logger (WARNING) for any that
# ran for slow_callback_duration (0.1 s) or more: a coroutine step that did blocking work.

SLOW_CALLBACK = re.compile(r"Executing (<.*>) took (\d+\.\d+) seconds")

SLOW_CALLBACK = re.compile(r"Executing (<.*>) took (\d+\.\d+) seconds")
_TASK_CORO = re.compile(r"coro=<(\S+?\(\))(?: running at| done, defined at) (\S+?:\d+)>")

_TASK_CORO = re.compile(r"coro=<(\S+?\(\))(?: running at| done, defined at) (\S+?:\d+)>")
_HANDLE_CALLBACK = re.compile(r"^<(?:Timer)?Handle (?:when=\S+ )?(.+?\))")

def blocked_callback(line: str) -> str | None:
    """``"<callback> took N s"`` for asyncio's slow-callback line, else None: a task by
    its coroutine and where it was (or, done, where it is defined), another callback by
    its function."""
    m = SLOW_CALLBACK.search(line)
    if m is None:
        return None
    handle, seconds = m.groups()
    if task := _TASK_CORO.search(handle):
        return f"{task.group(1)} at {task.group(2)} took {seconds} s"
    callback = _HANDLE_CALLBACK.search(handle)
    return f"{callback.group(1) if callback else handle} took {seconds} s"

@dataclass
class LoopWatch:
    """The event-loop blocks seen during one test, each as "<where>: <callback> took N s".

    In this process a handler on the ``asyncio`` logger sees them; for the product run as
    a subprocess, its stderr or log is scanned with ``scan``."""

    blocks: list[str] = field(default_factory=list)

    def scan(self, source: str, text: str) -> list[str]:
        """Record (and return) the slow-callback lines of ``text``, output of ``source``."""
        found = [f"{source}: {name}" for line in text.splitlines()
                 if (name := blocked_callback(line))]
        self.blocks += found
        return found

    @contextlib.contextmanager
    def in_process(self) -> Iterator[None]:
        """Record the blocks of event loops run in this process during the block (their
        debug mode must be on: PYTHONASYNCIODEBUG=1 before the loop is made, or
        ``asyncio.run(..., debug=True)``)."""
        watch = self

        class Handler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                name = blocked_callback(record.getMessage())
                if name:
                    watch.blocks.append(f"in this process: {name}")

        logger = logging.getLogger("asyncio")
        handler = Handler(logging.WARNING)
        level = logger.level
        if logger.getEffectiveLevel() > logging.WARNING:
            logger.setLevel(logging.WARNING)
        logger.addHandler(handler)
        try:
            yield
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)

_watch: LoopWatch | None = None  # the watch of the running test, if it has one

def note_loop_blocks(source: str, text: str) -> None:
    """Tell the running test's watch what a subprocess of the product wrote."""
    if _watch is not None:
        _watch.scan(source, text)

# What the session leaves behind ---------------------------------------------------------

@dataclass(frozen=True)
class Mount:
    source: str
    target: str

def _unescape(field_: str) -> str:
    """A path as /proc/self/mountinfo writes it (space as \\040, and so on)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_)

def _mounts() -> list[Mount]:
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        out.append(Mount(_unescape(right.split()[1]), _unescape(left.split()[4])))
    return out

def _loop_devices() -> dict[str, str]:
    """{"/dev/loopN": its image} for every bound loop device."""
    out = {}
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        with contextlib.suppress(OSError):
            out[f"/dev/{backing.parent.parent.name}"] = backing.read_text().strip()
    return out

@dataclass(frozen=True)
class Proc:
    pid: int
    line: str  # the command line
    tests: bool  # started by this session: its child, or the session's paths in its

def _test_processes(basetemp: str) -> dict[tuple[int, str], Proc]:
    """{(pid, start time): process} of every live process of a kind the tests start: a
    dbus-daemon, udisksd, udevd (not its workers), exfat-fuse, the product's daemon,
    rsync. Zombies are left out: PID 1 here does not reap orphans."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            argv = stat.with_name("cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        comm = text[text.find("(") + 1 : text.rfind(")")]
        fields = text[text.rfind(")") + 2 :].split()  # fields 3 (state) and on
        if fields[0] == "Z":
            continue
        try:
            parent_comm = Path(f"/proc/{fields[1]}/comm").read_text().strip()
        except OSError:
            parent_comm = ""
        kind = (
            comm in ("dbus-daemon", "udisksd", "rsync")
            or (comm == "systemd-udevd" and parent_comm != "systemd-udevd")
            or comm.startswith(("mount.exfat", "exfat-fuse"))
            or (any(a.endswith(("immich_usb_backup", "immich-usb-backup")) for a in argv)
                and "daemon" in argv)
        )
        if not kind:
            continue
        try:
            environ = stat.with_name("environ").read_bytes().decode(errors="replace")
        except OSError:  # another user's process, when not root
            environ = ""
        line = " ".join(argv).strip()
        tests = int(fields[1]) == os.getpid() or f"{basetemp}/" in f"{line} {environ}"
        out[(int(stat.parent.name), fields[19])] = Proc(int(stat.parent.name), line, tests)
    return out

@dataclass
class MachineState:
    """What the tests may leave behind, as it stands now."""

    basetemp: str
    loops: dict[str, str]
    mounts: list[Mount]
    processes: dict[tuple[int, str], Proc]

    @classmethod
    def now(cls, basetemp: Path) -> MachineState:
        base = str(basetemp.resolve())
        return cls(base, _loop_devices(), _mounts(), _test_processes(base))

    def _under(self, path: str) -> bool:
        return path == self.basetemp or path.startswith(self.basetemp + "/")

    def left_since(self, start: MachineState) -> list[str]:
        """Every loop device of a test image, mount of the tests and test process that is
        here now and was not at ``start``."""
        out = []
        test_loops = {dev for dev, image in self.loops.items()
                      if self._under(image.removesuffix(" (deleted)"))
                      and start.loops.get(dev) != image}
        out += [f"loop device {dev} still attached to {self.loops[dev]}"
                for dev in sorted(test_loops)]
        for m in self.mounts:
            if m in start.mounts:
                continue
            on_test_loop = any(m.source == dev or m.source.startswith(f"{dev}p")
                               for dev in test_loops)
            if self._under(m.target) or on_test_loop:
                out.append(f"mount of {m.source} at {m.target}")
        for key, proc in sorted(self.processes.items()):
            if key in start.processes:
                continue
            args = set(proc.line.split())
            if proc.tests or any(dev in args or f"{dev}p1" in args for dev in test_loops):
                out.append(f"process {proc.pid} still running: {proc.line}")
        return out
