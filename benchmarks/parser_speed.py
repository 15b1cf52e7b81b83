"""Micro-benchmark: the targeted metrics parser vs prometheus_client's, on the real vLLM page.

Run: ``.venv/bin/python -m benchmarks.parser_speed [path/to/metrics.txt]``

Why it matters: the picker scrapes every pod every 50 ms (GIE's ``--refresh-metrics-interval``),
so the per-scrape parse cost times pods / 0.05 s is the share of a core spent parsing.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from epp.datalayer.metric_mapping import BUILTIN_MAPPINGS
from epp.datalayer.metrics_parser import MetricsParser

_SAMPLE = Path(__file__).resolve().parent.parent / "tests" / "data" / "vllm_metrics_sample.txt"


def _best_per_call(fn: Callable[[str], object], text: str, number: int, repeat: int) -> float:
    """Best-of-``repeat`` mean seconds per call (best-of filters scheduler noise)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn(text)
        best = min(best, (time.perf_counter() - t0) / number)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("sample", nargs="?", default=str(_SAMPLE))
    ap.add_argument("--number", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--skip-reference", action="store_true",
                    help="don't time prometheus_client's parser")
    args = ap.parse_args(argv)

    text = Path(args.sample).read_text()
    parser = MetricsParser(BUILTIN_MAPPINGS["vllm"])
    metrics, missing = parser.parse(text)
    ours = _best_per_call(parser.parse, text, args.number, args.repeat)
    print(f"sample: {args.sample} ({len(text) / 1024:.1f} KiB, {text.count(chr(10))} lines)")
    print(f"result: queue={metrics.waiting_queue_size} running={metrics.running_requests_size} "
          f"kv={metrics.kv_cache_usage:.4f} missing={sorted(missing)}")
    print(f"targeted parser:            {ours * 1e3:.3f} ms per page")
    if not args.skip_reference:
        from prometheus_client.parser import text_string_to_metric_families

        def reference(t: str) -> None:
            for _ in text_string_to_metric_families(t):
                pass

        ref = _best_per_call(reference, text, max(1, args.number // 100), args.repeat)
        print(f"prometheus_client parser:   {ref * 1e3:.3f} ms per page  ({ref / ours:.0f}x slower)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
