"""Fixtures that start real processes: simulated vLLM pods, pickers, Envoy (loopback only)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from epp.envoy.bootstrap import EnvoySpec
from epp.local.topology import HOST, Topology, free_port_block, http_ok

pytestmark = pytest.mark.envoy


class Cluster:
    """A running sim pool plus helpers to add pickers and Envoys in front of it."""

    def __init__(self, topo: Topology, pod_ports: list[int]) -> None:
        self.topo = topo
        self.pod_ports = pod_ports
        self.pool = [(HOST, p) for p in pod_ports]
        self._n = 0

    def picker(self, pool: list[tuple[str, int]] | str | None = None, config: str | None = None,
               extra: tuple[str, ...] = ()) -> dict[str, int]:
        self._n += 1
        grpc, health, metrics = (free_port_block(3) + i for i in range(3))
        self.topo.start_picker(self.pool if pool is None else pool, grpc, health, metrics, config_text=config,
                               extra=("--log-format", "text", *extra), name=f"picker{self._n}")
        return {"grpc": grpc, "health": health, "metrics": metrics}

    def envoy(self, picker: dict[str, int] | None, pool: list[tuple[str, int]] | None = None, **kw: object) -> int:
        self._n += 1
        listen, admin = free_port_block(2), None
        admin = listen + 1
        spec = EnvoySpec(
            pool=pool or self.pool, pickers=[(HOST, picker["grpc"])] if picker else [],
            listen=(HOST, listen), admin=(HOST, admin), access_log=True, **kw,  # type: ignore[arg-type]
        )
        self.topo.start_envoy(spec, name=f"envoy{self._n}")
        return listen

    def pool_file(self, content: dict[str, object]) -> str:
        self._n += 1
        path = self.topo.workdir / f"pool{self._n}.yaml"
        path.write_text(yaml.safe_dump(content))
        return str(path)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("topology")
    with Topology(workdir) as topo:
        base = free_port_block(3)
        topo.start_sim(3, base, kv_events_base_port=-1)
        yield Cluster(topo, [base, base + 1, base + 2])


IDLE_VLLM_PAGE = """# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="sim-model"} 0.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="sim-model"} 0.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="sim-model"} 0.0
"""


class MetricsStub:
    """A /metrics endpoint the test can stop: makes one endpoint's metrics go stale while the
    pod itself keeps serving."""

    def __init__(self, page: str = IDLE_VLLM_PAGE) -> None:
        body = page.encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("content-type", "text/plain")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                return

        self.port = free_port_block(1)
        self.server = ThreadingHTTPServer((HOST, self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def metrics_stub() -> Iterator[MetricsStub]:
    stub = MetricsStub()
    try:
        yield stub
    finally:
        stub.stop()


def wait_until(pred: Callable[[], bool], timeout: float = 10.0, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return False


__all__ = ["Cluster", "MetricsStub", "Path", "http_ok", "wait_until"]
