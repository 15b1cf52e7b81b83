"""Turning OpenTelemetry tracing on from the standard ``OTEL_*`` environment.

Opt-in: tracing is on when the environment asks for an exporter — ``OTEL_TRACES_EXPORTER``
set to anything but ``none``, or an OTLP endpoint (``OTEL_EXPORTER_OTLP_ENDPOINT`` /
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, then the exporter is ``otlp``) — unless
``OTEL_SDK_DISABLED=true`` or ``--tracing=false``. Everything else is the SDK's own reading of
the environment: ``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES`` (service name ``epp``
when neither names one), ``OTEL_TRACES_SAMPLER`` / ``_ARG`` (default
``parentbased_always_on``: the gateway's sampling decision wins), ``OTEL_PROPAGATORS``
(default W3C ``tracecontext,baggage``), the exporter's ``OTEL_EXPORTER_OTLP_*`` settings and
the batch processor's ``OTEL_BSP_*``.

Exporters are found by name through the SDK's ``opentelemetry_traces_exporter`` entry points
(``console``, ``otlp_proto_grpc``, ``otlp_proto_http``, ...); ``otlp`` means gRPC unless
``OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL`` says ``http/protobuf``. The packages come with the
``tracing`` extra (``pip install 'epp[tracing]'``); asking for tracing without them is a start-up
error that says so, never a silent no-op.

Nothing here imports opentelemetry unless tracing is on.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from importlib import metadata
from typing import Any

from epp.config.loader import ConfigError

log = logging.getLogger(__name__)

_EXPORTER_GROUP = "opentelemetry_traces_exporter"


def tracing_requested(env: Mapping[str, str], flag: bool = True) -> bool:
    """Whether ``env`` (and ``--tracing``) turn tracing on; see the module docstring."""
    if not flag or env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters:
        return any(e.strip() not in ("", "none") for e in exporters.split(","))
    return bool(env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def _exporter_names(env: Mapping[str, str]) -> list[str]:
    raw = env.get("OTEL_TRACES_EXPORTER", "").strip().lower() or "otlp"
    names = []
    for name in (n.strip() for n in raw.split(",")):
        if not name or name == "none":
            continue
        if name == "otlp":
            protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                        or "grpc").strip().lower()
            if protocol == "grpc":
                name = "otlp_proto_grpc"
            elif protocol == "http/protobuf":
                name = "otlp_proto_http"
            else:
                raise ConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: supported are grpc and http/protobuf")
        names.append(name)
    return names


def _exporter(name: str) -> Any:
    found = metadata.entry_points(group=_EXPORTER_GROUP, name=name)
    if not found:
        available = sorted({e.name for e in metadata.entry_points(group=_EXPORTER_GROUP)}) or ["none installed"]
        hint = (" (install the OTLP exporter: pip install 'epp[tracing]')" if name.startswith("otlp")
                else "")
        raise ConfigError(f"OTEL_TRACES_EXPORTER: no trace exporter named {name!r}{hint}; "
                          f"available: {', '.join(available)}")
    try:
        factory = next(iter(found)).load()
    except ImportError as exc:
        raise ConfigError(f"OTEL_TRACES_EXPORTER: the {name!r} exporter cannot be imported: {exc}"
                          f"{_shadowed_proto_hint()}") from None
    return factory()


def _shadowed_proto_hint() -> str:
    """Why an installed OTLP exporter fails to import, when it is the known clash: xds-protos
    (Envoy's ext_proc types) ships a 2019 copy of ``opentelemetry/proto/*`` at the same paths as
    ``opentelemetry-proto``, and whichever pip installed last owns the files."""
    try:
        from opentelemetry.proto.common.v1 import common_pb2
    except ImportError:
        return ""
    if hasattr(common_pb2, "InstrumentationScope"):
        return ""
    try:
        version = metadata.version("opentelemetry-proto")
    except metadata.PackageNotFoundError:
        version = "<version>"
    return ("; opentelemetry/proto/ holds xds-protos' old copy, not opentelemetry-proto's: repair the "
            f"environment with: pip install --no-deps --force-reinstall 'opentelemetry-proto=={version}'")


def build_tracer_provider(env: Mapping[str, str]) -> Any:
    """An SDK ``TracerProvider`` exporting as ``env`` says (batching, so exporting never runs
    on the request path). Raises ``ConfigError`` naming the variable that is wrong."""
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise ConfigError("tracing was asked for (OTEL_TRACES_EXPORTER / OTEL_EXPORTER_OTLP_ENDPOINT) but the "
                          "OpenTelemetry SDK is not installed: pip install 'epp[tracing]', or unset them") from None
    import epp

    resource = Resource.create({"service.version": epp.__version__})
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "epp"}))
    try:
        provider = TracerProvider(resource=resource)  # the sampler comes from OTEL_TRACES_SAMPLER
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG: {exc}") from None
    for name in _exporter_names(env):
        provider.add_span_processor(BatchSpanProcessor(_exporter(name)))
    return provider


def setup_tracing(env: Mapping[str, str], flag: bool = True) -> Any:
    """The TracerProvider for ``epp serve``, or None when tracing is off (no import made)."""
    if not tracing_requested(env, flag):
        return None
    provider = build_tracer_provider(env)
    log.info("OpenTelemetry tracing on", extra={
        "exporters": _exporter_names(env), "service": provider.resource.attributes.get("service.name")})
    return provider
