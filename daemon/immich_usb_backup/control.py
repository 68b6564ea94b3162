"""The daemon's control socket: the few questions and actions the web UI needs.

A Unix stream socket (``[web] socket``, by default ``/run/immich-usb-backup/control.sock``)
owned by root and ``[web] group``, mode 0660; each client's peer credentials are checked
as well (root, the daemon's own user, or a process with the group among its groups).
One JSON object per line each way, UTF-8, at most :data:`MAX_LINE` bytes:

    -> {"op": "status"}
    <- {"ok": true, "status": {"state": "idle"}}
    -> {"op": "backup", "disk": "6F5F-FDC3", "mode": "quick"}
    <- {"ok": false, "error": "busy", "message": "...", "running": {...}}

Operations: ``status``, ``disks``, ``history`` (``last``), ``events`` (then one line per
event until the client goes), ``backup`` (``disk``, ``mode``), ``approve`` (``disk``,
``create_marker``), ``verify`` (``disk``), ``drill`` (``disk``), ``cancel``. The server
side takes a :class:`Handler` (the daemon's is in ``daemon_control``); a handler refuses
with :class:`ControlError`, whose ``code`` the web UI turns into an HTTP status.
docs/web.md describes the protocol for other clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

MAX_LINE = 64 * 1024
MAX_CLIENTS = 32
REQUEST_TIMEOUT_S = 10.0
CALL_TIMEOUT_S = 30.0  # a client's wait for an answer (listing disks reads udev)
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux 4.13+

# error codes -> what they mean (the web UI maps them to HTTP statuses)
ERRORS = {
    "bad-request": "the request is not one the daemon understands",
    "forbidden": "this user may not use the control socket",
    "not-found": "no such disk or run",
    "busy": "a backup (or a check) is running",
    "refused": "a safety rule or the disk's state refuses it",
    "failed": "the daemon could not do it",
}


class ControlError(Exception):
    """A refusal to answer with: ``code`` (a key of :data:`ERRORS`), a sentence for a
    person, and more fields for the answer (``running`` with a busy one)."""

    def __init__(self, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code, self.message, self.extra = code, message, extra

    def answer(self) -> dict[str, Any]:
        return {"ok": False, "error": self.code, "message": self.message, **self.extra}


class ControlUnavailable(Exception):
    """The control socket cannot be reached: the daemon is not running, or this user may
    not use it."""


class Handler(Protocol):
    """What answers the socket's operations (the daemon; a test's own in the tests).
    Each returns the answer's fields; a refusal raises :class:`ControlError`."""

    async def status(self) -> dict[str, Any]: ...
    async def disks(self) -> list[dict[str, Any]]: ...
    async def history(self, last: int | None) -> list[dict[str, Any]]: ...
    def events(self) -> AsyncIterator[dict[str, Any]]: ...
    async def backup(self, disk: str, mode: str | None) -> dict[str, Any]: ...
    async def approve(self, disk: str, create_marker: bool) -> dict[str, Any]: ...
    async def verify(self, disk: str) -> dict[str, Any]: ...
    async def drill(self, disk: str) -> dict[str, Any]: ...
    async def cancel(self) -> dict[str, Any]: ...


# Who may connect ---------------------------------------------------------------------------

def group_id(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def peer(sock: socket.socket) -> tuple[int, int, int, list[int]]:
    """The connected process's (pid, uid, gid, supplementary groups)."""
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                        struct.calcsize("3i")))
    groups: list[int] = []
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * 256)
        groups = list(struct.unpack(f"{len(raw) // 4}I", raw))
    except OSError:  # an older kernel: what /proc says of the process
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("Groups:"):
                    groups = [int(g) for g in line.split()[1:]]
    return pid, uid, gid, groups


def allowed(uid: int, gid: int, groups: list[int], group: int | None) -> bool:
    """Root, the server's own user, or a member of ``group``."""
    if uid in (0, os.geteuid()):
        return True
    return group is not None and (gid == group or group in groups)


# The server -------------------------------------------------------------------------------

class ControlServer:
    """Serves ``handler`` on the Unix socket ``path`` for root and ``group``."""

    def __init__(self, path: Path, group: str, handler: Handler) -> None:
        self.path, self.group_name, self.handler = path, group, handler
        self.gid = group_id(group)
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Make the socket (a stale one is replaced) and listen. Raise OSError."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        with contextlib.suppress(FileNotFoundError):
            if self.path.is_socket():
                self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old = os.umask(0o177)  # no moment in which others could connect
            try:
                sock.bind(str(self.path))
            finally:
                os.umask(old)
            if self.gid is None:
                log.warning("the group %s does not exist: only root can use the control "
                            "socket %s (groupadd --system %s)", self.group_name, self.path,
                            self.group_name)
            else:
                os.chown(self.path, -1, self.gid)
                os.chmod(self.path, 0o660)
            self._server = await asyncio.start_unix_server(self._accept, sock=sock,
                                                           limit=MAX_LINE)
        except BaseException:
            sock.close()
            raise
        log.info("control socket at %s", self.path)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._clients):
                task.cancel()
            await asyncio.gather(*self._clients, return_exceptions=True)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        pid, uid, gid, groups = peer(sock)
        if not allowed(uid, gid, groups, self.gid):
            log.warning("control socket: refused process %d (uid %d): not root nor in %s",
                        pid, uid, self.group_name)
            await _send(writer, ControlError("forbidden", ERRORS["forbidden"]).answer())
            return
        if len(self._clients) > MAX_CLIENTS:
            await _send(writer, ControlError("busy", "too many clients").answer())
            return
        while True:
            try:
                line = await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT_S)
            except TimeoutError:  # an idle client gives its place up
                return
            except ValueError:  # longer than MAX_LINE
                await _send(writer, ControlError("bad-request", "request too long").answer())
                return
            if not line:
                return
            try:
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise ValueError
            except ValueError:
                await _send(writer, ControlError("bad-request", "not a JSON object").answer())
                return
            if request.get("op") == "events":
                await self._events(reader, writer)
                return
            await _send(writer, await self.dispatch(request))

    async def _events(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        """Events until the client goes (noticed at once: its end of the socket closes)."""
        async def push() -> None:
            await _send(writer, {"ok": True})
            async for event in self.handler.events():
                await _send(writer, event)

        pushing = asyncio.create_task(push())
        gone = asyncio.create_task(reader.read())
        try:
            await asyncio.wait([pushing, gone], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pushing, gone):
                task.cancel()
            await asyncio.gather(pushing, gone, return_exceptions=True)

    async def dispatch(self, request: dict[str, Any]) -> dict[str, Any]:
        """The answer to one request (never raises but for cancellation)."""
        op = request.get("op")
        h = self.handler
        calls: dict[str, Callable[[], Awaitable[Any]]] = {
            "status": lambda: _field("status", h.status()),
            "disks": lambda: _field("disks", h.disks()),
            "history": lambda: _field("history", h.history(_last(request))),
            "backup": lambda: h.backup(_disk(request), _mode(request)),
            "approve": lambda: h.approve(_disk(request),
                                         request.get("create_marker") is True),
            "verify": lambda: h.verify(_disk(request)),
            "drill": lambda: h.drill(_disk(request)),
            "cancel": h.cancel,
        }
        call = calls.get(op) if isinstance(op, str) else None
        if call is None:
            return ControlError("bad-request", f"unknown operation {op!r}").answer()
        try:
            return {"ok": True, **await call()}
        except ControlError as exc:
            return exc.answer()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("control socket: %s failed", op)
            return ControlError("failed", f"{op} failed: {exc}").answer()


async def _field(name: str, value: Awaitable[Any]) -> dict[str, Any]:
    return {name: await value}


def _disk(request: dict[str, Any]) -> str:
    disk = request.get("disk")
    if not isinstance(disk, str) or not disk.strip() or len(disk) > 64 or any(
            c.isspace() or not c.isprintable() for c in disk):
        raise ControlError("bad-request", "`disk` must be a file system UUID")
    return disk.strip()


def _mode(request: dict[str, Any]) -> str | None:
    from immich_usb_backup.config import MODES  # noqa: PLC0415 - light, but only here

    mode = request.get("mode")
    if mode is None or mode == "":
        return None
    if mode not in MODES:
        raise ControlError("bad-request", f"`mode` must be one of {', '.join(MODES)}")
    return str(mode)


def _last(request: dict[str, Any]) -> int | None:
    last = request.get("last")
    if last is None:
        return None
    if not isinstance(last, int) or isinstance(last, bool) or last < 1:
        raise ControlError("bad-request", "`last` must be a whole number of at least 1")
    return last


async def _send(writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
    writer.write(json.dumps(obj, ensure_ascii=False).encode() + b"\n")
    await writer.drain()


# Events: the live status, pushed ---------------------------------------------------------

RUNNING_EVERY_S = 0.4  # at least twice a second while a run is on
IDLE_EVERY_S = 1.0  # notice a run starting (a `run` by hand too) within a second
KEEPALIVE_S = 15.0


async def status_events(status: Callable[[], Awaitable[dict[str, Any]]]
                        ) -> AsyncIterator[dict[str, Any]]:
    """``{"event": "status", "status": ...}`` now, then every :data:`RUNNING_EVERY_S`
    while a run is on, at each change when idle, and a keepalive at least every
    :data:`KEEPALIVE_S`. Reads the status only while someone listens."""
    last: dict[str, Any] | None = None
    quiet = 0.0
    while True:
        current = await status()
        running = current.get("state") != "idle"
        if running or current != last or quiet >= KEEPALIVE_S:
            yield {"event": "status", "status": current}
            quiet = 0.0
        last = current
        every = RUNNING_EVERY_S if running else IDLE_EVERY_S
        await asyncio.sleep(every)
        quiet += every


# The client (the web UI) -----------------------------------------------------------------

class ControlClient:
    """Asks the daemon through its control socket at ``path``; a connection a request."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            return await asyncio.wait_for(
                asyncio.open_unix_connection(str(self.path), limit=MAX_LINE * 16), 5)
        except (OSError, TimeoutError) as exc:
            why = ("the daemon is not running (no control socket at "
                   f"{self.path})" if isinstance(exc, FileNotFoundError | ConnectionRefusedError)
                   else f"the daemon's control socket {self.path} cannot be used: {exc}")
            raise ControlUnavailable(why) from exc

    async def call(self, op: str, **args: Any) -> dict[str, Any]:
        """The daemon's answer to ``op`` (``{"ok": ...}``). Raise ControlUnavailable."""
        reader, writer = await self._open()
        try:
            await _send(writer, {"op": op, **args})
            line = await asyncio.wait_for(reader.readline(), CALL_TIMEOUT_S)
        except (OSError, TimeoutError, ValueError) as exc:
            raise ControlUnavailable(f"the daemon did not answer {op}: {exc}") from exc
        finally:
            writer.close()
        return _answer(line)

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """The daemon's events until it goes away (then ControlUnavailable)."""
        reader, writer = await self._open()
        try:
            await _send(writer, {"op": "events"})
            first = _answer(await reader.readline())
            if not first.get("ok"):
                raise ControlUnavailable(str(first.get("message")))
            while line := await reader.readline():
                yield _answer(line)
            raise ControlUnavailable("the daemon closed the control socket")
        except (OSError, ValueError) as exc:
            raise ControlUnavailable(f"the daemon's events stopped: {exc}") from exc
        finally:
            writer.close()


def _answer(line: bytes) -> dict[str, Any]:
    if not line:
        raise ControlUnavailable("the daemon closed the control socket")
    try:
        answer = json.loads(line)
    except ValueError as exc:
        raise ControlUnavailable(f"the daemon's answer is not JSON: {exc}") from exc
    if not isinstance(answer, dict):
        raise ControlUnavailable("the daemon's answer is not a JSON object")
    return answer
