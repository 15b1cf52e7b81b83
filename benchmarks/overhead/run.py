"""Picker overhead through a real Envoy, per request and per streamed token.

Scenarios (same backends, same load, one run, processes kept up side by side):
* ``direct``: Envoy alone, round robin (what Envoy costs without any ext_proc);
* ``noop``: Envoy + a do-nothing ext_proc with epp's message pattern that scrapes the pods
  like epp (``noop_extproc.py``);
* ``epp`` (and ``epp-<mode>`` for each ``--response-processing`` mode, ``epp-w2`` for two
  workers, ``epp-tls``): Envoy + ``epp serve`` with the default config.

Measurements, all bounded in time, loopback only:
* **CPU per request** for a non-streamed answer (length 0) and streamed answers of
  ``--lengths`` tokens (one SSE event per token, each its own body chunk): a fixed number of
  requests at ``--cpu-concurrency``; utime+stime of the picker (its whole process tree) and of
  Envoy from /proc before and after, minus what each process burns idle over the same time
  (metric scraping, timers: measured just before), divided by the requests; and the ext_proc
  messages per request from Envoy's own counters.
* **throughput**: closed loop, ``--concurrency`` clients, non-streamed, ``--seconds``;
  **latency** at ``--rate`` req/s (open loop).

The machine is shared (other engineers' runs): every point is repeated ``--repeat`` times with
the scenarios interleaved, and ratios are taken within one repetition, then the median.

Usage: python -m benchmarks.overhead.run [--repeat 3] [--lengths 0 16 256 1024] [--scenarios ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
import orjson

from epp.envoy.bootstrap import EnvoySpec
from epp.local.topology import (
    HOST,
    ManagedProcess,
    Topology,
    ext_proc_messages,
    free_port_block,
    grpc_serving,
    http_ok,
    tcp_open,
)

PROMPT = "The city council asks: " + "word " * 40


def body(tokens: int) -> bytes:
    """0 = a non-streamed 1-token completion; n > 0 = a stream of n tokens."""
    if tokens <= 0:
        return orjson.dumps({"model": "sim-model", "prompt": PROMPT, "max_tokens": 1})
    return orjson.dumps({"model": "sim-model", "prompt": PROMPT, "max_tokens": tokens, "stream": True})


@dataclass(slots=True)
class Scenario:
    name: str
    kind: str  # direct | noop | epp
    #: EnvoySpec.response_processing / the picker's --response-processing (None: defaults)
    response_processing: str | None = None
    picker_args: tuple[str, ...] = ()
    tls: bool = False
    #: run epp from this source tree (``--before-tree``: the code before a change)
    tree: str | None = None


#: what ``--scenarios`` may name
KNOWN: dict[str, Scenario] = {
    "direct": Scenario("direct", "direct"),
    "noop": Scenario("noop", "noop", response_processing="full"),
    "noop-none": Scenario("noop-none", "noop", response_processing="none"),
    # epp auto's message pattern: BUFFERED request, the body of JSON answers asked for
    "noop-auto": Scenario("noop-auto", "noop", response_processing="auto", picker_args=("--ask-json-body",)),
    "epp": Scenario("epp", "epp"),
    "epp-full": Scenario("epp-full", "epp", response_processing="full"),
    "epp-auto": Scenario("epp-auto", "epp", response_processing="auto"),
    "epp-none": Scenario("epp-none", "epp", response_processing="none"),
    "epp-tls": Scenario("epp-tls", "epp", tls=True),
    "epp-w2": Scenario("epp-w2", "epp", picker_args=("--workers", "2")),
    "epp-full-w2": Scenario("epp-full-w2", "epp", response_processing="full", picker_args=("--workers", "2")),
    # epp from --before-tree, with the Envoy config it shipped with (FULL_DUPLEX both ways)
    "epp-before": Scenario("epp-before", "epp", response_processing="full"),
}


@dataclass(slots=True)
class Running:
    scenario: Scenario
    listen: int
    admin: int
    envoy: ManagedProcess
    picker: ManagedProcess | None
    idle: dict[str, float] = field(default_factory=dict)  # CPU seconds per second, idle


@dataclass(slots=True)
class CpuPoint:
    scenario: str
    tokens: int
    rep: int
    requests: int
    errors: int
    seconds: float
    picker_us: float | None  # net of idle
    envoy_us: float
    picker_gross_us: float | None
    envoy_gross_us: float
    msgs_per_req: float | None


@dataclass(slots=True)
class LoadPoint:
    scenario: str
    mode: str
    rep: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


# ---------------------------------------------------------------------------- /proc
def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            text = Path(f"/proc/{pid}/task/{tid}/children").read_text()
            out += [int(c) for c in text.split()]
    except OSError:
        pass
    return out


def cpu_seconds(pid: int) -> float:
    """utime+stime of ``pid`` and all its descendants (a picker with worker processes)."""
    total = 0.0
    stack = [pid]
    tick = os.sysconf("SC_CLK_TCK")
    while stack:
        p = stack.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
        stack += _children(p)
    return total


# ---------------------------------------------------------------------------- load
def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def _post(s: aiohttp.ClientSession, url: str, data: bytes, stream: bool, lat: list[float]) -> bool:
    t0 = time.perf_counter()
    try:
        async with s.post(url, data=data, headers={"content-type": "application/json"}) as r:
            got = await r.read()
            if r.status != 200 or (stream and not got.rstrip().endswith(b"[DONE]")):
                return False
    except aiohttp.ClientError:
        return False
    lat.append(time.perf_counter() - t0)
    return True


async def fixed_count(url: str, tokens: int, n: int, concurrency: int) -> tuple[int, int]:
    """``n`` requests, ``concurrency`` at a time; (ok, errors)."""
    data = body(tokens)
    lat: list[float] = []
    errors = 0
    left = n
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:

        async def worker() -> None:
            nonlocal left, errors
            while left > 0:
                left -= 1
                if not await _post(s, url, data, tokens > 0, lat):
                    errors += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(lat), errors


async def closed_loop(url: str, concurrency: int, seconds: float) -> tuple[list[float], int]:
    data = body(0)
    lat: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                if not await _post(s, url, data, False, lat):
                    errors += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return lat, errors


async def open_loop(url: str, rate: float, seconds: float) -> tuple[list[float], int]:
    data = body(0)
    lat: list[float] = []
    errors = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:

        async def one() -> None:
            nonlocal errors
            if not await _post(s, url, data, False, lat):
                errors += 1

        start = time.perf_counter()
        tasks = []
        for i in range(int(rate * seconds)):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    return lat, errors


# ---------------------------------------------------------------------------- scenarios
def start(topo: Topology, sc: Scenario, pool: list[tuple[str, int]], ports: list[int]) -> Running:
    """Envoy (+ picker) of one scenario on ``ports`` (5 consecutive: listen, admin, grpc,
    health, metrics)."""
    listen, admin, gp, hp, mp = ports
    picker: ManagedProcess | None = None
    rp = {"response_processing": sc.response_processing} if sc.response_processing else {}
    if sc.kind == "direct":
        spec = EnvoySpec(pool=pool, listen=(HOST, listen), admin=(HOST, admin), routing="direct")
    else:
        if sc.kind == "noop":
            here = Path(__file__).parent
            picker = topo.start(
                sc.name, [sys.executable, str(here / "noop_extproc.py"), "--port", str(gp),
                          "--endpoints", ",".join(f"{h}:{p}" for h, p in pool), *sc.picker_args],
                ready=lambda: tcp_open(HOST, gp))
        elif sc.tree is not None:  # an older epp: the same flags it had
            boot = f"import sys; sys.path.insert(0, {sc.tree!r}); from epp.cli import main; sys.exit(main())"
            picker = topo.start(
                sc.name, [sys.executable, "-c", boot, "serve", "--grpc-port", str(gp), "--grpc-health-port", str(hp),
                          "--metrics-port", str(mp), "--bind-address", HOST, f"--secure-serving={str(sc.tls).lower()}",
                          "--endpoints", ",".join(f"{h}:{p}" for h, p in pool), "--log-format", "text"],
                ready=lambda: grpc_serving(HOST, hp), timeout=60)
        else:
            extra = ["--log-format", "text", *sc.picker_args]
            if sc.response_processing:
                extra += ["--response-processing", sc.response_processing]
            picker = topo.start_picker(pool, gp, hp, mp, secure=sc.tls, extra=extra, name=sc.name, timeout=60)
            if not grpc_serving(HOST, hp):
                raise RuntimeError(f"{sc.name}: picker not ready")
        spec = EnvoySpec(pool=pool, pickers=[(HOST, gp)], listen=(HOST, listen), admin=(HOST, admin),
                         picker_tls=sc.tls, **rp)  # type: ignore[arg-type]
    envoy = topo.start_envoy(spec, name=f"envoy-{sc.name}")
    return Running(sc, listen, admin, envoy, picker)


def measure_idle(runs: list[Running], seconds: float) -> None:
    """CPU each process burns with no traffic (scraping, timers), per second."""
    before = {id(r): (cpu_seconds(r.picker.pid) if r.picker else 0.0, cpu_seconds(r.envoy.pid)) for r in runs}
    t0 = time.perf_counter()
    time.sleep(seconds)
    dt = time.perf_counter() - t0
    for r in runs:
        p0, e0 = before[id(r)]
        r.idle = {"picker": ((cpu_seconds(r.picker.pid) - p0) / dt) if r.picker else 0.0,
                  "envoy": (cpu_seconds(r.envoy.pid) - e0) / dt}


def cpu_point(r: Running, tokens: int, n: int, concurrency: int, rep: int) -> CpuPoint:
    url = f"http://{HOST}:{r.listen}/v1/completions"
    has_ext_proc = r.scenario.kind != "direct"
    m0 = ext_proc_messages(r.admin) if has_ext_proc else 0.0
    p0 = cpu_seconds(r.picker.pid) if r.picker else 0.0
    e0 = cpu_seconds(r.envoy.pid)
    t0 = time.perf_counter()
    ok, errors = asyncio.run(fixed_count(url, tokens, n, concurrency))
    dt = time.perf_counter() - t0
    p1 = cpu_seconds(r.picker.pid) if r.picker else 0.0
    e1 = cpu_seconds(r.envoy.pid)
    m1 = ext_proc_messages(r.admin) if has_ext_proc else 0.0
    k = max(1, ok)
    pg = (p1 - p0) / k * 1e6 if r.picker else None
    eg = (e1 - e0) / k * 1e6
    pn = (p1 - p0 - r.idle["picker"] * dt) / k * 1e6 if r.picker else None
    en = (e1 - e0 - r.idle["envoy"] * dt) / k * 1e6
    return CpuPoint(r.scenario.name, tokens, rep, ok, errors, dt, pn, en, pg, eg,
                    (m1 - m0) / k if has_ext_proc else None)


def load_points(r: Running, args: argparse.Namespace, rep: int) -> list[LoadPoint]:
    url = f"http://{HOST}:{r.listen}/v1/completions"
    out = []
    t0 = time.perf_counter()
    lat, errors = asyncio.run(closed_loop(url, args.concurrency, args.seconds))
    dt = time.perf_counter() - t0
    out.append(LoadPoint(r.scenario.name, "throughput", rep, len(lat) / dt, _pct(lat, 0.5) * 1e3,
                         _pct(lat, 0.99) * 1e3, errors))
    if args.rate > 0:
        t0 = time.perf_counter()
        lat, errors = asyncio.run(open_loop(url, args.rate, args.seconds))
        dt = time.perf_counter() - t0
        out.append(LoadPoint(r.scenario.name, "fixed-rate", rep, len(lat) / dt, _pct(lat, 0.5) * 1e3,
                             _pct(lat, 0.99) * 1e3, errors))
    return out


def requests_for(tokens: int, base: int) -> int:
    """Fewer requests for long streams (each takes ~tokens x interval)."""
    if tokens >= 1024:
        return max(8, base // 4)
    if tokens >= 256:
        return max(8, base // 2)
    return base


def run(args: argparse.Namespace) -> tuple[list[CpuPoint], list[LoadPoint]]:
    scenarios = [KNOWN[s] for s in args.scenarios]
    if "epp-before" in args.scenarios:
        if not args.before_tree:
            raise SystemExit("scenario epp-before needs --before-tree DIR (e.g. a `git archive` of the old commit)")
        scenarios = [Scenario(s.name, s.kind, s.response_processing, s.picker_args, s.tls, args.before_tree)
                     if s.name == "epp-before" else s for s in scenarios]
    workdir = Path(tempfile.mkdtemp(prefix="epp-overhead-"))
    cpu: list[CpuPoint] = []
    load: list[LoadPoint] = []
    with Topology(workdir) as topo:
        base = args.port_base or free_port_block(4 + 5 * len(scenarios))
        bports = [base + i for i in range(4)]
        pool = [(HOST, p) for p in bports]
        topo.start("backend", [sys.executable, str(Path(__file__).parent / "backend.py"), *map(str, bports),
                               "--token-interval", str(args.token_interval)],
                   ready=lambda: all(http_ok(f"http://{HOST}:{p}/health") for p in bports))
        runs = []
        for i, sc in enumerate(scenarios):
            ports = [base + 4 + 5 * i + j for j in range(5)]
            runs.append(start(topo, sc, pool, ports))
        for r in runs:  # warm up connections and caches
            asyncio.run(fixed_count(f"http://{HOST}:{r.listen}/v1/completions", 16, 20, 4))
        print(f"workdir {workdir}; scenarios {[s.name for s in scenarios]}", flush=True)
        for rep in range(args.repeat):
            measure_idle(runs, args.idle_seconds)
            for tokens in args.lengths:
                n = requests_for(tokens, args.requests)
                for r in runs:
                    pt = cpu_point(r, tokens, n, args.cpu_concurrency, rep)
                    cpu.append(pt)
                    print(f"  rep {rep} {r.scenario.name:<10} tokens {tokens:5d}: picker {_f(pt.picker_us):>8} us/req"
                          f" envoy {_f(pt.envoy_us):>8} us/req  msgs/req {_f(pt.msgs_per_req, 1):>6}"
                          f"  ({pt.requests} ok, {pt.errors} errors, {pt.seconds:.1f}s)", flush=True)
            if args.seconds > 0:
                for r in runs:
                    for lp in load_points(r, args, rep):
                        load.append(lp)
                        print(f"  rep {rep} {r.scenario.name:<10} {lp.mode:<10} {lp.rps:7.0f} req/s"
                              f"  p50 {lp.p50_ms:6.2f} ms  p99 {lp.p99_ms:7.2f} ms  errors {lp.errors}", flush=True)
    return cpu, load


# ---------------------------------------------------------------------------- report
def _f(v: float | None, digits: int = 0) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _median(vals: list[float | None]) -> float | None:
    v = [x for x in vals if x is not None]
    return statistics.median(v) if v else None


def cpu_table(cpu: list[CpuPoint], scenarios: list[str], lengths: list[int]) -> str:
    head = "| scenario | " + " | ".join(f"{'non-streamed' if t == 0 else f'{t} tokens'}" for t in lengths) + " |"
    rows = [
        "CPU µs per request, median of repetitions, net of idle (picker / Envoy; ext_proc messages per request):",
        "", head, "|---" * (len(lengths) + 1) + "|"]
    for s in scenarios:
        cells = []
        for t in lengths:
            pts = [p for p in cpu if p.scenario == s and p.tokens == t]
            cells.append(f"{_f(_median([p.picker_us for p in pts]))} / {_f(_median([p.envoy_us for p in pts]))}"
                         f" ({_f(_median([p.msgs_per_req for p in pts]), 1)})")
        rows.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def ratios(cpu: list[CpuPoint], scenarios: list[str], lengths: list[int], reps: int) -> str:
    """Per repetition, then the median: picker(256)/picker(16) and (Envoy+picker)/direct Envoy."""
    def at(s: str, t: int, rep: int) -> CpuPoint | None:
        for p in cpu:
            if p.scenario == s and p.tokens == t and p.rep == rep:
                return p
        return None

    out = []
    long_ = 256 if 256 in lengths else max(lengths)
    for s in scenarios:
        growth, vs_direct = [], []
        for rep in range(reps):
            a, b, d = at(s, 16, rep), at(s, long_, rep), at("direct", long_, rep)
            if a and b and a.picker_us and b.picker_us is not None:
                growth.append(b.picker_us / a.picker_us)
            if b and d and d.envoy_us > 0:
                vs_direct.append(((b.picker_us or 0.0) + b.envoy_us) / d.envoy_us)
        if growth or vs_direct:
            out.append(f"* {s}: picker CPU {long_} vs 16 tokens = {_f(_median(list(growth)), 2)}x (goal ≤ 1.3);"
                       f" (Envoy + picker) / Envoy alone at {long_} tokens = {_f(_median(list(vs_direct)), 2)}x"
                       " (goal ≤ 2)")
    return "\n".join(out)


def load_table(load: list[LoadPoint], scenarios: list[str]) -> str:
    rows = ["| scenario | load | req/s | p50 ms | p99 ms | errors |", "|---|---|---|---|---|---|"]
    for s in scenarios:
        for mode in ("throughput", "fixed-rate"):
            pts = [p for p in load if p.scenario == s and p.mode == mode]
            if pts:
                rows.append(f"| {s} | {mode} | {_f(_median([p.rps for p in pts]))} | "
                            f"{_f(_median([p.p50_ms for p in pts]), 2)} | {_f(_median([p.p99_ms for p in pts]), 2)} | "
                            f"{sum(p.errors for p in pts)} |")
    for s in scenarios:
        if s.startswith("epp"):
            # the do-nothing processor with the same message pattern: FULL_DUPLEX for full
            # (and the old picker), BUFFERED request / no response body for auto and none
            base = {"epp-before": "noop", "epp-full": "noop", "epp-full-w2": "noop", "epp-tls": "noop",
                    "epp-none": "noop-none"}.get(s, "noop-auto")
            noop = [p for p in load if p.scenario == base and p.mode == "throughput"]
            mine = [p for p in load if p.scenario == s and p.mode == "throughput"]
            rs = [m.rps / n.rps for m in mine for n in noop if n.rep == m.rep and n.rps > 0]
            if rs:
                rows.append(f"\n{s} / {base} throughput, median of repetitions: {_f(_median(list(rs)) * 100)} % "
                            "(goal ≥ 90 %)")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", nargs="+", default=["direct", "noop", "epp"], choices=sorted(KNOWN))
    ap.add_argument("--lengths", type=int, nargs="+", default=[0, 16, 256, 1024],
                    help="streamed tokens per response (0 = non-streamed)")
    ap.add_argument("--requests", type=int, default=120, help="requests per CPU point (fewer for long streams)")
    ap.add_argument("--cpu-concurrency", type=int, default=8)
    ap.add_argument("--token-interval", type=float, default=0.001, help="backend seconds between tokens")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--idle-seconds", type=float, default=2.0)
    ap.add_argument("--seconds", type=float, default=5.0, help="throughput / fixed-rate window (0 = skip)")
    ap.add_argument("--rate", type=float, default=300.0, help="fixed-rate load (0 = skip)")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--port-base", type=int, default=0,
                    help="first of 4 + 5 x scenarios consecutive ports (default: a random free block)")
    ap.add_argument("--before-tree", help="source tree of the epp that scenario epp-before runs")
    ap.add_argument("--json", help="write every point here")
    args = ap.parse_args(argv)
    cpu, load = run(args)
    print()
    print(cpu_table(cpu, args.scenarios, args.lengths))
    print()
    print(ratios(cpu, args.scenarios, args.lengths, args.repeat))
    if load:
        print()
        print(load_table(load, args.scenarios))
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": [asdict(p) for p in cpu], "load": [asdict(p) for p in load],
                                               "args": vars(args)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
