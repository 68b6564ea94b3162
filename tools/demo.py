"""The quick-start demo: the daemon backs up a sample Immich server onto a throwaway disk.

Run it through ``sudo tools/demo`` (which installs what is needed first). It shows the
product's everyday flow, with the real pieces a Debian server runs:

1. builds a small sample Immich upload location (real PNG photos, the ``.immich``
   markers, two database dumps), a sample config folder and the configuration;
2. makes a 512 MB disk image with a partition table and one exFAT partition, like a USB
   stick prepared on another computer: the ``immich-server-backups`` marker folder and
   some of "the user's own" files beside it;
3. brings up what the daemon talks to: a private system D-Bus, udevd (if none runs), a
   demo-only udev rule that makes loop devices look like USB disks, and UDisks2
   (``tests/stack.py``, the same pieces the end-to-end tests use);
4. plugs the disk in (a loop device), lists it with ``disks``, approves it with
   ``approve``, and pulls it out;
5. starts ``immich-usb-backup daemon``, plugs the disk in and follows the backup with
   ``status`` until the history has it, waits until the daemon has unmounted the disk,
   shows the daemon's log and ``history``;
6. changes the library (3 photos added, 1 deleted), plugs the disk in again: the daemon
   backs up again;
7. stops the daemon (SIGTERM, as ``systemctl stop`` does), attaches the disk read-only
   and checks what is on it: the user's files untouched, the library copy equal to the
   server's, the newest database dump, the config archive; ``verify`` and
   ``sha256sum -c`` against the manifest; the deleted photo kept in ``deleted/``;
8. stops and removes everything it started or made, also on Ctrl-C.

Exit code 0 when both backups succeeded and every check passed, 1 otherwise.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import io
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import IO, Any

from immich_usb_backup import history
from immich_usb_backup.text import plural

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
import stack as st  # noqa: E402 - tests/stack.py: the real stack the end-to-end tests use

CLI = REPO / ".venv" / "bin" / "immich-usb-backup"
MARKER = "immich-server-backups"
LABEL = "DemoBackup"
DISK_MB = 512
IMMICH_VERSION = "v1.130.0-pg14.17"
IMMICH_FOLDERS = ("upload", "library", "profile", "thumbs", "encoded-video", "backups")

USER_NOTES = "My Notes.txt"
USER_FOLDER = "Holiday Plans"
USER_FOLDER_FILE = "packing list.txt"
USER_FILES = {  # "the user's own" files beside the marker folder: the backup never touches them
    USER_NOTES: b"Things on this disk that are mine:\n- the holiday plans\n- these notes\n"
                b"The backup must never touch them.\n",
    f"{USER_FOLDER}/{USER_FOLDER_FILE}": b"swimsuit\nsun cream\ncamera\n",
}

BACKUP_TIMEOUT_S = 240  # one small backup at 1 MB/s takes a few seconds
UNMOUNT_TIMEOUT_S = 60

BOLD = "\033[1m" if sys.stdout.isatty() else ""
GREEN = "\033[32m" if sys.stdout.isatty() else ""
RED = "\033[31m" if sys.stdout.isatty() else ""
RESET = "\033[0m" if sys.stdout.isatty() else ""


_running: list[subprocess.Popen[bytes]] = []  # the CLI process while one runs


class DemoFailed(Exception):
    """A step of the demo could not be done (not a backup failure: those are checks)."""


# output ------------------------------------------------------------------------------

def heading(text: str) -> None:
    print(f"\n{BOLD}== {text} =={RESET}\n")


def say(text: str = "") -> None:
    print(text)


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"  # pragma: no cover - the loop returns


@dataclass
class Checks:
    """The demo's verdicts: each printed as it is made, all summed up at the end."""

    failed: list[str] = field(default_factory=list)
    passed: int = 0

    def check(self, ok: bool, what: str, detail: str = "") -> bool:
        if ok:
            self.passed += 1
            say(f"  {GREEN}OK{RESET}    {what}")
        else:
            self.failed.append(what)
            say(f"  {RED}FAIL{RESET}  {what}")
            if detail:
                for line in detail.splitlines():
                    say(f"          {line}")
        return ok


# sample photos -----------------------------------------------------------------------

def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def make_png(rng: random.Random, width: int, height: int, grain: int) -> bytes:
    """A valid RGB PNG: a colour gradient with film grain (``grain`` 0..255 sets how
    noisy, so how large, the file is)."""
    r0, g0, b0 = rng.randrange(256), rng.randrange(256), rng.randrange(256)
    base = bytearray()
    for x in range(width):
        base += bytes(((r0 + x) % 256, (g0 + 2 * x) % 256, (b0 + 255 - x) % 256))
    rows = []
    for y in range(height):
        noise = rng.randbytes(width * 3)
        shift = y % 256
        row = bytes(((b + shift + (n % (grain + 1))) & 0xFF) for b, n in zip(base, noise,
                                                                             strict=True))
        rows.append(b"\x00" + row)  # filter type 0 (none) for each scanline
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    text = b"Description\x00immich-usb-backup demo photo"
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"tEXt", text)
        + _png_chunk(b"IDAT", zlib.compress(b"".join(rows), 9))
        + _png_chunk(b"IEND", b"")
    )


@dataclass
class SampleServer:
    root: Path
    upload: Path
    etc: Path
    state: Path
    user: str
    rng: random.Random
    photos: list[Path] = field(default_factory=list)

    def add_photo(self, width: int, height: int, grain: int, when: datetime) -> Path:
        """One upload the way Immich stores it: upload/<user>/<aa>/<bb>/<asset-uuid>.png."""
        asset = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        folder = self.upload / "upload" / self.user / asset[:2] / asset[2:4]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{asset}.png"
        path.write_bytes(make_png(self.rng, width, height, grain))
        stamp = when.timestamp()
        os.utime(path, (stamp, stamp))
        self.photos.append(path)
        return path


def dump_name(when: datetime) -> str:
    return f"immich-db-backup-{when:%Y%m%dT%H%M%S}-{IMMICH_VERSION}.sql.gz"


def write_dump(folder: Path, when: datetime, photos: list[Path], upload: Path) -> Path:
    """A dump of Immich's database as pg_dump writes it, with what a backup checks in it:
    the asset table, a row for each photo (its path inside Immich's container, /data,
    and the SHA-1 Immich recorded at upload)."""
    path = folder / dump_name(when)
    rows = "".join(
        f"{uuid.UUID(hashlib.sha256(str(p).encode()).hexdigest()[:32])}\t"
        f"/data/{p.relative_to(upload)}\t\\\\x{hashlib.sha1(p.read_bytes()).hexdigest()}\t"  # noqa: S324
        "\\N\tf\n" for p in photos)
    sql = (
        "--\n-- PostgreSQL database dump (immich-usb-backup demo sample)\n--\n"
        "SET statement_timeout = 0;\nSET client_encoding = 'UTF8';\n"
        "CREATE TABLE public.asset (id uuid PRIMARY KEY, \"originalPath\" text, checksum "
        "bytea, \"deletedAt\" timestamptz, \"isOffline\" boolean);\n"
        'COPY public.asset (id, "originalPath", checksum, "deletedAt", "isOffline") FROM '
        f"stdin;\n{rows}\\.\n\n"
        f"-- dumped at {when.isoformat(timespec='seconds')}\n"
        "--\n-- PostgreSQL database dump complete\n--\n"
    )
    with gzip.open(path, "wb") as f:
        f.write(sql.encode())
    stamp = when.timestamp()
    os.utime(path, (stamp, stamp))
    return path


def build_server(root: Path) -> SampleServer:
    rng = random.Random(20240714)  # noqa: S311 - sample pixels, not secrets
    upload = root / "immich"
    user = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    srv = SampleServer(root, upload, root / "immich-config", root / "state", user, rng)
    for name in IMMICH_FOLDERS:
        (upload / name).mkdir(parents=True)
        (upload / name / ".immich").write_bytes(b"")

    now = datetime.now().astimezone()
    for i in range(38):  # small photos, taken over the last year
        side = 40 + (i * 7) % 60
        srv.add_photo(side + 8, side, 24 + i % 40, now - timedelta(days=9 * i, hours=i))
    for i in range(2):  # two larger ones, about 1 MB each
        srv.add_photo(600, 560, 255, now - timedelta(days=3 + i))

    profile = upload / "profile" / user
    profile.mkdir()
    (profile / f"{uuid.UUID(int=rng.getrandbits(128), version=4)}.png").write_bytes(
        make_png(rng, 64, 64, 16)
    )
    write_dump(upload / "backups", now - timedelta(days=1), srv.photos, upload)
    write_dump(upload / "backups", now - timedelta(minutes=5), srv.photos, upload)

    srv.etc.mkdir()
    (srv.etc / "immich-config.json").write_text(
        '{\n  "backup": {"database": {"enabled": true, "cronExpression": "0 02 * * *",'
        ' "keepLastAmount": 14}},\n  "storageTemplate": {"enabled": false}\n}\n'
    )
    (srv.etc / "docker-compose.yml").write_text(
        "name: immich\nservices:\n  immich-server:\n"
        "    image: ghcr.io/immich-app/immich-server:${IMMICH_VERSION:-release}\n"
        "    volumes:\n      - ${UPLOAD_LOCATION}:/data\n    env_file: [.env]\n"
    )
    (srv.etc / ".env").write_text(
        f"UPLOAD_LOCATION={upload}\nDB_DATA_LOCATION=./postgres\nIMMICH_VERSION=v1.130.0\n"
        "DB_PASSWORD=postgres\n"
    )
    return srv


# system commands ---------------------------------------------------------------------

def run_quiet(argv: list[str]) -> str:
    """Run a system command; raise DemoFailed with its message if it fails."""
    r = subprocess.run(argv, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        msg = (r.stderr or r.stdout).strip()
        raise DemoFailed(f"`{' '.join(argv)}` failed ({r.returncode}): {msg}")
    return r.stdout.strip()


def kernel_has_exfat() -> bool:
    try:
        return "exfat" in Path("/proc/filesystems").read_text().split()
    except OSError:
        return False


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    """Poll ``predicate`` until it holds (True) or ``timeout`` seconds pass (False)."""
    end = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(interval)


def _mount_table() -> list[list[str]]:
    with contextlib.suppress(OSError):
        return [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    return []


def is_mounted(mount_point: Path) -> bool:
    want = str(mount_point).replace(" ", "\\040")
    return any(len(f) > 1 and f[1] == want for f in _mount_table())


def mounts_of(device: str) -> list[str]:
    """Where ``device`` is mounted now."""
    names = (device, os.path.realpath(device))
    return [f[1].replace("\\040", " ") for f in _mount_table() if len(f) > 1 and f[0] in names]


def fuse_helper_running(device: str) -> bool:
    """Is an exfat-fuse process of ``device`` still alive (it finishes writing after
    umount returns; a zombie left to a PID 1 that does not reap does not count)?"""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        if (argv and b"mount.exfat" in argv[0] and device.encode() in argv
                and stat[stat.rfind(")") + 2:][:1] != "Z"):
            return True
    return False


def _no_fuse_helper(device: str) -> bool:
    return not fuse_helper_running(device)


def unmount_point(mount_point: Path) -> bool:
    """Unmount and wait until the mount is really gone. True when it is gone."""
    if not is_mounted(mount_point):
        return True
    for attempt in range(60):
        r = subprocess.run(["umount", str(mount_point)], capture_output=True, check=False)
        if r.returncode == 0 or not is_mounted(mount_point):
            break
        if attempt == 59:  # still busy after 6 s: detach it lazily
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True,
                           check=False)
        time.sleep(0.1)
    return wait_until(lambda: not is_mounted(mount_point), 10, 0.05)


def loops_of(image: Path) -> list[str]:
    """The loop devices ``image`` is attached to now."""
    r = subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True,
                       check=False)
    return [line.split(":", 1)[0] for line in r.stdout.splitlines()
            if line.startswith("/dev/loop")]


def detach_loop(loop: str) -> None:
    """Detach a loop device and its partition, unmounting what is still mounted."""
    for dev in (f"{loop}p1", loop):
        for mp in mounts_of(dev):
            unmount_point(Path(mp))
        wait_until(functools.partial(_no_fuse_helper, dev), 30)
    subprocess.run(["partx", "-d", loop], capture_output=True, check=False)
    for _ in range(20):
        if subprocess.run(["losetup", "-d", loop], capture_output=True,
                          check=False).returncode == 0:
            break
        time.sleep(0.25)
    st.settle()


@contextlib.contextmanager
def sheltered_from_ctrl_c() -> Iterator[None]:
    """Processes started in here never get the terminal's Ctrl-C: SIGINT stays blocked
    for them (the signal mask is inherited). The demo stops them itself when it cleans
    up, in order: the daemon first (it unmounts through UDisks2), UDisks2 and D-Bus last.
    """
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# files -------------------------------------------------------------------------------

def files_under(root: Path) -> dict[str, Path]:
    """Every regular file under ``root``, by path relative to it."""
    out: dict[str, Path] = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            p = Path(dirpath, name)
            if p.is_file() and not p.is_symlink():
                out[str(p.relative_to(root))] = p
    return out


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def summary_line(root: Path) -> str:
    files = files_under(root)
    return f"{plural(len(files), 'file')}, {human(sum(p.stat().st_size for p in files.values()))}"


def print_tree(root: Path, max_depth: int = 4, per_folder: int = 6, max_lines: int = 45) -> None:
    """A tree of ``root``: folders with their totals, at most ``per_folder`` entries each."""
    lines: list[str] = [f"{root.name}/  ({summary_line(root)})"]

    def walk(folder: Path, prefix: str, depth: int) -> None:
        entries = sorted(folder.iterdir(), key=lambda p: (not p.is_dir(), p.name))
        shown = entries[:per_folder]
        for i, entry in enumerate(shown):
            last = i == len(shown) - 1 and len(entries) == len(shown)
            branch = "`-- " if last else "|-- "
            if entry.is_dir():
                lines.append(f"{prefix}{branch}{entry.name}/  ({summary_line(entry)})")
                if depth < max_depth:
                    walk(entry, prefix + ("    " if last else "|   "), depth + 1)
            else:
                lines.append(f"{prefix}{branch}{entry.name}  ({human(entry.stat().st_size)})")
        if len(entries) > len(shown):
            lines.append(f"{prefix}`-- ... and {len(entries) - len(shown)} more")

    walk(root, "", 1)
    for line in lines[:max_lines]:
        say(f"  {line}")
    if len(lines) > max_lines:
        say(f"  ... ({len(lines) - max_lines} more lines)")


def list_root(mount_point: Path) -> None:
    for entry in sorted(mount_point.iterdir(), key=lambda p: p.name.lower()):
        if entry.name == MARKER:
            say(f"  {entry.name}/   <- the backup folder: the only place the backup writes")
        elif entry.is_dir():
            say(f"  {entry.name}/   ({summary_line(entry)}, the user's own)")
        else:
            say(f"  {entry.name}   ({human(entry.stat().st_size)}, the user's own)")


# the disk ----------------------------------------------------------------------------

@dataclass
class LookDisk:
    """The backup disk attached read-only, to look at what the daemon wrote on it."""

    image: Path
    mount_point: Path
    loop: str | None = None
    device: str | None = None

    def open(self) -> None:
        self.loop = run_quiet(["losetup", "-f", "--show", "-r", str(self.image)])
        run_quiet(["partx", "-a", self.loop])
        st.settle()
        device = self.device = f"{self.loop}p1"
        if not wait_until(lambda: Path(device).exists(), 10):
            raise DemoFailed(f"{device} did not appear")
        self.mount_point.mkdir(exist_ok=True)
        if kernel_has_exfat():
            run_quiet(["mount", "-t", "exfat", "-o", "ro", device, str(self.mount_point)])
        else:
            run_quiet(["mount.exfat-fuse", "-o", "ro", device, str(self.mount_point)])

    def close(self) -> bool:
        """Unmount and detach. True when the mount is gone."""
        if self.loop is None:
            return True
        gone = unmount_point(self.mount_point)
        if gone:
            detach_loop(self.loop)
            self.loop = self.device = None
        return gone


def disk_uuid(device: str) -> str:
    return run_quiet(["blkid", "-p", "-o", "value", "-s", "UUID", device])


def udisks_knows(device: str) -> bool:
    """Has UDisks2 published ``device`` with its file system (it follows udev, a moment
    later)?"""
    path = f"/org/freedesktop/UDisks2/block_devices/{Path(device).name}"
    r = subprocess.run(["busctl", f"--address={os.environ['DBUS_SYSTEM_BUS_ADDRESS']}",
                        "get-property", "org.freedesktop.UDisks2", path,
                        "org.freedesktop.UDisks2.Block", "IdType"],
                       capture_output=True, text=True, check=False)
    return r.returncode == 0 and "exfat" in r.stdout


# the daemon --------------------------------------------------------------------------

LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d (\d\d:\d\d:\d\d),\d+ ([A-Z]+) (\S+): (.*)$")


class Daemon:
    """``immich-usb-backup -v daemon`` in the background, as systemd runs it
    (``Type=notify``: it reports READY=1 on the socket in NOTIFY_SOCKET)."""

    def __init__(self, config: Path, workdir: Path) -> None:
        self.config = config
        self.log_path = workdir / "daemon.log"
        self.notify_path = workdir / "notify.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.messages: list[str] = []
        self.shown = 0  # bytes of the log printed so far
        self._log: IO[bytes] | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "NOTIFY_SOCKET": str(self.notify_path)}
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed by stop()
        with sheltered_from_ctrl_c():
            self._proc = subprocess.Popen(
                [str(CLI), "-c", str(self.config), "-v", "daemon"], env=env,
                stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        assert self._proc is not None, "the daemon was not started"
        return self._proc

    def wait_notify(self, wanted: str, timeout: float = 30) -> None:
        end = time.monotonic() + timeout
        self.notify.settimeout(0.5)
        while wanted not in self.messages:
            if self.proc.poll() is not None:
                raise DemoFailed(f"the daemon exited ({self.proc.returncode}) before {wanted}:"
                                 f"\n{self.tail()}")
            if time.monotonic() > end:
                raise DemoFailed(f"no {wanted} from the daemon within {timeout:g} s:\n"
                                 f"{self.tail()}")
            with contextlib.suppress(TimeoutError):
                self.messages += self.notify.recv(4096).decode().split("\n")

    def text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def text_since(self, offset: int) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def tail(self, n: int = 15) -> str:
        return "\n".join(self.text().splitlines()[-n:])

    def new_lines(self) -> list[str]:
        """The log lines written since the last call, made easy to read: the time of
        day, the level, the message; the debug lines about devices the daemon ignored
        (every other block device of the machine) left out."""
        with open(self.log_path, "rb") as f:
            f.seek(self.shown)
            data = f.read()
        data = data[: data.rfind(b"\n") + 1]  # whole lines only
        self.shown += len(data)
        out = []
        for line in data.decode(errors="replace").splitlines():
            m = LOG_LINE.match(line)
            if m is None:
                if line.strip():
                    out.append(line)  # a traceback's lines
                continue
            clock, level, logger, message = m.groups()
            if message.startswith("ignored /dev/"):
                continue
            if level == "DEBUG" and not logger.startswith("immich_usb_backup"):
                continue
            out.append(f"{clock} {level:<7} {message}")
        return out

    def stop(self, timeout: float = 60) -> int | None:
        """SIGTERM (what ``systemctl stop`` sends); wait; return the exit code (None when
        it was never started)."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.notify.fileno() != -1:
            self.notify.setblocking(False)
            with contextlib.suppress(OSError):
                while data := self.notify.recv(4096):
                    self.messages += data.decode().split("\n")
            self.notify.close()
        return None if self._proc is None else self._proc.returncode


# the command line --------------------------------------------------------------------

def cli(*args: str, config: Path, capture: bool = False) -> tuple[int, str]:
    """Run the real ``immich-usb-backup`` with its output shown; return the exit code
    and (with ``capture``) the output too."""
    argv = [str(CLI), "-c", str(config), *args]
    say(f"$ immich-usb-backup -c {config.name} {' '.join(args)}")
    sys.stdout.flush()
    pipe = subprocess.PIPE if capture else None
    proc = subprocess.Popen(argv, stdout=pipe, stderr=subprocess.STDOUT if capture else None)
    _running.append(proc)
    try:
        out, _ = proc.communicate()
    except KeyboardInterrupt:
        # the CLI got the Ctrl-C too (or the SIGTERM, passed on by _terminate): let it stop
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    finally:
        _running.remove(proc)
    text = (out or b"").decode(errors="replace")
    for line in text.splitlines():
        say(line)
    return proc.returncode, text


def status_line(config: Path) -> str:
    """What ``immich-usb-backup status`` says now (one line)."""
    r = subprocess.run([str(CLI), "-c", str(config), "status"], capture_output=True,
                       text=True, check=False, timeout=60)
    text = (r.stdout or r.stderr).strip()
    return text.splitlines()[-1] if text else f"(status printed nothing; exit {r.returncode})"


def records_of(state: Path, disk_uuid: str) -> list[dict[str, Any]]:
    """The history records of the demo's disk (another USB disk may be plugged in)."""
    return [r for r in history.last_records(state, None)
            if str((r.get("disk") or {}).get("uuid") or "").upper() == disk_uuid.upper()]


def write_config(srv: SampleServer) -> Path:
    path = srv.root / "config.toml"
    path.write_text(
        "# immich-usb-backup configuration for the demo's sample server\n"
        f'[immich]\nupload_location = "{srv.upload}"\n\n'
        "[database]\nkeep = 3\n\n"
        f'[config_backup]\npaths = ["{srv.etc}"]\n\n'
        "[library]\nmax_delete_percent = 20\n"
        "# slowed down to 1 MB/s only so that the demo's progress can be seen\n"
        "bwlimit_kib = 1024\n\n"
        f'[state]\ndir = "{srv.state}"\n'
    )
    return path


# the demo ----------------------------------------------------------------------------

@dataclass
class Session:
    """Everything the demo starts or attaches, for the clean-up."""

    tmp: Path
    image: Path
    stack: st.Stack | None = None
    plugs: list[st.Plug] = field(default_factory=list)
    daemon: Daemon | None = None
    look: LookDisk | None = None

    def plug_in(self) -> st.Plug:
        try:
            plug = st.plug(st.Image(self.image, LABEL, partitioned=True))
        except subprocess.CalledProcessError as exc:
            raise DemoFailed(f"could not attach {self.image}: {exc.stderr or exc}") from exc
        self.plugs.append(plug)
        st.settle()
        return plug

    def pull_out(self, plug: st.Plug) -> None:
        try:
            plug.pull()  # waits until the disk is unmounted
        except RuntimeError as exc:
            raise DemoFailed(f"could not unplug {plug.device}: {exc}") from exc
        self.plugs.remove(plug)


def preflight() -> None:
    problems = []
    if os.geteuid() != 0:
        problems.append("run as root (sudo tools/demo): loop devices, mounts, udev and "
                        "UDisks2 need it")
    problems += [f"`{p}` is missing (tools/setup installs it)"
                 for p in st.missing_pieces() if p != "root"]
    for tool in ("mount", "umount", "blkid", "rsync"):
        if shutil.which(tool) is None:
            problems.append(f"`{tool}` is missing (tools/setup installs it)")
    if not kernel_has_exfat() and shutil.which("mount.exfat-fuse") is None:
        problems.append("no exFAT driver: neither the kernel's nor exfat-fuse")
    if not CLI.exists():
        problems.append(f"{CLI} is missing: run tools/setup")
    if problems:
        raise DemoFailed("this machine cannot run the demo:\n  - " + "\n  - ".join(problems))


def _program(proc: subprocess.Popen[bytes]) -> str:
    args = proc.args
    first = args[0] if isinstance(args, list | tuple) else args
    return Path(str(first)).name


def describe_stack(stack: st.Stack) -> list[str]:
    """One line per piece: what the demo started or added, and what it found running."""
    pids = {_program(p): p.pid for p in stack.procs}
    added = {path for path, _ in stack.undo}
    if "dbus-daemon" in pids:
        lines = [f"started  a private system D-Bus (dbus-daemon, pid {pids['dbus-daemon']}) "
                 f"at {stack.bus_address}"]
    else:
        lines = [f"found    the system D-Bus at {stack.bus_address}: used as it is"]
    if "systemd-udevd" in pids:
        lines.append(f"started  udevd (pid {pids['systemd-udevd']}): none was running")
    else:
        lines.append("found    udevd running: used as it is")
    if st.TEST_RULE in added:
        lines.append(f"added    {st.TEST_RULE}: the demo's loop devices with exFAT look like "
                     "USB disks")
    if st.MOUNT_EXFAT in added:
        lines.append(f"added    {st.MOUNT_EXFAT} -> exfat-fuse: this kernel has no exFAT driver")
    if "udisksd" in pids:
        lines.append(f"started  UDisks2 (udisksd, pid {pids['udisksd']}) on that bus: it mounts "
                     "and unmounts disks for the daemon")
    else:
        lines.append("found    UDisks2 running on that bus: used as it is (it mounts and "
                     "unmounts disks for the daemon)")
    return lines


def show_log(daemon: Daemon) -> None:
    for line in daemon.new_lines():
        say(f"  | {line}")


def backup_on_plug(s: Session, daemon: Daemon, config: Path, state: Path, uuid_: str,
                   checks: Checks, which: str) -> None:
    """Plug the disk in, follow the daemon's backup until it is recorded and the disk is
    unmounted, show the log and the history, pull the disk out."""
    before = len(records_of(state, uuid_))
    mark = daemon.size()
    plug = s.plug_in()
    say(f"plugged the disk in: {plug.device} (udev announces a USB disk with exFAT on it)")
    say()
    say(f"$ immich-usb-backup -c {config.name} status     (every half second until the history "
        "has the run)")
    shown = ""
    end = time.monotonic() + BACKUP_TIMEOUT_S
    while len(records := records_of(state, uuid_)) <= before:
        if daemon.proc.poll() is not None:
            raise DemoFailed(f"the daemon exited ({daemon.proc.returncode}):\n{daemon.tail()}")
        if time.monotonic() > end:
            raise DemoFailed(f"no backup recorded {BACKUP_TIMEOUT_S} s after the plug; the "
                             f"daemon's log ends:\n{daemon.tail()}")
        line = status_line(config)
        if line != shown:  # a line when something changed, with the time of day
            say(f"  {datetime.now():%H:%M:%S}  {line}")
            shown = line
        time.sleep(0.5)
    if (line := status_line(config)) != shown:
        say(f"  {datetime.now():%H:%M:%S}  {line}")
    record = records[-1]
    say()
    done = f"unmounted {plug.device}\n"
    unmounted = wait_until(lambda: done in daemon.text_since(mark), UNMOUNT_TIMEOUT_S,
                           0.2) and wait_until(lambda: not st.is_mounted(plug.device), 10)
    if unmounted:
        say(f"the daemon logged `unmounted {plug.device}`: the disk is unmounted: "
            f"{BOLD}safe to unplug{RESET}")
    say("\nthe daemon's log (-v; without the debug lines about the devices it ignores):")
    show_log(daemon)
    say()
    cli("history", config=config)
    say()
    checks.check(record.get("status") == "success" and record.get("trigger") == "plug",
                 f"the {which} backup, started by plugging the disk in, succeeded",
                 f"status {record.get('status')!r}, trigger {record.get('trigger')!r}, "
                 f"problems: {record.get('problems')}")
    checks.check(unmounted, "the daemon unmounted the disk when it was done",
                 f"{plug.device} is mounted at: {', '.join(mounts_of(plug.device)) or '-'}")
    s.pull_out(plug)
    say(f"pulled the disk out ({plug.device} is gone)")


def demo(s: Session, checks: Checks) -> None:
    """The demo's acts, in the order the module doc tells them (main cleans up)."""
    introduce(s)
    preflight()
    srv, config = show_sample_server(s, checks)
    make_disk(s)
    start_stack(s)
    uuid_ = approve_disk(s, config, checks)
    daemon = start_daemon(s, config)
    backup_on_plug(s, daemon, config, srv.state, uuid_, checks, "first")
    added, gone = change_library(srv)
    backup_on_plug(s, daemon, config, srv.state, uuid_, checks, "second")
    found = look_at_disk(s, daemon, config, checks)
    check_disk(s, srv, found, added, gone, checks)


def introduce(s: Session) -> None:
    say(f"{BOLD}immich-usb-backup quick-start demo{RESET}")
    say("The daemon backs up a small sample Immich server onto a throwaway exFAT disk image")
    say("each time the disk is plugged in.")
    say(f"Everything lives in {s.tmp} and is removed at the end.")


def show_sample_server(s: Session, checks: Checks) -> tuple[SampleServer, Path]:
    """Act 1: build the sample server and immich-usb-backup's configuration; show both."""
    heading("1. a sample Immich server")
    srv = build_server(s.tmp / "server")
    say(f"Immich's upload location (UPLOAD_LOCATION): {srv.upload}")
    for name in IMMICH_FOLDERS:
        say(f"  {name + '/':15} {summary_line(srv.upload / name)}")
    big = sorted(srv.photos, key=lambda p: p.stat().st_size)
    say(f"{len(srv.photos)} PNG photos in upload/{srv.user[:8]}.../xx/yy/, "
        f"{human(big[0].stat().st_size)} to {human(big[-1].stat().st_size)} each")
    say("backups/ holds two nightly database dumps, as Immich writes them:")
    for dump in sorted((srv.upload / "backups").glob("*.sql.gz")):
        say(f"  {dump.name}")
    say(f"server configuration files (zipped by each backup): {srv.etc}")
    for f in sorted(srv.etc.iterdir()):
        say(f"  {f.name}")
    config = write_config(srv)
    say(f"\nimmich-usb-backup's configuration ({config}):")
    for line in config.read_text().splitlines():
        say(f"  | {line}")
    say()
    checks.check(cli("check", config=config)[0] == 0, "`immich-usb-backup check` is happy")
    return srv, config


def make_disk(s: Session) -> None:
    """Act 2: the disk image, prepared as on another computer; not plugged in yet."""
    heading("2. a throwaway USB disk")
    try:
        st.make_image(s.image, LABEL, size_mb=DISK_MB, partitioned=True, files=USER_FILES)
    except (subprocess.CalledProcessError, RuntimeError) as exc:
        raise DemoFailed(f"could not make the disk image: {exc}") from exc
    say(f"a {DISK_MB} MB disk image ({s.image.name}) with a partition table and one exFAT")
    say(f"partition labelled {LABEL!r}, prepared as on another computer:")
    say(f"  {MARKER}/   <- this folder makes it a backup disk: the backup writes only in it")
    for rel, data in USER_FILES.items():
        say(f"  {rel}   ({human(len(data))}, the user's own)")
    say("It is not plugged in yet.")


def start_stack(s: Session) -> None:
    """Act 3: the private system D-Bus, udevd (if none runs) and UDisks2."""
    heading("3. what a server runs anyway: D-Bus, udev, UDisks2")
    say("The daemon hears about disks from udev and mounts them through UDisks2 on the")
    say("system D-Bus. The demo starts what is missing, privately, and stops it at the end:")
    s.stack = st.Stack(s.tmp / "stack", images_under=s.tmp)
    try:
        with sheltered_from_ctrl_c():
            s.stack.start()
    except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        raise DemoFailed(f"could not start D-Bus, udevd and UDisks2: {exc}") from exc
    os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = s.stack.bus_address  # for the CLI's commands
    for line in describe_stack(s.stack):
        say(f"  {line}")


def approve_disk(s: Session, config: Path, checks: Checks) -> str:
    """Act 4: plug the disk in, list it with ``disks``, ``approve`` it, pull it out.
    Return its file system UUID."""
    heading("4. plug the disk in once and approve it")
    plug = s.plug_in()
    uuid_ = disk_uuid(plug.device)
    say(f"plugged in: {plug.device}, the exFAT partition on {plug.loop} (UUID {uuid_})")
    wait_until(lambda: udisks_knows(plug.device), 15)
    say()
    rc, out = cli("disks", config=config, capture=True)
    checks.check(rc == 0 and plug.device in out, "`disks` lists the plugged-in disk")
    say()
    rc, out = cli("approve", plug.device, config=config, capture=True)
    checks.check(rc == 0 and f"uuid {uuid_}".lower() in out.lower()
                 and "disk-key.txt" in out,
                 "`approve` approved it (it looked for the folder read-only, wrote the disk's "
                 "key into it, recorded the UUID and the key's hash, unmounted it again)",
                 f"exit code {rc}")
    s.pull_out(plug)
    say(f"pulled the disk out ({plug.device} is gone)")
    return uuid_


def start_daemon(s: Session, config: Path) -> Daemon:
    """Act 5, first half: start the daemon and wait until it is ready for the plug."""
    heading("5. the daemon: plug the disk in, walk away")
    s.daemon = daemon = Daemon(config, s.tmp)
    say(f"$ immich-usb-backup -c {config.name} -v daemon &     (log: {daemon.log_path})")
    daemon.start()
    daemon.wait_notify("READY=1")
    wait_until(lambda: "daemon ready" in daemon.text(), 5)  # it logs right after telling
    told = next((m for m in daemon.messages if m.startswith("STATUS=")), "")
    say(f"the daemon is ready: it sent READY=1 and {told} (what systemd would show)")
    show_log(daemon)
    say()
    return daemon


def change_library(srv: SampleServer) -> tuple[list[Path], Path]:
    """Act 6, first half: 3 photos uploaded, 1 deleted. Return (the added, the deleted)."""
    heading("6. the library changes; plug the disk in again")
    now = datetime.now().astimezone()
    added = [srv.add_photo(72, 64, 40, now - timedelta(minutes=m)) for m in (3, 2, 1)]
    gone = srv.photos[5]
    gone.unlink()
    srv.photos.remove(gone)
    # Immich's nightly dump after the change: the new photos in it, the deleted one gone
    write_dump(srv.upload / "backups", now - timedelta(seconds=30), srv.photos, srv.upload)
    say("3 new photos uploaded:")
    for p in added:
        say(f"  + {p.relative_to(srv.upload)}")
    say("1 photo deleted in Immich:")
    say(f"  - {gone.relative_to(srv.upload)}")
    say()
    return added, gone


@dataclass
class OnDisk:
    """What act 7 found on the disk (attached read-only), for the checks of act 8."""

    look: LookDisk
    backup: Path  # the marker folder
    deleted_day: Path  # where a photo deleted today is kept
    info: dict[str, object]  # backup-info.toml's [backup]
    zips: list[Path]  # the config archives
    zip_names: list[str]  # what the newest of them holds
    verify_rc: int
    verify_out: str
    sums: subprocess.CompletedProcess[str]  # sha256sum -c library.sha256


def look_at_disk(s: Session, daemon: Daemon, config: Path, checks: Checks) -> OnDisk:
    """Act 7: stop the daemon, attach the disk read-only, show what is on it, and check
    it against its manifest with ``verify`` and with ``sha256sum -c``."""
    heading("7. stop the daemon; what is on the disk")
    say(f"$ kill -TERM {daemon.proc.pid}     (what `systemctl stop` does)")
    stopped = daemon.stop()
    show_log(daemon)
    checks.check(stopped == 0, "the daemon stopped on SIGTERM with exit code 0",
                 f"exit code {stopped}")
    say()
    s.look = look = LookDisk(s.image, s.tmp / "look")
    look.open()
    mnt = look.mount_point
    say(f"attached the disk image again, read-only ({look.device}), mounted at {mnt}")
    backup = mnt / MARKER
    say("\nthe disk's root:")
    list_root(mnt)
    say()
    print_tree(backup)
    show_readme(backup)
    info = show_backup_info(backup)
    zips, names = show_config_archive(backup)
    verify_rc, verify_out, sums = verify_disk(mnt, backup, config)
    deleted_day = backup / "deleted" / datetime.now().date().isoformat()
    return OnDisk(look, backup, deleted_day, info, zips, names, verify_rc, verify_out, sums)


def show_readme(backup: Path) -> None:
    readme = backup / "README.txt"
    if readme.is_file():
        say("\nREADME.txt (first lines):")
        for line in readme.read_text().splitlines()[:10]:
            say(f"  | {line}")


def show_backup_info(backup: Path) -> dict[str, object]:
    """Show backup-info.toml; return its [backup] table (empty when it cannot be read)."""
    info_path = backup / "backup-info.toml"
    info: dict[str, object] = {}
    if info_path.is_file():
        say("\nbackup-info.toml:")
        text = info_path.read_text()
        for line in text.splitlines():
            say(f"  | {line}")
        with contextlib.suppress(tomllib.TOMLDecodeError):
            section = tomllib.loads(text).get("backup", {})
            info = section if isinstance(section, dict) else {}
    return info


def show_config_archive(backup: Path) -> tuple[list[Path], list[str]]:
    """Show what the newest config archive holds; return (the archives, its names)."""
    zips = sorted((backup / "config").glob("*.zip")) if (backup / "config").is_dir() else []
    names: list[str] = []
    if zips:
        with zipfile.ZipFile(zips[-1]) as z:
            names = z.namelist()
        say(f"\nconfig/{zips[-1].name} holds:")
        for name in sorted(names):
            say(f"  {name}")
    return zips, names


def verify_disk(
    mnt: Path, backup: Path, config: Path
) -> tuple[int, str, subprocess.CompletedProcess[str]]:
    """Check the disk against its manifest: ``verify``, then plain ``sha256sum -c``."""
    say("\nthe disk checked against its manifest, without the server (read-only):")
    verify_rc, verify_out = cli("verify", str(mnt), config=config, capture=True)
    say("\nand with nothing but sha256sum, as on any computer:")
    say(f"$ cd {backup} && sha256sum -c --quiet library.sha256 && echo all files OK")
    sums = subprocess.run(["sha256sum", "-c", "--quiet", "library.sha256"], cwd=backup,
                          capture_output=True, text=True, check=False)
    for line in (sums.stdout + sums.stderr).splitlines()[:5]:
        say(f"  {line}")
    if sums.returncode == 0:
        say("all files OK")
    return verify_rc, verify_out, sums


def check_disk(s: Session, srv: SampleServer, found: OnDisk, added: list[Path], gone: Path,
               checks: Checks) -> None:
    """Act 8: the verdicts on what act 7 found; then detach the disk."""
    heading("8. checks")
    checks.check(found.verify_rc == 0 and "verify OK" in found.verify_out,
                 "`verify` read every file back and found it as the manifest says",
                 f"exit code {found.verify_rc}")
    sums = found.sums
    checks.check(sums.returncode == 0, "`sha256sum -c library.sha256` passes on the disk",
                 (sums.stdout + sums.stderr)[-500:])
    kept = found.deleted_day / gone.relative_to(srv.upload)
    checks.check(kept.is_file(),
                 f"the photo deleted in Immich is still on the disk, in "
                 f"deleted/{found.deleted_day.name}/ (kept 30 days)", str(kept))
    check_user_files(found.look.mount_point, checks)
    check_library(srv, found.backup, added, gone, checks)
    check_dump_and_config(srv, found, checks)
    if found.look.close():
        say(f"\nunmounted {found.look.mount_point} and detached the disk image")
    s.look = None


def check_user_files(mnt: Path, checks: Checks) -> None:
    """The user's own files beside the marker folder: untouched, and nothing new there."""
    user_files = {rel: hashlib.sha256(data).hexdigest() for rel, data in USER_FILES.items()}
    root_before = sorted({MARKER} | {rel.split("/")[0] for rel in USER_FILES})
    after = {
        rel: sha256(p) for rel, p in files_under(mnt).items() if not rel.startswith(MARKER)
    }
    changed = [rel for rel in user_files if after.get(rel) != user_files[rel]]
    extra = sorted(set(after) - set(user_files))
    root_after = sorted(p.name for p in mnt.iterdir())
    checks.check(
        not changed and not extra and root_before == root_after,
        f"the user's own files beside {MARKER}/ are byte-identical "
        f"({len(user_files)} files, sha256), and nothing was added beside them",
        "\n".join([*(f"changed: {r}" for r in changed), *(f"new: {r}" for r in extra),
                   f"disk root before: {root_before}", f"disk root after:  {root_after}"]),
    )


def check_library(srv: SampleServer, backup: Path, added: list[Path], gone: Path,
                  checks: Checks) -> None:
    """library/ on the disk against the upload location: same files, same bytes."""
    source = files_under(srv.upload)
    mirror = files_under(backup / "library") if (backup / "library").is_dir() else {}
    checks.check(
        len(source) == len(mirror) and set(source) == set(mirror),
        f"library/ has the same files as the upload location ({len(mirror)} on the disk, "
        f"{len(source)} on the server)",
        "\n".join([*(f"missing on the disk: {r}" for r in sorted(set(source) - set(mirror))[:5]),
                   *(f"not on the server: {r}" for r in sorted(set(mirror) - set(source))[:5])]),
    )
    both = sorted(set(source) & set(mirror))
    differ = [r for r in both if sha256(source[r]) != sha256(mirror[r])]
    checks.check(not differ, "and every one of them is byte-identical (sha256)",
                 "\n".join(differ[:5]))
    checks.check(not any(str(gone.relative_to(srv.upload)) == r for r in mirror)
                 and all(str(p.relative_to(srv.upload)) in mirror for p in added),
                 "the 3 new photos are on the disk and the deleted one is gone from it")


def check_dump_and_config(srv: SampleServer, found: OnDisk, checks: Checks) -> None:
    """The newest database dump, the config archive and backup-info.toml's verdict."""
    newest = max((srv.upload / "backups").glob("*.sql.gz"))
    copied = found.backup / "database" / newest.name
    checks.check(copied.is_file() and sha256(copied) == sha256(newest),
                 f"the newest database dump is in database/ ({newest.name})")
    want = {".env", "docker-compose.yml", "immich-config.json"}
    in_zip = {Path(n).name for n in found.zip_names}
    checks.check(bool(found.zips) and want <= in_zip,
                 "the config archive holds immich-config.json, docker-compose.yml and .env")
    photos = len(srv.photos)
    checks.check(found.info.get("assets") == f"assets: {photos} in the database, all on the "
                 f"disk, {photos} matched by Immich's checksum",
                 f"the database and the photos on the disk agree: each of the {photos} "
                 "photos the dump lists is there, with the SHA-1 Immich recorded",
                 f"assets = {found.info.get('assets')!r}")
    checks.check(found.info.get("status") == "success",
                 "backup-info.toml says the last backup was a success",
                 f"status = {found.info.get('status')!r}")


def cleanup(s: Session) -> None:
    heading("cleaning up")
    if s.daemon is not None:
        running = s.daemon._proc is not None and s.daemon._proc.poll() is None
        rc = s.daemon.stop()
        if running:
            say(f"stopped the daemon (exit code {rc}); its last words:")
            with contextlib.suppress(OSError):
                show_log(s.daemon)
    left_mounted = False
    if s.look is not None and not s.look.close():
        left_mounted = True
        say(f"could not unmount {s.look.mount_point}")
    for plug in list(s.plugs):
        for mp in mounts_of(plug.device):  # the daemon did not get to unmount it
            unmount_point(Path(mp))
        with contextlib.suppress(RuntimeError, OSError):
            plug.pull()
            s.plugs.remove(plug)
            say(f"unplugged the disk ({plug.device})")
    for loop in loops_of(s.image):  # whatever an interruption left attached
        detach_loop(loop)
        say(f"detached {loop}")
    if s.stack is not None:
        names = ", ".join(_program(p) for p in reversed(s.stack.procs))
        changed = [(path, before) for path, before in s.stack.undo]
        s.stack.stop()
        os.environ.pop("DBUS_SYSTEM_BUS_ADDRESS", None)
        say(f"stopped {names or 'nothing'}")
        for path, before in changed:
            say(f"{'removed' if before is None else 'restored'} {path}")
    if left_mounted:
        say(f"left {s.tmp} in place because {s.look and s.look.mount_point} is still "
            "mounted; unmount it, then remove the folder")
    else:
        shutil.rmtree(s.tmp, ignore_errors=True)
        say(f"removed {s.tmp}")


def _terminate(signum: int, frame: FrameType | None) -> None:
    """SIGTERM: pass it on to a running CLI (a Ctrl-C reaches it by itself), then stop."""
    for proc in _running:
        with contextlib.suppress(OSError):
            proc.send_signal(signal.SIGTERM)
    raise KeyboardInterrupt


def main() -> int:
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)  # keep our lines in order with the CLI's
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started ignoring it
    signal.signal(signal.SIGTERM, _terminate)
    tmp = Path(tempfile.mkdtemp(prefix="immich-usb-backup-demo-"))
    session = Session(tmp, tmp / "disk.img")
    checks = Checks()
    interrupted = False
    try:
        demo(session, checks)
    except KeyboardInterrupt:
        interrupted = True
        say(f"\n{RED}interrupted{RESET}")
    except DemoFailed as exc:
        checks.failed.append(str(exc))
        say(f"\n{RED}demo stopped:{RESET} {exc}")
    finally:
        with _ignoring_signals():
            cleanup(session)

    heading("result")
    if interrupted:
        say("the demo was interrupted; everything it made was removed")
        return 130
    if checks.failed:
        say(f"{RED}FAILED{RESET}: {plural(len(checks.failed), 'problem')}:")
        for what in checks.failed:
            say(f"  - {what}")
        return 1
    say(f"{GREEN}all {checks.passed} checks passed{RESET}: the daemon backed up the disk each "
        "time it was plugged in\nand unmounted it, the user's files were not touched, and the "
        "disk holds a plain,\nreadable copy of the library, the newest database dump and the "
        "server's configuration.")
    return 0


@contextlib.contextmanager
def _ignoring_signals() -> Iterator[None]:
    """A second Ctrl-C must not cut the clean-up short."""
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    old_term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)


if __name__ == "__main__":
    raise SystemExit(main())
