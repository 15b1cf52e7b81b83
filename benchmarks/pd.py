"""P/D disaggregation benchmark: the same simulated pods served aggregated, disaggregated by
epp (disagg handler + `epp pd-sidecar`), and disaggregated by vllm-router's P/D mode.

Workload (prefill-heavy, mixed): open-loop Poisson arrivals; a fraction of requests are long
unique documents (``--long-tokens`` prompt tokens, few output tokens: summarisation/RAG) and
the rest are short chats with long answers (their inter-token latency is what long prefills
running on the same pod hurt). Every request streams; the client measures TTFT (first token)
and ITL (gaps between later tokens).

    .venv/bin/python -m benchmarks.pd --pods 4 --prefill-pods 2 --rate 4 --duration 40

Modes: ``agg`` (N pods, epp default config), ``epp-pd`` (P prefill pods + N-P decode pods
behind sidecars, epp P/D config), ``router-pd`` (the same P and N-P pods behind
``vllm-router --vllm-pd-disaggregation``, which disaggregates every request).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from epp.envoy.bootstrap import EnvoySpec
from epp.local.pd import pd_picker_config, pd_pool_file
from epp.local.topology import HOST, Topology, free_port_block, http_ok

MODEL = "sim-model"
WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()


@dataclass(slots=True)
class Item:
    at: float
    kind: str  # "long" | "short"
    body: dict[str, Any]


@dataclass(slots=True)
class Result:
    kind: str
    ok: bool
    ttft: float = 0.0
    itls: list[float] = field(default_factory=list)


def _text(rng: random.Random, tokens: int) -> str:
    # ~4 characters per word+space ≈ 1 token per word in the simulator's tokenizer is not
    # guaranteed; size by characters (4 chars/token) like the picker's estimate.
    out: list[str] = []
    n = 0
    while n < tokens * 4:
        w = rng.choice(WORDS)
        out.append(w)
        n += len(w) + 1
    return " ".join(out)


def workload(args: argparse.Namespace) -> list[Item]:
    rng = random.Random(args.seed)
    items: list[Item] = []
    t = 0.0
    i = 0
    while True:
        t += rng.expovariate(args.rate)
        if t >= args.duration:
            return items
        i += 1
        if rng.random() < args.long_fraction:
            prompt = f"Document {i}: " + _text(rng, args.long_tokens) + "\nSummarise the document."
            body = {"model": MODEL, "prompt": prompt, "max_tokens": args.long_output}
            kind = "long"
        else:
            prompt = "You are a helpful assistant. " + _text(rng, args.short_tokens)
            body = {"model": MODEL, "prompt": prompt, "max_tokens": args.short_output}
            kind = "short"
        body.update(stream=True, stream_options={"include_usage": True}, ignore_eos=True)
        items.append(Item(t, kind, body))


async def _one(session: aiohttp.ClientSession, url: str, item: Item) -> Result:
    res = Result(item.kind, False)
    t0 = time.perf_counter()
    last = 0.0
    try:
        async with session.post(url, data=orjson.dumps(item.body),
                                headers={"content-type": "application/json"}) as r:
            if r.status != 200:
                await r.read()
                return res
            buf = b""
            async for chunk in r.content.iter_any():
                now = time.perf_counter()
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if not line.startswith(b"data: {"):
                        continue
                    doc = orjson.loads(line[6:])
                    if not doc.get("choices") or not doc["choices"][0].get("text"):
                        continue
                    if last == 0.0:
                        res.ttft = now - t0
                    else:
                        res.itls.append(now - last)
                    last = now
        res.ok = last > 0.0
    except (aiohttp.ClientError, TimeoutError):
        pass
    return res


async def run_load(url: str, items: list[Item]) -> list[Result]:
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as s:
        start = time.perf_counter()

        async def fire(item: Item) -> Result:
            delay = item.at - (time.perf_counter() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            return await _one(s, url, item)

        return list(await asyncio.gather(*(fire(it) for it in items)))


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, int(p / 100 * len(v)))]


# ------------------------------------------------------------------ topologies
def _envoy(topo: Topology, pool: list[tuple[str, int]], grpc: int) -> str:
    listen = free_port_block(2)
    topo.start_envoy(EnvoySpec(pool=pool, pickers=[(HOST, grpc)], listen=(HOST, listen), admin=(HOST, listen + 1)))
    return f"http://{HOST}:{listen}/v1/completions"


def _picker(topo: Topology, pool: list[tuple[str, int]] | str, config: str | None) -> int:
    grpc, health, metrics = (free_port_block(3) + i for i in range(3))
    topo.start_picker(pool, grpc, health, metrics, config_text=config, extra=["--log-format", "json"])
    return grpc


def start_agg(topo: Topology, args: argparse.Namespace) -> str:
    base = free_port_block(args.pods)
    topo.start_sim(args.pods, base, -1, extra=args.sim_args)
    pool = [(HOST, base + i) for i in range(args.pods)]
    return _envoy(topo, pool, _picker(topo, pool, None))


def _pd_sims(topo: Topology, args: argparse.Namespace) -> tuple[list[int], list[int]]:
    n_p, n_d = args.prefill_pods, args.pods - args.prefill_pods
    base = free_port_block(args.pods)
    topo.start_sim(n_p, base, -1, extra=["--pod-name-prefix", "prefill-", *args.sim_args], name="sim-prefill")
    topo.start_sim(n_d, base + n_p, -1, extra=["--pod-name-prefix", "decode-", *args.sim_args], name="sim-decode")
    return [base + i for i in range(n_p)], [base + n_p + i for i in range(n_d)]


def start_epp_pd(topo: Topology, args: argparse.Namespace) -> str:
    prefill, engines = _pd_sims(topo, args)
    side = free_port_block(len(engines))
    sidecars = [side + i for i in range(len(engines))]
    pool_path = topo.workdir / "pd-pool.yaml"
    pool_path.write_text(pd_pool_file([(HOST, p) for p in prefill],
                                      [(HOST, s, e) for s, e in zip(sidecars, engines, strict=True)]))
    for i, (s, e) in enumerate(zip(sidecars, engines, strict=True)):
        topo.start_sidecar(s, e, extra=["--allow-pool-file", str(pool_path), "--log-level", "warning"],
                           name=f"sidecar{i}")
    config = pd_picker_config(args.non_cached_tokens, args.prompt_tokens)
    return _envoy(topo, [(HOST, s) for s in sidecars], _picker(topo, str(pool_path), config))


def start_router_pd(topo: Topology, args: argparse.Namespace) -> str:
    binary = shutil.which("vllm-router") or str(Path(sys.executable).parent / "vllm-router")
    prefill, engines = _pd_sims(topo, args)
    port, prom = free_port_block(2), None
    prom = port + 1
    argv = [binary, "--host", HOST, "--port", str(port), "--prometheus-port", str(prom),
            "--vllm-pd-disaggregation", "--log-level", "warning"]
    for p in prefill:
        argv += ["--prefill", f"http://{HOST}:{p}"]
    for e in engines:
        argv += ["--decode", f"http://{HOST}:{e}"]
    topo.start("vllm-router", argv, ready=lambda: http_ok(f"http://{HOST}:{port}/health"), timeout=60)
    return f"http://{HOST}:{port}/v1/completions"


MODES = {"agg": start_agg, "epp-pd": start_epp_pd, "router-pd": start_router_pd}


def summarise(mode: str, results: list[Result], wall: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    row: dict[str, Any] = {"mode": mode, "requests": len(results), "ok": len(ok)}
    for kind in ("all", "short", "long"):
        sel = [r for r in ok if kind == "all" or r.kind == kind]
        row[f"ttft_p90_{kind}"] = pct([r.ttft for r in sel], 90) * 1000
        row[f"itl_p90_{kind}"] = pct([x for r in sel for x in r.itls], 90) * 1000
        # per-request mean inter-token latency (vLLM's TPOT): a prefill stall counts once per
        # gap in ITL but raises every affected request's mean
        row[f"tpot_p90_{kind}"] = pct([sum(r.itls) / len(r.itls) for r in sel if r.itls], 90) * 1000
    row["itl_p99_short"] = pct([x for r in ok if r.kind == "short" for x in r.itls], 99) * 1000
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", default="agg,epp-pd,router-pd")
    p.add_argument("--pods", type=int, default=4, help="simulated pods in every mode")
    p.add_argument("--prefill-pods", type=int, default=2, help="of --pods, prefill pods in the P/D modes")
    p.add_argument("--rate", type=float, default=4.0, help="requests per second (Poisson)")
    p.add_argument("--duration", type=float, default=40.0, help="seconds of arrivals")
    p.add_argument("--long-fraction", type=float, default=0.3)
    p.add_argument("--long-tokens", type=int, default=6000)
    p.add_argument("--long-output", type=int, default=16)
    p.add_argument("--short-tokens", type=int, default=150)
    p.add_argument("--short-output", type=int, default=200)
    p.add_argument("--non-cached-tokens", type=int, default=1024, help="epp-pd decider threshold")
    p.add_argument("--prompt-tokens", type=int, default=1024, help="epp-pd decider minimum prompt")
    p.add_argument("--sim-args", type=lambda s: s.split(), default=[], help="extra `epp sim` flags (one string)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    items = workload(args)
    n_long = sum(1 for i in items if i.kind == "long")
    print(f"workload: {len(items)} requests over {args.duration:.0f}s ({n_long} long × {args.long_tokens} tokens, "
          f"{len(items) - n_long} short × {args.short_tokens} tokens → {args.short_output} out)", file=sys.stderr)
    rows = []
    for mode in args.modes.split(","):
        workdir = Path(args.workdir or tempfile.mkdtemp(prefix="pd-bench-")) / mode
        with Topology(workdir) as topo:
            url = MODES[mode](topo, args)
            t0 = time.perf_counter()
            results = asyncio.run(run_load(url, items))
            rows.append(summarise(mode, results, time.perf_counter() - t0))
            print(f"{mode}: done ({rows[-1]['ok']}/{len(items)} ok); logs in {workdir}", file=sys.stderr)
    print("| mode | ok | TTFT p90 ms (all / short / long) | ITL p90 ms (all / short) | ITL p99 short ms "
          "| TPOT p90 ms (all / short) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['ok']}/{r['requests']} | {r['ttft_p90_all']:.0f} / {r['ttft_p90_short']:.0f} / "
              f"{r['ttft_p90_long']:.0f} | {r['itl_p90_all']:.1f} / {r['itl_p90_short']:.1f} | "
              f"{r['itl_p99_short']:.0f} | {r['tpot_p90_all']:.1f} / {r['tpot_p90_short']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
