"""Print an Envoy bootstrap config (JSON) that puts the picker in front of a static pool.

Use it for plain-Envoy deployments (no Kubernetes) or as a starting point for your own.
"""

from __future__ import annotations

import argparse
import sys

from epp.envoy.bootstrap import EnvoySpec, bootstrap_json
from epp.envoy.jwt import JwtSpec
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
    p.add_argument("--response-processing", choices=("auto", "full", "none"), default="auto",
                   help="how the picker takes part in responses; must match epp serve --response-processing. "
                        "auto: request body BUFFERED, response body only when the picker asks for it (model "
                        "name restore, usage); none: never; full: FULL_DUPLEX_STREAMED both ways (GIE's setting)")
    p.add_argument("--body-mode", choices=("FULL_DUPLEX_STREAMED", "BUFFERED"), default=None,
                   help="force both body modes (default: from --response-processing)")
    p.add_argument("--picker-tls", choices=("true", "false"), default="true")
    p.add_argument("--retries", type=int, default=2)
    p.add_argument("--access-log", action="store_true")
    j = p.add_argument_group("verified tenants (JWT; pair with epp serve --tenant-claim)")
    j.add_argument("--jwt-issuer", help="require a JWT from this issuer on every route (Envoy answers 401 "
                                        "without a valid one) and forward its payload to the picker")
    j.add_argument("--jwt-audiences", default="", help="accepted audiences, comma-separated (default: any)")
    jwks = j.add_mutually_exclusive_group()
    jwks.add_argument("--jwt-jwks-file", help="JWKS file on Envoy's file system")
    jwks.add_argument("--jwt-jwks", help="inline JWKS (JSON text)")
    j.add_argument("--jwt-claim-header", action="append", default=[], metavar="CLAIM=HEADER",
                   help="also copy a claim into a request header (for epp serve --tenant-header); client "
                        "copies of the header are removed first. Repeatable")


def _jwt(args: argparse.Namespace) -> JwtSpec | None:
    if not args.jwt_issuer:
        if args.jwt_jwks_file or args.jwt_jwks or args.jwt_claim_header or args.jwt_audiences:
            raise ValueError("the --jwt-* options need --jwt-issuer")
        return None
    headers = {}
    for item in args.jwt_claim_header:
        claim, eq, header = item.partition("=")
        if not eq or not claim.strip() or not header.strip():
            raise ValueError(f"--jwt-claim-header {item!r}: expected CLAIM=HEADER")
        headers[claim.strip()] = header.strip()
    return JwtSpec(
        issuer=args.jwt_issuer, audiences=[a.strip() for a in args.jwt_audiences.split(",") if a.strip()],
        jwks_file=args.jwt_jwks_file, jwks_inline=args.jwt_jwks, claim_headers=headers,
    )


def run(args: argparse.Namespace) -> int:
    try:
        jwt = _jwt(args)
    except ValueError as exc:
        print(f"epp envoy-config: {exc}", file=sys.stderr)
        return 2
    spec = EnvoySpec(
        pool=args.pool, pickers=args.picker, listen=args.listen[0], admin=args.admin[0],
        routing=args.routing, request_body_mode=args.body_mode, response_body_mode=args.body_mode,
        response_processing=args.response_processing,
        picker_tls=args.picker_tls == "true", retries=args.retries, access_log=args.access_log, jwt=jwt,
    )
    sys.stdout.write(bootstrap_json(spec) + "\n")
    return 0
