"""Run the endpoint picker: an Envoy ext_proc gRPC server that picks a model-server endpoint
for every OpenAI-style request.

Flags, ports and defaults follow the Gateway API Inference Extension's picker so existing
charts and probes work unchanged (9002 ext_proc, 9003 gRPC health, 9090 metrics). The pool is
either static (``--endpoints`` or ``--pool-file``) or a Kubernetes InferencePool
(``--pool-name``) or pod selector (``--endpoint-selector``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from epp.config.loader import ConfigError
from epp.discovery.base import Discovery
from epp.framework.plugin import parse_duration
from epp.runner.logs import setup_logging
from epp.runner.placement import add_placement_arguments, placement_options
from epp.runner.server import PickerServer, ServeOptions
from epp.runner.tenants import add_tenant_arguments, tenant_options
from epp.runner.tracing import setup_tracing

if TYPE_CHECKING:
    from epp.discovery.leader import LeaderElector

log = logging.getLogger("epp.serve")


def _duration(value: str) -> float:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _bool(value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _size(value: str) -> int:
    units = {"ki": 1024, "mi": 1024**2, "gi": 1024**3, "k": 1000, "m": 1000**2, "g": 1000**3}
    v = value.strip().lower()
    for suffix, mult in units.items():
        if v.endswith(suffix) and v[: -len(suffix)].isdigit():
            return int(v[: -len(suffix)]) * mult
    if v.isdigit():
        return int(v)
    raise argparse.ArgumentTypeError(f"expected a byte size such as 10Mi or 1048576, got {value!r}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    pool = p.add_argument_group("pool (choose one)")
    pool.add_argument("--endpoints", help="static pool: comma-separated ip:port list")
    pool.add_argument("--pool-file", help="static pool: YAML file of endpoints (re-read when it changes)")
    pool.add_argument("--pool-name", default=os.environ.get("POOL_NAME", ""),
                      help="Kubernetes InferencePool to serve")
    pool.add_argument("--pool-namespace", default="",
                      help="namespace of the pool (default: $NAMESPACE, then 'default')")
    pool.add_argument("--pool-group", default="inference.networking.k8s.io",
                      help="API group of the InferencePool (inference.networking.x-k8s.io for v1alpha2)")
    pool.add_argument("--endpoint-selector", default="",
                      help="Kubernetes standalone mode: pod label selector k=v,... instead of a pool")
    pool.add_argument("--endpoint-target-ports", default="",
                      help="Kubernetes standalone mode: comma-separated target ports")
    srv = p.add_argument_group("serving")
    srv.add_argument("--grpc-port", type=int, default=9002, help="ext_proc gRPC port")
    srv.add_argument("--grpc-health-port", type=int, default=9003, help="gRPC health port")
    srv.add_argument("--metrics-port", type=int, default=9090, help="Prometheus port (-1 disables)")
    srv.add_argument("--bind-address", default="0.0.0.0", help="address the servers listen on")
    srv.add_argument("--secure-serving", type=_bool, nargs="?", const=True, default=True,
                     help="serve ext_proc over TLS (self-signed unless --cert-path)")
    srv.add_argument("--cert-path", help="directory with tls.crt and tls.key")
    srv.add_argument("--health-checking", type=_bool, nargs="?", const=True, default=False,
                     help="accepted for GIE compatibility: health is always served on both ports")
    srv.add_argument("--max-request-body-bytes", type=_size, default=10 * 1024 * 1024,
                     help="larger request bodies are refused with HTTP 413 and a JSON error body "
                          "(bytes, or a size such as 10Mi)")
    srv.add_argument("--response-processing", choices=("auto", "full", "none"), default="auto",
                     help="which response bodies pass through the picker when Envoy sends none unless asked "
                          "(epp envoy-config's default): auto = only when needed (a rewritten model name to "
                          "restore, usage of a JSON answer or of a stream that asked for it); full = every "
                          "response; none = never (no usage, no model-name restore). With Envoy sending every "
                          "body (FULL_DUPLEX_STREAMED, GIE's gateways) every body is processed whatever this says")
    srv.add_argument("--workers", type=int, default=1,
                     help="picker processes serving the same ports (SO_REUSEPORT), so one pod uses all of "
                          "its cores; /metrics merges theirs with a worker label (docs/cost.md). Not with "
                          "--ha-enable-leader-election or --model-placement manage")
    srv.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    srv.add_argument("--shutdown-grace", type=_duration, default=120.0,
                     help="on SIGTERM: readiness turns NOT_SERVING but new and running streams are "
                          "answered until none is open and none started for 2s, or for at most this "
                          "long (Go duration); then queued requests get 503 and the picker exits. A "
                          "second SIGTERM/SIGINT stops at once. Keep terminationGracePeriodSeconds >= "
                          "preStop sleep + this + 10s")
    srv.add_argument("--disable-endpoint-subset-filter", type=_bool, nargs="?", const=True, default=False,
                     help="ignore the gateway's subset hint")
    ha = p.add_argument_group("high availability (Kubernetes)")
    ha.add_argument("--ha-enable-leader-election", type=_bool, nargs="?", const=True, default=False,
                    help="active-passive HA: campaign for the pool's Lease; only the leader reports ready")
    ha.add_argument("--leader-election-lease-duration", type=_duration, default=15.0,
                    help="how long a standby waits before taking over a lease that is not renewed")
    ha.add_argument("--leader-election-renew-deadline", type=_duration, default=10.0,
                    help="the leader steps down (not ready) if it cannot renew for this long")
    ha.add_argument("--leader-election-retry-period", type=_duration, default=2.0,
                    help="interval between acquire/renew attempts")
    fc = p.add_argument_group("flow control and scale from zero")
    fc.add_argument("--empty-pool-wait", type=_duration, default=120.0,
                    help="hold requests this long while the pool has no ready endpoint (scale from zero), "
                         "then 503; 0 fails them at once (Go duration)")
    fc.add_argument("--keda-scaler-port", type=int, default=-1,
                    help="serve the KEDA external scaler gRPC API on this port (manifests use 9004); "
                         "off unless given")
    obs = p.add_argument_group("observability and testing")
    obs.add_argument("--metrics-endpoint-auth", type=_bool, nargs="?", const=True, default=None,
                     help="/metrics callers need a bearer token that passes a Kubernetes TokenReview and a "
                          "SubjectAccessReview for get on /metrics (default: on with --pool-name or "
                          "--endpoint-selector, off with a static pool)")
    obs.add_argument("--tracing", type=_bool, nargs="?", const=True, default=True,
                     help="OpenTelemetry tracing when the OTEL_* environment asks for it (OTEL_TRACES_EXPORTER, "
                          "OTEL_EXPORTER_OTLP_ENDPOINT, ...; docs/observability.md); false ignores it")
    obs.add_argument("--enable-conformance-hooks", type=_bool, nargs="?", const=True, default=False,
                     help="GIE conformance tests only: route to the endpoints of the test-epp-endpoint-selection "
                          "header and report x-conformance-test-served-endpoint (never in production)")
    add_placement_arguments(p)
    add_tenant_arguments(p)
    cfg = p.add_argument_group("configuration")
    cfg.add_argument("--config-file", help="EndpointPickerConfig YAML file")
    cfg.add_argument("--config-text", help="EndpointPickerConfig YAML text")
    data = p.add_argument_group("data layer")
    data.add_argument("--refresh-metrics-interval", type=_duration, default=0.05,
                      help="model-server metric scrape interval (Go duration)")
    data.add_argument("--refresh-prometheus-metrics-interval", type=_duration, default=5.0,
                      help="pool gauge refresh interval")
    data.add_argument("--metrics-staleness-threshold", type=_duration, default=2.0,
                      help="metrics older than this are stale")
    log_g = p.add_argument_group("logging")
    log_g.add_argument("-v", "--v", dest="verbosity", type=int, nargs="?", const=1, default=0,
                       help="verbosity (0 info, 1+ debug)")
    log_g.add_argument("--log-format", choices=("json", "text"), default="json")
    log_g.add_argument("--zap-encoder", choices=("json", "console"), help="GIE alias of --log-format")


def build_discovery(args: argparse.Namespace) -> Discovery:
    chosen = [n for n in ("endpoints", "pool_file", "pool_name", "endpoint_selector") if getattr(args, n)]
    if args.endpoint_target_ports and not args.endpoint_selector:
        raise ConfigError("--endpoint-target-ports needs --endpoint-selector")
    if len(chosen) != 1:
        flags = ", ".join("--" + n.replace("_", "-") for n in chosen) or "none"
        raise ConfigError(
            "exactly one of --endpoints, --pool-file, --pool-name, --endpoint-selector is required "
            f"(given: {flags})"
        )
    from epp.discovery.pool_file import PoolFileError
    from epp.discovery.static import StaticDiscovery

    try:
        if args.endpoints:
            return StaticDiscovery.from_endpoints_flag(args.endpoints)
        if args.pool_file:
            return StaticDiscovery.from_pool_file(args.pool_file)
    except PoolFileError as exc:
        raise ConfigError(str(exc)) from None
    from epp.discovery.kubernetes import KubernetesDiscovery, parse_endpoint_selector, parse_target_ports

    try:
        return KubernetesDiscovery(
            pool_name=args.pool_name or None,
            pool_namespace=args.pool_namespace or None,
            pool_group=args.pool_group,
            endpoint_selector=parse_endpoint_selector(args.endpoint_selector) if args.endpoint_selector else None,
            target_ports=parse_target_ports(args.endpoint_target_ports) if args.endpoint_target_ports else None,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def build_leader_election(args: argparse.Namespace, discovery: Discovery) -> LeaderElector | None:
    """The pool's Lease elector for ``--ha-enable-leader-election`` (Kubernetes pools only)."""
    if not getattr(args, "ha_enable_leader_election", False):
        return None
    from epp.discovery.kubernetes import KubernetesDiscovery
    from epp.discovery.leader import LeaderElector, lease_name

    if not isinstance(discovery, KubernetesDiscovery):
        raise ConfigError("--ha-enable-leader-election needs a Kubernetes pool "
                          "(--pool-name or --endpoint-selector)")
    try:
        return LeaderElector(
            namespace=discovery.namespace,
            name=lease_name(discovery.namespace, discovery.pool_name),
            lease_duration=args.leader_election_lease_duration,
            renew_deadline=args.leader_election_renew_deadline,
            retry_period=args.leader_election_retry_period,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def options_from_args(args: argparse.Namespace) -> ServeOptions:
    if args.config_file and args.config_text:
        raise ConfigError("--config-file and --config-text are mutually exclusive")
    config_text = args.config_text
    if args.config_file:
        try:
            config_text = Path(args.config_file).read_text()
        except OSError as exc:
            raise ConfigError(f"--config-file {args.config_file}: {exc.strerror}") from None
    discovery = build_discovery(args)
    metrics_auth = args.metrics_endpoint_auth
    if metrics_auth is None:  # GIE's default (on) in Kubernetes; a static pool has no API server
        metrics_auth = bool(args.pool_name or args.endpoint_selector)
    return ServeOptions(
        discovery=discovery,
        leader_election=build_leader_election(args, discovery),
        grpc_port=args.grpc_port,
        grpc_health_port=args.grpc_health_port,
        metrics_port=args.metrics_port,
        bind_address=args.bind_address,
        secure_serving=args.secure_serving,
        cert_path=args.cert_path,
        config_text=config_text,
        refresh_metrics_interval=args.refresh_metrics_interval,
        refresh_prometheus_metrics_interval=args.refresh_prometheus_metrics_interval,
        metrics_staleness_threshold=args.metrics_staleness_threshold,
        disable_endpoint_subset_filter=args.disable_endpoint_subset_filter,
        max_request_body_bytes=args.max_request_body_bytes,
        response_processing=args.response_processing,
        empty_pool_wait=args.empty_pool_wait,
        keda_scaler_port=args.keda_scaler_port,
        metrics_endpoint_auth=metrics_auth,
        conformance_hooks=args.enable_conformance_hooks,
        tracer_provider=setup_tracing(os.environ, args.tracing),
        shutdown_grace=args.shutdown_grace,
        **placement_options(args),
        **tenant_options(args),
    )


async def serve(options: ServeOptions) -> None:
    """Start, serve until SIGTERM/SIGINT, drain, stop. A signal is honoured in every state:
    while starting (e.g. waiting for an InferencePool that does not exist, or that RBAC hides)
    the start is abandoned at once; while draining, a second signal ends the drain."""
    server = PickerServer(options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():
            log.info("second signal: stopping without waiting for open streams")
            server.cut_drain()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    starting = asyncio.ensure_future(server.start())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((starting, stopping), return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            log.info("signal received before the picker was ready: abandoning the start")
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            return
        starting.result()  # start-up errors propagate (exit 1/2 with a message)
        await stopping
        log.info("shutting down")
        await server.drain()
    finally:
        stopping.cancel()
        if not starting.done():
            starting.cancel()
        await server.stop()


def run_async(coro: object) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)  # type: ignore[arg-type]
    else:
        uvloop.run(coro)  # type: ignore[arg-type]


def _supervise(args: argparse.Namespace) -> int:
    """``--workers N``: the supervisor (epp.runner.workers) starts N workers with these flags."""
    from epp.runner.workers import supervise

    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    if getattr(args, "ha_enable_leader_election", False):
        raise ConfigError("--workers > 1 cannot be combined with --ha-enable-leader-election")
    if getattr(args, "model_placement", "off") == "manage":
        raise ConfigError("--workers > 1 cannot be combined with --model-placement manage")
    build_discovery(args)  # flag errors now, once, not in every worker
    auth = args.metrics_endpoint_auth
    if auth is None:
        auth = bool(args.pool_name or args.endpoint_selector)
    return supervise(sys.argv[1:], args.workers, metrics_port=args.metrics_port,
                     bind_address=args.bind_address, metrics_auth=auth)


def _as_worker(options: ServeOptions, index: int) -> None:
    """A worker of ``--workers``: shared ports, metrics for the supervisor only, one KEDA port."""
    options.reuse_port = True
    options.metrics_port = 0
    options.metrics_bind_address = "127.0.0.1"
    options.metrics_endpoint_auth = False
    if index > 0:
        options.keda_scaler_port = -1


def run(args: argparse.Namespace) -> int:
    fmt = "text" if args.zap_encoder == "console" else ("json" if args.zap_encoder else args.log_format)
    setup_logging(args.verbosity or 0, fmt)
    try:
        if args.workers != 1 and args.worker_index is None:
            return _supervise(args)
        options = options_from_args(args)
        if args.worker_index is not None:
            _as_worker(options, args.worker_index)
        run_async(serve(options))
    except ConfigError as exc:
        print(f"epp serve: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"epp serve: {exc}", file=sys.stderr)
        return 1
    return 0
