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

A stored block whose parent is unknown (an *orphan*: the picker started late, or resynced)
is handed to ``OrphanRecovery``, which re-anchors it from the requests the picker routed.

Memory (``benchmarks/precise_index.py``): endpoints are interned to small indices and both
maps are flat arrays (``table.U64Map``, ``owners.OwnerTable``), about 40-90 bytes per
(block, endpoint) entry instead of ~430 with dicts of ints. ``max_entries`` bounds the total;
an engine cannot hold more blocks than its cache, so an endpoint that pushes the index over
the bound has a stream the index cannot trust, and the largest endpoint is dropped (resync).

Speculative entries close the gap between a pick and the engine's events: the scorer inserts
the request's keys for the chosen endpoint with a short TTL so a burst of requests sharing a
prefix sticks before ``BlockStored`` arrives. A ``BlockRemoved`` for the block drops the
speculative entry too, so an eviction is never masked by a guess.

Everything here is synchronous and runs on the event loop: event handling from the
subscribers' tasks, matching from the scheduler.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from time import monotonic
from typing import TYPE_CHECKING

from epp.datalayer.kvevents.decode import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from epp.datalayer.kvevents.keys import block_keys, root_key
from epp.datalayer.kvevents.owners import MAX_ENDPOINTS, OwnerTable
from epp.datalayer.kvevents.recovery import OrphanRecovery
from epp.datalayer.u64map import U64Map

__all__ = ["DEFAULT_MEDIUM_WEIGHTS", "IndexStats", "KVBlockIndex", "block_keys", "root_key"]

if TYPE_CHECKING:
    from epp.metrics import EppMetrics

DEFAULT_MEDIUM = "GPU"
DEFAULT_MEDIUM_WEIGHTS: Mapping[str, float] = {"GPU": 1.0, "CPU": 0.8}
#: weight of a medium not listed in the configured weights
UNKNOWN_MEDIUM_WEIGHT = 0.5
#: engine-map tag of a block held without a known engine hash (an unverified re-anchor)
HASHLESS_TAG = 0x5EED_0F_A11_0F_B10C


@dataclass(slots=True)
class _PodState:
    idx: int
    #: engine hash → key (uint64 both)
    engine: U64Map = field(default_factory=lambda: U64Map(signed=False))
    #: keys held under more than one engine hash → extra count (rare: hash inputs the key lacks)
    aliases: dict[int, int] = field(default_factory=dict)
    block_size: int = 0
    #: the base model named by the pod's topic (``kv@<pod>@<model>``), when known
    model: str | None = None


@dataclass(slots=True)
class IndexStats:
    stored: int = 0
    removed: int = 0
    cleared: int = 0
    orphans: int = 0  # blocks of stored events whose parent the index did not know
    anchored: int = 0  # orphan blocks (and their prefixes) re-keyed with verified engine hashes
    anchored_unverified: int = 0  # ... re-keyed without a reproducible engine hash
    orphans_dropped: int = 0  # orphan blocks never anchored (expired / overflow)
    overflows: int = 0  # endpoints dropped because the index went over max_entries


@dataclass(slots=True)
class KVBlockIndex:
    #: bound on (block, endpoint) entries
    max_entries: int = 4_000_000
    medium_weights: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_MEDIUM_WEIGHTS))
    metrics: EppMetrics | None = None
    #: PYTHONHASHSEED of the engines, if set (their hash chain root depends on it)
    engine_hash_seed: str | None = None
    _owners: OwnerTable = field(default_factory=OwnerTable)
    _pods: dict[str, _PodState] = field(default_factory=dict)
    _names: list[str] = field(default_factory=list)  # endpoint index → name
    _free_idx: list[int] = field(default_factory=list)
    _medium_bits: dict[str, int] = field(default_factory=lambda: {"GPU": 1, "CPU": 2})
    _mask_weight: dict[int, float] = field(default_factory=dict)
    #: key → {endpoint: expiry (monotonic)}
    _spec: dict[int, dict[str, float]] = field(default_factory=dict)
    _spec_queue: deque[tuple[float, str, list[int]]] = field(default_factory=deque)
    _spec_count: int = 0
    #: LoRA adapter names seen in events (a request for one of them uses its namespace)
    adapters: set[str] = field(default_factory=set)
    stats: IndexStats = field(default_factory=IndexStats)
    recovery: OrphanRecovery = field(init=False)

    def __post_init__(self) -> None:
        self.recovery = OrphanRecovery(self, self.engine_hash_seed)

    # ------------------------------------------------------------------ tiers
    def _bit(self, medium: str | None) -> int:
        m = (medium or DEFAULT_MEDIUM).upper()
        bit = self._medium_bits.get(m)
        if bit is None:
            # four bits per owner: GPU, CPU and two more mediums; later ones share the last
            bit = 1 << min(len(self._medium_bits), 3)
            self._medium_bits[m] = bit
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

    # ------------------------------------------------------------------ endpoints
    def pod(self, endpoint: str) -> _PodState:
        ps = self._pods.get(endpoint)
        if ps is None:
            if self._free_idx:
                idx = self._free_idx.pop()
                self._names[idx] = endpoint
            else:
                idx = len(self._names)
                if idx >= MAX_ENDPOINTS:
                    raise OverflowError(f"more than {MAX_ENDPOINTS} endpoints in the precise index")
                self._names.append(endpoint)
            ps = self._pods[endpoint] = _PodState(idx)
        return ps

    def set_pod_model(self, endpoint: str, model: str | None) -> None:
        if model:
            self.pod(endpoint).model = model

    # ------------------------------------------------------------------ events
    def apply(self, endpoint: str, events: Iterable[KVEvent]) -> None:
        """Apply one batch of an endpoint's events, in order."""
        ps = self.pod(endpoint)
        for ev in events:
            if isinstance(ev, BlockStored):
                if not self._stored(endpoint, ps, ev):
                    self.stats.orphans += len(ev.block_hashes)
                    self.recovery.on_orphan(endpoint, ev)
            elif isinstance(ev, BlockRemoved):
                self._removed(endpoint, ps, ev)
            elif isinstance(ev, AllBlocksCleared):
                self.stats.cleared += 1
                self._clear_pod(endpoint, ps)
        if self._owners.entries > self.max_entries:
            self._overflow()
        self._report()

    def _stored(self, endpoint: str, ps: _PodState, ev: BlockStored) -> bool:
        """Apply a BlockStored; False when it is an orphan (parent unknown)."""
        if ev.group_idx:
            return True  # only the first KV-cache group (full attention) decides prefix hits
        bit = self._bit(ev.medium)
        if not ev.token_ids:
            # a tier copy of blocks the index already knows (e.g. offload to CPU)
            for h in ev.block_hashes:
                key = ps.engine.get(h)
                if key is not None:
                    self._add(ps, key, h, bit)
            return True
        if ev.parent_block_hash is None:
            parent = None
        else:
            parent = ps.engine.get(ev.parent_block_hash)
            if parent is None:
                return False
        bs = ev.block_size
        ps.block_size = bs
        namespace = ev.lora_name or ""
        if ev.lora_name:
            self.adapters.add(ev.lora_name)
        keys = block_keys(ev.token_ids, bs, namespace, len(ev.block_hashes), parent, ev.extras)
        for h, key in zip(ev.block_hashes, keys, strict=False):
            self._add(ps, key, h, bit)
        self.stats.stored += len(keys)
        return True

    def _add(self, ps: _PodState, key: int, engine_hash: int, bit: int) -> None:
        prev = self._owners.add_bit(key, ps.idx, bit)
        engine = ps.engine
        mapped = engine.put_new(engine_hash, key)
        if mapped is None:
            if prev:  # already held under another engine hash (or none: an unverified re-anchor)
                hashless = key ^ HASHLESS_TAG
                if engine.get(hashless) == key:
                    engine.pop(hashless)
                else:
                    ps.aliases[key] = ps.aliases.get(key, 0) + 1
        elif mapped != key:  # the engine reused a hash for other tokens: forget the old block
            engine.put(engine_hash, key)
            self._forget(ps, mapped)

    def store_on(self, endpoint: str, ev: BlockStored, parent: int, skip: set[int] | frozenset[int] = frozenset()
                 ) -> None:
        """Apply an orphan ``BlockStored`` whose parent key is now known (re-anchored); blocks
        whose engine hash is in ``skip`` were evicted since and are left out."""
        ps = self.pod(endpoint)
        bs = ev.block_size
        ps.block_size = bs
        if ev.lora_name:
            self.adapters.add(ev.lora_name)
        bit = self._bit(ev.medium)
        keys = block_keys(ev.token_ids, bs, ev.lora_name or "", len(ev.block_hashes), parent, ev.extras)
        for h, key in zip(ev.block_hashes, keys, strict=False):
            if h not in skip:
                self._add(ps, key, h, bit)
        self.stats.stored += len(keys)
        self._report()

    def add_hashless(self, endpoint: str, key: int) -> None:
        """Hold ``key`` for ``endpoint`` with no engine hash (an unverified re-anchor)."""
        ps = self.pod(endpoint)
        if self._owners.mask(key, ps.idx):
            return
        self._owners.set_mask(key, ps.idx, self._bit(DEFAULT_MEDIUM))
        ps.engine.put(key ^ HASHLESS_TAG, key)

    def add_block(self, endpoint: str, key: int, engine_hash: int, medium: str | None = None) -> None:
        """Hold ``key`` (engine hash known) for ``endpoint``: a re-anchored block."""
        self._add(self.pod(endpoint), key, engine_hash, self._bit(medium))

    def _forget(self, ps: _PodState, key: int) -> None:
        if ps.aliases.get(key):
            ps.aliases[key] -= 1
            if not ps.aliases[key]:
                del ps.aliases[key]
        else:
            self._owners.set_mask(key, ps.idx, 0)

    def _removed(self, endpoint: str, ps: _PodState, ev: BlockRemoved) -> None:
        if ev.group_idx:
            return
        bit = None if ev.medium is None else self._bit(ev.medium)
        owners = self._owners
        unknown: list[int] = []
        for h in ev.block_hashes:
            key = ps.engine.get(h)
            if key is None:
                unknown.append(h)
                continue
            self.stats.removed += 1
            self._drop_spec(key, endpoint)
            mask = owners.mask(key, ps.idx)
            rest = 0 if bit is None else mask & ~bit
            if rest:
                owners.set_mask(key, ps.idx, rest)
                continue
            ps.engine.pop(h)
            if mask:
                self._forget(ps, key)
        if unknown:
            self.recovery.on_unknown_removed(endpoint, unknown)

    def _clear_pod(self, endpoint: str, ps: _PodState) -> None:
        owners = self._owners
        for key in ps.engine.values():
            owners.set_mask(key, ps.idx, 0)
        ps.engine.clear()
        ps.aliases.clear()
        for key in [k for k, pods in self._spec.items() if endpoint in pods]:
            self._drop_spec(key, endpoint)

    def clear_endpoint(self, endpoint: str) -> None:
        """Forget what the endpoint holds (resync after a gap, engine restart)."""
        ps = self._pods.get(endpoint)
        if ps is not None:
            self._clear_pod(endpoint, ps)
        self.recovery.on_clear(endpoint)
        self._report()

    def remove_endpoint(self, endpoint: str) -> None:
        """The endpoint left the pool: forget it entirely."""
        ps = self._pods.pop(endpoint, None)
        if ps is not None:
            self._clear_pod(endpoint, ps)
            self._names[ps.idx] = ""
            self._free_idx.append(ps.idx)
        else:
            for key in [k for k, pods in self._spec.items() if endpoint in pods]:
                self._drop_spec(key, endpoint)
        self.recovery.forget(endpoint)
        self._report()

    def _overflow(self) -> None:
        while self._owners.entries > self.max_entries and self._pods:
            name = max(self._pods, key=lambda n: len(self._pods[n].engine))
            self.stats.overflows += 1
            if self.metrics is not None:
                self.metrics.kv_events_resyncs.labels("index_full").inc()
            self._clear_pod(name, self._pods[name])
            self.recovery.on_clear(name)

    # ------------------------------------------------------------------ speculative
    def add_speculative(self, endpoint: str, keys: Sequence[int], ttl: float, now: float | None = None,
                        held: int = 0) -> None:
        """Guess that ``endpoint`` holds ``keys`` for ``ttl`` seconds; the first ``held`` keys
        are known to be held (``match``'s ``held_counts``) and skipped without a lookup."""
        keys = keys[held:]
        if not keys or ttl <= 0:
            return
        now = monotonic() if now is None else now
        self._prune_spec(now)
        expiry = now + ttl
        spec = self._spec
        ps = self.pod(endpoint)
        owners = self._owners
        added: list[int] = []
        for key in keys:
            if owners.mask(key, ps.idx):
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
    def match(self, keys: Sequence[int], now: float | None = None, held_counts: dict[str, int] | None = None
              ) -> dict[str, float]:
        """Endpoint → weighted count of *consecutive* blocks it holds from the first key.

        A block counts with the weight of its best tier; a live speculative entry counts 1.
        ``held_counts`` (optional) receives, per matched endpoint, how many leading keys it
        holds for real (no speculative entry among them).
        This walk is the scorer's hot path: the table probe is inlined, and a run of keys held
        by the same endpoints with the same tiers (a prefix every pod holds) costs one
        comparison per key.
        """
        if not keys:
            return {}
        table = self._owners.table
        tkeys = table._keys
        tvals = table._vals
        tmask = table._mask
        multi = self._owners._multi
        names = self._names
        spec_map = self._spec
        spec_get = spec_map.get
        weight = self._weight
        now = monotonic() if now is None else now
        result: dict[str, float] = {}
        alive: dict[str, float] = {}
        held: dict[str, float] = {}
        last_v = 0
        last_record = b""
        run_held: dict[str, float] | None = None  # held of the previous key, if it decided alone
        run = 0
        first = True
        guessed: dict[str, int] = {}  # endpoint → first position matched only speculatively
        end = len(keys)
        for pos, key in enumerate(keys):
            v = 0
            if key:  # the table probe, inlined (U64Map.get per block costs a call each)
                i = key & tmask
                while True:
                    x = tkeys[i]
                    if x == key:
                        v = tvals[i]
                        break
                    if x == 0:
                        break
                    i = (i + 1) & tmask
            else:
                v = table.get(0) or 0
            spec = spec_get(key) if spec_map else None
            if not v:
                if spec is None:
                    end = pos
                    break
                held = {}
                last_v = 0
            elif v != last_v:
                last_v = v
                if v > 0:
                    held = {names[v >> 4]: weight(v & 15)}
                else:
                    record = multi[-v - 1]
                    if record != last_record:
                        last_record = record
                        held = {names[record[j] | record[j + 1] << 8]: weight(record[j + 2])
                                for j in range(0, len(record), 3)}
            if first:
                first = False
                alive = dict(held)
                if spec:
                    for ep, exp in spec.items():
                        if exp > now and ep not in alive:
                            alive[ep] = 1.0
                            guessed[ep] = 0
                if not alive:
                    end = 0
                    break
                run_held = held if spec is None else None
                continue
            if spec is None and held is run_held:
                run += 1  # every endpoint still alive holds this key with the same tiers
                continue
            if run:
                assert run_held is not None
                for ep in alive:
                    alive[ep] += run_held[ep] * run
                run = 0
            for ep in list(alive):
                got = held.get(ep)
                if got is not None:
                    alive[ep] += got
                elif spec is not None and spec.get(ep, 0.0) > now:
                    alive[ep] += 1.0
                    guessed.setdefault(ep, pos)
                else:
                    result[ep] = alive.pop(ep)
                    if held_counts is not None:
                        held_counts[ep] = guessed.get(ep, pos)
            if not alive:
                break
            run_held = held if spec is None else None
        if run and run_held is not None:
            for ep in alive:
                alive[ep] += run_held[ep] * run
        result.update(alive)
        if held_counts is not None:
            for ep in alive:
                held_counts[ep] = guessed.get(ep, end)
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

    def holds(self, endpoint: str, key: int) -> bool:
        ps = self._pods.get(endpoint)
        return ps is not None and bool(self._owners.mask(key, ps.idx))

    def parent_key(self, endpoint: str, engine_hash: int) -> int | None:
        ps = self._pods.get(endpoint)
        return None if ps is None else ps.engine.get(engine_hash)

    # ------------------------------------------------------------------ introspection
    @property
    def entries(self) -> int:
        """(block, endpoint) pairs held (speculative ones excluded)."""
        return self._owners.entries

    @property
    def keys_count(self) -> int:
        return len(self._owners)

    @property
    def speculative_count(self) -> int:
        return self._spec_count

    def engine_hashes(self, endpoint: str) -> set[int]:
        """The engine hashes the index holds for an endpoint (for comparing with the engine)."""
        ps = self._pods.get(endpoint)
        if ps is None:
            return set()
        return {h for h, key in ps.engine.items() if h != key ^ HASHLESS_TAG}

    def hashless_count(self, endpoint: str) -> int:
        ps = self._pods.get(endpoint)
        return 0 if ps is None else sum(1 for h, key in ps.engine.items() if h == key ^ HASHLESS_TAG)

    def keys_of(self, endpoint: str) -> set[int]:
        ps = self._pods.get(endpoint)
        return set(ps.engine.values()) if ps is not None else set()

    def endpoints(self) -> list[str]:
        return list(self._pods)

    def nbytes(self) -> int:
        """Bytes of the flat tables (a lower bound of the index's memory)."""
        return self._owners.table.nbytes() + sum(ps.engine.nbytes() for ps in self._pods.values())

    def _report(self) -> None:
        m = self.metrics
        if m is not None:
            m.precise_index_entries.set(self._owners.entries)
            m.precise_index_keys.set(len(self._owners))
            m.precise_speculative_entries.set(self._spec_count)
