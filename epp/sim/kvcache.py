"""The simulated GPU KV cache: fixed-size blocks, vLLM's prefix-cache hashing, LRU eviction.

It follows vLLM V1's block manager where the picker can observe it:

* A block is identified by a chained digest over token ids, with vLLM's default recipe
  ``sha256(pickle.dumps((parent_digest, tuple(token_ids), extra_keys), protocol=5))`` rooted at
  ``NONE_HASH = H("vllm-none-hash")``; the published form is the digest's last 8 bytes as uint64.
  For identical token ids the simulator therefore publishes the hashes a real vLLM publishes.
* Only full blocks are hashed and cached. Freed blocks keep their hash (still hit-able) and go
  to the tail of an LRU free queue; allocation takes from the head and evicts that block's hash
  (one ``BlockRemoved`` event per evicted block). Never-used blocks are handed out first, which
  is what vLLM's initially ordered free queue amounts to, without materialising 26k entries.
* One block (id 0) is vLLM's reserved null block, so usage is ``1 - free / (num_blocks - 1)``.

Events are accumulated here and drained once per engine step into one KV-event batch.
"""

from __future__ import annotations

import hashlib
import pickle
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

_PICKLE_PROTOCOL = 5  # pickle.HIGHEST_PROTOCOL on the Pythons vLLM supports


def vllm_hash(obj: object) -> bytes:
    """vLLM's default ``sha256`` prefix-caching hash of a picklable object."""
    return hashlib.sha256(pickle.dumps(obj, protocol=_PICKLE_PROTOCOL)).digest()


NONE_HASH = vllm_hash("vllm-none-hash")
_MASK64 = (1 << 64) - 1


def block_digest(parent: bytes | None, token_ids: tuple[int, ...], extra_keys: Any) -> bytes:
    """The digest of one full block given its parent's digest (None for the first block)."""
    return hashlib.sha256(
        pickle.dumps((parent or NONE_HASH, token_ids, extra_keys), protocol=_PICKLE_PROTOCOL)
    ).digest()


def published_hash(digest: bytes) -> int:
    """The uint64 vLLM publishes for a digest (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1``)."""
    return int.from_bytes(digest[-8:], "big")


def chain_digests(
    token_ids: list[int],
    block_size: int,
    extra_keys: Any,
    start: list[bytes] | None = None,
    n_blocks: int | None = None,
) -> list[bytes]:
    """Digests of the first ``n_blocks`` (default: all) full blocks of ``token_ids``, extending
    (in place) an already computed prefix ``start``."""
    out = start if start is not None else []
    parent = out[-1] if out else None
    n_full = len(token_ids) // block_size
    if n_blocks is not None:
        n_full = min(n_full, n_blocks)
    for i in range(len(out), n_full):
        parent = block_digest(parent, tuple(token_ids[i * block_size : (i + 1) * block_size]), extra_keys)
        out.append(parent)
    return out


@dataclass(slots=True)
class KVCache:
    """Block pool with a prefix-cache index; the engine is its only writer."""

    num_blocks: int
    block_size: int
    enable_prefix_caching: bool = True
    ref: list[int] = field(default_factory=list)
    digest: list[bytes | None] = field(default_factory=list)
    cached: dict[bytes, int] = field(default_factory=dict)
    free_queue: OrderedDict[int, None] = field(default_factory=OrderedDict)
    next_fresh: int = 1  # block 0 is the reserved null block
    pending_events: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ref = [0] * self.num_blocks
        self.digest = [None] * self.num_blocks

    # -- accounting
    @property
    def num_free(self) -> int:
        """Blocks that can be allocated now (never used + freed, cached or not)."""
        return len(self.free_queue) + (self.num_blocks - self.next_fresh)

    @property
    def usage(self) -> float:
        """``vllm:kv_cache_usage_perc``: fraction of usable blocks held by requests."""
        usable = self.num_blocks - 1
        return 1.0 - self.num_free / usable if usable > 0 else 0.0

    # -- prefix cache
    def lookup(self, digests: list[bytes], max_blocks: int) -> list[int]:
        """Block ids of the longest cached prefix of ``digests`` (at most ``max_blocks``)."""
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        cached = self.cached
        for d in digests[:max_blocks]:
            bid = cached.get(d)
            if bid is None:
                break
            hits.append(bid)
        return hits

    def touch(self, block_ids: list[int]) -> None:
        """Take a reference on cached blocks (removing unreferenced ones from the free queue)."""
        ref = self.ref
        for bid in block_ids:
            if ref[bid] == 0:
                self.free_queue.pop(bid, None)
            ref[bid] += 1

    def allocate(self, n: int) -> list[int] | None:
        """``n`` fresh blocks, evicting LRU cached ones if needed; None when too few are free."""
        if n <= 0:
            return []
        if self.num_free < n:
            return None
        out: list[int] = []
        ref = self.ref
        while len(out) < n and self.next_fresh < self.num_blocks:
            out.append(self.next_fresh)
            self.next_fresh += 1
        while len(out) < n:
            bid, _ = self.free_queue.popitem(last=False)
            d = self.digest[bid]
            if d is not None:
                self._evict(bid, d)
            out.append(bid)
        for bid in out:
            ref[bid] = 1
        return out

    def _evict(self, bid: int, d: bytes) -> None:
        self.digest[bid] = None
        if self.cached.get(d) == bid:
            del self.cached[d]
            self.pending_events.append(
                {"type": "BlockRemoved", "block_hashes": [published_hash(d)], "medium": "GPU", "group_idx": 0}
            )

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference per block; tail blocks first so a prefix outlives its suffixes."""
        ref = self.ref
        fq = self.free_queue
        for bid in reversed(block_ids):
            ref[bid] -= 1
            if ref[bid] == 0:
                fq[bid] = None

    def register(
        self,
        block_ids: list[int],
        digests: list[bytes],
        start: int,
        end: int,
        token_ids: list[int],
        lora_id: int | None,
        lora_name: str | None,
    ) -> None:
        """Enter blocks ``start..end-1`` of a request into the prefix cache and record a
        ``BlockStored`` event for those that were not cached already."""
        if not self.enable_prefix_caching or end <= start:
            return
        stored: list[int] = []
        first = -1
        for i in range(start, end):
            d = digests[i]
            bid = block_ids[i]
            if d in self.cached or self.digest[bid] is not None:
                if stored:
                    self._emit_stored(stored, first, i, digests, token_ids, lora_id, lora_name)
                    stored = []
                continue
            self.digest[bid] = d
            self.cached[d] = bid
            if not stored:
                first = i
            stored.append(published_hash(d))
        if stored:
            self._emit_stored(stored, first, end, digests, token_ids, lora_id, lora_name)

    def _emit_stored(
        self,
        hashes: list[int],
        first: int,
        end: int,
        digests: list[bytes],
        token_ids: list[int],
        lora_id: int | None,
        lora_name: str | None,
    ) -> None:
        bs = self.block_size
        extra = [[lora_name] if lora_name else None for _ in hashes]
        self.pending_events.append(
            {
                "type": "BlockStored",
                "block_hashes": hashes,
                "parent_block_hash": published_hash(digests[first - 1]) if first > 0 else None,
                "token_ids": token_ids[first * bs : end * bs],
                "block_size": bs,
                "lora_id": lora_id,
                "medium": "GPU",
                "lora_name": lora_name,
                "extra_keys": extra,
                "group_idx": 0,
                "kv_cache_spec_kind": "full_attention",
            }
        )

    def reset(self) -> None:
        """Forget every cached hash (``/reset_prefix_cache``): one ``AllBlocksCleared``."""
        for d, bid in self.cached.items():
            if self.digest[bid] == d:
                self.digest[bid] = None
        self.cached.clear()
        self.pending_events.append({"type": "AllBlocksCleared"})

    def published_hashes(self) -> set[int]:
        """The published (uint64) hashes of every block the prefix cache holds: what a KV-event
        subscriber's view must equal (the precise-index fault tests compare against it)."""
        return {published_hash(d) for d in self.cached}

    def drain_events(self) -> list[dict[str, Any]]:
        """Events since the last call (one engine step's batch)."""
        ev = self.pending_events
        if ev:
            self.pending_events = []
        return ev
