"""Model-sharing benchmark: many LoRA adapters on one fleet of simulated pods.

Run: ``.venv/bin/python -m benchmarks.model_sharing [--duration 60] [--warmup 20] [--only zipf|shift]``
(results: benchmarks/RESULTS.md, "Model sharing"; raw: ``--out``).

1. **Zipf**: 32 adapters with Zipf(1.1) popularity (adapter k has weight k^-1.1), 8 simulated
   pods with 4 adapter slots each (``--max-loras 4``, CPU cache = GPU slots, vLLM's default),
   0.5 s to read an adapter from disk, open-loop Poisson at ``--load`` (70 %) of the pool's
   capacity for the base model. Compared:

   * ``static``: the adapters spread evenly (pod i holds adapters i, i+8, i+16, i+24), never
     moved; the picker routes each adapter to the pods that hold it (``--model-placement
     observe``);
   * ``affinity``: today's behaviour without placement: every adapter registered on every pod
     (``--lora-modules``), ``lora-affinity-scorer`` steering; a pod whose 4 slots hold other
     adapters reads the adapter from disk again (0.5 s, in the engine step);
   * ``placement``: ``--model-placement manage`` with its defaults: adapters loaded on
     demand, copies sized on demand, LRU eviction;
   * ``oracle``: the issue's oracle: the same pods (4 slots each), but it knows the trace's
     popularity in advance and preloads the best static placement for it before the warm-up
     (``oracle_plan``: copies per adapter so that no pod is expected above ``--oracle-util``
     of its capacity, every other adapter one slot while slots remain, bin-packed by rate).
     An adapter that does not fit is registered on the pod expecting the least work, beyond
     its 4 slots: its requests read it from disk in the engine step (vLLM's CPU-cache miss),
     i.e. LoRA affinity with on-demand loads. The picker routes each adapter to the pods that
     hold it (``--model-placement observe``) and never moves anything;
   * ``unbounded``: the unbounded-memory bound, which no placement can beat on these pods:
     every adapter resident on every pod (32 slots, 32 in CPU memory, 8x the adapter memory),
     so no request ever waits for an adapter.

   Reported over the requests sent after ``--warmup``: TTFT p50/p90/p99, goodput under a 1 s
   TTFT SLO, adapter loads per minute and per 100 requests (the pods' own count of adapter
   reads from disk, ``GET /sim/stats``), errors.
2. **Shift**: 4 adapters; one is hot (70 % of the requests, the others 10 % each) and the hot
   one changes every ``--shift-period`` seconds (default 30 s instead of the issue's 60 s, to
   keep the run short). Placement only: the time from each change until the new hot adapter
   has the copies its share needs (ceil(0.7 x pool load in pods)) and until the policy's own
   target is reached, from the picker's ``inference_extension_model_copies``.

Standalone on purpose (``epp.local.topology`` and the load generator only).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import shlex
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.loadgen import LoadGen, Record
from benchmarks.workloads import Item, lora_config
from epp.envoy.bootstrap import EnvoySpec
from epp.local.topology import HOST, Topology, free_port_block

PODS = 8
SLOTS = 4
POLICIES = ("static", "affinity", "placement", "oracle", "unbounded")
SIM_BASE = ["--enable-lora"]


def adapter_names(n: int) -> list[str]:
    return [f"dept-{i:02d}" for i in range(n)]


def make_adapters(root: Path, names: list[str]) -> dict[str, str]:
    paths = {}
    for name in names:
        d = root / "adapters" / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
        paths[name] = str(d)
    return paths


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


# ------------------------------------------------------------------ the request stream
def stream(names: list[str], weights_at: Any, rate: float, duration: float, seed: int, prompt_words: int,
           max_tokens: int) -> list[Item]:
    """Poisson arrivals; ``weights_at(t)`` gives the adapter popularity at offset t."""
    rng = random.Random(seed)
    vocab = sorted({"".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8)))
                    for _ in range(3000)})
    items: list[Item] = []
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            return items
        k = rng.choices(range(len(names)), weights=weights_at(t))[0]
        body = orjson.dumps({
            "model": names[k], "prompt": " ".join(rng.choices(vocab, k=prompt_words)), "max_tokens": max_tokens,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, "temperature": 0.0,
        })
        items.append(Item(len(items), t, "/v1/completions", body, group=k, model=names[k]))


# ------------------------------------------------------------------ scraping
def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def metric(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    return sum(v for lbl, v in samples.get(name, []) if all(lbl.get(k) == x for k, x in labels.items()))


def sim_stats(pods: list[int]) -> list[dict[str, int]]:
    out = []
    for port in pods:
        with urllib.request.urlopen(f"http://{HOST}:{port}/sim/stats", timeout=5) as r:
            out.append(json.loads(r.read()))
    return out


def disk_reads(pods: list[int]) -> int:
    return sum(int(s["lora_disk_reads"]) for s in sim_stats(pods))


# ------------------------------------------------------------------ the oracle's placement
def oracle_plan(names: list[str], rates: list[float], pods: int, slots: int, capacity: float,
                util: float) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """The best static placement for known request rates (req/s per adapter, ``capacity`` req/s
    per pod): ``(resident, overflow)`` adapters per pod index.

    Copies: ceil(rate / (util x capacity)) for each adapter, so that no copy is expected above
    ``util`` of a pod; the hottest adapters' copies first (without them their pods overflow),
    then one slot for every other adapter in popularity order while slots remain. Bin-packing:
    largest per-copy rate first, each to the pod expecting the least work that has a free slot
    and no copy of it yet. What does not fit goes, one by one, to the pod expecting the least
    work (served there by the engine's on-demand reads from disk)."""
    order = sorted(range(len(names)), key=lambda k: -rates[k])
    budget = pods * slots
    copies: dict[int, int] = {}
    for k in order:  # the copies a hot adapter needs come before a rare adapter's one slot
        need = min(pods, max(1, math.ceil(rates[k] / (util * capacity) - 1e-9)))
        if need > 1 and need <= budget:
            copies[k] = need
            budget -= need
    for k in order:
        if k not in copies and budget > 0:
            copies[k] = 1
            budget -= 1
    units = sorted(((rates[k] / n, k) for k, n in copies.items() for _ in range(n)), key=lambda u: (-u[0], u[1]))
    work = [0.0] * pods
    resident: dict[int, list[str]] = {i: [] for i in range(pods)}
    for per_copy, k in units:
        i = min((i for i in range(pods) if len(resident[i]) < slots and names[k] not in resident[i]),
                key=lambda i: (work[i], i))
        resident[i].append(names[k])
        work[i] += per_copy
    overflow: dict[int, list[str]] = {i: [] for i in range(pods)}
    for k in order:
        if k not in copies:
            i = min(range(pods), key=lambda i: (work[i], i))
            overflow[i].append(names[k])
            work[i] += rates[k]
    return resident, overflow


# ------------------------------------------------------------------ one policy
async def preload(pods: list[int], plan: dict[int, list[str]], paths: dict[str, str]) -> None:
    """Static placements: load each pod's adapters through the runtime API before the run, in
    order (the last ``--max-loras`` loaded are the ones in the pod's memory)."""
    async def one_pod(port: int, names: list[str]) -> None:
        async with aiohttp.ClientSession() as s:
            for name in names:
                async with s.post(f"http://{HOST}:{port}/v1/load_lora_adapter",
                                  json={"lora_name": name, "lora_path": paths[name]}) as r:
                    assert r.status == 200, await r.text()

    await asyncio.gather(*(one_pod(pods[i], names) for i, names in plan.items()))


def run_policy(policy: str, workdir: Path, names: list[str], paths: dict[str, str], items: list[Item],
               warmup: float, slo: float, load_time: float, sim_args: list[str],
               watch: list[str] | None = None, placement_config: str | None = None,
               oracle: tuple[dict[int, list[str]], dict[int, list[str]]] | None = None) -> dict[str, Any]:
    modules = [f"{n}={paths[n]}" for n in names]
    sim = [*SIM_BASE, "--lora-load-time", str(load_time), *sim_args]
    if policy == "affinity":
        sim += ["--max-loras", str(SLOTS), "--lora-modules", *modules]
    elif policy == "unbounded":
        sim += ["--max-loras", str(len(names)), "--max-cpu-loras", str(len(names)), "--lora-modules", *modules]
    else:
        sim += ["--max-loras", str(SLOTS)]
    with Topology(workdir / policy) as topo:
        base = free_port_block(PODS)
        pods = [base + i for i in range(PODS)]
        topo.start_sim(PODS, base, kv_events_base_port=-1, extra=sim, timeout=60)
        pool = workdir / f"{policy}-pool.yaml"
        pool.write_text(yaml.safe_dump({
            "endpoints": [{"name": f"pod{i}", "address": f"{HOST}:{p}"} for i, p in enumerate(pods)],
            "models": [{"name": n, "path": paths[n], "base": "sim-model"} for n in names],
        }))
        extra = ["--log-format", "text"]
        config = None
        if policy == "static":
            asyncio.run(preload(pods, {i: names[i::PODS] for i in range(PODS)}, paths))
            extra += ["--model-placement", "observe"]
        elif policy == "oracle":
            assert oracle is not None, "the oracle needs its plan"
            resident, overflow = oracle
            # the overflow first: the resident adapters are loaded last, so they are what the
            # pod's memory holds when the run starts
            asyncio.run(preload(pods, {i: overflow[i] + resident[i] for i in range(PODS)}, paths))
            extra += ["--model-placement", "observe"]
        elif policy == "placement":
            extra += ["--model-placement", "manage"]
            if placement_config:
                extra += ["--model-placement-config", placement_config]
        else:
            config = lora_config()
        grpc, health, mport = (free_port_block(3) + i for i in range(3))
        topo.start_picker(str(pool), grpc, health, mport, config_text=config, extra=extra, name="picker")
        listen = free_port_block(2)
        topo.start_envoy(EnvoySpec(pool=[(HOST, p) for p in pods], pickers=[(HOST, grpc)], listen=(HOST, listen),
                                   admin=(HOST, listen + 1), access_log=True), name="envoy")
        if policy in ("static", "oracle", "placement"):  # the picker has seen every pod's /v1/models
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if metric(scrape(mport), "inference_extension_model_copies", model_name="sim-model") >= PODS:
                    break
                time.sleep(0.2)
        snapshots: dict[str, Any] = {}

        def at_warmup() -> None:
            snapshots["reads"] = disk_reads(pods)
            snapshots["picker"] = scrape(mport)
            snapshots["t"] = time.monotonic()

        copies: list[tuple[float, dict[str, float]]] = []
        gen = LoadGen(f"http://{HOST}:{listen}", items, label=policy, warmup=warmup, on_warmup=at_warmup,
                      drain_timeout=60.0)

        async def go() -> tuple[list[Record], float]:
            watcher = asyncio.ensure_future(watch_copies(mport, watch, copies)) if watch else None
            try:
                return await gen.run()
            finally:
                if watcher is not None:
                    watcher.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await watcher

        records, _ = asyncio.run(go())
        t_end = time.monotonic()
        pod_stats = sim_stats(pods)
        reads_after = sum(int(s["lora_disk_reads"]) for s in pod_stats)
        picker_after = scrape(mport)
    res = summarize(policy, records, items, warmup, slo, snapshots, reads_after, picker_after, t_end, copies)
    res["pods"] = pod_stats
    return res


async def watch_copies(port: int, models: list[str], out: list[tuple[float, dict[str, float]]]) -> None:
    t0 = time.monotonic()
    while True:
        samples = await asyncio.to_thread(scrape, port)
        out.append((time.monotonic() - t0, {m: metric(samples, "inference_extension_model_copies", model_name=m)
                                            for m in models}))
        await asyncio.sleep(0.25)


def by_label(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for lbl, v in samples.get(name, []):
        out[lbl.get(label, "")] = out.get(lbl.get(label, ""), 0.0) + v
    return out


def by_adapter(records: list[Record]) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for r in records:
        if r.ttft is not None:
            out.setdefault(r.group, []).append(r.ttft)
    return out


def summarize(policy: str, records: list[Record], items: list[Item], warmup: float, slo: float,
              snap: dict[str, Any], reads_after: int, picker_after: Any, t_end: float,
              copies: list[tuple[float, dict[str, float]]]) -> dict[str, Any]:
    steady = [r for r in records if r.scheduled >= warmup]
    ok = [r for r in steady if r.ok]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    sent = [r for r in steady if r.sent > 0]
    window = max(1e-9, max((r.sent + (r.e2e or 0.0) for r in sent), default=0.0) - min((r.sent for r in sent),
                                                                                         default=0.0))
    minutes = max(1e-9, (t_end - snap.get("t", t_end)) / 60.0)
    reads = reads_after - snap.get("reads", reads_after)
    picker_loads = (metric(picker_after, "inference_extension_model_loads_total", outcome="success")
                    - metric(snap.get("picker", {}), "inference_extension_model_loads_total", outcome="success"))
    good = sum(1 for t in ttft if t <= slo)
    return {
        "policy": policy, "requests": len(steady), "ok": len(ok), "errors": len(steady) - len(ok),
        "error_kinds": dict(Counter(r.error[:60] or f"HTTP {r.status}" for r in steady if not r.ok)),
        "rps": len(ok) / window,
        "ttft_p50": pct(ttft, 50), "ttft_p90": pct(ttft, 90), "ttft_p99": pct(ttft, 99),
        "goodput_rps": good / window, "goodput_share": good / len(steady) if steady else 0.0,
        "disk_reads": reads, "loads_per_min": reads / minutes,
        "loads_per_100_requests": 100.0 * reads / len(steady) if steady else 0.0,
        "picker_loads": picker_loads,
        "loads_by_model": by_label(picker_after, "inference_extension_model_loads_total", "model_name"),
        "unloads_by_reason": by_label(picker_after, "inference_extension_model_unloads_total", "reason"),
        "copies_at_end": {lbl["model_name"]: v for lbl, v in picker_after.get("inference_extension_model_copies", [])},
        "warmup_loads": snap.get("reads"),
        "by_adapter": {k: {"n": len(v), "ttft_p50": pct(v, 50), "ttft_p90": pct(v, 90)}
                       for k, v in sorted(by_adapter(ok).items())},
        "copies": copies,
        "records": [(r.scheduled, r.group, r.ttft, r.ok) for r in records],
    }


# ------------------------------------------------------------------ scenarios
def zipf(args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    names = adapter_names(32)
    paths = make_adapters(workdir, names)
    weights = [1.0 / (k ** 1.1) for k in range(1, len(names) + 1)]
    rate = args.load * PODS * args.pod_capacity
    items = stream(names, lambda _t: weights, rate, args.warmup + args.duration, args.seed, args.prompt_words,
                   args.max_tokens)
    # the oracle knows the whole trace: each adapter's request rate in it
    counts = Counter(it.group for it in items)
    span = args.warmup + args.duration
    plan = oracle_plan(names, [counts[k] / span for k in range(len(names))], PODS, SLOTS, args.pod_capacity,
                       args.oracle_util)
    out = []
    for policy in args.policies:
        res = run_policy(policy, workdir, names, paths, items, args.warmup, args.slo, args.load_time,
                         args.sim_args, placement_config=args.placement_config,
                         oracle=plan if policy == "oracle" else None,
                         watch=names[:4] if policy == "placement" else None)  # copies of the head, over time
        res["offered_rps"] = rate
        if policy == "oracle":
            res["oracle_plan"] = {"resident": plan[0], "overflow": plan[1]}
        out.append(res)
        print(row(res), flush=True)
    return out


def shift(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    names = adapter_names(4)
    paths = make_adapters(workdir, names)
    period = args.shift_period
    rate = args.load * PODS * args.pod_capacity

    def weights(t: float) -> list[float]:
        hot = int(t // period) % len(names)
        return [0.7 if i == hot else 0.1 for i in range(len(names))]

    duration = period * args.shifts
    items = stream(names, weights, rate, duration, args.seed + 1, args.prompt_words, args.max_tokens)
    res = run_policy("placement", workdir / "shift", names, paths, items, 0.0, args.slo, args.load_time,
                     args.sim_args, watch=names, placement_config=args.placement_config)
    needed = math.ceil(0.7 * args.load * PODS)
    changes = []
    for k in range(1, args.shifts):
        t_shift = k * period
        hot = names[k % len(names)]
        reached = next((t for t, c in res["copies"] if t >= t_shift and c.get(hot, 0) >= needed), None)
        peak = max((c.get(hot, 0) for t, c in res["copies"] if t_shift <= t < t_shift + period), default=0)
        at_shift = next((c.get(hot, 0) for t, c in res["copies"] if t >= t_shift), 0)
        hot_ttft = [r[2] for r in res["records"] if r[3] and r[1] == k % len(names)
                    and t_shift <= r[0] < t_shift + 10 and r[2] is not None]
        changes.append({"at_s": t_shift, "hot": hot, "copies_at_change": at_shift, "needed": needed,
                        "time_to_needed_s": None if reached is None else round(reached - t_shift, 2),
                        "peak_copies": peak, "hot_ttft_p90_first_10s": pct(hot_ttft, 90)})
    res["changes"] = changes
    res["offered_rps"] = rate
    return res


def row(r: dict[str, Any]) -> str:
    def ms(v: float | None) -> str:
        return "—" if v is None else f"{v * 1000:.0f}"

    return (f"| {r['policy']} | {r['rps']:.1f} | {ms(r['ttft_p50'])} | {ms(r['ttft_p90'])} | {ms(r['ttft_p99'])} | "
            f"{r['goodput_rps']:.1f} ({100 * r['goodput_share']:.0f} %) | {r['loads_per_min']:.1f} | "
            f"{r['loads_per_100_requests']:.2f} | {r['errors']} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("zipf", "shift"))
    ap.add_argument("--policies", default=",".join(POLICIES), help="zipf: comma-separated subset of " +
                    ", ".join(POLICIES))
    ap.add_argument("--duration", type=float, default=60.0, help="zipf: measured seconds per policy")
    ap.add_argument("--warmup", type=float, default=20.0, help="zipf: seconds before the measured window")
    ap.add_argument("--load", type=float, default=0.7, help="offered load as a fraction of the pool's capacity")
    ap.add_argument("--pod-capacity", type=float, default=2.0,
                    help="req/s one simulated pod sustains for this workload (measured with every adapter resident)")
    ap.add_argument("--oracle-util", type=float, default=0.75,
                    help="oracle: no copy is expected above this fraction of a pod's capacity")
    ap.add_argument("--load-time", type=float, default=0.5, help="seconds to read an adapter from disk")
    ap.add_argument("--slo", type=float, default=1.0, help="TTFT SLO for goodput (seconds)")
    ap.add_argument("--prompt-words", type=int, default=150)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--shift-period", type=float, default=30.0)
    ap.add_argument("--shifts", type=int, default=4, help="shift: periods (the hot adapter changes between them)")
    ap.add_argument("--sim-args", default="--max-num-seqs 4 --inter-token-latency 0.1",
                    help="extra simulator flags (the pods' speed: keep the request rate this machine can drive)")
    ap.add_argument("--placement-config", help="--model-placement-config for the placement runs (default: none)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/out/model_sharing.json")
    ap.add_argument("--workdir", help="keep process logs here (default: a temporary directory)")
    args = ap.parse_args()
    args.policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    args.sim_args = shlex.split(args.sim_args)
    unknown = set(args.policies) - set(POLICIES)
    if unknown:
        ap.error(f"--policies: unknown {sorted(unknown)}")
    results: dict[str, Any] = {"args": {k: v for k, v in vars(args).items()}}
    with contextlib.ExitStack() as stack:
        if args.workdir:
            workdir = Path(args.workdir)
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="epp-model-sharing-")))
        if args.only in (None, "zipf"):
            print("| policy | done req/s | TTFT p50 ms | p90 ms | p99 ms | goodput req/s (TTFT <= 1 s) | "
                  "loads/min | loads/100 req | errors |\n|---|---|---|---|---|---|---|---|---|", flush=True)
            results["zipf"] = zipf(args, workdir)
        if args.only in (None, "shift"):
            res = shift(args, workdir)
            results["shift"] = res
            print(row(res))
            for c in res["changes"]:
                print(c)
    for part in (results.get("zipf") or []):
        part.pop("records", None)
    if "shift" in results:
        results["shift"].pop("records", None)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
