"""SHA-256 and SHA-1 of files, streamed in large blocks; one side, or source and disk in
parallel.

A file is never held in memory: it is read into one reused buffer of ``BLOCK`` bytes at a
time, and both digests are taken in that one read: SHA-256 for the manifest, SHA-1 because
it is the checksum Immich records for each original (see docs/usage.md, "The asset check").
``hashlib`` releases the GIL while it hashes a block, so two threads (one reading the
server's copy, one the disk's) keep two cores busy.

Reading the disk's side "from the disk": right after a backup wrote a file, its bytes are
still in the kernel's page cache, and a hash of the cache proves nothing about the disk.
``drop_cache=True`` asks the kernel to drop the file's cached pages first
(``posix_fadvise(DONTNEED)``; the run syncs before it verifies, so the pages are clean
and can be dropped), and again after reading, so a long verify does not push the
server's working set out of memory. A FUSE driver reads the disk through the block
device's cache: ``drop_device_cache`` empties that, once, before a check.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

BLOCK = 1024 * 1024
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
QUEUE_DEPTH = 256  # results held between the reader threads and the consumer


class Stopped(Exception):
    """The caller asked the hashing to stop (the run was interrupted)."""


@dataclass(frozen=True)
class Hashed:
    """The SHA-256 (``digest``) and SHA-1 (``sha1``) of one file, in hex, with the size and
    time it had while it was read.

    ``digest`` and ``sha1`` are None when the file could not be read (``error`` says why)
    or changed while it was read (``error`` is ``"changed while it was read"``).
    """

    rel: str
    digest: str | None
    size: int = 0
    mtime_ns: int = 0
    error: str | None = None
    sha1: str | None = None


def _drop(fd: int) -> None:
    if hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def drop_device_cache(device: str) -> bool:
    """Ask the kernel to drop the clean cached blocks of the block device ``device``.

    A FUSE exFAT driver reads the disk through the device's own cache, which a
    per-file ``DONTNEED`` does not touch: right after a copy, the data would come back
    from memory. Call after a sync. Return False when the device cannot be opened (not
    a block device, gone); the check then reads what the kernel gives.
    """
    try:
        fd = os.open(device, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        if not stat.S_ISBLK(os.fstat(fd).st_mode):
            return False
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    except (OSError, AttributeError):
        return False
    finally:
        os.close(fd)


def sha256_file(
    path: str,
    rel: str = "",
    *,
    drop_cache: bool = False,
    on_bytes: Callable[[int], None] | None = None,
    stop: threading.Event | None = None,
    buf: bytearray | None = None,
) -> Hashed:
    """Hash ``path`` (SHA-256 and SHA-1); never raises for a file that cannot be read (see
    ``Hashed``).

    ``on_bytes`` is called with the byte count of each block read; ``stop`` is checked
    between blocks (raises ``Stopped``).
    """
    buf = buf if buf is not None else bytearray(BLOCK)
    view = memoryview(buf)
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        return Hashed(rel, None, error=exc.strerror or str(exc))
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            return Hashed(rel, None, error="not a regular file")
        if drop_cache:
            _drop(fd)
        elif before.st_size > len(buf) and hasattr(os, "posix_fadvise"):
            with contextlib.suppress(OSError):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        h = hashlib.sha256()
        h1 = hashlib.sha1()  # noqa: S324  (Immich's checksum, compared, not trusted)
        done = 0
        while True:
            if stop is not None and stop.is_set():
                raise Stopped
            n = os.readv(fd, [view])
            if not n:
                break
            block = view[:n]
            h.update(block)
            h1.update(block)
            done += n
            if on_bytes is not None:
                on_bytes(n)
            if done == before.st_size:
                break  # one read less; a file that grew or changed meanwhile shows below
        after = os.fstat(fd)
        if drop_cache:
            _drop(fd)
    except OSError as exc:
        return Hashed(rel, None, error=exc.strerror or str(exc))
    finally:
        os.close(fd)
    if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
        return Hashed(rel, None, after.st_size, after.st_mtime_ns, "changed while it was read")
    return Hashed(rel, h.hexdigest(), before.st_size, before.st_mtime_ns,
                  sha1=h1.hexdigest())


def hash_files(
    root: str,
    rels: Iterable[str],
    *,
    drop_cache: bool = False,
    on_bytes: Callable[[int], None] | None = None,
    stop: threading.Event | None = None,
) -> Iterator[Hashed]:
    """Hash ``root/rel`` for each ``rel``, one after the other, in the calling thread."""
    buf = bytearray(BLOCK)
    for rel in rels:
        yield sha256_file(os.path.join(root, rel), rel, drop_cache=drop_cache,
                          on_bytes=on_bytes, stop=stop, buf=buf)


_END = object()


def _reader(
    out: queue.Queue[object], root: str, rels: Iterable[str], drop_cache: bool,
    on_bytes: Callable[[int], None] | None, stop: threading.Event,
) -> None:
    try:
        for h in hash_files(root, rels, drop_cache=drop_cache, on_bytes=on_bytes, stop=stop):
            out.put(h)
    except BaseException as exc:
        out.put(exc)
    finally:
        out.put(_END)


def hash_both(
    source_root: str,
    disk_root: str,
    open_rels: Callable[[], Iterable[str]],
    *,
    on_bytes: Callable[[int], None] | None = None,
    stop: threading.Event | None = None,
) -> Iterator[tuple[Hashed, Hashed]]:
    """Hash the same relative paths under both roots at once, one thread per side.

    ``open_rels`` is called once per side and must give the same paths in the same order
    (a list file read twice, for example): the two readers run independently, each at
    its own disk's speed, and the results are paired here in order. The disk's side is
    read with ``drop_cache`` (see the module doc). ``on_bytes`` may be called from both
    threads.
    """
    stop = stop if stop is not None else threading.Event()
    own_stop = threading.Event()
    queues: list[queue.Queue[object]] = [queue.Queue(QUEUE_DEPTH), queue.Queue(QUEUE_DEPTH)]
    both = _Either(stop, own_stop)
    threads = [
        threading.Thread(target=_reader, name=f"hash-{side}", daemon=True,
                         args=(q, root, open_rels(), drop, on_bytes, both))
        for side, q, root, drop in (("source", queues[0], source_root, False),
                                    ("disk", queues[1], disk_root, True))
    ]
    for t in threads:
        t.start()
    try:
        while True:
            a, b = queues[0].get(), queues[1].get()
            for item in (a, b):
                if isinstance(item, BaseException):
                    raise item
            if a is _END or b is _END:
                if a is not b:
                    raise RuntimeError("the two sides listed different numbers of files")
                return
            assert isinstance(a, Hashed) and isinstance(b, Hashed)
            if a.rel != b.rel:
                raise RuntimeError(f"the two sides are out of step: {a.rel} / {b.rel}")
            yield a, b
    finally:
        own_stop.set()
        for q in queues:  # unblock a reader waiting on a full queue
            while True:
                try:
                    q.get_nowait()
                except queue.Empty:
                    break
        for t in threads:
            t.join(timeout=30)


class _Either(threading.Event):
    """Set when either of two events is set (the caller's stop, or our own at the end)."""

    def __init__(self, a: threading.Event, b: threading.Event) -> None:
        super().__init__()
        self._a, self._b = a, b

    def is_set(self) -> bool:
        return self._a.is_set() or self._b.is_set()
