"""Benchmark: a no-change backup run with the asset check against the same run without it.

bench_scale.py's library (N small files in Immich's layout, cached) and its cached disk
holding a complete mirror, with the database step on: a dump in ``[database] dumps_dir``
(a folder outside the upload location), gzip'd ``pg_dump`` text with an ``asset`` row
for every original (the files under ``upload/``: ``originalPath`` /data/<path>,
``checksum`` the file's SHA-1) and an ``asset_file`` row for each of the thumbnails
bench_scale.py makes beside them (two per original: thumbnail, preview). The dump is
written anew at every invocation, stamped with the current time (the pipeline flags an
old dump).

- with: the product's command line, ``immich-usb-backup -c CONFIG run MOUNT``;
- without: ``bench/variant.py --without-asset-check -- -c CONFIG run MOUNT``, the same
  product with the asset step left out.

With ``--verbose`` both sides run with ``-v``, and each run's log says where its time
went: the scan, the library's end, the asset step, the rest up to the closing sync.

Untimed warm-ups first (the first run with the check reads the dump once and stores it,
and copies the dump onto the disk; the next finds its outcome kept), then per round one
run of each, in alternating order, each timed to its exit and a following ``sync()``;
medians, the ratio and each round's ratio. Target (issue "Every backup proves the
database and the photos agree"): with at most 1.05x without. Every timed run must copy
nothing; the runs with the check must report every asset on the disk and matched.
Needs root. Results in bench/results/asset-run-N.json. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import bench_pipeline as bp  # the folder of this script is first on sys.path
import bench_scale as bs

TARGET = 1.05
SIDES = ("without", "with")
VERSION = "v1.130.0-pg14.17"


def thumbnails(files: int) -> Iterator[tuple[str, str, str]]:
    """(the original's path, type, path) of every thumbnail bench_scale.py made: file i
    is an original when i % 3 == 0, else the thumbnail (1) or preview (2) of i - i % 3."""
    for i in range(files):
        if i % 3:
            yield bs.rel_path(i - i % 3), ("thumbnail", "preview")[i % 3 - 1], bs.rel_path(i)


def write_dump(library: Path, files: int, dumps: Path) -> tuple[Path, int]:
    """The dump, stamped now, alone in ``dumps``; and its count of asset rows."""
    dumps.mkdir(parents=True, exist_ok=True)
    for old in dumps.glob("immich-db-backup-*.sql.gz"):
        old.unlink()
    originals = bp.originals_sha1(library, bs.WORK / f"library-{files}.sha1.tsv")
    path = dumps / f"immich-db-backup-{datetime.now():%Y%m%dT%H%M%S}-{VERSION}.sql.gz"
    bp.write_immich_dump(path, originals, thumbnails(files))
    return path, len(originals)


def argv_for(side: str, config: Path, mount: Path, verbose: bool = False) -> list[str]:
    rest = [*(["-v"] if verbose else []), "-c", str(config), "run", str(mount)]
    if side == "with":
        return [str(bp.CLI), *rest]
    return [str(bp.PYTHON), str(bp.VARIANT), "--without-asset-check", "--", *rest]


def checked(side: str, tag: str, sample: bp.Sample, assets: int) -> str | None:
    """The run's assets line, after the checks: it copied nothing; with the check, every
    asset on the disk and matched by its checksum; without, no check at all."""
    out = (bp.RUN_DIR / "logs" / f"{tag}.out").read_text(errors="replace")
    if sample.copied:
        raise RuntimeError(f"{tag}: a no-change run copied {sample.copied} files")
    m = re.search(r"^\s*(assets: .*)$", out, re.MULTILINE | re.IGNORECASE)
    if side == "without":
        if m:
            raise RuntimeError(f"{tag}: the run without the check printed {m.group(1)!r}")
        return None
    if not m or f"{assets} in the database, all on the disk, {assets} matched" not in m.group(1):
        raise RuntimeError(f"{tag}: not every asset found and matched:\n{out[-2000:]}")
    return m.group(1)


MARKS = {  # the -v log's lines that end each part of a run
    "scan": "library preflight:",
    "library": "the manifest on the disk is up to date",
    "assets": "immich_usb_backup.steps.assets:",
    "end": "immich_usb_backup.flow: synced",
}


def phases(tag: str) -> dict[str, float]:
    """From a run's ``-v`` log, seconds of: start to the scan's end (``scan``), then to
    the library's end (the manifest found up to date), the asset step, and the rest up
    to the closing sync (``after``)."""
    at: dict[str, datetime] = {}
    for line in (bp.RUN_DIR / "logs" / f"{tag}.err").read_text(errors="replace").splitlines():
        m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ", line)
        if not m:
            continue
        when = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")
        at.setdefault("start", when)
        for mark, text in MARKS.items():
            if text in line:
                at[mark] = when
    at.setdefault("assets", at.get("library", at["start"]))
    out, last = {}, at["start"]
    for mark, name in (("scan", "scan"), ("library", "library"), ("assets", "assets"),
                       ("end", "after")):
        out[name] = (at.get(mark, last) - last) / timedelta(seconds=1)
        last = at.get(mark, last)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description="A no-change run with the asset check against "
                                "the same run without it.")
    p.add_argument("--files", type=int, default=200_000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--cold", action="store_true", help="drop the page cache before each run")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--verbose", action="store_true",
                   help="run both sides with -v and print where each run's time went (the "
                   "scan, the library's end, the asset step, the rest)")
    bp.add_images_option(p, bs.WORK)
    args = p.parse_args()
    if min(args.files, args.rounds) < 1:
        p.error("--files and --rounds must be positive")
    if os.geteuid() != 0:
        print("bench: run as root: sudo .venv/bin/python bench/bench_asset_run.py",
              file=sys.stderr)
        return 2
    bp.compile_as_installed()
    bs.WORK.mkdir(parents=True, exist_ok=True)
    args.images.mkdir(parents=True, exist_ok=True)
    library = bs.build_library(args.files, args.seed)
    bp.RUN_DIR = bs.WORK / "run"
    shutil.rmtree(bp.RUN_DIR, ignore_errors=True)
    (bp.RUN_DIR / "logs").mkdir(parents=True)
    state = bs.WORK / f"state-{args.files}"  # bench_scale.py's: it belongs with the mirror
    dump, assets = write_dump(library, args.files, bs.WORK / f"dumps-{args.files}")
    print(f"dump: {dump} ({assets} assets, {dump.stat().st_size / 1e6:.1f} MB)")
    config = bp.RUN_DIR / "config.toml"
    config.write_text(f'[immich]\nupload_location = "{library}"\n\n[database]\nenabled = '
                      f'true\ndumps_dir = "{dump.parent}"\n\n[config_backup]\nenabled = '
                      f'false\n\n[state]\ndir = "{state}"\n')
    disk = bp.Disk("SCALE", args.images / f"disk-{args.files}.img", bs.WORK / "mnt")
    try:
        disk = bs.no_change_disk(args.files, config, state, args.images)
        line = None
        for n, side in enumerate(("with", "with", "without")):  # the first reads the dump
            tag = f"warm-up{n}-{side}"
            s = bp.run_once(argv_for(side, config, disk.mount), tag, drop_caches=False)
            if n:  # the first copied the new dump onto the disk
                line = checked(side, tag, s, assets) or line
            print(f"warm-up {side}: {s.seconds:.2f} s")
        samples: dict[str, list[bp.Sample]] = {side: [] for side in SIDES}
        pss: dict[str, list[float]] = {side: [] for side in SIDES}
        parts: dict[str, list[dict[str, float]]] = {side: [] for side in SIDES}
        for n in range(args.rounds):
            order = SIDES if n % 2 == 0 else SIDES[::-1]
            for side in order:
                tag = f"r{n}-{side}"
                with bs.TreeMemory() as memory:
                    s = bp.run_once(argv_for(side, config, disk.mount, args.verbose), tag,
                                    drop_caches=args.cold)
                line = checked(side, tag, s, assets) or line
                samples[side].append(s)
                pss[side].append(memory.peak_kib / 1024)
                where = ""
                if args.verbose:
                    parts[side].append(phases(tag))
                    where = " (" + ", ".join(f"{k} {v:.2f}" for k, v in
                                             parts[side][-1].items()) + ")"
                print(f"round {n + 1} {side:<7}: {s.seconds:.2f} s, all its processes "
                      f"{pss[side][-1]:.1f} MiB (PSS){where}")
        med = {side: statistics.median(s.seconds for s in v) for side, v in samples.items()}
        ratio = med["with"] / med["without"]
        per_round = [w.seconds / o.seconds
                     for o, w in zip(samples["without"], samples["with"], strict=True)]
        print(f"\n{args.files} files, {assets} assets, no change, medians of {args.rounds} "
              f"rounds ({'cold' if args.cold else 'warm'}):")
        print(f"  without the asset check {med['without']:.2f} s, with {med['with']:.2f} s, "
              f"ratio {ratio:.3f} (target <= {TARGET:.2f}: "
              f"{'PASS' if ratio <= TARGET else 'OVER'})")
        print(f"  ratio of each round: {', '.join(f'{x:.3f}' for x in per_round)} (median "
              f"{statistics.median(per_round):.3f})")
        print(f"  all processes, peak PSS: without {max(pss['without']):.1f} MiB, with "
              f"{max(pss['with']):.1f} MiB")
        for side in SIDES if args.verbose else ():
            print(f"  {side}, medians from the -v logs: " + ", ".join(
                f"{k} {statistics.median(x[k] for x in parts[side]):.2f} s"
                for k in parts[side][0]))
        print(f"  {line}")
        out = bp.REPO / "bench" / "results" / f"asset-run-{args.files}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({
            "finished_at": datetime.now().astimezone().isoformat(timespec="seconds"),
            "files": args.files, "assets": assets, "cold": args.cold, "medians_s": med,
            "ratio": ratio, "round_ratios": per_round, "target": TARGET,
            "samples_s": {k: [s.seconds for s in v] for k, v in samples.items()},
            "tree_pss_mib": pss, "phases_s": parts if args.verbose else None, "line": line,
            "kernel": os.uname().release}, indent=2) + "\n")
        print(f"\nresults: {out}; logs: {bp.RUN_DIR / 'logs'}")
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        for proc in bp.RUNNING:
            bp.stop(proc)
        bp.teardown(disk)


if __name__ == "__main__":
    sys.exit(main())
