"""Run commands inside the storage host VM for the lab and its tests (stdlib only).

Runs in the VM on the virtio-serial port ``org.virtyard.ctl``, whose other end is a unix socket
in the lab's directory (mode 0600, root's): no network listener. One JSON request per line,
``{"argv": [...], "timeout": s, "input": "..."}``, one JSON answer per line,
``{"rc": n, "stdout": "...", "stderr": "..."}``. Tests use it for what the agent has no verb for:
counting active LVs, listing SCSI devices, doing I/O on a multipath map.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

PORT_NAME = "org.virtyard.ctl"
MAX_OUTPUT = 1 << 20


def find_port(name: str = PORT_NAME) -> str | None:
    """The ``/dev/vportNpM`` whose virtio-serial name is ``name`` (no udev symlink needed)."""
    base = "/sys/class/virtio-ports"
    try:
        entries = os.listdir(base)
    except OSError:
        return None
    for entry in entries:
        try:
            with open(f"{base}/{entry}/name") as f:
                if f.read().strip() == name:
                    return f"/dev/{entry}"
        except OSError:
            continue
    return None


def answer(request: dict[str, object]) -> dict[str, object]:
    argv = request.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        return {"rc": -1, "stdout": "", "stderr": "argv must be a non-empty list of strings"}
    timeout = request.get("timeout", 60)
    data = request.get("input")
    try:
        proc = subprocess.run(argv, input=data if isinstance(data, str) else None,
                              capture_output=True, text=True, errors="replace",
                              timeout=float(timeout) if isinstance(timeout, int | float) else 60,
                              check=False)
    except subprocess.TimeoutExpired:
        return {"rc": -2, "stdout": "", "stderr": f"timed out after {timeout} s"}
    except OSError as exc:
        return {"rc": -1, "stdout": "", "stderr": str(exc)}
    return {"rc": proc.returncode, "stdout": proc.stdout[:MAX_OUTPUT],
            "stderr": proc.stderr[:MAX_OUTPUT]}


def serve(path: str) -> None:
    # A virtio-serial port opens once: one descriptor for both directions.
    with open(os.open(path, os.O_RDWR), "r+b", buffering=0) as port:
        pending = b""
        while True:
            chunk = port.read(65536)
            if not chunk:  # nobody connected on the host side: poll again
                time.sleep(0.1)
                continue
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                if not line.strip():
                    continue
                try:
                    request = json.loads(line)
                    reply = answer(request if isinstance(request, dict) else {})
                except ValueError:
                    reply = {"rc": -1, "stdout": "", "stderr": "bad request"}
                port.write(json.dumps(reply).encode() + b"\n")


def main() -> int:
    for _ in range(300):
        path = find_port()
        if path is not None:
            serve(path)
        time.sleep(0.1)
    print(f"no virtio-serial port {PORT_NAME}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
