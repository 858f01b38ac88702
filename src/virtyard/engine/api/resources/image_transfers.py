"""``/imagetransfers``: start an upload into an ISO disk, follow its phase, finalize or cancel.

The bytes themselves go to the transfer's ``transfer_url`` (``transfers/imageio.py``).
"""

from __future__ import annotations

from virtyard.engine.api.faults import bad_request, incomplete
from virtyard.engine.api.routing import ASYNC, GET_QUERY, ROUTES, ApiRequest
from virtyard.engine.api.types.base import Model
from virtyard.engine.api.types.common import ACTION
from virtyard.engine.api.types.transfers import IMAGE_TRANSFER
from virtyard.engine.commands.base import run
from virtyard.engine.commands.image_transfers import AddImageTransfer, EndImageTransfer
from virtyard.engine.queries import transfers as queries

DONE = {"status": "complete"}


@ROUTES.post("/imagetransfers", body=IMAGE_TRANSFER, returns=IMAGE_TRANSFER, status=201,
             query=(ASYNC,))
def add_transfer(req: ApiRequest) -> Model:
    """Start an upload into an empty ISO disk (``disk`` id, ``direction`` upload); answers
    with the ``transfer_url`` to send the bytes to."""
    body = req.body or {}
    disk = body.get("disk") or {}
    if not disk.get("id"):
        if body.get("snapshot") or body.get("image"):
            raise bad_request("Only disks can be uploaded to: give disk id",
                              "TRANSFER_TARGET_UNSUPPORTED")
        raise incomplete("ImageTransfer", "disk.id")
    host = body.get("host") or {}
    transfer_id = run(AddImageTransfer(str(disk["id"]), direction=body.get("direction")
                                       or "upload", host_id=str(host.get("id") or ""),
                                       inactivity_timeout=body.get("inactivity_timeout")),
                      req.ctx())
    with req.services.db.read() as tx:
        return queries.get_transfer(tx, req.services, transfer_id, with_url=True)


@ROUTES.get("/imagetransfers", returns=IMAGE_TRANSFER, many=True)
def list_transfers(req: ApiRequest) -> list[Model]:
    """The transfers going on and those finished in the last minutes."""
    with req.services.db.read() as tx:
        return queries.list_transfers(tx, req.services, with_url=req.principal.can_write)


@ROUTES.get("/imagetransfers/{id}", returns=IMAGE_TRANSFER, query=GET_QUERY)
def get_transfer(req: ApiRequest) -> Model:
    """One transfer: its phase, bytes received and (while it goes on) its URLs."""
    with req.services.db.read() as tx:
        return queries.get_transfer(tx, req.services, req.path["id"],
                                    with_url=req.principal.can_write)


@ROUTES.post("/imagetransfers/{id}/finalize", body=ACTION, returns=ACTION)
def finalize_transfer(req: ApiRequest) -> Model:
    """All bytes sent: verify the volume against them (in the background; poll the phase
    for finished_success or finished_failure)."""
    run(EndImageTransfer(req.path["id"]), req.ctx())
    return DONE


@ROUTES.post("/imagetransfers/{id}/cancel", body=ACTION, returns=ACTION)
def cancel_transfer(req: ApiRequest) -> Model:
    """Stop the upload; its volume and disk are removed."""
    run(EndImageTransfer(req.path["id"], cancel=True), req.ctx())
    return DONE
