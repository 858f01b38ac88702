"""``virtyard-hostctl``: call any host-agent verb from a shell, like oVirt's ``vdsm-client``.

    virtyard-hostctl [--host ADDR] VERB [name=value ...]
    virtyard-hostctl [--host ADDR] VERB --json '{"name": value}'

A value is taken as JSON when it parses as JSON (numbers, true/false, lists, objects), else as a
string. Certificates come from options or VIRTYARD_HOST_CERT / _KEY / _CA; the host from
--host or the first of VIRTYARD_HOSTS. Prints the result as JSON; an error is one line with the
code, and the exit status is 1 (2 when the agent cannot be reached, 64 for bad usage).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from virtyard.host.client import ClientTls, HostCallError, HostClient, HostUnreachableError

EXIT_ERROR, EXIT_UNREACHABLE, EXIT_USAGE = 1, 2, 64


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """``["a=1", "b=x"]`` -> ``{"a": 1, "b": "x"}``."""
    params: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            raise ValueError(f"expected name=value, got {item!r}")
        try:
            params[name] = json.loads(raw)
        except ValueError:
            params[name] = raw
    return params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="virtyard-hostctl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    hosts = os.environ.get("VIRTYARD_HOSTS", "").split()
    parser.add_argument("--host", default=hosts[0] if hosts else None,
                        help="agent address host:port (default: first of $VIRTYARD_HOSTS)")
    parser.add_argument("--cert", default=os.environ.get("VIRTYARD_HOST_CERT"))
    parser.add_argument("--key", default=os.environ.get("VIRTYARD_HOST_KEY"))
    parser.add_argument("--ca", default=os.environ.get("VIRTYARD_HOST_CA"))
    parser.add_argument("--json", dest="json_params", help="parameters as one JSON object")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("verb", help="e.g. Host.getDeviceList")
    parser.add_argument("params", nargs="*", help="name=value")
    args = parser.parse_args(argv)
    missing = [n for n in ("host", "cert", "key", "ca") if not getattr(args, n)]
    if missing:
        print(f"virtyard-hostctl: missing --{', --'.join(missing)} "
              "(or VIRTYARD_HOSTS / VIRTYARD_HOST_CERT / _KEY / _CA)", file=sys.stderr)
        return EXIT_USAGE
    try:
        params: Any = (json.loads(args.json_params) if args.json_params
                       else parse_assignments(args.params))
    except ValueError as exc:
        print(f"virtyard-hostctl: bad parameters: {exc}", file=sys.stderr)
        return EXIT_USAGE
    tls = ClientTls(Path(args.cert), Path(args.key), Path(args.ca))
    try:
        with HostClient(args.host, tls, timeout=args.timeout) as client:
            result = client.call(args.verb, params)
    except HostCallError as exc:
        print(f"error {exc.code} {exc.name}: {exc.message}", file=sys.stderr)
        return EXIT_ERROR
    except HostUnreachableError as exc:
        print(f"error: cannot reach {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
