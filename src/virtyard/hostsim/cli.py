"""``virtyard-hostsim``: simulate many host agents in one process (see ``docs/hostsim.md``).

    virtyard-hostsim --hosts 100 --vms-per-host 100 --base-port 28000 --pki ./pki \\
        --change-rate 0.01 --change-interval 1

Each host listens on its own port (``--base-port`` + its index) with mutual TLS. ``--pki DIR``
uses the CA in DIR (``ca.pem``, ``ca-key.pem``: e.g. the engine's pki folder) or makes one
there, and issues the hosts' server certificate (``hostsim.pem``) and, unless the engine's
``engine.pem`` is there, a client certificate (``hostsim-client.pem``).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import shlex
import sys
from pathlib import Path

from virtyard.common.pki import create_ca, issue
from virtyard.hostsim.server import ServerTls, Simulator
from virtyard.hostsim.state import SimOptions

log = logging.getLogger("virtyard.hostsim")

FDS_PER_HOST = 8  # its listening socket and a few client connections


def make_pki(directory: Path, address: str) -> tuple[ServerTls, tuple[Path, Path]]:
    """The CA in ``directory`` (made if missing), the hosts' server certificate for
    ``address``, and a client certificate: ``(server TLS, (client cert, client key))``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = create_ca(directory, "Virtyard hostsim CA")
    server = issue(ca, directory, "hostsim", common_name="virtyard-hostsim",
                   addresses=(address, "localhost"), server=True, client=True)
    engine = (directory / "engine.pem", directory / "engine-key.pem")
    if engine[0].exists() and engine[1].exists():
        client = engine
    else:
        made = issue(ca, directory, "hostsim-client", common_name="virtyard-hostsim-client",
                     server=False, client=True)
        client = (made.cert, made.key)
    return ServerTls(server.cert, server.key, ca.cert), client


def raise_fd_limit(wanted: int) -> int:
    """Raise the open-files soft limit toward ``wanted`` (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, not {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, not {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, not {text}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="virtyard-hostsim", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sim = parser.add_argument_group("what to simulate")
    sim.add_argument("--hosts", type=_positive_int, default=10, help="hosts (default 10)")
    sim.add_argument("--vms-per-host", type=_count, default=10, help="VMs each (default 10)")
    sim.add_argument("--luns-per-host", type=_count, default=16,
                     help="free LUNs each host sees, besides the VMs' own (default 16)")
    sim.add_argument("--disks-per-vm", type=_count, default=1,
                     help="LUN disks each VM starts with (default 1)")
    sim.add_argument("--change-rate", type=_fraction, default=0.0,
                     help="fraction of each host's VMs that get a device change (a disk with "
                          "a new guest name plugged, or one unplugged) per interval "
                          "(default 0)")
    sim.add_argument("--change-interval", type=_positive_float, default=1.0,
                     help="seconds between change rounds (default 1)")
    sim.add_argument("--crash-rate", type=_fraction, default=0.0,
                     help="fraction of each host's VMs that go down (reason failed) per "
                          "interval (default 0)")
    sim.add_argument("--guest-name-delay", type=float, default=0.3,
                     help="seconds after VM.hotplugDisk until the guest names the disk "
                          "(default 0.3)")
    sim.add_argument("--event-capacity", type=_positive_int, default=1024,
                     help="events each host keeps for Host.getEvents; a reader further "
                          "behind is reset (default 1024; the real agent keeps 4096)")
    sim.add_argument("--san-portal", default="127.0.0.1:3260",
                     help="the simulated SAN's portal in the LUNs' paths (default "
                          "127.0.0.1:3260; nothing listens there)")
    sim.add_argument("--name-prefix", default="sim",
                     help="host names are PREFIX0001, PREFIX0002… (default sim)")
    sim.add_argument("--seed", type=int, default=None, help="random seed (repeatable runs)")
    net = parser.add_argument_group("where and how to listen")
    net.add_argument("--address", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    net.add_argument("--base-port", type=int, default=28000,
                     help="the first host's port; host i listens on base+i (default 28000)")
    net.add_argument("--pki", type=Path, default=None,
                     help="make or use a CA in this folder and issue the certificates")
    net.add_argument("--ca", type=Path, help="CA that signed the clients' certificates")
    net.add_argument("--cert", type=Path, help="the hosts' server certificate")
    net.add_argument("--key", type=Path, help="its private key")
    out = parser.add_argument_group("for the operator")
    out.add_argument("--hosts-file", type=Path, default=None,
                     help="write the hosts (name, address, host UUID, initiator) as JSON")
    out.add_argument("--env-file", type=Path, default=None,
                     help="write VIRTYARD_HOSTS and the client certificate for "
                          "virtyard-hostctl (with --pki)")
    out.add_argument("--log-level", default="INFO")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.base_port <= 0 or args.base_port + args.hosts - 1 > 65535:
        parser.error("--base-port must be > 0 and --base-port + --hosts - 1 <= 65535")
    client: tuple[Path, Path] | None = None
    if args.pki is not None:
        if args.ca or args.cert or args.key:
            parser.error("give --pki or --ca/--cert/--key, not both")
        tls, client = make_pki(args.pki, args.address)
    elif args.ca and args.cert and args.key:
        tls = ServerTls(args.cert, args.key, args.ca)
        for path in (tls.cert, tls.key, tls.ca):
            if not path.exists():
                parser.error(f"TLS file {path} not found")
    else:
        parser.error("give --pki DIR, or --ca, --cert and --key")
    limit = raise_fd_limit(args.hosts * FDS_PER_HOST + 256)
    if limit < args.hosts * 2 + 64:
        parser.error(f"the open-files limit ({limit}) is too low for {args.hosts} hosts; "
                     "raise it (ulimit -n)")
    options = SimOptions(
        hosts=args.hosts, vms_per_host=args.vms_per_host, base_port=args.base_port,
        address=args.address, luns_per_host=args.luns_per_host, disks_per_vm=args.disks_per_vm,
        change_rate=args.change_rate, change_interval=args.change_interval,
        crash_rate=args.crash_rate, guest_name_delay=args.guest_name_delay,
        event_capacity=args.event_capacity,
        san_portal=args.san_portal, name_prefix=args.name_prefix, seed=args.seed)
    simulator = Simulator(options, tls)
    try:
        simulator.bind()
    except OSError as exc:
        print(f"virtyard-hostsim: error: {exc}", file=sys.stderr)
        return 1
    hosts = simulator.hosts
    if args.hosts_file is not None:
        args.hosts_file.write_text(json.dumps([
            {"name": h.name, "address": h.endpoint, "hostUUID": h.host_uuid,
             "iscsiInitiatorName": h.initiator_name, "vms": len(h.vms)} for h in hosts],
            indent=1) + "\n")
    if args.env_file is not None:
        lines = [f"VIRTYARD_HOSTS={shlex.quote(' '.join(h.endpoint for h in hosts))}",
                 f"VIRTYARD_HOST_CA={shlex.quote(str(tls.ca))}"]
        if client is not None:
            lines += [f"VIRTYARD_HOST_CERT={shlex.quote(str(client[0]))}",
                      f"VIRTYARD_HOST_KEY={shlex.quote(str(client[1]))}"]
        args.env_file.write_text("\n".join(lines) + "\n")
    log.info("simulating %d hosts x %d VMs on https://%s:%d-%d (CA %s); change rate %g per "
             "%g s, crash rate %g", len(hosts), args.vms_per_host, args.address,
             hosts[0].port, hosts[-1].port, tls.ca, args.change_rate, args.change_interval,
             args.crash_rate)
    simulator.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
