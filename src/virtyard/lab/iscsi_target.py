"""The lab's SAN: a real user-space iSCSI target (``tgtd``) on the loopback address.

:class:`TgtAdm` is a thin typed wrapper over ``tgtadm`` (one method per operation, typed errors);
:class:`TargetServer` runs one ``tgtd`` with its own portal port and control port, and creates
targets whose LUNs are backed by sparse files, optionally protected by CHAP.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from virtyard.lab import ports
from virtyard.lab.errors import CommandError, LabError
from virtyard.lab.process import read_pid, require, run, start_daemon, terminate, wait_until

IQN_PREFIX = "iqn.2026-11.org.virtyard.lab"


@dataclass(frozen=True)
class Chap:
    """CHAP credentials an initiator must present to log in to a target."""

    username: str
    password: str

    def __repr__(self) -> str:  # never show the password in logs or tracebacks
        return f"Chap(username={self.username!r}, password='***')"


@dataclass(frozen=True)
class LunInfo:
    """One logical unit of a target: its number, its backing file and its size in bytes."""

    lun: int
    backing: Path
    size: int


@dataclass(frozen=True)
class TargetInfo:
    """A target as the lab created it: where initiators reach it and what it serves."""

    tid: int
    iqn: str
    address: str
    port: int
    luns: tuple[LunInfo, ...]
    chap_user: str | None = None

    @property
    def portal(self) -> str:
        """``address:port`` as initiators and QEMU take it."""
        return f"{self.address}:{self.port}"

    def wwid(self, lun: int) -> str:
        """The WWID of LUN ``lun`` as udev and multipath name it: ``3`` + the 16-byte NAA 6
        designator tgt builds from the target id and the LUN number
        (``6000000000000000 0e000000 <tid:16> <lun:16>``)."""
        return f"360000000000000000e000000{self.tid:04x}{lun:04x}"

    def lun(self, number: int) -> LunInfo:
        """The LUN numbered ``number``; KeyError if the target has none."""
        for lun in self.luns:
            if lun.lun == number:
                return lun
        raise KeyError(number)


class TgtAdm:
    """One method per ``tgtadm`` operation, against the tgtd listening on ``control_port``."""

    def __init__(self, control_port: int) -> None:
        self.control_port = control_port

    def _run(self, *args: str, secrets: tuple[str, ...] = ()) -> str:
        argv = ["tgtadm", "-C", str(self.control_port), "--lld", "iscsi", *args]
        return run(argv, timeout=30, secrets=secrets).stdout

    def ping(self) -> bool:
        """True when tgtd answers on its control port."""
        try:
            self._run("--mode", "target", "--op", "show")
        except CommandError:
            return False
        return True

    def new_target(self, tid: int, iqn: str) -> None:
        self._run("--mode", "target", "--op", "new", "--tid", str(tid), "--targetname", iqn)

    def set_target_state(self, tid: int, state: str) -> None:
        self._run("--mode", "target", "--op", "update", "--tid", str(tid),
                  "--name", "state", "--value", state)

    def delete_target(self, tid: int) -> None:
        self._run("--mode", "target", "--op", "delete", "--force", "--tid", str(tid))

    def allow_all_initiators(self, tid: int) -> None:
        self._run("--mode", "target", "--op", "bind", "--tid", str(tid),
                  "--initiator-address", "ALL")

    def deny_all_initiators(self, tid: int) -> None:
        self._run("--mode", "target", "--op", "unbind", "--tid", str(tid),
                  "--initiator-address", "ALL")

    def allow_initiator(self, tid: int, name: str) -> None:
        self._run("--mode", "target", "--op", "bind", "--tid", str(tid),
                  "--initiator-name", name)

    def deny_initiator(self, tid: int, name: str) -> None:
        self._run("--mode", "target", "--op", "unbind", "--tid", str(tid),
                  "--initiator-name", name)

    def new_lun(self, tid: int, lun: int, backing: Path) -> None:
        self._run("--mode", "logicalunit", "--op", "new", "--tid", str(tid), "--lun", str(lun),
                  "--backing-store", str(backing))

    def new_account(self, chap: Chap) -> None:
        self._run("--mode", "account", "--op", "new", "--user", chap.username,
                  "--password", chap.password, secrets=(chap.password,))

    def delete_account(self, username: str) -> None:
        self._run("--mode", "account", "--op", "delete", "--user", username)

    def bind_account(self, tid: int, username: str) -> None:
        self._run("--mode", "account", "--op", "bind", "--tid", str(tid), "--user", username)

    def show_targets(self) -> dict[int, str]:
        """Every target tgtd holds, as ``{tid: iqn}``."""
        out = self._run("--mode", "target", "--op", "show")
        return {int(m.group(1)): m.group(2)
                for m in re.finditer(r"^Target (\d+): (\S+)$", out, re.MULTILINE)}

    def show_accounts(self) -> list[str]:
        out = self._run("--mode", "account", "--op", "show")
        return [line.strip() for line in out.splitlines()[1:] if line.strip()]

    def shutdown(self) -> None:
        """Ask tgtd to exit (it refuses while targets exist: delete them first)."""
        self._run("--mode", "system", "--op", "delete")


@dataclass
class _ServerState:
    """What the lab remembers about its tgtd between commands (``<dir>/targets.json``)."""

    next_tid: int = 1
    targets: dict[str, TargetInfo] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({
            "next_tid": self.next_tid,
            "targets": {
                name: {"tid": t.tid, "iqn": t.iqn, "address": t.address, "port": t.port,
                       "chap_user": t.chap_user,
                       "luns": [[lun.lun, str(lun.backing), lun.size] for lun in t.luns]}
                for name, t in self.targets.items()
            },
        }, indent=1)

    @classmethod
    def from_json(cls, text: str) -> _ServerState:
        raw = json.loads(text)
        targets = {
            name: TargetInfo(
                tid=int(t["tid"]), iqn=str(t["iqn"]), address=str(t["address"]),
                port=int(t["port"]), chap_user=t["chap_user"],
                luns=tuple(LunInfo(int(n), Path(p), int(s)) for n, p, s in t["luns"]),
            )
            for name, t in raw["targets"].items()
        }
        return cls(next_tid=int(raw["next_tid"]), targets=targets)


class TargetServer:
    """One ``tgtd`` on ``127.0.0.1:port``, its LUN files and state under ``root``."""

    def __init__(self, root: Path, port: int, control_port: int) -> None:
        self.root = root
        self.port = port
        self.control_port = control_port
        self.adm = TgtAdm(control_port)

    @property
    def pidfile(self) -> Path:
        return self.root / "tgtd.pid"

    @property
    def lun_dir(self) -> Path:
        return self.root / "luns"

    @property
    def _state_file(self) -> Path:
        return self.root / "targets.json"

    @property
    def portal(self) -> str:
        return f"{ports.LOOPBACK}:{self.port}"

    def pid(self) -> int | None:
        return read_pid(self.pidfile)

    def is_running(self) -> bool:
        return self.pid() is not None

    def start(self, timeout: float = 15.0) -> None:
        """Start tgtd (no-op when it already runs); on failure nothing stays started."""
        if self.is_running():
            return
        tgtd = require("tgtd")
        require("tgtadm")
        ports.ensure_free(self.port, "iSCSI portal of the lab's tgtd")
        if self.adm.ping():
            raise LabError(f"another tgtd already answers on control port {self.control_port}")
        self.root.mkdir(parents=True, exist_ok=True)
        self.lun_dir.mkdir(exist_ok=True)
        # -f keeps tgtd in the foreground so that our pid file names the real daemon.
        start_daemon(
            [tgtd, "-f", "-C", str(self.control_port),
             "--iscsi", f"portal={ports.LOOPBACK}:{self.port}"],
            pidfile=self.pidfile, log=self.root / "tgtd.log", timeout=timeout,
            ready=lambda: ports.port_is_listening(self.port) and self.adm.ping(),
            what=f"tgtd on port {self.port}")
        self._save(_ServerState())

    def stop(self) -> None:
        """Take every target offline and delete it, stop tgtd, remove LUN files and state."""
        pid = self.pid()
        if pid is not None:
            try:
                for tid in self.adm.show_targets():
                    self.adm.set_target_state(tid, "offline")
                    self.adm.delete_target(tid)
                for account in self.adm.show_accounts():
                    self.adm.delete_account(account)
                self.adm.shutdown()
            except CommandError:
                pass  # tgtd is going away regardless; terminate() below makes sure
            if not wait_until(lambda: read_pid(self.pidfile) is None, timeout=5):
                terminate(pid, grace=5)
        self.pidfile.unlink(missing_ok=True)
        for lun_file in self.lun_dir.glob("*.img") if self.lun_dir.exists() else ():
            lun_file.unlink()
        if self.lun_dir.exists():
            self.lun_dir.rmdir()
        self._state_file.unlink(missing_ok=True)
        for leftover in ("tgtd.log",):
            (self.root / leftover).unlink(missing_ok=True)
        if self.root.exists() and not any(self.root.iterdir()):
            self.root.rmdir()

    def create_target(
        self, name: str, lun_sizes: list[int], *, chap: Chap | None = None
    ) -> TargetInfo:
        """Create target ``<IQN_PREFIX>:<name>`` with one LUN per size (LUN 1, 2, …).

        LUN 0 is tgt's array controller, as on real arrays. All-or-nothing: a failure
        removes whatever part of the target was made.
        """
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]*", name):
            raise LabError(f"bad target name {name!r}: use lower-case letters, digits, '.', '-'")
        state = self._load()
        if name in state.targets:
            raise LabError(f"target {name!r} already exists")
        tid = state.next_tid
        iqn = f"{IQN_PREFIX}:{name}"
        luns: list[LunInfo] = []
        try:
            self.adm.new_target(tid, iqn)
            for number, size in enumerate(lun_sizes, start=1):
                backing = self.lun_dir / f"{name}-lun{number}.img"
                with backing.open("wb") as f:
                    f.truncate(size)
                luns.append(LunInfo(number, backing, size))
                self.adm.new_lun(tid, number, backing)
            if chap is not None:
                self.adm.new_account(chap)
                self.adm.bind_account(tid, chap.username)
            self.adm.allow_all_initiators(tid)
        except LabError:
            self._remove(tid, luns, chap.username if chap else None)
            raise
        target = TargetInfo(tid, iqn, ports.LOOPBACK, self.port, tuple(luns),
                            chap.username if chap else None)
        state.next_tid = tid + 1
        state.targets[name] = target
        self._save(state)
        return target

    def delete_target(self, name: str) -> None:
        """Delete target ``name`` with its LUN files and CHAP account; unknown names are ignored."""
        state = self._load()
        target = state.targets.pop(name, None)
        if target is None:
            return
        self._remove(target.tid, list(target.luns), target.chap_user)
        self._save(state)

    def restrict(self, name: str, initiators: list[str] | None) -> None:
        """Let only these initiator names log in to target ``name`` (``None``: everyone
        again): a host whose storage path is broken, for real, while others reach it."""
        target = self._load().targets[name]
        with contextlib.suppress(LabError):  # not bound to ALL (restricted already)
            self.adm.deny_all_initiators(target.tid)
        if initiators is None:
            self.adm.allow_all_initiators(target.tid)
            return
        for initiator in initiators:
            with contextlib.suppress(LabError):  # bound already
                self.adm.allow_initiator(target.tid, initiator)

    def targets(self) -> list[TargetInfo]:
        """The targets the lab created and still serves."""
        return list(self._load().targets.values())

    def _remove(self, tid: int, luns: list[LunInfo], chap_user: str | None) -> None:
        if tid in self.adm.show_targets():
            self.adm.set_target_state(tid, "offline")
            self.adm.delete_target(tid)
        if chap_user and chap_user in self.adm.show_accounts():
            self.adm.delete_account(chap_user)
        for lun in luns:
            lun.backing.unlink(missing_ok=True)

    def _load(self) -> _ServerState:
        try:
            return _ServerState.from_json(self._state_file.read_text())
        except FileNotFoundError:
            return _ServerState()

    def _save(self, state: _ServerState) -> None:
        tmp = self._state_file.with_suffix(".tmp")
        tmp.write_text(state.to_json())
        tmp.replace(self._state_file)

    def status(self) -> dict[str, object]:
        """What runs and how to reach it, for ``virtyard-lab status``."""
        return {
            "running": self.is_running(),
            "pid": self.pid(),
            "portal": self.portal,
            "control_port": self.control_port,
            "targets": [{"iqn": t.iqn, "luns": [lun.lun for lun in t.luns],
                         "chap": t.chap_user is not None} for t in self.targets()],
        }
