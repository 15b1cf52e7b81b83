"""Token fair share across picker replicas, and how fast shares converge when tenants arrive.

Run: ``.venv/bin/python -m benchmarks.fairness_replicas [--duration 40] [--out benchmarks/out/fairness-replicas.json]``
(``--only drift|converge`` runs one part.)

1. **Drift between replicas.** Each picker replica runs ``token-fair-share-policy`` on the
   requests Envoy sends it (LEAST_REQUEST between replicas), with its own counters. Tenants
   with skewed demand (6:3:1:1 of an offered load above the pool's capacity) share 2
   simulated pods; each replica's ``concurrency-detector`` gets 1/N of the pool's
   concurrency so N replicas together admit what one would. Requests are alike, so a tenant's
   share of served tokens is its share of the requests finished while all tenants offer load
   (after a warm-up). With 2 and 4 replicas it is compared with one replica (one global
   counter): drift = max over tenants of |share_N − share_1| / share_1.
2. **Convergence.** One tenant alone saturates the pool (idle capacity is lent: it gets all of
   it), then two more tenants arrive; tier weights 2:1:1. Shares of finished tokens are taken
   in 2 s windows; the time to converge is from the arrival until each tier's share
   (averaged over two windows) stays within 10 % (relative) of its weight's share.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

from epp.envoy.bootstrap import EnvoySpec
from epp.local.topology import HOST, Topology, free_port_block

CONFIG = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: queue-scorer
- type: concurrency-detector
  parameters: {maxConcurrency: %(conc)d}
- name: fair
  type: token-fair-share-policy
  parameters:
    tiers:
    - {name: gold, weight: 2, fairnessIds: ["gold-*"]}
    - {name: basic, weight: 1, fairnessIds: ["basic-*"]}
schedulingProfiles:
- name: default
  plugins: [{pluginRef: queue-scorer}]
saturationDetector: {pluginRef: concurrency-detector}
flowControl:
  defaultPriorityBand: {fairnessPolicyRef: fair}
"""

DRIFT_TENANTS = {"basic-big": 6.0, "basic-mid": 3.0, "basic-small-1": 1.0, "basic-small-2": 1.0}


async def _one(session: aiohttp.ClientSession, port: int, tenant: str, max_tokens: int,
               log: list[dict[str, Any]]) -> None:
    body = {"model": "sim-model", "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": f"{tenant} asks {random.random()} " * 30}]}
    status = 0
    try:
        async with session.post(f"http://{HOST}:{port}/v1/chat/completions", data=orjson.dumps(body),
                                headers={"content-type": "application/json",
                                         "x-gateway-inference-fairness-id": tenant}) as r:
            async for _chunk in r.content.iter_any():
                pass
            status = r.status
    except (TimeoutError, aiohttp.ClientError):
        status = 0
    log.append({"tenant": tenant, "status": status, "end": time.perf_counter()})


async def _drive(port: int, rates: dict[str, float], duration: float, max_tokens: int, seed: int,
                 log: list[dict[str, Any]], start_after: float = 0.0) -> None:
    """Open-loop Poisson arrivals per tenant for ``duration`` s, after ``start_after`` s."""
    rng = random.Random(seed)
    tasks: list[asyncio.Task[None]] = []
    total = sum(rates.values())
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600),
                                     connector=aiohttp.TCPConnector(limit=0)) as s:
        await asyncio.sleep(start_after)
        end = time.perf_counter() + duration
        while time.perf_counter() < end:
            await asyncio.sleep(rng.expovariate(total))
            tenant = rng.choices(list(rates), weights=list(rates.values()))[0]
            tasks.append(asyncio.ensure_future(_one(s, port, tenant, max_tokens, log)))
        await asyncio.gather(*tasks)


def served_tokens(metrics_ports: list[int]) -> dict[str, float]:
    """Tokens served per fairness id, summed over the replicas' /metrics."""
    out: dict[str, float] = {}
    for port in metrics_ports:
        text = urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10).read().decode()
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == "epp_flow_control_tokens_served_total":
                    fid = s.labels["fairness_id"]
                    out[fid] = out.get(fid, 0.0) + s.value
    return out


def _topology(topo: Topology, args: argparse.Namespace, replicas: int) -> tuple[int, list[int]]:
    base = free_port_block(args.pods)
    topo.start_sim(args.pods, base, kv_events_base_port=-1, extra=["--max-num-seqs", str(args.max_num_seqs)])
    pool = [(HOST, base + i) for i in range(args.pods)]
    conc = max(1, round(args.max_num_seqs / replicas))
    pickers, metrics = [], []
    for i in range(replicas):
        g, h, m = (free_port_block(3) + j for j in range(3))
        topo.start_picker(pool, g, h, m, config_text=CONFIG % {"conc": conc}, name=f"picker{i}")
        pickers.append((HOST, g))
        metrics.append(m)
    listen = free_port_block(2)
    topo.start_envoy(EnvoySpec(pool=pool, pickers=pickers, listen=(HOST, listen), admin=(HOST, listen + 1)))
    return listen, metrics


def drift(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    shares: dict[int, dict[str, float]] = {}
    for n in (1, 2, 4):
        with Topology(workdir / f"drift-{n}") as topo:
            listen, _metrics = _topology(topo, args, n)
            log: list[dict[str, Any]] = []
            rates = {t: args.rate * w / sum(DRIFT_TENANTS.values()) for t, w in DRIFT_TENANTS.items()}
            t0 = time.perf_counter()
            asyncio.run(_drive(listen, rates, args.duration, args.max_tokens, args.seed, log))
        # requests are alike, so served tokens ∝ requests finished while every tenant was
        # offering load (the backlog drained afterwards says nothing about sharing)
        window = [r for r in log if t0 + args.warmup <= r["end"] < t0 + args.duration and r["status"] == 200]
        total = len(window) or 1
        shares[n] = {t: sum(1 for r in window if r["tenant"] == t) / total for t in DRIFT_TENANTS}
        print(f"{n} replica(s): shares", {t: round(v, 3) for t, v in shares[n].items()}, "finished in window",
              len(window), "errors", sum(1 for r in log if r["status"] != 200), "/", len(log), flush=True)
    out: dict[str, Any] = {"shares": shares}
    for n in (2, 4):
        out[f"drift_{n}"] = round(max(abs(shares[n][t] - shares[1][t]) / max(shares[1][t], 1e-9)
                                      for t in DRIFT_TENANTS), 3)
    return out


def converge(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    weights = {"gold-a": 2.0, "basic-b": 1.0, "basic-c": 1.0}
    with Topology(workdir / "converge") as topo:
        listen, _metrics = _topology(topo, args, 1)
        log: list[dict[str, Any]] = []
        t0 = time.perf_counter()
        alone, together = args.alone, args.duration

        async def run() -> None:
            await asyncio.gather(
                _drive(listen, {"gold-a": args.rate}, alone + together, args.max_tokens, args.seed, log),
                _drive(listen, {"basic-b": args.rate / 2, "basic-c": args.rate / 2}, together, args.max_tokens,
                       args.seed + 1, log, start_after=alone),
            )

        asyncio.run(run())
    arrival = t0 + alone
    window = 2.0
    target = {t: w / sum(weights.values()) for t, w in weights.items()}
    series = []
    k = 0
    while arrival + (k + 1) * window <= t0 + alone + together:
        lo, hi = arrival + k * window, arrival + (k + 1) * window
        done = [r for r in log if lo <= r["end"] < hi and r["status"] == 200]
        n = len(done) or 1
        series.append({t: sum(1 for r in done if r["tenant"] == t) / n for t in weights})
        k += 1
    before = [r for r in log if t0 + 2.0 <= r["end"] < arrival and r["status"] == 200]
    alone_share = sum(1 for r in before if r["tenant"] == "gold-a") / max(1, len(before))
    tiers = {"gold": ["gold-a"], "basic": ["basic-b", "basic-c"]}
    return {"alone_share": round(alone_share, 3), "window_s": window, "target": target,
            "windows": [{t: round(v, 3) for t, v in s.items()} for s in series],
            "converged_after_s": convergence(series, target, tiers, window)}


def convergence(series: list[dict[str, float]], target: dict[str, float], tiers: dict[str, list[str]],
                window: float, roll: int = 2, tolerance: float = 0.1) -> float | None:
    """Seconds after the arrival until every tier's share of finished requests, averaged over
    ``roll`` windows, stays within ``tolerance`` (relative) of its weight's share. Tiers, not
    single tenants: with ~10 requests per window a tenant's share moves in steps of 0.1, so
    per-tenant shares are reported in the windows but not used for the verdict."""
    def tier_shares(s: dict[str, float]) -> dict[str, float]:
        return {k: sum(s[t] for t in ts) for k, ts in tiers.items()}
    goal = tier_shares(target)
    rolled = [
        {k: sum(tier_shares(s)[k] for s in series[i:i + roll]) / roll for k in tiers}
        for i in range(len(series) - roll + 1)
    ]
    for i in range(len(rolled)):
        if all(all(abs(r[k] - goal[k]) <= tolerance * goal[k] for k in tiers) for r in rolled[i:]):
            return (i + roll) * window
    return None

PARTS = ("drift", "converge")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=40.0, help="seconds of contention per run")
    p.add_argument("--warmup", type=float, default=8.0, help="drift: seconds before shares are counted")
    p.add_argument("--alone", type=float, default=10.0, help="converge: seconds the first tenant is alone")
    p.add_argument("--rate", type=float, default=24.0, help="offered requests/s (the pool serves about 13)")
    p.add_argument("--pods", type=int, default=2)
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--only", choices=PARTS, action="append")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    import tempfile

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="epp-fair-") as tmp:
        for part in args.only or PARTS:
            out[part] = {"drift": drift, "converge": converge}[part](args, Path(tmp))
            print(part, json.dumps({k: v for k, v in out[part].items() if k != "windows"}), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
