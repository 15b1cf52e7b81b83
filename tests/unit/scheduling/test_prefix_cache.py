"""The approximate prefix index (GIE §4.4) and the prefix-cache scorer built on it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from xxhash import xxh64_intdigest

from epp.datalayer.datastore import Datastore
from epp.framework.plugin import PluginContext
from epp.framework.scheduling import ProfileRunResult, SchedulingResult
from epp.metrics import EppMetrics
from epp.plugins.scheduling.prefix_cache import ApproxPrefixCacheProducer, PrefixCacheScorer, PrefixIndexParams
from epp.plugins.scheduling.prefix_index import PrefixIndex, PrefixIndexConfig, chain_hashes
from tests.unit.scheduling._helpers import ep, req

BLOCK = 64  # default: 16 tokens x 4 chars


def _result(target, prefill=None) -> SchedulingResult:
    res = {"default": ProfileRunResult([target])}
    if prefill is not None:
        res["prefill"] = ProfileRunResult([prefill])
    return SchedulingResult(res, "default")


def _text(n_blocks: int, tag: str = "a") -> bytes:
    return (tag * BLOCK * n_blocks).encode()


# ---- hashing ----
def test_hash_chain_matches_the_recipe():
    text = b"A" * BLOCK + b"B" * BLOCK + b"tail"
    seed = xxh64_intdigest(b"my-model" + b"salt")
    h0 = xxh64_intdigest(b"A" * BLOCK + seed.to_bytes(8, "little"))
    h1 = xxh64_intdigest(b"B" * BLOCK + h0.to_bytes(8, "little"))
    h2 = xxh64_intdigest(b"tail" + h1.to_bytes(8, "little"))  # trailing partial block too
    assert chain_hashes(text, "my-modelsalt", BLOCK, 256) == [h0, h1, h2]


def test_short_input_has_no_hashes_and_long_input_is_truncated():
    assert chain_hashes(b"x" * (BLOCK - 1), "m", BLOCK, 256) == []
    assert len(chain_hashes(b"x" * BLOCK * 300, "m", BLOCK, 256)) == 256


def test_model_and_salt_change_every_hash():
    text = _text(3)
    a = chain_hashes(text, "m1", BLOCK, 256)
    b = chain_hashes(text, "m2", BLOCK, 256)
    assert not set(a) & set(b)
    idx = PrefixIndex()
    salted = idx.prepare(text, "m1", "tenant-1", [])
    assert not set(salted.hashes) & set(a)


@given(st.binary(min_size=BLOCK, max_size=BLOCK * 6), st.binary(min_size=1, max_size=BLOCK * 3))
@settings(max_examples=50)
def test_common_prefix_gives_common_leading_hashes(prefix, suffix):
    a = chain_hashes(prefix + suffix, "m", BLOCK, 256)
    b = chain_hashes(prefix, "m", BLOCK, 256)
    full = len(prefix) // BLOCK
    assert a[:full] == b[:full]


def test_block_size_from_endpoint_metric_when_auto_tuning():
    idx = PrefixIndex()
    text = b"x" * 200
    # 32 tokens per block → 128 chars → one full block + one partial.
    assert len(idx.prepare(text, "m", None, [ep(block_size=32)]).hashes) == 2
    assert len(idx.prepare(text, "m", None, [ep()]).hashes) == 4  # default 64 chars
    fixed = PrefixIndex(PrefixIndexConfig(auto_tune=False))
    assert len(fixed.prepare(text, "m", None, [ep(block_size=32)]).hashes) == 4


def test_max_prefix_tokens_limits_blocks():
    idx = PrefixIndex(PrefixIndexConfig(max_prefix_tokens=64))  # 64 / 16 = 4 blocks
    assert len(idx.prepare(_text(10), "m", None, []).hashes) == 4


# ---- matching ----
def test_match_counts_consecutive_blocks_from_the_start():
    idx = PrefixIndex()
    a, b, c = ep("a"), ep("b"), ep("c")
    h = chain_hashes(_text(4), "m", BLOCK, 256)
    idx.add(a, h)  # all 4
    idx.add(b, h[:2])  # first 2
    idx.add(c, [h[0], h[2], h[3]])  # has a hole at block 1: only block 0 counts
    assert idx.match(h) == {a.key: 4, b.key: 2, c.key: 1}
    assert idx.match([999, *h]) == {}  # first block unknown → nothing matches


def test_scorer_is_matched_over_total():
    ctx = PluginContext(Datastore())
    scorer = PrefixCacheScorer.from_config("p", PrefixIndexParams(), ctx)
    a, b = ep("a"), ep("b")
    h = chain_hashes(_text(4), "base-model", BLOCK, 256)
    scorer.index.add(a, h[:3])
    assert scorer.score(req(_text(4)), [a, b]) == [0.75, 0.0]
    assert scorer.score(req(b"short"), [a, b]) == [0.0, 0.0]


# ---- LRU ----
def test_lru_eviction_removes_endpoint_from_reverse_map():
    idx = PrefixIndex(PrefixIndexConfig(lru_capacity_per_server=3, auto_tune=False))
    a, b = ep("a"), ep("b")
    old = chain_hashes(_text(2, "o"), "m", BLOCK, 256)
    new = chain_hashes(_text(2, "n"), "m", BLOCK, 256)
    idx.add(a, old)
    idx.add(b, old)
    idx.add(a, new)  # a holds 3 at most: one of `old` goes
    assert len(idx.blocks_of(a.key)) == 3
    evicted = [h for h in old if a.key not in idx.holders(h)]
    assert len(evicted) == 1
    # The tail block goes first; the shared head survives (prompts' heads are most reused).
    assert evicted == [old[1]]
    assert idx.holders(old[1]) == {b.key}
    assert idx.size == 5


def test_evicting_the_last_holder_drops_the_hash():
    idx = PrefixIndex(PrefixIndexConfig(lru_capacity_per_server=1, auto_tune=False))
    a = ep("a")
    idx.add(a, [1])
    idx.add(a, [2])
    assert idx.holders(1) == frozenset()
    assert idx.match([1]) == {}
    assert idx.match([2]) == {a.key: 1}


def test_capacity_from_num_blocks_when_auto_tuning():
    idx = PrefixIndex()
    small = ep("small", num_blocks=5)
    idx.add(small, list(range(100)))
    assert len(idx.blocks_of(small.key)) == 5
    assert idx.capacity(ep()) == 31_250
    no_tune = PrefixIndex(PrefixIndexConfig(auto_tune=False, lru_capacity_per_server=7))
    assert no_tune.capacity(small) == 7


def test_relearning_refreshes_recency():
    idx = PrefixIndex(PrefixIndexConfig(lru_capacity_per_server=2, auto_tune=False))
    a = ep("a")
    idx.add(a, [1])
    idx.add(a, [2])
    idx.add(a, [1])  # 1 is now the most recent
    idx.add(a, [3])
    assert set(idx.blocks_of(a.key)) == {1, 3}


# ---- learning and purging ----
def test_learning_on_pick_makes_the_next_same_prefix_request_stick():
    ds = Datastore()
    a, b, c = ep("a"), ep("b"), ep("c")
    ds.replace_endpoints([a, b, c])
    scorer = PrefixCacheScorer.from_config("p", PrefixIndexParams(), PluginContext(ds))
    text = _text(5) + b"question one"
    r1 = req(text)
    assert scorer.score(r1, [a, b, c]) == [0.0, 0.0, 0.0]
    scorer.pre_request(r1, _result(b))
    r2 = req(_text(5) + b"question two")  # same 5-block prefix, different tail
    scores = scorer.score(r2, [a, b, c])
    assert scores[1] == pytest.approx(5 / 6) and scores[0] == scores[2] == 0.0


def test_prefill_profile_endpoint_learns_too():
    ds = Datastore()
    d, p = ep("decode"), ep("prefill")
    ds.replace_endpoints([d, p])
    scorer = PrefixCacheScorer.from_config("p", PrefixIndexParams(), PluginContext(ds))
    r = req(_text(2))
    scorer.score(r, [d, p])
    scorer.pre_request(r, _result(d, prefill=p))
    assert scorer.score(req(_text(2)), [d, p]) == [1.0, 1.0]


def test_removed_endpoint_is_purged():
    ds = Datastore()
    a, b = ep("a"), ep("b")
    ds.replace_endpoints([a, b])
    scorer = PrefixCacheScorer.from_config("p", PrefixIndexParams(), PluginContext(ds))
    r = req(_text(3))
    scorer.pre_request(r, _result(a))
    assert scorer.index.size == 3
    ds.remove_endpoint(a.key)
    assert scorer.index.size == 0
    assert scorer.index.endpoints() == []
    assert scorer.score(req(_text(3)), [b]) == [0.0]


def test_learning_happens_once_per_request_even_with_two_scorers():
    ds = Datastore()
    ctx = PluginContext(ds)
    s1 = PrefixCacheScorer.from_config("p1", PrefixIndexParams(), ctx)
    s2 = PrefixCacheScorer.from_config("p2", PrefixIndexParams(), ctx)
    assert s1.index is s2.index
    a = ep("a")
    r = req(_text(2))
    s1.pre_request(r, _result(a))
    s2.pre_request(r, _result(a))
    assert s1.index.size == 2


def test_metrics_report_size_and_hits():
    m = EppMetrics()
    ds = Datastore()
    scorer = PrefixCacheScorer.from_config("p", PrefixIndexParams(), PluginContext(ds, m))
    a = ep("a")
    r1 = req(_text(4))
    scorer.score(r1, [a])
    scorer.pre_request(r1, _result(a))
    r2 = req(_text(4))
    scorer.score(r2, [a])
    scorer.pre_request(r2, _result(a))
    reg = m.registry
    assert reg.get_sample_value("inference_extension_prefix_indexer_size") == 4
    assert reg.get_sample_value("inference_extension_prefix_indexer_hit_ratio_count") == 2
    assert reg.get_sample_value("inference_extension_prefix_indexer_hit_ratio_sum") == 1.0
    assert reg.get_sample_value("inference_extension_prefix_indexer_hit_bytes_sum") == 4 * BLOCK


# ---- parameters, producer sharing ----
def test_deprecated_block_size_rejected_alone():
    with pytest.raises(ValidationError, match="blockSizeTokens"):
        PrefixIndexParams.model_validate({"blockSize": 64})
    p = PrefixIndexParams.model_validate({"blockSize": 64, "blockSizeTokens": 32})
    assert p.to_config().block_size_tokens == 32


def test_producer_parameters_reach_the_scorer_in_either_order():
    for order in ("producer-first", "scorer-first"):
        ctx = PluginContext(Datastore())
        producer_params = PrefixIndexParams.model_validate(
            {"blockSizeTokens": 8, "lruCapacityPerServer": 10, "autoTune": False})
        if order == "producer-first":
            prod = ApproxPrefixCacheProducer.from_config("prod", producer_params, ctx)
            scorer = PrefixCacheScorer.from_config("s", PrefixIndexParams(), ctx)
        else:
            scorer = PrefixCacheScorer.from_config("s", PrefixIndexParams(), ctx)
            prod = ApproxPrefixCacheProducer.from_config("prod", producer_params, ctx)
        assert prod.index is scorer.index
        assert scorer.index.config == PrefixIndexConfig(
            block_size_tokens=8, lru_capacity_per_server=10, auto_tune=False)


def test_conflicting_parameters_on_two_plugins_fail():
    ctx = PluginContext(Datastore())
    ApproxPrefixCacheProducer.from_config(
        "prod", PrefixIndexParams.model_validate({"blockSizeTokens": 8}), ctx)
    with pytest.raises(ValueError, match="conflict"):
        PrefixCacheScorer.from_config(
            "s", PrefixIndexParams.model_validate({"blockSizeTokens": 32}), ctx)


@given(st.lists(st.tuples(st.integers(0, 3), st.lists(st.integers(0, 12), max_size=8)),
                max_size=30),
       st.lists(st.integers(0, 12), min_size=1, max_size=10), st.integers(1, 20))
@settings(max_examples=150)
def test_match_and_reverse_map_agree_with_a_naive_model(adds, query, cap):
    """Whatever is learned and evicted, the reverse map mirrors the LRUs and a match is the
    longest run of the query each endpoint holds from the start."""
    idx = PrefixIndex(PrefixIndexConfig(lru_capacity_per_server=cap, auto_tune=False))
    eps = [ep(f"e{i}") for i in range(4)]
    for which, hashes in adds:
        idx.add(eps[which], hashes)
    held = {e.key: set(idx.blocks_of(e.key)) for e in eps}
    assert all(len(h) <= cap for h in held.values())
    assert idx.size == sum(len(h) for h in held.values())
    for h in range(13):
        assert idx.holders(h) == {k for k, s in held.items() if h in s}
    expected = {}
    for key, s in held.items():
        n = 0
        while n < len(query) and query[n] in s:
            n += 1
        if n:
            expected[key] = n
    assert idx.match(query) == expected


@given(st.lists(st.tuples(st.integers(0, 3), st.lists(st.integers(0, 40), max_size=12)),
                max_size=60),
       st.lists(st.integers(0, 40), min_size=1, max_size=10), st.integers(1, 12))
@settings(max_examples=150)
def test_colliding_hashes_and_removal_agree_with_a_naive_model(adds, query, cap):
    """Block hashes that share their low bits (one probe run in the index's table), learned,
    evicted, re-learned and purged with an endpoint: the index always equals a plain model of
    per-endpoint LRUs."""
    idx = PrefixIndex(PrefixIndexConfig(lru_capacity_per_server=cap, auto_tune=False))
    eps = [ep(f"e{i}") for i in range(4)]
    model: dict[str, list[int]] = {e.key: [] for e in eps}  # LRU first

    def h(v: int) -> int:
        return (v << 20) | 7  # same home slot for every block

    for n, (which, blocks) in enumerate(adds):
        key = eps[which].key
        if n % 17 == 16:  # now and then the endpoint leaves the pool and comes back empty
            idx.remove_endpoint(key)
            model[key] = []
        idx.add(eps[which], [h(b) for b in blocks])
        lru = model[key]
        for b in reversed(blocks):
            if h(b) in lru:
                lru.remove(h(b))
            lru.append(h(b))
        del lru[: max(0, len(lru) - cap)]
    for e in eps:
        assert idx.blocks_of(e.key) == model[e.key]
    assert idx.size == sum(len(v) for v in model.values())
    for b in range(41):
        assert idx.holders(h(b)) == {k for k, v in model.items() if h(b) in v}
    expected = {}
    for key, lru in model.items():
        n = 0
        while n < len(query) and h(query[n]) in lru:
            n += 1
        if n:
            expected[key] = n
    assert idx.match([h(q) for q in query]) == expected
