"""The verbs the host agent serves, all registered on one schema (:data:`SCHEMA`)."""

from virtyard.host.verbs import block_domains as _block_domains  # noqa: F401
from virtyard.host.verbs import connections as _connections  # noqa: F401
from virtyard.host.verbs import events as _events  # noqa: F401
from virtyard.host.verbs import host as _host  # noqa: F401
from virtyard.host.verbs import storage as _storage  # noqa: F401  (registers the verbs)
from virtyard.host.verbs import vm as _vm  # noqa: F401
from virtyard.host.verbs.registry import SCHEMA

__all__ = ["SCHEMA"]
