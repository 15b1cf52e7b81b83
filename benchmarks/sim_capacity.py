"""How many simulated pods and req/s one ``epp sim`` process sustains on this machine.

Starts ``epp sim`` as a subprocess (its own core budget, uvloop), drives it from this process
with an open-loop Poisson load (bounded in-flight) of streaming completions — ~200-token prompts
(a shared 100-token system prefix + a unique tail), 32 output tokens, ``include_usage`` — spread
round-robin over the pods, while scraping every pod's ``/metrics`` every 50 ms like the picker.
The simulator's CPU time is read from /proc before and after the measurement window.

    .venv/bin/python -m benchmarks.sim_capacity --replicas 8 --rate 200 --duration 15

Prints one JSON line per run (and a Markdown table row with --markdown).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import aiohttp
import orjson

_WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
          "upsilon phi chi psi omega river mountain cloud stone forest ocean valley desert island harbor").split()


@dataclass(slots=True)
class Result:
    sent: int = 0
    ok: int = 0
    errors: int = 0
    dropped: int = 0
    ttft: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)
    scrapes: int = 0


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(parts[11]) + int(parts[12])) / ticks  # utime + stime


def _prompt(rng: random.Random, prefix: str) -> str:
    return prefix + " ".join(rng.choice(_WORDS) for _ in range(100))


async def _one(s: aiohttp.ClientSession, url: str, body: bytes, res: Result) -> None:
    t0 = time.perf_counter()
    try:
        async with s.post(url, data=body, headers={"content-type": "application/json"}) as r:
            if r.status != 200:
                res.errors += 1
                await r.read()
                return
            first = True
            async for _ in r.content.iter_any():
                if first:
                    res.ttft.append(time.perf_counter() - t0)
                    first = False
        res.e2e.append(time.perf_counter() - t0)
        res.ok += 1
    except aiohttp.ClientError:
        res.errors += 1


async def _scraper(s: aiohttp.ClientSession, urls: list[str], interval: float, res: Result,
                   stop: asyncio.Event) -> None:
    while not stop.is_set():
        t = time.perf_counter()
        for u in urls:
            async with s.get(u) as r:
                await r.read()
            res.scrapes += 1
        await asyncio.sleep(max(0.0, interval - (time.perf_counter() - t)))


async def _drive(args: argparse.Namespace, pod_urls: list[str], pid: int) -> dict[str, object]:
    rng = random.Random(1)
    prefix = " ".join(rng.choice(_WORDS) for _ in range(100)) + " "
    res = Result()
    conn = aiohttp.TCPConnector(limit=0, limit_per_host=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=60)) as s:
        stop = asyncio.Event()
        scr = asyncio.create_task(_scraper(s, [u + "/metrics" for u in pod_urls], args.scrape_interval, res,
                                           stop)) if args.scrape_interval > 0 else None
        await asyncio.sleep(0.5)
        inflight: set[asyncio.Task[None]] = set()
        cpu0, t0, own0 = _cpu_seconds(pid), time.perf_counter(), time.process_time()
        next_at = t0
        i = 0
        while time.perf_counter() - t0 < args.duration:
            next_at += rng.expovariate(args.rate)
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            if len(inflight) >= args.max_inflight:
                res.dropped += 1
                continue
            body = orjson.dumps({"model": "sim-model", "prompt": _prompt(rng, prefix), "max_tokens": args.output_tokens,
                                 "stream": True, "stream_options": {"include_usage": True}})
            t = asyncio.create_task(_one(s, pod_urls[i % len(pod_urls)] + "/v1/completions", body, res))
            i += 1
            res.sent += 1
            inflight.add(t)
            t.add_done_callback(inflight.discard)
        if inflight:
            await asyncio.wait(inflight, timeout=60)
        elapsed = time.perf_counter() - t0
        cpu = _cpu_seconds(pid) - cpu0
        own = time.process_time() - own0
        stop.set()
        if scr is not None:
            await scr
        server_ttft = await _server_mean_ttft(s, pod_urls)
    q = statistics.quantiles(res.ttft, n=100) if len(res.ttft) > 2 else [0.0] * 99
    return {
        "replicas": args.replicas, "target_rps": args.rate, "achieved_rps": round(res.ok / elapsed, 1),
        "ok": res.ok, "errors": res.errors, "dropped": res.dropped,
        "sim_cpu_pct_of_core": round(100 * cpu / elapsed, 1),
        "sim_cpu_ms_per_req": round(1000 * cpu / max(res.ok, 1), 3),
        "ttft_p50_ms": round(1000 * q[49], 1), "ttft_p99_ms": round(1000 * q[98], 1),
        "e2e_p50_ms": round(1000 * statistics.median(res.e2e), 1) if res.e2e else 0.0,
        "scrapes_per_s": round(res.scrapes / elapsed, 1),
        "server_ttft_mean_ms": round(1000 * server_ttft, 1),
        "client_cpu_pct_of_core": round(100 * own / elapsed, 1),
    }


async def _server_mean_ttft(s: aiohttp.ClientSession, urls: list[str]) -> float:
    """Mean TTFT as the pods measured it (vllm:time_to_first_token_seconds sum / count)."""
    total = count = 0.0
    for u in urls:
        async with s.get(u + "/metrics") as r:
            for line in (await r.text()).splitlines():
                if line.startswith("vllm:time_to_first_token_seconds_sum"):
                    total += float(line.rsplit(" ", 1)[1])
                elif line.startswith("vllm:time_to_first_token_seconds_count"):
                    count += float(line.rsplit(" ", 1)[1])
    return total / count if count else 0.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--replicas", type=int, default=8)
    p.add_argument("--rate", type=float, default=200.0, help="target requests per second (Poisson)")
    p.add_argument("--duration", type=float, default=15.0, help="seconds of load")
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--max-inflight", type=int, default=2000)
    p.add_argument("--scrape-interval", type=float, default=0.05, help="/metrics scrape period per pod (0=off)")
    p.add_argument("--port", type=int, default=18100)
    p.add_argument("--time-scale", type=float, default=1.0)
    p.add_argument("--sim-args", default="", help="extra 'epp sim' flags, e.g. '--max-num-seqs 256'")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    cmd = [sys.executable, "-m", "epp.cli", "sim", "--replicas", str(args.replicas), "--port", str(args.port),
           "--kv-events-port", "0", "--time-scale", str(args.time_scale), *shlex.split(args.sim_args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        urls = []
        for _ in range(args.replicas):
            line = proc.stdout.readline()
            urls.append(line.split(" ready on ")[1].split()[0])
        try:
            import uvloop
            out = uvloop.run(_drive(args, urls, proc.pid))
        except ImportError:
            out = asyncio.run(_drive(args, urls, proc.pid))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    print(orjson.dumps(out).decode())
    if args.markdown:
        print("| {replicas} | {target_rps} | {achieved_rps} | {sim_cpu_pct_of_core} | {sim_cpu_ms_per_req} | "
              "{ttft_p50_ms} | {ttft_p99_ms} | {e2e_p50_ms} | {scrapes_per_s} | {errors} |".format(**out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
