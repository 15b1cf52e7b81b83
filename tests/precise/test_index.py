"""The precise block index: chaining, tiers, LoRA namespaces, speculative entries, bounds."""

from __future__ import annotations

from epp.datalayer.kvevents.decode import AllBlocksCleared, BlockRemoved, BlockStored
from epp.datalayer.kvevents.index import KVBlockIndex, block_keys

BS = 4
TOKENS = list(range(100, 124))  # 6 blocks


def stored(hashes: list[int], tokens: list[int], parent: int | None = None, lora: str | None = None,
           medium: str = "GPU") -> BlockStored:
    return BlockStored(tuple(hashes), parent, tuple(tokens), BS, lora, medium)


def test_parent_chaining_across_events_gives_the_request_keys() -> None:
    idx = KVBlockIndex()
    idx.apply("a", [stored([11, 12], TOKENS[:8])])
    idx.apply("a", [stored([13, 14], TOKENS[8:16], parent=12)])
    keys = block_keys(TOKENS, BS)
    assert idx.match(keys) == {"a": 4.0}
    # a block whose parent the index never saw cannot be keyed: it is skipped, not mis-keyed
    idx.apply("b", [stored([99], TOKENS[16:20], parent=12345)])
    assert idx.stats.orphans == 1 and "b" not in idx.match(keys)


def test_consecutive_prefix_and_tier_weights() -> None:
    idx = KVBlockIndex()
    keys = block_keys(TOKENS, BS)
    idx.apply("gpu", [stored([1, 2, 3], TOKENS[:12])])
    idx.apply("cpu", [stored([1, 2, 3, 4], TOKENS[:16], medium="CPU")])
    idx.apply("gap", [stored([1, 2, 3], TOKENS[:12])])
    idx.apply("gap", [BlockRemoved((2,), "GPU")])
    m = idx.match(keys)
    assert m["gpu"] == 3.0 and abs(m["cpu"] - 4 * 0.8) < 1e-9 and m["gap"] == 1.0
    # a block in both tiers counts with the better one; dropping the GPU copy leaves the CPU one
    idx.apply("cpu", [stored([1, 2], TOKENS[:8], medium="GPU")])
    assert abs(idx.match(keys)["cpu"] - (2 + 2 * 0.8)) < 1e-9
    idx.apply("cpu", [BlockRemoved((1,), "GPU")])
    assert abs(idx.match(keys)["cpu"] - (0.8 + 1 + 2 * 0.8)) < 1e-9


def test_lora_blocks_live_in_the_adapters_namespace() -> None:
    idx = KVBlockIndex()
    idx.apply("a", [stored([7, 8], TOKENS[:8], lora="my-lora")])
    assert idx.namespace_for("my-lora") == "my-lora" and idx.namespace_for("base") == ""
    assert idx.match(block_keys(TOKENS, BS)) == {}
    assert idx.match(block_keys(TOKENS, BS, "my-lora")) == {"a": 2.0}


def test_speculative_entries_expire_and_yield_to_evictions() -> None:
    idx = KVBlockIndex()
    keys = block_keys(TOKENS, BS)
    idx.add_speculative("a", keys, ttl=2.0, now=100.0)
    assert idx.match(keys, now=101.0) == {"a": 6.0}
    assert idx.match(keys, now=102.5) == {}
    idx._prune_spec(103.0)
    assert idx.speculative_count == 0
    # confirmed by events, then evicted: the eviction also drops the guess
    idx.add_speculative("a", keys, ttl=2.0, now=200.0)
    idx.apply("a", [stored([1, 2], TOKENS[:8])])
    idx.apply("a", [BlockRemoved((1,), "GPU")])
    assert idx.match(keys, now=200.5) == {}


def test_memory_bound_drops_the_largest_endpoint() -> None:
    # no engine holds more blocks than its cache: an index over the bound has missed removals,
    # and the endpoint with the most entries is the one to distrust
    idx = KVBlockIndex(max_entries=6)
    idx.apply("a", [stored([1, 2, 3, 4], TOKENS[:16])])
    idx.apply("b", [stored([1, 2], TOKENS[:8])])
    assert idx.entries == 6 and idx.stats.overflows == 0
    idx.apply("b", [stored([3], TOKENS[8:12], parent=2)])
    assert idx.stats.overflows == 1 and idx.entries == 3
    assert idx.engine_hashes("a") == set() and idx.engine_hashes("b") == {1, 2, 3}
    assert idx.match(block_keys(TOKENS, BS)) == {"b": 3.0}


def test_clear_and_remove_endpoint() -> None:
    idx = KVBlockIndex()
    keys = block_keys(TOKENS, BS)
    idx.apply("a", [stored([1, 2], TOKENS[:8])])
    idx.apply("b", [stored([1, 2], TOKENS[:8])])
    idx.apply("a", [AllBlocksCleared()])
    assert idx.match(keys) == {"b": 2.0}
    idx.remove_endpoint("b")
    assert idx.match(keys) == {} and idx.entries == 0 and idx.keys_count == 0


def test_cache_salt_separates_keys() -> None:
    idx = KVBlockIndex()
    salted = BlockStored((1, 2), None, tuple(TOKENS[:8]), BS, None, "GPU", 0, ("s3cret", None))
    idx.apply("a", [salted])
    assert idx.match(block_keys(TOKENS, BS)) == {}
    assert idx.match(block_keys(TOKENS, BS, extras=("s3cret",))) == {"a": 2.0}


def test_match_equals_a_plain_walk_on_random_indexes() -> None:
    # the hot-path walk (inlined probes, runs of identical owners) against the definition
    import random

    rng = random.Random(7)
    tokens = list(range(1000, 1000 + 40 * BS))
    keys = block_keys(tokens, BS)
    for _ in range(60):
        idx = KVBlockIndex()
        eps = [f"e{i}" for i in range(rng.randrange(1, 6))]
        held: dict[str, dict[int, float]] = {ep: {} for ep in eps}
        for ep in eps:
            n = rng.randrange(0, 41)
            medium = rng.choice(["GPU", "CPU"])
            if n:
                idx.apply(ep, [BlockStored(tuple(range(1, n + 1)), None, tuple(tokens[: n * BS]), BS, None, medium)])
                held[ep] = {i: (1.0 if medium == "GPU" else 0.8) for i in range(n)}
            for h in rng.sample(range(1, 41), rng.randrange(0, 3)):  # holes
                idx.apply(ep, [BlockRemoved((h,), medium)])
                held[ep].pop(h - 1, None)
        spec_ep = rng.choice(eps)
        lo = rng.randrange(0, 40)
        idx.add_speculative(spec_ep, keys[lo: lo + rng.randrange(0, 8)], ttl=5.0, now=100.0)
        spec = {i for i in range(len(keys)) if keys[i] in idx._spec and spec_ep in idx._spec[keys[i]]}
        want: dict[str, float] = {}
        for ep in eps:
            total, i = 0.0, 0
            while i < len(keys):
                if i in held[ep]:
                    total += held[ep][i]
                elif ep == spec_ep and i in spec:
                    total += 1.0
                else:
                    break
                i += 1
            if i:
                want[ep] = total
        counts: dict[str, int] = {}
        got = idx.match(keys, now=101.0, held_counts=counts)
        assert got.keys() == want.keys() and all(abs(got[e] - want[e]) < 1e-9 for e in want), (got, want)
        for ep in want:
            n = 0
            while n in held[ep]:
                n += 1
            assert counts[ep] == min(n, next((i for i in range(len(keys)) if i not in held[ep]), len(keys)))


def test_owner_table_equals_a_dict_of_owner_sets() -> None:
    import random

    from epp.datalayer.kvevents.owners import OwnerTable

    rng = random.Random(3)
    table = OwnerTable()
    model: dict[int, dict[int, int]] = {}
    keys = [rng.getrandbits(64) for _ in range(50)]
    for _ in range(20_000):
        key, idx = rng.choice(keys), rng.choice([0, 1, 2, 255, 256, 300, 4095])
        if rng.random() < 0.5:
            bit = rng.choice([1, 2, 4, 8])
            assert table.add_bit(key, idx, bit) == model.get(key, {}).get(idx, 0)
            owners = model.setdefault(key, {})
            owners[idx] = owners.get(idx, 0) | bit
        else:
            mask = rng.choice([0, 0, 1, 3, 15])
            assert table.set_mask(key, idx, mask) == model.get(key, {}).get(idx, 0)
            if mask:
                model.setdefault(key, {})[idx] = mask
            else:
                model.get(key, {}).pop(idx, None)
        model = {k: o for k, o in model.items() if o}
        assert table.entries == sum(len(o) for o in model.values()) and len(table) == len(model)
    for key in keys:
        v = table.table.get(key)
        assert (table.owners_of(v) if v is not None else {}) == model.get(key, {})
        assert all(table.mask(key, i) == m for i, m in model.get(key, {}).items())
