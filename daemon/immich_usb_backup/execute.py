"""Every subprocess goes through here: argv lists only, output streamed, cancellation.

No child outlives us (safety rule 11): each is started with ``PR_SET_PDEATHSIG``, so the
kernel kills it (SIGKILL) when we die, however we die (SIGKILL, the OOM killer, a
crash), and during a run it inherits the backup lock's descriptor (``lock.held_fds``),
so no next run starts while it lives. ``child_options`` gives both to any ``Popen``.

Given an argv list, ``run`` starts the process in its own session (so Ctrl-C on the
terminal reaches us, and we decide how the child ends), streams its stdout line by line
(``\\r`` and ``\\n`` both end a line, as rsync's progress uses ``\\r``), keeps a bounded
tail of stderr, and returns the exit status. Cancelling the awaiting task terminates the
child (SIGTERM, then SIGKILL after a grace period) before the cancellation propagates.

Chatty output (rsync's progress: two lines for every file copied) can be read in
batches: ``on_lines`` gets all lines of one read, and ``coalesce_s`` reads at most that
often, from a pipe made large enough to hold what comes meanwhile. Waking up for every
line cost 35 microseconds of CPU a file, 7 s for 200,000 small files, taken from the
two cores rsync and the file system work on (measured: bench/README.md).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import fcntl
import logging
import os
import re
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from immich_usb_backup import lock
from immich_usb_backup.errors import CommandError
from immich_usb_backup.masking import mask

log = logging.getLogger(__name__)

TERMINATE_GRACE_S = 5.0
PIPE_BYTES = 1 << 20  # the pipe of coalesced output: 0.1 s of rsync's progress at 50,000
# small files a second; Linux's default pipe-max-size, so a user without root gets it too
_LINE_END_TEXT = re.compile(r"[\r\n]")


_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved now: the child may not load


def _die_with(parent: int) -> Callable[[], None]:
    """The function the child runs before exec: be killed when ``parent`` (this process)
    dies; if it died already, before the setting took, end now."""
    def die_with_parent() -> None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(1)
    return die_with_parent


def child_options(user: str | None = None) -> dict[str, Any]:
    """Keyword arguments for ``subprocess.Popen`` (and asyncio's subprocess functions):
    the child dies with us and holds the run's lock (see the module doc). ``user``: run
    it as that user (with the user's group and no others), as PostgreSQL wants."""
    options: dict[str, Any] = {"preexec_fn": _die_with(os.getpid()),
                               "pass_fds": lock.held_fds()}
    if user is not None:
        options.update(user=user, group=_group_of(user), extra_groups=[])
    return options


def _group_of(user: str) -> int:
    import pwd  # noqa: PLC0415 - only for the drill

    return pwd.getpwnam(user).pw_gid


@dataclass(frozen=True)
class Result:
    returncode: int
    stderr_tail: str


async def run(
    argv: Sequence[str],
    *,
    on_line: Callable[[str], None] | None = None,
    on_lines: Callable[[list[str]], None] | None = None,
    coalesce_s: float = 0.0,
    ok_codes: Sequence[int] = (0,),
    env: dict[str, str] | None = None,
    stdout: int | None = None,
    user: str | None = None,
    stdin: int | None = None,
) -> Result:
    """Run ``argv``; call ``on_line`` for each stdout line, or ``on_lines`` with the
    lines of each read; return its Result.

    ``coalesce_s``: read stdout at most that often (it waits in a pipe of
    ``PIPE_BYTES``; if the kernel refuses that size, stdout is read as it comes).
    ``stdout``: a file descriptor the output goes to instead (a dump: bytes, not lines).
    ``user``: run it as that user (``child_options``). ``stdin``: a file descriptor the
    child reads (the read end of a pipe a thread feeds), handed over: closed here once the
    child has it, so the feeder sees a broken pipe when the child ends early; without it,
    the child reads nothing. Raise CommandError when the exit status is not in
    ``ok_codes``. Cancellation terminates the child and waits for it before re-raising.
    """
    if on_line is not None and on_lines is not None:
        raise TypeError("run() takes on_line or on_lines, not both")
    log.debug("running %s", mask(" ".join(argv)))
    sink = on_lines
    if on_line is not None:
        def sink(lines: list[str]) -> None:
            for line in lines:
                on_line(line)
    if stdout is not None or sink is None or coalesce_s <= 0:
        return await _run(argv, sink, ok_codes, env, stdout, None, user=user, stdin=stdin)
    read_fd, write_fd = os.pipe()
    if not _enlarge(write_fd):  # no room to wait in: read as it comes
        os.close(read_fd)
        os.close(write_fd)
        return await _run(argv, sink, ok_codes, env, None, None, user=user, stdin=stdin)
    pipe_file = os.fdopen(read_fd, "rb", 0)  # owns read_fd from here on
    reader = asyncio.StreamReader(limit=PIPE_BYTES)
    try:
        pipe, _ = await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), pipe_file)
    except BaseException:
        pipe_file.close()
        os.close(write_fd)
        raise
    try:  # _run closes write_fd once the child has it
        return await _run(argv, sink, ok_codes, env, write_fd, reader, (pipe, coalesce_s),
                          user=user, stdin=stdin)
    finally:
        pipe.close()  # and with it pipe_file


def _enlarge(fd: int) -> bool:
    """Make the pipe ``PIPE_BYTES`` large; False if the kernel refuses."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    except OSError as exc:
        log.debug("pipe of %d bytes refused (%s): output read as it comes", PIPE_BYTES, exc)
        return False
    return True


async def _run(
    argv: Sequence[str],
    sink: Callable[[list[str]], None] | None,
    ok_codes: Sequence[int],
    env: dict[str, str] | None,
    stdout: int | None,
    reader: asyncio.StreamReader | None,
    coalesce: tuple[asyncio.ReadTransport, float] | None = None,
    *,
    user: str | None = None,
    stdin: int | None = None,
) -> Result:
    """``run`` once its stdout is settled: ``reader`` reads the pipe given as ``stdout``
    (its write end is closed here once the child has it), as is ``stdin``."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL if stdin is None else stdin,
            stdout=asyncio.subprocess.PIPE if stdout is None else stdout,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            env=env,
            **child_options(user),
        )
    finally:
        if reader is not None:
            assert stdout is not None
            os.close(stdout)  # the child's copy is the only writer: EOF when it ends
        if stdin is not None:
            os.close(stdin)  # the child's copy is the only reader: EPIPE when it ends
    if reader is None:
        reader = proc.stdout
    stderr_lines: collections.deque[str] = collections.deque(maxlen=20)
    assert proc.stderr is not None
    try:
        await asyncio.gather(
            _pump(reader, sink, coalesce) if reader is not None else asyncio.sleep(0),
            _pump(proc.stderr, stderr_lines.extend),
        )
        returncode = await proc.wait()
    except asyncio.CancelledError:
        await _terminate(proc)
        raise
    tail = mask("\n".join(stderr_lines))
    if returncode not in ok_codes:
        raise CommandError(os.path.basename(argv[0]), returncode, tail)
    return Result(returncode, tail)


async def _pump(
    stream: asyncio.StreamReader,
    sink: Callable[[list[str]], None] | None,
    coalesce: tuple[asyncio.ReadTransport, float] | None = None,
) -> None:
    """Read ``stream`` to its end, giving ``sink`` the complete lines of each read.
    ``coalesce`` (the stream's transport, seconds): after a read, stop reading for that
    long, so what comes meanwhile is read at once (unless the read filled a quarter of
    the pipe: then read on at once)."""
    buffer = b""
    while chunk := await stream.read(PIPE_BYTES):
        buffer += chunk
        end = max(buffer.rfind(b"\n"), buffer.rfind(b"\r"))
        if end >= 0:  # the complete lines, decoded at once (no UTF-8 sequence holds \r, \n)
            lines = list(filter(None, _LINE_END_TEXT.split(buffer[:end].decode("utf-8",
                                                                                "replace"))))
            buffer = buffer[end + 1:]
            if sink and lines:
                sink(lines)
        if len(buffer) > 1 << 20:  # a line that never ends: keep memory bounded
            buffer = buffer[-65536:]
        if coalesce is not None and len(chunk) < PIPE_BYTES // 4:
            transport, seconds = coalesce
            transport.pause_reading()
            try:
                await asyncio.sleep(seconds)
            finally:
                transport.resume_reading()
    if buffer and sink:
        sink([buffer.decode("utf-8", "replace")])


async def _terminate(proc: asyncio.subprocess.Process, sig: int = signal.SIGTERM) -> None:
    """End ``proc`` and its process group: ``sig``, then SIGKILL after a grace period."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        await asyncio.shield(asyncio.wait_for(proc.wait(), TERMINATE_GRACE_S))
    except (TimeoutError, asyncio.CancelledError):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await asyncio.shield(proc.wait())
    log.info("stopped %s (pid %d)", "subprocess", proc.pid)


class Service:
    """A long-running child (the drill's PostgreSQL server): started with ``start``, its
    output into a file, ended with ``stop``; it dies with us like every child."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self.proc, self.name = proc, name

    @classmethod
    async def start(cls, argv: Sequence[str], *, log_to: str, env: dict[str, str] | None = None,
                    user: str | None = None) -> Service:
        """Start ``argv`` with its stdout and stderr appended to the file ``log_to``."""
        log.debug("starting %s", mask(" ".join(argv)))
        fd = os.open(log_to, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            if user is not None:
                os.fchown(fd, _uid_of(user), _group_of(user))
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=fd, stderr=fd,
                start_new_session=True, env=env, **child_options(user))
        finally:
            os.close(fd)
        return cls(proc, os.path.basename(argv[0]))

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    async def stop(self, sig: int = signal.SIGTERM) -> None:
        """Send ``sig`` to it and its process group; SIGKILL after a grace period."""
        await _terminate(self.proc, sig)


def _uid_of(user: str) -> int:
    import pwd  # noqa: PLC0415 - only for the drill

    return pwd.getpwnam(user).pw_uid


async def capture(argv: Sequence[str], ok_codes: Sequence[int] = (0,)) -> tuple[int, str]:
    """Run a short command and return (exit status, stdout text)."""
    lines: list[str] = []
    res = await run(argv, on_line=lines.append, ok_codes=ok_codes)
    return res.returncode, "\n".join(lines)
