"""The suite's own watches (conftest): they catch what they are there to catch.

- ``no_blocked_loop``: an asyncio event loop blocked for 100 ms or more fails the test,
  whether the loop runs in the test's process or in a subprocess (the product).
- ``leak_check``: what a session leaves behind (loop devices, mounts, processes) is
  named; here checked on a state made by hand, the session's own check runs at its end.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import LoopWatch, MachineState, Mount, Proc, blocked_callback

pytest_plugins = ["pytester"]

BLOCKING = """
import asyncio, time

async def sleeps_on_the_loop():
    time.sleep(0.2)

asyncio.run(sleeps_on_the_loop())
"""

AWAITING = """
import asyncio

async def awaits():
    await asyncio.sleep(0.2)
    await asyncio.to_thread(__import__("time").sleep, 0.2)

asyncio.run(awaits())
"""


# A blocked event loop ---------------------------------------------------------------

def test_a_loop_blocked_in_this_process_is_flagged_with_the_coroutine_named() -> None:
    async def blocks_the_loop() -> None:
        time.sleep(0.2)  # noqa: ASYNC251 - the block the watch must see

    watch = LoopWatch()
    with watch.in_process():
        asyncio.run(blocks_the_loop(), debug=True)

    (block,) = watch.blocks
    assert block.startswith("in this process: test_a_loop_blocked_in_this_process_is_"
                            "flagged_with_the_coroutine_named.<locals>.blocks_the_loop() "
                            f"at {__file__}:"), block
    assert " took 0.2" in block, block


def test_awaiting_and_a_thread_are_not_flagged_in_this_process() -> None:
    async def waits() -> None:
        await asyncio.sleep(0.2)
        await asyncio.to_thread(time.sleep, 0.2)

    watch = LoopWatch()
    with watch.in_process():
        asyncio.run(waits(), debug=True)

    assert watch.blocks == []


def _python(code: str) -> str:
    env = {**os.environ, "PYTHONASYNCIODEBUG": "1"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stderr


def test_a_loop_blocked_in_a_subprocess_is_flagged_from_its_stderr() -> None:
    watch = LoopWatch()

    found = watch.scan("python -c", _python(BLOCKING))

    (block,) = found
    assert block.startswith("python -c: sleeps_on_the_loop() at <string>:"), block
    assert " took 0.2" in block, block
    assert watch.blocks == found


def test_a_subprocess_that_only_awaits_is_not_flagged() -> None:
    assert LoopWatch().scan("python -c", _python(AWAITING)) == []


def test_the_slow_callback_is_named_from_the_products_log_lines() -> None:
    task = ("2026-05-09 07:35:25,123 WARNING asyncio: Executing <Task pending "
            "name='Task-17' coro=<_append_history() running at /x/flow.py:243> "
            "wait_for=<Future pending cb=[Task.task_wakeup()] created at /y.py:427> "
            "created at /z/tasks.py:680> took 0.312 seconds")
    handle = ("2026-05-09 07:35:25,123 WARNING asyncio: Executing <Handle "
              "DeviceMonitor._drain() created at /x/devices.py:101> took 0.150 seconds")

    assert blocked_callback(task) == "_append_history() at /x/flow.py:243 took 0.312 s"
    assert blocked_callback(handle) == "DeviceMonitor._drain() took 0.150 s"
    assert blocked_callback("2026-05-09 07:35:25,123 INFO flow: took 3 seconds") is None


def test_the_fixture_fails_a_test_whose_subprocess_blocked_its_loop(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeconftest(f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location(
    "suite_conftest", {str(Path(__file__).with_name("conftest.py"))!r})
suite = importlib.util.module_from_spec(spec)
sys.modules["suite_conftest"] = suite
sys.path.insert(0, {str(Path(__file__).parent)!r})
spec.loader.exec_module(suite)
no_blocked_loop = suite.no_blocked_loop
""")
    pytester.makepyfile(test_blocks=f"""
import asyncio, subprocess, sys, time
import pytest
import suite_conftest

BLOCKING = {BLOCKING!r}

@pytest.mark.usefixtures("no_blocked_loop")
def test_runs_a_blocking_program():
    # the environment of the test (PYTHONASYNCIODEBUG=1) goes to the subprocess
    r = subprocess.run([sys.executable, "-c", BLOCKING], capture_output=True, text=True)
    import helpers
    helpers.note_loop_blocks("the program", r.stderr)

@pytest.mark.usefixtures("no_blocked_loop")
def test_blocks_its_own_loop():
    async def blocks_in_the_test():
        time.sleep(0.15)
    asyncio.run(blocks_in_the_test())  # debug mode from PYTHONASYNCIODEBUG=1

@pytest.mark.usefixtures("no_blocked_loop")
def test_only_awaits():
    asyncio.run(asyncio.sleep(0.2))
""")

    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")

    result.assert_outcomes(passed=3, errors=2)
    result.stdout.fnmatch_lines([
        "*ERROR at teardown of test_runs_a_blocking_program*",
        "*the event loop was blocked for 100 ms or more*",
        "*the program: sleeps_on_the_loop() at <string>:* took 0.2* s",
        "*ERROR at teardown of test_blocks_its_own_loop*",
        "*in this process: *blocks_in_the_test() at *test_blocks.py:* took 0.1* s",
    ])


# What a session leaves behind ----------------------------------------------------------

def test_the_leak_check_names_a_loop_device_its_mount_and_its_helper() -> None:
    base = "/tmp/pytest-of-root/pytest-7"
    start = MachineState(base, {"/dev/loop0": "/home/me/mine.img"},
                         [Mount("/dev/loop0", "/media/me/Mine")], {})
    now = MachineState(
        base,
        {"/dev/loop0": "/home/me/mine.img", "/dev/loop3": f"{base}/test_x0/disk.img"},
        [Mount("/dev/loop0", "/media/me/Mine"), Mount("/dev/loop3p1", "/media/root/Backup"),
         Mount("tmpfs", f"{base}/test_y0/tmpfs")],
        {(41, "100"): Proc(41, "mount.exfat /dev/loop0 /media/me/Mine", tests=False),
         (42, "200"): Proc(42, "/sbin/mount.exfat /dev/loop3p1 /media/root/Backup",
                           tests=False),
         (43, "300"): Proc(43, f"dbus-daemon --address=unix:path={base}/stack0/bus",
                           tests=True),
         (44, "400"): Proc(44, "/usr/libexec/udisks2/udisksd", tests=False)},
    )

    assert now.left_since(start) == [
        f"loop device /dev/loop3 still attached to {base}/test_x0/disk.img",
        "mount of /dev/loop3p1 at /media/root/Backup",
        f"mount of tmpfs at {base}/test_y0/tmpfs",
        "process 42 still running: /sbin/mount.exfat /dev/loop3p1 /media/root/Backup",
        f"process 43 still running: dbus-daemon --address=unix:path={base}/stack0/bus",
    ]
    assert now.left_since(now) == []
