"""pyghmi's BMC simulator (``pyghmi.cmd.fakebmc``), made to refuse what it cannot do: it only
speaks the SHA-1 cipher suite but accepts a SHA-256 open-session request, which pyghmi's own
client then fails on. A real SHA-1-only BMC refuses (RMCP+ status 0x11), and the client falls
back to SHA-1. Run: ``python fake_bmc.py PORT`` (user ``admin``, password ``password``)."""

from __future__ import annotations

import sys
from typing import Any

from pyghmi.cmd.fakebmc import FakeBmc
from pyghmi.ipmi.private import serversession

INVALID_AUTH_ALGORITHM = 0x11
_original = serversession.ServerSession.create_open_session_response


def _sha1_only(self: Any, request: bytearray) -> bytearray:
    if request[12] != 1:  # authentication algorithm other than RAKP-HMAC-SHA1
        return bytearray([request[0], INVALID_AUTH_ALGORITHM, 0, 0]) + request[4:8]
    return bytearray(_original(self, request))


serversession.ServerSession.create_open_session_response = _sha1_only  # type: ignore[method-assign]

if __name__ == "__main__":
    FakeBmc({"admin": "password"}, port=int(sys.argv[1])).listen()
