"""Unit tests for policy.py: pure decisions on plain data."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from immich_usb_backup.policy import (
    SpaceNeed,
    archives_to_prune,
    capacity_refusal,
    delete_limit,
    deletion_refusal,
    exfat_fold,
    exfat_name_problem,
)
from immich_usb_backup.text import human_bytes

EMOJI = "\U0001f600"  # outside the BMP: two UTF-16 units


# exfat_name_problem ------------------------------------------------------------------


@pytest.mark.parametrize("char", list('"*:<>?\\|'))
def test_each_forbidden_character_is_a_problem_naming_it(char: str) -> None:
    problem = exfat_name_problem(f"IMG{char}0001.jpg")
    assert problem is not None
    assert "characters exFAT cannot store" in problem
    assert char in problem


@pytest.mark.parametrize("char", ["\x01", "\t", "\n", "\r", "\x1b", "\x1f"])
def test_control_characters_are_a_problem(char: str) -> None:
    problem = exfat_name_problem(f"a{char}b.jpg")
    assert problem is not None
    assert "exFAT cannot store" in problem
    assert repr(char) in problem


def test_several_bad_characters_are_all_named_once() -> None:
    problem = exfat_name_problem("a:b:c?d.jpg")
    assert problem is not None
    assert problem.endswith("(: ?)")


@pytest.mark.parametrize(
    "name",
    [
        "IMG_0001.jpg",
        "my holiday photo.jpg",
        " leading and trailing space .jpg",
        "Müller ü.jpg",
        "日本.heic",
        "a" * 255,
        "a" * 253 + EMOJI,
        EMOJI * 127 + "a",
        "x.y.z",
        "#hash;semi,comma=eq+plus@at&amp!'quote(1)[2]{3}~",
        "del\x7fchar",
    ],
)
def test_names_exfat_can_hold_have_no_problem(name: str) -> None:
    assert exfat_name_problem(name) is None


def test_name_of_exactly_255_utf16_units_is_fine() -> None:
    assert exfat_name_problem("b" * 251 + ".jpg") is None


def test_name_of_256_utf16_units_is_too_long() -> None:
    problem = exfat_name_problem("b" * 252 + ".jpg")
    assert problem is not None
    assert "255" in problem


def test_emoji_counts_as_two_utf16_units() -> None:
    name = "a" * 254 + EMOJI  # 255 Python characters, 256 UTF-16 units
    assert len(name) == 255
    problem = exfat_name_problem(name)
    assert problem is not None
    assert "longer than 255" in problem


def test_255_bmp_non_ascii_characters_are_fine_though_longer_in_utf8() -> None:
    name = "日" * 255  # 765 bytes of UTF-8, 255 UTF-16 units
    assert len(os.fsencode(name)) > 255
    assert exfat_name_problem(name) is None
    assert exfat_name_problem(name + "本") is not None


def test_invalid_utf8_name_is_a_problem() -> None:
    name = os.fsdecode(b"\xff.jpg")
    problem = exfat_name_problem(name)
    assert problem == "name is not valid UTF-8"


def test_invalid_utf8_in_the_middle_of_a_name_is_a_problem() -> None:
    assert exfat_name_problem(os.fsdecode(b"caf\xe9-photo.jpg")) == "name is not valid UTF-8"


# exfat_fold --------------------------------------------------------------------------


def test_fold_makes_names_differing_only_in_case_equal() -> None:
    assert exfat_fold("Photo.JPG") == exfat_fold("photo.jpg")
    assert exfat_fold("ÜBER.jpg") == exfat_fold("über.jpg")


def test_fold_keeps_names_that_really_differ_apart() -> None:
    assert exfat_fold("photo1.jpg") != exfat_fold("photo2.jpg")
    assert exfat_fold("日本.jpg") != exfat_fold("本日.jpg")


def test_fold_keeps_length_when_uppercase_would_grow() -> None:
    # "ß".upper() is "SS": exFAT folds char by char, so "ß" stays a different name
    assert exfat_fold("straße") != exfat_fold("strasse")
    assert len(exfat_fold("straße")) == len("straße")


# delete_limit / deletion_refusal -----------------------------------------------------


def test_delete_limit_is_the_floor_of_the_share() -> None:
    assert delete_limit(100, 20) == 20
    assert delete_limit(99, 20) == 19
    assert delete_limit(4, 20) == 0
    assert delete_limit(0, 20) == 0
    assert delete_limit(100, 0) == 0
    assert delete_limit(100, 100) == 100


def test_deleting_exactly_the_limit_is_allowed() -> None:
    assert deletion_refusal(20, 100, 20) is None


def test_deleting_one_above_the_limit_is_refused() -> None:
    refusal = deletion_refusal(21, 100, 20)
    assert refusal is not None
    assert "21 of the 100 files" in refusal
    assert "21.0%" in refusal
    assert "library.max_delete_percent = 20%" in refusal


def test_zero_deletes_are_always_allowed() -> None:
    assert deletion_refusal(0, 0, 0) is None
    assert deletion_refusal(0, 1000, 0) is None
    assert deletion_refusal(0, 0, 20) is None


def test_any_delete_is_refused_at_zero_percent() -> None:
    assert deletion_refusal(1, 1_000_000, 0) is not None


def test_deletes_from_an_empty_backup_are_refused() -> None:
    refusal = deletion_refusal(1, 0, 20)
    assert refusal is not None
    assert "1 of the 0 files" in refusal


def test_deleting_everything_is_allowed_at_100_percent() -> None:
    assert deletion_refusal(10, 10, 100) is None


@pytest.mark.parametrize(
    ("files", "percent", "limit"),
    [(1000, 32.3, 323), (50_000, 10.2, 5100)],
)
def test_delete_limit_is_exact_for_decimal_percentages(
    files: int, percent: float, limit: int
) -> None:
    # 32.3% of 1000 files is 323 files exactly: deleting 323 is "at the limit", allowed.
    assert delete_limit(files, percent) == limit
    assert deletion_refusal(limit, files, percent) is None
    assert deletion_refusal(limit + 1, files, percent) is not None


# SpaceNeed / capacity_refusal --------------------------------------------------------


def test_run_that_fits_exactly_is_not_refused() -> None:
    need = SpaceNeed(to_write=1000, freed_before_copy=100, freed_by_replacing=50,
                     largest_replaced=20, free=870)
    assert need.available == 1000
    assert need.fits
    assert capacity_refusal(need) is None


def test_run_one_byte_too_big_is_refused() -> None:
    need = SpaceNeed(to_write=1001, freed_before_copy=100, freed_by_replacing=50,
                     largest_replaced=20, free=870)
    assert not need.fits
    assert capacity_refusal(need) is not None


def test_largest_replaced_file_is_needed_twice_while_it_is_replaced() -> None:
    need = SpaceNeed(to_write=500, freed_before_copy=0, freed_by_replacing=500,
                     largest_replaced=500, free=0)
    assert need.available == 0
    assert not need.fits


def test_capacity_refusal_names_the_needed_and_free_amounts() -> None:
    gib = 1024**3
    need = SpaceNeed(to_write=10 * gib, freed_before_copy=gib, freed_by_replacing=0,
                     largest_replaced=0, free=3 * gib)
    refusal = capacity_refusal(need)
    assert refusal is not None
    assert "needs to write 10.0 GiB" in refusal
    assert "3.0 GiB free" in refusal
    assert "frees 1.0 GiB" in refusal
    assert "6.0 GiB more are needed" in refusal


def test_human_bytes_picks_a_readable_unit() -> None:
    assert human_bytes(0) == "0 B"
    assert human_bytes(1023) == "1023 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(5 * 1024**2) == "5.0 MiB"
    assert human_bytes(2 * 1024**5) == "2048.0 TiB"


# pruning config archives -------------------------------------------------------------


def test_archives_to_prune_keeps_the_n_newest() -> None:
    names = [
        "config-2025-01-03T020000.zip",
        "config-2025-01-01T020000.zip",
        "config-2025-01-04T020000.zip",
        "config-2025-01-02T020000.zip",
    ]
    assert sorted(archives_to_prune(names, 2)) == [
        "config-2025-01-01T020000.zip",
        "config-2025-01-02T020000.zip",
    ]


def test_archives_to_prune_ignores_other_files() -> None:
    names = ["config-2025-01-01T020000.zip", "RESTORE.txt", "config-latest.zip",
             ".iub-tmp-1234-config-2025-01-02T020000.zip", "config-2025-01-02T020000.zip.tmp"]
    assert archives_to_prune(names, 0) == ["config-2025-01-01T020000.zip"]
    assert archives_to_prune(names, 1) == []


def test_archives_to_prune_treats_a_same_second_suffix_as_newer() -> None:
    # steps/config_archive.archive_name names a second archive made in the same second
    # config-STAMP-2.zip, then -3, ...: each is newer than the one before.
    stamp = "config-2025-01-02T020000"
    names = [f"{stamp}.zip", f"{stamp}-2.zip", f"{stamp}-3.zip"]
    assert sorted(archives_to_prune(names, 1)) == sorted([f"{stamp}.zip", f"{stamp}-2.zip"])
    assert archives_to_prune(names, 2) == [f"{stamp}.zip"]


def test_archives_to_prune_orders_suffix_10_after_suffix_9() -> None:
    stamp = "config-2025-01-02T020000"
    names = [f"{stamp}-9.zip", f"{stamp}-10.zip"]
    assert archives_to_prune(names, 1) == [f"{stamp}-9.zip"]


def test_archives_to_prune_keeps_a_later_second_over_an_earlier_suffixed_one() -> None:
    names = ["config-2025-01-02T020000-2.zip", "config-2025-01-02T020001.zip"]
    assert archives_to_prune(names, 1) == ["config-2025-01-02T020000-2.zip"]


def test_a_name_ending_with_a_dot_is_a_problem_but_a_dot_inside_is_fine() -> None:
    assert "ends with a dot" in (exfat_name_problem("photo.") or "")
    assert exfat_name_problem("photo.jpg") is None
    assert exfat_name_problem(".immich") is None


def test_a_usb_disk_that_udev_reports_as_ata_is_a_candidate_by_its_usb_driver() -> None:
    from immich_usb_backup.policy import is_candidate

    assert is_candidate("ata", "exfat", "partition", "uas")
    assert is_candidate("ata", "exfat", "partition", "usb-storage")
    assert not is_candidate("ata", "exfat", "partition", None)  # an internal disk
    assert not is_candidate("ata", "ext4", "partition", "uas")
    assert is_candidate("usb", "exfat", "disk")


def test_replacing_most_of_the_backup_is_refused_like_deleting_it() -> None:
    from immich_usb_backup.policy import replacement_refusal

    assert replacement_refusal(0, 100, 20) is None
    assert replacement_refusal(20, 100, 20) is None
    why = replacement_refusal(21, 100, 20)
    assert why is not None and "replace 21 of the 100 files" in why and "21.0%" in why


# Containment for many entries (safety rule 1) -----------------------------------------

def test_inside_accepts_entries_under_real_folders_and_refuses_what_a_link_leads_out(
    tmp_path: Path,
) -> None:
    from immich_usb_backup.errors import Refused
    from immich_usb_backup.fsutil import Inside

    root = tmp_path / "mirror"
    (root / "upload" / "ab").mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (root / "out").symlink_to(outside)
    (root / "in").symlink_to(root / "upload")
    inside = Inside(root)

    inside.entry(root / "upload" / "ab" / "photo.jpg")
    inside.entry(root / "upload" / "ab" / "not-made-yet" / "x.jpg")
    inside.entry(root / "in" / "ab" / "photo.jpg")  # a link that stays inside
    inside.entry(root / "out")  # the link itself: rename or unlink act on it, inside
    for bad in (root / "out" / "photo.jpg", root / "out" / "deep" / "photo.jpg",
                tmp_path / "photo.jpg", root / ".." / "elsewhere" / "x"):
        with pytest.raises(Refused):
            inside.entry(bad)
    # a folder checked once is remembered: replacing it by a link is not looked at again
    # within the run, which is why Inside is only for exFAT (no links there)
    assert str(root / "upload" / "ab") in inside._known


# the quick paths of exfat_fold and exfat_name_problem ----------------------------------

TRICKY = ["a", "Z", ".", '"', "*", ":", "<", ">", "?", "\\", "|", "\x01", "\x1f", " ", "ß",
          "ﬁ", "İ", "ǅ", "é", "本", EMOJI, "\udc80", "\udcff", "-", "ŉ", "ΐ", "\u0345"]


def fold_char_by_char(name: str) -> str:
    return "".join(c.upper() if len(c.upper()) == 1 else c for c in name)


def problem_reference(name: str) -> str | None:
    """The checks one by one, as exfat_name_problem describes them."""
    if any("\udc80" <= c <= "\udcff" for c in name):
        return "not valid UTF-8"
    if any(c in '"*:<>?\\|' or ord(c) < 0x20 for c in name):
        return "characters"
    if len(name.encode("utf-16-le", "surrogatepass")) // 2 > 255:
        return "longer"
    if name.endswith("."):
        return "dot"
    return None


@pytest.mark.parametrize("length", [1, 3, 20, 126, 127, 128, 200, 255, 256])
def test_quick_paths_agree_with_the_rules_char_by_char(length: int) -> None:
    rng = random.Random(length)  # noqa: S311 - test data
    names = ["".join(rng.choice(TRICKY) if rng.random() < share else "x"
                     for _ in range(length)) for share in (0.05, 0.3, 1.0) for _ in range(1000)]
    for name in [*names, EMOJI * length, EMOJI * (length // 2) + "x"]:
        assert exfat_fold(name) == fold_char_by_char(name), repr(name)
        got, want = exfat_name_problem(name), problem_reference(name)
        assert (got is None) == (want is None), repr(name)
        if want is not None:
            assert got is not None and want in got, (got, want)
