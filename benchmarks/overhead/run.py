"""Picker overhead through a real Envoy: (a) Envoy direct round robin, (b) Envoy + a do-nothing
ext_proc in the same processing mode, (c) Envoy + epp — same backends, same load, one run.

Two measurements per scenario, both bounded in time, loopback only:
* throughput: closed loop, ``--concurrency`` clients for ``--seconds``;
* latency at a fixed offered rate (``--rate``, open loop, constant arrivals).

Usage: python -m benchmarks.overhead.run [--seconds 10] [--rate 300] [--concurrency 32]
Goal (issue): (c) ≥ 90 % of (b)'s throughput and ≤ 1 ms added p50 at 300 req/s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp
import orjson

from epp.envoy.bootstrap import EnvoySpec
from epp.local.topology import HOST, ManagedProcess, Topology, free_port_block, grpc_serving, http_ok, tcp_open

BODY = orjson.dumps({"model": "sim-model", "prompt": "The city council asks: " + "word " * 40, "max_tokens": 1})


@dataclass(slots=True)
class Result:
    scenario: str
    mode: str
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    picker_cpu_us_per_req: float | None = None
    envoy_cpu_us_per_req: float | None = None


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def _timed_post(s: aiohttp.ClientSession, url: str, lat: list[float]) -> bool:
    """One request; its latency appended to ``lat`` on success. False on any failure."""
    t0 = time.perf_counter()
    try:
        async with s.post(url, data=BODY, headers={"content-type": "application/json"}) as r:
            await r.read()
            if r.status != 200:
                return False
    except aiohttp.ClientError:
        return False
    lat.append(time.perf_counter() - t0)
    return True


async def closed_loop(url: str, concurrency: int, seconds: float) -> tuple[list[float], int]:
    lat: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn) as s:

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                if not await _timed_post(s, url, lat):
                    errors += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return lat, errors


async def open_loop(url: str, rate: float, seconds: float) -> tuple[list[float], int]:
    lat: list[float] = []
    errors = 0
    n = int(rate * seconds)
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as s:

        async def one() -> None:
            nonlocal errors
            if not await _timed_post(s, url, lat):
                errors += 1

        start = time.perf_counter()
        tasks = []
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    return lat, errors


def _measure(name: str, port: int, args: argparse.Namespace, picker: ManagedProcess | None,
             envoy: ManagedProcess) -> list[Result]:
    url = f"http://{HOST}:{port}/v1/completions"
    asyncio.run(closed_loop(url, 4, 1.0))  # warm up connections and caches
    out = []
    for mode in ("throughput", "fixed-rate"):
        cpu0 = (_cpu_seconds(picker.pid) if picker else 0.0, _cpu_seconds(envoy.pid))
        t0 = time.perf_counter()
        if mode == "throughput":
            lat, errors = asyncio.run(closed_loop(url, args.concurrency, args.seconds))
        else:
            lat, errors = asyncio.run(open_loop(url, args.rate, args.seconds))
        elapsed = time.perf_counter() - t0
        cpu1 = (_cpu_seconds(picker.pid) if picker else 0.0, _cpu_seconds(envoy.pid))
        n = max(1, len(lat))
        res = Result(
            name, mode, len(lat) / elapsed, _pct(lat, 0.5) * 1e3, _pct(lat, 0.99) * 1e3, errors,
            (cpu1[0] - cpu0[0]) / n * 1e6 if picker else None, (cpu1[1] - cpu0[1]) / n * 1e6,
        )
        print(f"  {name:<24} {mode:<11} {res.rps:8.0f} req/s  p50 {res.p50_ms:6.2f} ms  p99 {res.p99_ms:7.2f} ms"
              f"  errors {errors}", flush=True)
        out.append(res)
    return out


def run(args: argparse.Namespace) -> list[Result]:
    here = Path(__file__).parent
    workdir = Path(tempfile.mkdtemp(prefix="epp-overhead-"))
    results: list[Result] = []
    with Topology(workdir) as topo:
        base = free_port_block(4)
        ports = [base + i for i in range(4)]
        pool = [(HOST, p) for p in ports]
        topo.start("backend", [sys.executable, str(here / "backend.py"), *map(str, ports)],
                   ready=lambda: all(http_ok(f"http://{HOST}:{p}/health") for p in ports))
        scenarios: list[tuple[str, str]] = [("a-envoy-direct", "direct"), ("b-envoy+noop-extproc", "noop"),
                                            ("c-envoy+epp", "epp")]
        if args.tls:
            scenarios.append(("c'-envoy+epp (TLS)", "epp-tls"))
        for name, kind in scenarios:
            listen = free_port_block(2)
            picker: ManagedProcess | None = None
            if kind == "direct":
                spec = EnvoySpec(pool=pool, listen=(HOST, listen), admin=(HOST, listen + 1), routing="direct")
            else:
                gp = free_port_block(3)
                if kind == "noop":
                    picker = topo.start(
                        "noop", [sys.executable, str(here / "noop_extproc.py"), "--port", str(gp),
                                 "--endpoints", ",".join(f"{h}:{p}" for h, p in pool)],
                        ready=lambda gp=gp: tcp_open(HOST, gp))  # type: ignore[misc]
                else:
                    picker = topo.start_picker(pool, gp, gp + 1, gp + 2, secure=kind == "epp-tls",
                                               extra=("--log-format", "text"), name=kind)
                    if not grpc_serving(HOST, gp + 1):
                        raise RuntimeError("picker not ready")
                spec = EnvoySpec(pool=pool, pickers=[(HOST, gp)], listen=(HOST, listen), admin=(HOST, listen + 1),
                                 picker_tls=kind == "epp-tls")
            envoy = topo.start_envoy(spec, name=f"envoy-{kind}")
            results += _measure(name, listen, args, picker, envoy)
            envoy.stop()
            if picker:
                picker.stop()
    return results


def table(results: list[Result]) -> str:
    rows = ["| scenario | load | req/s | p50 ms | p99 ms | errors | picker CPU µs/req | Envoy CPU µs/req |",
            "|---|---|---|---|---|---|---|---|"]
    for r in results:
        pc = f"{r.picker_cpu_us_per_req:.0f}" if r.picker_cpu_us_per_req is not None else "–"
        ec = f"{r.envoy_cpu_us_per_req:.0f}" if r.envoy_cpu_us_per_req is not None else "–"
        rows.append(
            f"| {r.scenario} | {r.mode} | {r.rps:.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.errors} | {pc} | {ec} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=300.0)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--tls", action="store_true", help="also run epp with TLS on (its default)")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args(argv)
    results = run(args)
    print()
    print(table(results))
    by = {(r.scenario.split("-", 1)[0], r.mode): r for r in results}
    b_t, c_t = by[("b", "throughput")], by[("c", "throughput")]
    b_r, c_r = by[("b", "fixed-rate")], by[("c", "fixed-rate")]
    print(f"\n(c)/(b) throughput: {c_t.rps / b_t.rps:.0%} (goal ≥ 90%); added p50 at {args.rate:.0f} req/s: "
          f"{c_r.p50_ms - b_r.p50_ms:+.2f} ms (goal ≤ 1 ms)")
    if args.json:
        Path(args.json).write_bytes(orjson.dumps([asdict(r) for r in results], option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
