"""Benchmark: a library of N small files (200,000 or 1,000,000), the pipeline against bare
rsync, onto exFAT: the no-change run and peak memory, warm or cold.

The library (N files of 1-2 KB in Immich's layout: upload/<user>/xx/yy/, thumbs/...) is
generated once and cached in /var/tmp/iub-bench-scale/library-N. The disk image is a
sparse file formatted with 4 KB clusters (``mkfs.exfat -c 4K``: a million files in 32 KB
clusters would need 32 GB) and cached too, holding a complete mirror made by a first
pipeline run. Per round, in alternating order: a no-change run of the pipeline and of
bare ``rsync -rt --modify-window=1 --delete`` with the product's flags onto that mirror,
the page cache dropped before each side with ``--cold``. Prints the medians, the ratio
against the bare tool and the targets of issue "A million files at rsync's speed"
(no change at most 1.20x bare + 0.3 s; peak RSS at most 60 MB). Needs root. See
bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import threading
from pathlib import Path

import bench_pipeline as bp

WORK = Path("/var/tmp/iub-bench-scale")
USER = "5b0f7d22-scale"
TOP_FOLDERS = ("upload", "library", "thumbs", "profile", "encoded-video", "backups")  # each
# with an empty .immich: the library holds N + len(TOP_FOLDERS) files


def rel_path(i: int) -> str:
    """File ``i``'s path in the library: an original under upload/ when i % 3 == 0, else
    under thumbs/."""
    top = "upload" if i % 3 == 0 else "thumbs"
    return f"{top}/{USER}/{i % 251:02x}/{i // 251 % 97:02x}/{i:07d}.jpg"


def build_library(files: int, seed: int) -> Path:
    library = WORK / f"library-{files}"
    stamp = WORK / f"library-{files}.done"
    if stamp.exists():
        print(f"library: cached at {library}")
        return library
    print(f"library: generating {files} files at {library} (cached for next time)")
    shutil.rmtree(library, ignore_errors=True)
    rng = random.Random(seed)  # noqa: S311 - test data, not secrets
    for top in TOP_FOLDERS:
        (library / top).mkdir(parents=True)
        (library / top / ".immich").write_bytes(b"")
    for i in range(files):
        path = library / rel_path(i)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(rng.randint(1024, 2048)))
    stamp.write_text("ok\n")
    return library


class TreeMemory:
    """The peak memory of a run with all its processes (the CLI and its folder listing
    helpers): the sum of their proportional set sizes (PSS, shared pages split between
    the processes that share them), sampled every 50 ms from /proc."""

    def __init__(self) -> None:
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            total = 0
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                    if ((b"immich-usb-backup" not in cmd and b"immich_usb_backup" not in cmd
                         and b"bench/variant.py" not in cmd)
                            or cmd.split(b"\0")[0].endswith(b"time")):  # GNU time's
                        continue
                    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                        if line.startswith("Pss:"):
                            total += int(line.split()[1])
                except OSError:
                    continue  # ended meanwhile
            self.peak_kib = max(self.peak_kib, total)


def disk_size(files: int) -> int:
    return max(8 * 1024**3, files * 16 * 1024)


def no_change_disk(files: int, config: Path, state: Path, images: Path) -> bp.Disk:
    """The cached disk holding a complete mirror (made by a first pipeline run once)."""
    disk = bp.Disk("SCALE", images / f"disk-{files}.img", WORK / "mnt")
    ready = images / f"disk-{files}.done"
    bp.teardown(disk)
    if ready.exists():
        bp.attach(disk)
        return disk
    bp.make_disk(disk, disk_size(files), cluster="4K")
    shutil.rmtree(state, ignore_errors=True)
    first = bp.run_once([str(bp.CLI), "-c", str(config), "run", str(disk.mount)], "first",
                        drop_caches=False)
    print(f"first backup: {first.seconds:.1f} s (made once, cached)")
    ready.write_text("ok\n")
    return disk


def main() -> int:
    p = argparse.ArgumentParser(description="Runs at scale against bare rsync: no change "
                                "(default) or a first backup (--first).")
    p.add_argument("--files", type=int, default=200_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cold", action="store_true", help="drop the page cache before each run")
    p.add_argument("--first", action="store_true",
                   help="a first backup onto a freshly formatted disk, from an empty hash "
                   "cache (the manifest hashes every file), against bare rsync + sync")
    p.add_argument("--seed", type=int, default=1)
    bp.add_images_option(p, WORK)
    args = p.parse_args()
    if os.geteuid() != 0:
        print("bench: run as root: sudo .venv/bin/python bench/bench_scale.py", file=sys.stderr)
        return 2
    bp.compile_as_installed()
    WORK.mkdir(parents=True, exist_ok=True)
    args.images.mkdir(parents=True, exist_ok=True)
    library = build_library(args.files, args.seed)
    bp.RUN_DIR = WORK / "run"
    shutil.rmtree(bp.RUN_DIR, ignore_errors=True)
    (bp.RUN_DIR / "logs").mkdir(parents=True)
    # the hash cache belongs with the cached mirror; a first backup starts from none
    state = bp.RUN_DIR / "state" if args.first else WORK / f"state-{args.files}"
    config = bp.RUN_DIR / "config.toml"
    config.write_text(f'[immich]\nupload_location = "{library}"\n\n[database]\nenabled = '
                      'false\n\n[config_backup]\nenabled = false\n\n'
                      f'[state]\ndir = "{state}"\n')
    disk = bp.Disk("FIRST", args.images / "disk-first.img", WORK / "mnt")  # the same mount point
    pipeline = [str(bp.CLI), "-c", str(config), "run", str(disk.mount)]  # as the cached one
    bare = [*bp.rsync_base_args(), "--recursive", "--delete", f"{library}/",
            f"{disk.library}/"]
    try:
        if not args.first:
            disk = no_change_disk(args.files, config, state, args.images)
            bp.run_once(pipeline, "warm-up", drop_caches=False)
        samples: dict[str, list[bp.Sample]] = {"bare": [], "pipeline": []}
        tree_pss: list[float] = []
        for n in range(args.rounds):
            order = ("bare", "pipeline") if n % 2 == 0 else ("pipeline", "bare")
            for tool in order:
                if args.first:  # a fresh disk, and for the pipeline no hash cache
                    bp.teardown(disk)
                    bp.make_disk(disk, disk_size(args.files), cluster="4K")
                    shutil.rmtree(state, ignore_errors=True)
                with TreeMemory() as memory:
                    s = bp.run_once(bare if tool == "bare" else pipeline, f"r{n}-{tool}",
                                    drop_caches=args.cold)
                every_file = args.files + len(TOP_FOLDERS)
                if args.first and tool == "pipeline" and s.copied != every_file:
                    raise RuntimeError(f"the first backup copied {s.copied} files, "
                                       f"not {every_file}")
                samples[tool].append(s)
                extra = ""
                if tool == "pipeline":
                    tree_pss.append(memory.peak_kib / 1024)
                    extra = f", all its processes {tree_pss[-1]:.1f} MiB (PSS)"
                print(f"round {n + 1} {tool}: {s.seconds:.2f} s, peak RSS "
                      f"{(s.peak_rss_kib or 0) / 1024:.1f} MiB{extra}")
        med = {t: statistics.median(s.seconds for s in v) for t, v in samples.items()}
        rss = {t: max((s.peak_rss_kib or 0) for s in v) / 1024 for t, v in samples.items()}
        ratio = med["pipeline"] / med["bare"]
        if args.first:
            what, allowed, target = "first backup", 1.10 * med["bare"], "1.10 x bare"
        else:
            what, allowed, target = "no change", 1.20 * med["bare"] + 0.3, "1.20 x bare + 0.3 s"
        print(f"\n{args.files} files, {what}, medians of {args.rounds} rounds "
              f"({'cold' if args.cold else 'warm'}):")
        print(f"  bare rsync {med['bare']:.2f} s, pipeline {med['pipeline']:.2f} s, ratio "
              f"{ratio:.2f} (target <= {target} = {allowed:.2f} s: "
              f"{'PASS' if med['pipeline'] <= allowed else 'OVER'})")
        per_round = [p.seconds / b.seconds
                     for b, p in zip(samples["bare"], samples["pipeline"], strict=True)]
        print(f"  ratio of each round: {', '.join(f'{x:.2f}' for x in per_round)} "
              f"(median {statistics.median(per_round):.2f})")
        whole = max(tree_pss)
        print(f"  peak RSS: bare {rss['bare']:.1f} MiB, pipeline {rss['pipeline']:.1f} MiB "
              f"(largest process); the pipeline with its helpers {whole:.1f} MiB PSS "
              f"(target <= 60 MB: {'PASS' if whole <= 60 * 1e6 / 2**20 else 'OVER'})")
        name = f"scale-{args.files}{'-first' if args.first else ''}.json"
        out = bp.REPO / "bench" / "results" / name
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"files": args.files, "first": args.first, "cold": args.cold,
                                   "medians": med, "ratio": ratio,
                                   "round_ratios": per_round, "peak_rss_mib": rss,
                                   "pipeline_tree_pss_mib": whole}, indent=2) + "\n")
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        for proc in bp.RUNNING:
            bp.stop(proc)
        bp.teardown(disk)
        if args.first:
            disk.image.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
