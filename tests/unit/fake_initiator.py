"""An initiator that only names devices: what volume and LUN-device code asks of one when a
test gives them no SAN (every other call fails loudly)."""

from __future__ import annotations

from typing import Any

from virtyard.host.storage.initiator import Initiator


class FakeInitiator(Initiator):
    def __init__(self, kind: str) -> None:
        self.kind = kind  # type: ignore[assignment]

    def discover(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def login(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError

    def logout(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError

    def devices(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def device_path(self, guid: str) -> str | None:
        return f"/dev/mapper/{guid}" if self.kind == "kernel" else None
