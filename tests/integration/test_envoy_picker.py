"""End to end through a real Envoy 1.40: client → Envoy → epp (ext_proc) → simulated vLLM pods.

Every request here crosses real processes over loopback; assertions are on what a client or
an operator sees (status, body, the pod that served, the picker's metrics).
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import pytest

from epp.local.topology import HOST
from tests.promtext import scrape, value
from tests.waiting import eventually

from .conftest import Cluster, MetricsStub, wait_until

pytestmark = [pytest.mark.envoy]

MODEL = "sim-model"


async def post(port: int, body: dict[str, Any], headers: dict[str, str] | None = None,
               path: str = "/v1/chat/completions") -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as s, s.post(
        f"http://{HOST}:{port}{path}", data=orjson.dumps(body),
        headers={"content-type": "application/json", **(headers or {})},
        timeout=aiohttp.ClientTimeout(total=30),
    ) as r:
        return r.status, {k.lower(): v for k, v in r.headers.items()}, await r.read()


def chat(text: str, system: str = "You are terse.", **kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": 4,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": text}], **kw}


@pytest.fixture(scope="module")
def default_route(cluster: Cluster) -> tuple[int, dict[str, int]]:
    picker = cluster.picker()
    return cluster.envoy(picker), picker


async def test_requests_land_on_the_endpoint_the_picker_chose(
        cluster: Cluster, default_route: tuple[int, dict[str, int]]) -> None:
    port, picker = default_route
    before = sum(v for _, v in scrape(picker["metrics"]).get("epp_served_endpoint_total", []))
    results = await asyncio.gather(*(post(port, chat(f"question number {i} " * 20)) for i in range(12)))
    assert all(status == 200 for status, _, _ in results), results
    served_ports = {int(h["x-inference-port"]) for _, h, _ in results}
    assert served_ports <= set(cluster.pod_ports)
    m = scrape(picker["metrics"])
    served = m["epp_served_endpoint_total"]
    assert sum(v for _, v in served) - before == 12
    # Envoy reported (selected_host_key) exactly the endpoint the picker put first, every time.
    assert all(labels["matched_pick"] == "true" for labels, v in served if v)
    assert {int(lbl["endpoint"].rsplit(":", 1)[1]) for lbl, v in served if v} >= served_ports


async def test_same_prefix_sticks_while_distinct_prompts_spread(default_route: tuple[int, dict[str, int]]) -> None:
    port, _ = default_route
    system = "You answer questions about the municipal tax code. " * 40  # a long shared prefix
    pods = []
    for i in range(8):
        status, headers, _ = await post(port, chat(f"what is rule {i}?", system=system))
        assert status == 200
        pods.append(headers["x-inference-pod"])
    assert len(set(pods)) == 1, pods
    spread = await asyncio.gather(*(post(port, chat(f"unrelated {i} " * 60, system=f"persona {i} " * 30))
                                    for i in range(12)))
    assert len({h["x-inference-pod"] for _, h, _ in spread}) >= 2


async def test_streaming_passes_through_with_the_clients_model_name(
        default_route: tuple[int, dict[str, int]]) -> None:
    port, _ = default_route
    body = chat("stream please", stream=True, stream_options={"include_usage": True})
    body["model"] = "my-alias"
    async with aiohttp.ClientSession() as s, s.post(
        f"http://{HOST}:{port}/v1/chat/completions", data=orjson.dumps(body),
        headers={"content-type": "application/json", "x-gateway-model-name-rewrite": MODEL},
    ) as r:
        assert r.status == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = await r.read()
    events = [line[6:] for line in raw.split(b"\n") if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    docs = [orjson.loads(e) for e in events[:-1]]
    assert docs and all(d["model"] == "my-alias" for d in docs)
    assert docs[-1]["usage"]["completion_tokens"] == 4
    # non-streaming JSON too
    status, _, data = await post(port, {**chat("json please"), "model": "my-alias"},
                                 headers={"x-gateway-model-name-rewrite": MODEL})
    assert status == 200 and orjson.loads(data)["model"] == "my-alias"


async def test_header_only_request_is_routed(default_route: tuple[int, dict[str, int]]) -> None:
    port, _ = default_route
    async with aiohttp.ClientSession() as s, s.get(f"http://{HOST}:{port}/v1/models") as r:
        assert r.status == 200
        assert (await r.json())["data"][0]["id"] == MODEL


@pytest.mark.parametrize(("raw", "needle"), [(b"{broken", b"not valid JSON"), (b'{"prompt":"x"}', b"model not found")])
async def test_bad_requests_get_a_400_json_body(default_route: tuple[int, dict[str, int]], raw: bytes,
                                                needle: bytes) -> None:
    port, _ = default_route
    async with aiohttp.ClientSession() as s, s.post(f"http://{HOST}:{port}/v1/completions", data=raw) as r:
        assert r.status == 400
        assert r.headers["content-type"] == "application/json"
        body = await r.read()
    assert needle in body and orjson.loads(body)["error"]["code"] == 400


async def test_subset_hint_restricts_the_pick_and_an_unknown_subset_is_503(cluster: Cluster) -> None:
    picker = cluster.picker()
    only = cluster.pod_ports[2]
    port = cluster.envoy(picker, subset_hint=[f"{HOST}:{only}"])
    results = await asyncio.gather(*(post(port, chat(f"subset {i}")) for i in range(6)))
    assert {int(h["x-inference-port"]) for _, h, _ in results} == {only}
    bad = cluster.envoy(picker, subset_hint=["10.255.0.9"])
    status, headers, body = await post(bad, chat("nowhere"))
    assert status == 503 and b"candidates" in body
    assert headers["content-type"] == "application/json"


async def test_fallback_list_lets_envoy_retry_past_a_dead_primary(cluster: Cluster) -> None:
    # A "ghost" endpoint: its metrics (borrowed from a live pod) look healthy, but nothing
    # listens on its serving port. With maxNumOfEndpoints 2 the picker sends "ghost,live"
    # or "live,ghost"; Envoy must walk the list and every request must succeed.
    live = cluster.pod_ports[0]
    ghost_port = cluster.pod_ports[-1] + 50
    pool = cluster.pool_file({"endpoints": [
        {"name": "live", "address": HOST, "port": live},
        {"name": "ghost", "address": HOST, "port": ghost_port, "metricsPort": cluster.pod_ports[1]},
    ]})
    config = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- {type: queue-scorer}
- {type: max-score-picker, parameters: {maxNumOfEndpoints: 2}}
schedulingProfiles:
- name: default
  plugins: [{pluginRef: queue-scorer}, {pluginRef: max-score-picker}]
"""
    picker = cluster.picker(pool=pool, config=config)
    port = cluster.envoy(picker, pool=[(HOST, live), (HOST, ghost_port)])
    results = [await post(port, chat(f"retry {i}")) for i in range(16)]
    assert all(s == 200 for s, _, _ in results)
    assert {int(h["x-inference-port"]) for _, h, _ in results} == {live}
    served = scrape(picker["metrics"])["epp_served_endpoint_total"]
    assert any(lbl["matched_pick"] == "false" and v > 0 for lbl, v in served), served  # ghost was primary


async def test_sheddable_request_gets_429_when_the_pool_is_saturated(cluster: Cluster) -> None:
    # The only endpoint has no reachable metrics: stale counts as saturated. A request for a
    # sheddable objective (priority < 0) is shed with 429; a normal one is not.
    pool = cluster.pool_file({
        "endpoints": [{"name": "blind", "address": HOST, "port": cluster.pod_ports[0], "metricsPort": 1}],
        "objectives": [{"name": "batch", "priority": -1}, {"name": "interactive", "priority": 5}],
    })
    picker = cluster.picker(pool=pool)
    port = cluster.envoy(picker)
    status, headers, body = await post(port, chat("batch job"), headers={"x-gateway-inference-objective": "batch"})
    assert status == 429 and headers["content-type"] == "application/json"
    assert b"saturated" in body
    status, _, _ = await post(port, chat("user waiting"), headers={"x-gateway-inference-objective": "interactive"})
    assert status == 200
    errors = scrape(picker["metrics"])["inference_objective_request_error_total"]
    assert any(lbl["error_code"] == "ResourceExhausted" and v == 1 for lbl, v in errors)


async def test_pod_whose_metrics_go_stale_stops_receiving_traffic(cluster: Cluster, metrics_stub: MetricsStub) -> None:
    a, b = cluster.pod_ports[0], cluster.pod_ports[1]
    pool = cluster.pool_file({"endpoints": [
        {"name": "a", "address": HOST, "port": a},
        {"name": "b", "address": HOST, "port": b, "metricsPort": metrics_stub.port},  # scraped from the stub
    ]})
    # the pool gauges are recomputed every 0.1 s, so the picker's own count of endpoints with
    # fresh metrics (inference_pool_ready_pods) says when b has gone stale
    picker = cluster.picker(pool=pool, extra=("--metrics-staleness-threshold", "1s",
                                              "--refresh-prometheus-metrics-interval", "0.1s"))
    port = cluster.envoy(picker, pool=[(HOST, a), (HOST, b)])

    def ready_pods() -> float:
        return value(picker["metrics"], "inference_pool_ready_pods")

    await eventually(lambda: ready_pods() == 2, what="both endpoints fresh")
    first = await asyncio.gather(*(post(port, chat(f"before {i} " * 30)) for i in range(10)))
    assert b in {int(h["x-inference-port"]) for _, h, _ in first}  # b is a normal member while fresh
    metrics_stub.stop()
    # b's last scrape ages past the 1 s threshold; the picker reports it stale (the same
    # freshness test the scheduler applies, with a clock that only moves forward)
    await eventually(lambda: ready_pods() == 1, what="the picker to count b's metrics as stale")
    after = [await post(port, chat(f"after {i} " * 30)) for i in range(10)]
    assert {int(h["x-inference-port"]) for _, h, _ in after} == {a}


@pytest.mark.parametrize("routing", ["original-dst", "override-host"])
async def test_buffered_mode_routes_and_rewrites(cluster: Cluster, routing: str) -> None:
    picker = cluster.picker()
    port = cluster.envoy(picker, routing=routing, request_body_mode="BUFFERED", response_body_mode="BUFFERED")
    status, headers, body = await post(port, {**chat("buffered"), "model": "alias"},
                                       headers={"x-gateway-model-name-rewrite": MODEL})
    assert status == 200, body
    assert orjson.loads(body)["model"] == "alias"
    assert int(headers["x-inference-port"]) in cluster.pod_ports
    assert wait_until(lambda: bool(scrape(picker["metrics"]).get("inference_objective_request_total")))


async def test_picker_down_fails_closed_with_a_5xx(cluster: Cluster) -> None:
    # No picker listening: Envoy (failure_mode_allow false, the GIE default FailClose) refuses.
    port = cluster.envoy({"grpc": cluster.pod_ports[-1] + 77})
    status, _, _ = await post(port, chat("anyone?"))
    assert status >= 500
