"""A stand-in for smartctl in the tests: it answers with what real drives answered.

Run as ``smartctl_standin.py SCENARIO SMARTCTL-ARGS...``: the tests write a small
wrapper that passes SCENARIO and use it as ``[health] smartctl``, so the product runs it
as a real subprocess, through ``execute``, exactly as it runs smartctl. SCENARIO is a
JSON file:

    {"answers": {"auto": "unknown-usb-bridge.json", "sat": "sat-usb-sandisk-pssd.json"},
     "standby": false,        # the disk sleeps: answer as smartctl does to -n standby,N
     "power_unknown": false,  # the bridge cannot report the power mode (-n ...,N,M)
     "hang_s": 0,             # wait this long first: a bridge that does not answer
     "calls": "/tmp/.../calls.jsonl"}

``answers`` maps the ``-d`` type (``auto`` when none is given) to a capture in
tests/data/smartctl/; a type without one gets what real smartctl answered for that type
on a device that passes nothing through (``loop-<type>.json``). The stand-in prints the
capture and exits with its ``exit_status``, as smartctl does. Each call's arguments are
appended to ``calls``; an argument smartctl would take as a write, a self-test or
anything else not in the product's read-only set makes it exit 64 without answering.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data" / "smartctl"
WITH_VALUE = {"-n", "-d"}
FLAGS = {"-j", "-i", "-H", "-A"}


def main(scenario_path: str, args: list[str]) -> int:
    scenario = json.loads(Path(scenario_path).read_text())
    if scenario.get("calls"):
        with open(scenario["calls"], "a") as f:
            f.write(json.dumps(args) + "\n")
    options: dict[str, str] = {}
    rest = list(args)
    while len(rest) > 1:
        arg = rest.pop(0)
        if arg in WITH_VALUE:
            options[arg] = rest.pop(0)
        elif arg in FLAGS:
            options[arg] = ""
        else:
            print(f"stand-in: refused argument {arg!r}", file=sys.stderr)
            return 64
    if len(rest) != 1 or not rest[0].startswith("/dev/"):
        print(f"stand-in: no device in {args!r}", file=sys.stderr)
        return 64
    device = rest[0]
    time.sleep(float(scenario.get("hang_s", 0)))
    mode, _, statuses = options.get("-n", "never").partition(",")
    status, _, unsupported = statuses.partition(",")
    if mode == "standby" and scenario.get("standby"):
        # as smartctl's ataprint.cpp words it; no capture of a sleeping disk was found
        return answer(power_answer(args, device, f"Device is in STANDBY mode, exit({status})",
                                   int(status or 2)))
    if mode == "standby" and scenario.get("power_unknown") and unsupported:
        return answer(power_answer(args, device, "CHECK POWER MODE not implemented, "
                                   f"exit({unsupported})", int(unsupported)))
    device_type = options.get("-d", "auto")
    name = scenario.get("answers", {}).get(device_type) or f"loop-{device_type}.json"
    doc = json.loads((DATA / name).read_text())
    return answer(doc)


def power_answer(args: list[str], device: str, message: str, status: int) -> dict[str, object]:
    return {"json_format_version": [1, 0],
            "smartctl": {"version": [7, 3], "argv": ["smartctl", *args],
                         "messages": [{"string": message, "severity": "information"}],
                         "exit_status": status},
            "device": {"name": device, "info_name": f"{device} [SAT]", "type": "sat",
                       "protocol": "ATA"}}


def answer(doc: dict[str, object]) -> int:
    print(json.dumps(doc, indent=2))
    smartctl = doc.get("smartctl")
    status = smartctl.get("exit_status", 0) if isinstance(smartctl, dict) else 0
    return int(status) if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
