"""What metric scraping costs the picker: ``python -m benchmarks.scraping``.

For 4 / 32 / 100 pods scraped every 50 ms (``--refresh-metrics-interval``'s default), a child
process runs epp's ``MetricsScraper`` exactly as ``epp serve`` builds it (default data source
and extractor) against fake pods that all serve a real vLLM ``/metrics`` page
(``tests/data/vllm_metrics_sample.txt``, 57 KB) with a KV-cache gauge that changes at every
scrape (a busy pod; an idle pod's unchanged gauges are cheaper). The fake pods answer from a
bare asyncio protocol with pre-built responses, in another process, so their own cost is not
counted.

Reported per pod count: the child's CPU in cores (utime+stime over the window, all threads),
the CPU of its main thread (the thread whose event loop answers Envoy in ``epp serve``), the
scrapes completed per second (a scraper that falls behind, or a machine too busy to give it
the CPU, shows here), the CPU per scrape and what that projects to at the full rate
(pods / interval: the number to compare with a budget, robust to a busy machine), and the
main loop's responsiveness: the 99th percentile delay of a 1 ms timer on that loop while
scraping runs (0 pods = the same loop with nothing to scrape, the baseline).

The machine is shared: run it with ``--repeat`` and read medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SAMPLE = Path(__file__).resolve().parents[1] / "tests" / "data" / "vllm_metrics_sample.txt"
HOST = "127.0.0.1"


# ---------------------------------------------------------------------------- fake pods
class _Pod(asyncio.Protocol):
    """Answers every request on a keep-alive connection with the next of a few pre-built 200
    responses whose KV-cache gauge differs (a busy pod: the gauges move at every scrape)."""

    responses: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport
        self.buf = b""
        self.n = 0

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            _, self.buf = self.buf.split(b"\r\n\r\n", 1)
            self.n += 1
            self.t.write(self.responses[self.n % len(self.responses)])  # type: ignore[attr-defined]


async def serve_pods(base: int, n: int) -> None:
    sample = SAMPLE.read_bytes()
    gauge = b"vllm:kv_cache_usage_perc{"
    at = sample.index(gauge)
    end = sample.index(b"\n", at)
    line = sample[at:end]
    for k in range(16):
        page = sample[:at] + line.rsplit(b" ", 1)[0] + b" 0.%02d" % (k * 5) + sample[end:]
        _Pod.responses.append(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: "
                              + str(len(page)).encode() + b"\r\n\r\n" + page)
    loop = asyncio.get_running_loop()
    for i in range(n):
        await loop.create_server(_Pod, HOST, base + i, reuse_address=True)
    print("ready", flush=True)
    await asyncio.Event().wait()


# ---------------------------------------------------------------------------- the scraper
async def scrape_child(base: int, n: int, interval: float, seconds: float) -> dict[str, float]:
    from epp.datalayer.datastore import Datastore
    from epp.datalayer.scraper import MetricsScraper
    from epp.framework.datalayer import Endpoint
    from epp.plugins.datalayer.core_metrics_extractor import CoreMetricsExtractor
    from epp.plugins.datalayer.metrics_data_source import MetricsDataSource

    ds = Datastore()
    eps = [Endpoint(f"pod-{i}", HOST, base + i) for i in range(n)]
    ds.replace_endpoints(eps)
    scraper = MetricsScraper(ds, source=MetricsDataSource("metrics-data-source"),
                             extractor=CoreMetricsExtractor("core-metrics-extractor"), interval=interval)
    if not hasattr(scraper, "scrapes_done"):  # an older scraper: count its scrapes from outside
        counted = [0]
        inner = scraper._scrape

        async def counting(col: object) -> bool:
            counted[0] += 1
            return await inner(col)  # type: ignore[arg-type]

        scraper._scrape = counting  # type: ignore[method-assign]
        scraper.scrapes_done = lambda: counted[0]  # type: ignore[attr-defined]
    await scraper.start()
    await asyncio.sleep(1.0)  # connections open, every collector running
    stamps0 = [e.metrics.updated_at for e in eps]
    count0 = _scrape_count(scraper, eps)
    cpu0 = time.process_time()
    main0 = time.thread_time()
    t0 = time.perf_counter()
    lags: list[float] = []
    while time.perf_counter() - t0 < seconds:
        s = time.perf_counter()
        await asyncio.sleep(0.001)
        lags.append(time.perf_counter() - s - 0.001)
    dt = time.perf_counter() - t0
    cpu1 = time.process_time()
    main1 = time.thread_time()
    count1 = _scrape_count(scraper, eps)
    fresh = sum(1 for e, s0 in zip(eps, stamps0, strict=True) if e.metrics.updated_at > s0)
    await scraper.stop()
    lags.sort()
    done = max(1, count1 - count0)
    return {"pods": n, "cores": (cpu1 - cpu0) / dt, "us_per_scrape": (cpu1 - cpu0) / done * 1e6,
            "projected_cores": (cpu1 - cpu0) / done * n / interval, "main_thread_cores": (main1 - main0) / dt,
            "scrapes_per_s": (count1 - count0) / dt, "expected_per_s": n / interval,
            "loop_lag_p99_ms": lags[int(0.99 * (len(lags) - 1))] * 1e3, "pods_updated": fresh}


def _scrape_count(scraper: object, eps: list[object]) -> int:
    """Scrapes done so far: the scraper's own counter when it has one."""
    count = getattr(scraper, "scrapes_done", None)
    return int(count() if callable(count) else 0)


def one(n: int, interval: float, seconds: float) -> dict[str, float]:
    from epp.local.topology import free_port_block

    base = free_port_block(n)
    pods = subprocess.Popen([sys.executable, "-m", "benchmarks.scraping", "--serve-pods", str(base), str(n)],
                            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        assert pods.stdout is not None
        if pods.stdout.readline().strip() != "ready":
            raise RuntimeError("fake pods did not start")
        child = subprocess.run([sys.executable, "-m", "benchmarks.scraping", "--child", str(base), str(n),
                                str(interval), str(seconds)], capture_output=True, text=True, timeout=seconds + 60,
                               cwd=Path(__file__).resolve().parents[1])
        if child.returncode != 0:
            raise RuntimeError(child.stderr[-2000:])
        return dict(json.loads(child.stdout.strip().splitlines()[-1]))
    finally:
        pods.terminate()
        pods.wait(10)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pods", type=int, nargs="+", default=[0, 4, 32, 100])
    ap.add_argument("--interval", type=float, default=0.05)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--serve-pods", nargs=2, type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve_pods:
        import uvloop

        uvloop.run(serve_pods(*args.serve_pods))
        return 0
    if args.child:
        import uvloop

        base, n, interval, seconds = int(args.child[0]), int(args.child[1]), float(args.child[2]), float(args.child[3])
        print(json.dumps(uvloop.run(scrape_child(base, n, interval, seconds))))
        return 0
    rows = []
    for rep in range(args.repeat):
        for n in args.pods:
            r = one(n, args.interval, args.seconds)
            r["rep"] = rep
            rows.append(r)
            print(f"  rep {rep} {n:4d} pods: {r['cores']:.3f} cores (main thread {r['main_thread_cores']:.3f}),"
                  f" {r['us_per_scrape']:.0f} us/scrape -> {r['projected_cores']:.3f} cores at full rate,"
                  f" {r['scrapes_per_s']:.0f}/{r['expected_per_s']:.0f} scrapes/s, loop lag p99"
                  f" {r['loop_lag_p99_ms']:.2f} ms, {r['pods_updated']:.0f} pods updated", flush=True)
    print(f"\nscraping every {args.interval * 1e3:.0f} ms, {SAMPLE.stat().st_size // 1000} KB page, "
          f"median of {args.repeat}, pid {os.getpid()}:\n")
    print("| pods | CPU (cores) | of it on the main loop's thread | scrapes/s done (expected) | CPU µs per scrape |"
          " projected cores at the full rate | main-loop lag p99 ms |")
    print("|---|---|---|---|---|---|---|")
    for n in args.pods:
        rs = [r for r in rows if r["pods"] == n]

        def med(key: str, rs: list[dict[str, float]] = rs) -> float:
            return statistics.median(r[key] for r in rs)

        print(f"| {n} | {med('cores'):.3f} | {med('main_thread_cores'):.3f} | {med('scrapes_per_s'):.0f} "
              f"({med('expected_per_s'):.0f}) | {med('us_per_scrape'):.0f} | {med('projected_cores'):.3f} | "
              f"{med('loop_lag_p99_ms'):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
