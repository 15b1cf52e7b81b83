"""Faults benchmark: pods killed, pickers restarted, and a soak, through a real Envoy.

Run: ``.venv/bin/python -m benchmarks.faults {pod-kill,rolling-restart,soak} [options]``
(``--help`` per scenario; results print as JSON and go to ``--out``).

1. ``pod-kill``: simulated pods (one process each) behind the picker (default config) and the
   generated Envoy config; open-loop streaming load; one pod is SIGKILLed mid-run. Every
   failed request is classified: *running on the killed pod* (its response had started: no
   proxy can retry it) or *lost* (goal 0). ``--envoy previous`` runs the Envoy config as it was
   before issue 11 (pick read from metadata and header, no ``previous_hosts``) for comparison.
2. ``rolling-restart``: two pickers behind one Envoy, open-loop streaming load with response
   lengths up to a few seconds; each picker in turn gets SIGTERM, exits, and is started again
   on the same ports, ``--rounds`` times. Counted: empty 500s, other errors, streams truncated
   (all are shorter than the grace: goal 0 for each), drain times. ``--shutdown-grace 0s``
   shows a picker that stops at once (what SIGTERM did before).
3. ``soak``: one picker, open-loop mixed load (streaming and not, shared prefixes) for
   ``--duration``; the picker's RSS, open fds, threads, event-loop tasks and open streams are
   sampled every ``--sample`` seconds (goal: flat after warm-up).

Standalone on purpose (uses ``epp.local.topology`` and the Envoy config generator only).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from epp.envoy.bootstrap import EnvoySpec, bootstrap_dict
from epp.local.topology import HOST, ManagedProcess, Topology, envoy_binary, envoy_stats, free_port_block, http_ok

MODEL = "sim-model"
OUT = Path("benchmarks/out")


@dataclass(slots=True)
class Rec:
    start: float
    end: float = 0.0
    status: int = 0
    done: bool = False  # a streamed response ended with [DONE] (or a JSON body arrived whole)
    empty: bool = False  # no body at all (an ext_proc failure looks like this)
    port: str = ""
    error: str = ""
    max_tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.done and not self.error


class Load:
    """Open-loop Poisson arrivals; each request's outcome is recorded."""

    def __init__(self, port: int, rate: float, rng: random.Random, tokens: tuple[int, int], stream_share: float = 1.0,
                 prefixes: int = 0) -> None:
        self.port, self.rate, self.rng, self.tokens = port, rate, rng, tokens
        self.stream_share, self.prefixes = stream_share, prefixes
        self.recs: list[Rec] = []
        self.t0 = time.monotonic()

    async def one(self, s: aiohttp.ClientSession, i: int) -> None:
        stream = self.rng.random() < self.stream_share
        n = self.rng.randint(*self.tokens)
        system = f"shared context {self.rng.randrange(self.prefixes)} " * 60 if self.prefixes else "You are terse."
        body = {"model": MODEL, "max_tokens": n, "stream": stream,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": f"request {i}"}]}
        rec = Rec(time.monotonic() - self.t0, max_tokens=n)
        self.recs.append(rec)
        try:
            async with s.post(f"http://{HOST}:{self.port}/v1/chat/completions", data=orjson.dumps(body),
                              headers={"content-type": "application/json"},
                              timeout=aiohttp.ClientTimeout(total=120)) as r:
                rec.status, rec.port = r.status, r.headers.get("x-inference-port", "")
                data = await r.read()
                rec.empty = not data
                rec.done = (b"data: [DONE]" in data) if stream else data.rstrip().endswith(b"}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            rec.error = type(exc).__name__
        rec.end = time.monotonic() - self.t0

    async def run(self, until: asyncio.Event) -> None:
        if self.rate <= 0:  # idle: the picker only scrapes its pods
            await until.wait()
            return
        tasks: set[asyncio.Task[None]] = set()
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=conn) as s:
            i = 0
            while not until.is_set():
                t = asyncio.create_task(self.one(s, i))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
                i += 1
                await asyncio.sleep(self.rng.expovariate(self.rate))
            if tasks:
                await asyncio.wait(tasks)


def _start_envoy(topo: Topology, spec: EnvoySpec, previous: bool = False) -> None:
    """The generated config, or (``previous``) the one before issue 11: pick read from the
    metadata and the header, retries without ``previous_hosts``."""
    cfg = bootstrap_dict(spec)
    if previous:
        for c in cfg["staticResources"]["clusters"]:
            for pol in (c.get("loadBalancingPolicy") or {}).get("policies", []):
                tc = pol["typedExtensionConfig"]["typedConfig"]
                if "overrideHostSources" in tc:
                    tc["overrideHostSources"].append({"header": "x-gateway-destination-endpoint"})
        hcm = cfg["staticResources"]["listeners"][0]["filterChains"][0]["filters"][0]["typedConfig"]
        rp = hcm["routeConfig"]["virtualHosts"][0]["routes"][0]["route"]["retryPolicy"]
        rp.pop("retryHostPredicate", None)
        rp.pop("hostSelectionRetryMaxAttempts", None)
    path = topo.workdir / "envoy.json"
    path.write_text(json.dumps(cfg))
    admin = spec.admin
    assert admin is not None
    topo.start("envoy", [envoy_binary(), "-c", str(path), "--concurrency", "1", "--log-level", "warn",
                         "--base-id", str(random.randrange(1, 1_000_000))],
               ready=lambda: http_ok(f"http://{admin[0]}:{admin[1]}/ready", expect=b"LIVE"))


# --------------------------------------------------------------------------- pod kill
def pod_kill(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    with Topology(workdir) as topo:
        base = free_port_block(args.pods)
        sims = [topo.start_sim(1, base + i, kv_events_base_port=-1, name=f"sim{i}") for i in range(args.pods)]
        pool = [(HOST, base + i) for i in range(args.pods)]
        g = free_port_block(3)
        topo.start_picker(pool, g, g + 1, g + 2, name="picker", timeout=60)  # default config, TLS
        listen = free_port_block(2)
        _start_envoy(topo, EnvoySpec(pool=pool, pickers=[(HOST, g)], listen=(HOST, listen),
                                     admin=(HOST, listen + 1)), previous=args.envoy == "previous")
        victim = 1
        load = Load(listen, args.rate, random.Random(args.seed), (args.min_tokens, args.max_tokens))

        async def run() -> float:
            stop = asyncio.Event()
            task = asyncio.create_task(load.run(stop))
            await asyncio.sleep(args.kill_at)
            killed = time.monotonic() - load.t0
            sims[victim].signal(signal.SIGKILL)
            await asyncio.sleep(args.duration - args.kill_at)
            stop.set()
            await task
            return killed

        killed = asyncio.run(run())
        stats = envoy_stats(listen + 1, "cluster.pool.upstream_rq_retry")
    vport = str(base + victim)
    failed = [r for r in load.recs if not r.ok]
    running = [r for r in failed if r.start < killed and r.port == vport and r.status == 200]
    lost = [r for r in failed if r not in running]
    return {
        "scenario": "pod-kill", "envoy": args.envoy, "pods": args.pods, "rate": args.rate,
        "duration_s": args.duration, "killed_at_s": round(killed, 2),
        "requests": len(load.recs), "ok": len(load.recs) - len(failed),
        "failed_running_on_killed_pod": len(running), "lost": len(lost),
        "lost_detail": [asdict(r) for r in lost[:10]],
        "envoy_retries": stats.get("cluster.pool.upstream_rq_retry", 0),
        "envoy_retry_success": stats.get("cluster.pool.upstream_rq_retry_success", 0),
        "envoy_retry_limit_exceeded": stats.get("cluster.pool.upstream_rq_retry_limit_exceeded", 0),
    }


# --------------------------------------------------------------------------- rolling restart
def _picker_log_records(proc: ManagedProcess) -> list[dict[str, Any]]:
    out = []
    for line in proc.log_path.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def rolling_restart(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    with Topology(workdir) as topo:
        base = free_port_block(3)
        topo.start_sim(3, base, kv_events_base_port=-1)
        pool = [(HOST, base + i) for i in range(3)]
        ports = [free_port_block(3) for _ in range(2)]
        extra = ("--shutdown-grace", args.shutdown_grace)

        def start(i: int) -> ManagedProcess:
            g = ports[i]
            return topo.start_picker(pool, g, g + 1, g + 2, secure=False, extra=extra,
                                     name=f"picker{i}-{time.monotonic_ns()}", timeout=90)

        procs = [start(0), start(1)]
        listen = free_port_block(2)
        _start_envoy(topo, EnvoySpec(pool=pool, pickers=[(HOST, p) for p in ports], listen=(HOST, listen),
                                     admin=(HOST, listen + 1), picker_tls=False))
        load = Load(listen, args.rate, random.Random(args.seed), (args.min_tokens, args.max_tokens))
        restarts: list[dict[str, Any]] = []

        def restart(i: int) -> None:
            old = procs[i]
            t0 = time.monotonic()
            old.signal(signal.SIGTERM)
            old.popen.wait(600)
            exited = time.monotonic()
            recs = _picker_log_records(old)
            drain = next((r for r in recs if str(r.get("msg", "")).startswith("draining")), {})
            ended = next((r for r in recs if str(r.get("msg", "")).startswith("drain ended")), {})
            topo.processes.remove(old)
            procs[i] = start(i)
            restarts.append({"picker": i, "drain_s": round(exited - t0, 2),
                             "ready_again_s": round(time.monotonic() - exited, 2),
                             "open_streams_at_sigterm": drain.get("open_streams"), "drain_end": ended.get("reason"),
                             "exit_code": old.popen.returncode})

        async def run() -> None:
            stop = asyncio.Event()
            task = asyncio.create_task(load.run(stop))
            await asyncio.sleep(args.warmup)
            for _ in range(args.rounds):
                for i in (0, 1):
                    await asyncio.to_thread(restart, i)
                    await asyncio.sleep(args.settle)
            stop.set()
            await task

        asyncio.run(run())
    grace = _seconds(args.shutdown_grace)
    failed = [r for r in load.recs if not r.ok]
    return {
        "scenario": "rolling-restart", "shutdown_grace": args.shutdown_grace, "rate": args.rate,
        "rounds": args.rounds, "restarts": restarts, "requests": len(load.recs),
        "ok": len(load.recs) - len(failed),
        "empty_500": sum(1 for r in failed if r.status == 500 and r.empty),
        "other_http_errors": sum(1 for r in failed if r.status not in (0, 200) and not (r.status == 500 and r.empty)),
        "truncated_streams_shorter_than_grace": sum(1 for r in failed if r.status == 200 and (r.end - r.start) < grace),
        "truncated_streams_longer": sum(1 for r in failed if r.status == 200 and (r.end - r.start) >= grace),
        "client_errors": sum(1 for r in failed if r.status == 0),
        "longest_stream_s": round(max((r.end - r.start for r in load.recs if r.ok), default=0.0), 2),
        "failed_detail": [asdict(r) for r in failed[:10]],
    }


def _seconds(text: str) -> float:
    from epp.framework.plugin import parse_duration

    return parse_duration(text)


# --------------------------------------------------------------------------- soak
def _proc_sample(pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(ln.split(":", 1) for ln in status.splitlines() if ":" in ln)
    return {"rss_mb": int(fields["VmRSS"].split()[0]) / 1024, "threads": int(fields["Threads"]),
            "fds": len(list(Path(f"/proc/{pid}/fd").iterdir()))}


def _metric(port: int, name: str) -> float:
    import urllib.request

    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as r:
        for ln in r.read().decode().splitlines():
            if ln.startswith(name + " ") or ln.startswith(name + "{"):
                return float(ln.rsplit(" ", 1)[1])
    return -1.0


def soak(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    with Topology(workdir) as topo:
        base = free_port_block(args.pods)
        topo.start_sim(args.pods, base, kv_events_base_port=-1)
        pool = [(HOST, base + i) for i in range(args.pods)]
        g = free_port_block(3)
        picker = topo.start_picker(pool, g, g + 1, g + 2, name="picker", timeout=60)
        listen = free_port_block(2)
        _start_envoy(topo, EnvoySpec(pool=pool, pickers=[(HOST, g)], listen=(HOST, listen), admin=(HOST, listen + 1)))
        load = Load(listen, args.rate, random.Random(args.seed), (args.min_tokens, args.max_tokens),
                    stream_share=0.7, prefixes=8)
        samples: list[dict[str, float]] = []

        async def run() -> None:
            stop = asyncio.Event()
            task = asyncio.create_task(load.run(stop))
            t_end = time.monotonic() + args.duration
            while time.monotonic() < t_end:
                await asyncio.sleep(args.sample)
                s = {"t_s": round(time.monotonic() - load.t0, 1), **_proc_sample(picker.pid),
                     "tasks": await asyncio.to_thread(_metric, g + 2, "epp_asyncio_tasks"),
                     "streams_open": await asyncio.to_thread(_metric, g + 2, "epp_ext_proc_streams_open"),
                     "requests": len(load.recs), "failed": sum(1 for r in load.recs if r.end and not r.ok)}
                samples.append(s)
                print(json.dumps(s), file=sys.stderr, flush=True)
            stop.set()
            await task

        asyncio.run(run())
    warm = [s for s in samples if s["t_s"] >= args.warmup] or samples
    first, last = warm[0], warm[-1]
    hours = max((last["t_s"] - first["t_s"]) / 3600, 1e-9)
    return {
        "scenario": "soak", "duration_s": args.duration, "rate": args.rate, "pods": args.pods,
        "requests": len(load.recs), "failed": sum(1 for r in load.recs if not r.ok),
        "after_warmup": {k: {"first": first[k], "last": last[k], "min": min(s[k] for s in warm),
                             "max": max(s[k] for s in warm)} for k in ("rss_mb", "fds", "threads", "tasks")},
        "rss_mb_per_hour_after_warmup": round((last["rss_mb"] - first["rss_mb"]) / hours, 2),
        "rss_mb_median_after_warmup": round(statistics.median(s["rss_mb"] for s in warm), 1),
        "samples": samples,
    }


SCENARIOS = {"pod-kill": pod_kill, "rolling-restart": rolling_restart, "soak": soak}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.faults", description=(__doc__ or "").split("\n\n")[0])
    sub = p.add_subparsers(dest="scenario", required=True)
    pk = sub.add_parser("pod-kill", help="SIGKILL a pod under load")
    pk.add_argument("--pods", type=int, default=4)
    pk.add_argument("--rate", type=float, default=20.0, help="requests per second (Poisson)")
    pk.add_argument("--duration", type=float, default=30.0)
    pk.add_argument("--kill-at", type=float, default=10.0)
    pk.add_argument("--min-tokens", type=int, default=20)
    pk.add_argument("--max-tokens", type=int, default=120)
    pk.add_argument("--envoy", choices=("generated", "previous"), default="generated")
    rr = sub.add_parser("rolling-restart", help="restart two pickers in turn under streaming load")
    rr.add_argument("--rate", type=float, default=20.0)
    rr.add_argument("--rounds", type=int, default=2)
    rr.add_argument("--warmup", type=float, default=10.0)
    rr.add_argument("--settle", type=float, default=5.0, help="seconds of load between restarts")
    rr.add_argument("--shutdown-grace", default="30s", help="the pickers' --shutdown-grace")
    rr.add_argument("--min-tokens", type=int, default=20)
    rr.add_argument("--max-tokens", type=int, default=400, help="400 tokens ≈ 5 s at the sim's 12 ms/token")
    sk = sub.add_parser("soak", help="steady mixed load; sample RSS, fds, threads, tasks")
    sk.add_argument("--pods", type=int, default=4)
    sk.add_argument("--rate", type=float, default=10.0, help="0: no load (an idle picker scraping its pods)")
    sk.add_argument("--duration", type=float, default=1800.0, help="seconds (the issue asks for 30 min)")
    sk.add_argument("--sample", type=float, default=10.0)
    sk.add_argument("--warmup", type=float, default=120.0, help="samples before this are not judged")
    sk.add_argument("--min-tokens", type=int, default=8)
    sk.add_argument("--max-tokens", type=int, default=128)
    for sp in (pk, rr, sk):
        sp.add_argument("--seed", type=int, default=1)
        sp.add_argument("--out", type=Path, default=None,
                        help="JSON result file (default benchmarks/out/faults-<scenario>.json)")
        sp.add_argument("--workdir", type=Path, default=None, help="process logs (default: a temp dir)")
    args = p.parse_args(argv)
    import tempfile

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix=f"faults-{args.scenario}-"))
    result = SCENARIOS[args.scenario](args, workdir)
    out = args.out or OUT / f"faults-{args.scenario}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    summary = {k: v for k, v in result.items() if k not in ("samples", "lost_detail", "failed_detail")}
    print(json.dumps(summary, indent=1))
    print(f"(full result: {out}; process logs: {workdir})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
