"""``epp serve --workers 2`` behind a real Envoy: both workers serve the one port, routing
stays consistent between them (a shared prefix sticks to one pod whichever worker routes
it), /metrics merges both, a stop ends every worker, and combinations that cannot work are
refused at start."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Any

import aiohttp
import orjson
import pytest

from epp.local.topology import HOST, free_port_block, http_ok
from tests.promtext import scrape

from .conftest import Cluster

pytestmark = [pytest.mark.envoy]


def _chat(system: str, question: str) -> dict[str, Any]:
    return {"model": "sim-model", "max_tokens": 2,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]}


async def test_two_workers_share_the_port_and_keep_a_prefix_on_one_pod(cluster: Cluster) -> None:
    grpc, health, metrics = (free_port_block(3) + i for i in range(3))
    proc = cluster.topo.start(
        "workers", [sys.executable, "-m", "epp", "serve", "--endpoints", ",".join(f"{h}:{p}" for h, p in cluster.pool),
                    "--grpc-port", str(grpc), "--grpc-health-port", str(health), "--metrics-port", str(metrics),
                    "--bind-address", HOST, "--secure-serving=false", "--log-format", "text", "--workers", "2"],
        ready=lambda: http_ok(f"http://{HOST}:{metrics}/metrics"), timeout=60)
    # one stream per Envoy connection: concurrent requests open many connections, which the
    # kernel spreads over the two workers
    port = cluster.envoy({"grpc": grpc}, picker_tls=False, picker_streams_per_connection=1)
    systems = [f"You answer questions about topic {k}. " * 40 for k in range(3)]
    pods: dict[int, set[str]] = {k: set() for k in range(3)}
    async with aiohttp.ClientSession() as s:
        async def one(k: int, i: int) -> None:
            body = orjson.dumps(_chat(systems[k], f"q{i}"))
            async with s.post(f"http://{HOST}:{port}/v1/chat/completions", data=body,
                              headers={"content-type": "application/json"},
                              timeout=aiohttp.ClientTimeout(total=60)) as r:
                assert r.status == 200
                await r.read()
                pods[k].add(r.headers["x-inference-pod"])

        for round_ in range(4):
            await asyncio.gather(*(one(k, round_ * 100 + i) for k in range(3) for i in range(8)))
    m = scrape(metrics)
    by_worker: dict[str, float] = {}
    for labels, v in m["inference_objective_request_total"]:
        by_worker[labels["worker"]] = by_worker.get(labels["worker"], 0.0) + v
    assert set(by_worker) == {"0", "1"} and all(v > 0 for v in by_worker.values()), by_worker
    assert sum(by_worker.values()) == 96
    # each shared prefix stayed on one pod, whichever worker routed it
    assert all(len(p) == 1 for p in pods.values()), pods
    proc.stop()
    assert proc.popen.returncode == 0, proc.log_tail()


@pytest.mark.parametrize("flag", ["--ha-enable-leader-election", "--model-placement=manage"])
def test_combinations_that_cannot_work_are_refused(flag: str) -> None:
    out = subprocess.run([sys.executable, "-m", "epp", "serve", "--endpoints", "127.0.0.1:1", "--workers", "2",
                          "--metrics-port", "-1", flag], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--workers" in out.stderr, out.stderr
