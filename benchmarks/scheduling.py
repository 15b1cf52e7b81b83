"""Micro-benchmark of one scheduling decision: ``python -m benchmarks.scheduling``.

Builds the default configuration (queue 2, KV 2, prefix 3, max-score picker) over N
endpoints (``--endpoints``, default 10 100 1000) with fresh, varied metrics, warms the prefix
index with a set of shared system prompts, then times every ``Scheduler.schedule`` call alone
and with the PreRequest hooks (prefix learning), for a few prompt sizes. Prints p50 / p99
microseconds per call, measured as the calling thread's CPU time (``time.thread_time``), so
that other processes preempting us on a shared machine do not count; a garbage collection
during a call does. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import random
import time

from epp.config import build_scheduling, load_config
from epp.datalayer.datastore import Datastore
from epp.framework.datalayer import Endpoint
from epp.framework.plugin import PluginContext
from epp.framework.scheduling import LLMRequest
from epp.metrics import EppMetrics


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def run(endpoints: int, prompt_bytes: int, n: int, seed: int = 1) -> tuple[list[float], list[float]]:
    rng = random.Random(seed)
    ds = Datastore()
    eps = [Endpoint(f"pod-{i}", f"10.0.0.{i + 1}", 8000) for i in range(endpoints)]
    now = time.monotonic()
    for i, e in enumerate(eps):
        e.metrics.waiting_queue_size = i % 3
        e.metrics.running_requests_size = 4
        e.metrics.kv_cache_usage = (0.05 * i) % 1.0
        e.metrics.updated_at = now
    ds.replace_endpoints(eps)
    bundle = build_scheduling(load_config(None), PluginContext(ds, EppMetrics()))
    sched, hooks = bundle.scheduler, bundle.pre_request
    systems = [(f"system prompt {k}: " * (prompt_bytes // 18 + 1)).encode()[: prompt_bytes - 24]
               for k in range(32)]

    def make(i: int) -> LLMRequest:
        text = rng.choice(systems) + f" user question {i:08d}".encode()
        return LLMRequest(str(i), "model", "model", prefix_text=text)

    for i in range(2000):  # warm the index
        r = make(i)
        res = sched.schedule(r, ds.endpoints())
        for h in hooks:
            h.pre_request(r, res)
    reqs = [make(i) for i in range(n)]
    cands = ds.endpoints()
    clock = time.thread_time  # CPU time of this thread: a shared machine preempting us does not count
    alone = []
    for r in reqs:
        t = clock()
        sched.schedule(r, cands)
        alone.append(clock() - t)
    reqs = [make(i) for i in range(n)]
    with_hooks = []
    for r in reqs:
        t = clock()
        res = sched.schedule(r, cands)
        for h in hooks:
            h.pre_request(r, res)
        with_hooks.append(clock() - t)
    return alone, with_hooks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--endpoints", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--prompt-bytes", type=int, nargs="*", default=[2048, 8192])
    args = ap.parse_args()
    print(f"default profile, {args.requests} requests per point; microseconds per call p50 / p99")
    print("| endpoints | prompt | schedule p50 / p99 µs | schedule + pre_request p50 / p99 µs |")
    print("|---|---|---|---|")
    for n_eps in args.endpoints:
        for size in args.prompt_bytes:
            alone, hooks = run(n_eps, size, args.requests)
            blocks = min(256, -(-size // 64))
            a50, a99, h50, h99 = (_pct(alone, 0.5), _pct(alone, 0.99), _pct(hooks, 0.5), _pct(hooks, 0.99))
            print(f"| {n_eps} | {size} B ({blocks} blocks) | {a50 * 1e6:.1f} / {a99 * 1e6:.1f}"
                  f" | {h50 * 1e6:.1f} / {h99 * 1e6:.1f} |", flush=True)


if __name__ == "__main__":
    main()
