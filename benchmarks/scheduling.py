"""Micro-benchmark of one scheduling cycle: ``python -m benchmarks.scheduling``.

Builds the default configuration (queue 2, KV 2, prefix 3, max-score picker) over N
endpoints with fresh metrics, warms the prefix index with a set of shared system prompts,
then times ``Scheduler.schedule`` alone and with the PreRequest hooks (prefix learning), for
a few prompt sizes. Prints microseconds per call. Not a test: numbers depend on the machine.
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


def run(endpoints: int, prompt_bytes: int, n: int, seed: int = 1) -> tuple[float, float]:
    rng = random.Random(seed)
    ds = Datastore()
    eps = [Endpoint(f"pod-{i}", f"10.0.0.{i + 1}", 8000) for i in range(endpoints)]
    now = time.monotonic()
    for i, e in enumerate(eps):
        e.metrics.waiting_queue_size = i % 3
        e.metrics.running_requests_size = 4
        e.metrics.kv_cache_usage = 0.05 * i
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
    t = time.perf_counter()
    for r in reqs:
        sched.schedule(r, cands)
    alone = (time.perf_counter() - t) / n
    reqs = [make(i) for i in range(n)]
    t = time.perf_counter()
    for r in reqs:
        res = sched.schedule(r, cands)
        for h in hooks:
            h.pre_request(r, res)
    with_hooks = (time.perf_counter() - t) / n
    return alone, with_hooks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--endpoints", type=int, default=8)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--prompt-bytes", type=int, nargs="*", default=[256, 2048, 8192, 16384])
    args = ap.parse_args()
    print(f"default profile, {args.endpoints} endpoints, {args.requests} requests per size")
    for size in args.prompt_bytes:
        alone, hooks = run(args.endpoints, size, args.requests)
        blocks = min(256, -(-size // 64))
        print(f"  prompt {size:6d} B ({blocks:3d} blocks): schedule {alone * 1e6:6.1f} us"
              f"   schedule+pre_request {hooks * 1e6:6.1f} us")


if __name__ == "__main__":
    main()
