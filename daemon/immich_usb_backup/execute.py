"""Every subprocess goes through here: argv lists only, output streamed, cancellation.

Given an argv list, ``run`` starts the process in its own session (so Ctrl-C on the
terminal reaches us, and we decide how the child ends), streams its stdout line by line
(``\\r`` and ``\\n`` both end a line, as rsync's progress uses ``\\r``), keeps a bounded
tail of stderr, and returns the exit status. Cancelling the awaiting task terminates the
child (SIGTERM, then SIGKILL after a grace period) before the cancellation propagates.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import re
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from immich_usb_backup.errors import CommandError

log = logging.getLogger(__name__)

TERMINATE_GRACE_S = 5.0
_LINE_END = re.compile(rb"[\r\n]")
_SECRET_IN_URL = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):[^@/\s]*@", re.I)


def mask_secrets(text: str) -> str:
    """Hide passwords in URLs (``scheme://user:secret@host`` -> ``scheme://user:***@host``)."""
    return _SECRET_IN_URL.sub(r"\g<scheme>\g<user>:***@", text)


@dataclass(frozen=True)
class Result:
    returncode: int
    stderr_tail: str


async def run(
    argv: Sequence[str],
    *,
    on_line: Callable[[str], None] | None = None,
    ok_codes: Sequence[int] = (0,),
    env: dict[str, str] | None = None,
    stdout: int | None = None,
) -> Result:
    """Run ``argv``; call ``on_line`` for each stdout line; return its Result.

    ``stdout``: a file descriptor the output goes to instead (a dump: bytes, not lines).
    Raise CommandError when the exit status is not in ``ok_codes``. Cancellation
    terminates the child and waits for it before re-raising.
    """
    log.debug("running %s", mask_secrets(" ".join(argv)))
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE if stdout is None else stdout,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
        env=env,
    )
    stderr_lines: collections.deque[str] = collections.deque(maxlen=20)
    assert proc.stderr is not None
    try:
        await asyncio.gather(
            _pump(proc.stdout, on_line) if proc.stdout is not None else asyncio.sleep(0),
            _pump(proc.stderr, stderr_lines.append),
        )
        returncode = await proc.wait()
    except asyncio.CancelledError:
        await _terminate(proc)
        raise
    tail = mask_secrets("\n".join(stderr_lines))
    if returncode not in ok_codes:
        raise CommandError(os.path.basename(argv[0]), returncode, tail)
    return Result(returncode, tail)


async def _pump(stream: asyncio.StreamReader, sink: Callable[[str], None] | None) -> None:
    buffer = b""
    while chunk := await stream.read(65536):
        buffer += chunk
        *lines, buffer = _LINE_END.split(buffer)
        if sink:
            for line in lines:
                if line:
                    sink(line.decode("utf-8", "replace"))
        if len(buffer) > 1 << 20:  # a line that never ends: keep memory bounded
            buffer = buffer[-65536:]
    if buffer and sink:
        sink(buffer.decode("utf-8", "replace"))


async def _terminate(proc: asyncio.subprocess.Process) -> None:
    """End ``proc`` and its process group: SIGTERM, then SIGKILL after a grace period."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        await asyncio.shield(asyncio.wait_for(proc.wait(), TERMINATE_GRACE_S))
    except (TimeoutError, asyncio.CancelledError):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await asyncio.shield(proc.wait())
    log.info("stopped %s (pid %d)", "subprocess", proc.pid)


async def capture(argv: Sequence[str], ok_codes: Sequence[int] = (0,)) -> tuple[int, str]:
    """Run a short command and return (exit status, stdout text)."""
    lines: list[str] = []
    res = await run(argv, on_line=lines.append, ok_codes=ok_codes)
    return res.returncode, "\n".join(lines)
