"""One module per collection: parse → a command or a query → the model to render.

Importing this package registers every operation on ``routing.ROUTES``.
"""

from virtyard.engine.api.resources import clusters, events, hosts, system  # noqa: F401
