"""The step contract, driven through the real flow with steps written here.

No root, no loop device, no D-Bus: the "disk" is a folder (the flow's ``inspect`` is
given one), the steps are small classes that log what is called. What the flow promises
every step: every ``prepare`` runs before any ``preflight``, every ``preflight`` before
any ``write``, and every ``write`` before any ``finish``; a refusal (a safety rule, the
space) writes nothing; ``close`` runs after a failure and after cancellation; problems
reach the record, the history and the message.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

from helpers import Server, tree
from immich_usb_backup import flow
from immich_usb_backup.config import Config, load_config
from immich_usb_backup.errors import BackupError, Refused
from immich_usb_backup.policy import Space
from immich_usb_backup.record import StepResult
from immich_usb_backup.steps import Preflight, Step
from immich_usb_backup.target import Disk

CALLS: list[str] = []
HANGING = asyncio.Event()  # set by a step that hangs (in the test's one event loop)


@pytest.fixture(autouse=True)
def _calls() -> Iterator[None]:
    CALLS.clear()
    HANGING.clear()
    yield
    CALLS.clear()


@dataclass
class Counted(StepResult):
    what: str | None = None


class Logged(Step):
    """A step that logs each phase; subclasses say how they misbehave."""

    name = "logged"
    space: ClassVar[int] = 1000
    refuse: ClassVar[bool] = False
    fail_in: ClassVar[str] = ""
    hang_in: ClassVar[str] = ""

    @classmethod
    def enabled(cls, config: Config) -> bool:
        return True

    async def _phase(self, phase: str) -> None:
        CALLS.append(f"{self.name}.{phase}")
        if self.hang_in == phase:
            HANGING.set()
            await asyncio.Event().wait()
        if self.fail_in == phase:
            raise BackupError(f"{self.name} failed in {phase}")

    async def prepare(self) -> None:
        await self._phase("prepare")

    async def preflight(self, cluster: int) -> Preflight:
        await self._phase("preflight")
        if self.refuse:
            raise Refused(f"{self.name} refuses")
        return Preflight(Space(to_write=self.space), f"{self.name}: a line", 1, 10)

    async def write(self) -> StepResult:
        await self._phase("write")
        path = self.ctx.root.path(f"{self.name}.txt")
        path.write_text("written")
        self.ctx.problems.add(f"{self.name}: a problem of its own")
        return Counted(files=1, bytes=7, what=self.name)

    async def finish(self, result: StepResult) -> None:
        await self._phase("finish")

    def close(self) -> None:
        CALLS.append(f"{self.name}.close")


class First(Logged):
    name = "first"


class Second(Logged):
    name = "second"


def config_for(server: Server) -> Config:
    """The sample server's configuration: the steps of these tests ignore it."""
    return load_config(server.config_path)


def disk_folder(tmp_path: Path) -> Path:
    mount = tmp_path / "disk"
    (mount / "immich-server-backups").mkdir(parents=True)
    return mount


def run(config: Config, mount: Path, *steps: type[Step]) -> flow.RunRecord:
    async def inspect(target: Path) -> Disk:
        return Disk(target, "/dev/null", None, "Folder")

    return asyncio.run(flow.run_backup(config, mount, steps=steps, inspect=inspect))


def history(server: Server) -> list[dict[str, object]]:
    return [json.loads(line) for line in (server.state / "history.jsonl").read_text()
            .splitlines()]


def test_each_phase_runs_for_every_step_before_the_next_phase(
    server: Server, tmp_path: Path
) -> None:
    mount = disk_folder(tmp_path)
    record = run(config_for(server), mount, First, Second)

    assert CALLS == ["first.prepare", "second.prepare", "first.preflight", "second.preflight",
                     "first.write", "second.write", "first.finish", "second.finish",
                     "first.close", "second.close"]
    assert record.status == "partial"  # each step added a problem: they reach the record
    assert record.problems == ["first: a problem of its own", "second: a problem of its own"]
    assert record.files_transferred == 2 and record.bytes_transferred == 14
    (stored,) = history(server)
    assert stored["problems"] == record.problems
    assert stored["steps"] == {"first": {"files": 1, "bytes": 7, "what": "first"},
                               "second": {"files": 1, "bytes": 7, "what": "second"}}
    written = tree(mount / "immich-server-backups")
    assert {"first.txt", "second.txt", "README.txt", "backup-info.toml",
            "history.html"} <= set(written)


def test_a_refusal_writes_nothing_and_closes_every_step(server: Server, tmp_path: Path) -> None:
    class Refusing(Logged):
        name = "refusing"
        refuse = True

    mount = disk_folder(tmp_path)
    record = run(config_for(server), mount, First, Refusing)

    assert record.status == "refused" and record.problems == ["refusing refuses"]
    assert not any(c.endswith((".write", ".finish")) for c in CALLS)
    assert CALLS[-2:] == ["first.close", "refusing.close"]
    assert list((mount / "immich-server-backups").iterdir()) == []


def test_what_does_not_fit_is_refused_before_anything_is_written(
    server: Server, tmp_path: Path
) -> None:
    class Huge(Logged):
        name = "huge"
        space = 1 << 60  # an exabyte

    mount = disk_folder(tmp_path)
    record = run(config_for(server), mount, First, Huge)

    assert record.status == "refused"
    assert record.problems[0].startswith("not enough space on the disk")
    assert "first.write" not in CALLS and "first.close" in CALLS
    assert list((mount / "immich-server-backups").iterdir()) == []


def test_close_runs_after_a_failure_and_the_failure_is_the_problem(
    server: Server, tmp_path: Path
) -> None:
    class Failing(Logged):
        name = "failing"
        fail_in = "write"

    record = run(config_for(server), disk_folder(tmp_path), First, Failing, Second)

    assert record.status == "failed"
    assert "failing failed in write" in record.problems
    assert "second.write" not in CALLS and "first.finish" not in CALLS
    assert [c for c in CALLS if c.endswith(".close")] == ["first.close", "failing.close",
                                                          "second.close"]
    assert history(server)[-1]["status"] == "failed"


def test_close_runs_after_cancellation_and_the_run_is_interrupted(
    server: Server, tmp_path: Path
) -> None:
    class Hanging(Logged):
        name = "hanging"
        hang_in = "write"

    config = config_for(server)
    mount = disk_folder(tmp_path)

    async def main() -> None:
        async def inspect(target: Path) -> Disk:
            return Disk(target, "/dev/null", None, "Folder")

        task = asyncio.create_task(flow.run_backup(config, mount, steps=(First, Hanging),
                                                   inspect=inspect))
        await asyncio.wait_for(HANGING.wait(), 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert CALLS[-2:] == ["first.close", "hanging.close"]
    (stored,) = history(server)
    assert stored["status"] == "interrupted"
    assert "the backup was interrupted" in " ".join(stored["problems"])  # type: ignore[arg-type]


def test_a_disabled_step_is_not_made_at_all(server: Server, tmp_path: Path) -> None:
    class Off(Logged):
        name = "off"

        @classmethod
        def enabled(cls, config: Config) -> bool:
            return False

    run(config_for(server), disk_folder(tmp_path), First, Off)
    assert not any(c.startswith("off.") for c in CALLS)
