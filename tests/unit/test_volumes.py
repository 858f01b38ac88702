"""Pure logic of block storage domains and prepared volumes: extent arithmetic, tags, the
prepared-state file, per-user reference counting, the LV activation path against recorded LVM
output (this machine has no device-mapper, so that path cannot run here), and verb parameters.

The LVM texts below were recorded from LVM 2.03.16 on a loop device (``vgcfgbackup`` and
``--reportformat json`` reports of a VG made the way ``BlockDomains`` makes one). The reports of
a host *with* device-mapper are the same reports with the state columns a dm host prints for an
active LV (``lv_attr`` ``-wi-a-----``, ``-wi-ao----`` while open).
"""

from __future__ import annotations

import json
import stat
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
from fake_initiator import FakeInitiator

from virtyard.host.rpc.errors import (
    CannotActivateLogicalVolumeError,
    CannotDeactivateLogicalVolumeError,
    HostError,
    ImagePathError,
    IncorrectFormatError,
    InvalidParameterError,
    InvalidParamsError,
    VolumeIsBusyError,
)
from virtyard.host.storage import block_domain, lvm
from virtyard.host.storage.block_domain import (
    EXTENT_SIZE,
    Extent,
    VolumeInfo,
    domain_info,
    is_iso9660,
    lv_extent,
    volume_info,
)
from virtyard.host.storage.devices import DeviceService
from virtyard.host.storage.initiator import (
    Chap,
    Connection,
    Device,
    PathInfo,
    Portal,
    Secret,
)
from virtyard.host.storage.lvm_label import (
    LogicalVolume,
    Segment,
    Stripe,
    VgMetadata,
    VgPv,
    parse_metadata,
)
from virtyard.host.storage.pdiv import Pdiv
from virtyard.host.storage.volumes import (
    PreparedState,
    PreparedVolume,
    VolumeService,
    choose_method,
)
from virtyard.host.verbs import SCHEMA

MiB = 1 << 20
VG = "3f2b8a9e-5d1c-4e7a-9b0f-2c6d8e4a1b7c"
ISO_LV = "7c1e4f2a-0b3d-4a5e-8f6c-9d2b1a3e5f70"
POOL = "5a0e7d3c-1b2f-4c6a-8e9d-0f1a2b3c4d5e"
IMAGE = "0d9c8b7a-6f5e-4d3c-2b1a-0e9f8d7c6b5a"
GUID = "360000000000000000e00000000010002"
PV_UUID = "afz9X9-ZXi2-XP71-6XQk-ez60-Zjwq-zsry8D"

# vgcfgbackup of a domain with an ISO volume (1 extent) and a data LV (2 extents) after it.
RECORDED_METADATA = f"""\
contents = "Text Format Volume Group"
version = 1

{VG} {{
	id = "055cOY-LgIx-PIEm-Jia4-IcmN-vO03-qadugA"
	seqno = 3
	format = "lvm2"			# informational
	status = ["RESIZEABLE", "READ", "WRITE"]
	flags = []
	tags = ["VIRTYARD_SD", "VY_MD_NAME=isos"]
	extent_size = 8192		# 4 Megabytes
	max_lv = 0
	max_pv = 0
	metadata_copies = 0

	physical_volumes {{

		pv0 {{
			id = "{PV_UUID}"
			device = "/dev/loop0"	# Hint only

			status = ["ALLOCATABLE"]
			flags = []
			dev_size = 131072	# 64 Megabytes
			pe_start = 2048
			pe_count = 15	# 60 Megabytes
		}}
	}}

	logical_volumes {{

		{ISO_LV} {{
			id = "dTfojQ-iNrX-qeGF-ikHK-Kg44-JqIy-OCxO5a"
			status = ["READ", "WRITE", "VISIBLE"]
			flags = []
			tags = ["VY_POOL={POOL}", "VY_IMAGE={IMAGE}", "VY_TYPE=ISO", "VY_STATE=EMPTY"]
			creation_time = 1795217316	# 2026-11-20 23:28:36 +0000
			creation_host = "vm"
			allocation_policy = "contiguous"
			segment_count = 1

			segment1 {{
				start_extent = 0
				extent_count = 1	# 4 Megabytes

				type = "striped"
				stripe_count = 1	# linear

				stripes = [
					"pv0", 0
				]
			}}
		}}

		data1 {{
			id = "2F5pHN-3KgO-Wp7q-GKlp-Nxkk-I67K-4NzVaM"
			status = ["READ", "WRITE", "VISIBLE"]
			flags = []
			creation_time = 1795217316	# 2026-11-20 23:28:36 +0000
			creation_host = "vm"
			segment_count = 1

			segment1 {{
				start_extent = 0
				extent_count = 2	# 8 Megabytes

				type = "striped"
				stripe_count = 1	# linear

				stripes = [
					"pv0", 1
				]
			}}
		}}
	}}

}}
"""

RECORDED_VGS = f"""  {{
      "report": [
          {{
              "vg": [
                  {{"vg_name":"{VG}", "vg_uuid":"055cOY-LgIx-PIEm-Jia4-IcmN-vO03-qadugA", "vg_tags":"VIRTYARD_SD,VY_MD_NAME=isos", "vg_extent_size":"4194304", "vg_size":"62914560", "vg_free":"50331648"}}
              ]
          }}
      ]
  }}
"""  # noqa: E501

RECORDED_PVS = f"""  {{
      "report": [
          {{
              "pv": [
                  {{"pv_name":"/dev/loop0", "pv_uuid":"{PV_UUID}", "vg_name":"{VG}", "pe_start":"1048576", "pv_size":"62914560"}}
              ]
          }}
      ]
  }}
"""  # noqa: E501


def lvs_report(states: dict[str, str]) -> str:
    """The recorded ``lvs`` report with each LV's ``lv_attr`` set (``-wi-XX----`` is what a host
    without device-mapper prints; ``-wi-a-----`` active, ``-wi-ao----`` active and open)."""
    rows = []
    for name, attr in states.items():
        tags = (f"VY_IMAGE={IMAGE},VY_POOL={POOL},VY_STATE=READY,VY_TYPE=ISO"
                if name != "data1" else "")
        active = "active" if attr[4] == "a" else "unknown" if attr[4] == "X" else ""
        opened = "open" if attr[5] == "o" else "unknown" if attr[5] == "X" else ""
        dm = VG.replace("-", "--") + "-" + name.replace("-", "--")
        rows.append(f'{{"vg_name":"{VG}", "lv_name":"{name}", "lv_uuid":"u-{name[:6]}", '
                    f'"lv_tags":"{tags}", "lv_size":"4194304", "lv_attr":"{attr}", '
                    f'"lv_active":"{active}", "lv_device_open":"{opened}", '
                    f'"lv_path":"/dev/{VG}/{name}", "lv_dm_path":"/dev/mapper/{dm}"}}')
    return ('  {\n      "report": [\n          {\n              "lv": [\n                  '
            + ",\n                  ".join(rows) + "\n              ]\n          }\n      ]\n  }\n")


# -- extents and tags ---------------------------------------------------------------------------

def test_extents_of_recorded_metadata() -> None:
    vg = parse_metadata(RECORDED_METADATA)
    guid_of = {PV_UUID: GUID}
    iso, data = (lv_extent(vg, lv, guid_of) for lv in vg.lvs)
    # pe_start 2048 sectors = 1 MiB; extents of 4 MiB (as pvs reported: pe_start 1048576).
    assert iso == Extent(GUID, PV_UUID, 1 * MiB, 4 * MiB)
    assert data == Extent(GUID, PV_UUID, 1 * MiB + 1 * EXTENT_SIZE, 8 * MiB)
    [pv] = lvm.parse_report(RECORDED_PVS, "pv")
    assert int(pv["pe_start"]) == vg.pvs[0].pe_start


def test_domain_and_volume_from_recorded_metadata() -> None:
    vg = parse_metadata(RECORDED_METADATA)
    domain = domain_info(vg, [block_domain.DomainPv(GUID, PV_UUID, 1 * MiB, 15)])
    [vgs] = [lvm.VgReport.from_row(r) for r in lvm.parse_report(RECORDED_VGS, "vg")]
    assert (domain.domain_id, domain.name) == (VG, "isos")
    assert (domain.size, domain.free, domain.extent_size) == (vgs.size, vgs.free,
                                                              vgs.extent_size)
    iso = domain.volume(ISO_LV)
    assert iso is not None
    assert (iso.pool_id, iso.image_id, iso.type, iso.state) == (POOL, IMAGE, "ISO", "EMPTY")
    assert iso.size == 4 * MiB and iso.content_size == 0 and iso.sha256 == ""
    data = domain.volume("data1")
    assert data is not None and data.type == "DATA" and data.image_id == ""


def _vg(segments: dict[str, tuple[Segment, ...]], pvs: int = 2) -> VgMetadata:
    return VgMetadata(
        name=VG, uuid="x", seqno=1, extent_size=4 * MiB, tags=("VIRTYARD_SD",),
        pvs=tuple(VgPv(f"pv{i}", f"PV{i}", "", 100 * MiB, (1 + i) * MiB, 20)
                  for i in range(pvs)),
        lvs=tuple(LogicalVolume(name, f"u{name}", segments=segs)
                  for name, segs in segments.items()))


def _linear(start: int, count: int, pv: str, pv_start: int) -> Segment:
    return Segment(start, count, "striped", (Stripe(pv, pv_start),))


@pytest.mark.parametrize(("segments", "expected"), [
    # extended into the next extents: two segments, one range
    ((_linear(0, 2, "PV0", 3), _linear(2, 1, "PV0", 5)), (1 * MiB + 3 * 4 * MiB, 12 * MiB)),
    # a gap on the PV
    ((_linear(0, 2, "PV0", 3), _linear(2, 1, "PV0", 9)), None),
    # the second segment on another PV
    ((_linear(0, 2, "PV0", 3), _linear(2, 1, "PV1", 5)), None),
    # on the second PV alone: its own pe_start (2 MiB)
    ((_linear(0, 1, "PV1", 4),), (2 * MiB + 16 * MiB, 4 * MiB)),
    # striped over two PVs, and a thin LV
    ((Segment(0, 2, "striped", (Stripe("PV0", 0), Stripe("PV1", 0))),), None),
    ((Segment(0, 2, "thin"),), None),
    ((), None),
])
def test_lv_extent_arithmetic(segments: tuple[Segment, ...],
                              expected: tuple[int, int] | None) -> None:
    vg = _vg({"lv": segments})
    extent = lv_extent(vg, vg.lvs[0], {"PV0": "G0", "PV1": "G1"})
    if expected is None:
        assert extent is None
    else:
        assert extent is not None and (extent.offset, extent.size) == expected


def test_volume_state_and_content_from_tags() -> None:
    vg = _vg({"v": (_linear(0, 1, "PV0", 0),)})
    lv = LogicalVolume("v", "u", tags=("VY_IMAGE=i", "VY_POOL=p", "VY_SHA256=ab", "VY_SIZE=1234",
                                        "VY_STATE=READY", "VY_TYPE=ISO"),
                       segments=vg.lvs[0].segments)
    info = volume_info(VG, vg, lv, {"PV0": "G0"})
    assert (info.state, info.content_size, info.sha256, info.type) == ("READY", 1234, "ab", "ISO")


def test_iso9660_signature() -> None:
    image = bytearray(40960)
    assert not is_iso9660(bytes(image))
    image[32768:32774] = b"\x01CD001"
    assert is_iso9660(bytes(image))
    assert not is_iso9660(bytes(image[:32770]))


def test_pdiv_is_canonical_and_checked() -> None:
    upper = Pdiv.of(Pdiv(POOL.upper(), VG.upper(), IMAGE, ISO_LV))
    assert upper.pool_id == POOL and upper.domain_id == VG
    with pytest.raises(InvalidParameterError, match="domainID"):
        Pdiv.of(Pdiv(POOL, "not-a-uuid", IMAGE, ISO_LV))


# -- the LVM wrapper ----------------------------------------------------------------------------

class Recorder:
    """An LVM runner answering from recorded output; keeps every command line."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.answers: dict[str, tuple[int, str, str]] = {}

    def __call__(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        self.calls.append(argv)
        rc, out, err = self.answers.get(argv[1], (0, "", ""))
        if argv[1] == "lvchange" and "-an" in argv and "in-use" in self.answers:
            rc, out, err = self.answers["in-use"]
        return subprocess.CompletedProcess(argv, rc, out, err)

    def commands(self, name: str) -> list[list[str]]:
        return [c for c in self.calls if c[1] == name]


def test_lvm_command_lines_with_and_without_device_mapper() -> None:
    runner = Recorder()
    lvm.Lvm(("/dev/loop3",), dm=False, runner=runner).lvcreate(VG, ISO_LV, 1000,
                                                                tags=["VY_TYPE=ISO"])
    lvm.Lvm(("/dev/mapper/X",), dm=True, runner=runner).deactivate(VG, ISO_LV)
    create, deactivate = runner.calls
    assert create[:4] == ["lvm", "lvcreate", "--config", lvm.LVM_CONFIG]
    assert create[4:8] == ["--devices", "/dev/loop3", "--driverloaded", "n"]
    assert create[8:] == ["-an", "-Zn", "-Wn", "-n", ISO_LV, "-L", "1000b", "--contiguous", "y",
                          "--addtag", "VY_TYPE=ISO", VG]
    assert "--driverloaded" not in deactivate and deactivate[-2:] == ["-an", f"{VG}/{ISO_LV}"]
    assert 'use_devicesfile=0' in lvm.LVM_CONFIG and "backup=0" in lvm.LVM_CONFIG


def test_lvm_refuses_activation_without_device_mapper() -> None:
    runner = Recorder()
    with pytest.raises(lvm.LvmError, match="device-mapper"):
        lvm.Lvm(("/dev/loop3",), dm=False, runner=runner).activate(VG, ISO_LV)
    assert runner.calls == []  # LVM would have answered "success" and activated nothing


def test_lvm_error_keeps_stderr_and_drops_warnings() -> None:
    runner = Recorder()
    runner.answers["lvremove"] = (5, "", "  WARNING: Activation disabled.\n"
                                         "  Logical volume vg/lv in use.\n")
    with pytest.raises(lvm.LvmError) as info:
        lvm.Lvm(("/dev/loop3",), dm=False, runner=runner).lvremove("vg", "lv")
    assert str(info.value) == "lvremove failed (5): Logical volume vg/lv in use."
    assert "WARNING" in info.value.stderr and info.value.returncode == 5


def test_reports_from_recorded_output() -> None:
    runner = Recorder()
    runner.answers["lvs"] = (0, lvs_report({ISO_LV: "-wi-XX----", "data1": "-wi-ao----"}), "")
    runner.answers["vgs"] = (0, RECORDED_VGS, "")
    tool = lvm.Lvm(("/dev/loop0",), dm=False, runner=runner)
    iso, data = tool.lvs(VG)
    assert (iso.active, iso.open) == (False, False)  # "unknown" is not active
    assert (data.active, data.open) == (True, True)
    assert iso.tags == tuple(sorted(iso.tags)) and f"VY_IMAGE={IMAGE}" in iso.tags
    assert data.dm_path == f"/dev/mapper/{VG.replace('-', '--')}-data1"
    [vg] = tool.vgs(VG)
    assert vg.tags == ("VIRTYARD_SD", "VY_MD_NAME=isos") and vg.extent_size == 4 * MiB
    assert runner.calls[0][-8:] == ["--reportformat", "json", "--units", "b", "--nosuffix",
                                    "-o", ",".join(lvm.LvReport.FIELDS), VG]


def test_device_mapper_detection(tmp_path: Path) -> None:
    misc, control = tmp_path / "misc", tmp_path / "control"
    misc.write_text("229 fuse\n237 loop-control\n")
    control.touch()
    assert not lvm.device_mapper_available(misc, control)  # the node alone proves nothing
    misc.write_text("229 fuse\n236 device-mapper\n")
    assert lvm.device_mapper_available(misc, control)
    control.unlink()
    assert not lvm.device_mapper_available(misc, control)
    assert not lvm.device_mapper_available(tmp_path / "absent", control)


# -- method choice and the state file -----------------------------------------------------------

def test_choose_method() -> None:
    assert choose_method("kernel", True) == "lvm-activation"
    assert choose_method("kernel", False) == "block-slice"
    assert choose_method("userspace", True) == "iscsi-slice"
    assert choose_method("userspace", False) == "iscsi-slice"


def _prepared(users: tuple[str, ...] = ("vm1:sdc",)) -> PreparedVolume:
    return PreparedVolume(pdiv=Pdiv(POOL, VG, IMAGE, ISO_LV), method="iscsi-slice",
                          disk_type="network", guid=GUID, size=1234, users=users,
                          offset=MiB, host="127.0.0.1", port=3260, iqn="iqn.2026-11.x:t", lun=2,
                          connection_id="c1", chap_user="u", chap_secret_usage="virtyard-chap-c1",
                          volume_type="ISO", iso=True)


def test_prepared_state_round_trip(tmp_path: Path) -> None:
    state = PreparedState(tmp_path / "prepared.json")
    volume = _prepared(("vm1:sdc", "vm2:hdc"))
    state.entries[volume.pdiv.key] = volume
    state.save()
    assert stat.S_IMODE((tmp_path / "prepared.json").stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["prepared.json"]  # no temporary left
    again = PreparedState(tmp_path / "prepared.json")
    assert again.entries == {volume.pdiv.key: volume}
    raw = json.loads((tmp_path / "prepared.json").read_text())
    assert raw[0]["pdiv"] == {"poolID": POOL, "domainID": VG, "imageID": IMAGE,
                              "volumeID": ISO_LV}
    assert PreparedState(tmp_path / "none.json").entries == {}


# -- VolumeService over fakes -------------------------------------------------------------------

CONNECTION = Connection("conn-1", Portal("192.0.2.7", 3260), "iqn.2026-11.org.example:array",
                        chap=Chap("chapuser", Secret("never-shown")))


class FakeDomains:
    """What VolumeService asks of BlockDomains, from a dict; counts storage lookups."""

    def __init__(self) -> None:
        self.volumes: dict[str, VolumeInfo] = {}
        self.content: dict[str, bytes] = {}
        self.lookups = 0
        self.removed: list[str] = []
        self.gate: Callable[[], None] = lambda: None

    def add(self, volume_id: str, *, vtype: str = "ISO", state: str = "READY",
            content: bytes = b"", domain: str = VG) -> Pdiv:
        info = VolumeInfo(domain_id=domain, volume_id=volume_id, image_id=IMAGE, pool_id=POOL,
                          type=vtype, state=state, size=4 * MiB, content_size=len(content),
                          sha256="", lv_uuid="u", extent=Extent(GUID, PV_UUID, 5 * MiB, 4 * MiB))
        self.volumes[volume_id] = info
        self.content[volume_id] = content
        return info.pdiv

    def volume(self, pdiv: Pdiv) -> VolumeInfo:
        self.lookups += 1
        self.gate()
        from virtyard.host.rpc.errors import VolumeDoesNotExistError  # noqa: PLC0415
        info = self.volumes.get(pdiv.volume_id)
        if info is None or info.domain_id != pdiv.domain_id:
            raise VolumeDoesNotExistError(f"volume {pdiv.volume_id}")
        return info

    def read_volume(self, volume: VolumeInfo, offset: int, length: int) -> bytes:
        return self.content[volume.volume_id][offset:offset + length]

    def device_of(self, guid: str) -> Device:
        return Device(guid, "", "", "", "", 64 * MiB, 512, 512, 0,
                      [PathInfo(CONNECTION, 2)])

    def devices_of_domain(self, domain_id: str) -> list[Device]:
        return [self.device_of(GUID)]

    def cached_domain_ids(self) -> list[str]:
        return [VG]

    def remove(self, domain_id: str, *, force: bool = False) -> str:
        self.removed.append(domain_id)
        return domain_id

    def remove_volume(self, pdiv: Pdiv) -> str:
        self.removed.append(pdiv.volume_id)
        return pdiv.volume_id


ISO_BYTES = bytes(32768) + b"\x01CD001" + bytes(4096)


def make_service(root: Path, kind: str = "userspace", *, dm: bool = False,
                 runner: Recorder | None = None) -> tuple[VolumeService, FakeDomains]:
    service = VolumeService(root, FakeInitiator(kind), cast(DeviceService, None),
                            initiator_name="iqn.2026-11.x:h", timeout=5, dm=dm,
                            lvm_runner=runner or Recorder())
    fake = FakeDomains()
    service.domains = cast(Any, fake)
    return service, fake


def test_slice_prepare_is_counted_per_user_and_survives_restart(tmp_path: Path) -> None:
    service, fake = make_service(tmp_path)
    pdiv = fake.add(ISO_LV, content=ISO_BYTES)
    first = service.prepare(pdiv, "vm1:sdc", iso=True)
    assert (first.disk_type, first.method, first.users) == ("network", "iscsi-slice",
                                                            ("vm1:sdc",))
    assert (first.host, first.port, first.iqn, first.lun) == ("192.0.2.7", 3260,
                                                              CONNECTION.iqn, 2)
    assert (first.offset, first.size) == (5 * MiB, len(ISO_BYTES))  # the verified content
    assert (first.chap_user, first.chap_secret_usage) == ("chapuser", "virtyard-chap-conn-1")
    assert "never-shown" not in (tmp_path / "prepared.json").read_text()
    again = service.prepare(pdiv, "vm1:sdc", iso=True)
    second = service.prepare(pdiv, "vm2:sdc", iso=True)
    assert again.users == ("vm1:sdc",) and second.users == ("vm1:sdc", "vm2:sdc")
    assert fake.lookups == 1  # held already: no storage access

    restarted, fake2 = make_service(tmp_path)
    assert restarted.prepared() == service.prepared() == [second]
    left = restarted.teardown(pdiv, "vm1:sdc")
    assert left is not None and left.users == ("vm2:sdc",)
    assert restarted.teardown(pdiv, "vm1:sdc") == left  # not held by vm1 any more: no-op
    assert restarted.teardown(pdiv, "vm2:sdc") is None
    assert restarted.teardown(pdiv, "vm2:sdc") is None
    assert restarted.prepared() == [] and fake2.lookups == 0
    assert make_service(tmp_path)[0].prepared() == []


@pytest.mark.parametrize(("vtype", "state", "content", "fragment"), [
    ("DATA", "READY", ISO_BYTES, "of type DATA, not ISO"),
    ("ISO", "EMPTY", ISO_BYTES, "no verified ISO"),
    ("ISO", "READY", bytes(40000), "no ISO 9660"),
])
def test_prepare_as_iso_checks_the_volume(tmp_path: Path, vtype: str, state: str,
                                          content: bytes, fragment: str) -> None:
    service, fake = make_service(tmp_path)
    pdiv = fake.add(ISO_LV, vtype=vtype, state=state, content=content)
    with pytest.raises(IncorrectFormatError, match=fragment):
        service.prepare(pdiv, "vm1:sdc", iso=True)
    assert service.prepared() == []
    # Without iso=True it is just a volume; asking again as an ISO checks then.
    service.prepare(pdiv, "vm1:sdc")
    with pytest.raises(IncorrectFormatError):
        service.prepare(pdiv, "vm2:sdc", iso=True)
    assert [v.users for v in service.prepared()] == [("vm1:sdc",)]


def test_prepare_rejects_bad_user_and_scattered_volume(tmp_path: Path) -> None:
    service, fake = make_service(tmp_path)
    pdiv = fake.add(ISO_LV, content=ISO_BYTES)
    with pytest.raises(InvalidParameterError, match="user"):
        service.prepare(pdiv, "vm 1")
    fake.volumes[ISO_LV] = VolumeInfo(**{**fake.volumes[ISO_LV].__dict__, "extent": None})
    with pytest.raises(ImagePathError, match="contiguous"):
        service.prepare(pdiv, "vm1:sdc")


def test_removal_refused_while_prepared_or_being_prepared(tmp_path: Path) -> None:
    service, fake = make_service(tmp_path)
    pdiv = fake.add(ISO_LV, content=ISO_BYTES)
    service.prepare(pdiv, "vm1:sdc")
    with pytest.raises(VolumeIsBusyError, match="vm1:sdc"):
        service.remove_volume(pdiv)
    with pytest.raises(VolumeIsBusyError, match="vm1:sdc"):
        service.remove_domain(VG)
    with pytest.raises(VolumeIsBusyError):
        service.write(pdiv, 0, b"x")
    service.teardown(pdiv, "vm1:sdc")
    assert service.remove_volume(pdiv) == ISO_LV  # type: ignore[comparison-overlap]

    # A prepare still reading the volume holds the domain too.
    other = fake.add("4d2c7a5e-9b1f-4c3e-8a6d-2f0e1b9c7d5a", content=ISO_BYTES)
    inside, release = threading.Event(), threading.Event()

    def hold() -> None:
        inside.set()
        release.wait(5)

    fake.gate = hold
    worker = threading.Thread(target=service.prepare, args=(other, "vm3:sdc"))
    worker.start()
    try:
        assert inside.wait(5)
        with pytest.raises(VolumeIsBusyError, match="being prepared"):
            service.remove_domain(VG)
    finally:
        release.set()
        worker.join(5)
    assert [v.users for v in service.prepared()] == [("vm3:sdc",)]


# -- LV activation (production path) against recorded LVM output ---------------------------------

def test_activation_path_runs_lvchange_for_first_and_last_user(tmp_path: Path) -> None:
    runner = Recorder()
    service, fake = make_service(tmp_path, "kernel", dm=True, runner=runner)
    assert service.method == "lvm-activation"
    pdiv = fake.add(ISO_LV, content=ISO_BYTES)
    prepared = service.prepare(pdiv, "vm1:sdc", iso=True)
    assert (prepared.disk_type, prepared.path) == ("block", f"/dev/{VG}/{ISO_LV}")
    [activate] = runner.commands("lvchange")
    assert activate[4:6] == ["--devices", f"/dev/mapper/{GUID}"]
    assert "--driverloaded" not in activate and activate[-2:] == ["-ay", f"{VG}/{ISO_LV}"]
    service.prepare(pdiv, "vm2:sdc")
    service.teardown(pdiv, "vm1:sdc")
    assert len(runner.commands("lvchange")) == 1  # still used by vm2
    assert service.teardown(pdiv, "vm2:sdc") is None
    assert runner.commands("lvchange")[-1][-2:] == ["-an", f"{VG}/{ISO_LV}"]


def test_activation_failure_leaves_no_record(tmp_path: Path) -> None:
    runner = Recorder()
    runner.answers["lvchange"] = (5, "", "  device-mapper: reload ioctl failed: Invalid argument\n")
    service, fake = make_service(tmp_path, "kernel", dm=True, runner=runner)
    pdiv = fake.add(ISO_LV, content=ISO_BYTES)
    with pytest.raises(CannotActivateLogicalVolumeError, match="reload ioctl"):
        service.prepare(pdiv, "vm1:sdc")
    assert service.prepared() == [] and make_service(tmp_path)[0].prepared() == []


def test_deactivation_failure_keeps_the_user(tmp_path: Path) -> None:
    runner = Recorder()
    service, fake = make_service(tmp_path, "kernel", dm=True, runner=runner)
    pdiv = fake.add(ISO_LV, content=ISO_BYTES)
    service.prepare(pdiv, "vm1:sdc")
    runner.answers["in-use"] = (5, "", f"  Logical volume {VG}/{ISO_LV} in use.\n")
    with pytest.raises(CannotDeactivateLogicalVolumeError, match="in use"):
        service.teardown(pdiv, "vm1:sdc")
    assert [v.users for v in service.prepared()] == [("vm1:sdc",)]  # a retry can finish it
    del runner.answers["in-use"]
    assert service.teardown(pdiv, "vm1:sdc") is None and service.prepared() == []


def test_recover_and_leftovers_match_activations_to_records(tmp_path: Path) -> None:
    runner = Recorder()
    service, fake = make_service(tmp_path, "kernel", dm=True, runner=runner)
    pdiv = fake.add(ISO_LV, content=ISO_BYTES)
    service.prepare(pdiv, "vm1:sdc")
    unrecorded_idle = "11111111-2222-4333-8444-555555555555"
    unrecorded_open = "66666666-7777-4888-8999-aaaaaaaaaaaa"
    # After a reboot: the recorded LV is inactive, two others are active (one open by QEMU).
    runner.answers["lvs"] = (0, lvs_report({ISO_LV: "-wi-------", unrecorded_idle: "-wi-a-----",
                                           unrecorded_open: "-wi-ao----"}), "")
    assert service.leftovers() == [
        f"active LV {VG}/{unrecorded_idle} prepared for nobody",
        f"active LV {VG}/{unrecorded_open} prepared for nobody"]
    runner.calls.clear()
    done = service.recover()
    assert done == [f"re-activated {VG}/{ISO_LV} (prepared for vm1:sdc)",
                    f"deactivated {VG}/{unrecorded_idle} (prepared for nobody)"]
    changes = [c[-2:] for c in runner.commands("lvchange")]
    assert changes == [["-ay", f"{VG}/{ISO_LV}"], ["-an", f"{VG}/{unrecorded_idle}"]]
    assert [v.users for v in service.prepared()] == [("vm1:sdc",)]


def test_slice_hosts_have_nothing_to_recover(tmp_path: Path) -> None:
    runner = Recorder()
    service, _ = make_service(tmp_path, runner=runner)
    assert service.recover() == [] and service.leftovers() == [] and runner.calls == []


# -- verb parameters ----------------------------------------------------------------------------

PDIV = {"poolID": POOL, "domainID": VG, "imageID": IMAGE, "volumeID": ISO_LV}


@pytest.mark.parametrize(("verb", "params", "fragment"), [
    ("Image.prepare", {**PDIV, "user": "vm 1"}, "'user'"),
    ("Image.prepare", {**PDIV, "domainID": "x", "user": "vm"}, "'domainID'"),
    ("Image.teardown", {**PDIV}, "missing parameter 'user'"),
    ("Volume.write", {**PDIV, "offset": 0, "data": "not base64!"}, "'data'"),
    ("Volume.write", {**PDIV, "offset": -1, "data": ""}, "'offset'"),
    ("Volume.verify", {**PDIV, "size": 1, "sha256": "abc"}, "'sha256'"),
    ("Volume.create", {**PDIV, "size": 0}, "'size'"),
    ("Volume.create", {**PDIV, "size": 1, "type": "QCOW"}, "'type'"),
    ("StorageDomain.create", {"domainID": VG, "guid": "3600 1"}, "'guid'"),
    ("StorageDomain.create", {"domainID": VG, "guid": GUID, "name": "a b"}, "'name'"),
])
def test_verb_parameters_are_validated(verb: str, params: dict[str, Any], fragment: str) -> None:
    with pytest.raises(InvalidParamsError) as info:
        SCHEMA.verbs[verb].parse_params(params)
    assert fragment in info.value.message


def test_verb_locks_name_domain_and_volume() -> None:
    verb = SCHEMA.verbs["Volume.remove"]
    params = verb.parse_params({**PDIV, "domainID": VG.upper()})
    assert verb.lock_keys(params) == [f"domain:{VG}", f"volume:{VG}/{ISO_LV}"]
    prepare = SCHEMA.verbs["Image.prepare"]
    assert prepare.lock_keys(prepare.parse_params({**PDIV, "user": "vm:sdc"})) == [
        f"volume:{VG}/{ISO_LV}"]


def test_every_storage_error_has_an_ovirt_code() -> None:
    for verb in SCHEMA.verbs.values():
        for error in verb.errors:
            assert issubclass(error, HostError) and error.code > 0 and error.name


# -- local LUN devices: what a crashed agent left ------------------------------------------------

def test_recover_removes_what_a_dead_agent_recorded(tmp_path: Path) -> None:
    from virtyard.host.storage.lun_device import LunDevices  # noqa: PLC0415

    mounts = tmp_path / "lun-devices"
    mounts.mkdir()
    (mounts / GUID).touch()  # recorded, its daemon long gone
    (mounts / "36000000000000000000000000000beef").touch()  # made, crashed before recording
    (tmp_path / "lun-devices.json").write_text(json.dumps([
        {"guid": GUID, "mountpoint": str(mounts / GUID), "pid": 2 ** 22 + 1, "loop": "",
         "refs": 1}]))
    devices = LunDevices(tmp_path, FakeInitiator("userspace"), initiator_name="iqn.2026-11.x:h")
    assert devices.attachments() == [] and devices.leftovers() == []
    assert list(mounts.iterdir()) == []
    assert json.loads((tmp_path / "lun-devices.json").read_text()) == []


def test_kernel_initiator_luns_need_no_attachment(tmp_path: Path) -> None:
    from virtyard.host.storage.lun_device import LunDevices  # noqa: PLC0415

    devices = LunDevices(tmp_path, FakeInitiator("kernel"), initiator_name="iqn.2026-11.x:h")
    device = Device(GUID, "", "", "", "", 0, 512, 512, 0, [])
    with devices.attached(device) as local:
        assert local.path == local.block_device == f"/dev/mapper/{GUID}"
    assert devices.attachments() == [] and not (tmp_path / "lun-devices.json").exists()
