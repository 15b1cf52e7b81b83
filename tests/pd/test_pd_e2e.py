"""P/D end to end: client → real Envoy → picker (disagg handler) → decode sidecar → simulated
prefill and decode pods, all real processes over loopback.

What each pod did is read from its own /metrics (the simulator has no request log):
the prefill pod's ``vllm:request_params_max_tokens`` histogram shows max_tokens=1 legs, the
decode pod's ``vllm:prompt_tokens_by_source{source="external_kv_transfer"}`` shows prompt
tokens that arrived as transferred KV instead of being computed.

No waiting is needed to read them: the sidecar sends the prefill leg and waits for its answer
before the decode leg, and a pod records a request before it answers, so once the client has
its response both pods' counters are final. The prefill pod runs with
``--histogram-refresh 0`` so its histogram lines are re-rendered on every scrape.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest

from epp.envoy.bootstrap import EnvoySpec
from epp.local.pd import pd_picker_config, pd_pool_file
from epp.local.topology import HOST, Topology, free_port_block, grpc_serving
from tests.promtext import value

pytestmark = [pytest.mark.envoy]

MODEL = "sim-model"
SIM_ARGS = ("--time-scale", "0.05")


@dataclass
class PDCluster:
    topo: Topology
    prefill: int  # prefill sim port
    engines: list[int]  # decode sim ports
    sidecars: list[int]
    ghost: int  # a port nothing listens on (a dead prefill pod)
    envoy: int = 0
    picker_metrics: int = 0
    n: int = 0

    def start_route(self, pool_yaml: str, config: str) -> tuple[int, int]:
        """A picker on this pool + an Envoy in front of the decode sidecars: (listen, metrics)."""
        self.n += 1
        pool = self.topo.workdir / f"pool{self.n}.yaml"
        pool.write_text(pool_yaml)
        grpc, health, metrics = (free_port_block(3) + i for i in range(3))
        self.topo.start_picker(str(pool), grpc, health, metrics, config_text=config,
                               extra=("--log-format", "text"), name=f"picker{self.n}")
        assert grpc_serving(HOST, health)
        listen = free_port_block(2)
        self.topo.start_envoy(EnvoySpec(pool=[(HOST, p) for p in self.sidecars], pickers=[(HOST, grpc)],
                                        listen=(HOST, listen), admin=(HOST, listen + 1), access_log=True),
                              name=f"envoy{self.n}")
        return listen, metrics

    def prefill_legs(self) -> float:
        """Requests the prefill pod served with max_tokens <= 1."""
        return value(self.prefill, "vllm:request_params_max_tokens_bucket", le="1.0")

    def transferred(self) -> float:
        return sum(value(p, "vllm:prompt_tokens_by_source_total", source="external_kv_transfer")
                   for p in self.engines)


@pytest.fixture(scope="module")
def pd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PDCluster]:
    with Topology(tmp_path_factory.mktemp("pd")) as topo:
        base = free_port_block(6)
        prefill, engines, sidecars, ghost = base, [base + 1, base + 2], [base + 3, base + 4], base + 5
        topo.start_sim(1, prefill, -1, extra=("--pod-name-prefix", "prefill-", "--histogram-refresh", "0", *SIM_ARGS),
                       name="sim-prefill")
        topo.start_sim(2, engines[0], -1, extra=("--pod-name-prefix", "decode-", *SIM_ARGS), name="sim-decode")
        cluster = PDCluster(topo, prefill, engines, sidecars, ghost)
        decode = [(HOST, s, e) for s, e in zip(sidecars, engines, strict=True)]
        pool_yaml = pd_pool_file([(HOST, prefill)], decode)
        allow = topo.workdir / "allow-pool.yaml"
        allow.write_text(pool_yaml)
        for i, (s, e) in enumerate(zip(sidecars, engines, strict=True)):
            # Allowed prefill targets: the pool's pods, plus the ghost for the fallback test.
            topo.start_sidecar(s, e, extra=("--allow-pool-file", str(allow), "--allow-prefill", f"{HOST}:{ghost}",
                                            "--prefill-timeout", "5"), name=f"sidecar{i}")
        cluster.envoy, cluster.picker_metrics = cluster.start_route(pool_yaml, pd_picker_config(256, 512))
        yield cluster


async def post(port: int, body: dict[str, Any], headers: dict[str, str] | None = None,
               path: str = "/v1/completions") -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as s, s.post(
        f"http://{HOST}:{port}{path}", data=orjson.dumps(body),
        headers={"content-type": "application/json", **(headers or {})}, timeout=aiohttp.ClientTimeout(total=30),
    ) as r:
        return r.status, {k.lower(): v for k, v in r.headers.items()}, await r.read()


def long_prompt(tag: str) -> str:
    return f"[{tag}] " + "Summarise the following meeting minutes in detail, item by item. " * 45  # ~750 tokens


def decisions(port: int, decision: str, reason: str | None = None) -> float:
    labels = {"decision": decision, **({"reason": reason} if reason else {})}
    return value(port, "epp_pd_decisions_total", **labels)


async def test_long_uncached_prompt_is_disaggregated(pd: PDCluster) -> None:
    legs, moved = pd.prefill_legs(), pd.transferred()
    status, headers, body = await post(pd.envoy, {"model": MODEL, "prompt": long_prompt("a"), "max_tokens": 6})
    assert status == 200, body
    doc = orjson.loads(body)
    assert doc["usage"]["completion_tokens"] == 6
    assert headers["x-inference-pod"].startswith("decode-")  # served by a decode pod
    assert pd.prefill_legs() == legs + 1  # the prefill pod saw one max_tokens=1 leg
    assert pd.transferred() > moved + 500  # the decode pod received the prompt's KV
    assert decisions(pd.picker_metrics, "disaggregated", "uncached-prompt") >= 1


async def test_streaming_disaggregated_response_reaches_the_client(pd: PDCluster) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": long_prompt("stream")}], "max_tokens": 5,
            "stream": True, "stream_options": {"include_usage": True}}
    status, headers, raw = await post(pd.envoy, body, path="/v1/chat/completions")
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in raw.split(b"\n") if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    assert orjson.loads(events[-2])["usage"]["completion_tokens"] == 5


async def test_short_and_cached_prompts_are_not_disaggregated(pd: PDCluster) -> None:
    legs = pd.prefill_legs()
    status, _, _ = await post(pd.envoy, {"model": MODEL, "prompt": long_prompt("warm"), "max_tokens": 2})
    assert status == 200
    assert pd.prefill_legs() == legs + 1  # the first time, the long prompt was disaggregated
    legs, moved = pd.prefill_legs(), pd.transferred()
    # short prompt; and one carrying a forged prefill header, which the picker strips
    status, _, _ = await post(pd.envoy, {"model": MODEL, "prompt": "Hi there", "max_tokens": 2},
                              headers={"x-prefiller-host-port": f"{HOST}:{pd.prefill}"})
    assert status == 200
    # the same long prompt again: now cached on its decode pod
    status, _, _ = await post(pd.envoy, {"model": MODEL, "prompt": long_prompt("warm"), "max_tokens": 2})
    assert status == 200
    assert pd.prefill_legs() == legs and pd.transferred() == moved
    assert decisions(pd.picker_metrics, "aggregated", "short-prompt") >= 1
    assert decisions(pd.picker_metrics, "aggregated", "cached-on-decode") >= 1


async def test_prefill_rejection_is_returned_and_a_dead_prefill_pod_falls_back(pd: PDCluster) -> None:
    # 4xx from the prefill leg (the sim honours x-return-error) comes back to the client as is.
    before = decisions(pd.picker_metrics, "disaggregated")
    status, _, body = await post(pd.envoy, {"model": MODEL, "prompt": long_prompt("bad"), "max_tokens": 2},
                                 headers={"x-return-error": "400"})
    assert status == 400 and b"x-return-error: 400" in body
    assert decisions(pd.picker_metrics, "disaggregated") == before + 1  # it took the P/D path
    # A prefill pod that is in the pool (metrics fresh) but does not answer: decode locally.
    pool = pd_pool_file([], [(HOST, s, e) for s, e in zip(pd.sidecars, pd.engines, strict=True)])
    pool = pool.replace("endpoints:\n", "endpoints:\n- {name: dead-prefill, address: 127.0.0.1, port: "
                        f"{pd.ghost}, metricsPort: {pd.prefill}, labels: {{llm-d.ai/role: prefill}}}}\n", 1)
    listen, metrics = pd.start_route(pool, pd_picker_config(always=True))
    moved = pd.transferred()
    status, headers, body = await post(listen, {"model": MODEL, "prompt": long_prompt("fallback"), "max_tokens": 3})
    assert status == 200, body
    assert orjson.loads(body)["usage"]["completion_tokens"] == 3
    assert headers["x-inference-pod"].startswith("decode-")
    assert pd.transferred() == moved  # prefilled locally
    assert value(metrics, "epp_pd_prefill_endpoint_total", endpoint=f"{HOST}:{pd.ghost}") == 1
