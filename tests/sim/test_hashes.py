"""Block hashes equal real vLLM's for identical token ids (tests/data/vllm_kv_events_sample.txt)."""

from __future__ import annotations

import json

from epp.sim.kvcache import NONE_HASH, chain_digests, published_hash, vllm_hash

from .conftest import DATA


def _section3_event() -> dict:
    text = (DATA / "vllm_kv_events_sample.txt").read_text()
    section = text[text.index("3) Two requests") : text.index("4) Same experiment")]
    line = next(ln.strip() for ln in section.splitlines() if ln.strip().startswith("[17"))
    batch = json.loads(line)
    return batch[1][0]


def test_none_hash_is_vllm_default() -> None:
    assert NONE_HASH == vllm_hash("vllm-none-hash")
    assert len(NONE_HASH) == 32


def test_reproduces_published_hashes_of_real_vllm() -> None:
    ev = _section3_event()
    assert ev["type"] == "BlockStored" and ev["block_size"] == 128
    assert len(ev["token_ids"]) == 512  # all ids of 4 full blocks are printed
    digests = chain_digests(ev["token_ids"], ev["block_size"], None)
    assert [published_hash(d) for d in digests] == ev["block_hashes"]


def test_chain_extends_in_place_and_respects_block_limit() -> None:
    ids = list(range(100))
    full = chain_digests(ids, 16, None)
    assert len(full) == 6  # only full blocks
    part: list[bytes] = []
    chain_digests(ids, 16, None, part, n_blocks=2)
    chain_digests(ids, 16, None, part)
    assert part == full
    assert chain_digests(ids, 16, (("lora", "a", "/p"),))[0] != full[0]
