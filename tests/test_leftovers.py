"""Nothing of a run outlives it, and what a killed or disturbed copy leaves is cleaned.

Safety rule 11 on the real stack (a loop-device exFAT disk, real rsync): a run killed with
SIGKILL leaves no process behind and the next run finishes the job; rsync's temporary
files are removed, never set aside as server deletions; a file that changes while it is
copied is named, and the manifest still describes the disk.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from helpers import ExfatDisk, LoopWatch, Server, note_loop_blocks, run_cli, tree
from immich_usb_backup import execute
from immich_usb_backup.errors import Refused
from immich_usb_backup.lock import backup_lock, is_running

pytestmark = pytest.mark.exfat


@pytest.fixture(autouse=True)
def _loop_never_blocked(no_blocked_loop: LoopWatch) -> LoopWatch:
    return no_blocked_loop


def history(server: Server) -> list[dict[str, object]]:
    return json.loads(run_cli("history", "--json", config=server.config_path).stdout)  # type: ignore[no-any-return]


def tagged(tag: str) -> list[str]:
    """The live processes (not zombies) whose environment carries ``tag``: the run's
    process and every child it started."""
    out = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"IUB_TEST_RUN={tag}".encode() not in environ.read_bytes().split(b"\0"):
                continue
            stat = environ.with_name("stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] == "Z":
                continue
            out.append(environ.with_name("cmdline").read_bytes().replace(b"\0", b" ")
                       .decode(errors="replace"))
        except (OSError, IndexError):
            continue
    return out


def wait_for(predicate: Callable[[], bool], timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.05)


def copying(server: Server) -> bool:
    st = json.loads(run_cli("status", "--json", config=server.config_path).stdout)
    return bool(st["state"] == "running" and st["phase"] == "library" and st["percent"] > 1)


def test_a_run_killed_mid_copy_leaves_no_process_and_the_next_run_finishes(
    make_exfat: Callable[..., ExfatDisk], server: Server
) -> None:
    disk = make_exfat(size_mb=128)
    (server.upload / "upload" / "video.mp4").write_bytes(os.urandom(12 * 1024 * 1024))
    server.write_config("[library]\nbwlimit_kib = 1024\n")
    tag = secrets.token_hex(8)
    proc = subprocess.Popen(
        [sys.executable, "-m", "immich_usb_backup", "-c", str(server.config_path), "run",
         str(disk.mount_point)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "IUB_TEST_RUN": tag})
    try:
        wait_for(lambda: copying(server))
        assert any("rsync" in p for p in tagged(tag)), tagged(tag)
        proc.kill()
        killed = time.monotonic()
        proc.wait()
        while left := tagged(tag):
            assert time.monotonic() - killed < 1.0, f"still running after 1 s: {left}"
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not is_running(server.state)  # no child of it holds the lock

    server.write_config()
    r = run_cli("run", str(disk.mount_point), config=server.config_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert tree(disk.marker / "library") == tree(server.upload)
    assert "Set aside" not in r.stdout
    assert not (disk.marker / "deleted").exists()
    assert not (disk.marker / ".incoming").exists()  # rsync's temporary folder, emptied
    listed = (disk.marker / "library.sha256").read_text()
    assert len(listed.splitlines()) == len(tree(server.upload))
    assert run_cli("verify", str(disk.mount_point), config=server.config_path).returncode == 0


def test_what_a_killed_copy_left_is_removed_never_kept_and_a_lookalike_is_mirrored(
    make_exfat: Callable[..., ExfatDisk], server: Server
) -> None:
    disk = make_exfat()
    photos = server.upload / "upload" / "9f1d6c1a-user" / "ab" / "cd"
    first = sorted(photos.iterdir())[0].name
    (photos / "looks.jpg").write_bytes(os.urandom(4000))
    (photos / ".looks.jpg.Zz9yX8").write_bytes(os.urandom(4000))  # the server's own file
    assert run_cli("run", str(disk.mount_point), config=server.config_path).returncode == 0
    mirror = disk.marker / "library" / "upload" / "9f1d6c1a-user" / "ab" / "cd"
    # what rsync leaves when killed: beside the file (older versions), or in its folder
    (mirror / f".{first}.Ab3dE9").write_bytes(os.urandom(20_000))
    (disk.marker / ".incoming").mkdir()
    (disk.marker / ".incoming" / ".IMG_9999.jpg.q1W2e3").write_bytes(os.urandom(20_000))
    (server.upload / "upload" / "new.jpg").write_bytes(os.urandom(3000))

    r = run_cli("run", str(disk.mount_point), config=server.config_path)

    assert r.returncode == 0, r.stdout + r.stderr
    assert "Set aside" not in r.stdout and not (disk.marker / "deleted").exists()
    assert not (mirror / f".{first}.Ab3dE9").exists()
    assert not (disk.marker / ".incoming").exists()
    assert (mirror / ".looks.jpg.Zz9yX8").read_bytes() == (
        photos / ".looks.jpg.Zz9yX8").read_bytes()
    assert tree(disk.marker / "library") == tree(server.upload)
    assert "Ab3dE9" not in (disk.marker / "library.sha256").read_text()
    run = history(server)[-1]
    assert run["steps"]["library"]["files"] == 1 and run["steps"]["library"]["leftovers"] == 1


@pytest.fixture
def growing(server: Server) -> Iterator[Path]:
    """A video still arriving on the server: 20 KB appended every 50 ms."""
    video = server.upload / "upload" / "arriving.mp4"
    video.write_bytes(os.urandom(2 * 1024 * 1024))
    stop = threading.Event()

    def grow() -> None:
        with open(video, "ab") as f:
            while not stop.wait(0.05):
                f.write(os.urandom(20_000))
                f.flush()

    writer = threading.Thread(target=grow, daemon=True)
    writer.start()
    yield video
    stop.set()
    writer.join()


def test_a_file_written_during_the_copy_is_named_and_the_manifest_describes_the_disk(
    make_exfat: Callable[..., ExfatDisk], server: Server, growing: Path
) -> None:
    disk = make_exfat(size_mb=128)
    server.write_config("[library]\nbwlimit_kib = 512\n")

    r = run_cli("run", str(disk.mount_point), config=server.config_path)

    assert r.returncode == 1, r.stdout + r.stderr
    assert "backup PARTIAL" in r.stdout
    assert ("library: upload/arriving.mp4 changed on the server while it was copied: "
            "copied again by the next run") in r.stdout
    assert "Changed on the server while it was copied: 1 file" in r.stdout
    # any computer's sha256sum, and verify, find the disk as it is: undamaged
    check = subprocess.run(["sha256sum", "-c", "--quiet", "library.sha256"],
                           cwd=disk.marker, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    v = run_cli("verify", str(disk.mount_point), config=server.config_path)
    assert v.returncode == 0, v.stdout + v.stderr

    growing_size = growing.stat().st_size
    server.write_config()
    r = run_cli("run", str(disk.mount_point), config=server.config_path)
    copied = (disk.marker / "library" / "upload" / "arriving.mp4").stat().st_size
    assert copied > 2 * 1024 * 1024 and copied >= growing_size - 2_000_000
    last = history(server)[-1]
    assert last["files_transferred"] >= 1  # copied again
    assert not (disk.marker / "deleted").exists()  # the partial copy is not a version


def test_a_child_that_outlives_its_parent_keeps_the_next_run_out(tmp_path: Path) -> None:
    pids: list[str] = []
    with backup_lock(tmp_path):
        # sh starts sleep in the background and ends: sleep is a grandchild, which no
        # death signal reaches, like the child of a wrapper such as runuser
        asyncio.run(execute.run(["sh", "-c", "sleep 30 >/dev/null 2>&1 & echo $!"],
                                on_line=pids.append))
    try:
        assert is_running(tmp_path)
        with (pytest.raises(Refused, match="a process of an earlier backup is still running"),
              backup_lock(tmp_path)):
            pass
    finally:
        os.kill(int(pids[0]), signal.SIGKILL)
    wait_for(lambda: not is_running(tmp_path), timeout=5)
    with backup_lock(tmp_path):
        pass


def test_children_outside_a_run_hold_no_lock(tmp_path: Path) -> None:
    pids: list[str] = []
    asyncio.run(execute.run(["sh", "-c", "sleep 30 >/dev/null 2>&1 & echo $!"],
                            on_line=pids.append))
    try:
        with backup_lock(tmp_path):
            pass
    finally:
        os.kill(int(pids[0]), signal.SIGKILL)


def test_the_drill_server_and_rsync_are_killed_with_their_parent(tmp_path: Path) -> None:
    """The death signal itself: a child of a process killed with SIGKILL goes at once,
    even one that ignores its input closing (as PostgreSQL's server does)."""
    script = ("import asyncio, sys\n"
              "from immich_usb_backup import execute\n"
              "async def main():\n"
              "    s = await execute.Service.start(['sleep', '60'], log_to=sys.argv[1])\n"
              "    print(s.proc.pid, flush=True)\n"
              "    await asyncio.sleep(60)\n"
              "asyncio.run(main())\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "log")],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    proc.kill()
    killed = time.monotonic()
    proc.wait()
    note_loop_blocks("service", "")

    def gone() -> bool:
        try:
            state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return True
        return state == "Z"

    while not gone():
        assert time.monotonic() - killed < 1.0
        time.sleep(0.02)
