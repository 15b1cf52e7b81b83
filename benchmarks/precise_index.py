"""Precise prefix index: memory per (block, endpoint) entry, and what tokenization adds to a
request's path (issue 12, items 5 and 6).

    .venv/bin/python -m benchmarks.precise_index                     # both parts, full size
    .venv/bin/python -m benchmarks.precise_index --part memory --pods 100 --blocks 31250
    .venv/bin/python -m benchmarks.precise_index --part tokenize --requests 200

**memory** — ``--pods`` endpoints each report ``--blocks`` cached blocks through
``KVBlockIndex.apply`` (``BlockStored`` events of 50-block chains, 16 tokens per block, real
64-bit engine hashes), measured with ``tracemalloc`` (everything the index allocates, arrays
and Python objects) or as resident-set growth (``--measure rss``; run one layout per process
for it). Two layouts: ``distinct`` (no block held by two endpoints: what prefix affinity aims
for, and the worst case) and ``shared`` (half of every endpoint's blocks are one common set,
e.g. a system prompt every pod serves).

**tokenize** — a 4,000-token chat (a ~3,500-token system prompt shared by every request,
~500 tokens of new user text each time) through the scorer as the picker runs it:
``prepare_request`` (awaited before scheduling: chat template render, prefix-cached encode,
uncached text on the worker pool), then ``score`` over 8 endpoints that hold the prefix and
``pre_request``. The tokenizer is a byte-level BPE (16k vocabulary) trained here on the
Python standard library's sources, with a Llama-3-style chat template (no download). Reports
the added latency per request (p50/p99), and the longest time the event loop was blocked
meanwhile (a 1 ms ticker's worst lag): what other requests wait.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

from epp.datalayer.datastore import Datastore
from epp.datalayer.kvevents.decode import BlockStored
from epp.datalayer.kvevents.index import KVBlockIndex, block_keys
from epp.framework.datalayer import Endpoint
from epp.framework.plugin import PluginContext
from epp.framework.scheduling import LLMRequest, ProfileRunResult, SchedulingResult
from epp.metrics import EppMetrics
from epp.plugins.scheduling.precise_prefix_cache import PrecisePrefixCacheScorer, PrecisePrefixParams
from epp.tokenization import PrefixTokenCache
from epp.tokenization import request as request_mod

BS = 16
CHAIN = 50
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


# ------------------------------------------------------------------------------- memory


def build_index(pods: int, blocks: int, layout: str, seed: int = 1) -> KVBlockIndex:
    rng = random.Random(seed)
    pool = [rng.randrange(32000) for _ in range(1 << 16)]
    idx = KVBlockIndex(max_entries=1 << 40)
    chains = blocks // CHAIN
    shared_chains = chains // 2 if layout == "shared" else 0
    shared = [(tuple(rng.getrandbits(64) for _ in range(CHAIN)), _tokens(pool, 10_000_000 + c))
              for c in range(shared_chains)]
    n = 0
    for p in range(pods):
        ep = f"10.{p // 250}.{p % 250}.1:8000"
        for hashes, tokens in shared:
            idx.apply(ep, [BlockStored(hashes, None, tokens, BS)])
        for _ in range(chains - shared_chains):
            hashes = tuple(rng.getrandbits(64) for _ in range(CHAIN))
            idx.apply(ep, [BlockStored(hashes, None, _tokens(pool, n), BS)])
            n += 1
    return idx


def _tokens(pool: list[int], n: int) -> tuple[int, ...]:
    off = (n * 7919) % (len(pool) - CHAIN * BS)
    toks = pool[off:off + CHAIN * BS]
    toks[0] = n & 0xFFFFFF  # every chain distinct
    return tuple(toks)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def memory(pods: int, blocks: int, layout: str, traced: bool) -> dict[str, Any]:
    """Memory of the index: every allocation it made (tracemalloc), or the process's resident
    set growth (RSS: what the pod's memory limit sees, allocator overhead included). Both are
    taken after building, with the event objects gone."""
    gc.collect()
    if traced:
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
    else:
        before = _rss()
    t0 = time.perf_counter()
    idx = build_index(pods, blocks, layout)
    elapsed = time.perf_counter() - t0
    gc.collect()
    if traced:
        used = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
    else:
        used = _rss() - before
    entries = idx.entries
    return {"layout": layout, "measure": "tracemalloc" if traced else "rss", "pods": pods, "blocks_per_pod": blocks,
            "entries": entries, "keys": idx.keys_count, "mb": round(used / 1e6, 1),
            "bytes_per_entry": round(used / entries, 1), "table_bytes_per_entry": round(idx.nbytes() / entries, 1),
            "build_s": round(elapsed, 1)}


def event_rate(pods: int = 4, blocks: int = 31250) -> float:
    """Stored blocks applied per second (no tracemalloc)."""
    t0 = time.perf_counter()
    idx = build_index(pods, blocks, "distinct")
    return idx.entries / (time.perf_counter() - t0)


# ------------------------------------------------------------------------------- tokenization


def train_tokenizer(out: Path) -> Path:
    import asyncio as stdlib_sample

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    src = Path(stdlib_sample.__file__).parent
    texts = [p.read_text(errors="replace") for p in sorted(src.glob("*.py"))]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    trainer = trainers.BpeTrainer(vocab_size=16000, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 0)])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE}))
    return out


def corpus_words() -> list[str]:
    import json as stdlib_sample

    return Path(stdlib_sample.__file__).parent.joinpath("decoder.py").read_text().split() * 20


async def tokenize_bench(requests: int, workers: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="precise-tok-"))
    train_tokenizer(tmp)
    ds = Datastore()
    eps = [Endpoint(f"p{i}", "10.0.0.1", 8000 + i) for i in range(8)]
    ds.replace_endpoints(eps)
    params = PrecisePrefixParams.model_validate({"tokenizer": str(tmp), "tokenizerWorkers": workers,
                                                 "blockSizeTokens": BS})
    scorer = PrecisePrefixCacheScorer.from_config("precise", params, PluginContext(ds, EppMetrics()))
    words = corpus_words()
    rng = random.Random(3)
    system = " ".join(words[:1390])
    default = scorer.tokenizer.default
    assert isinstance(default, PrefixTokenCache)
    backend = default.backend
    sys_tokens = len(backend.encode(system, False))

    def chat(i: int) -> LLMRequest:
        start = rng.randrange(len(words) - 400)
        user = f"Request {i}: " + " ".join(words[start:start + 195])
        body = {"model": "m", "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
                "max_tokens": 16}
        return LLMRequest(request_id=str(i), target_model="m", incoming_model="m", api="chat/completions", body=body)

    # the pods hold the system prompt (so the scorer has real matches to walk)
    first = chat(-1)
    await scorer.prepare_request(first)
    tokens = scorer._state(first).tokens or []
    prefix_keys = block_keys(tokens, BS)[: sys_tokens // BS]
    for j, ep in enumerate(eps):
        hashes = tuple(1_000_000 * (j + 1) + k for k in range(len(prefix_keys)))
        scorer.index.apply(ep.key, [BlockStored(hashes, None, tuple(tokens[: len(prefix_keys) * BS]), BS)])

    lags: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            t = loop.time()
            await asyncio.sleep(0.001)
            lags.append(loop.time() - t - 0.001)

    # time spent encoding on the worker threads
    worker: list[float] = []
    real_encode = request_mod._encode_all

    def timed_encode(*args: Any) -> list[list[int]]:
        t = time.perf_counter()
        try:
            return real_encode(*args)
        finally:
            worker.append(time.perf_counter() - t)

    request_mod._encode_all = timed_encode  # type: ignore[assignment]

    async def one(i: int) -> tuple[float, float, float, int, float, float]:
        req = chat(i)
        n_worker = len(worker)
        c0 = time.thread_time()  # CPU of the event loop's thread (worker threads excluded)
        t0 = time.perf_counter()
        await scorer.prepare_request(req)
        t1 = time.perf_counter()
        scores = scorer.score(req, eps)
        best = max(range(len(eps)), key=lambda k: scores[k])
        scorer.pre_request(req, SchedulingResult({"default": ProfileRunResult([eps[best]])}, "default"))
        t2 = time.perf_counter()
        # the event loop was busy with this request except while the worker encoded
        return (t1 - t0, t2 - t1, t2 - t0, len(scorer._state(req).tokens or []), t2 - t0 - sum(worker[n_worker:]),
                time.thread_time() - c0)

    def sync_one(i: int) -> float:
        req = chat(i)
        t0 = time.thread_time()
        scorer.tokenizer.tokenize(req.api, req.body, req.target_model)
        return time.thread_time() - t0

    # cold: a fresh tokenizer cache and render cache (first request of a new system prompt)
    cold_tok = scorer.tokenizer
    cache = cold_tok.default
    assert isinstance(cache, PrefixTokenCache)
    cold = []
    for i in range(5):
        cache._segments.clear()
        cold_tok._renders.clear()
        t0 = time.perf_counter()
        await scorer.prepare_request(chat(10_000 + i))
        cold.append(time.perf_counter() - t0)
    await scorer.prepare_request(chat(20_000))  # warm the system prompt again
    sync = sorted(sync_one(30_000 + i) for i in range(requests))
    tick = asyncio.get_running_loop().create_task(ticker())
    results = []
    for i in range(requests):
        results.append(await one(i))
        await asyncio.sleep(0.002)  # let the ticker see the loop between requests
    stop.set()
    await tick
    await scorer.close()
    request_mod._encode_all = real_encode  # type: ignore[assignment]
    prep = sorted(r[0] for r in results)
    sched = sorted(r[1] for r in results)
    total = sorted(r[2] for r in results)
    loop_busy = sorted(r[4] for r in results)
    loop_cpu = sorted(r[5] for r in results)

    def q(xs: list[float], p: float) -> float:
        return round(xs[min(len(xs) - 1, int(p * len(xs)))] * 1e3, 3)

    return {"requests": requests, "prompt_tokens": statistics.median(r[3] for r in results),
            "system_tokens": sys_tokens, "workers": workers,
            "cold_prepare_ms_median": round(statistics.median(cold) * 1e3, 2),
            "prepare_ms_p50": q(prep, 0.5), "prepare_ms_p99": q(prep, 0.99),
            "score_and_pre_request_ms_p50": q(sched, 0.5), "score_and_pre_request_ms_p99": q(sched, 0.99),
            "added_ms_p50": q(total, 0.5), "added_ms_p99": q(total, 0.99),
            "loop_busy_ms_p50": q(loop_busy, 0.5), "loop_busy_ms_p99": q(loop_busy, 0.99),
            "loop_cpu_ms_p50": q(loop_cpu, 0.5), "loop_cpu_ms_p99": q(loop_cpu, 0.99),
            "sync_tokenize_cpu_ms_p50": q(sync, 0.5), "sync_tokenize_cpu_ms_p99": q(sync, 0.99),
            "loop_blocked_ms_max": round(max(lags) * 1e3, 2) if lags else None,
            "tokenizations": {k: int(v) for k, v in _outcomes(scorer).items()}}


def _outcomes(scorer: PrecisePrefixCacheScorer) -> dict[str, float]:
    m = scorer._metrics
    if m is None:
        return {}
    out = {}
    for metric in m.precise_tokenizations.collect():
        for s in metric.samples:
            if s.name.endswith("_total"):
                out[s.labels["outcome"]] = s.value
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["memory", "tokenize", "all"], default="all")
    ap.add_argument("--pods", type=int, default=100)
    ap.add_argument("--blocks", type=int, default=31250)
    ap.add_argument("--layouts", default="distinct,shared")
    ap.add_argument("--measure", choices=["tracemalloc", "rss"], default="tracemalloc",
                    help="tracemalloc is exact but slows the build ~5x; rss is quick and includes allocator slack")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    if args.part in ("memory", "all"):
        print(json.dumps({"stored_blocks_per_s": round(event_rate())}), flush=True)
        for layout in args.layouts.split(","):
            print(json.dumps(memory(args.pods, args.blocks, layout, args.measure == "tracemalloc")), flush=True)
    if args.part in ("tokenize", "all"):
        print(json.dumps(asyncio.run(tokenize_bench(args.requests, args.workers))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
