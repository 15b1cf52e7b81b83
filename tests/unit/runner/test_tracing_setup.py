"""Tracing is opt-in through the standard OTEL_* environment; a wrong setting stops the start
with a message naming the variable (never a silent no-op)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from epp.config.loader import ConfigError
from epp.runner.tracing import build_tracer_provider, setup_tracing, tracing_requested


@pytest.mark.parametrize(("env", "flag", "on"), [
    ({}, True, False),
    ({"OTEL_SERVICE_NAME": "epp"}, True, False),  # naming the service asks for nothing
    ({"OTEL_TRACES_EXPORTER": "none"}, True, False),
    ({"OTEL_TRACES_EXPORTER": "otlp"}, True, True),
    ({"OTEL_TRACES_EXPORTER": "console,none"}, True, True),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, True, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317"}, True, True),
    ({"OTEL_TRACES_EXPORTER": "otlp"}, False, False),  # --tracing=false
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, True, False),
])
def test_opt_in(env: dict[str, str], flag: bool, on: bool) -> None:
    assert tracing_requested(env, flag) is on
    if not on:
        assert setup_tracing(env, flag) is None


def test_the_sdk_reads_the_rest_of_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "picker-a")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.25")
    provider = build_tracer_provider({"OTEL_TRACES_EXPORTER": "console"})
    try:
        assert provider.resource.attributes["service.name"] == "picker-a"
        assert "0.25" in provider.sampler.get_description()
    finally:
        provider.shutdown()
    monkeypatch.delenv("OTEL_SERVICE_NAME")
    monkeypatch.delenv("OTEL_TRACES_SAMPLER")
    provider = build_tracer_provider({"OTEL_TRACES_EXPORTER": "console"})
    try:
        assert provider.resource.attributes["service.name"] == "epp"  # not "unknown_service"
        assert provider.sampler.get_description().startswith("ParentBased")
    finally:
        provider.shutdown()


@pytest.mark.parametrize(("env", "needle"), [
    ({"OTEL_TRACES_EXPORTER": "zipkin-ish"}, "no trace exporter named 'zipkin-ish'"),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "carrier-pigeon"}, "OTEL_EXPORTER_OTLP_PROTOCOL"),
])
def test_bad_settings_name_the_variable(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        build_tracer_provider(env)


def test_epp_serve_refuses_a_bad_exporter_at_start() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    res = subprocess.run([sys.executable, "-m", "epp", "serve", "--endpoints", "10.0.0.1:8000", "--metrics-port",
                          "-1"], capture_output=True, text=True, timeout=60,
                         env={**env, "OTEL_TRACES_EXPORTER": "jaeger-thrift"})
    assert res.returncode == 2, res.stderr
    assert "OTEL_TRACES_EXPORTER" in res.stderr and "Traceback" not in res.stderr


def test_the_installed_exporter_imports() -> None:
    """The environment `make test` (and the image) builds has opentelemetry-proto's own
    modules, not the 2019 copy xds-protos lays over the same paths."""
    from opentelemetry.proto.common.v1 import common_pb2

    assert hasattr(common_pb2, "InstrumentationScope")
    provider = build_tracer_provider({"OTEL_TRACES_EXPORTER": "otlp",
                                      "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"})
    provider.shutdown()


def test_a_shadowed_otel_proto_is_a_start_error_that_says_how_to_repair(monkeypatch: pytest.MonkeyPatch) -> None:
    """When xds-protos' old copy owns opentelemetry/proto/, the exporter's import fails; the
    start-up error says so and gives the pip command that repairs it."""
    import types
    from importlib import metadata

    import opentelemetry.proto.common.v1 as common_pkg

    old = types.ModuleType("opentelemetry.proto.common.v1.common_pb2")  # no InstrumentationScope
    monkeypatch.setitem(sys.modules, "opentelemetry.proto.common.v1.common_pb2", old)
    monkeypatch.setattr(common_pkg, "common_pb2", old, raising=False)
    broken = metadata.EntryPoint(name="otlp_proto_grpc", value="epp_no_such_exporter_module:Exporter",
                                 group="opentelemetry_traces_exporter")
    monkeypatch.setattr(metadata, "entry_points", lambda **kw: [broken])
    with pytest.raises(ConfigError) as err:
        build_tracer_provider({"OTEL_TRACES_EXPORTER": "otlp"})
    msg = str(err.value)
    assert "'otlp_proto_grpc' exporter cannot be imported" in msg
    assert "pip install --no-deps --force-reinstall 'opentelemetry-proto==" in msg
