"""Shared fixtures: a real exFAT file system on a loop device, a sample Immich library.

The exFAT fixtures need root, a loop device and an exFAT driver (the kernel's, or
exfat-fuse). Under CI (``CI=true``) a missing piece fails the test loudly; on a
developer's machine it skips, saying why.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
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


def unmount(mount_point: Path) -> None:
    for _ in range(50):
        r = subprocess.run(["umount", str(mount_point)], capture_output=True)
        if r.returncode == 0:
            break
        time.sleep(0.1)
    else:
        subprocess.run(["umount", "--lazy", str(mount_point)], capture_output=True)
    # exfat-fuse finishes writing after umount returns: wait for it before detaching
    for _ in range(100):
        if str(mount_point) not in Path("/proc/mounts").read_text():
            break
        time.sleep(0.05)


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
    for disk in made:
        with contextlib.suppress(Exception):
            unmount(disk.mount_point)
        subprocess.run(["losetup", "-d", disk.device], capture_output=True)


def dump_name(when: datetime) -> str:
    return f"immich-db-backup-{when:%Y%m%dT%H%M%S}-v1.130.0-pg14.17.sql.gz"


def write_dump(
    folder: Path, when: datetime, body: bytes = b"-- PostgreSQL database dump complete\n"
) -> Path:
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


def run_cli(
    *args: str, config: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run the real command line in a subprocess."""
    argv = [sys.executable, "-m", "immich_usb_backup"]
    if config is not None:
        argv += ["-c", str(config)]
    return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=timeout)


def tree(root: Path) -> dict[str, bytes]:
    """Every regular file under ``root`` with its content, by relative path."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath, name)
            out[str(p.relative_to(root))] = p.read_bytes()
    return out
