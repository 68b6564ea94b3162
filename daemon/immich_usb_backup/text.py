"""The words every output shares: counts with their nouns, sizes, durations.

Messages, the run summary, the history page and the command line all say "1 file",
"2 files", "1.5 GiB" and "1 min 35 s" through these helpers, so a count never meets
its noun in the wrong number (see docs/design.md, "Text").
"""

from __future__ import annotations

_IRREGULAR = {"was": "were", "is": "are", "has": "have", "it": "they", "this": "these",
              "its": "their"}


def plural(n: int | None, noun: str, many: str | None = None) -> str:
    """``plural(1, "file")`` -> ``1 file``; ``plural(0, "file")`` -> ``0 files``.

    ``many`` is the plural form when adding ``s`` is wrong (``plural(2, "entry")`` knows
    ``entries``). An unknown count (None) reads ``? files``.
    """
    word = noun if n == 1 else (many or plural_of(noun))
    return f"{'?' if n is None else n} {word}"


def plural_of(noun: str) -> str:
    """The plural of ``noun`` (a last word from ``_IRREGULAR``, else with ``s``)."""
    head, _, last = noun.rpartition(" ")
    word = _IRREGULAR.get(last) or (last[:-1] + "ies" if last.endswith("y")
                                    and last[-2:-1] not in "aeiou" else last + "s")
    return f"{head} {word}" if head else word


def word(n: int | None, singular: str, many: str | None = None) -> str:
    """Just the noun (or verb) in the number ``n`` asks for: ``word(2, "was")`` -> ``were``."""
    return singular if n == 1 else (many or _IRREGULAR.get(singular) or plural_of(singular))


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def duration(seconds: float) -> str:
    """95.3 -> ``1 min 35 s``; 4.2 -> ``4.2 s``: for messages and summaries."""
    s = round(seconds)
    if s < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


def short_duration(seconds: float) -> str:
    """95 -> ``1m35s``: short, for tables."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
