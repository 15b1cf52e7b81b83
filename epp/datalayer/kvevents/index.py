"""The precise block index: which endpoint holds which KV block, as the engines report it.

Keys are the picker's *own* chained hash of token ids, not the engine's hash, so the index
does not depend on vLLM's hash algorithm (``sha256`` / ``sha256_cbor``), its seed
(``PYTHONHASHSEED``) or the published hash width, and a request's keys are cheap to compute:

    root    = xxh64(namespace)            namespace = LoRA adapter name, "" for the base model
    key[i]  = xxh64(token_ids of block i as uint32 little-endian ‖ key[i-1] as 8 LE bytes)

``BlockStored`` carries the block's token ids and its parent's *engine* hash; the parent's key
is found through the per-endpoint ``engine hash → key`` map that every stored block adds to,
and ``BlockRemoved`` (engine hashes only) is resolved through the same map (llm-d's dual-key
design). A block may sit in several tiers (``medium`` GPU / CPU …) of one endpoint; it counts
with the best tier's weight.

Speculative entries close the gap between a pick and the engine's events: the scorer inserts
the request's keys for the chosen endpoint with a short TTL so a burst of requests sharing a
prefix sticks before ``BlockStored`` arrives. A ``BlockRemoved`` for the block drops the
speculative entry too, so an eviction is never masked by a guess.

Memory is bounded by ``max_keys`` distinct block keys (LRU on insertion). Everything here is
synchronous and runs on the event loop: event handling from the subscribers' tasks, matching
from the scheduler.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from time import monotonic
from typing import TYPE_CHECKING

from xxhash import xxh64_intdigest

from epp.datalayer.kvevents.decode import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

if TYPE_CHECKING:
    from epp.metrics import EppMetrics

DEFAULT_MEDIUM = "GPU"
DEFAULT_MEDIUM_WEIGHTS: Mapping[str, float] = {"GPU": 1.0, "CPU": 0.8}
#: weight of a medium not listed in the configured weights
UNKNOWN_MEDIUM_WEIGHT = 0.5


def root_key(namespace: str) -> int:
    return xxh64_intdigest(namespace.encode())


def _token_bytes(tokens: Sequence[int]) -> bytes:
    try:
        return array("I", tokens).tobytes()
    except (OverflowError, TypeError):  # a negative / huge id: keep the low 32 bits
        return array("I", (t & 0xFFFFFFFF for t in tokens)).tobytes()


def block_keys(tokens: Sequence[int], block_size: int, namespace: str = "", max_blocks: int | None = None,
               parent: int | None = None, extras: Sequence[str | None] = ()) -> list[int]:
    """Chained keys of the full blocks of ``tokens`` (a trailing partial block is dropped,
    as the engine only caches full blocks). ``extras[i]`` (e.g. a request's ``cache_salt``
    on block 0) is mixed into block i's key, as the engine mixes it into its hash."""
    n = len(tokens) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n <= 0:
        return []
    data = _token_bytes(tokens[: n * block_size])
    step = block_size * 4
    prev = root_key(namespace) if parent is None else parent
    xxh = xxh64_intdigest
    out: list[int] = []
    append = out.append
    for i, off in enumerate(range(0, n * step, step)):
        extra = extras[i] if i < len(extras) else None
        if extra is None:
            prev = xxh(data[off : off + step] + prev.to_bytes(8, "little"))
        else:
            prev = xxh(data[off : off + step] + prev.to_bytes(8, "little") + b"\x00" + extra.encode())
        append(prev)
    return out


@dataclass(slots=True)
class _PodState:
    #: engine hash → key
    engine: dict[int, int] = field(default_factory=dict)
    #: key → engine hash (to clean ``engine`` when the key leaves)
    keys: dict[int, int] = field(default_factory=dict)
    block_size: int = 0
    #: the base model named by the pod's topic (``kv@<pod>@<model>``), when known
    model: str | None = None


@dataclass(slots=True)
class IndexStats:
    stored: int = 0
    removed: int = 0
    cleared: int = 0
    orphans: int = 0  # stored blocks whose parent the index does not know (missed events)
    evicted: int = 0  # keys dropped by the memory bound


@dataclass(slots=True)
class KVBlockIndex:
    max_keys: int = 1_000_000
    medium_weights: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_MEDIUM_WEIGHTS))
    metrics: EppMetrics | None = None
    #: key → {endpoint key: tier bit mask}; insertion order = LRU order
    _blocks: OrderedDict[int, dict[str, int]] = field(default_factory=OrderedDict)
    _pods: dict[str, _PodState] = field(default_factory=dict)
    _medium_bits: dict[str, int] = field(default_factory=dict)
    _mask_weight: dict[int, float] = field(default_factory=dict)
    _entries: int = 0
    #: key → {endpoint key: expiry (monotonic)}
    _spec: dict[int, dict[str, float]] = field(default_factory=dict)
    _spec_queue: deque[tuple[float, str, list[int]]] = field(default_factory=deque)
    _spec_count: int = 0
    #: LoRA adapter names seen in events (a request for one of them uses its namespace)
    adapters: set[str] = field(default_factory=set)
    stats: IndexStats = field(default_factory=IndexStats)

    # ------------------------------------------------------------------ tiers
    def _bit(self, medium: str | None) -> int:
        m = (medium or DEFAULT_MEDIUM).upper()
        bit = self._medium_bits.get(m)
        if bit is None:
            bit = self._medium_bits[m] = 1 << len(self._medium_bits)
            self._mask_weight.clear()
        return bit

    def _weight(self, mask: int) -> float:
        w = self._mask_weight.get(mask)
        if w is None:
            w = 0.0
            weights = {k.upper(): v for k, v in self.medium_weights.items()}
            for medium, bit in self._medium_bits.items():
                if mask & bit:
                    w = max(w, weights.get(medium, UNKNOWN_MEDIUM_WEIGHT))
            self._mask_weight[mask] = w
        return w

    # ------------------------------------------------------------------ events
    def pod(self, endpoint: str) -> _PodState:
        ps = self._pods.get(endpoint)
        if ps is None:
            ps = self._pods[endpoint] = _PodState()
        return ps

    def set_pod_model(self, endpoint: str, model: str | None) -> None:
        if model:
            self.pod(endpoint).model = model

    def apply(self, endpoint: str, events: Iterable[KVEvent]) -> None:
        """Apply one batch of an endpoint's events, in order."""
        ps = self.pod(endpoint)
        for ev in events:
            if isinstance(ev, BlockStored):
                self._stored(endpoint, ps, ev)
            elif isinstance(ev, BlockRemoved):
                self._removed(endpoint, ps, ev)
            elif isinstance(ev, AllBlocksCleared):
                self.stats.cleared += 1
                self._clear_pod(endpoint, ps)
        self._report()

    def _stored(self, endpoint: str, ps: _PodState, ev: BlockStored) -> None:
        if ev.group_idx:
            return  # only the first KV-cache group (full attention) decides prefix hits
        bit = self._bit(ev.medium)
        if not ev.token_ids:
            # a tier copy of blocks the index already knows (e.g. offload to CPU)
            for h in ev.block_hashes:
                key = ps.engine.get(h)
                if key is not None:
                    self._add(endpoint, ps, key, h, bit)
            return
        if ev.parent_block_hash is None:
            parent = None
        else:
            parent = ps.engine.get(ev.parent_block_hash)
            if parent is None:
                self.stats.orphans += len(ev.block_hashes)
                return
        bs = ev.block_size
        ps.block_size = bs
        namespace = ev.lora_name or ""
        if ev.lora_name:
            self.adapters.add(ev.lora_name)
        keys = block_keys(ev.token_ids, bs, namespace, len(ev.block_hashes), parent, ev.extras)
        for h, key in zip(ev.block_hashes, keys, strict=False):
            self._add(endpoint, ps, key, h, bit)
        self.stats.stored += len(keys)

    def _add(self, endpoint: str, ps: _PodState, key: int, engine_hash: int, bit: int) -> None:
        blocks = self._blocks
        owners = blocks.get(key)
        if owners is None:
            owners = blocks[key] = {}
            if len(blocks) > self.max_keys:
                self._evict_oldest()
        else:
            blocks.move_to_end(key)
        old = owners.get(endpoint)
        if old is None:
            owners[endpoint] = bit
            self._entries += 1
        else:
            owners[endpoint] = old | bit
        prev_hash = ps.keys.get(key)
        if prev_hash is not None and prev_hash != engine_hash:
            ps.engine.pop(prev_hash, None)
        ps.keys[key] = engine_hash
        ps.engine[engine_hash] = key

    def _evict_oldest(self) -> None:
        key, owners = self._blocks.popitem(last=False)
        self.stats.evicted += 1
        for endpoint in owners:
            ps = self._pods.get(endpoint)
            if ps is not None:
                h = ps.keys.pop(key, None)
                if h is not None:
                    ps.engine.pop(h, None)
        self._entries -= len(owners)

    def _removed(self, endpoint: str, ps: _PodState, ev: BlockRemoved) -> None:
        if ev.group_idx:
            return
        bit = None if ev.medium is None else self._bit(ev.medium)
        for h in ev.block_hashes:
            key = ps.engine.get(h)
            if key is None:
                continue
            self.stats.removed += 1
            self._drop_spec(key, endpoint)
            owners = self._blocks.get(key)
            mask = owners.get(endpoint) if owners is not None else None
            if mask is None:
                ps.engine.pop(h, None)
                ps.keys.pop(key, None)
                continue
            assert owners is not None
            mask = 0 if bit is None else mask & ~bit
            if mask:
                owners[endpoint] = mask
                continue
            del owners[endpoint]
            self._entries -= 1
            if not owners:
                del self._blocks[key]
            ps.engine.pop(h, None)
            ps.keys.pop(key, None)

    def _clear_pod(self, endpoint: str, ps: _PodState) -> None:
        blocks = self._blocks
        for key in ps.keys:
            owners = blocks.get(key)
            if owners is not None and owners.pop(endpoint, None) is not None:
                self._entries -= 1
                if not owners:
                    del blocks[key]
        ps.keys.clear()
        ps.engine.clear()
        for key in [k for k, pods in self._spec.items() if endpoint in pods]:
            self._drop_spec(key, endpoint)

    def clear_endpoint(self, endpoint: str) -> None:
        """Forget what the endpoint holds (resync after a gap, engine restart)."""
        ps = self._pods.get(endpoint)
        if ps is not None:
            self._clear_pod(endpoint, ps)
            self._report()

    def remove_endpoint(self, endpoint: str) -> None:
        """The endpoint left the pool: forget it entirely."""
        ps = self._pods.pop(endpoint, None)
        if ps is not None:
            self._clear_pod(endpoint, ps)
        else:
            for key in [k for k, pods in self._spec.items() if endpoint in pods]:
                self._drop_spec(key, endpoint)
        self._report()

    # ------------------------------------------------------------------ speculative
    def add_speculative(self, endpoint: str, keys: Sequence[int], ttl: float, now: float | None = None) -> None:
        if not keys or ttl <= 0:
            return
        now = monotonic() if now is None else now
        self._prune_spec(now)
        expiry = now + ttl
        spec = self._spec
        blocks = self._blocks
        added: list[int] = []
        for key in keys:
            owners = blocks.get(key)
            if owners is not None and endpoint in owners:
                continue  # confirmed already
            pods = spec.get(key)
            if pods is None:
                spec[key] = {endpoint: expiry}
                self._spec_count += 1
            else:
                if endpoint not in pods:
                    self._spec_count += 1
                pods[endpoint] = expiry
            added.append(key)
        if added:
            self._spec_queue.append((expiry, endpoint, added))

    def _drop_spec(self, key: int, endpoint: str) -> None:
        pods = self._spec.get(key)
        if pods is not None and pods.pop(endpoint, None) is not None:
            self._spec_count -= 1
            if not pods:
                del self._spec[key]

    def _prune_spec(self, now: float) -> None:
        q = self._spec_queue
        spec = self._spec
        while q and q[0][0] <= now:
            expiry, endpoint, keys = q.popleft()
            for key in keys:
                pods = spec.get(key)
                if pods is not None and pods.get(endpoint) == expiry:
                    del pods[endpoint]
                    self._spec_count -= 1
                    if not pods:
                        del spec[key]

    # ------------------------------------------------------------------ matching
    def match(self, keys: Sequence[int], now: float | None = None) -> dict[str, float]:
        """Endpoint → weighted count of *consecutive* blocks it holds from the first key.

        A block counts with the weight of its best tier; a live speculative entry counts 1.
        """
        if not keys:
            return {}
        blocks_get = self._blocks.get
        spec_get = self._spec.get
        weight = self._weight
        now = monotonic() if now is None else now
        result: dict[str, float] = {}
        alive: dict[str, float] = {}
        first = True
        for key in keys:
            owners = blocks_get(key)
            spec = spec_get(key)
            if owners is None and spec is None:
                break
            if first:
                first = False
                if owners:
                    for ep, mask in owners.items():
                        alive[ep] = weight(mask)
                if spec:
                    for ep, exp in spec.items():
                        if exp > now and ep not in alive:
                            alive[ep] = 1.0
                if not alive:
                    break
                continue
            for ep in list(alive):
                got = owners.get(ep) if owners else None
                if got is not None:
                    alive[ep] += weight(got)
                elif spec is not None and spec.get(ep, 0.0) > now:
                    alive[ep] += 1.0
                else:
                    result[ep] = alive.pop(ep)
            if not alive:
                break
        result.update(alive)
        return result

    def namespace_for(self, model: str) -> str:
        """Key namespace of a request's target model: the adapter name for a LoRA adapter the
        engines reported, "" (the base model) otherwise."""
        return model if model in self.adapters else ""

    def block_size(self, endpoint: str) -> int:
        ps = self._pods.get(endpoint)
        return ps.block_size if ps is not None else 0

    def pod_model(self, endpoint: str) -> str | None:
        ps = self._pods.get(endpoint)
        return ps.model if ps is not None else None

    # ------------------------------------------------------------------ introspection
    @property
    def entries(self) -> int:
        """(block, endpoint) pairs held (speculative ones excluded)."""
        return self._entries

    @property
    def keys_count(self) -> int:
        return len(self._blocks)

    @property
    def speculative_count(self) -> int:
        return self._spec_count

    def engine_hashes(self, endpoint: str) -> set[int]:
        """The engine hashes the index holds for an endpoint (for comparing with the engine)."""
        ps = self._pods.get(endpoint)
        return set(ps.engine) if ps is not None else set()

    def keys_of(self, endpoint: str) -> set[int]:
        ps = self._pods.get(endpoint)
        return set(ps.keys) if ps is not None else set()

    def endpoints(self) -> list[str]:
        return list(self._pods)

    def _report(self) -> None:
        m = self.metrics
        if m is not None:
            m.precise_index_entries.set(self._entries)
            m.precise_index_keys.set(len(self._blocks))
            m.precise_speculative_entries.set(self._spec_count)
