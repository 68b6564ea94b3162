"""Benchmark: start-up. How long the command line takes before a run touches anything,
and how long ``status`` and ``history`` take, against the bare interpreter.

- **to the first file system call of a run**: ``immich-usb-backup run TARGET`` is
  started (as ``python -m immich_usb_backup`` does, with an audit hook) and the time
  from starting it to its first open of a file in its state dir (the lock, taken before
  it looks at anything else) is taken. TARGET does not exist, so the run is refused
  right after (and recorded in a throwaway state dir).
- ``status`` and ``history`` (on a history of ``--runs`` records), wall time.
- ``python -c pass``, the bare interpreter, wall time, for scale.
- Whether Apprise was imported (``-X importtime``): it must not be, with no
  notification URL configured.

The package's modules are compiled to bytecode first, as an installed package has them.
Medians of ``--rounds``. Prints the targets of the issue "A million files at rsync's
speed": start-up to the first file system call at most 0.3 s; status and history under
0.3 s. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_pipeline as bp

REPO = Path(__file__).resolve().parent.parent
PYTHON = REPO / ".venv" / "bin" / "python"


def wall(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   check=False)
    return time.perf_counter() - start


# Run the CLI as ``python -m immich_usb_backup`` would, with an audit hook that writes
# the wall clock to stderr at the first file the run opens under WATCHED (its state dir:
# the lock, before it looks at the disk).
PROBE = """
import os, runpy, sys, time
watched = os.environ["IUB_BENCH_WATCHED"]
def hook(event, args):
    if event == "open" and str(args[0]).startswith(watched) and not hook.done:
        hook.done = True
        os.write(2, b"IUB-FIRST-OPEN %.6f\\n" % time.time())
hook.done = False
sys.addaudithook(hook)
sys.argv = ["immich-usb-backup", *sys.argv[1:]]
runpy.run_module("immich_usb_backup", run_name="__main__")
"""


def to_first_open(args: list[str], watched: Path, env: dict[str, str]) -> float:
    """Seconds from starting the command to its first open of a file under ``watched``."""
    start = time.time()
    err = subprocess.run([str(PYTHON), "-c", PROBE, *args], capture_output=True,
                         env={**env, "IUB_BENCH_WATCHED": str(watched)}, check=False).stderr
    for line in err.decode(errors="replace").splitlines():
        if line.startswith("IUB-FIRST-OPEN "):
            return float(line.split()[1]) - start
    raise SystemExit(f"bench: the run opened nothing under {watched}: {err[-300:]!r}")


def main() -> int:
    p = argparse.ArgumentParser(description="Start-up times of the command line.")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--runs", type=int, default=2000, help="records in the history")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="iub-bench-startup-"))
    try:
        library = work / "library"
        for top in ("upload", "library", "thumbs", "profile", "backups"):
            (library / top).mkdir(parents=True)
            (library / top / ".immich").write_bytes(b"")
        state = work / "state"
        state.mkdir()
        config = work / "config.toml"
        config.write_text(f'[immich]\nupload_location = "{library}"\n\n[database]\n'
                          f'enabled = false\n\n[state]\ndir = "{state}"\n')
        bp.compile_as_installed()  # as installed (pip, Nix): not compiled at every start
        env = dict(os.environ)
        cli = [str(PYTHON), "-m", "immich_usb_backup", "-c", str(config)]
        target = str(work / "no-such-disk")
        run = [*cli, "run", target]
        for _ in range(3):  # three real records, repeated into a history of --runs
            subprocess.run(run, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, check=False)
        history = state / "history.jsonl"
        lines = history.read_text().splitlines()
        history.write_text("\n".join(lines[i % len(lines)] for i in range(args.runs)) + "\n")
        imports = subprocess.run([str(PYTHON), "-X", "importtime", *cli[1:], "run", target],
                                 env=env, capture_output=True, text=True, check=False).stderr
        apprise = any(" apprise" in line for line in imports.splitlines()
                      if line.startswith("import time:"))
        samples: dict[str, list[float]] = {"first_stat": [], "status": [], "history": [],
                                           "python": []}
        for _ in range(args.rounds):
            samples["first_stat"].append(to_first_open(run[3:], state, env))
            samples["status"].append(wall([*cli, "status"], env))
            samples["history"].append(wall([*cli, "history"], env))
            samples["python"].append(wall([str(PYTHON), "-c", "pass"], env))
        med = {k: statistics.median(v) for k, v in samples.items()}
        print(f"start-up, medians of {args.rounds} rounds (history of {args.runs} records):")
        print(f"  python -c pass                  {med['python']:.3f} s (the bare interpreter)")
        for key, label in (("first_stat", "run: start to its first open"),
                           ("status", "status"), ("history", "history")):
            verdict = "PASS" if med[key] <= 0.3 else "OVER"
            print(f"  {label:<31} {med[key]:.3f} s ({med[key] / med['python']:.1f}x bare "
                  f"python; target <= 0.300 s: {verdict})")
        print(f"  Apprise imported by a run without notification URLs: "
              f"{'yes (OVER)' if apprise else 'no (PASS)'}")
        out = REPO / "bench" / "results" / "startup.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"medians": med, "samples": samples,
                                   "apprise_imported": apprise}, indent=2) + "\n")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
