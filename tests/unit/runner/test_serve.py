"""`epp serve` as an operator meets it: start-up errors name the problem, TLS is enforced."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epp.discovery.static import StaticDiscovery
from epp.runner.server import PickerServer, ServeOptions
from epp.runner.tls import load_cert_dir, self_signed


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "epp", "serve", "--metrics-port", "-1", *args],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--endpoints", "10.0.0.1:99999"), "10.0.0.1:99999"),
        (("--endpoints", "10.0.0.1:8000", "--config-text",
          "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n"
          "plugins: [{type: queue-scorr}]\n"), 'plugins[0] (type "queue-scorr"): unknown plugin type'),
        (("--endpoints", "10.0.0.1:8000", "--pool-file", "x.yaml"), "exactly one of"),
        (("--endpoints", "10.0.0.1:8000", "--config-file", "/nonexistent.yaml"), "/nonexistent.yaml"),
    ],
)
def test_bad_start_up_input_exits_2_with_a_message_naming_it(args: tuple[str, ...], needle: str) -> None:
    res = _serve(*args)
    assert res.returncode == 2, res.stderr
    assert needle in res.stderr
    assert "Traceback" not in res.stderr


def test_cert_dir_must_hold_tls_crt_and_key(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(FileNotFoundError, match=r"tls\.key"):
        (tmp_path / "tls.crt").write_bytes(self_signed()[0])
        load_cert_dir(tmp_path)


async def test_ext_proc_refuses_plaintext_on_the_health_port_when_secure_serving() -> None:
    server = PickerServer(ServeOptions(
        discovery=StaticDiscovery.from_endpoints_flag("127.0.0.1:1"), grpc_port=0, grpc_health_port=0,
        metrics_port=-1, bind_address="127.0.0.1", secure_serving=True,
    ))
    await server.start()
    try:
        health = f"127.0.0.1:{server.bound_ports['health']}"
        async with grpc.aio.insecure_channel(health) as ch:
            ready = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="readiness"))
            assert ready.status == health_pb2.HealthCheckResponse.SERVING
            stream = pb_grpc.ExternalProcessorStub(ch).Process(
                iter([pb.ProcessingRequest(request_headers=pb.HttpHeaders(end_of_stream=True))]))
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                async for _ in stream:
                    pass
            assert ei.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await server.stop()
