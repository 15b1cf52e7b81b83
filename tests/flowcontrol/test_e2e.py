"""Flow control end to end: client → real Envoy → picker (flow control) → simulated vLLM pods.

* scale from zero: requests arrive at an empty pool (static pool file ``endpoints: []``), are
  held, the KEDA scaler (real grpcio client) says active and counts them, the pool file gains
  an endpoint, every held request completes (0 lost);
* fair share through the real picker: a tenant that arrives behind a burst of another tenant
  is interleaved with it instead of waiting for the whole burst.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import orjson
import pytest
import yaml

from epp.flowcontrol import keda_proto
from epp.local.topology import HOST, Topology, free_port_block
from tests.integration.conftest import Cluster
from tests.promtext import scrape
from tests.waiting import eventually

pytestmark = [pytest.mark.envoy]

CONFIG = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: queue-scorer
- type: concurrency-detector
  parameters: {maxConcurrency: 2}
- type: token-fair-share-policy
schedulingProfiles:
- name: default
  plugins: [{pluginRef: queue-scorer}]
saturationDetector: {pluginRef: concurrency-detector}
flowControl:
  defaultRequestTTL: 60s
  defaultPriorityBand: {fairnessPolicyRef: token-fair-share-policy}
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("flowcontrol")
    with Topology(workdir) as topo:
        base = free_port_block(2)
        topo.start_sim(2, base, kv_events_base_port=-1, extra=["--inter-token-latency", "0.004"])
        yield Cluster(topo, [base, base + 1])


async def post(port: int, tenant: str, text: str, max_tokens: int = 8) -> tuple[int, bytes]:
    body = {"model": "sim-model", "max_tokens": max_tokens, "messages": [{"role": "user", "content": text}]}
    async with aiohttp.ClientSession() as s, s.post(
        f"http://{HOST}:{port}/v1/chat/completions", data=orjson.dumps(body),
        headers={"content-type": "application/json", "x-gateway-inference-fairness-id": tenant},
        timeout=aiohttp.ClientTimeout(total=60),
    ) as r:
        return r.status, await r.read()


def write_pool(path: Path, endpoints: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump({"endpoints": endpoints}))
    tmp.replace(path)


async def test_scale_from_zero_holds_every_request_and_wakes_keda(cluster: Cluster) -> None:
    pb2, pb2_grpc = keda_proto.load()
    pool_path = Path(cluster.pool_file({"endpoints": []}))
    keda_port = free_port_block(1)
    picker = cluster.picker(pool=str(pool_path), config=CONFIG,
                            extra=("--keda-scaler-port", str(keda_port), "--empty-pool-wait", "60s"))
    port = cluster.envoy(picker)

    pushed: list[bool] = []
    ch = grpc.insecure_channel(f"{HOST}:{keda_port}")
    stub = pb2_grpc.ExternalScalerStub(ch)
    ref = pb2.ScaledObjectRef(name="vllm", namespace="default", scalerMetadata={"targetRequestsPerReplica": "4"})
    stream = stub.StreamIsActive(ref)

    def follow() -> None:
        try:
            for msg in stream:
                pushed.append(msg.result)
        except grpc.RpcError:
            pass

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    try:
        await eventually(lambda: pushed == [False], what="StreamIsActive's first state")
        clients = [asyncio.ensure_future(post(port, f"tenant-{i % 3}", f"cold start {i}")) for i in range(12)]
        await eventually(lambda: True in pushed, what=lambda: f"an 'active' push, got {pushed}")

        def queued() -> float:
            got = stub.GetMetrics(pb2.GetMetricsRequest(scaledObjectRef=ref))
            return got.metricValues[0].metricValueFloat

        await eventually(lambda: asyncio.to_thread(lambda: queued() == 12), what="12 held requests in GetMetrics")
        assert stub.IsActive(ref).result is True
        gauges = scrape(picker["metrics"])["inference_extension_flow_control_queue_size"]
        assert sum(v for _, v in gauges) == 12
        assert not any(c.done() for c in clients)

        write_pool(pool_path, [{"name": "pod-0", "address": HOST, "port": cluster.pod_ports[0]}])
        results = await asyncio.wait_for(asyncio.gather(*clients), 30)
        assert [status for status, _ in results] == [200] * 12, results
        m = scrape(picker["metrics"])
        outcomes: dict[str, float] = {}
        for lbl, v in m["inference_extension_flow_control_request_queue_duration_seconds_count"]:
            outcomes[lbl["outcome"]] = outcomes.get(lbl["outcome"], 0) + v
        assert outcomes == {"Dispatched": 12}
        await eventually(lambda: pushed[-1] is False, what=lambda: f"an 'inactive' push, got {pushed}")
    finally:
        stream.cancel()
        ch.close()


async def test_a_tenant_behind_a_burst_is_interleaved_not_starved(cluster: Cluster) -> None:
    pool = cluster.pool_file({"endpoints": [{"name": "pod-1", "address": HOST, "port": cluster.pod_ports[1]}]})
    picker = cluster.picker(pool=pool, config=CONFIG)
    port = cluster.envoy(picker)
    done: list[str] = []

    async def one(tenant: str, i: int) -> int:
        status, _ = await post(port, tenant, f"{tenant} question {i} " * 20, max_tokens=24)
        done.append(tenant)
        return status

    def noisy_in_picker() -> tuple[float, float]:
        """(noisy requests that reached flow control, noisy requests queued now)."""
        m = scrape(picker["metrics"])
        queued = sum(v for lbl, v in m.get("inference_extension_flow_control_queue_size", [])
                     if lbl["fairness_id"] == "noisy")
        left = sum(v for lbl, v in m.get("inference_extension_flow_control_request_queue_duration_seconds_count", [])
                   if lbl["fairness_id"] == "noisy")
        return left + queued, queued

    burst = [asyncio.ensure_future(one("noisy", i)) for i in range(20)]
    seen: list[tuple[float, float]] = []

    async def burst_arrived() -> bool:
        seen.append(await asyncio.to_thread(noisy_in_picker))
        return seen[-1][0] >= 20

    await eventually(burst_arrived, timeout=30, what=lambda: f"the burst in the picker, (arrived, queued) {seen[-1]}")
    assert seen[-1][1] >= 10, seen[-1]  # most of it still queued behind the 2 running requests
    quiet = [asyncio.ensure_future(one("quiet", i)) for i in range(4)]
    statuses = await asyncio.wait_for(asyncio.gather(*burst, *quiet), 60)
    assert statuses == [200] * 24
    last_quiet = max(i for i, t in enumerate(done) if t == "quiet")
    # FCFS would finish the quiet tenant last (positions 20-23); fair share interleaves it
    assert last_quiet < 16, done
