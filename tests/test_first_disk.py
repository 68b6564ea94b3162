"""docs/first-disk.md, run: preparing a backup disk on the server, step by step.

Every block of the guide marked ``<!-- first-disk-test: NAME -->`` is extracted and run
word for word with ``bash -eu -o pipefail``; only ``/dev/sdX`` (the disk) and
``/dev/sdX1`` (its partition) are replaced, by a loop device of a sparse disk image and
its partition. The image is a used disk: an old exFAT file system on the whole device,
which the guide's partitioning must leave no trace of. Underneath: the real stack
(udevd, UDisks2 on a system bus; ``tests/stack.py``), whose test-only udev rule makes
the session's images look like USB disks, so ``approve`` and ``disks`` see a USB disk.

This kernel does not read partition tables itself (TESTBED.md): where a real disk's
kernel adds ``sdX1`` when sfdisk asks it to re-read the table, the test does it with
``partx -u``. Nothing else is done for the guide.

What each block prints is shown in the guide below it; the test compares what matters
in it (the approval's words, the partition's type) with what the block really printed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import stack as st
from helpers import REPO, Server, mount_exfat, need, unmount

GUIDE = REPO / "docs" / "first-disk.md"
MICROSOFT_BASIC_DATA = "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"  # GPT type of an exFAT partition
LABEL = "Backup"  # the label of the guide's mkfs.exfat
MARKER = "immich-server-backups"

_MARKED = re.compile(
    r"<!-- first-disk-test: (?P<name>[\w-]+) -->\n```sh\n(?P<code>.*?)\n```\n"
    r"(?:\n```\n(?P<shown>.*?)\n```\n)?",
    re.DOTALL,
)
_DISK = re.compile(r"/dev/sdX(\d*)")
_UUID = re.compile(r"UUID [0-9A-F]{4}-[0-9A-F]{4}")


@dataclass(frozen=True)
class Block:
    code: str
    shown: str | None  # the output the guide shows below the block, if it shows one


def guide_blocks() -> dict[str, Block]:
    blocks: dict[str, Block] = {}
    for m in _MARKED.finditer(GUIDE.read_text()):
        assert m.group("name") not in blocks, f"two blocks marked {m.group('name')}"
        blocks[m.group("name")] = Block(m.group("code") + "\n", m.group("shown"))
    return blocks


def on_device(code: str, loop: str) -> str:
    """``code`` with ``/dev/sdX`` (and ``/dev/sdXN``) pointed at ``loop`` (``loopNpN``).

    Refuses a block that names any other device: run as root, a real device name in the
    guide would be partitioned and formatted for real."""
    script = _DISK.sub(lambda m: loop + (f"p{m.group(1)}" if m.group(1) else ""), code)
    for device in re.findall(r"/dev/[\w/.:-]+", script):
        assert re.fullmatch(re.escape(loop) + r"(p\d+)?", device), (
            f"the guide's block names {device}: only /dev/sdX and /dev/sdX1 are replaced")
    return script


def blkid(device: str) -> dict[str, str]:
    """What is on ``device`` itself (``-p``: probed now, no cache)."""
    r = subprocess.run(["blkid", "-p", "-o", "export", device], capture_output=True,
                       text=True)
    return dict(ln.split("=", 1) for ln in r.stdout.splitlines() if "=" in ln)


def columns(line: str) -> list[str]:
    """A row of the program's tables: columns are two spaces or more apart."""
    return re.split(r"\s{2,}", line.strip())


@dataclass
class Disk:
    loop: str  # /dev/loopN: the guide's /dev/sdX
    env: dict[str, str]

    @property
    def partition(self) -> str:  # the guide's /dev/sdX1
        return f"{self.loop}p1"

    def run(self, block: Block) -> subprocess.CompletedProcess[str]:
        script = on_device(block.code, self.loop)
        r = subprocess.run(["bash", "-eu", "-o", "pipefail", "-c", script], env=self.env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"exited {r.returncode}:\n{script}\n{r.stdout}{r.stderr}"
        return r


@pytest.fixture
def used_disk(real_stack: st.Stack, server: Server, tmp_path: Path) -> Iterator[Disk]:
    """A 1 GiB sparse image with an old exFAT file system on the whole device, attached
    to a loop device that reads partition tables (``-P``), as a USB disk is plugged in.
    Unmounted, its partition dropped and detached afterwards, whatever happened."""
    need(st._kernel_has_exfat() or Path("/usr/sbin/mount.exfat-fuse").exists(),
         "needs the exfat kernel driver or exfat-fuse")
    image = tmp_path / "usb-disk.img"
    with open(image, "wb") as f:
        f.truncate(1 << 30)
    subprocess.run(["mkfs.exfat", "-L", "Old", str(image)], check=True, capture_output=True)
    loop = subprocess.run(["losetup", "-f", "--show", "-P", str(image)], check=True,
                          capture_output=True, text=True).stdout.strip()
    plugged = st.Plug(st.Image(image, "Old", partitioned=True), loop, f"{loop}p1")
    try:
        st.settle()
        env = {
            **real_stack.env,
            # the guide's `immich-usb-backup` is this checkout's, with the test's config
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
            "IMMICH_USB_BACKUP_CONFIG": str(server.config_path),
        }
        yield Disk(loop, env)
    finally:
        plugged.remove()


# The tests -----------------------------------------------------------------------------

def test_the_guide_starts_on_the_server_and_marks_each_step() -> None:
    text = GUIDE.read_text()
    blocks = guide_blocks()
    assert list(blocks) == ["find", "partition", "partition-dos", "format", "approve",
                            "check"]
    server, desktop = text.index("## On the server itself"), text.index("## On a desktop")
    assert server < desktop
    for name in blocks:
        assert server < text.index(f"<!-- first-disk-test: {name} -->") < desktop, name
    assert "sfdisk" in blocks["partition"].code and "mkfs.exfat" in blocks["format"].code
    assert "--create-marker" in blocks["approve"].code
    # a device name other than /dev/sdX in a block that erases would be run for real
    on_device("".join(b.code for b in blocks.values()), "/dev/loop7")


@pytest.mark.exfat
@pytest.mark.parametrize(("block", "label", "ptype", "type_name"), [
    ("partition", "gpt", MICROSOFT_BASIC_DATA, "Microsoft basic data"),
    ("partition-dos", "dos", "7", "HPFS/NTFS/exFAT"),
])
def test_the_guide_prepares_and_approves_a_used_usb_disk(
    used_disk: Disk, server: Server, tmp_path: Path, block: str, label: str, ptype: str,
    type_name: str,
) -> None:
    blocks = guide_blocks()
    disk = used_disk
    loop_name = Path(disk.loop).name

    # 1. Find it: the guide's columns, and the disk among the rows
    found = disk.run(blocks["find"]).stdout
    assert blocks["find"].shown is not None
    assert found.splitlines()[0].split() == blocks["find"].shown.splitlines()[0].split()
    assert re.search(rf"^{loop_name}\s", found, re.M), found
    assert blkid(disk.loop).get("TYPE") == "exfat"  # the old file system, before

    # 2. Partition it: one partition over the whole disk, of the type exFAT wants, and no
    # trace of the old file system on the whole device
    out = disk.run(blocks[block]).stdout
    assert f"of type '{type_name}'" in out, out
    shown = blocks[block].shown
    if shown is not None:
        assert f"of type '{type_name}'" in shown
    table = json.loads(subprocess.run(["sfdisk", "--json", disk.loop], check=True,
                                      capture_output=True, text=True).stdout)["partitiontable"]
    assert table["label"] == label
    (part,) = table["partitions"]
    assert part["type"].upper() == ptype
    sectors = int(Path(f"/sys/class/block/{loop_name}/size").read_text())
    assert part["start"] == 2048 and part["start"] + part["size"] >= sectors - 2048
    whole = blkid(disk.loop)
    assert whole.get("PTTYPE") == label and "TYPE" not in whole, whole

    # what a real disk's kernel does by itself once sfdisk asked it to re-read the table
    subprocess.run(["partx", "-u", disk.loop], check=True, capture_output=True)
    st.settle()
    st.wait_for(lambda: Path(f"/sys/class/block/{loop_name}p1").exists(),
                f"{disk.partition} to appear", 30)

    # 3. Format it: exFAT with the guide's label
    out = disk.run(blocks["format"]).stdout
    assert blocks["format"].shown is not None
    assert "exFAT format complete!" in out and "exFAT format complete!" in blocks["format"].shown
    fs = blkid(disk.partition)
    assert fs.get("TYPE") == "exfat" and fs.get("LABEL") == LABEL, fs
    uuid = fs["UUID"]
    st.settle()

    # 4. Approve it: the words the guide shows, the folder on the disk, the approval on
    # the server
    out = disk.run(blocks["approve"]).stdout
    assert blocks["approve"].shown is not None
    assert _UUID.sub("UUID X", out.strip()) == _UUID.sub("UUID X", blocks["approve"].shown)
    assert f"UUID {uuid}" in out
    approved = tomllib.loads((server.state / "disks.toml").read_text())["disk"]
    assert [(d["uuid"], d["label"]) for d in approved] == [(uuid, LABEL)]
    key_hash = approved[0]["key_sha256"]
    st.wait_for(lambda: not st.is_mounted(disk.partition), f"{disk.partition} unmounted", 30)
    st.wait_for(lambda: not st.fuse_helpers_running(disk.partition),
                f"exfat-fuse of {disk.partition} to exit", 30)
    mnt = tmp_path / "look"
    mnt.mkdir()
    mount_exfat(disk.partition, mnt)
    try:
        assert sorted(p.name for p in mnt.iterdir()) == [MARKER]
        assert sorted(p.name for p in (mnt / MARKER).iterdir()) == ["disk-key.txt"]
        key = (mnt / MARKER / "disk-key.txt").read_text().splitlines()[1]  # 256 bits
        assert len(key) == 64 and hashlib.sha256(key.encode()).hexdigest() == key_hash
    finally:
        unmount(mnt)

    # and `disks` says so, as the guide shows it
    out = disk.run(blocks["check"]).stdout
    shown = blocks["check"].shown
    assert shown is not None
    (row,) = [columns(ln) for ln in out.splitlines() if ln.startswith(f"{disk.partition} ")]
    header, example = (columns(ln) for ln in shown.splitlines())
    assert columns(out.splitlines()[0]) == header
    want = ("label", "marker", "approved")
    assert [row[header.index(c)] for c in want] == [example[header.index(c)] for c in want]
    assert row[header.index("uuid")] == uuid and row[header.index("label")] == LABEL

    # lsblk now shows what the guide made
    found = disk.run(blocks["find"]).stdout
    assert re.search(rf"{loop_name}p1\s.*\bexfat\s+{LABEL}\b", found), found
