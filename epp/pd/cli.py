"""``epp pd-sidecar``: the decode-side P/D sidecar. Runs next to vLLM on each decode pod,
listens on --port (the pod's serving port) and proxies to the local engine on --vllm-port;
requests carrying x-prefiller-host-port get a prefill leg on that pod first (NIXL v2 by
default). See docs/pd.md."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys

from epp.pd.allowlist import PrefillAllowlist
from epp.pd.proxy import CONNECTORS, SidecarConfig, serve

log = logging.getLogger("epp.pd")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int, default=8000, help="port to listen on (the pod's serving port)")
    p.add_argument("--bind-address", default="0.0.0.0", help="address to listen on")
    p.add_argument("--vllm-port", "--decoder-port", dest="vllm_port", type=int, default=8001,
                   help="port of the local vLLM engine")
    p.add_argument("--vllm-host", "--decoder-host", dest="vllm_host", default="127.0.0.1",
                   help="address of the local vLLM engine")
    p.add_argument("--kv-connector", "--connector", dest="connector", choices=CONNECTORS, default="nixlv2",
                   help="P/D protocol: nixlv2 (vLLM NixlConnector), lmcache, sglang")
    p.add_argument("--prefill-timeout", type=float, default=60.0,
                   help="seconds to wait for the prefill leg before decoding locally")
    p.add_argument("--connect-timeout", type=float, default=10.0, help="TCP connect timeout (seconds)")
    p.add_argument("--enable-prefiller-sampling", action="store_true",
                   help="when the header lists several prefillers pick one at random (default: the first)")
    p.add_argument("--prefiller-use-tls", action="store_true", help="call prefillers over https")
    p.add_argument("--allow-prefill", action="append", default=[], metavar="ENTRY",
                   help="SSRF allowlist: ip:port, ip or CIDR (repeatable, comma-separated); "
                        "with neither this nor --allow-pool-file every prefill target is allowed")
    p.add_argument("--allow-pool-file", metavar="PATH",
                   help="SSRF allowlist: every endpoint (ip:port) of this pool file (the picker's "
                        "--pool-file format), re-read when it changes")
    p.add_argument("--pool-file-poll-interval", type=float, default=1.0, help="seconds between pool file checks")
    p.add_argument("--sglang-bootstrap-port", type=int,
                   default=int(os.environ.get("SGLANG_BOOTSTRAP_PORT", "8998")),
                   help="sglang connector: the prefill servers' bootstrap port (env SGLANG_BOOTSTRAP_PORT)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def config_from_args(args: argparse.Namespace) -> SidecarConfig:
    allow = PrefillAllowlist.build(args.allow_prefill, args.allow_pool_file)
    return SidecarConfig(
        decoder_url=f"http://{args.vllm_host}:{args.vllm_port}",
        connector=args.connector,
        prefill_timeout=args.prefill_timeout,
        connect_timeout=args.connect_timeout,
        prefiller_sampling=args.enable_prefiller_sampling,
        prefiller_scheme="https" if args.prefiller_use_tls else "http",
        sglang_bootstrap_port=args.sglang_bootstrap_port,
        allowlist=allow,
        pool_poll_interval=args.pool_file_poll_interval,
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"epp pd-sidecar: {exc}", file=sys.stderr)
        return 2
    if not config.allowlist.enabled:
        log.warning("no prefill allowlist (--allow-prefill / --allow-pool-file): any host named in "
                    "x-prefiller-host-port will be called")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        ready = asyncio.Event()
        log.info("pd-sidecar listening on %s:%d → %s (connector %s)", args.bind_address, args.port,
                 config.decoder_url, config.connector)
        await serve(config, args.bind_address, args.port, ready)

    with contextlib.suppress(asyncio.CancelledError, KeyboardInterrupt):
        asyncio.run(main())
    return 0
