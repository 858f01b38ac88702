"""The host agent's SAN verbs against the real lab: tgtd targets, CHAP, LVM and filesystem
signatures, over the agent's real mutual-TLS JSON-RPC endpoint."""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import libvirt
import pytest

from virtyard.common.pki import create_ca, issue
from virtyard.host.client import ClientTls, HostCallError, HostClient, HostUnreachableError
from virtyard.host.storage.domain_tags import DOMAIN_TAG
from virtyard.lab import qga
from virtyard.lab.guest_vm import iscsi_disk_xml
from virtyard.lab.iscsi_target import Chap, TargetInfo
from virtyard.lab.lab import Lab
from virtyard.lab.process import run

pytestmark = pytest.mark.lab

MiB = 1 << 20
LVM_CONFIG = ("devices { use_devicesfile=0 obtain_device_list_from_udev=0 hints=\"none\" } "
              "activation { udev_sync=0 udev_rules=0 } backup { backup=0 archive=0 }")

Connect = Callable[..., list[dict[str, Any]]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def loop_over() -> Iterator[Callable[[Path], str]]:
    """Factory: a loop device over a file (a LUN's backing file), detached after the test."""
    made: list[str] = []

    def attach(path: Path) -> str:
        device = run(["losetup", "-f", "--show", str(path)]).stdout.strip()
        made.append(device)
        return device

    yield attach
    for device in made:
        run(["losetup", "-d", device], check=False)


def lvm(*args: str) -> str:
    return run(["lvm", *args, "--config", LVM_CONFIG], timeout=60).stdout


# -- the daemon ---------------------------------------------------------------------------------

def test_client_without_certificate_is_refused(lab: Lab) -> None:
    url = f"https://{lab.agents[0].address}/jsonrpc"
    body = {"jsonrpc": "2.0", "id": 1, "method": "Host.getDeviceList"}
    with pytest.raises(httpx.HTTPError):
        httpx.post(url, json=body, verify=ssl.create_default_context(cafile=str(lab.pki.ca.cert)),
                   timeout=10)


def test_client_certificate_from_another_ca_is_refused(lab: Lab, tmp_path: Path) -> None:
    rogue_ca = create_ca(tmp_path, "rogue")
    rogue = issue(rogue_ca, tmp_path, "rogue", common_name="rogue", server=False)
    client = HostClient(lab.agents[0].address, ClientTls(rogue.cert, rogue.key, lab.pki.ca.cert))
    with pytest.raises(HostUnreachableError):
        client.call("Host.getDeviceList", {})
    client.close()


def test_agent_certificate_is_checked_by_the_client(lab: Lab, tmp_path: Path) -> None:
    other_ca = create_ca(tmp_path, "other")
    tls = ClientTls(lab.pki.client.cert, lab.pki.client.key, other_ca.cert)
    with HostClient(lab.agents[0].address, tls) as client, \
            pytest.raises(HostUnreachableError, match="CERTIFICATE_VERIFY_FAILED"):
        client.call("Host.getDeviceList", {})


def test_tls_handshake_without_client_cert_fails_before_http(lab: Lab) -> None:
    context = ssl.create_default_context(cafile=str(lab.pki.ca.cert))
    host, port = lab.agents[0].address.split(":")
    # TLS 1.3: the server's refusal arrives with the first read after the handshake.
    with socket.create_connection((host, int(port)), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=host) as tls, \
            pytest.raises((ssl.SSLError, ConnectionResetError)):
        tls.sendall(b"POST /jsonrpc HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        if not tls.recv(1):
            raise ConnectionResetError("closed")


def test_unknown_verb_and_bad_params(host_client: HostClient) -> None:
    with pytest.raises(HostCallError) as unknown:
        host_client.call("Host.nothing", {})
    assert unknown.value.code == -32601
    with pytest.raises(HostCallError) as bad:
        host_client.call("ISCSIConnection.discoverSendTargets", {"host": "127.0.0.1",
                                                                 "port": 99999})
    assert bad.value.code == -32602 and "'port'" in bad.value.message


# -- discovery ----------------------------------------------------------------------------------

def test_discover_send_targets(lab: Lab, host_client: HostClient,
                               make_target: Callable[..., TargetInfo]) -> None:
    first = make_target([16 * MiB])
    second = make_target([16 * MiB, 32 * MiB])
    found = host_client.call("ISCSIConnection.discoverSendTargets",
                             {"host": "127.0.0.1", "port": lab.storage.port})
    for target in (first, second):
        assert f"127.0.0.1:{lab.storage.port},1 {target.iqn}" in found


def test_discovery_of_unreachable_portal_is_475_naming_it(host_client: HostClient) -> None:
    port = free_port()
    with pytest.raises(HostCallError) as info:
        host_client.call("ISCSIConnection.discoverSendTargets", {"host": "127.0.0.1",
                                                                 "port": port})
    assert info.value.code == 475
    assert f"127.0.0.1:{port}" in info.value.message


@pytest.mark.parametrize(("params", "fragment"), [
    ({"host": "::1", "port": 3260}, "ipv6_enabled"),
    ({"host": "bad host!", "port": 3260}, "'host'"),
    ({"host": "127.0.0.1", "port": 0}, "'port'"),
    ({"host": "127.0.0.1", "port": "x"}, "'port'"),
    ({"port": 3260}, "missing parameter 'host'"),
])
def test_discovery_rejects_malformed_input(host_client: HostClient, params: dict[str, Any],
                                           fragment: str) -> None:
    with pytest.raises(HostCallError) as info:
        host_client.call("ISCSIConnection.discoverSendTargets", params)
    assert info.value.code == -32602
    assert fragment in info.value.message


def test_discovery_on_ipv6_literal_when_enabled(host_client: HostClient) -> None:
    port = free_port()
    with pytest.raises(HostCallError) as info:
        host_client.call("ISCSIConnection.discoverSendTargets",
                         {"host": "[::1]", "port": port, "ipv6_enabled": True})
    assert info.value.code == 475
    assert f"[::1]:{port}" in info.value.message


# -- connections and the device list --------------------------------------------------------

def test_connect_list_and_disconnect(lab: Lab, host_client: HostClient,
                                     make_target: Callable[..., TargetInfo],
                                     connect_target: Connect) -> None:
    target = make_target([16 * MiB, 48 * MiB, 130 * MiB])
    conn_id = str(uuid.uuid4())
    assert connect_target(target, conn_id=conn_id) == [{"id": conn_id, "status": 0}]

    devices = host_client.call("Host.getDeviceList", {"checkStatus": False})
    mine = {d["GUID"]: d for d in devices if d["pathlist"][0]["iqn"] == target.iqn}
    assert set(mine) == {target.wwid(n) for n in (1, 2, 3)}  # LUN 0 (controller) skipped
    for n, size in ((1, 16), (2, 48), (3, 130)):
        device = mine[target.wwid(n)]
        assert device["capacity"] == size * MiB
        assert device["status"] == "unknown"
        assert device["vendorID"] == "IET" and device["productID"] == "VIRTUAL-DISK"
        assert device["logicalblocksize"] == 512
        assert device["pathstatus"] == [{"type": "iSCSI", "lun": n, "state": "active",
                                         "physdev": ""}]
        path = device["pathlist"][0]
        assert (path["connection"], path["port"], path["tpgt"]) == ("127.0.0.1", target.port, 1)
        assert "password" not in path

    only = host_client.call("Host.getDeviceList",
                            {"guids": [target.wwid(2)], "checkStatus": False})
    assert [d["GUID"] for d in only] == [target.wwid(2)]

    host_client.call("StoragePool.disconnectStorageServer", {
        "domainType": 3, "connectionParams": [{"id": conn_id, "connection": "127.0.0.1",
                                               "port": target.port, "iqn": target.iqn}]})
    cached = host_client.call("Host.getDeviceList", {"checkStatus": False, "refresh": False})
    assert not [d for d in cached if d["GUID"] in mine]
    fresh = host_client.call("Host.getDeviceList", {"checkStatus": False})
    assert not [d for d in fresh if d["GUID"] in mine]

    # Reconnect: the LUNs come back.
    assert connect_target(target)[0]["status"] == 0
    again = host_client.call("Host.getDeviceList", {"checkStatus": False, "refresh": False})
    assert {target.wwid(n) for n in (1, 2, 3)} <= {d["GUID"] for d in again}


def test_connection_reference_counting(host_client: HostClient,
                                       make_target: Callable[..., TargetInfo],
                                       connect_target: Connect) -> None:
    target = make_target([16 * MiB])
    conn_id = str(uuid.uuid4())
    connect_target(target, conn_id=conn_id)
    connect_target(target, conn_id=conn_id)
    params = {"domainType": 3, "connectionParams": [
        {"id": conn_id, "connection": "127.0.0.1", "port": target.port, "iqn": target.iqn}]}
    guid = target.wwid(1)
    assert host_client.call("StoragePool.disconnectStorageServer", params)[0]["status"] == 0
    assert host_client.call("Host.getDevicesVisibility", {"guidList": [guid]}) == {guid: True}
    assert host_client.call("StoragePool.disconnectStorageServer", params)[0]["status"] == 0
    assert host_client.call("Host.getDevicesVisibility", {"guidList": [guid]}) == {guid: False}
    # Idempotent: once more, and an empty list, are fine.
    assert host_client.call("StoragePool.disconnectStorageServer", params)[0]["status"] == 0
    assert host_client.call("StoragePool.disconnectStorageServer",
                            {"domainType": 3, "connectionParams": []}) == []


def test_chap_success_wrong_password_and_wrong_iqn(lab: Lab, host_client: HostClient,
                                                   make_target: Callable[..., TargetInfo],
                                                   connect_target: Connect) -> None:
    secret = "chap-" + uuid.uuid4().hex
    user = "u" + uuid.uuid4().hex[:6]
    guarded = make_target([16 * MiB], chap=Chap(user, secret))
    plain = make_target([16 * MiB])
    ids = [str(uuid.uuid4()) for _ in range(4)]
    statuses = host_client.call("StoragePool.connectStorageServer", {
        "domainType": 3, "connectionParams": [
            {"id": ids[0], "connection": "127.0.0.1", "port": guarded.port, "iqn": guarded.iqn,
             "user": user, "password": secret},
            {"id": ids[1], "connection": "127.0.0.1", "port": guarded.port, "iqn": guarded.iqn,
             "user": user, "password": "wrong-" + secret},
            {"id": ids[2], "connection": "127.0.0.1", "port": plain.port,
             "iqn": plain.iqn + "-missing"},
            {"id": ids[3], "connection": "127.0.0.1", "port": plain.port, "iqn": plain.iqn},
        ]})
    assert [s["status"] for s in statuses] == [0, 476, 465, 0]
    try:
        visible = host_client.call("Host.getDevicesVisibility", {
            "guidList": [guarded.wwid(1), plain.wwid(1)]})
        assert visible == {guarded.wwid(1): True, plain.wwid(1): True}
        listing = host_client.call("Host.getDeviceList", {"guids": [guarded.wwid(1)]})
        assert listing[0]["pathlist"][0]["user"] == user
        assert secret not in json.dumps(listing)
    finally:
        host_client.call("StoragePool.disconnectStorageServer", {
            "domainType": 3, "connectionParams": [
                {"id": i, "connection": "127.0.0.1", "iqn": plain.iqn} for i in ids]})
    log = lab.agents[0].log_path.read_text()
    assert secret not in log
    assert user in log or "476" in log or "authentication" in log.lower()


@pytest.mark.parametrize(("params", "fragment"), [
    ({"domainType": 3, "connectionParams": [{"id": "x", "connection": "127.0.0.1",
                                             "iqn": "not-an-iqn"}]}, "iqn"),
    ({"domainType": 3, "connectionParams": [{"id": "x", "connection": "127.0.0.1",
                                             "iqn": "iqn.2026-11.x:y", "port": 0}]}, "port"),
    ({"domainType": 9, "connectionParams": []}, "domainType"),
])
def test_connect_rejects_malformed_input(host_client: HostClient, params: dict[str, Any],
                                         fragment: str) -> None:
    with pytest.raises(HostCallError) as info:
        host_client.call("StoragePool.connectStorageServer", params)
    assert info.value.code == -32602 and fragment in info.value.message


def test_connect_with_no_connections_is_an_error(host_client: HostClient) -> None:
    with pytest.raises(HostCallError) as info:
        host_client.call("StoragePool.connectStorageServer",
                         {"domainType": 3, "connectionParams": []})
    assert info.value.code == 1000


@pytest.mark.parametrize("guid", ["", "../etc", "3600 1", "x" * 300])
def test_bad_wwid_is_rejected(host_client: HostClient, guid: str) -> None:
    with pytest.raises(HostCallError) as info:
        host_client.call("Host.getDeviceList", {"guids": [guid]})
    assert info.value.code == -32602 and "guids" in info.value.message


def test_status_free_lvm_pv_and_filesystem(lab: Lab, host_client: HostClient,
                                           make_target: Callable[..., TargetInfo],
                                           connect_target: Connect,
                                           loop_over: Callable[[Path], str]) -> None:
    target = make_target([64 * MiB, 64 * MiB, 64 * MiB, 64 * MiB])
    # LUN 2: an LVM PV in a VG; LUN 3: an ext4 filesystem; LUN 4: a PV of a block storage
    # domain (VG named by the domain's UUID, tagged); LUN 1 stays empty.
    domain_id = str(uuid.uuid4())
    sd_loop = loop_over(target.lun(4).backing)
    lvm("pvcreate", "-y", "--devices", sd_loop, sd_loop)
    lvm("vgcreate", "--devices", sd_loop, "--addtag", DOMAIN_TAG, domain_id, sd_loop)
    run(["losetup", "-d", sd_loop])
    loop = loop_over(target.lun(2).backing)
    vg_name = "vg" + uuid.uuid4().hex[:8]
    lvm("pvcreate", "-y", "--devices", loop, loop)
    lvm("vgcreate", "--devices", loop, vg_name, loop)
    report = json.loads(lvm("pvs", "--devices", loop, "--reportformat", "json",
                            "-o", "pv_uuid,vg_uuid,vg_name", loop))["report"][0]["pv"][0]
    run(["losetup", "-d", loop])
    run(["mkfs.ext4", "-q", "-F", "-U", "d1f0c2d0-0000-4000-8000-000000000001",
         str(target.lun(3).backing)])
    connect_target(target)

    listing = {d["GUID"]: d for d in host_client.call(
        "Host.getDeviceList", {"guids": [target.wwid(n) for n in (1, 2, 3, 4)]})}
    empty, pv, fs, sd = (listing[target.wwid(n)] for n in (1, 2, 3, 4))
    assert sd["status"] == "used" and sd["usedReason"] == "storage-domain"
    assert sd["storageDomainID"] == domain_id and domain_id in sd["usedDetail"]
    assert pv["storageDomainID"] == ""
    assert empty["status"] == "free" and empty["usedReason"] is None
    assert pv["status"] == "used" and pv["usedReason"] == "lvm-pv"
    assert (pv["pvUUID"], pv["vgUUID"], pv["vgName"]) == (
        report["pv_uuid"], report["vg_uuid"], vg_name)
    assert fs["status"] == "used" and fs["usedReason"] == "filesystem"
    assert "ext4" in fs["usedDetail"]

    cached = {d["GUID"]: d for d in host_client.call(
        "Host.getDeviceList", {"guids": [target.wwid(2)], "refresh": False})}
    assert cached[target.wwid(2)]["vgUUID"] == report["vg_uuid"]


def test_hostctl_prints_json_and_one_line_errors(lab: Lab,
                                                 make_target: Callable[..., TargetInfo]) -> None:
    target = make_target([16 * MiB])
    env = {**os.environ, **lab.env()}
    ok = subprocess.run([sys.executable, "-m", "virtyard.host.hostctl",
                         "ISCSIConnection.discoverSendTargets", "host=127.0.0.1",
                         f"port={lab.storage.port}"],
                        capture_output=True, text=True, env=env, timeout=60, check=False)
    assert ok.returncode == 0, ok.stderr
    assert any(line.endswith(target.iqn) for line in json.loads(ok.stdout))
    bad = subprocess.run([sys.executable, "-m", "virtyard.host.hostctl",
                          "ISCSIConnection.discoverSendTargets", "host=127.0.0.1",
                          f"port={free_port()}"],
                         capture_output=True, text=True, env=env, timeout=60, check=False)
    assert bad.returncode == 1
    assert re.fullmatch(r"error 475 iSCSIDiscoveryError: .*\n", bad.stderr)


def test_reported_wwid_is_what_a_guest_sees(lab: Lab, host_client: HostClient,
                                            make_target: Callable[..., TargetInfo],
                                            connect_target: Connect,
                                            make_guest: Callable[..., Any]) -> None:
    """A guest given the LUN as SCSI passthrough names it /dev/disk/by-id/scsi-<our GUID>."""
    target = make_target([32 * MiB])
    connect_target(target)
    [device] = host_client.call("Host.getDeviceList",
                                {"guids": [target.wwid(1)], "checkStatus": False})
    dom = make_guest(host=0)
    dom.attachDeviceFlags(iscsi_disk_xml(portal_host=target.address, portal_port=target.port,
                                         iqn=target.iqn, lun=1, target_dev="sdb", bus="scsi",
                                         device="lun"), libvirt.VIR_DOMAIN_AFFECT_LIVE)
    path = f"/dev/disk/by-id/scsi-{device['GUID']}"
    deadline = time.monotonic() + 20
    while qga.run(dom, f"test -b {path}").exitcode != 0:
        assert time.monotonic() < deadline, f"{path} not in the guest: " + qga.check_output(
            dom, "ls /dev/disk/by-id")
        time.sleep(0.2)
