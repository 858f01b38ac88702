"""A throwaway lab for benchmarks (one host unless asked): its own ports and state directory,
always torn down. Shared by the benchmark scripts in this folder."""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from virtyard.lab.guest_image import DEFAULT_CMDLINE, GuestImage
from virtyard.lab.lab import Lab, LabConfig


@contextmanager
def bench_lab(port_base: int, hosts: int = 1) -> Iterator[Lab]:
    """A lab of ``hosts`` hosts (one by default) on ports from ``port_base``, state in /tmp;
    down at the end, always."""
    state = Path(tempfile.mkdtemp(prefix="vy-bench-", dir="/tmp"))
    config = LabConfig.test(state).with_port_base(port_base)
    lab = Lab(LabConfig(**{**config.__dict__, "host_count": hosts}))
    try:
        lab.up()
        yield lab
    finally:
        lab.down()


def vm_params(lab: Lab, name: str, devices: list[dict[str, Any]] | None = None,
              image: GuestImage | None = None) -> dict[str, Any]:
    """VM.create parameters for a tiny guest."""
    image = image or lab.guest_image
    return {"vmId": str(uuid.uuid4()), "vmName": name, "memSize": 192,
            "kernel": str(image.kernel), "initrd": str(image.initrd),
            "kernelArgs": DEFAULT_CMDLINE, "devices": devices or []}
