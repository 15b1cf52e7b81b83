"""The approximate prefix-cache index (GIE §4.4): which endpoint probably holds which prompt
prefix in its KV cache, learned from the picker's own routing decisions.

The engine's real cache is not visible here, so the index models it: each endpoint has an
LRU of block hashes sized like the engine's cache, and every request routed to an endpoint
is assumed to leave its blocks there. Text is cut into blocks of ``block_tokens x 4`` bytes
(the usual 4 characters per token), and block hashes are chained so that one hash identifies
its whole prefix, as the engine's own block hashes do:

    seed   = xxh64(target_model ‖ cache_salt)
    h[i]   = xxh64(block[i] ‖ h[i-1] as 8 little-endian bytes)      (h[-1] = seed)

A trailing partial block is hashed too; input shorter than one block gives no hashes.

State is per process and rebuilt from traffic; it is never shared between picker replicas.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from xxhash import xxh64_intdigest

from epp.framework.datalayer import Endpoint
from epp.framework.plugin import StateKey

if TYPE_CHECKING:
    from epp.metrics import EppMetrics

CHARS_PER_TOKEN = 4


@dataclass(slots=True, frozen=True)
class PrefixIndexConfig:
    block_size_tokens: int = 16
    max_prefix_blocks: int = 256
    #: when set, the block limit is ``max_prefix_tokens // block tokens`` instead
    max_prefix_tokens: int | None = None
    lru_capacity_per_server: int = 31_250
    #: take block size and LRU capacity from the endpoints' cache_config metrics when present
    auto_tune: bool = True


def chain_hashes(text: bytes, seed_text: str, block_chars: int, max_blocks: int) -> list[int]:
    """The request's chained block hashes (at most ``max_blocks``)."""
    n = len(text)
    if n < block_chars or max_blocks <= 0:
        return []
    limit = min(n, block_chars * max_blocks)
    xxh = xxh64_intdigest
    prev = xxh(seed_text.encode())
    out: list[int] = []
    append = out.append
    for off in range(0, limit, block_chars):
        prev = xxh(text[off : off + block_chars] + prev.to_bytes(8, "little"))
        append(prev)
    return out


@dataclass(slots=True)
class PrefixMatch:
    """Per-request state: the hashes and what the index holds of them (kept in
    ``LLMRequest.state`` so several scorers/profiles and the learning hook share one pass)."""

    hashes: list[int]
    block_chars: int
    #: endpoint key → consecutive matched blocks from the start
    matches: dict[str, int]
    learned: bool = False


@dataclass(slots=True)
class PrefixIndex:
    config: PrefixIndexConfig = field(default_factory=PrefixIndexConfig)
    metrics: EppMetrics | None = None
    #: endpoint key → LRU of its block hashes (oldest first)
    _lrus: dict[str, OrderedDict[int, None]] = field(default_factory=dict)
    #: block hash → keys of endpoints holding it
    _owners: dict[int, set[str]] = field(default_factory=dict)
    _size: int = 0
    #: key of this index's PrefixMatch in LLMRequest.state
    state_key: StateKey[PrefixMatch] = field(default_factory=lambda: StateKey("approx-prefix-match"))

    # ---- per request ----
    def block_tokens(self, candidates: Sequence[Endpoint]) -> int:
        cfg = self.config
        if cfg.auto_tune and candidates:
            bs = candidates[0].metrics.cache_block_size
            if bs:
                return bs
        return cfg.block_size_tokens

    def prepare(self, text: bytes, model: str, cache_salt: str | None,
                candidates: Sequence[Endpoint]) -> PrefixMatch:
        tokens = self.block_tokens(candidates)
        cfg = self.config
        max_blocks = (max(1, cfg.max_prefix_tokens // tokens) if cfg.max_prefix_tokens
                      else cfg.max_prefix_blocks)
        chars = tokens * CHARS_PER_TOKEN
        seed = model + cache_salt if cache_salt else model
        hashes = chain_hashes(text, seed, chars, max_blocks)
        return PrefixMatch(hashes, chars, self.match(hashes) if hashes else {})

    def match(self, hashes: Sequence[int]) -> dict[str, int]:
        """Endpoint key → number of *consecutive* blocks it holds from the first one.

        Stricter than "stop at the first hash no endpoint holds": an endpoint that lost
        block 2 cannot reuse block 3 either (the engine's cache is a chain too).
        """
        get = self._owners.get
        result: dict[str, int] = {}
        alive: set[str] = set()
        n = 0
        for h in hashes:
            owners = get(h)
            if owners is None:
                break
            if n == 0:
                alive = set(owners)
            elif not alive <= owners:
                for key in alive - owners:
                    result[key] = n
                alive &= owners
                if not alive:
                    break
            n += 1
        for key in alive:
            result[key] = n
        return result

    # ---- learning ----
    def capacity(self, ep: Endpoint) -> int:
        if self.config.auto_tune:
            nb = ep.metrics.cache_num_blocks
            if nb:
                return nb
        return self.config.lru_capacity_per_server

    def add(self, ep: Endpoint, hashes: Sequence[int]) -> None:
        """Record that ``ep`` now holds these blocks.

        Inserted last-to-first so the first blocks end up most recently used: under pressure
        the LRU drops the tails of prompts before their shared heads, as the engine does.
        """
        if not hashes:
            return
        key = ep.key
        lru = self._lrus.get(key)
        if lru is None:
            lru = self._lrus[key] = OrderedDict()
        owners_of = self._owners
        added = 0
        for h in reversed(hashes):
            if h in lru:
                lru.move_to_end(h)
            else:
                lru[h] = None
                added += 1
                owners = owners_of.get(h)
                if owners is None:
                    owners_of[h] = {key}
                else:
                    owners.add(key)
        cap = self.capacity(ep)
        evicted = 0
        while len(lru) > cap:
            h, _ = lru.popitem(last=False)
            self._drop_owner(h, key)
            evicted += 1
        self._size += added - evicted
        if self.metrics is not None:
            self.metrics.prefix_indexer_size.set(self._size)

    def _drop_owner(self, h: int, key: str) -> None:
        owners = self._owners.get(h)
        if owners is not None:
            owners.discard(key)
            if not owners:
                del self._owners[h]

    def remove_endpoint(self, key: str) -> None:
        lru = self._lrus.pop(key, None)
        if lru is None:
            return
        for h in lru:
            self._drop_owner(h, key)
        self._size -= len(lru)
        if self.metrics is not None:
            self.metrics.prefix_indexer_size.set(self._size)

    def on_endpoints_changed(
        self, added: tuple[Endpoint, ...], removed: tuple[Endpoint, ...]
    ) -> None:
        """Datastore listener: forget endpoints that left the pool."""
        for ep in removed:
            self.remove_endpoint(ep.key)

    # ---- introspection ----
    @property
    def size(self) -> int:
        """Total (endpoint, block) entries."""
        return self._size

    def endpoints(self) -> list[str]:
        return list(self._lrus)

    def holders(self, h: int) -> frozenset[str]:
        return frozenset(self._owners.get(h, ()))

    def blocks_of(self, key: str) -> list[int]:
        """The endpoint's block hashes, least recently used first."""
        return list(self._lrus.get(key, ()))
