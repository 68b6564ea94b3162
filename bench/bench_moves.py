"""Benchmark: a storage template migration (Immich moves every file) onto exFAT.

A library of N small originals in Immich's upload layout (upload/<user>/xx/yy/) is backed
up; then every file is moved with rename() to library/<user>/2024/MM/, as Immich does
when the storage template is turned on, and backed up again. Per round, on two fresh
exFAT disk images (mkfs.exfat, loop device, mount.exfat-fuse):

- disk A, the pipeline: first backup, a no-change run (timed), the migration run (timed);
- disk B, bare ``rsync -rt --delete`` with the product's flags: first copy, then the
  migration (timed), which copies every file again.

Prints the migration run against the no-change run and against bare rsync (medians of
the rounds), the bytes each wrote and the keep area's size before and after. Needs root.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import bench_pipeline as bp

WORK = Path("/var/tmp/iub-bench-moves")
LIBRARY = WORK / "library"
USER = "5b0f7d22-bench"
RESULTS = bp.REPO / "bench" / "results" / "moves.json"
GIB = 1024**3


def moves_made(files: int) -> list[tuple[str, str]]:
    """The (old, new) paths, relative to the library, of the N originals a template
    migration moves: upload/<user>/xx/yy/ (one folder per file, as Immich's two-level
    hash folders give for a library of this size) to library/<user>/2024/MM/."""
    out = []
    for n in range(files):
        name = f"IMG_{n:06d}.jpg"
        out.append((f"upload/{USER}/{n % 256:02x}/{n // 256 % 256:02x}/{name}",
                    f"library/{USER}/2024/{n % 12 + 1:02d}/{name}"))
    return out


def build_library(files: int, seed: int) -> int:
    """N originals of 1-8 KB at their old paths (made anew: it is quick)."""
    shutil.rmtree(LIBRARY, ignore_errors=True)
    rng = random.Random(seed)  # noqa: S311 - test data, not secrets
    for top in ("upload", "library", "thumbs", "profile", "backups"):
        (LIBRARY / top).mkdir(parents=True)
        (LIBRARY / top / ".immich").write_bytes(b"")
    total = 0
    for old, _ in moves_made(files):
        path = LIBRARY / old
        path.parent.mkdir(parents=True, exist_ok=True)
        size = rng.randint(1024, 8192)
        path.write_bytes(rng.randbytes(size))
        total += size
    return total


def rename_moves(root: Path, moves: list[tuple[str, str]], back: bool = False) -> None:
    """Make the moves under ``root`` (or undo them) with ``os.rename``, in the order the
    pipeline makes them (its walk's order of the new paths), then remove the folders
    they emptied."""
    made: set[Path] = set()
    for old, new in sorted(moves, key=lambda m: (m[0] if back else m[1]).split("/")):
        src, dst = (root / new, root / old) if back else (root / old, root / new)
        if dst.parent not in made:
            dst.parent.mkdir(parents=True, exist_ok=True)
            made.add(dst.parent)
        os.rename(src, dst)
    emptied = {(root / (new if back else old)).parent for old, new in moves}
    for deepest in sorted(emptied, key=lambda f: len(f.parts), reverse=True):
        folder = deepest
        while folder != root and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
            folder = folder.parent


def migrate(files: int, back: bool = False) -> int:
    """On the server: move every original as a template change does (or back)."""
    rename_moves(LIBRARY, moves_made(files), back)
    return files


def bare_renames(mirror: Path, moves: list[tuple[str, str]], back: bool = False) -> float:
    """The floor for renaming on this disk: ``rename_moves`` in a plain loop, timed to a
    following sync."""
    start = time.monotonic()
    rename_moves(mirror, moves, back)
    os.sync()
    return time.monotonic() - start


def du(path: Path) -> int:
    return bp.tree_stats(path)[1] if path.exists() else 0


def last_library_step(state: Path) -> dict[str, Any]:
    line = (state / "history.jsonl").read_text().splitlines()[-1]
    step: dict[str, Any] = json.loads(line)["steps"]["library"]
    return step


def one_round(n: int, files: int, disks: list[bp.Disk], size: int, config: Path, state: Path,
              cold: bool) -> dict[str, Any]:
    pipe, bare = disks
    for disk in disks:
        bp.teardown(disk)
        bp.make_disk(disk, size)
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    pipeline = [str(bp.CLI), "-c", str(config), "run", str(pipe.mount)]
    rsync = [*bp.rsync_base_args(), "--recursive", "--delete", "--stats",
             f"{LIBRARY}/", f"{bare.library}/"]
    bp.run_once(pipeline, f"r{n}-first", drop_caches=False)
    bp.run_once(rsync, f"r{n}-bare-first", drop_caches=False)
    no_change = bp.run_once(pipeline, f"r{n}-no-change", drop_caches=cold)
    keep_before = du(pipe.mount / "immich-server-backups" / "deleted")
    moved = migrate(files)
    try:
        migration = bp.run_once(pipeline, f"r{n}-migration", drop_caches=cold)
        lib = last_library_step(state)
        keep_after = du(pipe.mount / "immich-server-backups" / "deleted")
        if cold:
            os.sync()
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
        floor = bare_renames(bare.library, moves_made(moved))
        bare_renames(bare.library, moves_made(moved), back=True)  # untimed: as it was
        bare_run = bp.run_once(rsync, f"r{n}-bare-migration", drop_caches=cold)
        stats = (bp.RUN_DIR / "logs" / f"r{n}-bare-migration.out").read_text()
        bare_bytes = int(next(line.split(":")[1].strip().split()[0].replace(",", "")
                              for line in stats.splitlines()
                              if line.startswith("Total transferred file size")))
    finally:
        migrate(files, back=True)
    return {
        "moved_on_server": moved, "renamed_on_disk": lib.get("moved", 0),
        "no_change_s": no_change.seconds, "migration_s": migration.seconds,
        "bare_migration_s": bare_run.seconds, "bare_renames_s": floor,
        "pipeline_bytes_written": lib["bytes"],
        "bare_bytes_written": bare_bytes, "keep_area_before": keep_before,
        "keep_area_after": keep_after, "migration_peak_rss_kib": migration.peak_rss_kib,
    }


def main() -> int:
    p = argparse.ArgumentParser(description="Time a storage template migration run.")
    p.add_argument("--files", type=int, default=50_000, help="originals (default 50000)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, medians taken (default 3)")
    p.add_argument("--cold", action="store_true",
                   help="drop the page cache before each timed run")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    if os.geteuid() != 0:
        print("bench: run as root: sudo .venv/bin/python bench/bench_moves.py", file=sys.stderr)
        return 2
    bp.compile_as_installed()
    bp.RUN_DIR = WORK / "run"  # where run_once keeps its logs
    shutil.rmtree(bp.RUN_DIR, ignore_errors=True)
    (bp.RUN_DIR / "logs").mkdir(parents=True)
    state = bp.RUN_DIR / "state"
    config = bp.RUN_DIR / "config.toml"
    config.write_text(f'[immich]\nupload_location = "{LIBRARY}"\n\n[database]\nenabled = '
                      'false\n\n[config_backup]\nenabled = false\n\n'
                      f'[state]\ndir = "{state}"\n')
    disks = [bp.Disk(f"MOVES{x.upper()}", WORK / f"disk-{x}.img", WORK / f"mnt-{x}")
             for x in "ab"]
    try:
        total = build_library(args.files, args.seed)
        print(f"library: {args.files} originals, {total / 1e6:.1f} MB at {LIBRARY}")
        size = max(8 * GIB, args.files * 160 * 1024)  # bare rsync holds both copies at once
        rounds = []
        for n in range(args.rounds):
            r = one_round(n, args.files, disks, size, config, state, args.cold)
            rounds.append(r)
            print(f"round {n + 1}: bare renames {r['bare_renames_s']:.2f} s")
            print(f"round {n + 1}: no change {r['no_change_s']:.2f} s, migration "
                  f"{r['migration_s']:.2f} s ({r['renamed_on_disk']} renamed, "
                  f"{r['pipeline_bytes_written']} bytes copied), bare rsync "
                  f"{r['bare_migration_s']:.2f} s ({r['bare_bytes_written']} bytes copied)")
        med = {k: statistics.median(r[k] for r in rounds)
               for k in ("no_change_s", "migration_s", "bare_migration_s", "bare_renames_s")}
        vs_no_change = med["migration_s"] / med["no_change_s"]
        vs_bare = med["migration_s"] / med["bare_migration_s"]
        last = rounds[-1]
        print(f"\n{args.files} files moved, medians of {args.rounds} rounds "
              f"({'cold' if args.cold else 'warm'} caches):")
        print(f"  migration run      {med['migration_s']:8.2f} s")
        print(f"  no-change run      {med['no_change_s']:8.2f} s   ratio "
              f"{vs_no_change:.2f} (target <= 1.30: "
              f"{'PASS' if vs_no_change <= 1.30 else 'OVER'})")
        print(f"  bare rsync --delete {med['bare_migration_s']:7.2f} s   ratio {vs_bare:.2f}")
        floor = med["no_change_s"] + med["bare_renames_s"]
        print(f"  bare renames        {med['bare_renames_s']:7.2f} s   (os.rename of every move "
              "and rmdir of the emptied folders, in a loop)")
        print(f"  no-change + bare renames {floor:.2f} s: the migration run is "
              f"{med['migration_s'] / floor:.2f}x that floor")
        print(f"  file content copied: pipeline {last['pipeline_bytes_written']} bytes, "
              f"bare rsync {last['bare_bytes_written']} bytes")
        print(f"  keep area: {last['keep_area_before']} bytes before, "
              f"{last['keep_area_after']} after")
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps({
            "finished_at": datetime.now().astimezone().isoformat(timespec="seconds"),
            "files": args.files, "cold": args.cold, "rounds": rounds, "medians": med,
            "migration_vs_no_change": vs_no_change, "migration_vs_bare": vs_bare,
        }, indent=2) + "\n")
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        for proc in bp.RUNNING:
            bp.stop(proc)
        for disk in disks:
            bp.teardown(disk)
            disk.image.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
