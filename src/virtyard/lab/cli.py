"""``virtyard-lab up|down|status``: the lab from the shell, with one clear line per error."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import libvirt

from virtyard.host.virt.libvirt_conn import quiet_libvirt_errors
from virtyard.lab import qga
from virtyard.lab.errors import LabError
from virtyard.lab.iscsi_target import Chap
from virtyard.lab.lab import Lab, LabConfig


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="virtyard-lab", description=__doc__)
    parser.add_argument("--state-dir", type=Path, default=Path(".lab"),
                        help="where the lab keeps its state (default: .lab)")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="bring the lab up (idempotent)")
    up.add_argument("--profile", choices=("demo", "test", "kernel"), default="demo",
                    help="port set: 'demo' or 'test' (both can run at once); 'kernel' is "
                         "'test' plus the storage host VM (kernel initiator, multipath, LVM); "
                         "'test' and 'kernel' ports move by $VIRTYARD_TEST_PORT_OFFSET, as "
                         "the tests' do")
    up.add_argument("--storage-host", action="store_true",
                    help="also boot the storage host VM (TCG, ~1-2 min)")
    up.add_argument("--hosts", type=int, default=2, help="number of hypervisor hosts")
    up.add_argument("--env-file", type=Path, help="also write the lab as KEY=value lines here")
    up.add_argument("--port-base", type=int,
                    help="use ports from here instead of the profile's (a third lab, say)")
    sub.add_parser("down", help="stop everything and remove the state directory")
    demo = sub.add_parser("demo", help="the demo on a running lab: target, connections, VM, "
                                       "the hosts in the engine")
    demo.add_argument("--env-file", type=Path, help="also write its variables here")
    run = sub.add_parser("exec", help="run a shell command inside a lab guest (qemu-ga)")
    run.add_argument("vm", help="the VM's UUID or name, on any lab host")
    run.add_argument("shell", help="the command, run by /bin/sh -c in the guest")
    target = sub.add_parser("target", help="add or remove an iSCSI target of the lab")
    target_sub = target.add_subparsers(dest="target_command", required=True)
    add = target_sub.add_parser("add", help="a target with one LUN per size (e.g. 1G 512M)")
    add.add_argument("name")
    add.add_argument("sizes", nargs="+", type=parse_size)
    add.add_argument("--chap-user")
    add.add_argument("--chap-password-file", type=Path,
                     help="file holding the CHAP password (never on the command line)")
    add.add_argument("--exist-ok", action="store_true", help="no error if it exists")
    remove = target_sub.add_parser("remove", help="remove a target and its LUN files")
    remove.add_argument("name")
    status = sub.add_parser("status", help="print what runs, where, and how to reach it")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def up_config(args: argparse.Namespace) -> LabConfig:
    """The configuration ``up`` gives a new lab: the profile's ports (``test`` and ``kernel``
    moved by the tests' offset), hosts, storage host VM, or ports from ``--port-base``."""
    config_of = LabConfig.demo if args.profile == "demo" else LabConfig.test
    config = config_of(args.state_dir)
    if args.profile != "demo":
        config = config.shifted(_test_port_offset())
    config = LabConfig(**{**config.__dict__, "host_count": args.hosts,
                          "storage_host": args.storage_host or args.profile == "kernel"})
    if args.port_base:
        config = config.with_port_base(args.port_base)
    return config


def _test_port_offset() -> int:
    """``$VIRTYARD_TEST_PORT_OFFSET``: the shift the test suite applies to the test ports."""
    raw = os.environ.get("VIRTYARD_TEST_PORT_OFFSET", "0")
    try:
        return int(raw)
    except ValueError:
        raise LabError(f"VIRTYARD_TEST_PORT_OFFSET must be an integer, not {raw!r}") from None


def parse_size(text: str) -> int:
    """``"512M"`` -> bytes (K, M, G, T suffixes; binary units)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    number, unit = (text[:-1], text[-1].upper()) if text[-1:].isalpha() else (text, "")
    if unit and unit not in units:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use K, M, G or T")
    try:
        value = int(number) * units.get(unit, 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


def _target_command(lab: Lab, args: argparse.Namespace) -> None:
    if args.target_command == "remove":
        lab.storage.delete_target(args.name)
        print(f"target {args.name} removed")
        return
    if args.exist_ok and any(t.iqn.endswith(f":{args.name}") for t in lab.storage.targets()):
        print(f"target {args.name} exists")
        return
    chap = None
    if args.chap_user:
        if not args.chap_password_file:
            raise LabError("--chap-user needs --chap-password-file")
        chap = Chap(args.chap_user, args.chap_password_file.read_text().strip())
    info = lab.storage.create_target(args.name, args.sizes, chap=chap)
    print(f"target {info.iqn} at {info.portal}: LUNs "
          + ", ".join(f"{lun.lun} ({lun.size} bytes)" for lun in info.luns))


def _exec(lab: Lab, vm: str, shell: str) -> int:
    """Run ``shell`` in the guest through qemu-guest-agent; its output, its exit status."""
    for host in lab.hosts:
        conn = libvirt.open(host.uri)
        try:
            for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                if vm in (dom.UUIDString(), dom.name()):
                    qga.wait_ready(dom, timeout=60)  # a guest still booting: wait for it
                    result = qga.run(dom, shell)
                    sys.stdout.write(result.stdout.decode(errors="replace"))
                    sys.stderr.write(result.stderr.decode(errors="replace"))
                    return result.exitcode
        finally:
            conn.close()
    raise LabError(f"no running VM {vm!r} on the lab's hosts")


def format_status(status: dict[str, object]) -> str:
    """A person-readable summary of :meth:`Lab.status`."""
    iscsi = status["iscsi"]
    hosts = status["hosts"]
    assert isinstance(iscsi, dict) and isinstance(hosts, list)
    lines = [
        f"lab state:    {status['state_dir']}",
        f"accelerator:  {status['accelerator']}",
        f"iSCSI portal: {iscsi['portal']} (tgtd pid {iscsi['pid'] or '-'}, "
        f"{'running' if iscsi['running'] else 'stopped'}; {len(iscsi['targets'])} targets)",
    ]
    for target in iscsi["targets"]:
        lines.append(f"  target {target['iqn']} LUNs {target['luns']}")
    for host in hosts:
        lines.append(f"host {host['name']}: {host['uri']} "
                     f"({'running' if host['running'] else 'stopped'}, pid {host['pid'] or '-'}; "
                     f"migration {host['migration_uri']}; domains {host.get('domains', [])})")
    for agent in status.get("agents", []):  # type: ignore[attr-defined]
        lines.append(f"agent {agent['name']}: https://{agent['address']}/jsonrpc "
                     f"({'running' if agent['running'] else 'stopped'}, pid {agent['pid'] or '-'};"
                     f" log {agent['log']})")
    engine = status.get("engine")
    if isinstance(engine, dict):
        state = "running" if engine["running"] else "stopped"
        lines.append(f"engine: {engine['url']} ({state}, pid {engine['pid'] or '-'}; "
                     f"log {engine['log']})")
    storage_host = status.get("storage_host")
    if isinstance(storage_host, dict) and storage_host["running"]:
        lines.append(f"storage host VM (kernel initiator): https://{storage_host['address']}"
                     f"/jsonrpc (pid {storage_host['pid']}; portals "
                     f"{', '.join(storage_host['portals'])}; log {storage_host['log']})")
    return "\n".join(lines)


def write_env_file(path: Path, values: dict[str, str]) -> None:
    """Merge ``values`` into a shell ``KEY=value`` file, keeping keys other tools wrote."""
    current: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip():
                current[key.strip()] = value
    for key, value in values.items():
        current[key] = "'" + value.replace("'", "'\\''") + "'"
    path.write_text("".join(f"{k}={v}\n" for k, v in current.items()))


def main(argv: list[str] | None = None) -> int:
    quiet_libvirt_errors()  # our errors are one line each already
    args = _parser().parse_args(argv)
    try:
        if args.command == "up":
            lab = Lab.load(args.state_dir) or Lab(up_config(args))
            status = lab.up()
            if args.env_file:
                write_env_file(args.env_file, lab.env())
            print(format_status(status))
        elif args.command == "demo":
            from virtyard.lab.demo import set_up  # noqa: PLC0415  (needs the host agent code)

            running = Lab.load(args.state_dir)
            if running is None:
                raise LabError(f"no lab runs in {args.state_dir}: run 'virtyard-lab up' first")
            try:
                values = set_up(running)
            except Exception as exc:  # one clear line: host call errors, unreachable agents
                raise LabError(f"demo set-up failed: {exc}") from exc
            if args.env_file:
                write_env_file(args.env_file, values)
            for key, value in values.items():
                print(f"{key}={value}")
        elif args.command == "exec":
            running = Lab.load(args.state_dir)
            if running is None:
                raise LabError(f"no lab runs in {args.state_dir}: run 'virtyard-lab up' first")
            return _exec(running, args.vm, args.shell)
        elif args.command == "target":
            running = Lab.load(args.state_dir)
            if running is None or not running.storage.is_running():
                raise LabError(f"no lab runs in {args.state_dir}: run 'virtyard-lab up' first")
            _target_command(running, args)
        elif args.command == "down":
            existing = Lab.load(args.state_dir)
            if existing is not None:
                existing.down()
            print(f"lab in {args.state_dir} is down")
        else:
            loaded = Lab.load(args.state_dir)
            if loaded is None:
                print(f"no lab in {args.state_dir}", file=sys.stderr)
                return 3
            status = loaded.status()
            print(json.dumps(status, indent=1) if args.json else format_status(status))
    except LabError as exc:
        print(f"virtyard-lab: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
