"""A disk's health: smartctl's answers parsed, readings compared, kept, put into words.

The answers are real smartctl output captured from real drives (tests/data/smartctl/,
where each came from is in its README). The reading is driven through the real
subprocess path with a stand-in smartctl (tests/smartctl_standin.py) that answers with
those captures; one test runs the real smartctl against a loop device.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

import stack as st
from helpers import LoopWatch, need
from immich_usb_backup import clock, health, smartctl, state
from immich_usb_backup.config import HealthConfig, parse_config
from immich_usb_backup.errors import ConfigError
from immich_usb_backup.health import Disk, HealthReading, NotReported, Why
from immich_usb_backup.smartctl import Answer, Attempt

DATA = Path(__file__).resolve().parent / "data" / "smartctl"
STANDIN = Path(__file__).resolve().parent / "smartctl_standin.py"
TZ = timezone(timedelta(hours=1))
AT = datetime(2026, 12, 7, 21, 30, tzinfo=TZ)
BEFORE = datetime(2026, 11, 30, 23, 7, tzinfo=TZ)
READ_ONLY = {"-j", "-n", "-i", "-H", "-A", "-d"}


def capture(name: str) -> tuple[str, int, str]:
    """(-d type, exit status, output) of a capture, as smartctl gave them."""
    text = (DATA / name).read_text()
    doc = json.loads(text)
    status = doc.get("smartctl", {}).get("exit_status", 0)
    return doc.get("device", {}).get("type", "auto"), status, text


def reading(**values: Any) -> HealthReading:
    return HealthReading(**{"at": BEFORE, "device_type": "sat", "protocol": "ATA",
                            "serial": "S1", "passed": True, **values})


# Each capture parsed ---------------------------------------------------------------------

def test_a_sata_ssd_behind_a_usb_sat_bridge_parses_with_its_hours_and_no_temperature() -> None:
    r = smartctl.interpret(*capture("sat-usb-sandisk-pssd.json"), AT)
    assert isinstance(r, HealthReading)
    assert (r.at, r.device_type, r.protocol, r.model) == (AT, "sat", "ATA", "SanDisk pSSD")
    assert (r.passed, r.reallocated, r.power_on_hours, r.temperature_c) == (True, 0, 11, None)
    assert (r.pending, r.uncorrectable, r.crc_errors) == (None, None, None)


def test_a_failing_disk_behind_a_jmicron_bridge_parses_its_bad_sectors() -> None:
    r = smartctl.interpret(*capture("usbjmicron-hitachi-failing.json"), AT)
    assert isinstance(r, HealthReading)
    assert r.device_type == "usbjmicron" and r.model == "Hitachi HDS721050DLE630"
    assert (r.passed, r.reallocated, r.pending, r.uncorrectable, r.crc_errors) == (
        False, 1975, 8, 0, 0)
    assert (r.power_on_hours, r.temperature_c) == (65592, 25)  # not the packed raw numbers
    assert r.failing_attributes == ("Reallocated_Sector_Ct",)


def test_a_usb_nvme_enclosure_parses_wear_media_errors_and_critical_warning() -> None:
    r = smartctl.interpret(*capture("sntjmicron-netac-partial.json"), AT)
    assert isinstance(r, HealthReading)
    assert (r.device_type, r.protocol, r.passed) == ("sntjmicron", "NVMe", True)
    assert (r.critical_warning, r.percentage_used, r.media_errors) == (0, 0, 0)
    assert (r.power_on_hours, r.temperature_c) == (355, 54)


def test_an_nvme_drive_with_media_errors_parses_them() -> None:
    r = smartctl.interpret(*capture("nvme-samsung-970-media-errors.json"), AT)
    assert isinstance(r, HealthReading)
    assert (r.media_errors, r.percentage_used, r.power_on_hours) == (7, 3, 12798)


def test_an_unknown_usb_bridge_means_trying_the_next_device_type() -> None:
    a = smartctl.interpret(*capture("unknown-usb-bridge.json"), AT)
    assert isinstance(a, Attempt) and a.answer is Answer.TRY_NEXT
    assert "Unknown USB bridge [0x048d:0x1234" in a.message


def test_a_failed_power_check_is_told_apart_from_a_named_standby() -> None:
    a = smartctl.interpret(*capture("loop-sat.json"), AT)
    assert isinstance(a, Attempt) and a.answer is Answer.SLEEP
    doc = json.loads((DATA / "loop-sat.json").read_text())
    doc["smartctl"]["messages"][0]["string"] = "Device is in STANDBY mode, exit(3)"
    b = smartctl.interpret("sat", 3, json.dumps(doc), AT)
    assert isinstance(b, Attempt) and b.answer is Answer.STANDBY
    c = smartctl.interpret("sat", 2, json.dumps(doc), AT)  # not our standby status
    assert isinstance(c, Attempt) and c.answer is Answer.TRY_NEXT


@pytest.mark.parametrize("output", ["", "not json", "[1, 2]", '{"smartctl": 5}'])
def test_output_that_is_not_smartctls_json_means_trying_the_next_type(output: str) -> None:
    a = smartctl.interpret("auto", 2, output, AT)
    assert isinstance(a, Attempt) and a.answer is Answer.TRY_NEXT


def test_a_known_unsupported_bridge_and_a_drive_without_smart_stop_the_search() -> None:
    doc = {"smartctl": {"messages": [{"string": "/dev/sdb: Unsupported USB bridge [0x1:0x2]"}],
                        "exit_status": 1}}
    a = smartctl.interpret("auto", 1, json.dumps(doc), AT)
    assert isinstance(a, Attempt) and a.answer is Answer.UNSUPPORTED
    doc = {"smartctl": {"exit_status": 4}, "smart_support": {"available": False}}
    b = smartctl.interpret("sat", 4, json.dumps(doc), AT)
    assert isinstance(b, Attempt) and b.answer is Answer.NO_SMART
    doc = {"smartctl": {"exit_status": 4}, "smart_support": {"available": True,
                                                             "enabled": False}}
    c = smartctl.interpret("sat", 4, json.dumps(doc), AT)
    assert isinstance(c, Attempt) and c.answer is Answer.SMART_OFF


def test_the_arguments_only_read_and_never_wake_the_disk() -> None:
    argv = smartctl.smartctl_argv("smartctl", "sat", "/dev/sdb", awake=True)
    assert argv == ["smartctl", "-j", "-n", "standby,3", "-i", "-H", "-A", "-d", "sat",
                    "/dev/sdb"]
    assert smartctl.smartctl_argv("smartctl", "auto", "/dev/sdb", awake=False) == [
        "smartctl", "-j", "-n", "standby,3,5", "-i", "-H", "-A", "/dev/sdb"]


# Worse, in words ------------------------------------------------------------------------

def result(previous: HealthReading | None, current: HealthReading, label: str = "Backup",
           ) -> health.HealthResult:
    return health.HealthResult(Disk("/dev/sdb1", "6F5F-FDC3", label), current, previous,
                               health.compare(previous, current))


def test_reallocated_sectors_that_grew_are_a_warning_with_the_date_and_the_count_before() -> None:
    r = result(reading(reallocated=0), reading(at=AT, reallocated=8))
    assert r.warning
    assert r.warning_text() == ("Backup: 8 sectors reallocated since 2026-11-30 (0 before): "
                                "copy this backup to a new disk soon")
    assert r.line() == "health: WARNING: 8 sectors reallocated since 2026-11-30 (0 before)"


def test_one_sector_is_singular() -> None:
    r = result(reading(pending=0), reading(at=AT, pending=1))
    assert r.verdict.worse == (
        "1 unreadable sector waiting to be reallocated since 2026-11-30 (0 before)",)


def test_a_healthy_reading_says_ok_with_hours_and_temperature() -> None:
    r = result(reading(reallocated=0), reading(at=AT, reallocated=0, power_on_hours=3412,
                                               temperature_c=34))
    assert not r.warning and r.warning_text() is None
    assert r.line() == "health: OK (3,412 h, 34 °C)"


def test_counters_that_stayed_the_same_are_shown_but_not_a_warning() -> None:
    r = result(reading(reallocated=8), reading(at=AT, reallocated=8, power_on_hours=10))
    assert not r.warning
    assert r.line() == "health: OK (10 h, 8 sectors reallocated)"


def test_only_transfer_errors_point_at_the_cable() -> None:
    r = result(reading(crc_errors=3), reading(at=AT, crc_errors=12))
    assert r.warning_text() == (
        "Backup: 12 transfer errors on the cable (UDMA CRC) since 2026-11-30 (3 before): "
        "try another USB cable, port or enclosure")


def test_a_first_reading_is_no_baseline_for_worse_but_failing_warns_at_once() -> None:
    ok = result(None, reading(at=AT, reallocated=40))
    assert not ok.warning
    current = smartctl.interpret(*capture("usbjmicron-hitachi-failing.json"), AT)
    assert isinstance(current, HealthReading)
    failing = result(None, current)
    assert failing.warning_text() == (
        "Backup: the drive says it is failing (Reallocated_Sector_Ct at its threshold): "
        "copy this backup to a new disk soon")


def test_another_drive_under_the_same_uuid_is_not_compared() -> None:
    r = result(reading(serial="OLD", reallocated=0), reading(at=AT, serial="NEW",
                                                            reallocated=5))
    assert not r.warning


def test_nvme_wear_crossing_a_step_and_a_critical_warning_are_worse() -> None:
    nvme = {"protocol": "NVMe", "device_type": "sntjmicron"}
    worn = result(reading(percentage_used=78, **nvme), reading(at=AT, percentage_used=81,
                                                               **nvme))
    assert worn.warning_text() == (
        "Backup: 81 % of its rated life used (was 78 % on 2026-11-30): plan to copy this "
        "backup to a new disk: this one is wearing out")
    hot_and_worse = result(reading(media_errors=0, **nvme), reading(
        at=AT, media_errors=2, critical_warning=0x02, **nvme))
    assert hot_and_worse.verdict.advice == "copy this backup to a new disk soon"
    hot = result(None, reading(at=AT, critical_warning=0x02, **nvme))
    assert hot.warning_text() == ("Backup: the drive warns: temperature beyond its limits: "
                                  "let it cool: keep it away from heat")
    same_step = result(reading(percentage_used=81, **nvme), reading(at=AT, percentage_used=85,
                                                                    **nvme))
    assert not same_step.warning
    warned = result(reading(critical_warning=0, **nvme), reading(at=AT, critical_warning=0x04,
                                                                 **nvme))
    assert warned.warning_text() == ("Backup: the drive warns: reliability degraded by media or "
                                     "internal errors: copy this backup to a new disk soon")
    media = result(reading(media_errors=0, **nvme), reading(at=AT, media_errors=7, **nvme))
    assert media.verdict.worse == ("7 media errors since 2026-11-30 (0 before)",)


def test_the_result_goes_into_json_for_the_history() -> None:
    r = result(reading(reallocated=0), reading(at=AT, reallocated=8))
    data = json.loads(json.dumps(r.to_dict()))
    assert data["warning"] is True and data["previous_at"] == "2026-11-30T23:07:00+01:00"
    assert data["reading"]["at"] == "2026-12-07T21:30:00+01:00"
    assert data["reading"]["reallocated"] == 8


# The state file --------------------------------------------------------------------------

def test_a_reading_survives_the_state_file_and_a_later_miss_keeps_it(tmp_path: Path) -> None:
    disk = Disk("/dev/sdb1", "6f5f-fdc3", "Backup")
    first = reading(reallocated=0, power_on_hours=3412, temperature_c=34)
    state.write_toml(tmp_path, state.HEALTH, health.updated({}, disk, first))
    missed = NotReported(AT, Why.STANDBY, "the disk is asleep: not woken to read it")
    data = health.updated(state.read_toml(tmp_path, state.HEALTH), disk, missed)
    state.write_toml(tmp_path, state.HEALTH, data)
    kept = health.read_stored(tmp_path, AT)
    entry = kept["6F5F-FDC3"]
    assert entry.reading == first and entry.device_type == "sat" and entry.checked_at == AT
    assert entry.line() == ("OK (3,412 h, 34 °C) on 2026-11-30; not reported since "
                            "(the disk is asleep: not woken to read it)")


def test_a_hand_edited_state_entry_with_wrong_types_reads_as_not_reported() -> None:
    data = {"disk": [{"uuid": "A", "reading": {"at": BEFORE, "reallocated": "eight",
                                               "passed": "yes", "device_type": 7}},
                     {"uuid": 5}, "junk"]}
    kept = health.stored(data)
    assert list(kept) == ["A"]
    r = kept["A"].reading
    assert r is not None and (r.reallocated, r.passed, r.device_type) == (None, None, "auto")


# Through the real subprocess path with the stand-in --------------------------------------

class Standin:
    """A stand-in smartctl for one test: its scenario, its calls, a fake sysfs."""

    def __init__(self, tmp_path: Path, **scenario: Any) -> None:
        self.dir = tmp_path
        self.calls_file = tmp_path / "calls.jsonl"
        self.scenario = tmp_path / "scenario.json"
        self.scenario.write_text(json.dumps({"calls": str(self.calls_file), **scenario}))
        self.program = tmp_path / "bin" / "smartctl"
        self.program.parent.mkdir()
        self.program.write_text(
            f"#!{sys.executable}\nimport runpy, sys\n"
            f"sys.argv = [{str(STANDIN)!r}, {str(self.scenario)!r}, *sys.argv[1:]]\n"
            f"runpy.run_path({str(STANDIN)!r}, run_name='__main__')\n")
        self.program.chmod(0o755)
        self.config = HealthConfig(enabled=None, smartctl=str(self.program))
        # /sys/class/block/sdz1 -> .../sdz/sdz1, a partition of the USB disk sdz
        self.sys_block = tmp_path / "sys" / "class" / "block"
        devices = tmp_path / "sys" / "devices" / "usb1" / "sdz"
        (devices / "sdz1").mkdir(parents=True)
        (devices / "sdz1" / "partition").write_text("1\n")
        self.sys_block.mkdir(parents=True)
        (self.sys_block / "sdz").symlink_to(devices)
        (self.sys_block / "sdz1").symlink_to(devices / "sdz1")
        self.state_dir = tmp_path / "state"

    def set(self, **scenario: Any) -> None:
        old = json.loads(self.scenario.read_text())
        self.scenario.write_text(json.dumps({**old, **scenario}))

    def calls(self) -> list[list[str]]:
        if not self.calls_file.exists():
            return []
        return [json.loads(line) for line in self.calls_file.read_text().splitlines()]

    def types(self) -> list[str]:
        return [c[c.index("-d") + 1] if "-d" in c else "auto" for c in self.calls()]

    def check(self, disk: Disk | None = None, at: datetime = AT, **kwargs: Any,
              ) -> health.HealthResult | None:
        return asyncio.run(health.check(disk or Disk("/dev/sdz1", "6F5F-FDC3", "Backup"),
                                        kwargs.pop("config", self.config), self.state_dir, at,
                                        sys_block=self.sys_block, **kwargs))

    def assert_only_read(self) -> None:
        for call in self.calls():
            assert call[-1] == "/dev/sdz", call  # the whole disk, never the partition
            assert {a for a in call[:-1] if a.startswith("-")} <= READ_ONLY, call


def test_a_bridge_without_pass_through_is_not_reported_after_every_type(tmp_path: Path) -> None:
    s = Standin(tmp_path, answers={"auto": "unknown-usb-bridge.json"})
    r = s.check()
    assert r is not None and isinstance(r.outcome, NotReported)
    assert r.outcome.why is Why.NO_PASSTHROUGH
    assert r.line() == ("health: not reported (the USB enclosure passes no SMART data "
                        "through (tried auto, sat, sntjmicron, sntasmedia, sntrealtek))")
    assert s.types() == ["auto", "sat", "sntjmicron", "sntasmedia", "sntrealtek"]
    s.assert_only_read()
    kept = health.read_stored(s.state_dir, AT)
    assert kept["6F5F-FDC3"].reading is None and kept["6F5F-FDC3"].device_type == ""


def test_the_type_that_answered_is_remembered_and_asked_first(
        tmp_path: Path, no_blocked_loop: LoopWatch) -> None:
    s = Standin(tmp_path, answers={"auto": "unknown-usb-bridge.json",
                                   "sat": "sat-usb-sandisk-pssd.json"})
    r = s.check()
    assert r is not None and isinstance(r.outcome, HealthReading)
    assert r.outcome.device_type == "sat" and s.types() == ["auto", "sat"]
    assert r.line() == "health: OK (11 h)"
    s.check(at=AT + timedelta(days=7))
    assert s.types() == ["auto", "sat", "sat"]
    s.assert_only_read()


def test_a_usb_nvme_enclosure_is_found_after_sat_and_remembered(tmp_path: Path) -> None:
    s = Standin(tmp_path, answers={"auto": "unknown-usb-bridge.json",
                                   "sntjmicron": "sntjmicron-netac-partial.json"})
    r = s.check()
    assert r is not None and isinstance(r.outcome, HealthReading)
    assert s.types() == ["auto", "sat", "sntjmicron"]
    assert r.line() == "health: OK (355 h, 54 °C, 0 % used)"
    kept = health.read_stored(s.state_dir, AT)
    assert kept["6F5F-FDC3"].device_type == "sntjmicron"


def test_a_disk_that_got_worse_warns_once_through_the_whole_check(tmp_path: Path) -> None:
    s = Standin(tmp_path, answers={"auto": "usbjmicron-hitachi-failing.json"})
    earlier = HealthReading(at=BEFORE, device_type="auto", protocol="ATA",
                            serial="MSK423Y20S3HBC", passed=True, reallocated=0, pending=0)
    disk = Disk("/dev/sdz1", "6F5F-FDC3", "Backup")
    state.write_toml(s.state_dir, state.HEALTH, health.updated({}, disk, earlier))
    r = s.check(disk)
    assert r is not None and r.previous == earlier
    assert r.warning_text() == (
        "Backup: the drive says it is failing (Reallocated_Sector_Ct at its threshold); "
        "1975 sectors reallocated since 2026-11-30 (0 before); 8 unreadable sectors waiting "
        "to be reallocated since 2026-11-30 (0 before): copy this backup to a new disk soon")
    again = s.check(disk, at=AT + timedelta(days=7))
    assert again is not None and again.verdict.worse == ()  # told once; failing stays
    assert again.verdict.failing and again.warning


def test_a_look_that_does_not_store_leaves_the_comparison_for_the_next_backup(
        tmp_path: Path) -> None:
    s = Standin(tmp_path, answers={"auto": "usbjmicron-hitachi-failing.json"})
    earlier = HealthReading(at=BEFORE, device_type="auto", serial="MSK423Y20S3HBC",
                            reallocated=0)
    disk = Disk("/dev/sdz1", "6F5F-FDC3", "Backup")
    state.write_toml(s.state_dir, state.HEALTH, health.updated({}, disk, earlier))
    looked = s.check(disk, store=False, awake=False)
    assert looked is not None and looked.verdict.worse
    assert s.calls()[0][1:3] == ["-n", "standby,3,5"]
    backup = s.check(disk)
    assert backup is not None and backup.verdict.worse  # still told at the backup


def test_a_smartctl_that_does_not_answer_in_time_is_not_reported(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(smartctl, "TIMEOUT_S", 0.5)
    s = Standin(tmp_path, hang_s=30, answers={"auto": "sat-usb-sandisk-pssd.json"})
    r = s.check()
    assert r is not None and isinstance(r.outcome, NotReported)
    assert r.outcome.why is Why.TIMEOUT
    assert r.line() == "health: not reported (smartctl did not answer within 0.5 s)"
    assert len(s.calls()) == 1  # a bridge that hangs is not asked again


def test_a_disk_in_standby_is_not_woken_and_not_reported(tmp_path: Path) -> None:
    s = Standin(tmp_path, standby=True, answers={"sat": "sat-usb-sandisk-pssd.json"})
    r = s.check()
    assert r is not None and isinstance(r.outcome, NotReported)
    assert r.outcome.why is Why.STANDBY
    assert r.line() == "health: not reported (the disk is asleep: not woken to read it)"
    assert len(s.calls()) == 1 and s.calls()[0][1:3] == ["-n", "standby,3"]


def test_a_bridge_that_cannot_tell_the_power_mode_is_read_only_when_the_disk_is_in_use(
        tmp_path: Path) -> None:
    s = Standin(tmp_path, power_unknown=True, answers={"auto": "sat-usb-sandisk-pssd.json"})
    looked = s.check(awake=False, store=False)
    assert looked is not None and isinstance(looked.outcome, NotReported)
    assert looked.outcome.why is Why.POWER_UNKNOWN
    in_use = s.check()
    assert in_use is not None and isinstance(in_use.outcome, HealthReading)


def test_a_damaged_health_file_is_kept_aside_and_the_check_goes_on(
        tmp_path: Path, no_blocked_loop: LoopWatch) -> None:
    s = Standin(tmp_path, answers={"auto": "sat-usb-sandisk-pssd.json"})
    s.state_dir.mkdir()
    (s.state_dir / state.HEALTH).write_bytes(b"[[disk]\nuuid = \xff")
    r = s.check()
    (damaged,) = state.take_damages()  # kept aside, and waiting to be told
    assert r is not None and "SMART readings are forgotten" in str(damaged)
    assert isinstance(r.outcome, HealthReading) and r.previous is None
    assert [p.name for p in s.state_dir.iterdir() if ".damaged-" in p.name] == [
        f"health.toml.damaged-{clock.stamp(AT)}"]
    kept = health.read_stored(s.state_dir, AT)
    assert kept["6F5F-FDC3"].reading == r.outcome


def test_the_time_is_the_one_passed_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_clock() -> datetime:
        raise AssertionError("the wall clock was read")
    monkeypatch.setattr(clock, "now", no_clock)
    s = Standin(tmp_path, answers={"auto": "sat-usb-sandisk-pssd.json"})
    when = datetime(2031, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=-7)))
    r = s.check(at=when)
    assert r is not None and isinstance(r.outcome, HealthReading) and r.outcome.at == when
    kept = health.read_stored(s.state_dir, when)
    assert kept["6F5F-FDC3"].checked_at == when


def test_health_off_or_without_smartctl(tmp_path: Path) -> None:
    s = Standin(tmp_path)
    assert s.check(config=HealthConfig(enabled=False, smartctl=str(s.program))) is None
    missing = str(tmp_path / "no-such-smartctl")
    assert s.check(config=HealthConfig(enabled=None, smartctl=missing)) is None
    r = s.check(config=HealthConfig(enabled=True, smartctl=missing))
    assert r is not None and isinstance(r.outcome, NotReported)
    assert r.outcome.why is Why.NO_SMARTCTL
    assert r.line() == f"health: not reported ({missing} is not installed (smartmontools))"
    assert s.calls() == []


def test_the_whole_disk_of_a_partition_is_found_in_sysfs(tmp_path: Path) -> None:
    s = Standin(tmp_path)
    assert smartctl.whole_disk("/dev/sdz1", s.sys_block) == ("/dev/sdz", False)
    assert smartctl.whole_disk("/dev/sdz", s.sys_block) == ("/dev/sdz", False)
    (s.dir / "sys" / "devices" / "usb1" / "sdz" / "loop").mkdir()
    assert smartctl.whole_disk("/dev/sdz1", s.sys_block) == ("/dev/sdz", True)


# The config -----------------------------------------------------------------------------

def test_the_health_section_defaults_to_auto_and_checks_its_keys(tmp_path: Path) -> None:
    base = {"immich": {"upload_location": str(tmp_path)}}
    cfg = parse_config(base, "t")
    assert cfg.health == HealthConfig(enabled=None, smartctl="smartctl")
    with pytest.raises(ConfigError) as bad:
        parse_config({**base, "health": {"enabled": "yes"}}, "t")
    assert any("health.enabled: must be true or false" in p for p in bad.value.problems)
    with pytest.raises(ConfigError) as empty:
        parse_config({**base, "health": {"smartctl": " "}}, "t")
    assert any("health.smartctl: must name a program" in p for p in empty.value.problems)


# Real smartctl ---------------------------------------------------------------------------

@pytest.mark.exfat
def test_real_smartctl_on_a_loop_device_is_not_reported(tmp_path: Path) -> None:
    need(os.geteuid() == 0, "needs root for loop devices")
    need(shutil.which("smartctl") is not None, "needs smartctl (apt-get install smartmontools)")
    need(not st.missing_pieces() or set(st.missing_pieces()) <= {
        st.UDEVD, st.UDISKSD, st.DBUS_SYSTEM_CONF, "dbus-daemon", "busctl"},
        f"needs {st.missing_pieces()}")
    image = st.make_image(tmp_path / "disk.img", "Backup", size_mb=32, partitioned=True,
                          marker=False)
    plugged = st.plug(image)
    try:
        uuid = subprocess.run(["blkid", "-o", "value", "-s", "UUID", plugged.device],
                              capture_output=True, text=True).stdout.strip()
        disk = Disk(plugged.device, uuid, "Backup")
        assert smartctl.whole_disk(plugged.device) == (plugged.loop, True)
        r = asyncio.run(health.check(disk, HealthConfig(), tmp_path / "state", AT))
    finally:
        plugged.remove()
    assert r is not None and isinstance(r.outcome, NotReported)
    assert r.outcome.why is Why.NO_SMART
    assert r.line() == "health: not reported (a loop device has no SMART)"
    kept = health.read_stored(tmp_path / "state", AT)
    assert kept[uuid.upper()].not_reported == "a loop device has no SMART"


# Through a whole run ----------------------------------------------------------------------

@pytest.mark.exfat
def test_a_disk_whose_readings_got_worse_is_told_through_a_whole_run(
    make_exfat: Any, server: Any, tmp_path: Path
) -> None:
    from helpers import run_cli
    from test_notify import Hook, notify_config

    # the same drive, earlier and still healthy: the failing capture with its counters at 0
    failing = json.loads((DATA / "usbjmicron-hitachi-failing.json").read_text())
    healthy = json.loads(json.dumps(failing))
    healthy["smart_status"]["passed"] = True
    for attribute in healthy["ata_smart_attributes"]["table"]:
        if attribute["id"] in (5, 197):
            attribute.update(value=100, worst=100, when_failed="",
                             raw={"value": 0, "string": "0"})
    (tmp_path / "healthy.json").write_text(json.dumps(healthy))
    s = Standin(tmp_path, answers={"auto": str(tmp_path / "healthy.json")})
    hook = Hook()
    try:
        notify_config(server, hook.url(), extra=f'[health]\nsmartctl = "{s.program}"\n')
        disk = make_exfat()

        first = run_cli("run", str(disk.mount_point), config=server.config_path)
        assert first.returncode == 0, first.stdout + first.stderr
        assert "Disk health: OK (" in first.stdout
        (_started, finished) = hook.wait_for(2)
        assert "Disk health: OK" in finished["message"]

        s.set(answers={"auto": "usbjmicron-hitachi-failing.json"})
        second = run_cli("run", str(disk.mount_point), config=server.config_path)
        assert second.returncode == 0, second.stdout + second.stderr  # a warning, no problem
        assert "Disk health: WARNING: the drive says it is failing" in second.stdout
        messages = hook.wait_for(5)[2:]
        warning = next(m for m in messages if m["title"].startswith(
            "Immich backup: check the disk"))
        assert "1975 sectors reallocated since" in warning["message"]
        assert "(0 before): copy this backup to a new disk soon" in warning["message"]
        history = json.loads(run_cli("history", "--json", config=server.config_path).stdout)
        assert history[-1]["health"]["warning"] is True
        assert history[0]["health"]["reading"]["reallocated"] == 0
        server.write_config(f'[disks]\napproved = ["{history[-1]["disk"]["uuid"]}"]\n')
        table = run_cli("disks", "--all", config=server.config_path)
        for call in s.calls():  # the disk itself (a loop device here), only read
            assert call[-1] == disk.device
            assert {a for a in call[:-1] if a.startswith("-")} <= READ_ONLY, call
    finally:
        hook.close()
    assert table.returncode == 0 and "FAILING (" in table.stdout  # its last reading


@pytest.mark.exfat
def test_a_disk_without_health_data_says_so_and_the_run_succeeds(
    make_exfat: Any, server: Any, tmp_path: Path
) -> None:
    from helpers import run_cli

    if shutil.which("smartctl") is None:
        pytest.fail("smartctl (smartmontools) is not installed: tools/setup installs it")
    disk = make_exfat()
    r = run_cli("run", str(disk.mount_point), config=server.config_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Disk health: not reported (a loop device has no SMART)." in r.stdout
    v = run_cli("verify", str(disk.mount_point), config=server.config_path)
    assert v.returncode == 0 and "health: not reported" in v.stdout
