"""The history file followed as it grows, for pages that must come in milliseconds.

``history.jsonl`` is only ever appended to. ``Follower`` reads it once (at start-up),
then only the lines added since: it keeps the newest runs parsed and every approved
disk's summary (what ``overview.disks`` gives), folded one run at a time. A file that
shrank or was replaced, or a change of the approvals, starts it again from the top.
Blocking (file reads): call it in a thread.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import threading

from immich_usb_backup import overview, state
from immich_usb_backup.config import Config
from immich_usb_backup.filecache import Signature, signature
from immich_usb_backup.policy import normalise_uuid
from immich_usb_backup.record import RunRecord

log = logging.getLogger(__name__)

READ_BYTES = 1 << 20


class Follower:
    """The newest ``keep`` runs and every approved disk's summary, kept up to date."""

    def __init__(self, config: Config, keep: int) -> None:
        self.config = config
        self.path = config.state_dir / state.HISTORY
        self._approvals = [config.state_dir / state.DISKS]
        self._lock = threading.Lock()
        self._runs: collections.deque[RunRecord] = collections.deque(maxlen=keep)
        self._summaries: dict[str, overview.DiskSummary] = {}
        self._key: tuple[int | None, Signature] | None = None
        self._offset = 0

    def runs(self, n: int) -> list[RunRecord]:
        """The newest ``n`` runs (at most ``keep``), oldest first."""
        with self._lock:
            self._catch_up()
            return list(self._runs)[-n:] if n else []

    def disks(self) -> list[overview.DiskSummary]:
        """Every approved disk, newest backup first: ``overview.disks``, kept up to date."""
        with self._lock:
            self._catch_up()
            # copies: the originals go on being folded under the lock
            return sorted((dataclasses.replace(d) for d in self._summaries.values()),
                          key=overview.newest_first)

    def _catch_up(self) -> None:
        try:
            st = os.stat(self.path)
            inode, size = st.st_ino, st.st_size
        except FileNotFoundError:
            inode, size = None, 0
        key = (inode, signature(self._approvals))
        if key != self._key or size < self._offset:
            self._start_again()
            self._key = key
        if size > self._offset:
            self._read_from(self._offset)

    def _start_again(self) -> None:
        self._runs.clear()
        self._offset = 0
        self._summaries = overview.approved(self.config)

    def _read_from(self, offset: int) -> None:
        """The complete lines from ``offset`` on; a half-written last line waits."""
        try:
            with open(self.path, "rb") as f:
                f.seek(offset)
                rest = b""
                while chunk := f.read(READ_BYTES):
                    rest += chunk
                    end = rest.rfind(b"\n")
                    if end < 0:
                        continue
                    self._take(rest[:end + 1])
                    self._offset += end + 1
                    rest = rest[end + 1:]
        except FileNotFoundError:
            return

    def _take(self, block: bytes) -> None:
        for line in block.splitlines():
            if not line.strip():
                continue
            try:
                raw = json.loads(line.decode("utf-8", "surrogateescape"))
            except ValueError:
                log.warning("a damaged line of %s was skipped", self.path.name)
                continue
            if not isinstance(raw, dict):
                continue
            run = RunRecord.from_dict(raw)
            self._runs.append(run)
            if run.disk.uuid:
                summary = self._summaries.get(normalise_uuid(run.disk.uuid))
                if summary is not None:
                    overview.take(summary, run)  # the same fold as overview.disks
