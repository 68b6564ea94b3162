"""The command line with one piece of the product left out: a benchmark's "without" side.

    python bench/variant.py --without-asset-check -- -c CONFIG run /mnt/backup
    python bench/variant.py --without-sha1 -- -c CONFIG run /mnt/backup

``--without-asset-check``: the run's steps without the asset check (the same run as the
product's in every other way). ``--without-sha1``: SHA-1 is not computed beside SHA-256
(every file's SHA-1 is then stored as unknown, None, and the asset check counts the
originals as not read yet). Benchmarks only: the product has no such switches.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "daemon"))


class _NoHash:
    def update(self, data: Any) -> None:
        return

    def hexdigest(self) -> None:
        return None  # the SHA-1 not known (as for a file never read), not a SHA-1 of ""


class _HashlibWithoutSha1:
    def __init__(self, real: Any) -> None:
        self._real = real

    def sha1(self, *args: Any, **kwargs: Any) -> _NoHash:
        return _NoHash()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def main(argv: list[str]) -> int:
    split = argv.index("--") if "--" in argv else len(argv)
    options, rest = argv[:split], argv[split + 1:]
    if "--without-asset-check" in options:
        from immich_usb_backup import flow, steps  # noqa: PLC0415 - after sys.path

        defaults = flow.run_backup.__kwdefaults__
        assert defaults is not None
        defaults["steps"] = tuple(s for s in steps.STEPS if s.name != "assets")
    if "--without-sha1" in options:
        from immich_usb_backup import hashing  # noqa: PLC0415

        hashing.hashlib = _HashlibWithoutSha1(hashing.hashlib)  # type: ignore[assignment]
    from immich_usb_backup.cli import main as cli_main  # noqa: PLC0415

    return cli_main(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
