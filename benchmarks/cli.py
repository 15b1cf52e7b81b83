"""Benchmark routers side by side on simulated vLLM pods (``epp bench``).

For every offered rate and every router under test: start a fresh simulated pool (``epp
sim``, one process for all pods, KV events on), start the router in front of it (Envoy round
robin, Envoy + epp, or vllm-router), replay the same seeded request stream open-loop,
scrape the pods' prefix-cache counters before and after, and tear everything down. Prints a
table per run and writes ``results.json``, per-request JSONL files and PNG plots into
``--out`` (default ``benchmarks/out/<timestamp>/``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shlex
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson

from benchmarks import report
from benchmarks.loadgen import LoadGen
from benchmarks.routers import DEFAULT_ROUTERS, Pool, RouterSpec, parse_router, start_router
from benchmarks.workloads import WORKLOADS, WorkloadParams, generate, lora_config, sim_flags
from epp.local.topology import HOST, ManagedProcess, Topology, TopologyError, free_port_block


def _rates(value: str) -> list[float]:
    try:
        rates = [float(r) for r in value.split(",") if r.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 6,9,12, got {value!r}") from None
    if not rates or any(r <= 0 for r in rates):
        raise argparse.ArgumentTypeError(f"rates must be positive numbers, got {value!r}")
    return rates


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("routers")
    g.add_argument("--routers", default=",".join(DEFAULT_ROUTERS),
                   help="comma-separated routers: envoy-rr, epp, epp:LABEL=CONFIG.yaml, epp=CONFIG.yaml, "
                        "vllm-router:POLICY (cache_aware, kv_aware, round_robin, power_of_two, ...)")
    g.add_argument("--epp-config", action="append", default=[], metavar="LABEL=PATH",
                   help="add Envoy + epp with this EndpointPickerConfig (repeatable)")
    g.add_argument("--vllm-router-args", default="", help="extra vllm-router flags (one shell-quoted string)")

    g = p.add_argument_group("load")
    g.add_argument("--workload", choices=WORKLOADS, default="shared-prefix")
    g.add_argument("--rate", type=float, default=10.0, help="offered requests per second")
    g.add_argument("--rates", type=_rates, default=[],
                   help="load sweep: comma-separated offered rates (overrides --rate)")
    g.add_argument("--arrival", choices=("poisson", "constant"), default="poisson")
    g.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per run")
    g.add_argument("--num-requests", type=int, default=0, help="cap on requests per run (0 = duration only)")
    g.add_argument("--drain-timeout", type=float, default=60.0, help="seconds to wait for stragglers")
    g.add_argument("--warmup", type=float, default=0.0,
                   help="seconds at the start excluded from the statistics (the pods' counters are scraped "
                        "there): measures steady state instead of cold caches")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--slo-ttft", type=float, default=1.0, help="TTFT SLO (s) for goodput")

    g = p.add_argument_group("workload shape")
    g.add_argument("--groups", type=int, default=64, help="shared-prefix / chat: distinct system prompts")
    g.add_argument("--system-prompt-len", type=int, default=2000, help="tokens")
    g.add_argument("--question-len", type=int, default=200, help="tokens")
    g.add_argument("--output-len", type=int, default=32, help="tokens")
    g.add_argument("--prompt-len", type=int, default=1000, help="random / multi-lora prompt tokens")
    g.add_argument("--turns", type=int, default=5, help="multi-turn-chat: turns per session")
    g.add_argument("--think-time", type=float, default=2.0, help="multi-turn-chat: mean seconds between turns")
    g.add_argument("--lora-adapters", type=int, default=8, help="multi-lora: adapters")

    g = p.add_argument_group("simulated pool")
    g.add_argument("--pods", type=int, default=8)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--num-gpu-blocks", type=int, default=4096, help="KV blocks per pod")
    g.add_argument("--max-num-seqs", type=int, default=16)
    g.add_argument("--max-loras", type=int, default=2)
    g.add_argument("--time-scale", type=float, default=1.0)
    g.add_argument("--sim-args", default="", help="extra epp sim flags (one shell-quoted string)")

    g = p.add_argument_group("output")
    g.add_argument("--out", default="", help="output directory (default benchmarks/out/<timestamp>)")
    g.add_argument("--no-plots", action="store_true")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--quiet", action="store_true", help="print only the final table")


def _scrape(ports: list[int]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for port in ports:
        with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as resp:
            out[str(port)] = report.parse_counters(resp.read().decode())
    return out


def _proc_cpu(pid: int) -> float:
    """User+system CPU seconds of a process (all its threads)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_busy() -> tuple[float, float]:
    try:
        parts = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except OSError:
        return 0.0, 0.0
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0.0)
    return sum(parts) - idle, sum(parts)


def _cpu_snapshot(procs: dict[str, ManagedProcess]) -> dict[str, float]:
    snap = {name: _proc_cpu(p.pid) for name, p in procs.items()}
    t = os.times()
    snap["loadgen"] = t.user + t.system
    busy, total = _machine_busy()
    snap["_machine_busy"], snap["_machine_total"] = busy, total
    snap["_wall"] = time.monotonic()
    return snap


def _cpu_percent(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    wall = max(1e-9, b["_wall"] - a["_wall"])
    out = {k: 100.0 * (b[k] - a[k]) / wall for k in a if not k.startswith("_")}
    dt = b["_machine_total"] - a["_machine_total"]
    out["machine"] = 100.0 * (b["_machine_busy"] - a["_machine_busy"]) / dt * (os.cpu_count() or 1) if dt else 0.0
    return out


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)


def _routers(args: argparse.Namespace) -> list[RouterSpec]:
    specs = [parse_router(r) for r in args.routers.split(",") if r.strip()]
    specs += [parse_router("epp:" + c) for c in args.epp_config]
    if args.workload == "multi-lora" and any(s.kind == "epp" and s.label == "epp" for s in specs):
        specs.append(RouterSpec("epp:lora", "epp", config_path="(built-in lora config)", config_text=lora_config()))
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"duplicate router labels: {labels}")
    return specs


def _params(args: argparse.Namespace, rate: float) -> WorkloadParams:
    return WorkloadParams(
        kind=args.workload, seed=args.seed, rate=rate, arrival=args.arrival, duration=args.duration,
        max_requests=args.num_requests, groups=args.groups, system_prompt_len=args.system_prompt_len,
        question_len=args.question_len, output_len=args.output_len, prompt_len=args.prompt_len,
        turns=args.turns, think_time=args.think_time, lora_adapters=args.lora_adapters,
        block_size=args.block_size)


def _sim_extra(args: argparse.Namespace, wp: WorkloadParams) -> list[str]:
    return ["--block-size", str(args.block_size), "--num-gpu-blocks", str(args.num_gpu_blocks),
            "--max-num-seqs", str(args.max_num_seqs), "--time-scale", str(args.time_scale),
            "--max-loras", str(args.max_loras), *sim_flags(wp), *shlex.split(args.sim_args)]


def run_one(args: argparse.Namespace, spec: RouterSpec, wp: WorkloadParams, items: list[Any], workdir: Path,
            log: Any) -> tuple[dict[str, Any], list[float]]:
    """One router at one rate on a fresh pool. Returns the run's JSON and its TTFTs."""
    with Topology(workdir) as topo:
        http = free_port_block(args.pods)
        kv = free_port_block(args.pods, lo=45000, hi=55000)
        sim = topo.start_sim(args.pods, http, kv_events_base_port=kv, extra=_sim_extra(args, wp), timeout=60.0)
        pool = Pool(list(range(http, http + args.pods)), list(range(kv, kv + args.pods)), args.block_size)
        url, procs = start_router(topo, spec, pool, shlex.split(args.vllm_router_args))
        time.sleep(1.0)  # let the picker scrape the pods once and subscribers connect
        named = {"sim": sim, **{p.name: p for p in procs}}
        before = _scrape(pool.http_ports)
        cpu0 = _cpu_snapshot(named)
        gen = LoadGen(url, items, label=f"{spec.label} @ {wp.rate:g} r/s", drain_timeout=args.drain_timeout,
                      progress=not args.no_progress, block_size=args.block_size, warmup=args.warmup,
                      on_warmup=(lambda: _scrape(pool.http_ports)) if args.warmup > 0 else None)
        records, _wall = _run_async(gen.run())
        if gen.warmup_result is not None:
            before = gen.warmup_result
        cpu1 = _cpu_snapshot(named)
        after = _scrape(pool.http_ports)
        for p in [*procs, sim]:
            if not p.alive():
                log(f"warning: {p.name} exited during the run:\n{p.log_tail()}")
    summary = report.summarize(records, before, after, wp.rate, args.slo_ttft, warmup=args.warmup)
    run = {"router": spec.label, "spec": spec.describe(), "rate": wp.rate, "summary": summary,
           "cpu": _cpu_percent(cpu0, cpu1), "logs": str(workdir)}
    with (workdir / "requests.jsonl").open("wb") as f:
        for r in records:
            f.write(orjson.dumps(r.to_json()) + b"\n")
    return run, [r.ttft for r in records if r.ok and r.ttft is not None and r.scheduled >= args.warmup]


def _run_async(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def run(args: argparse.Namespace) -> int:
    log = (lambda *_: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    try:
        specs = _routers(args)
    except ValueError as exc:
        print(f"epp bench: {exc}", file=sys.stderr)
        return 2
    rates = args.rates or [args.rate]
    out = Path(args.out) if args.out else Path("benchmarks/out") / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    command = "epp bench " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == ["bench"] else \
        " ".join(shlex.quote(a) for a in sys.argv)
    result: dict[str, Any] = {
        "command": command, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "workload": {**_params(args, rates[0]).describe(), "warmup_s": args.warmup},
        "pool": {"pods": args.pods, "num_gpu_blocks": args.num_gpu_blocks, "block_size": args.block_size,
                 "max_num_seqs": args.max_num_seqs, "time_scale": args.time_scale, "sim_args": args.sim_args},
        "machine": {"cpus": os.cpu_count()},
        "routers": [s.describe() for s in specs], "rates": rates, "runs": [],
    }
    ttfts: dict[tuple[str, float], list[float]] = {}
    status = 0
    try:
        for rate in rates:
            wp = _params(args, rate)
            items = generate(wp)
            log(f"== {wp.kind} at {rate:g} req/s: {len(items)} requests over {args.duration:g}s")
            for spec in specs:
                workdir = out / "logs" / f"{_slug(spec.label)}-{rate:g}"
                try:
                    run_res, tt = run_one(args, spec, wp, items, workdir, log)
                except TopologyError as exc:
                    log(f"{spec.label} @ {rate:g}: could not start: {exc}")
                    result["runs"].append({"router": spec.label, "rate": rate, "failed": str(exc)[:2000]})
                    status = 1
                    continue
                ttfts[(spec.label, rate)] = tt
                result["runs"].append(run_res)
                if not args.quiet:
                    log(report.table([run_res]).splitlines()[-1])
                (out / "results.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    except KeyboardInterrupt:
        log("interrupted: writing partial results")
        status = 130
    done = [r for r in result["runs"] if "summary" in r]
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    if done and not args.no_plots:
        result["plots"] = report.plots(done, ttfts, out)
    (out / "results.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    print(f"\n{command}\n")
    print(report.table(done))
    print()
    print(report.cpu_table(done))
    print(f"\nresults: {out / 'results.json'}")
    return status
