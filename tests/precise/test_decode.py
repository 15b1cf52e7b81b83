"""Decoding real vLLM 0.32 KV-event messages (tests/data/vllm_kv_events_sample.txt) in both
event encodings, and building the index from them."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import msgpack
import pytest

from epp.datalayer.kvevents.decode import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventDecodeError,
    decode_payload,
    decode_seq,
    hash_value,
    topic_model,
)
from epp.datalayer.kvevents.index import KVBlockIndex, block_keys

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "vllm_kv_events_sample.txt"
TEXT = SAMPLE.read_text()


def _hex_after(marker: str, lines: int) -> bytes:
    idx = TEXT.index(marker)
    body = TEXT[idx + len(marker):].lstrip().splitlines()[:lines]
    return bytes.fromhex("".join(line.strip() for line in body))


def _decoded_lines() -> list[list[Any]]:
    """Every decoded batch printed in the sample (JSON arrays starting with a timestamp)."""
    out = []
    for line in TEXT.splitlines():
        s = line.strip()
        if s.startswith("[17953"):
            out.append(json.loads(s))
    return out


def _restore(value: Any) -> Any:
    """JSON sample → msgpack-able: "bin:<hex>" → bytes."""
    if isinstance(value, str) and value.startswith("bin:"):
        return bytes.fromhex(value[4:])
    if isinstance(value, list):
        return [_restore(v) for v in value]
    if isinstance(value, dict):
        return {k: _restore(v) for k, v in value.items()}
    return value


def _positional(ev: dict[str, Any]) -> list[Any]:
    if ev["type"] == "BlockStored":
        order = ["block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium",
                 "lora_name", "extra_keys", "group_idx", "kv_cache_spec_kind"]
    elif ev["type"] == "BlockRemoved":
        order = ["block_hashes", "medium", "group_idx"]
    else:
        order = []
    return [ev["type"], *(ev.get(k) for k in order)]


def test_raw_frames_block_removed() -> None:
    payload = _hex_after("frame 2 (76 bytes):", 2)
    batch = decode_payload(payload)
    assert batch.dp_rank == 0 and batch.ts == pytest.approx(1795371878.0940228)
    assert batch.events == (BlockRemoved((7789964604484400111,), "GPU", 0),)
    assert decode_seq(bytes.fromhex("000000000000000d")) == 13
    assert bytes.fromhex("6b764074696e792d6c6c616d612d32").decode() == "kv@tiny-llama-2"


def test_raw_frames_all_blocks_cleared() -> None:
    m = re.search(r"frame 2 \(35 bytes\): ([0-9a-f]+)", TEXT)
    assert m is not None
    assert decode_payload(bytes.fromhex(m.group(1))).events == (AllBlocksCleared(),)


def test_full_block_stored_both_encodings() -> None:
    batch_json = next(b for b in _decoded_lines() if b[1][0].get("token_ids") and len(b[1][0]["token_ids"]) == 512)
    ev = batch_json[1][0]
    as_map = decode_payload(msgpack.packb([batch_json[0], [ev], 0]))
    as_array = decode_payload(msgpack.packb([batch_json[0], [_positional(ev)], 0]))
    assert as_map.events == as_array.events
    stored = as_map.events[0]
    assert isinstance(stored, BlockStored)
    assert stored.block_hashes == (8394922519995619502, 2661026693605344670, 17860392548971064818,
                                   5651165222037249422)
    assert stored.parent_block_hash is None and stored.block_size == 128 and len(stored.token_ids) == 512
    assert stored.lora_name is None and stored.medium == "GPU" and stored.extras == ()


@pytest.mark.parametrize("encoding", ["map", "array"])
def test_every_sample_batch_decodes(encoding: str) -> None:
    n = 0
    for ts, events, rank in _decoded_lines():
        evs = [_restore(e) for e in events]
        if encoding == "array":
            evs = [_positional(e) for e in evs]
        batch = decode_payload(msgpack.packb([ts, evs, rank]))
        assert len(batch.events) == len(events)
        n += 1
    assert n >= 10


def test_bytes_hashes_normalise_to_the_published_uint64() -> None:
    digest = bytes.fromhex("7ac153e3315e01798f438737ada7a357c599666e2eef3453402ec3521ae8e188")
    assert hash_value(digest) == int.from_bytes(digest, "big") & (2**64 - 1)
    assert hash_value(2**64 + 5) == 5
    with pytest.raises(EventDecodeError):
        hash_value("nope")


def test_lora_event_and_topic() -> None:
    lora = next(e for b in _decoded_lines() for e in b[1] if e.get("lora_name"))
    ev = decode_payload(msgpack.packb([0.0, [_restore(lora)], 0])).events[0]
    assert isinstance(ev, BlockStored) and ev.lora_name == "tiny-lora" and ev.extras == ()
    assert topic_model("kv@10.0.0.1:8000@llama") == "llama"
    assert topic_model("kv@tiny-llama") is None


def test_malformed_payloads_are_rejected() -> None:
    for bad in (b"\xc1", msgpack.packb({"x": 1}), msgpack.packb([1.0, 5, 0]), msgpack.packb([1.0, [{"a": 1}], 0])):
        with pytest.raises(EventDecodeError):
            decode_payload(bad)
    # unknown event types are skipped, not fatal (newer engines add some)
    assert decode_payload(msgpack.packb([1.0, [{"type": "SomethingNew"}], 0])).events == ()


def test_index_from_sample_eviction_sequence() -> None:
    """Section 3: the stored prefix is found for a request with the same tokens; section 5's
    BlockRemoved events (server 2, block size 32) take blocks out again."""
    batch = next(b for b in _decoded_lines() if b[1][0].get("token_ids") and len(b[1][0]["token_ids"]) == 512)
    stored = decode_payload(msgpack.packb(batch)).events
    idx = KVBlockIndex()
    idx.apply("pod-a", stored)
    tokens = [*batch[1][0]["token_ids"], 5, 6, 7]  # a longer prompt with the same prefix
    keys = block_keys(tokens, 128)
    assert len(keys) == 4 and idx.match(keys) == {"pod-a": 4.0}
    # removing block 2 (by its engine hash) leaves a 2-block consecutive prefix
    idx.apply("pod-a", [BlockRemoved((17860392548971064818,), "GPU")])
    assert idx.match(keys) == {"pod-a": 2.0}
    idx.apply("pod-a", [AllBlocksCleared()])
    assert idx.match(keys) == {} and idx.entries == 0
