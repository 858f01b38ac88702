"""``virtyard-lab up|down|status``: the lab from the shell, with one clear line per error."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from virtyard.lab.errors import LabError
from virtyard.lab.lab import Lab, LabConfig


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="virtyard-lab", description=__doc__)
    parser.add_argument("--state-dir", type=Path, default=Path(".lab"),
                        help="where the lab keeps its state (default: .lab)")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="bring the lab up (idempotent)")
    up.add_argument("--profile", choices=("demo", "test"), default="demo",
                    help="port set: 'demo' or 'test' (both can run at once)")
    up.add_argument("--hosts", type=int, default=2, help="number of hypervisor hosts")
    up.add_argument("--env-file", type=Path, help="also write the lab as KEY=value lines here")
    up.add_argument("--port-base", type=int,
                    help="use ports from here instead of the profile's (a third lab, say)")
    sub.add_parser("down", help="stop everything and remove the state directory")
    status = sub.add_parser("status", help="print what runs, where, and how to reach it")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


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
    args = _parser().parse_args(argv)
    try:
        if args.command == "up":
            config_of = LabConfig.demo if args.profile == "demo" else LabConfig.test
            config = config_of(args.state_dir)
            config = LabConfig(**{**config.__dict__, "host_count": args.hosts})
            if args.port_base:
                config = config.with_port_base(args.port_base)
            lab = Lab.load(args.state_dir) or Lab(config)
            status = lab.up()
            if args.env_file:
                write_env_file(args.env_file, lab.env())
            print(format_status(status))
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
