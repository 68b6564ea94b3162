"""What the command line prints, as text: the run summary, verify's report, the live
status line, the disk tables. Plain functions of plain data; ``cli`` prints them."""

from __future__ import annotations

from typing import Any

from immich_usb_backup import history
from immich_usb_backup.record import RunRecord, readable
from immich_usb_backup.text import duration, human_bytes, plural


def format_summary(r: RunRecord) -> str:
    lines = [
        f"backup {r.status.upper()}",
        f"  disk:     {r.disk.label or '-'} (UUID {r.disk.uuid})" if r.disk.uuid
        else f"  disk:     {r.target or '-'}",
        f"  copied:   {plural(r.files_transferred, 'file')}, "
        f"{human_bytes(r.bytes_transferred or 0)}",
        f"  took:     {r.duration_s} s",
        *(f"  {line}" for line in r.finished_lines),
        *(f"  {note}" for note in r.notes),
    ]
    problems = r.problems
    if problems:
        lines.append(f"  problems ({len(problems)}):")
        lines += [f"    - {p}" for p in problems]
    return "\n".join(lines)


def format_verify(r: Any) -> str:
    from immich_usb_backup import drill  # noqa: PLC0415 - only verify needs it

    disk = r.disk
    share = (f" (a random {r.sample_percent:g}% sample)" if r.sample_percent is not None
             and r.sample_percent < 100 else "")
    lines = [
        f"verify {'OK' if r.ok else 'FAILED'}",
        f"  disk:      {disk.get('label') or '-'} (UUID {disk.get('uuid') or '-'}) at "
        f"{disk.get('mount_point')}",
        f"  manifest:  {plural(r.manifest_entries, 'file')} listed in library.sha256; "
        f"{plural(r.files_on_disk, 'file')} in library/",
        f"  read back: {plural(r.checked_files, 'file')}, {human_bytes(r.checked_bytes)}"
        f"{share}",
        f"  database:  {plural(r.dumps_checked, 'dump')} read to the end; config: "
        f"{plural(r.archives_checked, 'archive')} tested",
    ]
    for title, found in (("changed (contents differ from the manifest)", r.changed),
                         ("unreadable", r.unreadable),
                         ("missing (listed, not on the disk)", r.missing),
                         ("unexpected (on the disk, not listed)", r.unexpected),
                         ("damaged dumps or archives", r.damaged),
                         ("assets: problems", r.asset_problems),
                         ("manifest lines that cannot be read", r.bad_lines)):
        if found.count:
            lines.append(f"  {title}: {found.count}")
            lines += [f"    - {p}" for p in found.paths]
            if found.count > len(found.paths):
                lines.append(f"    ... and {found.count - len(found.paths)} more")
    if r.assets is not None:
        lines.append(f"  {r.assets['line']}")
    if r.health is not None:
        lines.append(f"  {r.health['line']}")
    if r.drill is not None:
        lines += format_drill(r.drill)
    lines.append(f"  last restore drill: {drill.describe(r.last_drill, drill.plain_time)}")
    return "\n".join(lines)


def format_drill(d: Any) -> list[str]:
    """The lines of ``verify``'s output for a restore drill (a ``drill.DrillResult``)."""
    version = f", PostgreSQL {d.postgres_version}" if d.postgres_version else ""
    lines = [f"  restore drill: {'PASSED' if d.passed else 'FAILED'} in "
             f"{d.duration_s:g} s{version}",
             f"    dump:      {d.dump or '-'}" + (f" ({d.kind})" if d.kind else "")]
    counts = [f"{c.table} {'?' if c.rows is None else c.rows}"
              for c in d.tables.values() if c.table]
    if d.tables:
        where = f" (database {d.database})" if d.database else ""
        lines.append(f"    rows:      {', '.join(counts) or 'no Immich table found'}{where}")
    lines += [f"    problem:   {p}" for p in d.problems]
    if d.failed_count:
        lines.append(f"    failed statements ({d.failed_count}; the load went on):")
        for f in d.failed:
            where = f" [database {f.database}]" if f.database else ""
            lines.append(f"      - {f.error}{where}")
            if f.statement:
                lines.append(f"        {' '.join(f.statement.split())}")
        if d.failed_count > len(d.failed):
            lines.append(f"      ... and {d.failed_count - len(d.failed)} more")
    return lines


def format_status_line(st: dict[str, Any]) -> str:
    done, total = int(st.get("bytes_done") or 0), int(st.get("bytes_total") or 0)
    parts = [f"[{st.get('phase', '?')}]"]
    if total:
        pct = float(st.get("percent") or 0.0)
        filled = int(pct / 5)
        parts.append(f"{'#' * filled}{'.' * (20 - filled)} {pct:5.1f}%")
        parts.append(f"{human_bytes(done)} / {human_bytes(total)}")
        if st.get("rate_bps"):
            parts.append(f"{human_bytes(int(st['rate_bps']))}/s")
        if st.get("eta_s") is not None:
            parts.append(f"ETA {_clock(int(st['eta_s']))}")
    if st.get("detail"):
        parts.append(str(st["detail"]))
    return "  ".join(parts)


def _clock(seconds: int) -> str:
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}"


def format_disks_all(rows: list[dict[str, Any]]) -> str:
    table = [("label", "uuid", "last backup", "age", "free", "files", "last check", "health")]
    for r in rows:
        age = r["age_days"]
        when = str(r["last_backup_at"] or "never")[:16].replace("T", " ")
        check = ("-" if r["last_verify_at"] is None else
                 f"{str(r['last_verify_at'])[:10]} "
                 f"{'passed' if r['last_verify_passed'] else 'FAILED'}")
        free = (f"{human_bytes(r['free_bytes'])} of {human_bytes(r['size_bytes'])}"
                if r["free_bytes"] is not None and r["size_bytes"] else "-")
        table.append((
            str(r["label"] or "-"), str(r["uuid"]), when,
            "-" if age is None else f"{age} d{' OVERDUE' if r['overdue'] else ''}",
            free, "-" if r["files"] is None else str(r["files"]), check,
            str((r.get("health") or {}).get("line") or "-")))
    return history.columns(table)


def format_disks(rows: list[dict[str, Any]]) -> str:
    """``disks``: the USB exFAT disks connected now, one row each."""
    table: list[tuple[str, ...]] = [
        ("device", "label", "size", "model", "uuid", "marker", "approved", "health")]
    for r in rows:
        marker = {"marked": "yes", "legacy": "old name", None: "no"}[r["marker"]]
        if r["mount_point"] is None:
            marker = "? (not mounted)"
        approved = "yes" if r["approved"] else "any marked" if r.get("any_marked") else "no"
        table.append((r["device"], r["label"] or "-", human_bytes(r["size"]),
                      r["model"] or "-", r["uuid"] or "-", marker, approved,
                      str((r.get("health") or {}).get("line") or "-").removeprefix("health: ")))
    return history.columns(table)


# restore --------------------------------------------------------------------------------

_CONTROL = {i: f"\\x{i:02x}" for i in [*range(0x20), *range(0x7F, 0xA0)]}


def printable(text: object) -> str:
    """``text`` from a disk or a dump (a dump's name, a psql error quoting the dump) safe
    on one terminal line: control characters and bytes that are not UTF-8 escaped."""
    return readable(str(text).translate(_CONTROL))

RESTORE_TITLES = {"success": "restore OK", "failed": "restore FAILED",
                  "refused": "restore REFUSED: nothing was done",
                  "planned": "restore plan (--dry-run: nothing was done)",
                  "declined": "restore not confirmed: nothing was done"}


def format_dump_list(found: list[Any]) -> str:
    """``restore SOURCE --list``: the dumps on the disk (``restore.DumpInfo``), newest
    first."""
    if not found:
        return "no database dump on the disk (immich-server-backups/database/)"
    table = [("dump", "taken", "immich", "postgresql", "size", "kind")]
    for n, d in enumerate(found):
        taken = "-" if d.taken is None else f"{d.taken:%Y-%m-%d %H:%M}"
        table.append((printable(d.name) + (" (newest)" if n == 0 else ""), taken,
                      printable(d.immich or "?"), printable(d.postgres or "?"),
                      human_bytes(d.size), d.kind or f"damaged: {d.problem}"))
    return history.columns(table)


def format_restore_plan(p: Any) -> str:
    """What a restore would do (a ``restore.Plan``), and what is refused."""
    disk = p.disk
    last = p.backup.get("finished_at") or p.backup.get("started_at")
    lines = [f"  from:      {disk.get('label') or '-'} (UUID {disk.get('uuid') or '-'}) at "
             f"{disk.get('mount_point')}" + (f", last backup {last} "
                                             f"({p.backup.get('status', '?')})" if last else "")]
    size = ("?" if p.library_files is None else
            f"{plural(p.library_files, 'file')}, {human_bytes(p.library_bytes or 0)}")
    where = {"absent": "made new", "empty": "empty",
             "not empty": "not empty: only what it lacks is copied (--merge)"}[p.dest_state]
    free = "" if p.free_bytes is None else f"; {human_bytes(p.free_bytes)} free there"
    lines += [f"  files:     library/ ({size}) into {p.dest} ({where})",
              f"             owner {p.owner_text}, folders 0750, files 0640{free}",
              "             each checked against library.sha256 as it is written"
              if p.manifest else "             not checked: the disk has no library.sha256"]
    if p.dump is not None:
        d = p.dump
        facts = ", ".join(x for x in (d.kind, d.immich and f"Immich {printable(d.immich)}",
                                      human_bytes(d.size)) if x)
        lines.append(f"  database:  {printable(d.name)} ({facts})")
        lines.append(f"             into {p.target}{_db_state(p)}")
        if p.cluster_database:
            lines.append(f"             (a cluster dump: the statements of its database "
                         f"{p.cluster_database})")
        if p.save_to is not None:
            lines.append(f"             the database it holds is saved first to {p.save_to}")
    if p.config_archive is not None:
        lines.append(f"  config:    {p.config_archive.name} "
                     f"({plural(p.config_files, 'file')}) into {p.config_to}, a folder of "
                     "its own: nothing of the server's is replaced")
    lines.append(f"  then:      the asset check: every asset of the restored database "
                 f"under {p.dest} with Immich's checksum")
    lines += [f"  note:      {printable(n)}" for n in p.notes]
    if p.refusals:
        lines.append(f"  refused ({len(p.refusals)}):")
        lines += [f"    - {printable(r)}" for r in p.refusals]
    return "\n".join(lines)


def _db_state(p: Any) -> str:
    if p.immich_version:
        return f" (Immich {p.immich_version} restores it itself)"
    db = p.db
    if db is None or not db.reachable:
        return ""
    held = (f"holds Immich's tables, {plural(db.assets or 0, 'asset')}" if db.immich_tables
            else "no Immich tables")
    return f" (database {db.database}, PostgreSQL {db.server_version}: {held})"


def format_restore(o: Any) -> str:
    """The outcome of ``restore`` (a ``restore.Outcome``): the plan when nothing was
    done, else what was done, in numbers, and every problem."""
    title = RESTORE_TITLES.get(o.status, f"restore {o.status}")
    if o.status in ("refused", "planned", "declined"):
        return "\n".join([title, format_restore_plan(o.plan)]) if o.plan else title
    lines = [f"{title} in {duration(o.duration_s)}"]
    if o.files is not None:
        f = o.files
        lines.append(f"  files:     {_files_line(f, o.plan.dest)}")
    db = o.database
    if db is not None:
        done = "loaded" if db.loaded else "NOT loaded"
        rows = f": {plural(db.counts['assets'], 'asset')}" if "assets" in db.counts else ""
        lines.append(f"  database:  {printable(db.dump)} {done} into {db.into}{rows}")
        if db.saved_to is not None:
            lines.append(f"  saved:     the database as it was: {db.saved_to}")
        if db.api is not None and db.api.uploaded:
            lines.append(f"             uploaded as {db.api.uploaded}; Immich answered "
                         f"again after {duration(db.api.waited_s)}")
    c = o.config
    if c is not None:
        lines.append(f"  config:    {c.archive}: {plural(c.files, 'file')} into {c.folder}; "
                     "put back by hand what you need:")
        for place, count in c.places[:20]:
            lines.append(f"               {printable(place)}  <- {c.folder}"
                         f"{printable(place)} ({plural(count, 'file')})")
        if len(c.places) > 20:
            lines.append(f"               ... and {len(c.places) - 20} more")
    if o.check_line:
        lines.append(f"  check:     {o.check_line}")
    if o.problems:
        lines.append(f"  problems ({len(o.problems)}):")
        lines += [f"    - {printable(p)}" for p in o.problems]
    if o.status == "success":
        lines.append("  next:      start Immich (docker compose up -d; NixOS: systemctl "
                     "start immich-server)")
    return "\n".join(lines)


def _files_line(f: Any, dest: Any) -> str:
    head = f"{plural(f.files, 'file')}, {human_bytes(f.bytes)} into {dest}"
    if f.kept:
        head += f", {plural(f.kept, 'file')} already there (left as they were)"
    if not f.manifest:
        return f"{head}; not checked (the disk has no library.sha256)"
    if f.ok:
        return f"{head}, all {f.matched} matching library.sha256"
    return f"{head}, {f.matched} matching library.sha256"
