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

Memory (``python -m benchmarks.prefix_index_memory``): 100 pods x 31,250 blocks is 3.1 M
(block, pod) entries. With a dict of sets plus an ``OrderedDict`` LRU per pod that was ~423
bytes per entry (1.3 GB). Here, with endpoints interned to small indices:

* one ``U64Map`` (``epp/datalayer/u64map.py``, the precise index's table too: two flat arrays,
  ``uint64`` hash → ``int64``) maps a block to its holders: ``(seq << 16) | endpoint``
  when one endpoint holds it (the common case under
  prefix affinity), else a reference to a small ``array`` of (endpoint, seq) pairs and the
  holders' bitmask;
* each endpoint's LRU is a log (an ``array`` of hashes, oldest first) of every time a block
  was learned for it; ``seq`` is the position of the block's latest log entry, so an older
  entry of the same block is recognised as stale and skipped when the log's head is
  evicted, and the log is compacted once stale entries outnumber live ones.

That is 16 bytes of table slot at a load of at most 3/4 plus 8-24 bytes of log per entry:
~40-60 bytes, every operation O(1) amortised, and no per-entry Python object for the
garbage collector to walk (the old structure made every collection of the oldest generation
visit millions of sets, a multi-millisecond pause on the request loop).
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from xxhash import xxh64_intdigest

from epp.datalayer.u64map import U64Map
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


_SEQ_SHIFT = 16
_IDX_MASK = (1 << _SEQ_SHIFT) - 1
#: endpoints the index can tell apart at once (interned indices are reused after removal)
MAX_ENDPOINTS = 1 << _SEQ_SHIFT


@dataclass(slots=True, eq=False)
class _Pod:
    """One endpoint's learned blocks: a log of hashes, oldest first from ``head``."""

    idx: int
    key: str
    log: array[int] = field(default_factory=lambda: array("Q"))
    head: int = 0  # log[:head] is evicted
    base: int = 0  # seq of log[0]
    size: int = 0  # live (block, this endpoint) entries


@dataclass(slots=True)
class PrefixIndex:
    config: PrefixIndexConfig = field(default_factory=PrefixIndexConfig)
    metrics: EppMetrics | None = None
    #: key of this index's PrefixMatch in LLMRequest.state
    state_key: StateKey[PrefixMatch] = field(default_factory=lambda: StateKey("approx-prefix-match"))
    _pods: dict[str, _Pod] = field(default_factory=dict)
    _by_idx: list[_Pod | None] = field(default_factory=list)
    _free_idx: list[int] = field(default_factory=list)
    # block hash -> holders: ``(seq << 16) | idx`` for one holder, ``-(slot + 1)`` for several
    _table: U64Map = field(default_factory=lambda: U64Map(1 << 10))
    # holders of blocks held by several endpoints: [idx, seq, idx, seq, ...], and the same
    # holders as a bitmask (bit idx) so that matching is a few integer operations per block
    _multi: list[array[int] | None] = field(default_factory=list)
    _multi_mask: list[int] = field(default_factory=list)
    _free_multi: list[int] = field(default_factory=list)
    _size: int = 0

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

    def _holders(self, v: int) -> list[int]:
        if v >= 0:
            return [v & _IDX_MASK]
        rec = self._multi[-v - 1]
        assert rec is not None
        return list(rec[0::2])

    def match(self, hashes: Sequence[int]) -> dict[str, int]:
        """Endpoint key → number of *consecutive* blocks it holds from the first one.

        Stricter than "stop at the first hash no endpoint holds": an endpoint that lost
        block 2 cannot reuse block 3 either (the engine's cache is a chain too). The
        endpoints still matching are a bitmask, so a block costs a table probe and an AND
        whether one endpoint holds it or a hundred.
        """
        multi_mask = self._multi_mask
        counts: dict[int, int] = {}
        alive = 0
        n = 0
        for v in self._table.leading(hashes):
            m = 1 << (v & _IDX_MASK) if v >= 0 else multi_mask[-v - 1]
            if n == 0:
                alive = m
            else:
                lost = alive & ~m
                if lost:
                    while lost:
                        bit = lost & -lost
                        counts[bit.bit_length() - 1] = n
                        lost ^= bit
                    alive &= m
                    if not alive:
                        break
            n += 1
        while alive:
            bit = alive & -alive
            counts[bit.bit_length() - 1] = n
            alive ^= bit
        by_idx = self._by_idx
        out: dict[str, int] = {}
        for k, c in counts.items():
            pod = by_idx[k]
            if pod is not None:
                out[pod.key] = c
        return out

    # ---- learning ----
    def capacity(self, ep: Endpoint) -> int:
        if self.config.auto_tune:
            nb = ep.metrics.cache_num_blocks
            if nb:
                return nb
        return self.config.lru_capacity_per_server

    def _pod(self, key: str) -> _Pod:
        pod = self._pods.get(key)
        if pod is None:
            if self._free_idx:
                idx = self._free_idx.pop()
            else:
                idx = len(self._by_idx)
                if idx >= MAX_ENDPOINTS:
                    raise ValueError(f"the prefix index tracks at most {MAX_ENDPOINTS} endpoints")
                self._by_idx.append(None)
            pod = self._pods[key] = self._by_idx[idx] = _Pod(idx, key)
        return pod

    def add(self, ep: Endpoint, hashes: Sequence[int], held: int = 0) -> int:
        """Record that ``ep`` now holds these blocks.

        Inserted last-to-first so the first blocks end up most recently used: under pressure
        the LRU drops the tails of prompts before their shared heads, as the engine does.

        ``held``: the first ``held`` blocks are known to be held by ``ep`` already (the
        request's match). They were learned together, so when the first of them is still in
        the newer half of the endpoint's LRU the whole run is far from eviction and is not
        refreshed: a hot system prompt then costs one lookup per request instead of one
        update per block. Eviction stays exact for everything else.

        Returns how many leading blocks were skipped that way (0: all were learned).
        """
        if not hashes:
            return 0
        pod = self._pod(ep.key)
        idx = pod.idx
        log = pod.log
        skipped = 0
        if held > 0:
            seq = self._seq_of(hashes[0], idx)
            if seq is not None and pod.base + len(log) - seq <= self.capacity(ep) // 2:
                skipped = min(held, len(hashes))
                hashes = hashes[held:]
                if not hashes:
                    return skipped
        seq = pod.base + len(log)
        log.extend(reversed(hashes))
        added = 0
        put = self._table.put
        # one probe for the common cases (a new block, a refresh of this endpoint's block):
        # this loop runs for every block of every routed request
        for h in reversed(hashes):
            v = put(h, (seq << _SEQ_SHIFT) | idx)
            if v is None:
                added += 1
            elif v < 0 or v & _IDX_MASK != idx:  # other holders: put them back with this one
                v, fresh = self._merge(v, idx, seq)
                put(h, v)
                added += fresh
            seq += 1
        pod.size += added
        cap = self.capacity(ep)
        evicted = 0
        while pod.size > cap:
            h = log[pod.head]
            seq = pod.base + pod.head
            pod.head += 1
            if self._forget(h, idx, seq):
                pod.size -= 1
                evicted += 1
        self._size += added - evicted
        if len(log) - pod.head > 2 * pod.size + 64:
            self._compact(pod)
        elif pod.head > 4096 and pod.head * 2 > len(log):
            del log[: pod.head]
            pod.base += pod.head
            pod.head = 0
        if self.metrics is not None:
            self.metrics.prefix_indexer_size.set(self._size)
        return skipped

    def _merge(self, v: int, idx: int, seq: int) -> tuple[int, bool]:
        """Holders value ``v`` with (idx, seq) set; (new value, whether idx is new)."""
        if v >= 0:
            other = v & _IDX_MASK
            if other == idx:
                return (seq << _SEQ_SHIFT) | idx, False
            rec = array("q", (other, v >> _SEQ_SHIFT, idx, seq))
            mask = (1 << other) | (1 << idx)
            if self._free_multi:
                slot = self._free_multi.pop()
                self._multi[slot] = rec
                self._multi_mask[slot] = mask
            else:
                slot = len(self._multi)
                self._multi.append(rec)
                self._multi_mask.append(mask)
            return -(slot + 1), True
        held = self._multi[-v - 1]
        assert held is not None
        if self._multi_mask[-v - 1] >> idx & 1:
            for j in range(0, len(held), 2):
                if held[j] == idx:
                    held[j + 1] = seq
                    return v, False
        held.append(idx)
        held.append(seq)
        self._multi_mask[-v - 1] |= 1 << idx
        return v, True

    def _seq_of(self, h: int, idx: int) -> int | None:
        """Log position of (h, idx)'s latest learning, None when idx does not hold h."""
        v = self._table.get(h)
        if v is None:
            return None
        if v >= 0:
            return v >> _SEQ_SHIFT if v & _IDX_MASK == idx else None
        rec = self._multi[-v - 1]
        assert rec is not None
        for j in range(0, len(rec), 2):
            if rec[j] == idx:
                return int(rec[j + 1])
        return None

    def _is_current(self, h: int, idx: int, seq: int) -> bool:
        """Whether log entry ``seq`` is (h, idx)'s latest learning (not a stale duplicate)."""
        return self._seq_of(h, idx) == seq

    def _forget(self, h: int, idx: int, seq: int) -> bool:
        """Drop (h, idx) when its latest log entry is ``seq``; True when dropped."""
        v = self._table.get(h)
        if v is None:
            return False
        if v >= 0:
            if v != (seq << _SEQ_SHIFT) | idx:
                return False
            self._table.pop(h)
            return True
        slot = -v - 1
        rec = self._multi[slot]
        assert rec is not None
        for j in range(0, len(rec), 2):
            if rec[j] == idx:
                if rec[j + 1] != seq:
                    return False
                del rec[j: j + 2]
                self._multi_mask[slot] &= ~(1 << idx)
                if len(rec) == 2:  # one holder left: back to the inline form
                    self._table.put(h, (rec[1] << _SEQ_SHIFT) | rec[0])
                    self._multi[slot] = None
                    self._multi_mask[slot] = 0
                    self._free_multi.append(slot)
                return True
        return False

    def _compact(self, pod: _Pod) -> None:
        """Rewrite ``pod``'s log with its live entries only (stale duplicates outnumbered
        them), renumbering their seqs past every old one."""
        log, idx = pod.log, pod.idx
        new_base = pod.base + len(log)
        live = array("Q")
        for p in range(pod.head, len(log)):
            h = log[p]
            if self._is_current(h, idx, pod.base + p):
                seq = new_base + len(live)
                live.append(h)
                v = self._table.get(h)
                assert v is not None
                if v >= 0:
                    self._table.put(h, (seq << _SEQ_SHIFT) | idx)
                else:
                    self._merge(v, idx, seq)
        pod.log, pod.base, pod.head = live, new_base, 0

    def remove_endpoint(self, key: str) -> None:
        pod = self._pods.pop(key, None)
        if pod is None:
            return
        log = pod.log
        for p in range(pod.head, len(log)):
            self._forget(log[p], pod.idx, pod.base + p)
        self._size -= pod.size
        self._by_idx[pod.idx] = None
        self._free_idx.append(pod.idx)
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
        return list(self._pods)

    def holders(self, h: int) -> frozenset[str]:
        v = self._table.get(h)
        if v is None:
            return frozenset()
        by_idx = self._by_idx
        return frozenset(p.key for i in self._holders(v) if (p := by_idx[i]) is not None)

    def blocks_of(self, key: str) -> list[int]:
        """The endpoint's block hashes, least recently used first."""
        pod = self._pods.get(key)
        if pod is None:
            return []
        log = pod.log
        return [log[p] for p in range(pod.head, len(log)) if self._is_current(log[p], pod.idx, pod.base + p)]

    def nbytes(self) -> int:
        """Bytes held by the index's arrays (tables, logs, multi-holder records)."""
        total = self._table.nbytes()
        total += sum(p.log.itemsize * len(p.log) for p in self._pods.values())
        total += sum(r.itemsize * len(r) for r in self._multi if r is not None)
        return total + sum((m.bit_length() + 7) // 8 for m in self._multi_mask)
