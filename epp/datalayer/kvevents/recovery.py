"""Re-anchoring orphaned blocks, so the index recovers what an engine still holds.

After a resync, a late start or a truncated replay the index has lost blocks the engine
still caches, and vLLM never publishes a cached block again: every block it stores on top of
one arrives as an *orphan* (parent engine hash unknown). Dropping those (what a plain dual-key
index does) loses the endpoint's affinity until the engine evicts the whole prefix.

The requests the picker routes carry the missing prefixes (``anchor.py``):

* **on an orphan** the recent requests are searched for one whose tokens the event's first
  block continues (newest first); a verified match (engine hash recipe reproduces the event's
  parent hash) re-keys the whole prefix with its engine hashes, then the event is applied;
* **otherwise the orphan waits** (bounded, ``pending_ttl``) with the orphans stored on top of
  it, and every later request is checked against the waiting ones by the content hash of its
  blocks — any picker replica anchors them with the first request that carries the prefix,
  whichever endpoint it is routed to.

Unverified anchors (LoRA adapters, unknown hash seeds; see ``anchor.py``) are taken only
from a request routed to that very endpoint, at a unique position, and only while no recipe
has ever verified for the endpoint. Engine hashes removed after an orphan arrived (unknown
then) are remembered so a late anchor does not resurrect an evicted block.

Requests are recorded only while some endpoint is recovering (``window`` after the last
resync or orphan), so a healthy index pays nothing.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from time import monotonic
from typing import TYPE_CHECKING

from xxhash import xxh64_intdigest

from epp.datalayer.kvevents.anchor import HashRecipe, PickRecord, make_recipes, positions, published
from epp.datalayer.kvevents.decode import BlockStored
from epp.datalayer.kvevents.keys import block_keys, token_array

if TYPE_CHECKING:
    from collections.abc import Sequence

    from epp.datalayer.kvevents.index import KVBlockIndex


@dataclass(slots=True)
class _Pending:
    at: float
    clock: int  # the endpoint's removal clock when the orphan arrived
    ev: BlockStored
    first: int  # content hash of the event's first block


@dataclass(slots=True)
class _Endpoint:
    until: float = 0.0  # recovering until (monotonic)
    pending: deque[_Pending] = field(default_factory=deque)
    pending_blocks: int = 0
    #: engine hashes removed while unknown → removal clock
    removed: OrderedDict[int, int] = field(default_factory=OrderedDict)
    clock: int = 0
    recipe: HashRecipe | None = None  # the recipe that verified last on this endpoint
    verified_ever: bool = False


def _first_hash(tokens: Sequence[int], block_size: int) -> int:
    return xxh64_intdigest(token_array(tokens[:block_size]).tobytes())


@dataclass(slots=True)
class OrphanRecovery:
    index: KVBlockIndex
    engine_hash_seed: str | None = None
    window: float = 120.0
    pick_ttl: float = 30.0
    max_picks: int = 64
    pending_ttl: float = 60.0
    max_pending_blocks: int = 8192
    max_removed: int = 16384
    recipes: tuple[HashRecipe, ...] = ()
    _eps: dict[str, _Endpoint] = field(default_factory=dict)
    _picks: deque[tuple[PickRecord, str | None]] = field(default_factory=deque)
    _pending_total: int = 0
    _until: float = 0.0  # the latest endpoint's recovery deadline

    def __post_init__(self) -> None:
        if not self.recipes:
            self.recipes = make_recipes(self.engine_hash_seed)

    # ------------------------------------------------------------------ state
    def recovering(self, now: float | None = None) -> bool:
        """Whether requests should be recorded (some endpoint is recovering)."""
        return self._pending_total > 0 or (monotonic() if now is None else now) < self._until

    def recovering_endpoint(self, endpoint: str, now: float | None = None) -> bool:
        st = self._eps.get(endpoint)
        return st is not None and (bool(st.pending) or (monotonic() if now is None else now) < st.until)

    def start(self, endpoint: str, now: float | None = None) -> None:
        """The endpoint's view may be incomplete from now on (start, resync, truncated replay)."""
        now = monotonic() if now is None else now
        st = self._eps.setdefault(endpoint, _Endpoint())
        st.until = max(st.until, now + self.window)
        self._until = max(self._until, st.until)

    def on_clear(self, endpoint: str) -> None:
        st = self._eps.get(endpoint)
        if st is not None:
            self._drop_pending(st, len(st.pending))
            st.removed.clear()
        self.start(endpoint)

    def forget(self, endpoint: str) -> None:
        st = self._eps.pop(endpoint, None)
        if st is not None:
            self._drop_pending(st, len(st.pending), count=False)
        self._picks = deque((r, ep) for r, ep in self._picks if ep != endpoint)

    def pending_blocks(self) -> int:
        return self._pending_total

    # ------------------------------------------------------------------ events (index → here)
    def on_unknown_removed(self, endpoint: str, hashes: Sequence[int]) -> None:
        st = self._eps.get(endpoint)
        if st is None or not (st.pending or st.until > monotonic()):
            return
        st.clock += 1
        removed = st.removed
        for h in hashes:
            removed[h] = st.clock
            removed.move_to_end(h)
        while len(removed) > self.max_removed:
            removed.popitem(last=False)

    def on_orphan(self, endpoint: str, ev: BlockStored) -> None:
        now = monotonic()
        self.start(endpoint, now)
        st = self._eps[endpoint]
        first = _first_hash(ev.token_ids, ev.block_size)
        pending = _Pending(now, st.clock, ev, first)
        for rec, target in reversed(self._picks):
            if now - rec.at > self.pick_ttl:
                break
            if self._anchor(endpoint, st, pending, rec, target == endpoint, exact_only=False):
                self._drain(endpoint, st)
                return
        st.pending.append(pending)
        n = len(ev.block_hashes)
        st.pending_blocks += n
        self._pending_total += n
        self._expire(st, now)
        self._report()

    # ------------------------------------------------------------------ requests (scorer → here)
    def observe(self, endpoint: str | None, tokens: Sequence[int], block_size: int, namespace: str,
                salt: str | None, now: float | None = None) -> None:
        """A request the picker routed to ``endpoint``: remember it briefly and anchor waiting
        orphans it carries the prefix of."""
        now = monotonic() if now is None else now
        if not self.recovering(now) or len(tokens) < 2 * block_size:
            return
        rec = PickRecord(now, token_array(tokens), block_size, namespace, salt)
        picks = self._picks
        picks.append((rec, endpoint))
        while picks and (len(picks) > self.max_picks or now - picks[0][0].at > self.pick_ttl):
            picks.popleft()
        if not self._pending_total:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (a synchronous caller): anchor now
            self._match_pending(rec, endpoint, now)
        else:  # after the request has gone on its way: hashing the prefix is not its cost
            loop.call_soon(self._match_pending, rec, endpoint, now)

    def _match_pending(self, rec: PickRecord, endpoint: str | None, now: float) -> None:
        bs = rec.block_size
        data = rec.tokens.tobytes()
        step = 4 * bs
        blocks = {xxh64_intdigest(data[i:i + step]) for i in range(step, len(data) - step + 1, step)}
        for ep, st in list(self._eps.items()):
            self._expire(st, now)
            if not st.pending:
                continue
            anchored = False
            for p in list(st.pending):
                if p.first in blocks and p.ev.block_size == bs and p in st.pending \
                        and self._anchor(ep, st, p, rec, ep == endpoint, exact_only=True):
                    self._remove_pending(st, p)
                    anchored = True
            if anchored:
                self._drain(ep, st)
        self._report()

    # ------------------------------------------------------------------ anchoring
    def _anchor(self, endpoint: str, st: _Endpoint, p: _Pending, rec: PickRecord, routed_here: bool,
                exact_only: bool) -> bool:
        ev = p.ev
        bs = ev.block_size
        if rec.block_size != bs or rec.namespace != (ev.lora_name or ""):
            return False
        first = token_array(ev.token_ids[:bs])
        cands = positions(rec, first, exact_only)
        if not cands:
            return False
        parent_hash = ev.parent_block_hash
        assert parent_hash is not None
        if not rec.namespace:  # the base model: the engine's hashes are reproducible
            recipes = self.recipes
            if st.recipe is not None:
                recipes = (st.recipe, *(r for r in recipes if r is not st.recipe))
            top = cands[0]
            for recipe in recipes:
                digests = recipe.chain(rec.tokens, bs, top, rec.salt)
                for j in cands:
                    if published(digests[j - 1]) == parent_hash:
                        st.recipe = recipe
                        st.verified_ever = True
                        self._insert(endpoint, st, p, rec, j, [published(d) for d in digests[:j]])
                        return True
        if not routed_here or st.verified_ever:
            return False
        exact = positions(rec, first, exact_only=True)
        if len(exact) != 1:
            return False
        self._insert(endpoint, st, p, rec, exact[0], None)
        return True

    def _insert(self, endpoint: str, st: _Endpoint, p: _Pending, rec: PickRecord, j: int,
                hashes: list[int] | None) -> None:
        """The engine held the request's first ``j`` blocks when ``p`` arrived: hold them, then
        apply the orphan on top."""
        index = self.index
        ev = p.ev
        keys = block_keys(rec.tokens, rec.block_size, rec.namespace, j, extras=(rec.salt,) if rec.salt else ())
        gone = self._removed_since(st, p.clock)
        if hashes is not None:
            for key, h in zip(keys, hashes, strict=True):
                if h not in gone:
                    index.add_block(endpoint, key, h)
            index.stats.anchored += len(ev.block_hashes)
        else:
            if ev.parent_block_hash not in gone:
                index.add_block(endpoint, keys[-1], ev.parent_block_hash or 0)
            for key in keys[:-1]:
                index.add_hashless(endpoint, key)
            index.stats.anchored_unverified += len(ev.block_hashes)
        index.store_on(endpoint, ev, keys[-1], gone)
        self._count("anchored" if hashes is not None else "anchored_unverified", len(ev.block_hashes))

    def _drain(self, endpoint: str, st: _Endpoint) -> None:
        """Apply waiting orphans whose parent is now known (in arrival order)."""
        index = self.index
        progress = True
        while progress and st.pending:
            progress = False
            for p in list(st.pending):
                parent = index.parent_key(endpoint, p.ev.parent_block_hash or 0)
                if parent is None:
                    continue
                self._remove_pending(st, p)
                index.store_on(endpoint, p.ev, parent, self._removed_since(st, p.clock))
                label = "anchored" if st.verified_ever else "anchored_unverified"
                if label == "anchored":
                    index.stats.anchored += len(p.ev.block_hashes)
                else:
                    index.stats.anchored_unverified += len(p.ev.block_hashes)
                self._count(label, len(p.ev.block_hashes))
                progress = True

    def _removed_since(self, st: _Endpoint, clock: int) -> set[int]:
        if not st.removed or clock >= st.clock:
            return set()
        return {h for h, c in st.removed.items() if c > clock}

    # ------------------------------------------------------------------ bookkeeping
    def _remove_pending(self, st: _Endpoint, p: _Pending) -> None:
        st.pending.remove(p)
        n = len(p.ev.block_hashes)
        st.pending_blocks -= n
        self._pending_total -= n

    def _expire(self, st: _Endpoint, now: float) -> None:
        n = 0
        for p in st.pending:
            if now - p.at <= self.pending_ttl and self._pending_total - n <= self.max_pending_blocks:
                break
            n += 1
        if n:
            self._drop_pending(st, n)

    def _drop_pending(self, st: _Endpoint, n: int, count: bool = True) -> None:
        for _ in range(n):
            p = st.pending.popleft()
            k = len(p.ev.block_hashes)
            st.pending_blocks -= k
            self._pending_total -= k
            if count:
                self.index.stats.orphans_dropped += k
                self._count("dropped", k)
        self._report()

    def _count(self, outcome: str, n: int) -> None:
        m = self.index.metrics
        if m is not None and n:
            m.kv_events_orphans.labels(outcome).inc(n)

    def _report(self) -> None:
        m = self.index.metrics
        if m is not None:
            m.kv_events_orphans_pending.set(self._pending_total)
