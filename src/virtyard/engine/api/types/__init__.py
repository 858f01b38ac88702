"""One description per wire type (see ``base``); importing this package registers them all."""

from virtyard.engine.api.types import common, hosts, system  # noqa: F401
