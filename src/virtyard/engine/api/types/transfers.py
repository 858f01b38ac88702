"""Image transfers: an upload into an ISO disk (``imagetransfers``), as oVirt's ``ImageTransfer``.

Every element the SDK writes for an ``ImageTransfer`` is accepted (the codec refuses unknown
ones); what has no meaning for an ISO upload is documented "accepted, not used".
"""

from __future__ import annotations

from virtyard.engine.api.types.base import BOOLEAN, INTEGER, STRING, Enum, Field, identified
from virtyard.engine.api.types.disks import DISK, DISK_FORMAT
from virtyard.engine.api.types.hosts import HOST
from virtyard.engine.api.types.vms import UNUSED, ref

IMAGE_TRANSFER_PHASE = Enum("image_transfer_phase", (
    "cancelled", "cancelled_system", "cancelled_user", "finalizing_cleanup",
    "finalizing_failure", "finalizing_success", "finished_cleanup", "finished_failure",
    "finished_success", "initializing", "paused_system", "paused_user", "resuming",
    "transferring", "unknown"))
IMAGE_TRANSFER_DIRECTION = Enum("image_transfer_direction", ("download", "upload"))
IMAGE_TRANSFER_TIMEOUT_POLICY = Enum("image_transfer_timeout_policy",
                                     ("cancel", "legacy", "pause"))

IMAGE_TRANSFER = identified("image_transfer", "An upload of an image into a disk: its phase and "
                            "the URL its bytes go to. On failure, description says why.", [
    Field("disk", DISK, "The ISO disk to fill (made by POST disks, content_type iso)."),
    Field("direction", IMAGE_TRANSFER_DIRECTION, "upload (downloads are not supported)."),
    Field("phase", IMAGE_TRANSFER_PHASE, "transferring → finalizing_success → "
          "finished_success, or finished_failure / finished_cleanup.", read_only=True),
    Field("transfer_url", STRING, "Where the client sends the bytes (the ovirt-imageio "
          "protocol); the ticket in it is the only credential.", read_only=True),
    Field("proxy_url", STRING, "The same URL (the engine is also the proxy).", read_only=True),
    Field("host", HOST, "The host that writes the volume (any Up host reaching the domain "
          "when not given)."),
    Field("inactivity_timeout", INTEGER, "Seconds without data before the transfer is "
          "cancelled and its disk removed."),
    Field("transferred", INTEGER, "Bytes received so far.", read_only=True),
    Field("active", BOOLEAN, "Whether the transfer is still going on.", read_only=True),
    Field("format", DISK_FORMAT, "raw."),
    Field("timeout_policy", IMAGE_TRANSFER_TIMEOUT_POLICY,
          "Always cancel here: an idle transfer is cancelled and cleaned up."),
    *[Field(name, kind, UNUSED) for name, kind in (
        ("shallow", BOOLEAN), ("image", ref("image", f"A storage image. {UNUSED}")),
        ("snapshot", ref("disk_snapshot", f"A disk snapshot. {UNUSED}")),
        ("backup", ref("backup", f"A backup. {UNUSED}")))],
], collection="imagetransfers")
