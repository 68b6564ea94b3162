"""The daemon's answers on its control socket (daemon_control.py), with the real daemon on
the real stack (udevd, UDisks2, an exFAT disk image on a loop device): the disks plugged
in, approve, a backup started with trigger ``web``, a second one refused as busy, cancel
(recorded ``interrupted``), verify."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import stack as st
from helpers import Server
from immich_usb_backup import history
from immich_usb_backup.control import ControlClient
from test_daemon_e2e import plugs, uuid_of  # noqa: F401 - the fixture: disks pulled at the end
from test_web_browser import Process, processes  # noqa: F401 - the fixture: stopped at the end

LIBRARY_MB = 32
BWLIMIT_KIB = 2 * 1024  # 16 s for the library: time to ask, refuse and cancel


def call(client: ControlClient, op: str, **args: Any) -> dict[str, Any]:
    return asyncio.run(client.call(op, **args))


def wait_status(client: ControlClient, what: str, test: Any, timeout: float = 90) -> dict[
        str, Any]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        st_ = call(client, "status")["status"]
        if test(st_):
            return st_  # type: ignore[no-any-return]
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_the_daemon_approves_backs_up_refuses_a_second_cancels_and_verifies(
        real_stack: st.Stack, server: Server, plugs: list[st.Plug],  # noqa: F811
        processes: list[Process], tmp_path: Path) -> None:  # noqa: F811
    folder = server.upload / "upload" / "9f1d6c1a-user" / "ef" / "02"
    folder.mkdir(parents=True)
    for i in range(LIBRARY_MB):
        (folder / f"VID_{i:04d}.mp4").write_bytes(os.urandom(1024 * 1024))
    sock = tmp_path / "run" / "control.sock"
    server.write_config(f"[library]\nbwlimit_kib = {BWLIMIT_KIB}\n\n"
                        f'[web]\nlisten = "127.0.0.1:1"\nsocket = "{sock}"\n')
    image = st.make_image(tmp_path / "disk.img", "Stick", size_mb=256)
    uuid = uuid_of(image)
    program = [sys.executable, "-m", "immich_usb_backup", "-c", str(server.config_path), "-v"]
    processes.append(Process("daemon", [*program, "daemon"], real_stack.env,
                             tmp_path / "daemon.log"))
    processes[0].wait_for("immich-usb-backup daemon ready")
    client = ControlClient(sock)
    plugs.append(st.plug(image))
    st.wait_for(lambda: history.last_records(server.state, None), "the needs-approval record")

    (disk,) = [d for d in call(client, "disks")["disks"] if d["uuid"] == uuid]
    assert (disk["label"], disk["approved"], disk["size"]) == ("Stick", False,
                                                               256 * 1024 * 1024)
    refused = call(client, "backup", disk=uuid, mode="quick")
    assert (refused["ok"], refused["error"]) == (False, "refused")
    assert call(client, "backup", disk="0000-0000")["error"] == "not-found"

    approved = call(client, "approve", disk=uuid, create_marker=False)
    assert approved["ok"] is True and approved["approved"]["uuid"] == uuid
    assert approved["created_marker"] is False
    (disk,) = [d for d in call(client, "disks")["disks"] if d["uuid"] == uuid]
    assert disk["approved"] is True

    started = call(client, "backup", disk=uuid, mode="quick")
    assert started["ok"] is True and started["started"]["mode"] == "quick"
    running = wait_status(client, "the library copy",
                          lambda s: s.get("phase") == "library" and s.get("bytes_done"))
    assert running["job"]["kind"] == "backup" and running["job"]["disk"]["uuid"] == uuid
    busy = call(client, "backup", disk=uuid, mode="full")
    assert busy["error"] == "busy" and busy["running"]["state"] == "running"
    assert call(client, "verify", disk=uuid)["error"] == "busy"

    assert call(client, "cancel")["ok"] is True
    wait_status(client, "the run to end", lambda s: s["state"] == "idle", 60)
    st.wait_for(lambda: len(history.last_records(server.state, None)) == 2, "the record")
    last = history.last_records(server.state, None)[-1]
    assert (last["status"], last["trigger"]) == ("interrupted", "web"), last
    assert call(client, "cancel")["error"] == "not-found"

    assert call(client, "verify", disk=uuid)["started"]["kind"] == "verify"
    done = wait_status(client, "the check's outcome",
                       lambda s: (s.get("last_check") or {}).get("finished_at")
                       and s["state"] == "idle", 90)
    check = done["last_check"]
    assert check["kind"] == "verify" and check["disk"]["uuid"] == uuid
    assert isinstance(check["ok"], bool)  # an interrupted first backup: no manifest yet
    assert len(history.last_records(server.state, None)) == 2  # a check is not a run
