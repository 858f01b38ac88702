"""StoragePool.getConnections: what the agent keeps, with references, never a password."""

from __future__ import annotations

import pytest

from virtyard.host.client import HostClient
from virtyard.lab.iscsi_target import Chap

pytestmark = pytest.mark.lab

MiB = 1 << 20


def test_connections_are_listed_with_refs_and_no_secret(make_target, connect_target,
                                                        host_client: HostClient) -> None:
    plain = make_target([16 * MiB])
    secret = make_target([16 * MiB], chap=Chap("vyuser", "vy-secret-pass"))
    connect_target(plain, conn_id="conn-plain")
    connect_target(plain, conn_id="conn-plain")
    connect_target(secret, conn_id="conn-chap", user="vyuser", password="vy-secret-pass")
    kept = {c["id"]: c for c in host_client.call("StoragePool.getConnections")}
    assert kept["conn-plain"]["refs"] == 2 and kept["conn-plain"]["iqn"] == plain.iqn
    assert kept["conn-plain"]["user"] == ""
    assert kept["conn-chap"]["user"] == "vyuser" and kept["conn-chap"]["refs"] == 1
    assert "vy-secret-pass" not in repr(kept)
