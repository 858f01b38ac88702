"""One description per wire type (see ``base``); importing this package registers them all."""

from virtyard.engine.api.types import actions, common, disks, hosts, system, vms  # noqa: F401
