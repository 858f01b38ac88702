"""How a block storage domain is marked in LVM, so every host recognises one on sight.

A block storage domain is an LVM volume group on SAN LUNs: the VG is named by the domain's UUID
and carries the tag :data:`DOMAIN_TAG`; further domain metadata lives in ``VY_MD_<key>=<value>``
VG tags (LVM tags allow ``=``). A LUN whose PV belongs to such a VG is reported as used by that
domain in ``Host.getDeviceList``.
"""

from __future__ import annotations

import uuid

DOMAIN_TAG = "VIRTYARD_SD"


def domain_of(vg_name: str, vg_tags: tuple[str, ...]) -> str | None:
    """The storage domain UUID a VG backs, or ``None`` when it is not one of ours."""
    if DOMAIN_TAG not in vg_tags:
        return None
    try:
        return str(uuid.UUID(vg_name))
    except ValueError:
        return None
