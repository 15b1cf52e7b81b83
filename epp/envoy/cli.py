"""Print an Envoy bootstrap config (JSON) that puts the picker in front of a static pool.

Use it for plain-Envoy deployments (no Kubernetes) or as a starting point for your own.
"""

from __future__ import annotations

import argparse
import sys

from epp.envoy.bootstrap import EnvoySpec, bootstrap_json
from epp.framework.datalayer import parse_hostport


def _addrs(value: str) -> list[tuple[str, int]]:
    out = []
    for item in value.split(","):
        try:
            host, port = parse_hostport(item)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if port is None:
            raise argparse.ArgumentTypeError(f"{item!r}: expected ip:port")
        out.append((host, port))
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pool", type=_addrs, required=True, help="model servers, ip:port,...")
    p.add_argument("--picker", type=_addrs, default=[("127.0.0.1", 9002)], help="picker(s), ip:port,...")
    p.add_argument("--listen", type=_addrs, default=[("127.0.0.1", 8081)], help="listener ip:port")
    p.add_argument("--admin", type=_addrs, default=[("127.0.0.1", 9901)], help="admin ip:port")
    p.add_argument("--routing", choices=("override-host", "original-dst", "direct"), default="override-host")
    p.add_argument("--body-mode", choices=("FULL_DUPLEX_STREAMED", "BUFFERED"), default="FULL_DUPLEX_STREAMED")
    p.add_argument("--picker-tls", choices=("true", "false"), default="true")
    p.add_argument("--retries", type=int, default=2)
    p.add_argument("--access-log", action="store_true")


def run(args: argparse.Namespace) -> int:
    spec = EnvoySpec(
        pool=args.pool, pickers=args.picker, listen=args.listen[0], admin=args.admin[0],
        routing=args.routing, request_body_mode=args.body_mode, response_body_mode=args.body_mode,
        picker_tls=args.picker_tls == "true", retries=args.retries, access_log=args.access_log,
    )
    sys.stdout.write(bootstrap_json(spec) + "\n")
    return 0
