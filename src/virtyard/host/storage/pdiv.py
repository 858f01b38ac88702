"""The one name of a volume: pool, domain, image and volume ids (oVirt's "PDIV").

Storage (prepare, teardown, block domains), the VM metadata in a domain XML and the wire
(``{poolID, domainID, imageID, volumeID}``) all use this one type, so a volume is never
converted between look-alikes. The constructor checks only that each id is a plain id (metadata
read from a foreign XML keeps what it says); :meth:`Pdiv.of` gives the canonical form storage
keys volumes by (lower-case hyphenated UUIDs).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

from virtyard.host.rpc.errors import InvalidParameterError

PDIV_KEYS = ("poolID", "domainID", "imageID", "volumeID")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class PdivError(ValueError):
    """Not a PDIV; shaped like the virt layer's errors (``reason``, ``key``)."""

    reason = "invalid_pdiv"
    key = "PDIV"

    def __init__(self, message: str) -> None:
        super().__init__(f"{self.reason}: {message}")


def canonical_uuid(value: str, what: str) -> str:
    """``value`` as a lower-case hyphenated UUID; :class:`InvalidParameterError` otherwise."""
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        raise InvalidParameterError(f"{what} must be a UUID, not {value!r}") from None


@dataclass(frozen=True, order=True)
class Pdiv:
    """pool, domain, image and volume ids."""

    pool_id: str
    domain_id: str
    image_id: str
    volume_id: str

    def __post_init__(self) -> None:
        for name in ("pool_id", "domain_id", "image_id", "volume_id"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _ID_RE.match(value):
                raise PdivError(f"{name} must be a non-empty id, not {value!r}")

    @classmethod
    def of(cls, pdiv: Pdiv) -> Pdiv:
        """``pdiv`` with canonical UUIDs; :class:`InvalidParameterError` if one is not a UUID."""
        return cls(canonical_uuid(pdiv.pool_id, "poolID"),
                   canonical_uuid(pdiv.domain_id, "domainID"),
                   canonical_uuid(pdiv.image_id, "imageID"),
                   canonical_uuid(pdiv.volume_id, "volumeID"))

    @property
    def key(self) -> str:
        return "/".join((self.pool_id, self.domain_id, self.image_id, self.volume_id))

    @classmethod
    def from_dict(cls, raw: object) -> Pdiv:
        """From the wire's ``{poolID, domainID, imageID, volumeID}`` (other keys ignored)."""
        if not isinstance(raw, dict) or set(PDIV_KEYS) - set(raw):
            raise PdivError("PDIV must be a dict with poolID, domainID, imageID and volumeID, "
                            f"not {raw!r}")
        return cls(raw["poolID"], raw["domainID"], raw["imageID"], raw["volumeID"])

    def to_dict(self) -> dict[str, str]:
        return {"poolID": self.pool_id, "domainID": self.domain_id, "imageID": self.image_id,
                "volumeID": self.volume_id}

    def __str__(self) -> str:
        return (f"pool {self.pool_id} domain {self.domain_id} image {self.image_id} "
                f"volume {self.volume_id}")
