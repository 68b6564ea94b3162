"""The asset check: every original Immich recorded is on the disk, with Immich's SHA-1.

Two plain steps over streams, memory bounded:

1. ``Classifier.items``: the dump's rows (``assets.DumpReader.rows``) become the files the
   disk should hold, as paths inside the mirror (``library/`` on the disk): each
   original (``Original``, with Immich's checksum) and each of its other files
   (``Derived``: thumbnails, previews, sidecars, encoded videos; existence only). Rows of
   external libraries, offline and deleted rows are counted and skipped (``Tally``). The
   prefix of ``originalPath`` (Immich's media location: ``/data``, ``/usr/src/app/upload``,
   ``upload`` in old dumps, the host's folder without docker) is found from the rows, or
   set (``[immich] media_location``).
2. ``check``: each file looked up in the mirror's state (a ``Lookup``: is it there, its
   SHA-1 if known), a chunk of paths at a time; the outcome (``AssetCheck``) is counts,
   one summary line and the problems, each file named (the first ``keep`` of a kind).

docs/usage.md ("The asset check") says what it proves and what it cannot.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from immich_usb_backup.assets import AssetRow, FileRow, Row, shown
from immich_usb_backup.text import plural, word

# Immich's folders in the upload location: what follows the media location in a path
FOLDERS = ("upload", "library", "encoded-video", "thumbs", "profile", "backups")
PREFIX_SAMPLE = 1000  # rows the media location is found from
CHUNK = 500  # paths per lookup
KEEP = 20  # files named per kind of problem; the rest are counted
MIRROR = "library"  # the mirror's folder on the disk, as the messages name it
# files of an asset a restore cannot make again: missing ones are problems
PRECIOUS = frozenset({"sidecar"})


# 1. From rows to files -----------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Original:
    """An original Immich recorded: its path inside the mirror and Immich's SHA-1."""

    rel: str
    sha1: str | None  # hex; None when the row has none (or one of another kind)
    trashed: bool = False


@dataclass(frozen=True, slots=True)
class Derived:
    """Another file of an asset (``asset_file``), checked for existence only."""

    rel: str
    type: str


Item = Original | Derived


@dataclass
class Tally:
    """The rows the check does not look up, counted; filled while ``items`` runs."""

    rows: int = 0  # asset rows read
    external: int = 0  # in an external library (not in the upload location)
    offline: int = 0
    deleted: int = 0  # status "deleted": Immich is removing them
    no_path: int = 0  # originalPath NULL
    outside: int = 0  # local rows whose path is not under the media location
    outside_examples: list[str] = field(default_factory=list)
    files_outside: int = 0  # asset files outside it (sidecars of external assets)
    other_checksum: int = 0  # a checksum that is not the content's SHA-1: presence only
    prefix: str | None = None  # the media location's prefix, as used
    prefix_set: bool = False  # given by the configuration, not found from the rows


def location_prefix(media_location: str) -> str:
    """``/data`` -> ``/data/``; ``./upload`` -> ``upload/``; ``""`` or ``.`` -> ``""``."""
    value = media_location.strip().removeprefix("./").rstrip("/")
    return "" if value in ("", ".") else value + "/"


def candidates(path: str) -> list[str]:
    """The prefixes ``path`` could have: what precedes each of Immich's folder names
    among its folders (``/data/upload/u/x.jpg`` -> ``["/data/"]``)."""
    parts = path.split("/")
    return ["/".join(parts[:i]) + "/" if i else "" for i, part in enumerate(parts[:-1])
            if part in FOLDERS]


def find_prefix(paths: Sequence[str], probe: Lookup | None = None) -> str | None:
    """The media location's prefix of ``paths``: the candidate most of them share; of
    several, the one under which ``probe`` finds the most of the first ``CHUNK`` paths in
    the mirror, then the longest (``upload/`` before ``""`` when every path starts
    ``upload/upload/`` or ``upload/library/``, as Immich's relative paths did; wrong when
    every path also runs through an album folder named like one of Immich's). None when
    no path has one."""
    count: Counter[str] = Counter()
    for path in paths:
        count.update(set(candidates(path)))
    if not count:
        return None
    most = max(count.values())
    tied = [c for c in count if count[c] == most]
    found: dict[str, int] = {}
    if probe is not None and len(tied) > 1:
        for c in tied:
            rels = [r for p in paths[:CHUNK] if (r := to_rel(p, c)) is not None]
            found[c] = sum(s.present for s in probe(rels)) if rels else 0
    return max(tied, key=lambda c: (found.get(c, 0), len(c)))


def to_rel(path: str, prefix: str) -> str | None:
    """``path`` inside the mirror, or None when it is not under ``prefix`` or is not a
    plain relative path there (empty, ``.`` or ``..`` parts: never outside ``library/``)."""
    if not path.startswith(prefix):
        return None
    rel = path[len(prefix):]
    if not rel or any(part in ("", ".", "..") for part in rel.split("/")):
        return None
    return rel


class Classifier:
    """Turns a dump's rows into ``Item`` s; ``tally`` counts the rest."""

    def __init__(self, media_location: str | None = None, *, probe: Lookup | None = None,
                 sample: int = PREFIX_SAMPLE) -> None:
        """``media_location``: the configured one (None: found from the rows); ``probe``:
        the mirror's lookup, to choose between prefixes the rows share equally."""
        self.tally = Tally()
        self.sample = sample
        self.probe = probe
        if media_location is not None:
            self.tally.prefix, self.tally.prefix_set = location_prefix(media_location), True

    def items(self, rows: Iterable[Row]) -> Iterator[Item]:
        """The files of ``rows`` the disk should hold, in the rows' order, except that the
        first ``sample`` rows (of assets in the upload location and of asset files, which
        older dumps hold first) wait until the media location is found from them."""
        held: list[Row] = []
        decided = self.tally.prefix_set
        for row in rows:
            if isinstance(row, AssetRow) and not self._local(row):
                continue
            if decided:
                yield from self._files(row)
                continue
            held.append(row)
            if len(held) >= self.sample:
                yield from self._decide(held)
                decided = True
        if held:
            yield from self._decide(held)

    def _decide(self, held: list[Row]) -> Iterator[Item]:
        """Find the prefix from the ``held`` rows, then give their files (and forget
        them)."""
        paths = [r.original_path if isinstance(r, AssetRow) else r.path for r in held]
        self.tally.prefix = find_prefix([p for p in paths if p is not None], self.probe)
        for waiting in held:
            yield from self._files(waiting)
        held.clear()

    def _local(self, row: AssetRow) -> bool:
        """Count a row the check skips; True for the others."""
        t = self.tally
        t.rows += 1
        if row.status == "deleted":
            t.deleted += 1
        elif row.external:
            t.external += 1
        elif row.offline:
            t.offline += 1
        elif row.original_path is None:
            t.no_path += 1
        else:
            return True
        return False

    def _files(self, row: Row) -> Iterator[Item]:
        t = self.tally
        if isinstance(row, FileRow):
            if row.path is not None:
                yield from self._derived(row.path, row.type or "file")
            return
        assert row.original_path is not None
        rel = None if t.prefix is None else to_rel(row.original_path, t.prefix)
        if rel is None:
            t.outside += 1
            if len(t.outside_examples) < 3:
                t.outside_examples.append(shown(row.original_path))
            return
        sha1 = None
        if row.checksum is not None and len(row.checksum) == 20 and row.algorithm in (
                None, "sha1"):
            sha1 = row.checksum.hex()
        elif row.checksum is not None:
            t.other_checksum += 1
        yield Original(rel, sha1, row.trashed)
        if row.sidecar_path is not None:
            yield from self._derived(row.sidecar_path, "sidecar")
        if row.encoded_video_path:  # older versions: "" when there is none
            yield from self._derived(row.encoded_video_path, "encoded_video")

    def _derived(self, path: str, kind: str) -> Iterator[Item]:
        rel = None if self.tally.prefix is None else to_rel(path, self.tally.prefix)
        if rel is None:
            self.tally.files_outside += 1
        else:
            yield Derived(rel, kind)


# 2. The check ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Seen:
    """What the mirror holds at a path: whether the file is there and its SHA-1 (hex) if
    known. ``read_from`` says whose bytes that SHA-1 is of (``WHOSE``): ``"server"`` (the
    server's file, read when it was copied or compared; the disk holds a copy of those
    bytes), ``"disk"`` (the disk's copy, read back) or ``"kept"`` (see ``WHOSE``).
    ``on_server``: whether the server has the file, when the lookup knows (asked only
    for files missing from the disk)."""

    present: bool
    sha1: str | None = None
    read_from: str = "server"
    on_server: bool | None = None


Lookup = Callable[[Sequence[str]], Sequence[Seen]]
# whose bytes a differing SHA-1 is of, as a problem says it (``Seen.read_from``); "kept":
# a file a restore with --merge found in the upload location and left as it was
WHOSE = {"server": "the server's file (and the disk's copy of it)",
         "disk": "the disk's copy", "kept": "the file the upload location already had"}


@dataclass
class _Named:
    """A kind of problem: the first ``keep`` lines, and how many there were."""

    lines: list[str] = field(default_factory=list)
    count: int = 0

    def add(self, line: str, keep: int) -> None:
        self.count += 1
        if len(self.lines) < keep:
            self.lines.append(line)


@dataclass
class AssetCheck:
    """The outcome: counts, ``line()`` and ``problems()``."""

    tally: Tally = field(default_factory=Tally)
    originals: int = 0  # originals in the upload location, not trashed
    on_disk: int = 0
    missing: int = 0
    excluded: int = 0  # their paths are excluded from the mirror (library.excludes)
    matched: int = 0  # SHA-1 equal to Immich's checksum
    differ: int = 0
    not_read: int = 0  # on the disk, SHA-1 not known yet
    no_checksum: int = 0
    trashed: int = 0
    trashed_missing: int = 0  # in the trash and no longer on the disk: not a problem
    files: int = 0  # asset files (thumbnails, ...) looked up
    files_on_disk: int = 0
    files_missing: Counter[str] = field(default_factory=Counter)  # by type
    sampled_from: int | None = None  # set when only a sample was checked
    dump_problems: list[str] = field(default_factory=list)
    checked: bool = True  # False: the dump had nothing to check against
    _named: dict[str, _Named] = field(default_factory=dict)

    def name(self, kind: str, line: str, keep: int) -> None:
        self._named.setdefault(kind, _Named()).add(line, keep)

    def add(self, item: Item, seen: Seen, excluded: Callable[[str], bool] | None = None,
            keep: int = KEEP) -> None:
        """Count ``item`` as ``seen`` in the mirror; name it when it is a problem."""
        if isinstance(item, Original):
            _original(self, item, seen, excluded, keep)
        else:
            _derived(self, item, seen, excluded, keep)

    def problems(self) -> list[str]:
        """Each problem on a line of its own, prefixed ``assets:``; beyond the first
        ``keep`` of a kind, one line says how many more."""
        out = [f"assets: {p}" for p in self.dump_problems]
        t = self.tally
        if self.checked and t.outside:
            where = (f"under {shown(t.prefix)}" if t.prefix is not None
                     else "where Immich's media location could be found")
            out.append(
                f"assets: {plural(t.outside, 'asset')} of the upload location "
                f"{word(t.outside, 'is')} not {where}, so not checked (for example "
                f"{'; '.join(t.outside_examples)}): set [immich] media_location to the "
                "folder Immich's paths start with")
        order = {"missing": 0, "differ": 1}  # then the others, as they came
        for _, named in sorted(self._named.items(), key=lambda kv: order.get(kv[0], 2)):
            out.extend(f"assets: {line}" for line in named.lines)
            if named.count > len(named.lines):
                out.append(f"assets: ... and {named.count - len(named.lines)} more like "
                           "the above")
        return out

    def line(self) -> str:
        """The one line for the summary, the message, the history and the page."""
        if not self.checked:
            return "assets: not checked (" + "; ".join(self.dump_problems) + ")"
        n = self.originals
        head = (f"assets: {n} in the database" if self.sampled_from is None else
                f"assets: {n} of {self.sampled_from} in the database checked (a sample)")
        parts = [head]
        if n and not self.missing and not self.excluded:
            parts.append("all on the disk")
        elif n:
            parts.append(f"{self.on_disk} on the disk")
            if self.missing:
                parts.append(f"{self.missing} missing")
            if self.excluded:
                parts.append(f"{self.excluded} excluded from the backup")
        if n:
            parts.append(f"{self.matched} matched by Immich's checksum")
        if self.differ:
            parts.append(f"{self.differ} {word(self.differ, 'differs', 'differ')}")
        if self.not_read:
            parts.append(f"{self.not_read} not read yet")
        if self.no_checksum:
            parts.append(f"{self.no_checksum} without a checksum")
        groups = [", ".join(parts)]
        if self.trashed:
            gone = (f" ({self.trashed_missing} of them no longer on the disk)"
                    if self.trashed_missing else "")
            groups.append(f"{self.trashed} in the trash{gone}")
        t = self.tally
        skipped = [f"{c} {what}" for c, what in ((t.external, "external"),
                                                  (t.offline, "offline"),
                                                  (t.deleted, "being deleted")) if c]
        if skipped:
            groups.append("skipped " + ", ".join(skipped))
        if t.outside:
            groups.append(f"{t.outside} outside the upload location")
        if self.files:
            if self.files_on_disk < self.files:
                groups.append(f"{self.files_on_disk} of {plural(self.files, 'asset file')} "
                              "on the disk")
            else:
                groups.append(f"{plural(self.files, 'asset file')} on the disk")
        return "; ".join(groups)

    def as_dict(self) -> dict[str, Any]:
        """The counts, for the run's record and ``backup-info.toml``."""
        t = self.tally
        return {
            "checked": self.checked, "originals": self.originals, "on_disk": self.on_disk,
            "missing": self.missing, "excluded": self.excluded, "matched": self.matched,
            "differ": self.differ, "not_read": self.not_read,
            "no_checksum": self.no_checksum, "trashed": self.trashed,
            "trashed_missing": self.trashed_missing, "external": t.external,
            "offline": t.offline, "deleted": t.deleted, "outside": t.outside,
            "files": self.files, "files_on_disk": self.files_on_disk,
            "files_missing": dict(self.files_missing), "media_location": t.prefix,
            "sampled_from": self.sampled_from,
        }


    def state(self) -> dict[str, Any]:
        """Everything, for ``from_state`` (the check remembered between runs)."""
        return {**asdict(self), "files_missing": dict(self.files_missing)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> AssetCheck:
        fields = dict(state)
        fields["tally"] = Tally(**fields["tally"])
        fields["files_missing"] = Counter(fields["files_missing"])
        fields["_named"] = {k: _Named(**v) for k, v in fields["_named"].items()}
        return cls(**fields)


def not_checked(problems: Iterable[str]) -> AssetCheck:
    """The outcome when the dump has nothing to check against (``DumpReader.problems``)."""
    return AssetCheck(checked=False, dump_problems=list(problems))


def check(items: Iterable[Item], lookup: Lookup, tally: Tally | None = None, *,
          excluded: Callable[[str], bool] | None = None, keep: int = KEEP,
          dump_problems: Iterable[str] = ()) -> AssetCheck:
    """Look each item up (``CHUNK`` paths a call) and count what is found.

    ``tally`` is the classifier's (read at the end: it is filled while ``items`` runs);
    ``excluded(rel)`` says whether the backup leaves that path out on purpose (such files
    are counted, not missing); ``dump_problems`` are the reader's (``DumpReader.problems``).
    """
    return check_pairs(_looked_up(items, lookup), tally, excluded=excluded, keep=keep,
                       dump_problems=dump_problems)


def _looked_up(items: Iterable[Item], lookup: Lookup) -> Iterator[tuple[Item, Seen]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, CHUNK)):
        yield from zip(chunk, lookup([item.rel for item in chunk]), strict=True)


def check_pairs(pairs: Iterable[tuple[Item, Seen]], tally: Tally | None = None, *,
                excluded: Callable[[str], bool] | None = None, keep: int = KEEP,
                dump_problems: Iterable[str] = ()) -> AssetCheck:
    """``check`` of items already looked up (a join made elsewhere)."""
    result = AssetCheck(dump_problems=list(dump_problems))
    for item, s in pairs:
        result.add(item, s, excluded, keep)
    if tally is not None:
        result.tally = tally
    return result


def _where(s: Seen) -> str:
    if s.on_server is False:
        return "is missing from the server and from the disk"
    if s.on_server:
        return "is on the server but not on the disk"
    return "is not on the disk"


def _original(result: AssetCheck, item: Original, s: Seen,
              excluded: Callable[[str], bool] | None, keep: int) -> None:
    if item.trashed:
        result.trashed += 1
    else:
        result.originals += 1
    if not s.present:
        if excluded is not None and excluded(item.rel):
            result.excluded += 1
        elif item.trashed:
            result.trashed_missing += 1
        else:
            result.missing += 1
            result.name("missing", f"{shown(f'{MIRROR}/{item.rel}')} {_where(s)}: Immich has "
                        "it in its database", keep)
        return
    if not item.trashed:
        result.on_disk += 1
    if item.sha1 is None:
        if not item.trashed:
            result.no_checksum += 1
        return
    if s.sha1 is None:
        if not item.trashed:
            result.not_read += 1
        return
    if s.sha1 == item.sha1:
        if not item.trashed:
            result.matched += 1
        return
    if not item.trashed:
        result.differ += 1
    whose = WHOSE.get(s.read_from, WHOSE["server"])
    trash = " (in the trash)" if item.trashed else ""
    result.name("differ", f"{shown(f'{MIRROR}/{item.rel}')}{trash} changed or damaged since "
                "it was uploaded: "
                f"{whose} has SHA-1 {s.sha1}, Immich recorded {item.sha1}", keep)


def _derived(result: AssetCheck, item: Derived, s: Seen,
             excluded: Callable[[str], bool] | None, keep: int) -> None:
    result.files += 1
    if s.present:
        result.files_on_disk += 1
        return
    if excluded is not None and excluded(item.rel):
        return
    result.files_missing[item.type] += 1
    if item.type in PRECIOUS:
        result.name(f"missing {item.type}",
                    f"the {shown(item.type)} {shown(f'{MIRROR}/{item.rel}')} {_where(s)}",
                    keep)


# Sampling ----------------------------------------------------------------------------------

class Sample:
    """A random share of the originals, for ``verify --sample``; the asset files are left
    out. ``take``: at most ``size`` of them, each as likely as any other (reservoir
    sampling: memory for ``size`` items, one pass); ``share``: a percentage, streamed.
    ``seen`` counts the originals (not trashed) offered."""

    def __init__(self, size: int = 0, rng: random.Random | None = None) -> None:
        self.size = size
        self.seen = 0
        self._offered = 0
        self._rng = rng or random.Random()  # noqa: S311  (a sample, not a secret)
        self.kept: list[Original] = []

    def take(self, items: Iterable[Item]) -> None:
        for item in items:
            if not isinstance(item, Original):
                continue
            if not item.trashed:
                self.seen += 1
            self._offered += 1
            if len(self.kept) < self.size:
                self.kept.append(item)
            else:
                j = self._rng.randrange(self._offered)
                if j < self.size:
                    self.kept[j] = item

    def share(self, items: Iterable[Item], percent: float) -> Iterator[Original]:
        """Each original (in the trash or not) with a chance of ``percent`` %, passed on as
        it comes (nothing held but one spare); at least one when there is any, as a small
        share of a small library can draw none. ``seen`` counts as in ``take``."""
        spare: Original | None = None
        drawn = False
        for item in items:
            if not isinstance(item, Original):
                continue
            if not item.trashed:
                self.seen += 1
            self._offered += 1
            if self._rng.random() * 100 < percent:
                drawn = True
                yield item
            elif not drawn and self._rng.randrange(self._offered) == 0:
                spare = item
        if not drawn and spare is not None:
            yield spare
