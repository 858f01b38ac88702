"""One description per wire type (see ``base``); importing this package registers them all."""

from virtyard.engine.api.types import (  # noqa: F401
    actions,
    common,
    disks,
    hosts,
    power,
    storage,
    system,
    transfers,
    vms,
)
