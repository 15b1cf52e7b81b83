"""Memory of the approximate prefix index: ``python -m benchmarks.prefix_index_memory``.

Fills a ``PrefixIndex`` the way routing does (``add`` of 128-block prompts, chained xxh64
hashes) until every one of ``--pods`` endpoints holds ``--blocks`` blocks (GIE's default LRU
capacity, 31,250), and measures with ``tracemalloc`` what the index holds (current traced
memory after the fill minus before, the request's own hash lists freed). Two shapes:

* ``distinct``: no two pods hold the same block (the worst case: every entry is its own
  table slot);
* ``shared``: every pod holds the same blocks (the best case: one slot per block, many
  holders).

Also times ``add`` (per block, on a fill of a tenth of the pods without ``tracemalloc``) and
``match`` (a 128-block prefix one pod holds, on the full index), as thread CPU time.
Goal (issue): ≤ 100 bytes per (block, pod) entry, 100 pods x 31,250 blocks ≤ 300 MB.
Not a test.
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
import tracemalloc

from epp.framework.datalayer import Endpoint
from epp.plugins.scheduling.prefix_index import PrefixIndex, PrefixIndexConfig

PROMPT_BLOCKS = 128


def fill(pods: int, blocks: int, shape: str, seed: int = 1) -> tuple[PrefixIndex, list[Endpoint], float]:
    rng = random.Random(seed)
    idx = PrefixIndex(PrefixIndexConfig(lru_capacity_per_server=blocks, auto_tune=False))
    eps = [Endpoint(f"pod-{i}", f"10.0.{i // 250}.{i % 250 + 1}", 8000) for i in range(pods)]
    t = time.thread_time()
    adds = 0
    for e in eps:
        for start in range(0, blocks, PROMPT_BLOCKS):
            n = min(PROMPT_BLOCKS, blocks - start)
            if shape == "shared":
                hashes = [(1 << 40) + start + j for j in range(n)]
            else:
                hashes = [rng.getrandbits(64) for _ in range(n)]
            idx.add(e, hashes)
            adds += n

    return idx, eps, (time.thread_time() - t) / max(1, adds)


def measure(pods: int, blocks: int, shape: str) -> dict[str, float]:
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    idx, eps, _ = fill(pods, blocks, shape)
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    entries = idx.size
    # timing without tracemalloc (it slows every allocation): a fill of a tenth of the pods
    _, _, add_s = fill(max(1, pods // 10), blocks, shape, seed=2)
    # match cost: a request whose prefix one pod holds (its first 128 learned blocks)
    held = idx.blocks_of(eps[0].key)[-PROMPT_BLOCKS:][::-1]
    t = time.thread_time()
    reps = 200
    for _ in range(reps):
        idx.match(held)
    match_s = (time.thread_time() - t) / reps
    return {"pods": pods, "blocks": blocks, "entries": entries, "bytes": after - before,
            "bytes_per_entry": (after - before) / max(1, entries), "add_us_per_block": add_s * 1e6,
            "match_us": match_s * 1e6}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--pods", type=int, default=100)
    ap.add_argument("--blocks", type=int, default=31_250)
    ap.add_argument("--shapes", nargs="+", default=["distinct", "shared"], choices=["distinct", "shared"])
    args = ap.parse_args(argv)
    print("| shape | pods x blocks | entries | traced MB | bytes per entry | add µs per block"
          " | match µs (128 blocks) |")
    print("|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        r = measure(args.pods, args.blocks, shape)
        print(f"| {shape} | {args.pods} x {args.blocks} | {r['entries']:.0f} | {r['bytes'] / 1e6:.0f} | "
              f"{r['bytes_per_entry']:.0f} | {r['add_us_per_block']:.2f} | {r['match_us']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
