"""Envoy bootstrap configs for a picker in front of a pool (plain Envoy, no Kubernetes).

Built from typed Envoy API messages (``envoy-data-plane``) so a misspelt field fails here,
not inside Envoy; this runs once per config, never on the request path. The shapes are the
ones validated against a real Envoy 1.40 (see envoy_extproc.md in the reference notes):

* ``override-host`` (recommended): a STATIC pool cluster with the ``override_host`` load
  balancing policy reading the picker's ``envoy.lb`` metadata (not the header: a client could
  set that one whenever the picker is bypassed); ``selected_host_key`` reports the served
  endpoint back to the picker. Requires ``receiving_namespaces: [envoy.lb]``. Retries (route
  ``retry_policy``, connect failure / reset) never go back to a host already tried
  (``previous_hosts``): attempt n takes the n-th entry of a fallback list
  (``maxNumOfEndpoints`` > 1), and once the list is used up (a single pick: at once) the
  round-robin fallback policy picks another pod. So a request picked for a pod that just died
  is rescued by its first retry, whatever ``maxNumOfEndpoints`` is (docs/faults.md).
* ``original-dst``: an ORIGINAL_DST cluster keyed by the ``x-gateway-destination-endpoint``
  header (GIE's reference config). One endpoint only; no allow-list.
* ``direct``: no picker, round robin over the pool (what a Kubernetes Service gives).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal

import orjson
from envoy_data_plane.envoy.config.accesslog import v3 as accesslog
from envoy_data_plane.envoy.config.bootstrap import v3 as bootstrap
from envoy_data_plane.envoy.config.cluster import v3 as cluster
from envoy_data_plane.envoy.config.core import v3 as core
from envoy_data_plane.envoy.config.endpoint import v3 as endpoint
from envoy_data_plane.envoy.config.listener import v3 as listener
from envoy_data_plane.envoy.config.route import v3 as route
from envoy_data_plane.envoy.extensions.access_loggers.stream import v3 as stream_log
from envoy_data_plane.envoy.extensions.filters.http.ext_proc import v3 as ext_proc
from envoy_data_plane.envoy.extensions.filters.http.router import v3 as router
from envoy_data_plane.envoy.extensions.filters.http.set_metadata import v3 as set_metadata
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager import v3 as hcm
from envoy_data_plane.envoy.extensions.load_balancing_policies.override_host import v3 as override_host
from envoy_data_plane.envoy.extensions.load_balancing_policies.round_robin import v3 as round_robin
from envoy_data_plane.envoy.extensions.retry.host.previous_hosts import v3 as previous_hosts
from envoy_data_plane.envoy.extensions.transport_sockets.tls import v3 as tls
from envoy_data_plane.envoy.extensions.upstreams.http import v3 as upstream_http
from envoy_data_plane.envoy.type.metadata import v3 as md
from envoy_data_plane.google.protobuf import Any as PbAny
from envoy_data_plane.google.protobuf import ListValue, Struct, Value

from epp.envoy.jwt import JWT_NAMESPACE, JwtSpec, jwt_filters

Routing = Literal["override-host", "original-dst", "direct"]
BodyMode = Literal["FULL_DUPLEX_STREAMED", "BUFFERED", "NONE"]
#: how the picker takes part in responses; must match ``epp serve --response-processing``
#: (``response_body_modes`` below, docs/envoy.md)
ResponseProcessing = Literal["auto", "full", "none"]

DESTINATION_HEADER = "x-gateway-destination-endpoint"
SERVED_KEY = "x-gateway-destination-endpoint-served"
LB_NAMESPACE = "envoy.lb"
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"
EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
ACCESS_LOG_FORMAT = (
    "ACCESS %REQ(:METHOD)% %REQ(:PATH)% %RESPONSE_CODE% flags=%RESPONSE_FLAGS% "
    "upstream=%UPSTREAM_HOST% dur=%DURATION%ms details=%RESPONSE_CODE_DETAILS%\n"
)


@dataclass(slots=True)
class EnvoySpec:
    """What to generate. Addresses are ``(host, port)``."""

    pool: list[tuple[str, int]]
    pickers: list[tuple[str, int]] = field(default_factory=lambda: [("127.0.0.1", 9002)])
    listen: tuple[str, int] = ("127.0.0.1", 8081)
    admin: tuple[str, int] | None = ("127.0.0.1", 9901)
    routing: Routing = "override-host"
    #: ``auto`` (default): the request body BUFFERED, the response body NONE with
    #: ``allow_mode_override``: the picker sees every response's headers and end (in-flight
    #: release, served endpoint) and asks for the body of a response only when it needs it
    #: (a model name to restore, ``usage`` to read); ``none``: never the body; ``full``: every
    #: response body through the picker, FULL_DUPLEX_STREAMED both ways (GIE's setting)
    response_processing: ResponseProcessing = "auto"
    #: explicit body modes (tests, other gateways' settings); None = from ``response_processing``
    request_body_mode: BodyMode | None = None
    response_body_mode: BodyMode | None = None
    #: the largest request body Envoy buffers for the picker when the request body is
    #: BUFFERED (listener ``per_connection_buffer_limit_bytes``; larger bodies get Envoy's 413).
    #: Above the picker's ``--max-request-body-bytes`` (10 MiB) so that its JSON 413 answers
    #: bodies just over its own limit.
    request_buffer_bytes: int = 11 * 1024 * 1024
    #: HTTP/2 streams Envoy puts on one connection to a picker before opening another: with
    #: ``epp serve --workers N`` the kernel spreads connections (not streams) over the
    #: workers, so a busy Envoy must open several
    picker_streams_per_connection: int = 8
    picker_tls: bool = True
    retries: int = 2
    report_served_endpoint: bool = True
    failure_mode_allow: bool = False
    access_log: bool = False
    route_timeout_s: float = 300.0
    #: plain Envoy proxying to a "do-nothing" ext_proc (benchmarks): same cluster as direct
    ext_proc_on_direct: bool = False
    #: a static subset hint (``envoy.lb.subset_hint``) set on every request before ext_proc,
    #: the way a gateway restricts the picker to some endpoints (tests, canaries)
    subset_hint: list[str] | None = None
    #: verify a JWT on every route before ext_proc (401 without one) and forward its payload
    #: to the picker as dynamic metadata (``epp serve --tenant-claim``); see epp/envoy/jwt.py
    jwt: JwtSpec | None = None


def _addr(host: str, port: int) -> core.Address:
    return core.Address(socket_address=core.SocketAddress(address=host, port_value=port))


def _lb_endpoints(name: str, addrs: list[tuple[str, int]]) -> endpoint.ClusterLoadAssignment:
    return endpoint.ClusterLoadAssignment(
        cluster_name=name,
        endpoints=[
            endpoint.LocalityLbEndpoints(
                lb_endpoints=[endpoint.LbEndpoint(endpoint=endpoint.Endpoint(address=_addr(h, p))) for h, p in addrs]
            )
        ],
    )


def _breakers() -> cluster.CircuitBreakers:
    big = 100_000
    return cluster.CircuitBreakers(
        thresholds=[
            cluster.CircuitBreakersThresholds(
                max_connections=big, max_pending_requests=big, max_requests=big, max_retries=big
            )
        ]
    )


def _mdkey(key: str) -> md.MetadataKey:
    return md.MetadataKey(key=LB_NAMESPACE, path=[md.MetadataKeyPathSegment(key=key)])


def _pool_cluster(spec: EnvoySpec) -> cluster.Cluster:
    timeout = timedelta(seconds=1)
    if spec.routing == "original-dst":
        return cluster.Cluster(
            name="pool",
            type=cluster.ClusterDiscoveryType.ORIGINAL_DST,
            lb_policy=cluster.ClusterLbPolicy.CLUSTER_PROVIDED,
            connect_timeout=timeout,
            circuit_breakers=_breakers(),
            original_dst_lb_config=cluster.ClusterOriginalDstLbConfig(
                use_http_header=True, http_header_name=DESTINATION_HEADER
            ),
        )
    base = cluster.Cluster(
        name="pool",
        type=cluster.ClusterDiscoveryType.STATIC,
        connect_timeout=timeout,
        circuit_breakers=_breakers(),
        load_assignment=_lb_endpoints("pool", spec.pool),
    )
    if spec.routing == "direct":
        base.lb_policy = cluster.ClusterLbPolicy.ROUND_ROBIN
        return base
    rr = core.TypedExtensionConfig(
        name="envoy.load_balancing_policies.round_robin", typed_config=PbAny.pack(round_robin.RoundRobin())
    )
    policy = override_host.OverrideHost(
        # metadata only: with the header as a second source a retry re-reads the same pick
        # from it and goes back to the dead pod (measured: 2 attempts wasted per rescue)
        override_host_sources=[override_host.OverrideHostOverrideHostSource(metadata=_mdkey(DESTINATION_HEADER))],
        fallback_policy=cluster.LoadBalancingPolicy(policies=[cluster.LoadBalancingPolicyPolicy(typed_extension_config=rr)]),
    )
    if spec.report_served_endpoint:
        policy.selected_host_key = _mdkey(SERVED_KEY)
    base.load_balancing_policy = cluster.LoadBalancingPolicy(
        policies=[
            cluster.LoadBalancingPolicyPolicy(
                typed_extension_config=core.TypedExtensionConfig(
                    name="envoy.load_balancing_policies.override_host", typed_config=PbAny.pack(policy)
                )
            )
        ]
    )
    return base


def _picker_cluster(spec: EnvoySpec) -> cluster.Cluster:
    h2 = upstream_http.HttpProtocolOptions(
        explicit_http_config=upstream_http.HttpProtocolOptionsExplicitHttpConfig(
            http2_protocol_options=core.Http2ProtocolOptions(max_concurrent_streams=spec.picker_streams_per_connection)
        )
    )
    c = cluster.Cluster(
        name="ext_proc",
        type=cluster.ClusterDiscoveryType.STATIC,
        connect_timeout=timedelta(seconds=1),
        lb_policy=(
            cluster.ClusterLbPolicy.LEAST_REQUEST if len(spec.pickers) > 1 else cluster.ClusterLbPolicy.ROUND_ROBIN
        ),
        circuit_breakers=_breakers(),
        typed_extension_protocol_options={
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": PbAny.pack(h2)
        },
        load_assignment=_lb_endpoints("ext_proc", spec.pickers),
    )
    if len(spec.pickers) > 1:
        # Several pickers: stop opening streams to one that reports NOT_SERVING (it is
        # draining after SIGTERM, or not synced / not leader) while it still answers them, so a
        # rolling restart loses nothing. The ext_proc port serves gRPC health too.
        c.health_checks = [core.HealthCheck(
            timeout=timedelta(seconds=1), interval=timedelta(seconds=1),
            no_traffic_interval=timedelta(seconds=1), unhealthy_threshold=1, healthy_threshold=1,
            grpc_health_check=core.HealthCheckGrpcHealthCheck(service_name=EXT_PROC_SERVICE),
        )]
    if spec.picker_tls:
        # The picker's certificate is self-signed (as GIE's): encrypt, do not verify.
        ctx = tls.UpstreamTlsContext(common_tls_context=tls.CommonTlsContext(alpn_protocols=["h2"]))
        c.transport_socket = core.TransportSocket(name="envoy.transport_sockets.tls", typed_config=PbAny.pack(ctx))
    return c


def body_modes(spec: EnvoySpec) -> tuple[BodyMode, BodyMode]:
    """(request, response) body modes of the ext_proc filter.

    ``auto`` / ``none`` buffer the request body because Envoy 1.40 ignores ``mode_override``
    whenever a body mode is FULL_DUPLEX_STREAMED (verified in tests/integration/
    test_response_processing.py): with a FULL_DUPLEX request the picker could never switch a
    response's body on or off. BUFFERED also sends the prompt once (one message, no echo).
    """
    full = spec.response_processing == "full"
    req: BodyMode = spec.request_body_mode or ("FULL_DUPLEX_STREAMED" if full else "BUFFERED")
    resp: BodyMode = spec.response_body_mode or ("FULL_DUPLEX_STREAMED" if full else "NONE")
    return req, resp


def _ext_proc_filter(spec: EnvoySpec) -> hcm.HttpFilter:
    mode = ext_proc.ProcessingModeBodySendMode
    header = ext_proc.ProcessingModeHeaderSendMode
    req_mode, resp_mode = body_modes(spec)
    pm = ext_proc.ProcessingMode(
        request_header_mode=header.SEND,
        response_header_mode=header.SEND,
        request_body_mode=getattr(mode, req_mode),
        response_body_mode=getattr(mode, resp_mode),
        # a response ended by trailers: the picker sees its end without the body
        response_trailer_mode=header.SEND,
    )
    if "FULL_DUPLEX_STREAMED" in (req_mode, resp_mode):
        # Envoy rejects FULL_DUPLEX without trailers sent.
        pm.request_trailer_mode = header.SEND
    # The picker may ask for one response's body (mode_override on its response_headers
    # answer); Envoy honours that only outside FULL_DUPLEX_STREAMED.
    override = spec.response_processing == "auto" and "FULL_DUPLEX_STREAMED" not in (req_mode, resp_mode)
    # A BUFFERED request body is answered after admission, which may queue it (flow control,
    # an empty pool held for scale-from-zero): the per-message timeout must not cut that.
    # FULL_DUPLEX ignores message_timeout.
    timeout = timedelta(seconds=spec.route_timeout_s) if req_mode != "FULL_DUPLEX_STREAMED" else timedelta(seconds=2)
    cfg = ext_proc.ExternalProcessor(
        grpc_service=core.GrpcService(
            envoy_grpc=core.GrpcServiceEnvoyGrpc(cluster_name="ext_proc"), timeout=timedelta(seconds=10)
        ),
        failure_mode_allow=spec.failure_mode_allow,
        message_timeout=timeout,
        max_message_timeout=timeout,
        allow_mode_override=override,
        processing_mode=pm,
        metadata_options=ext_proc.MetadataOptions(
            receiving_namespaces=ext_proc.MetadataOptionsMetadataNamespaces(untyped=[LB_NAMESPACE]),
            forwarding_namespaces=ext_proc.MetadataOptionsMetadataNamespaces(
                untyped=[LB_NAMESPACE, SUBSET_NAMESPACE, *([JWT_NAMESPACE] if spec.jwt is not None else [])]
            ),
        ),
    )
    return hcm.HttpFilter(name="envoy.filters.http.ext_proc", typed_config=PbAny.pack(cfg))


def build_bootstrap(spec: EnvoySpec) -> bootstrap.Bootstrap:
    action = route.RouteAction(cluster="pool", timeout=timedelta(seconds=spec.route_timeout_s))
    if spec.routing == "override-host" and spec.retries > 0:
        # Walk the picker's fallback list on connection failures, then other pods; never a
        # host this request already failed on.
        action.retry_policy = route.RetryPolicy(
            retry_on="connect-failure,reset",
            num_retries=spec.retries,
            retry_host_predicate=[route.RetryPolicyRetryHostPredicate(
                name="envoy.retry_host_predicates.previous_hosts",
                typed_config=PbAny.pack(previous_hosts.PreviousHostsPredicate()),
            )],
            host_selection_retry_max_attempts=5,
        )
    vhost = route.VirtualHost(
        name="all", domains=["*"], routes=[route.Route(match=route.RouteMatch(prefix="/"), route=action)]
    )
    filters: list[hcm.HttpFilter] = []
    if spec.subset_hint is not None:
        hint = Struct(
            fields={SUBSET_KEY: Value(list_value=ListValue(values=[Value(string_value=h) for h in spec.subset_hint]))}
        )
        filters.append(
            hcm.HttpFilter(
                name="envoy.filters.http.set_metadata",
                typed_config=PbAny.pack(
                    set_metadata.Config(
                        metadata=[set_metadata.Metadata(metadata_namespace=SUBSET_NAMESPACE, value=hint)]
                    )
                ),
            )
        )
    if spec.jwt is not None:
        filters.extend(jwt_filters(spec.jwt))
    if spec.routing != "direct" or spec.ext_proc_on_direct:
        filters.append(_ext_proc_filter(spec))
    filters.append(
        hcm.HttpFilter(
            name="envoy.filters.http.router", typed_config=PbAny.pack(router.Router(suppress_envoy_headers=True))
        )
    )
    manager = hcm.HttpConnectionManager(
        stat_prefix="ingress",
        codec_type=hcm.HttpConnectionManagerCodecType.AUTO,
        route_config=route.RouteConfiguration(name="local", virtual_hosts=[vhost]),
        http_filters=filters,
        # HTTP/1.0 clients (old tools, some load balancers' probes) are answered, not refused
        # with 426; one without a Host header is routed as if it had sent this one.
        http_protocol_options=core.Http1ProtocolOptions(accept_http_10=True, default_host_for_http_10="epp"),
    )
    if spec.access_log:
        fmt = core.SubstitutionFormatString(text_format_source=core.DataSource(inline_string=ACCESS_LOG_FORMAT))
        manager.access_log = [
            accesslog.AccessLog(
                name="envoy.access_loggers.stdout", typed_config=PbAny.pack(stream_log.StdoutAccessLog(log_format=fmt))
            )
        ]
    network_filter = listener.Filter(
        name="envoy.filters.network.http_connection_manager", typed_config=PbAny.pack(manager)
    )
    lst = listener.Listener(
        name="main", address=_addr(*spec.listen), filter_chains=[listener.FilterChain(filters=[network_filter])]
    )
    if (spec.routing != "direct" or spec.ext_proc_on_direct) and body_modes(spec)[0] == "BUFFERED":
        lst.per_connection_buffer_limit_bytes = spec.request_buffer_bytes
    clusters = [_pool_cluster(spec)]
    if spec.routing != "direct" or spec.ext_proc_on_direct:
        clusters.append(_picker_cluster(spec))
    boot = bootstrap.Bootstrap(
        static_resources=bootstrap.BootstrapStaticResources(listeners=[lst], clusters=clusters)
    )
    if spec.admin is not None:
        boot.admin = bootstrap.Admin(address=_addr(*spec.admin))
    return boot


def bootstrap_dict(spec: EnvoySpec) -> dict[str, Any]:
    """The config as a JSON-ready dict (proto3 JSON names; Envoy reads it with ``-c x.json``)."""
    return build_bootstrap(spec).to_dict()


def bootstrap_json(spec: EnvoySpec) -> str:
    return orjson.dumps(bootstrap_dict(spec), option=orjson.OPT_INDENT_2).decode()
