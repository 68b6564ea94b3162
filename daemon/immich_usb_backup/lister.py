"""Folder listings for the scan, read ahead by a helper process.

The scan compares a folder of the source with the same folder of the mirror, one folder
at a time. Reading a folder (its entries, and each file's size and time) is mostly
waiting: on exFAT through FUSE every file costs a round trip to the FUSE daemon, and a
cold server disk costs seeks. ``Lister`` hands the folders the walk will visit next to
a helper process, which lists them while the walk compares; answers come back in the
order asked.

Why a process and not threads: a listing is thousands of short system calls, each
dropping and taking back the interpreter lock. With the walk's comparison holding that
lock, listing threads wait for it after every call, and on a 2-core machine threads
made the scan slower than no look-ahead at all (measured: bench/README.md). A process
has its own lock. It only reads, gets nothing but folder paths, and ends when the scan
does (or when its input closes, if the scan's process is killed).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import subprocess
import sys
from collections import deque
from pathlib import Path

# One folder entry: (name, kind, size, mtime_ns); kind is "file", "dir", "link" or
# "other"; size and time are 0 but for files. A plain tuple: the scan makes one per file
# on each side and the helper sends them (a frozen dataclass took three times as long to
# make, a named tuple five times as long to send).
Entry = tuple[str, str, int, int]


def list_dir(path: str) -> list[Entry]:
    """The entries of one folder, links not followed. Files first: they are most."""
    out: list[Entry] = []
    add = out.append
    with os.scandir(path) as it:
        for e in it:
            if e.is_file(follow_symlinks=False):
                st = e.stat(follow_symlinks=False)
                add((e.name, "file", st.st_size, st.st_mtime_ns))
            elif e.is_dir(follow_symlinks=False):
                add((e.name, "dir", 0, 0))
            elif e.is_symlink():
                add((e.name, "link", 0, 0))
            else:
                add((e.name, "other", 0, 0))
    return out


Listing = list[Entry] | OSError

log = logging.getLogger(__name__)


class _Helper:
    """One helper process and the folders asked of it whose answers are not read yet."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.asked: deque[str] = deque()  # in the order asked (and answered)

    def ask(self, paths: list[str]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"".join([os.fsencode(p) + b"\0" for p in paths]))
        self.proc.stdin.flush()
        self.asked.extend(paths)

    def answer(self) -> Listing:
        assert self.proc.stdout is not None
        answer: Listing = pickle.load(self.proc.stdout)  # noqa: S301 - our own child
        return answer

    def close(self) -> None:
        """End it (it may be in the middle of a listing nobody wants now)."""
        if self.proc.returncode is None:
            self.proc.kill()
            self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                if pipe is not None:
                    pipe.close()


class Lister:
    """Listings of folders, read ahead in ``helpers`` helper processes.

    ``want(paths)`` asks for folders in the order the walk will get them, spread over
    the helpers in turn (at most ``limit`` listings in flight or held, so memory stays
    bounded whatever the tree); ``get(path)`` returns a folder's entries, from a helper
    when it was asked for, else read here. An error reading a folder is raised by
    ``get``, as ``list_dir`` would.

    Two helpers for one side pay off on a FUSE file system: its daemon answers one
    request at a time, and while it works on one helper's, the other's next request is
    on its way. The helpers start once more than ``start_after`` folders were asked for
    (a small tree is read before a process would have started). If one cannot start, or
    ends early, its folders are read here: slower, never different.
    """

    def __init__(self, limit: int = 64, start_after: int = 64, helpers: int = 1) -> None:
        self.limit = limit
        self.start_after = start_after
        self.wanted_helpers = helpers
        self.helpers: list[_Helper] = []
        self.started = False
        self.owner: dict[str, _Helper] = {}  # asked for, answer not read yet
        self.answers: dict[str, Listing] = {}  # read, not got yet
        self.turn = 0

    def want(self, paths: list[str]) -> None:
        if not self.started:
            if self.start_after > 0:
                self.start_after -= len(paths)
                return
            self.started = True
            for _ in range(self.wanted_helpers):
                proc = _start_helper()
                if proc is not None:
                    self.helpers.append(_Helper(proc))
        if not self.helpers:
            return
        owner, answers = self.owner, self.answers
        new = [p for p in paths if p not in owner and p not in answers]
        del new[max(self.limit - len(owner) - len(answers), 0):]
        if not new:
            return
        count = len(self.helpers)
        for n, helper in enumerate(list(self.helpers)):
            share = new[(n - self.turn) % count::count]
            if not share:
                continue
            try:
                helper.ask(share)
            except OSError:
                self._lost(helper)
                continue
            for path in share:
                owner[path] = helper
        self.turn = (self.turn + len(new)) % count

    def get(self, path: str) -> list[Entry]:
        listing = self.answers.pop(path, None)
        if listing is None:
            helper = self.owner.get(path)
            if helper is not None:
                listing = self._read_until(helper, path)
        if listing is None:
            return list_dir(path)
        if isinstance(listing, OSError):
            raise listing
        return listing

    def _read_until(self, helper: _Helper, path: str) -> Listing | None:
        """Read the helper's answers in order up to ``path``'s, keeping the others."""
        while True:
            done = helper.asked.popleft()
            del self.owner[done]
            try:
                answer = helper.answer()
            except (EOFError, OSError, pickle.UnpicklingError):
                self._lost(helper)
                return None
            if done == path:
                return answer
            self.answers[done] = answer

    def _lost(self, helper: _Helper) -> None:
        """A helper has gone (killed, out of memory): its folders are read here."""
        log.warning("a folder listing helper ended early; reading its folders directly")
        for path in helper.asked:
            self.owner.pop(path, None)
        helper.asked.clear()
        helper.close()
        self.helpers.remove(helper)

    def close(self) -> None:
        """End the helpers."""
        for helper in self.helpers:
            helper.close()
        self.helpers.clear()


def _start_helper() -> subprocess.Popen[bytes] | None:
    """The helper process (this module run by the same Python), or None if it cannot
    start."""
    # the helper itself imports only this module: execute (asyncio) loaded here, not there
    from immich_usb_backup.execute import child_options  # noqa: PLC0415

    package_parent = str(Path(__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH")) if p)
    try:
        return subprocess.Popen(
            [sys.executable, "-s", "-m", "immich_usb_backup.lister"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": path}, **child_options(),
        )
    except OSError as exc:
        log.warning("cannot start the folder listing helper (%s); reading folders directly",
                    exc)
        return None


def serve() -> None:
    """The helper: list each folder named on standard input (NUL-terminated paths), in
    order, and write each listing (or the OSError) to standard output, pickled."""
    out = sys.stdout.buffer
    pending = b""
    while chunk := os.read(0, 1 << 16):
        *paths, pending = (pending + chunk).split(b"\0")
        for raw in paths:
            listing: Listing
            try:
                listing = list_dir(os.fsdecode(raw))
            except OSError as exc:
                listing = exc
            pickle.dump(listing, out, protocol=pickle.HIGHEST_PROTOCOL)
            out.flush()


if __name__ == "__main__":
    # run as ``python -m immich_usb_backup.lister``: pickle must name the Entry class by
    # its module, not ``__main__``
    from immich_usb_backup.lister import serve as _serve

    with contextlib.suppress(BrokenPipeError, KeyboardInterrupt):
        _serve()
