"""One module per collection: parse → a command or a query → the model to render.

Importing this package registers every operation on ``routing.ROUTES``.
"""

from virtyard.engine.api.resources import (  # noqa: F401
    clusters,
    disks,
    events,
    files,
    hosts,
    image_transfers,
    lun_disks,
    power,
    storagedomains,
    system,
    templates,
    vm_actions,
    vms,
)
