"""Is a LUN free, or used, and by what: LVM PV, partition table, filesystem, other signature.

``Host.getDeviceList`` reports this for every LUN. The LUN's bytes come over iSCSI from a
user-space initiator, and reading is the expensive part, so :func:`probe` works from the first
few KiB the caller already read (``head``) and asks ``read_more(offset, length)`` only for what
a given LUN needs:

* an LVM PV is read by :mod:`~virtyard.host.storage.lvm_label` (label, PV header, VG metadata);
  a fresh VG's metadata lies in the first 8 KiB, an older one's further in the MDA's ring;
* everything else is identified by libblkid (:mod:`~virtyard.host.storage.blkid`) over the
  head, with the rest of the LUN taken as zero;
* when the head shows nothing, the places libblkid looks beyond it are read and probed too
  (:data:`~virtyard.host.storage.blkid.PROBE_REGIONS`, about 1 MiB in at most five reads). An
  ISO 9660 image starts with 32 KiB of zeros and btrfs, ZFS or md RAID superblocks lie past
  8 KiB or at the end: without this "second look" such LUNs would be called free and be
  offered for overwriting. Only LUNs that look free pay for it.

Damage never raises: a PV whose label or metadata is broken is "used" with reason ``lvm-pv`` and
the problem in ``detail``, so it is not offered as free.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Final, Literal

from virtyard.host.storage import blkid, lvm_label
from virtyard.host.storage.lvm_label import PvInfo, ReadMore, VgMetadata

Status = Literal["free", "used"]
Reason = Literal["lvm-pv", "partition-table", "filesystem", "other-signature"]

KiB: Final = 1 << 10


@dataclass(frozen=True, slots=True)
class Usage:
    """Whether a LUN is free, and if not, why.

    ``blkid_type`` is libblkid's name for what it found (``TYPE``, or ``PTTYPE`` for a bare
    partition table: ``ext4``, ``LVM2_member``, ``gpt``...). The ``pv_``/``vg_`` fields are set
    for LVM PVs; ``vg_tags`` sorted as ``vgs`` prints them. ``pv`` keeps everything read from
    the PV (LVs and segments) for callers that need more.
    """

    status: Status
    reason: Reason | None = None
    detail: str = ""
    pv_uuid: str = ""
    vg_uuid: str = ""
    vg_name: str = ""
    vg_tags: tuple[str, ...] = ()
    blkid_type: str = ""
    pv: PvInfo | None = field(default=None, compare=False, repr=False)


def probe(head: bytes, device_size: int, read_more: ReadMore, *, sector_size: int = 512,
          second_look: bool = True) -> Usage:
    """Tell what the LUN of ``device_size`` bytes whose first bytes are ``head`` is used for.

    ``read_more(offset, length)`` returns other bytes of the LUN (it may return fewer at the end
    of the device); I/O errors it raises propagate. ``sector_size`` is the LUN's logical block
    size. ``second_look=False`` trusts the head alone when it shows nothing (cheaper, but misses
    signatures that start further in, such as an ISO image's).
    """
    if device_size <= 0:
        device_size = len(head)
    head = head[:device_size]
    if blkid.is_zero(head):
        found: blkid.ProbeResult = None
        pv = None
    else:
        pv = lvm_label.read_pv(head, read_more)
        if pv is not None and pv.label_valid:
            return _lvm_usage(pv, "LVM2_member")
        found = blkid.probe_bytes(head, device_size, sector_size=sector_size)
    all_zero = found is None and pv is None and blkid.is_zero(head)
    if found is None and second_look and device_size > len(head):
        pieces = _read_regions(head, device_size, read_more)
        found = blkid.probe_bytes(head, device_size, more=pieces, sector_size=sector_size)
        all_zero = all_zero and all(blkid.is_zero(data) for _, data in pieces)
    if pv is not None:  # a damaged LVM label, and nothing else
        if found is None:
            return _lvm_usage(pv, "")
        usage = _blkid_usage(found)
        return replace(usage, detail=f"{usage.detail}; also {pv.problem}")
    if found is not None:
        return _blkid_usage(found)
    looked = "" if second_look else f" in the first {len(head) // KiB} KiB"
    if all_zero:
        return Usage("free", detail=f"no signature{looked}: all zero")
    return Usage("free", detail=f"no known signature{looked} (data is not zero)")


def fill_vgs_from_peers(usages: Sequence[Usage]) -> list[Usage]:
    """Give PVs that cannot tell their VG themselves the VG that other PVs' metadata says they
    are in.

    LVM keeps a VG's metadata on some of its PVs only: ``pvcreate --metadatacopies 0`` PVs have
    none, and oVirt marks all but one PV's metadata areas ignored (``--metadataignore y``),
    which LVM then stops updating. ``pvs`` reports the VG for those PVs from the other PVs;
    this does the same over one listing's results, using the newest metadata (highest seqno)
    that lists the PV.
    """
    newest: dict[str, VgMetadata] = {}
    for usage in usages:
        pv = usage.pv
        if pv is None or pv.vg is None or pv.vg_from_ignored_mda:
            continue
        for entry in pv.vg.pvs:
            known = newest.get(entry.uuid)
            if known is None or known.seqno < pv.vg.seqno:
                newest[entry.uuid] = pv.vg
    result = []
    for usage in usages:
        pv = usage.pv
        vg = newest.get(usage.pv_uuid) if usage.reason == "lvm-pv" else None
        if pv is not None and vg is not None and (pv.vg is None or pv.vg_from_ignored_mda):
            result.append(replace(
                usage, vg_uuid=vg.uuid, vg_name=vg.name, vg_tags=vg.tags,
                detail=f"LVM PV of VG {vg.name} (metadata read from another PV)"))
        else:
            result.append(usage)
    return result


# --- internals ----------------------------------------------------------------------------------


def _read_regions(head: bytes, device_size: int, read_more: ReadMore
                  ) -> list[tuple[int, bytes]]:
    """Read where libblkid looks, minus what the head already holds."""
    pieces = []
    for offset, length in blkid.regions(device_size):
        start = max(offset, len(head))
        end = offset + length
        if start < end:
            data = read_more(start, end - start)
            if data:
                pieces.append((start, data[:end - start]))
    return pieces


def _lvm_usage(pv: PvInfo, blkid_type: str) -> Usage:
    vg = pv.vg
    if vg is not None:
        detail = f"LVM PV of VG {vg.name}"
        if pv.vg_from_ignored_mda:
            detail += " (from an ignored metadata area: name and tags may be stale)"
        return Usage("used", "lvm-pv", detail, pv_uuid=pv.pv_uuid, vg_uuid=vg.uuid,
                     vg_name=vg.name, vg_tags=vg.tags, blkid_type=blkid_type, pv=pv)
    if pv.orphan:
        detail = "LVM PV in no VG"
    elif not pv.label_valid:
        detail = f"damaged LVM label: {pv.problem}"
    else:
        detail = f"LVM PV, VG unknown: {pv.problem}"
    return Usage("used", "lvm-pv", detail, pv_uuid=pv.pv_uuid, blkid_type=blkid_type, pv=pv)


def _blkid_usage(found: blkid.BlkidResult | blkid.Ambivalent) -> Usage:
    if isinstance(found, blkid.Ambivalent):
        names = ", ".join(found.candidates) or "unknown"
        return Usage("used", "other-signature",
                     f"several signatures that exclude each other (ambivalent): {names}")
    name = found.type or found.pttype
    extras = _describe(found)
    if found.type == "LVM2_member":  # libblkid saw a PV our reader could not read
        return Usage("used", "lvm-pv", f"LVM PV (seen by libblkid only){extras}",
                     pv_uuid=found.uuid, blkid_type=name)
    if found.type and found.usage == "filesystem":
        return Usage("used", "filesystem", f"{found.type} filesystem{extras}", blkid_type=name)
    if found.pttype and not found.type:
        return Usage("used", "partition-table", f"{found.pttype} partition table{extras}",
                     blkid_type=name)
    usage = f" ({found.usage})" if found.usage else ""
    return Usage("used", "other-signature", f"{found.type}{usage}{extras}", blkid_type=name)


def _describe(found: blkid.BlkidResult) -> str:
    parts: Iterable[str] = (
        f"label {found.label!r}" if found.label else "",
        f"UUID {found.uuid}" if found.uuid else "",
        f"and a {found.pttype} partition table" if found.pttype and found.type else "",
        f"PTUUID {found.ptuuid}" if found.ptuuid else "",
    )
    text = ", ".join(part for part in parts if part)
    return f": {text}" if text else ""
