"""Orphan recovery: blocks the engine stored before the picker listened are re-learned from the
requests the picker routes, with engine hashes proven by vLLM's own hash recipe."""

from __future__ import annotations

import json
from pathlib import Path

from epp.datalayer.kvevents.anchor import make_recipes, published
from epp.datalayer.kvevents.decode import BlockRemoved, BlockStored
from epp.datalayer.kvevents.index import KVBlockIndex, block_keys
from epp.metrics import EppMetrics
from epp.sim.kvcache import chain_digests, published_hash

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "vllm_kv_events_sample.txt"
BS = 4
T = list(range(300, 334))  # 8 full blocks + 2 tokens


def engine_hashes(tokens: list[int], n: int, extra: object = None) -> list[int]:
    """What the engine publishes (the simulator implements vLLM's default recipe)."""
    return [published_hash(d) for d in chain_digests(tokens, BS, extra, n_blocks=n)]


H = engine_hashes(T, 8)


def orphan(first: int, last: int, tokens: list[int] = T, hashes: list[int] = H, lora: str | None = None
           ) -> BlockStored:
    return BlockStored(tuple(hashes[first:last]), hashes[first - 1], tuple(tokens[first * BS:last * BS]), BS,
                       lora_name=lora, medium="GPU")


def recovering(idx: KVBlockIndex, *endpoints: str) -> None:
    for ep in endpoints:
        idx.recovery.start(ep)


def test_recipe_reproduces_real_vllm_hashes() -> None:
    # tests/data sample §3: vLLM 0.32, block size 128, four blocks with their full token ids
    line = next(ln.strip() for ln in SAMPLE.read_text().splitlines() if ln.strip().startswith("[17")
                and '"parent_block_hash": null' in ln and '"... (' not in ln)
    ev = json.loads(line)[1][0]
    tokens, bs = ev["token_ids"], ev["block_size"]
    recipe = make_recipes()[0]
    assert [published(d) for d in recipe.chain(tokens, bs, len(tokens) // bs, None)] == ev["block_hashes"]
    # and the simulator's (which the fault suite relies on)
    assert [published(d) for d in recipe.chain(T, BS, 8, None)] == H


def test_orphan_is_anchored_from_the_routed_request_with_engine_hashes() -> None:
    metrics = EppMetrics()
    idx = KVBlockIndex(metrics=metrics)
    recovering(idx, "a")
    idx.recovery.observe("a", T, BS, "", None)  # the pick: engine a held blocks 0-4 already
    idx.apply("a", [orphan(5, 8)])
    assert idx.engine_hashes("a") == set(H) and idx.hashless_count("a") == 0
    assert idx.match(block_keys(T, BS)) == {"a": 8.0}
    assert idx.stats.orphans == 3 and idx.stats.anchored == 3
    assert metrics.kv_events_orphans.labels("anchored")._value.get() == 3
    # with the engine hashes known, evictions of the re-learned prefix apply exactly
    idx.apply("a", [BlockRemoved((H[1],), "GPU")])
    assert idx.match(block_keys(T, BS)) == {"a": 1.0}


def test_a_block_the_engine_completed_after_the_prompt_is_anchored() -> None:
    idx = KVBlockIndex()
    recovering(idx, "a")
    idx.recovery.observe("a", T, BS, "", None)  # 34 tokens: blocks 0-7 were cached
    decoded = [*T[32:34], 7, 8]  # the prompt's last two tokens + two generated ones
    h8 = engine_hashes(T[:32] + decoded, 9)[8]
    idx.apply("a", [BlockStored((h8,), H[7], tuple(decoded), BS, medium="GPU")])
    assert idx.engine_hashes("a") == {*H, h8}


def test_an_orphan_waits_for_a_request_routed_anywhere() -> None:
    # another picker replica routed the request: this one anchors with the next request that
    # carries the prefix, whichever endpoint that request goes to
    idx = KVBlockIndex()
    idx.apply("a", [orphan(5, 8)])
    assert idx.recovery.pending_blocks() == 3 and idx.entries == 0
    later = BlockStored((engine_hashes([*T, 9, 9], 9)[8],), H[7], (T[32], T[33], 9, 9), BS, medium="GPU")
    idx.apply("a", [later])  # stored on top of the waiting orphan: waits with it
    idx.recovery.observe("b", [*T[:24], 1, 2, 3, 4], BS, "", None)
    assert idx.entries == 9 and idx.recovery.pending_blocks() == 0
    assert idx.match(block_keys([*T, 9, 9], BS)) == {"a": 9.0}


def test_blocks_evicted_after_the_orphan_arrived_are_not_resurrected() -> None:
    idx = KVBlockIndex()
    idx.apply("a", [orphan(5, 8)])
    idx.apply("a", [BlockRemoved((H[2],), "GPU")])  # unknown to the index when it came
    idx.recovery.observe("b", T, BS, "", None)
    assert H[2] not in idx.engine_hashes("a") and len(idx.engine_hashes("a")) == 7
    assert idx.match(block_keys(T, BS)) == {"a": 2.0}


def test_lora_orphans_are_anchored_unverified_only_from_requests_routed_there() -> None:
    # a LoRA block's hash mixes in the adapter's server-side path, which events never carry:
    # the position must then come from a request routed to that very endpoint
    idx = KVBlockIndex()
    idx.adapters.add("my-lora")
    recovering(idx, "a", "b")
    hashes = [900 + i for i in range(8)]
    idx.recovery.observe("b", T, BS, "my-lora", None)
    idx.apply("a", [orphan(5, 8, hashes=hashes, lora="my-lora")])
    assert idx.entries == 0
    idx.recovery.observe("a", T, BS, "my-lora", None)
    assert idx.match(block_keys(T, BS, "my-lora")) == {"a": 8.0}
    assert idx.hashless_count("a") == 4 and idx.engine_hashes("a") == set(hashes[4:])
    assert idx.stats.anchored_unverified == 3
    # the engine storing a hashless block again gives it its hash
    keys = block_keys(T, BS, "my-lora")
    idx.apply("a", [BlockStored((hashes[0],), None, tuple(T[:4]), BS, lora_name="my-lora", medium="GPU")])
    assert idx.hashless_count("a") == 3 and idx.holds("a", keys[0])


def test_a_request_that_does_not_continue_the_orphan_anchors_nothing() -> None:
    idx = KVBlockIndex()
    recovering(idx, "a")
    other = [5] * 40
    idx.recovery.observe("a", other, BS, "", None)
    idx.apply("a", [orphan(5, 8)])
    assert idx.entries == 0 and idx.recovery.pending_blocks() == 3


def test_unanchored_orphans_expire_and_are_counted() -> None:
    metrics = EppMetrics()
    idx = KVBlockIndex(metrics=metrics)
    idx.recovery.pending_ttl = 0.0
    idx.apply("a", [orphan(5, 8)])
    idx.apply("a", [orphan(6, 8)])  # the next orphan finds the first one expired
    assert idx.stats.orphans_dropped >= 3 and metrics.kv_events_orphans.labels("dropped")._value.get() >= 3
