"""execute.run: every line in order, chatty output read in batches, and nothing left
behind (file descriptors, processes) whatever way a run ends."""

from __future__ import annotations

import asyncio
import os
import sys
import time

import pytest

from immich_usb_backup import execute
from immich_usb_backup.errors import CommandError

# A child that writes ``n`` progress-like lines, one write() each, ``pause`` seconds
# apart, then a last line without a line break; rsync's progress ends lines with \r.
WRITER = """
import os, sys, time
n, pause = int(sys.argv[1]), float(sys.argv[2])
for i in range(n):
    os.write(1, b"%15d %3d%%\\r" % (i, i % 100))
    time.sleep(pause)
os.write(1, b"Number of regular files transferred: %d" % n)
"""


def expected(n: int) -> list[str]:
    return [f"{i:15d} {i % 100:3d}%" for i in range(n)] + [
        f"Number of regular files transferred: {n}"]


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


async def collect(n: int, pause: float, coalesce_s: float) -> list[list[str]]:
    batches: list[list[str]] = []
    await execute.run([sys.executable, "-c", WRITER, str(n), str(pause)],
                      on_lines=batches.append, coalesce_s=coalesce_s)
    return batches


def test_coalesced_output_gives_every_line_in_order_in_few_batches() -> None:
    before = open_fds()
    batches = asyncio.run(collect(1000, 0.0005, coalesce_s=0.1))
    assert [line for batch in batches for line in batch] == expected(1000)
    # about 0.5 s of output read every 0.1 s: a handful of reads, not one per write
    assert len(batches) <= 20, len(batches)
    assert open_fds() == before


def test_without_coalescing_the_same_output_comes_in_many_reads() -> None:
    """The other side of the test above: it could fail."""
    batches = asyncio.run(collect(1000, 0.0005, coalesce_s=0.0))
    assert [line for batch in batches for line in batch] == expected(1000)
    assert len(batches) > 50, len(batches)


def test_coalesced_output_waits_in_a_pipe_of_a_megabyte() -> None:
    """So a writer does not block while the reading pauses (rsync's progress: 150 bytes
    a file; a default pipe of 64 kB holds 0.1 s of 430 files a second)."""
    script = "import fcntl; print(fcntl.fcntl(1, fcntl.F_GETPIPE_SZ))"
    for coalesce_s, size in ((0.1, execute.PIPE_BYTES), (0.0, 65536)):
        lines: list[str] = []
        asyncio.run(execute.run([sys.executable, "-c", script],
                                on_lines=lines.extend, coalesce_s=coalesce_s))
        assert lines == [str(size)]


def test_a_burst_of_many_pipes_full_is_read_whole() -> None:
    # 20,000 lines of 21 bytes written at once: 420 kB, six default pipes full
    batches = asyncio.run(collect(20_000, 0.0, coalesce_s=0.1))
    assert [line for batch in batches for line in batch] == expected(20_000)


def test_on_line_gets_each_line_and_a_failure_keeps_the_stderr_tail() -> None:
    lines: list[str] = []
    script = "import sys; print('one'); print('two\\rthree'); sys.stderr.write('bad\\n'); " \
             "sys.exit(3)"
    with pytest.raises(CommandError) as caught:
        asyncio.run(execute.run([sys.executable, "-c", script], on_line=lines.append))
    assert lines == ["one", "two", "three"]
    assert caught.value.returncode == 3
    assert "bad" in caught.value.stderr_tail


def test_on_line_and_on_lines_together_are_refused() -> None:
    with pytest.raises(TypeError):
        asyncio.run(execute.run(["true"], on_line=print, on_lines=print))


def test_cancelling_a_coalesced_run_ends_the_child_and_closes_its_pipes() -> None:
    before = open_fds()
    pid_seen: list[str] = []
    script = "import os, time\nos.write(1, b'%d\\n' % os.getpid())\nwhile True:\n" \
             "    os.write(1, b'x\\r'); time.sleep(0.001)\n"

    async def main() -> None:
        def sink(lines: list[str]) -> None:
            if not pid_seen:
                pid_seen.append(lines[0])
        task = asyncio.ensure_future(execute.run([sys.executable, "-c", script],
                                                 on_lines=sink, coalesce_s=0.1))
        for _ in range(100):
            if pid_seen:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.15)  # most likely inside a pause now
        task.cancel()
        t0 = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - t0 < execute.TERMINATE_GRACE_S  # SIGTERM was enough

    asyncio.run(main())
    assert pid_seen
    assert not os.path.exists(f"/proc/{int(pid_seen[0])}")  # ended and reaped
    assert open_fds() == before


@pytest.mark.parametrize("coalesce_s", [0.0, 0.1])
def test_a_character_split_across_reads_and_bytes_that_are_not_utf8(coalesce_s: float) -> None:
    script = ("import os, time\nos.write(1, b'caf\\xc3')\ntime.sleep(0.3)\n"
              "os.write(1, b'\\xa9 ok\\r\\n\\xff bad\\nlast')\n")
    lines: list[str] = []
    asyncio.run(execute.run([sys.executable, "-c", script], on_lines=lines.extend,
                            coalesce_s=coalesce_s))
    assert lines == ["café ok", "\ufffd bad", "last"]


def test_a_child_reads_what_a_thread_feeds_and_a_child_gone_early_breaks_the_pipe() -> None:
    """``stdin``: the read end is handed over (closed once the child has it), so the
    feeder's writes reach the child, and fail at once when the child has ended."""
    before = open_fds()

    async def feed(argv: list[str], data: bytes) -> tuple[list[str], BaseException | None]:
        read_fd, write_fd = os.pipe()
        failure: list[BaseException] = []

        def writer() -> None:
            try:
                with os.fdopen(write_fd, "wb") as out:
                    out.write(data)
            except BrokenPipeError as exc:
                failure.append(exc)

        lines: list[str] = []
        feeding = asyncio.ensure_future(asyncio.to_thread(writer))
        await execute.run(argv, on_line=lines.append, stdin=read_fd)
        await feeding
        return lines, failure[0] if failure else None

    lines, failed = asyncio.run(feed(["cat"], b"one\ntwo\n"))
    assert (lines, failed) == (["one", "two"], None)
    lines, failed = asyncio.run(feed(["true"], b"x" * (1 << 20)))
    assert lines == [] and isinstance(failed, BrokenPipeError)
    assert open_fds() == before
