"""The quick-start demo: a sample Immich server backed up onto a throwaway exFAT disk.

Run it through ``sudo tools/demo`` (which installs what is needed first). It

1. builds a small sample Immich upload location (real PNG photos, the ``.immich``
   markers, two database dumps) and a sample config folder in a temporary folder;
2. makes a 512 MB exFAT disk image, attaches it to a loop device and mounts it, with the
   ``immich-server-backups`` marker folder and some of "the user's own" files beside it;
3. runs the real command line twice (``run``, then ``history``), changing the library
   in between;
4. shows what is on the disk and checks that the user's files are untouched and that the
   library copy matches the server;
5. unmounts, detaches and removes everything, also on Ctrl-C.

Exit code 0 when both backups succeeded and every check passed, 1 otherwise.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from types import FrameType

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / ".venv" / "bin" / "immich-usb-backup"
MARKER = "immich-server-backups"
LABEL = "DemoBackup"
DISK_MB = 512
IMMICH_VERSION = "v1.130.0-pg14.17"
IMMICH_FOLDERS = ("upload", "library", "profile", "thumbs", "encoded-video", "backups")

USER_NOTES = "My Notes.txt"
USER_FOLDER = "Holiday Plans"
USER_FOLDER_FILE = "packing list.txt"

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


def write_dump(folder: Path, when: datetime) -> Path:
    path = folder / dump_name(when)
    sql = (
        "--\n-- PostgreSQL database dump (immich-usb-backup demo sample)\n--\n"
        "SET statement_timeout = 0;\nSET client_encoding = 'UTF8';\n"
        "CREATE TABLE public.assets (id uuid PRIMARY KEY, \"originalPath\" text);\n"
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
    write_dump(upload / "backups", now - timedelta(days=1))
    write_dump(upload / "backups", now - timedelta(minutes=5))

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


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def summary_line(root: Path) -> str:
    files = files_under(root)
    return f"{plural(len(files), 'file')}, {human(sum(p.stat().st_size for p in files.values()))}"


# the disk ----------------------------------------------------------------------------

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


def is_mounted(mount_point: Path) -> bool:
    want = str(mount_point).replace(" ", "\\040")
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) > 1 and fields[1] == want:
                return True
    return False


@dataclass
class DemoDisk:
    image: Path
    mount_point: Path
    device: str | None = None
    mounted: bool = False

    def create(self) -> None:
        with open(self.image, "wb") as f:
            f.truncate(DISK_MB * 1024 * 1024)  # sparse: takes almost no real space
        run_quiet(["mkfs.exfat", "-L", LABEL, str(self.image)])
        self.device = run_quiet(["losetup", "-f", "--show", str(self.image)])
        self.mount_point.mkdir()
        self.mount()

    def mount(self) -> None:
        assert self.device is not None
        if kernel_has_exfat():
            run_quiet(["mount", "-t", "exfat", self.device, str(self.mount_point)])
        else:
            run_quiet(["mount.exfat-fuse", self.device, str(self.mount_point)])
        self.mounted = True

    def unmount(self) -> bool:
        """Unmount and wait until the mount is really gone (exfat-fuse finishes writing
        after umount returns). True when it is gone."""
        if not self.mounted and not is_mounted(self.mount_point):
            return True
        for attempt in range(60):
            r = subprocess.run(["umount", str(self.mount_point)], capture_output=True,
                               check=False)
            if r.returncode == 0 or not is_mounted(self.mount_point):
                break
            if attempt == 59:  # still busy after 6 s: detach it lazily
                subprocess.run(["umount", "-l", str(self.mount_point)], capture_output=True,
                               check=False)
            time.sleep(0.1)
        for _ in range(200):
            if not is_mounted(self.mount_point):
                self.mounted = False
                return True
            time.sleep(0.05)
        return False

    def remount(self) -> None:
        if not self.unmount():
            raise DemoFailed(f"could not unmount {self.mount_point}")
        self.mount()

    def detach(self) -> None:
        if self.device is None:
            return
        for _ in range(20):
            r = subprocess.run(["losetup", "-d", self.device], capture_output=True, check=False)
            if r.returncode == 0:
                break
            time.sleep(0.25)
        self.device = None


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


# the command line --------------------------------------------------------------------

def cli(*args: str, config: Path) -> int:
    """Run the real ``immich-usb-backup`` with its output shown as it comes."""
    argv = [str(CLI), "-c", str(config), *args]
    say(f"$ immich-usb-backup -c {config.name} {' '.join(args)}")
    sys.stdout.flush()
    proc = subprocess.Popen(argv)
    _running.append(proc)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        # the CLI got the Ctrl-C too (or the SIGTERM, passed on by _terminate): let it stop
        # rsync and record the run as interrupted
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    finally:
        _running.remove(proc)


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

def preflight() -> None:
    problems = []
    if os.geteuid() != 0:
        problems.append("run as root (sudo tools/demo): loop devices and mounts need it")
    for tool in ("mkfs.exfat", "losetup", "mount", "umount", "blkid", "rsync"):
        if shutil.which(tool) is None:
            problems.append(f"`{tool}` is missing (tools/setup installs it)")
    if not kernel_has_exfat() and shutil.which("mount.exfat-fuse") is None:
        problems.append("no exFAT driver: neither the kernel's nor exfat-fuse")
    if not Path("/dev/loop-control").exists():
        problems.append("no loop devices (/dev/loop-control is missing)")
    if not CLI.exists():
        problems.append(f"{CLI} is missing: run tools/setup")
    if problems:
        raise DemoFailed("this machine cannot run the demo:\n  - " + "\n  - ".join(problems))


def demo(tmp: Path, disk: DemoDisk, checks: Checks) -> None:
    say(f"{BOLD}immich-usb-backup quick-start demo{RESET}")
    say("A small sample Immich server is backed up onto a throwaway exFAT disk image.")
    say(f"Everything lives in {tmp} and is removed at the end.")
    preflight()

    heading("1. a sample Immich server")
    srv = build_server(tmp / "server")
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

    heading("2. a throwaway exFAT backup disk")
    disk.create()
    mnt = disk.mount_point
    driver = "the kernel's exFAT driver" if kernel_has_exfat() else "exfat-fuse"
    say(f"{DISK_MB} MB image, label {LABEL!r}, on {disk.device}, mounted at {mnt} ({driver})")
    (mnt / MARKER).mkdir()
    say(f"created the folder {MARKER}/ at the disk's root: that is what makes it a backup "
        "disk")
    (mnt / USER_NOTES).write_text(
        "Things on this disk that are mine:\n- the holiday plans\n- these notes\n"
        "The backup must never touch them.\n"
    )
    (mnt / USER_FOLDER).mkdir()
    (mnt / USER_FOLDER / USER_FOLDER_FILE).write_text("swimsuit\nsun cream\ncamera\n")
    os.sync()
    user_files = {
        rel: sha256(p) for rel, p in files_under(mnt).items() if not rel.startswith(MARKER)
    }
    root_before = sorted(p.name for p in mnt.iterdir())
    say("and put some of the user's own files beside it:")
    list_root(mnt)

    heading("3. the first backup")
    config = write_config(srv)
    say(f"the configuration ({config}):")
    for line in config.read_text().splitlines():
        say(f"  | {line}")
    say()
    checks.check(cli("check", config=config) == 0, "`immich-usb-backup check` is happy")
    say()
    rc = cli("run", str(mnt), config=config)
    checks.check(rc == 0, "the first backup succeeded (exit code 0)", f"exit code {rc}")
    say()
    cli("history", config=config)

    heading("4. the library changes, then a second backup")
    now = datetime.now().astimezone()
    added = [srv.add_photo(72, 64, 40, now - timedelta(minutes=m)) for m in (3, 2, 1)]
    gone = srv.photos[5]
    gone.unlink()
    srv.photos.remove(gone)
    say("3 new photos uploaded:")
    for p in added:
        say(f"  + {p.relative_to(srv.upload)}")
    say("1 photo deleted in Immich:")
    say(f"  - {gone.relative_to(srv.upload)}")
    say()
    rc = cli("run", str(mnt), config=config)
    checks.check(rc == 0, "the second backup succeeded (exit code 0)", f"exit code {rc}")
    say()
    cli("history", config=config)

    heading("5. what is on the disk")
    say("(unmounted and mounted again first, so what follows is read back from the disk)")
    disk.remount()
    backup = mnt / MARKER
    say()
    say("the disk's root:")
    list_root(mnt)
    say()
    print_tree(backup)
    readme = backup / "README.txt"
    if readme.is_file():
        say("\nREADME.txt (first lines):")
        for line in readme.read_text().splitlines()[:10]:
            say(f"  | {line}")
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
    zips = sorted((backup / "config").glob("*.zip")) if (backup / "config").is_dir() else []
    names: list[str] = []
    if zips:
        with zipfile.ZipFile(zips[-1]) as z:
            names = z.namelist()
        say(f"\nconfig/{zips[-1].name} holds:")
        for name in sorted(names):
            say(f"  {name}")

    heading("6. checks")
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
    newest = max((srv.upload / "backups").glob("*.sql.gz"))
    copied = backup / "database" / newest.name
    checks.check(copied.is_file() and sha256(copied) == sha256(newest),
                 f"the newest database dump is in database/ ({newest.name})")
    want = {".env", "docker-compose.yml", "immich-config.json"}
    in_zip = {Path(n).name for n in names}
    checks.check(bool(zips) and want <= in_zip,
                 "the config archive holds immich-config.json, docker-compose.yml and .env")
    checks.check(info.get("status") == "success",
                 "backup-info.toml says the last backup was a success",
                 f"status = {info.get('status')!r}")


def cleanup(tmp: Path, disk: DemoDisk) -> None:
    heading("cleaning up")
    gone = disk.unmount()
    if disk.device is not None:
        dev = disk.device
        disk.detach()
        say(f"unmounted {disk.mount_point} and detached {dev}" if gone
            else f"could not unmount {disk.mount_point}")
    if gone:
        shutil.rmtree(tmp, ignore_errors=True)
        say(f"removed {tmp}")
    else:
        say(f"left {tmp} in place because {disk.mount_point} is still mounted; "
            f"unmount it, then remove the folder")


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
    disk = DemoDisk(tmp / "disk.img", tmp / "mnt")
    checks = Checks()
    interrupted = False
    try:
        demo(tmp, disk, checks)
    except KeyboardInterrupt:
        interrupted = True
        say(f"\n{RED}interrupted{RESET}")
    except DemoFailed as exc:
        checks.failed.append(str(exc))
        say(f"\n{RED}demo stopped:{RESET} {exc}")
    finally:
        with _ignoring_signals():
            cleanup(tmp, disk)

    heading("result")
    if interrupted:
        say("the demo was interrupted; everything it made was removed")
        return 130
    if checks.failed:
        say(f"{RED}FAILED{RESET}: {len(checks.failed)} problem(s):")
        for what in checks.failed:
            say(f"  - {what}")
        return 1
    say(f"{GREEN}all {checks.passed} checks passed{RESET}: both backups succeeded, the "
        "user's files were not touched,\nand the disk holds a plain, readable copy of the "
        "library, the newest database dump\nand the server's configuration.")
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
