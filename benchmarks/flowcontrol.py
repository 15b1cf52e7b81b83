"""Flow-control benchmark: multi-tenant fairness near saturation, scale from zero, KEDA push.

Run: ``.venv/bin/python -m benchmarks.flowcontrol [--duration 20] [--out benchmarks/out/flowcontrol.json]``
(``--only fairness|scale-from-zero|keda-push`` runs one part.)

1. Fairness: one noisy tenant at 5x the rate of three quiet ones, open loop (Poisson), on
   simulated pods driven past their batch size. Quiet tenants' TTFT p50/p90 with
   (a) ``token-fair-share-policy`` flow control, (b) the picker without flow control,
   (c) plain Envoy round robin (no picker).
2. Scale from zero: the pool file starts with ``endpoints: []``; requests arrive, the pool
   gets an endpoint after ``--cold-start`` seconds (a stand-in for a pod becoming Ready);
   time from the first request to its first token, and requests lost.
3. KEDA push latency: in process, a real grpc.aio ``StreamIsActive`` client on 127.0.0.1; a
   request arrives at an empty pool and is held; time until the client reads ``active``
   (and, after the request completes, ``inactive``). For the flow controller (gate on) and
   for legacy holding (gate off), ``--keda-rounds`` times each.

Standalone on purpose (uses ``epp.local.topology`` and the flow-control modules only).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import orjson
import yaml

from epp.datalayer.datastore import Datastore
from epp.envoy.bootstrap import EnvoySpec
from epp.flowcontrol import keda_proto
from epp.flowcontrol.config import parse_flow_control
from epp.flowcontrol.controller import FlowController
from epp.flowcontrol.hold import HoldingAdmission
from epp.flowcontrol.keda import KedaScaler, start_scaler_server
from epp.framework.datalayer import Endpoint
from epp.framework.requestcontrol import Admission, Demand, ResponseInfo
from epp.framework.scheduling import LLMRequest
from epp.local.topology import HOST, Topology, free_port_block

FC_CONFIG = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: concurrency-detector
  parameters: {maxConcurrency: %(conc)d}
- type: token-fair-share-policy
schedulingProfiles:
- name: default
  plugins: [{pluginRef: queue-scorer, weight: 2}, {pluginRef: kv-cache-utilization-scorer, weight: 2}]
saturationDetector: {pluginRef: concurrency-detector}
flowControl:
  defaultPriorityBand: {fairnessPolicyRef: token-fair-share-policy}
"""

TENANTS = {"noisy": 5.0, "quiet-1": 1.0, "quiet-2": 1.0, "quiet-3": 1.0}


async def one(session: aiohttp.ClientSession, port: int, tenant: str, max_tokens: int) -> dict[str, Any]:
    body = {"model": "sim-model", "max_tokens": max_tokens, "stream": True,
            "messages": [{"role": "user", "content": f"{tenant} asks {random.random()} " * 30}]}
    t0 = time.perf_counter()
    ttft = None
    try:
        async with session.post(f"http://{HOST}:{port}/v1/chat/completions", data=orjson.dumps(body),
                                headers={"content-type": "application/json",
                                         "x-gateway-inference-fairness-id": tenant}) as r:
            async for _chunk in r.content.iter_any():
                if ttft is None:
                    ttft = time.perf_counter() - t0
            status = r.status
    except (TimeoutError, aiohttp.ClientError):
        status = 0
    return {"tenant": tenant, "status": status, "ttft": ttft, "start": t0}


async def drive(port: int, rate: float, duration: float, max_tokens: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    total = sum(TENANTS.values())
    tasks: list[asyncio.Task[dict[str, Any]]] = []
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as s:
        end = time.perf_counter() + duration
        while time.perf_counter() < end:
            await asyncio.sleep(rng.expovariate(rate))
            tenant = rng.choices(list(TENANTS), weights=[w / total for w in TENANTS.values()])[0]
            tasks.append(asyncio.ensure_future(one(s, port, tenant, max_tokens)))
        return list(await asyncio.gather(*tasks))


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    quiet = [r["ttft"] for r in results if r["tenant"] != "noisy" and r["ttft"] is not None]
    noisy = [r["ttft"] for r in results if r["tenant"] == "noisy" and r["ttft"] is not None]
    return {
        "requests": len(results),
        "errors": sum(1 for r in results if r["status"] != 200),
        "quiet_ttft_p50": round(pct(quiet, 0.5), 3), "quiet_ttft_p90": round(pct(quiet, 0.9), 3),
        "noisy_ttft_p50": round(pct(noisy, 0.5), 3), "noisy_ttft_p90": round(pct(noisy, 0.9), 3),
    }


def fairness(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    sim_extra = ["--max-num-seqs", str(args.max_num_seqs), "--time-scale", str(args.time_scale)]
    for mode in ("token-fair-share", "no-flow-control", "envoy-rr"):
        with Topology(workdir / mode) as topo:
            base = free_port_block(args.pods)
            topo.start_sim(args.pods, base, kv_events_base_port=-1, extra=sim_extra)
            pool = [(HOST, base + i) for i in range(args.pods)]
            pickers: list[tuple[str, int]] = []
            routing = "override-host"
            if mode == "envoy-rr":
                routing = "direct"
            else:
                g, h, m = (free_port_block(3) + i for i in range(3))
                cfg = FC_CONFIG % {"conc": args.max_num_seqs} if mode == "token-fair-share" else None
                topo.start_picker(pool, g, h, m, config_text=cfg)
                pickers = [(HOST, g)]
            listen = free_port_block(2)
            topo.start_envoy(EnvoySpec(pool=pool, pickers=pickers, listen=(HOST, listen),
                                       admin=(HOST, listen + 1), routing=routing))
            results = asyncio.run(drive(listen, args.rate, args.duration, args.max_tokens, args.seed))
            out[mode] = summarize(results)
            print(mode, out[mode], flush=True)
    return out


async def _cold(port: int, n: int) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as s:
        return list(await asyncio.gather(*(one(s, port, f"tenant-{i % 4}", 16) for i in range(n))))


def scale_from_zero(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    with Topology(workdir / "scale-from-zero") as topo:
        base = free_port_block(1)
        topo.start_sim(1, base, kv_events_base_port=-1)
        pool_file = workdir / "pool.yaml"
        pool_file.write_text("endpoints: []\n")
        g, h, m = (free_port_block(3) + i for i in range(3))
        topo.start_picker(str(pool_file), g, h, m, config_text=FC_CONFIG % {"conc": 64})
        listen = free_port_block(2)
        topo.start_envoy(EnvoySpec(pool=[(HOST, base)], pickers=[(HOST, g)], listen=(HOST, listen),
                                   admin=(HOST, listen + 1)))

        async def run() -> list[dict[str, Any]]:
            task = asyncio.ensure_future(_cold(listen, args.cold_requests))
            await asyncio.sleep(args.cold_start)
            tmp = pool_file.with_suffix(".tmp")
            tmp.write_text(yaml.safe_dump({"endpoints": [{"name": "pod-0", "address": HOST, "port": base}]}))
            tmp.replace(pool_file)
            return await task

        results = asyncio.run(run())
    first = min(r["start"] for r in results)
    ttfts = [r["start"] + r["ttft"] - first for r in results if r["ttft"] is not None]
    return {
        "requests": len(results),
        "lost": sum(1 for r in results if r["status"] != 200),
        "cold_start_s": args.cold_start,
        "first_token_after_s": round(min(ttfts), 3) if ttfts else None,
        "last_token_after_s": round(max(ttfts), 3) if ttfts else None,
    }


async def _keda_push_rounds(admission: Admission, demand: Demand, ds: Datastore, rounds: int) -> dict[str, Any]:
    """Hold a request at an empty pool, time the ``active`` push; bring the pool up, complete
    the request, time the ``inactive`` push (flow control only: legacy demand counts the
    pool's in-flight requests, which push nothing when they end)."""
    pb2, pb2_grpc = keda_proto.load()
    scaler = KedaScaler(demand, lambda: "default", keepalive=3600)  # every push is an event
    server, port = await start_scaler_server(scaler, HOST, 0)
    ep = Endpoint("pod", "10.0.0.1", 8000)
    up: list[float] = []
    down: list[float] = []
    try:
        async with grpc.aio.insecure_channel(f"{HOST}:{port}") as ch:
            stream = pb2_grpc.ExternalScalerStub(ch).StreamIsActive(pb2.ScaledObjectRef(name="bench"))
            assert (await stream.read()).result is False
            for i in range(rounds):
                req = LLMRequest(request_id=f"r{i}", target_model="m", incoming_model="m")
                t0 = time.perf_counter()
                task = asyncio.ensure_future(admission.admit(req, ds.endpoints))  # held: no endpoint
                assert (await asyncio.wait_for(stream.read(), 30)).result is True
                up.append(time.perf_counter() - t0)
                ds.replace_endpoints([ep])
                await task
                t0 = time.perf_counter()
                admission.release(req, ResponseInfo(status=200))
                assert (await asyncio.wait_for(stream.read(), 30)).result is False
                if isinstance(admission, FlowController):
                    down.append(time.perf_counter() - t0)
                ds.replace_endpoints([])
            stream.cancel()
    finally:
        await server.stop(0)
    out: dict[str, Any] = {"rounds": rounds}
    for name, xs in (("active", up), ("inactive", down)):
        if xs:
            out[f"{name}_p50_ms"] = round(pct(xs, 0.5) * 1e3, 3)
            out[f"{name}_p99_ms"] = round(pct(xs, 0.99) * 1e3, 3)
            out[f"{name}_max_ms"] = round(max(xs) * 1e3, 3)
    return out


def keda_push(args: argparse.Namespace) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        res: dict[str, Any] = {}
        ds = Datastore()
        ctl = FlowController(parse_flow_control({}), None, ds)
        await ctl.start()
        try:
            res["flow-control"] = await _keda_push_rounds(ctl, ctl, ds, args.keda_rounds)
        finally:
            await ctl.stop()
        ds = Datastore()
        hold = HoldingAdmission(None, ds, 120.0)
        res["legacy-holding"] = await _keda_push_rounds(hold, hold, ds, args.keda_rounds)
        return res

    out = asyncio.run(run())
    print("keda-push", out, flush=True)
    return out


PARTS = ("fairness", "scale-from-zero", "keda-push")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--rate", type=float, default=40.0, help="total requests/s (noisy 5/8 of it)")
    p.add_argument("--pods", type=int, default=2)
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--time-scale", type=float, default=1.0)
    p.add_argument("--cold-start", type=float, default=3.0)
    p.add_argument("--cold-requests", type=int, default=40)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--keda-rounds", type=int, default=200)
    p.add_argument("--only", choices=PARTS, action="append", help="run only this part (repeatable)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    parts = args.only or PARTS
    with tempfile.TemporaryDirectory(prefix="epp-bench-fc-") as tmp:
        work = Path(tmp)
        res: dict[str, Any] = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
        if "fairness" in parts:
            res["fairness"] = fairness(args, work)
        if "scale-from-zero" in parts:
            res["scale_from_zero"] = scale_from_zero(args, work)
        if "keda-push" in parts:
            res["keda_push"] = keda_push(args)
    print(json.dumps(res, indent=2))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
