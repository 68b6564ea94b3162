"""Benchmark: the photos of a restore against a bare rsync from the same backup disk.

The synthetic library of bench_pipeline.py (cached) is backed up once by the real
command line onto an exFAT disk image (loop device, mount.exfat-fuse): ``library/`` and
its manifest, as any backup writes them. Then, per round, each tool copies that
``library/`` into an empty folder on the server's side (``--dest``), the page cache
dropped before each (who goes first alternates):

- bare: ``rsync -rt --chmod=D750,F640 DISK/library/ DEST/``, the manual way of
  docs/restore.md (its --info=progress2 left out);
- restore: the files step of ``immich-usb-backup restore`` (``restore.files``: the same
  reader and writer threads, the manifest loaded, each file's SHA-256 compared with it
  and its SHA-1 kept for the asset check, owner, modes and times set, linked into
  place), run by this script in a process of its own (``--worker``), as the command runs
  it.

Each time runs from the start of the process until it has exited and a following
``sync()`` has returned. Both copies are checked to hold every file and byte. Prints the
medians, the ratio against the target (1.10) and each round's ratio. Needs root. See
bench/README.md, "Restore".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

import bench_pipeline as bp  # the folder of this script is first on sys.path
from bench_pipeline import Disk, Sample
from immich_usb_backup import manifest
from immich_usb_backup.restore import files

TARGET = 1.10
TOOLS = ("bare", "restore")
RESULTS = bp.REPO / "bench" / "results" / "restore-latest.json"
DEST = bp.WORK / "restore-dest"


def worker(mirror: str, dest: str) -> int:
    """The restore's files step, as the command runs it; prints its numbers as JSON."""
    work = Path(tempfile.mkdtemp(prefix="bench-restore-"))
    try:
        db = files.open_db(work)
        copier = files.LibraryCopy(Path(mirror), Path(dest), db, owner=(0, 0), merge=False,
                                   stop=threading.Event())
        files.load_manifest(db, Path(mirror).parent / manifest.NAME, copier.result)
        result = copier.run()
        db.close()
        os.sync()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result.as_dict()))
    return 0 if result.ok else 1


def argv_for(tool: str, disk: Disk, dest: Path) -> list[str]:
    if tool == "bare":
        return ["rsync", "-rt", "--chmod=D750,F640", f"{disk.library}/", f"{dest}/"]
    return [sys.executable, str(Path(__file__)), "--worker", str(disk.library), str(dest)]


def back_up(disk: Disk, config: Path) -> None:
    """The backup the restores read: the real command line onto the disk."""
    r = subprocess.run([str(bp.CLI), "-c", str(config), "run", str(disk.mount)],
                       capture_output=True, text=True, check=False)
    # bench_pipeline's dump lists every original with its SHA-1: the run is a success
    if r.returncode != 0 or not (disk.library.parent / manifest.NAME).is_file():
        raise RuntimeError(f"the backup failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")


def measure(rounds: int, disk: Disk, dest: Path, source: tuple[int, int]
            ) -> list[dict[str, Any]]:
    done = []
    for r in range(rounds):
        order = TOOLS if r % 2 == 0 else TOOLS[::-1]
        print(f"round {r + 1}/{rounds}: order {' then '.join(order)}")
        result: dict[str, Any] = {"order": list(order)}
        for tool in order:
            shutil.rmtree(dest, ignore_errors=True)
            s: Sample = bp.run_once(argv_for(tool, disk, dest), f"r{r}-{tool}", True)
            result[tool] = asdict(s)
            got = bp.tree_stats(dest)
            if got != source:
                raise RuntimeError(f"{tool}: {dest} holds {got} (files, bytes), the disk "
                                   f"{source}")
            print(f"  {tool:<8} {s.seconds:8.2f} s")
        done.append(result)
    shutil.rmtree(dest, ignore_errors=True)
    return done


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    bare, ours = (statistics.median(r[t]["seconds"] for r in rounds) for t in TOOLS)
    per_round = [round(r["restore"]["seconds"] / r["bare"]["seconds"], 3) for r in rounds]
    rss = {f"{t}_peak_rss_kib": max((r[t]["peak_rss_kib"] or 0) for r in rounds) or None
           for t in TOOLS}
    return {"bare_s": round(bare, 3), "restore_s": round(ours, 3),
            "ratio": round(ours / bare, 3), "target": TARGET,
            "result": "PASS" if ours / bare <= TARGET else "OVER",
            "round_ratios": per_round, "rss": rss}


def report(summary: dict[str, Any], rounds: int, lib: dict[str, Any]) -> None:
    print(f"\nlibrary: {lib['files']} files, {lib['bytes'] / 1e9:.2f} GB; {rounds} round(s), "
          "order alternated, page cache dropped before each copy, medians over rounds;")
    print("every time runs until the process exits and a following sync() returns.\n")
    print(f"{'bare rsync s':>12} {'restore s':>10} {'ratio':>7} {'target':>8}  result")
    print(f"{summary['bare_s']:>12.2f} {summary['restore_s']:>10.2f} {summary['ratio']:>7.3f} "
          f"{'<= ' + format(TARGET, '.2f'):>8}  {summary['result']}")
    ratios = ", ".join(f"{x:.3f}" for x in summary["round_ratios"])
    print(f"  ratio of each round {ratios} (median "
          f"{statistics.median(summary['round_ratios']):.3f})")
    bare, ours = (summary["rss"][f"{t}_peak_rss_kib"] for t in TOOLS)
    if bare and ours:
        print(f"peak RSS: bare rsync {bare / 1024:.1f} MiB, restore {ours / 1024:.1f} MiB")


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        return worker(sys.argv[2], sys.argv[3])
    p = argparse.ArgumentParser(description="Time a restore's files against bare rsync.")
    p.add_argument("--files", type=int, help="files in the library (default 20000)")
    p.add_argument("--gb", type=float, help="library size in GB of 10^9 bytes (default 2.5)")
    p.add_argument("--small", action="store_true", help="quick check: 2000 files, 0.25 GB")
    p.add_argument("--rounds", type=int, default=3, help="measurement rounds (default 3)")
    p.add_argument("--seed", type=int, default=1, help="seed of the library generator")
    p.add_argument("--dest", type=Path, default=DEST, metavar="DIR",
                   help=f"where the copies go, emptied before each (default {DEST})")
    bp.add_images_option(p, bp.WORK)
    args = p.parse_args()
    files = args.files or (2000 if args.small else 20_000)
    gb = args.gb or (0.25 if args.small else 2.5)
    if min(files, args.rounds) < 1 or gb <= 0:
        p.error("--files, --gb and --rounds must be positive")
    if os.geteuid() != 0:
        print("bench: run as root (loop devices, mounts, drop_caches): "
              "sudo .venv/bin/python bench/bench_restore.py", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, bp._terminate)
    bp.compile_as_installed()
    args.images.mkdir(parents=True, exist_ok=True)
    disk = Disk("BENCHR", args.images / "disk-restore.img", bp.WORK / "mnt-restore")
    try:
        bp.teardown(disk)
        lib = bp.build_library(files, gb, args.seed)
        shutil.rmtree(bp.RUN_DIR, ignore_errors=True)
        (bp.RUN_DIR / "logs").mkdir(parents=True)
        config = bp.write_config()
        bp.refresh_dump()
        source = bp.tree_stats(bp.LIBRARY)
        bp.make_disk(disk, max(6 * bp.GIB, int(source[1] * 1.5) + bp.GIB))
        print("backing the library up onto the disk (once)")
        back_up(disk, config)
        rounds = measure(args.rounds, disk, args.dest, bp.tree_stats(disk.library))
        summary = summarize(rounds)
        report(summary, args.rounds, lib)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps({
            "finished_at": datetime.now().astimezone().isoformat(timespec="seconds"),
            "library": {**lib, "files": source[0], "bytes": source[1]},
            "rounds": rounds, **summary, "kernel": os.uname().release,
            "rsync": bp.sh("rsync", "--version").splitlines()[0]}, indent=2) + "\n")
        print(f"\nresults: {RESULTS}; logs: {bp.RUN_DIR / 'logs'}")
        return 0
    except KeyboardInterrupt:
        print("\nbench: interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        for proc in bp.RUNNING:
            bp.stop(proc)
        bp.teardown(disk)
        disk.image.unlink(missing_ok=True)
        shutil.rmtree(args.dest, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
