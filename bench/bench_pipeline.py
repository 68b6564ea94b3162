"""Benchmark: the immich-usb-backup pipeline against a bare rsync, onto exFAT.

Builds (and caches) a synthetic Immich upload location, then per round makes two fresh
exFAT disk images (mkfs.exfat, loop device, mount.exfat-fuse) and measures on the same
data: a full copy (bare rsync with the product's flags vs ``immich-usb-backup run``) and a
no-change second run (both again). Prints a table of seconds and ratios against the
targets and writes bench/results/latest.json. Needs root. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from immich_usb_backup.rsync import base_args as rsync_base_args

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / ".venv" / "bin" / "immich-usb-backup"
RESULTS = REPO / "bench" / "results" / "latest.json"
WORK = Path("/var/tmp/iub-bench")
LIBRARY = WORK / "library"
STAMP = WORK / "library.stamp.json"  # outside the library, so it is not mirrored
ASSET_SUMS = WORK / "library.sha1.tsv"  # the originals' SHA-1s, for the dump's asset rows
RUN_DIR = WORK / "run"  # config, state dir, logs of the last run
GENERATOR = 1  # bump when the layout below changes: invalidates the cached library
TOP_FOLDERS = ("upload", "thumbs", "profile", "backups")
KIB, MIB, GIB = 1024, 1024**2, 1024**3
TOOLS = ("bare", "pipeline")
# what the pipeline is measured against (--against): the bare tool, or the product with
# one piece left out (bench/variant.py), and the targets of each
AGAINST: dict[str, tuple[str, dict[str, float | None]]] = {
    "rsync": ("bare rsync", {"full copy": 1.05, "no change": 1.20}),
    "without-sha1": ("without SHA-1", {"full copy": 1.03, "no change": None}),
}
TARGETS: dict[str, float | None] = AGAINST["rsync"][1]
VARIANT = REPO / "bench" / "variant.py"
PYTHON = REPO / ".venv" / "bin" / "python"
GNU_TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None


@dataclass
class Sample:
    seconds: float  # until the process exited and a following sync() returned
    peak_rss_kib: int | None  # largest process of the tree (None without GNU time)
    copied: int | None = None  # files the pipeline says it copied


@dataclass
class Disk:
    name: str
    image: Path
    mount: Path
    device: str = ""

    @property
    def library(self) -> Path:
        return self.mount / "immich-server-backups" / "library"


# the synthetic library --------------------------------------------------------------

def build_library(files: int, gb: float, seed: int) -> dict[str, Any]:
    """Generate the library unless the cached one was made with the same parameters."""
    params = {"files": files, "gb": gb, "seed": seed, "generator": GENERATOR}
    if LIBRARY.is_dir() and STAMP.is_file():
        stamp: dict[str, Any] = json.loads(STAMP.read_text())
        if stamp.get("params") == params:
            print(f"library: cached at {LIBRARY} ({stamp['files']} files, "
                  f"{stamp['bytes'] / 1e9:.2f} GB)")
            return stamp
    print(f"library: generating {files} files, {gb} GB at {LIBRARY} (cached for next time)")
    STAMP.unlink(missing_ok=True)
    shutil.rmtree(LIBRARY, ignore_errors=True)
    rng = random.Random(seed)  # noqa: S311 - a reproducible library, not secrets

    def new_id() -> str:
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    def asset(top: str, user: str, suffix: str) -> str:
        aid = new_id()  # Immich's layout: <top>/<user>/<2 chars>/<2 chars>/<asset id>...
        return f"{top}/{user}/{aid[:2]}/{aid[2:4]}/{aid}{suffix}"

    users = [new_id() for _ in range(3)]
    n_video, n_photo = max(1, files // 1000), max(1, files // 50)
    n_small = max(0, files - n_video - n_photo - len(users) - len(TOP_FOLDERS) - 1)
    small = [(f"profile/{u}/{new_id()}.jpg", rng.randint(5 * KIB, 80 * KIB)) for u in users]
    for _ in range(n_small):  # thumbnails and previews, and XMP sidecars next to originals
        user, size = rng.choice(users), rng.randint(5 * KIB, 80 * KIB)
        if rng.random() < 0.75:
            small.append((asset("thumbs", user, rng.choice(("-thumbnail.webp",
                                                            "-preview.jpeg"))), size))
        else:
            small.append((asset("upload", user, ".jpg.xmp"), size))
    large = [(asset("upload", rng.choice(users), ".jpg"), rng.randint(2 * MIB, 4 * MIB))
             for _ in range(n_photo)]
    large += [(asset("upload", rng.choice(users), ".mp4"), rng.randint(10 * MIB, 30 * MIB))
              for _ in range(n_video)]
    # photos and videos are scaled together so the total matches --gb
    small_bytes, large_bytes = sum(s for _, s in small), sum(s for _, s in large)
    factor = max(0.1, (gb * 1e9 - small_bytes) / large_bytes)
    large = [(rel, int(size * factor)) for rel, size in large]
    for top in TOP_FOLDERS:
        (LIBRARY / top).mkdir(parents=True, exist_ok=True)
        (LIBRARY / top / ".immich").write_bytes(b"")
    entries = small + large
    for i, (rel, size) in enumerate(entries, 1):
        path = LIBRARY / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(size))  # incompressible, seeded, fast
        if i % 5000 == 0:
            print(f"  {i}/{len(entries)} files")
    refresh_dump()
    count, total = tree_stats(LIBRARY)
    stamp = {"params": params, "files": count, "bytes": total,
             "generated_at": datetime.now().astimezone().isoformat(timespec="seconds")}
    STAMP.write_text(json.dumps(stamp, indent=2) + "\n")  # last: a half-made library is redone
    return stamp


def refresh_dump() -> str:
    """Replace the database dump with one stamped now (the pipeline flags old dumps): an
    Immich dump with an asset row for each original (photos and videos under upload/),
    Immich's checksum its SHA-1, so that the run's asset check finds them all."""
    backups = LIBRARY / "backups"
    for old in backups.glob("immich-db-backup-*.sql.gz"):
        old.unlink()
    name = f"immich-db-backup-{datetime.now():%Y%m%dT%H%M%S}-v1.130.0-pg14.17.sql.gz"
    write_immich_dump(backups / name, originals_sha1(LIBRARY, ASSET_SUMS))
    return name


def originals_sha1(library: Path, cache: Path) -> list[tuple[str, str]]:
    """(path in the upload location, SHA-1 hex) of every original under ``upload/``
    (not the XMP sidecars), in a stable order; kept in ``cache`` by size and time, so a
    file is read again only when it changed."""
    known: dict[str, tuple[str, str]] = {}
    if cache.is_file():
        for line in cache.read_text().splitlines():
            rel, stamp, sha1 = line.split("\t")
            known[rel] = (stamp, sha1)
    found = []
    for dirpath, dirs, names in os.walk(library / "upload"):
        dirs.sort()
        for name in sorted(names):
            if not name.endswith((".jpg", ".mp4")):
                continue
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            rel, stamp = os.path.relpath(path, library), f"{st.st_size}:{st.st_mtime_ns}"
            if known.get(rel, ("", ""))[0] != stamp:
                h = hashlib.sha1()  # noqa: S324 - Immich's checksum is a SHA-1
                with open(path, "rb") as f:
                    while block := f.read(1 << 20):
                        h.update(block)
                known[rel] = (stamp, h.hexdigest())
            found.append((rel, known[rel][1]))
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text("".join(f"{rel}\t{known[rel][0]}\t{sha1}\n" for rel, sha1 in found))
    return found


def write_immich_dump(path: Path, originals: Iterable[tuple[str, str]],
                      files: Iterable[tuple[str, str, str]] = ()) -> None:
    """A gzip'd ``pg_dump`` text of Immich's database as the asset check reads it (the
    shape of tools/demo.py's sample): an ``asset`` row for each (path, SHA-1 hex) of
    ``originals`` (``originalPath`` = /data/<path>, Immich's media location in docker),
    and an ``asset_file`` row for each (asset's path, type, path) of ``files``."""
    def asset_id(rel: str) -> str:
        return str(uuid.UUID(hashlib.sha256(rel.encode()).hexdigest()[:32]))

    def chunks() -> Iterator[str]:
        yield ("--\n-- PostgreSQL database dump\n--\n\nSET statement_timeout = 0;\n"
               "SET client_encoding = 'UTF8';\n"
               'CREATE TABLE public.asset (id uuid PRIMARY KEY, "originalPath" text, '
               'checksum bytea, "deletedAt" timestamptz, "isOffline" boolean);\n'
               'COPY public.asset (id, "originalPath", checksum, "deletedAt", "isOffline") '
               "FROM stdin;\n")
        batch = []
        for rel, sha1 in originals:
            batch.append(f"{asset_id(rel)}\t/data/{rel}\t\\\\x{sha1}\t\\N\tf\n")
            if len(batch) == 5000:
                yield "".join(batch)
                batch.clear()
        yield "".join(batch) + "\\.\n\n"
        batch.clear()
        yield 'COPY public.asset_file (id, "assetId", type, path) FROM stdin;\n'
        for owner, kind, rel in files:
            batch.append(f"{asset_id(rel)}\t{asset_id(owner)}\t{kind}\t/data/{rel}\n")
            if len(batch) == 5000:
                yield "".join(batch)
                batch.clear()
        yield "".join(batch) + "\\.\n\n--\n-- PostgreSQL database dump complete\n--\n"

    with gzip.GzipFile(path, "wb", mtime=0) as f:
        for text in chunks():
            f.write(text.encode())


def tree_stats(root: Path) -> tuple[int, int]:
    """Regular files under ``root`` and their total size."""
    count = total = 0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            count += 1
            total += os.lstat(os.path.join(dirpath, name)).st_size
    return count, total


def read_all(root: Path) -> None:
    """Read every file under ``root`` once, so that it is in the page cache."""
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            with open(os.path.join(dirpath, name), "rb") as f:
                while f.read(1 << 20):
                    pass


# disks --------------------------------------------------------------------------------

def compile_as_installed() -> None:
    """Compile the package to bytecode once, as pip and the Nix package do. Where
    PYTHONDONTWRITEBYTECODE is set (these machines set it), every run would compile
    it again: 0.15-0.25 s a start, and again in each folder listing helper."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "daemon")],
                   check=True)


def add_images_option(p: argparse.ArgumentParser, default: Path) -> None:
    """``--images DIR``: where a benchmark's disk images live."""
    p.add_argument("--images", type=Path, default=default, metavar="DIR",
                   help=f"where the disk images live (default {default}); a folder in "
                   "/dev/shm keeps them in memory, out of reach of the VM's own disk")


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


def is_mounted(path: Path) -> bool:
    return any(line.split()[1] == str(path)
               for line in Path("/proc/mounts").read_text().splitlines())


def make_disk(disk: Disk, size: int, cluster: str | None = None) -> None:
    """A fresh sparse image, mkfs.exfat (with ``cluster`` size, e.g. "4K", if given), a
    loop device, mounted with exfat-fuse, the marker folder made."""
    disk.image.unlink(missing_ok=True)
    with open(disk.image, "wb") as f:
        f.truncate(size)
    sh("mkfs.exfat", *(["-c", cluster] if cluster else []), "-L", disk.name, str(disk.image))
    attach(disk)
    (disk.mount / "immich-server-backups").mkdir()


def attach(disk: Disk) -> None:
    """A loop device on the disk's image, mounted with exfat-fuse."""
    disk.device = sh("losetup", "-f", "--show", str(disk.image))
    disk.mount.mkdir(parents=True, exist_ok=True)
    sh("mount.exfat-fuse", disk.device, str(disk.mount))


def teardown(disk: Disk) -> None:
    """Unmount, wait for exfat-fuse to finish (it writes after umount returns), detach."""
    for attempt in range(60):
        if not is_mounted(disk.mount):
            break
        lazy = ["-l"] if attempt == 50 else []
        subprocess.run(["umount", *lazy, str(disk.mount)], check=False, capture_output=True)
        time.sleep(0.1)
    for _ in range(200):
        if not is_mounted(disk.mount):
            break
        time.sleep(0.05)
    # our own leftovers too (an earlier run killed hard): every loop device on our image
    devices = {disk.device} if disk.device else set()
    if disk.image.exists():
        out = subprocess.run(["losetup", "-j", str(disk.image)], check=False,
                             capture_output=True, text=True).stdout
        devices |= {line.split(":", 1)[0] for line in out.splitlines() if line}
    for device in devices:
        subprocess.run(["losetup", "-d", device], check=False, capture_output=True)
        bound = Path("/sys/block") / Path(device).name / "loop"
        for _ in range(200):  # until the last user is gone and the device is detached
            if not bound.exists():
                break
            time.sleep(0.05)
    disk.device = ""


# measuring ----------------------------------------------------------------------------

RUNNING: list[subprocess.Popen[bytes]] = []  # stopped in the finally on Ctrl-C


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group we started (the CLI then ends its run), SIGKILL if slow."""
    for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
            return


def run_once(argv: list[str], tag: str, drop_caches: bool) -> Sample:
    """Run ``argv``, time it to the end of a following sync(), and take its peak RSS.

    The peak RSS comes from GNU time (``%M``: the largest process of the tree it ran).
    Not from this process's wait4: a child forked from this Python process would carry
    the benchmark's own RSS into that figure.
    """
    if drop_caches:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    logs = RUN_DIR / "logs"
    out, err, rss = (logs / f"{tag}.{ext}" for ext in ("out", "err", "rss"))
    wrap = [GNU_TIME, "-f", "%M", "-o", str(rss)] if GNU_TIME else []
    with open(out, "wb") as out_f, open(err, "wb") as err_f:
        t0 = time.perf_counter()
        proc = subprocess.Popen([*wrap, *argv], stdout=out_f, stderr=err_f,
                                start_new_session=True)  # its own group: stopped as one
        RUNNING.append(proc)
        proc.wait()
        os.sync()  # the pipeline syncs before it exits; make the bare rsync pay it too
        seconds = time.perf_counter() - t0
        RUNNING.remove(proc)
    stdout = out.read_text(errors="replace")
    if proc.returncode != 0:
        tail = err.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{tag}: exit status {proc.returncode}\n{stdout[-2000:]}\n{tail}")
    m = re.search(r"copied:\s+(\d+) files?", stdout)
    peak = int(rss.read_text().split()[-1]) if GNU_TIME else None
    return Sample(seconds, peak, int(m.group(1)) if m else None)


def argv_for(tool: str, disk: Disk, config: Path, against: str = "rsync") -> list[str]:
    """The command of ``tool``: the pipeline, or what it is measured against (bare rsync,
    or with ``against`` the product with a piece left out, through bench/variant.py)."""
    if tool == "bare" and against == "rsync":
        return [*rsync_base_args(), "--recursive", "--delete", f"{LIBRARY}/", f"{disk.library}/"]
    cli = [str(CLI)] if tool == "pipeline" else [str(PYTHON), str(VARIANT), f"--{against}", "--"]
    return [*cli, "-c", str(config), "run", str(disk.mount)]


def measure(rounds: int, repeats: int, disks: list[Disk], disk_size: int, config: Path,
            source: tuple[int, int], warm: bool = False, against: str = "rsync"
            ) -> list[dict[str, Any]]:
    """Per round, on one disk image so that both tools meet the same disk:

    - full copy: for each tool (alternating who goes first), a freshly formatted disk,
      caches dropped (kept with ``warm``: the library was read just before), the
      pipeline's hash cache removed (so its manifest hashes every
      file, as on a first backup), the whole library copied; the mirror is checked;
      with ``against`` a variant of the product, both sides are pipelines;
    - no change: on the disk the last full copy left (a complete mirror, the same for
      both: ``library/``), one untimed warm-up per tool, then ``repeats`` pairs of timed
      runs, the two tools interleaved (and alternating who goes first in each pair) so
      that both see the same caches.
    """
    disk = disks[0]
    done: list[dict[str, Any]] = []
    for r in range(rounds):
        order = TOOLS if r % 2 == 0 else TOOLS[::-1]  # alternate who goes first
        print(f"round {r + 1}/{rounds}: order {' then '.join(order)}")
        result: dict[str, Any] = {"order": list(order), "full copy": {}, "no change": {}}
        for i, tool in enumerate(order):
            make_disk(disk, disk_size)
            for f in (RUN_DIR / "state").glob("hashes.sqlite*"):
                f.unlink()  # a true first backup: every file hashed for the manifest
            s = run_once(argv_for(tool, disk, config, against), f"r{r}-full-{tool}",
                         not warm)
            result["full copy"][tool] = asdict(s)
            print(f"  full copy  {tool:<8} {s.seconds:8.2f} s")
            mirrored = tree_stats(disk.library)
            if mirrored != source:
                raise RuntimeError(f"{tool}: the mirror holds {mirrored} (files, bytes), "
                                   f"the source {source}")
            if i < len(order) - 1:
                teardown(disk)
        samples: dict[str, list[Sample]] = {tool: [] for tool in TOOLS}
        for tool in order:
            run_once(argv_for(tool, disk, config, against), f"r{r}-warm-{tool}", False)
        for i in range(repeats):
            for tool in (order if i % 2 == 0 else order[::-1]):
                samples[tool].append(
                    run_once(argv_for(tool, disk, config, against), f"r{r}-same{i}-{tool}",
                             False))
        for tool in order:
            if any(s.copied for s in samples[tool]):
                raise RuntimeError(f"{tool}: a no-change run copied files: {samples[tool]}")
            med = statistics.median(s.seconds for s in samples[tool])
            result["no change"][tool] = {"seconds": med,
                                         "runs": [asdict(s) for s in samples[tool]]}
            print(f"  no change  {tool:<8} {med:8.2f} s (median of {repeats}, interleaved)")
        teardown(disk)
        done.append(result)
    return done


# reporting ------------------------------------------------------------------------------

def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over rounds (a no-change round counts with its median), ratios, peak RSS."""
    rows = []
    for scenario, target in TARGETS.items():
        bare, pipe = (statistics.median(r[scenario][tool]["seconds"] for r in rounds)
                      for tool in TOOLS)
        per_round = [round(r[scenario]["pipeline"]["seconds"] / r[scenario]["bare"]["seconds"],
                           3) for r in rounds]
        result = "info" if target is None else "PASS" if pipe / bare <= target else "OVER"
        rows.append({"scenario": scenario, "bare_s": round(bare, 3), "pipeline_s": round(pipe, 3),
                     "ratio": round(pipe / bare, 3), "target": target, "result": result,
                     "round_ratios": per_round})
    runs = {tool: [s for r in rounds for s in [r["full copy"][tool],
                                               *r["no change"][tool]["runs"]]]
            for tool in TOOLS}
    rss = {f"{tool}_peak_rss_kib": max((s["peak_rss_kib"] or 0) for s in runs[tool]) or None
           for tool in TOOLS}
    return {"rows": rows, "rss": rss}


def report(summary: dict[str, Any], rounds: int, repeats: int, lib: dict[str, Any],
           warm: bool, against: str = "rsync") -> None:
    label = AGAINST[against][0]
    print(f"\nlibrary: {lib['files']} files, {lib['bytes'] / 1e9:.2f} GB; {rounds} round(s), "
          "order alternated, medians over rounds")
    caches = ("library read just before, page cache kept" if warm
              else "page cache dropped before each run")
    print(f"full copy: {caches}; no change: one untimed warm-up "
          f"run, then the median of {repeats} timed runs.")
    print("every time runs until the process exits and a following sync() returns.\n")
    print(f"{'scenario':<10} {label + ' s':>15} {'pipeline s':>11} {'ratio':>7} "
          f"{'target':>8}  result")
    for row in summary["rows"]:
        target = "-" if row["target"] is None else "<= " + format(row["target"], ".2f")
        print(f"{row['scenario']:<10} {row['bare_s']:>15.2f} {row['pipeline_s']:>11.2f} "
              f"{row['ratio']:>7.3f} {target:>8}  {row['result']}")
    for row in summary["rows"]:
        ratios = ", ".join(f"{x:.3f}" for x in row["round_ratios"])
        print(f"  {row['scenario']}: ratio of each round {ratios} (median "
              f"{statistics.median(row['round_ratios']):.3f})")
    bare, pipe = (summary["rss"][f"{tool}_peak_rss_kib"] for tool in TOOLS)
    if bare and pipe:
        print(f"\npeak RSS (GNU time, largest process of each tree): {label} "
              f"{bare / 1024:.1f} MiB; pipeline {pipe / 1024:.1f} MiB (the Python CLI or "
              "its rsync, whichever is larger)")
    else:
        print("\npeak RSS: not measured (/usr/bin/time is not installed: apt install time)")


def write_config() -> Path:
    state = RUN_DIR / "state"
    state.mkdir(parents=True)
    config = RUN_DIR / "config.toml"
    config.write_text(f'[immich]\nupload_location = "{LIBRARY}"\n\n[database]\nenabled = true'
                      '\n\n[config_backup]\nenabled = false\n\n'
                      f'[state]\ndir = "{state}"\n')
    return config


def _terminate(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    p = argparse.ArgumentParser(description="Time the backup pipeline against bare rsync.")
    p.add_argument("--files", type=int, help="files in the library (default 20000)")
    p.add_argument("--gb", type=float, help="library size in GB of 10^9 bytes (default 2.5)")
    p.add_argument("--small", action="store_true", help="quick check: 2000 files, 0.25 GB")
    p.add_argument("--rounds", type=int, default=2, help="measurement sets (default 2)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed no-change runs per tool and round, median taken (default 3)")
    p.add_argument("--seed", type=int, default=1, help="seed of the library generator")
    p.add_argument("--keep", action="store_true", help="keep the disk images afterwards")
    p.add_argument("--warm", action="store_true",
                   help="full copies from a warm page cache (the library read just before) "
                   "instead of dropping it")
    p.add_argument("--against", choices=sorted(AGAINST), default="rsync",
                   help="the other side: bare rsync (default), or the product without "
                   "SHA-1 (bench/variant.py --without-sha1; target of the full copy 1.03)")
    add_images_option(p, WORK)
    args = p.parse_args()
    global TARGETS  # noqa: PLW0603 - summarize() reads the targets of the chosen side
    TARGETS = AGAINST[args.against][1]
    files = args.files or (2000 if args.small else 20_000)
    gb = args.gb or (0.25 if args.small else 2.5)
    if min(files, args.rounds, args.repeats) < 1 or gb <= 0:
        p.error("--files, --gb, --rounds and --repeats must be positive")
    if os.geteuid() != 0:
        print("bench: run as root (loop devices, mounts, drop_caches): "
              "sudo .venv/bin/python bench/bench_pipeline.py", file=sys.stderr)
        return 2
    missing = [t for t in ("rsync", "mkfs.exfat", "mount.exfat-fuse", "losetup", "umount")
               if shutil.which(t) is None] + ([] if CLI.exists() else [str(CLI)])
    if missing:
        print(f"bench: not found: {', '.join(missing)}; run tools/setup", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    compile_as_installed()
    WORK.mkdir(parents=True, exist_ok=True)
    args.images.mkdir(parents=True, exist_ok=True)
    disks = [Disk(f"BENCH{x.upper()}", args.images / f"disk-{x}.img", WORK / f"mnt-{x}")
             for x in "ab"]
    try:
        for disk in disks:
            teardown(disk)  # leftovers of an interrupted run
        lib = build_library(files, gb, args.seed)
        dump = refresh_dump()
        source = tree_stats(LIBRARY)
        shutil.rmtree(RUN_DIR, ignore_errors=True)
        (RUN_DIR / "logs").mkdir(parents=True)
        config = write_config()
        disk_size = max(6 * GIB, int(source[1] * 1.5) + GIB)
        if args.warm:
            read_all(LIBRARY)  # every file read once: in the page cache for both tools
        rounds = measure(args.rounds, args.repeats, disks, disk_size, config, source, args.warm,
                         args.against)
        summary = summarize(rounds)
        report(summary, args.rounds, args.repeats, lib, args.warm, args.against)
        results = RESULTS if args.against == "rsync" else RESULTS.with_name(
            f"latest-against-{args.against}.json")
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps({
            "finished_at": datetime.now().astimezone().isoformat(timespec="seconds"),
            "library": {**lib, "files": source[0], "bytes": source[1], "dump": dump},
            "disk_image_bytes": disk_size, "warm": args.warm, "against": args.against,
            "rounds": rounds, **summary,
            "rsync": sh("rsync", "--version").splitlines()[0], "kernel": os.uname().release,
        }, indent=2) + "\n")
        print(f"\nresults: {results}; logs: {RUN_DIR / 'logs'}")
        return 0
    except KeyboardInterrupt:
        print("\nbench: interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        for proc in RUNNING:
            stop(proc)
        for disk in disks:
            teardown(disk)
            if not args.keep:
                disk.image.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
