"""Precise (KV-event) vs approximate prefix routing, with two picker replicas.

    .venv/bin/python -m benchmarks.precise [--duration 30] [--rate 12] [--pods 4] [--out DIR]

Topology per router, in front of the same kind of simulated pods (fresh pods per router, so
every run starts cold): ``--pods`` sims with KV events on; a workload of ``--groups`` shared
prefixes (~``--prefix-words`` tokens each) whose working set exceeds one pod's KV cache, so
evictions matter and a router must spread groups *and* keep them sticky.

* ``precise``     — Envoy with TWO `epp serve` replicas as ext_proc endpoints (LEAST_REQUEST),
                    each with ``precise-prefix-cache-scorer`` (KV events, shared view);
* ``approximate`` — the same two replicas with ``prefix-cache-scorer`` (each sees only the
                    traffic Envoy sent it);
* ``vllm-router:kv_aware`` — vllm-router's KV-event policy (one process; it is its own proxy).

Reports TTFT p50/p90 and the prefix-cache hit rate the pods reported (cached prompt tokens /
prompt tokens, from the responses' usage).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from epp.envoy.bootstrap import EnvoySpec
from epp.local.topology import HOST, Topology, free_port_block, http_ok

MODEL = "sim-model"
BLOCK = 16

PRECISE = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: precise-prefix-cache-scorer
  parameters:
    kvEventsPortOffsetFromServingPort: {offset}
    tokenizer: builtin   # simulated pods
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
    weight: 2
  - pluginRef: precise-prefix-cache-scorer
    weight: 3
"""

APPROX = None  # the picker's built-in default profile (queue 2, kv 2, approximate prefix 3)


@dataclass(slots=True)
class Result:
    ttft: float | None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    status: int = 0


def workload(groups: int, prefix_words: int, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(5000)]
    prefixes = [f"Group {g} context: " + " ".join(rng.choice(vocab) for _ in range(prefix_words))
                for g in range(groups)]
    return [rng.choice(prefixes) + f" Question {i}: " + " ".join(rng.choice(vocab) for _ in range(20))
            for i in range(n)]


async def one(session: aiohttp.ClientSession, url: str, prompt: str) -> Result:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft = None
    buf = b""
    try:
        async with session.post(url + "/v1/completions", data=orjson.dumps(body),
                                headers={"content-type": "application/json"}) as r:
            async for chunk in r.content.iter_any():
                if ttft is None:
                    ttft = time.perf_counter() - t0
                buf += chunk
            status = r.status
    except aiohttp.ClientError:
        return Result(None, status=599)
    res = Result(ttft, status=status)
    for line in buf.split(b"\n"):
        if line.startswith(b"data: {") and b'"usage"' in line:
            usage = orjson.loads(line[6:]).get("usage") or {}
            res.prompt_tokens = usage.get("prompt_tokens") or 0
            res.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return res


async def drive(url: str, prompts: list[str], rate: float, seed: int) -> list[Result]:
    rng = random.Random(seed)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120),
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        tasks = []
        t = time.perf_counter()
        for p in prompts:
            t += rng.expovariate(rate)
            delay = t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(session, url, p)))
        return list(await asyncio.gather(*tasks))


def summarize(label: str, results: list[Result]) -> dict[str, Any]:
    ok = [r for r in results if r.status == 200 and r.ttft is not None]
    ttfts = sorted(r.ttft for r in ok if r.ttft is not None)

    def q(p: float) -> float | None:
        return ttfts[min(len(ttfts) - 1, int(p * len(ttfts)))] if ttfts else None

    prompt = sum(r.prompt_tokens for r in ok)
    return {"router": label, "requests": len(results), "ok": len(ok),
            "ttft_p50_ms": None if q(0.5) is None else round(q(0.5) * 1000, 1),  # type: ignore[operator]
            "ttft_p90_ms": None if q(0.9) is None else round(q(0.9) * 1000, 1),  # type: ignore[operator]
            "ttft_mean_ms": round(statistics.fmean(ttfts) * 1000, 1) if ttfts else None,
            "hit_rate": round(sum(r.cached_tokens for r in ok) / prompt, 3) if prompt else None}


def start_pods(topo: Topology, n: int, blocks: int, time_scale: float, name: str) -> tuple[list[int], list[int]]:
    base, kv = free_port_block(n), free_port_block(n)
    topo.start_sim(n, base, kv_events_base_port=kv, name=name, extra=[
        "--block-size", str(BLOCK), "--num-gpu-blocks", str(blocks), "--time-scale", str(time_scale)])
    return [base + i for i in range(n)], [kv + i for i in range(n)]


def start_router(topo: Topology, kind: str, http: list[int], kv: list[int]) -> str:
    pool = [(HOST, p) for p in http]
    if kind in ("precise", "approximate"):
        cfg = PRECISE.format(offset=kv[0] - http[0]) if kind == "precise" else APPROX
        pickers = []
        for i in range(2):
            b = free_port_block(3)
            topo.start_picker(pool, b, b + 1, b + 2, config_text=cfg, name=f"{kind}-picker{i}")
            pickers.append((HOST, b))
        listen = free_port_block(2)
        topo.start_envoy(EnvoySpec(pool=pool, pickers=pickers, listen=(HOST, listen), admin=(HOST, listen + 1)),
                         name=f"{kind}-envoy")
        return f"http://{HOST}:{listen}"
    from benchmarks.routers import vllm_router_binary

    b = free_port_block(2)
    argv = [vllm_router_binary(), "--host", HOST, "--port", str(b), "--worker-urls",
            *[f"http://{HOST}:{p}" for p in http], "--policy", "kv_aware", "--prometheus-host", HOST,
            "--prometheus-port", str(b + 1), "--log-level", "warning"]
    for p, k in zip(http, kv, strict=True):
        argv += ["--kv-event-source", f"http://{HOST}:{p}=tcp://{HOST}:{k}"]
    argv += ["--kv-event-block-size", str(BLOCK), "--kv-event-model", MODEL]
    topo.start("vllm-router", argv, ready=lambda: http_ok(f"http://{HOST}:{b}/readiness"), timeout=60)
    return f"http://{HOST}:{b}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--routers", default="precise,approximate,vllm-router:kv_aware")
    ap.add_argument("--pods", type=int, default=4)
    ap.add_argument("--blocks", type=int, default=600, help="KV blocks per pod (16 tokens each)")
    ap.add_argument("--groups", type=int, default=40)
    ap.add_argument("--prefix-words", type=int, default=700)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--rate", type=float, default=12.0)
    ap.add_argument("--time-scale", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    n = int(args.duration * args.rate)
    prompts = workload(args.groups, args.prefix_words, n, args.seed)
    rows = []
    workdir = Path(args.out or tempfile.mkdtemp(prefix="precise-bench-"))
    for kind in args.routers.split(","):
        with Topology(workdir / kind.replace(":", "_")) as topo:
            http, kv = start_pods(topo, args.pods, args.blocks, args.time_scale, f"{kind}-sim")
            url = start_router(topo, kind, http, kv)
            time.sleep(1.0)  # subscriptions join
            results = asyncio.run(drive(url, prompts, args.rate, args.seed))
            rows.append(summarize(kind, results))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| router | requests | ok | TTFT p50 ms | TTFT p90 ms | hit rate |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['router']} | {r['requests']} | {r['ok']} | {r['ttft_p50_ms']} | {r['ttft_p90_ms']} | "
              f"{r['hit_rate']} |")
    (workdir / "precise.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
