"""The daemon's control socket (control.py) with a handler written here: who may use it
(real processes of other users, started with ``user=``), what it answers, the events."""

from __future__ import annotations

import asyncio
import grp
import itertools
import json
import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import need
from immich_usb_backup import control
from immich_usb_backup.control import ControlClient, ControlError, ControlServer

NOBODY = 65534
GROUP = "users"  # a group every Debian has, which nobody is not in
SYSTEM_PYTHON = "/usr/bin/python3"  # readable by every user (the venv may live under /root)

CLIENT = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except OSError as exc:
    print(json.dumps({"connect": exc.__class__.__name__}))
    raise SystemExit(0)
try:
    s.sendall(b'{"op": "status"}\n')
except OSError:  # a refused client may find the socket closed already: read the answer
    pass
data = b""
while not data.endswith(b"\n"):
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
print(data.decode() or json.dumps({"closed": True}))
"""


class DaemonStandIn:
    """A handler as the daemon's would be: a run can be on, a second one is busy."""

    def __init__(self) -> None:
        self.running: dict[str, Any] | None = None
        self.calls: list[tuple[str, Any]] = []

    async def status(self) -> dict[str, Any]:
        return dict(self.running) if self.running else {"state": "idle"}

    async def disks(self) -> list[dict[str, Any]]:
        return [{"uuid": "6F5F-FDC3", "label": "<b>Backup</b>", "approved": True}]

    async def history(self, last: int | None) -> list[dict[str, Any]]:
        self.calls.append(("history", last))
        return [{"status": "success"}] * (last or 3)

    def events(self) -> AsyncIterator[dict[str, Any]]:
        return control.status_events(self.status)

    async def backup(self, disk: str, mode: str | None) -> dict[str, Any]:
        self.calls.append(("backup", (disk, mode)))
        if self.running:
            raise ControlError("busy", "a backup is running", running=await self.status())
        self.running = {"state": "running", "phase": "library", "percent": 1.0,
                        "disk": {"uuid": disk}}
        return {"started": {"kind": "backup", "disk": {"uuid": disk}, "mode": mode}}

    async def approve(self, disk: str, create_marker: bool) -> dict[str, Any]:
        self.calls.append(("approve", (disk, create_marker)))
        return {"approved": {"uuid": disk}, "created_marker": create_marker}

    async def verify(self, disk: str) -> dict[str, Any]:
        raise ControlError("not-found", f"no disk {disk}")

    async def drill(self, disk: str) -> dict[str, Any]:
        raise RuntimeError("boom")

    async def cancel(self) -> dict[str, Any]:
        self.running = None
        return {"cancelled": "the daemon's run"}


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A folder other users can reach (pytest's own tmp dirs are root's only)."""
    folder = Path(tempfile.mkdtemp(prefix="iub-control-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def serve(path: Path, handler: DaemonStandIn, group: str = GROUP) -> ControlServer:
    return ControlServer(path, group, handler)


def run_as(uid: int, socket_path: Path, groups: list[int] | None = None) -> dict[str, Any]:
    """The answer to ``status`` for a client running as ``uid`` (and ``groups``)."""
    r = subprocess.run([SYSTEM_PYTHON, "-c", CLIENT, str(socket_path)], user=uid,
                       group=NOBODY, extra_groups=groups or [], capture_output=True,
                       text=True, timeout=30, cwd="/")
    assert r.returncode == 0, r.stderr
    answer: dict[str, Any] = json.loads(r.stdout)
    return answer


async def in_thread_as(uid: int, socket_path: Path,
                       groups: list[int] | None = None) -> dict[str, Any]:
    return await asyncio.to_thread(run_as, uid, socket_path, groups)


def test_the_socket_is_root_and_the_group_s_only_mode_0660(socket_dir: Path) -> None:
    need(os.geteuid() == 0, "needs root to give the socket to a group")
    path = socket_dir / "run" / "control.sock"

    async def main() -> None:
        server = serve(path, DaemonStandIn())
        await server.start()
        try:
            st = path.stat()
            assert stat.S_ISSOCK(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == 0o660
            assert (st.st_uid, st.st_gid) == (0, grp.getgrnam(GROUP).gr_gid)
        finally:
            await server.stop()
        assert not path.exists()

    asyncio.run(main())


def test_a_client_outside_the_group_is_refused_and_a_member_is_answered(
        socket_dir: Path) -> None:
    need(os.geteuid() == 0, "needs root to run clients as other users")
    need(Path(SYSTEM_PYTHON).exists(), f"needs {SYSTEM_PYTHON}")
    path = socket_dir / "control.sock"
    member = grp.getgrnam(GROUP).gr_gid

    async def main() -> None:
        server = serve(path, DaemonStandIn())
        await server.start()
        try:
            # the file's mode keeps an outsider from connecting at all
            assert await in_thread_as(NOBODY, path) == {"connect": "PermissionError"}
            # a member of the group is answered
            assert await in_thread_as(NOBODY, path, [member]) == {
                "ok": True, "status": {"state": "idle"}}
            # with the file opened to everyone, the peer's credentials still refuse him
            path.chmod(0o666)
            refused = await in_thread_as(NOBODY, path)
            assert refused["ok"] is False and refused["error"] == "forbidden"
            assert (await in_thread_as(NOBODY, path, [member]))["ok"] is True
        finally:
            await server.stop()

    asyncio.run(main())


def test_without_the_group_only_root_may_use_it(socket_dir: Path) -> None:
    need(os.geteuid() == 0, "needs root to run clients as other users")
    path = socket_dir / "control.sock"

    async def main() -> None:
        server = serve(path, DaemonStandIn(), group="no-such-group-iub")
        await server.start()
        try:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            assert (await ControlClient(path).call("status"))["ok"] is True
            path.chmod(0o666)
            assert (await in_thread_as(NOBODY, path, [100]))["error"] == "forbidden"
        finally:
            await server.stop()

    asyncio.run(main())


def test_operations_answers_and_refusals(socket_dir: Path) -> None:
    path = socket_dir / "control.sock"
    handler = DaemonStandIn()

    async def main() -> None:
        server = serve(path, handler)
        await server.start()
        client = ControlClient(path)
        try:
            disks = await client.call("disks")
            assert disks == {"ok": True, "disks": [
                {"uuid": "6F5F-FDC3", "label": "<b>Backup</b>", "approved": True}]}
            assert len((await client.call("history", last=2))["history"]) == 2
            started = await client.call("backup", disk="6F5F-FDC3", mode="verify")
            assert started["ok"] is True and started["started"]["mode"] == "verify"
            busy = await client.call("backup", disk="6F5F-FDC3", mode="quick")
            assert busy["ok"] is False and busy["error"] == "busy"
            assert busy["running"]["phase"] == "library"
            assert (await client.call("approve", disk="A-B", create_marker=True))[
                "created_marker"] is True
            assert (await client.call("verify", disk="A-B"))["error"] == "not-found"
            failed = await client.call("drill", disk="A-B")
            assert failed["error"] == "failed" and "boom" in failed["message"]
            assert (await client.call("cancel"))["cancelled"]
            for bad in ({"op": "backup", "disk": "a b"}, {"op": "backup", "disk": 5},
                        {"op": "backup", "disk": "X", "mode": "fast"},
                        {"op": "history", "last": 0}, {"op": "history", "last": True},
                        {"op": "format"}, {"op": None}):
                answer = await client.call(**bad)  # type: ignore[arg-type]
                assert answer["error"] == "bad-request", bad
            assert ("backup", ("X", "fast")) not in handler.calls
        finally:
            await server.stop()

    asyncio.run(main())


def test_a_line_that_is_not_json_or_too_long_is_refused(socket_dir: Path) -> None:
    path = socket_dir / "control.sock"

    async def raw(data: bytes) -> dict[str, Any]:
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(data)
        await writer.drain()
        line = await reader.readline()
        writer.close()
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def main() -> None:
        server = serve(path, DaemonStandIn())
        await server.start()
        try:
            assert (await raw(b"not json\n"))["error"] == "bad-request"
            assert (await raw(b"[1, 2]\n"))["error"] == "bad-request"
            long = await raw(b'{"op": "' + b"x" * (control.MAX_LINE + 10) + b'"}\n')
            assert long["error"] == "bad-request" and "too long" in long["message"]
            # the server is still there
            assert (await ControlClient(path).call("status"))["ok"] is True
        finally:
            await server.stop()

    asyncio.run(main())


def test_events_come_at_least_twice_a_second_while_a_run_is_on(socket_dir: Path) -> None:
    path = socket_dir / "control.sock"
    handler = DaemonStandIn()

    async def main() -> None:
        server = serve(path, handler)
        await server.start()
        try:
            events = ControlClient(path).events()
            first = await anext(events)
            assert first == {"event": "status", "status": {"state": "idle"}}
            await handler.backup("6F5F-FDC3", None)
            stamps = []
            async with asyncio.timeout(10):
                while len(stamps) < 6:
                    ev = await anext(events)
                    if ev["status"]["state"] == "running":
                        stamps.append(time.monotonic())
            gaps = [b - a for a, b in itertools.pairwise(stamps)]
            assert max(gaps) < 0.5, gaps
            handler.running = None
            async with asyncio.timeout(5):
                while (await anext(events))["status"]["state"] != "idle":
                    pass
            await events.aclose()
            # the subscription ends with the client: nothing left reading the status
            await asyncio.sleep(0.2)
            assert not server._clients
        finally:
            await server.stop()

    asyncio.run(main())


def test_the_client_says_when_the_daemon_is_not_running(tmp_path: Path) -> None:
    async def main() -> None:
        with pytest.raises(control.ControlUnavailable, match="daemon is not running"):
            await ControlClient(tmp_path / "none.sock").call("status")

    asyncio.run(main())


def test_a_stale_socket_file_is_replaced(socket_dir: Path) -> None:
    import socket as sockets

    path = socket_dir / "control.sock"
    stale = sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()

    async def main() -> None:
        server = serve(path, DaemonStandIn())
        await server.start()
        try:
            assert (await ControlClient(path).call("status"))["ok"] is True
        finally:
            await server.stop()

    asyncio.run(main())
