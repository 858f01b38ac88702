"""``fence_virtyard_lab``: the lab's fence agent, speaking the fence-agents protocol the
engine's program driver uses (and Pacemaker's ``fence_*`` agents speak): ``key=value`` lines
on standard input — ``action`` (off | on | status | monitor), ``plug`` (the lab host, e.g.
``host2``), ``lab_dir`` (the lab's state folder) — exit 0 for done / on, 2 for off, 1 for a
failure. The engine never imports the lab: it runs this program like any fence agent.
"""

from __future__ import annotations

import sys
from pathlib import Path

from virtyard.lab import power
from virtyard.lab.errors import LabError

EXIT_OK, EXIT_FAILED, EXIT_OFF = 0, 1, 2


def parse(text: str) -> dict[str, str]:
    out = {}
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def main() -> int:
    options = parse(sys.stdin.read())
    action = options.get("action", "reboot")
    plug, lab_dir = options.get("plug", ""), options.get("lab_dir", "")
    if action == "metadata":
        print('<resource-agent name="fence_virtyard_lab" shortdesc="Virtyard lab host power"/>')
        return EXIT_OK
    if not plug or not lab_dir:
        print("fence_virtyard_lab: plug and lab_dir are required", file=sys.stderr)
        return EXIT_FAILED
    try:
        if action in ("status", "monitor"):
            return EXIT_OK if power.state(Path(lab_dir), plug) == "on" else EXIT_OFF
        if action == "off":
            power.off(Path(lab_dir), plug)
        elif action == "on":
            power.on(Path(lab_dir), plug)
        elif action == "reboot":
            power.off(Path(lab_dir), plug)
            power.on(Path(lab_dir), plug)
        else:
            print(f"fence_virtyard_lab: unknown action {action}", file=sys.stderr)
            return EXIT_FAILED
    except LabError as exc:
        print(f"fence_virtyard_lab: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
