"""Placement decisions: where to load a model, what to evict, how many copies, what to unload.

Pure functions of the fleet view, the demand per model, the settings and ``now`` — no I/O,
no clock — so the whole policy is unit-tested with a fake clock (``tests/unit/placement``).

The rules (docs/model-sharing.md explains them with their knobs):

* **Cold miss** (a request for an adapter loaded nowhere): load it on a pod with a free
  adapter slot, the least loaded first; with no free slot anywhere, evict the idle copy whose
  model is asked for least (request rate per copy averaged over ``demandWindow``; among
  equals the least recently used: plain LRU when nothing is known yet), however young
  (only a copy loaded in the last ``COLD_GRACE`` seconds goes last). Evicting the least
  asked-for keeps the misses — and so the loads — to the rarest models, which LRU alone does
  not under a skewed popularity; sparing young copies (``minChurnAge``) would not either: a
  rare model just loaded for its miss would push the next miss onto an older, more popular
  copy, and the misses spread over every model.
  A copy with requests in flight, or running/waiting in the pod's metrics,
  is never evicted: the request waits for one to become idle instead (up to ``holdTimeout``).
* **Copies follow demand**: a model needs its share of the pool's requests (rate over
  ``scaleWindow``) — or of the requests in flight, if larger: a model whose copies queue
  takes a bigger share of those — in pods' worth, where one copy may take ``copyLoadFactor``
  times an average pod's share; but no more copies than it keeps busy (``minInflightPerCopy``
  requests in flight each). Rounded up, at most ``maxCopies`` and one per pod. Up fast (the
  requests in flight right now count when they show more need: a model that just turned hot
  queues on its copies at once), down slowly (the averages only). New copies go
  where the least work is expected (each model's rate split over its copies), to a free slot,
  or evicting a copy whose request rate per copy is ``evictionRatio`` times lower than the hot
  model's (and older than ``minChurnAge``). Sized as a share of the pool, the rule gives the
  same answer on every replica, at any load level, and needs no per-deployment
  requests-per-minute threshold.
* **Pod capacity** (requests one pod runs at once: the most seen running while requests
  waited, learned from the pods' own metrics; until a pod was seen full the rules above and
  below apply as written). Known, it replaces the share of the requests in flight — which
  a burst of arrivals inflates, adding copies that each push out a rarer model, which then
  misses — by what a copy can run: a model needs at least ``concurrency / capacity`` copies
  and, right now, the copies its requests in flight fill. A burst its copies can run adds
  nothing. And an extra copy never evicts the only copy of a model asked for within
  ``demandWindow`` (``protected``) unless the hot model is overloaded (more requests in flight
  than its copies run): with as many slots as adapters, each extra copy costs a load per
  request of the model it pushed out; extra copies take free slots, copies of models nobody
  asks for, or other models' spare copies.
* **Hot pods**: a pod whose expected work (each model's rate split over its copies) exceeds
  ``copyLoadFactor`` times the average pod's gets relief: its busiest model gets one more copy
  where the least work is expected, and the scheduler shifts work to it. (At start every load
  is a cold miss placed before any rate is known; this undoes an unlucky co-location without
  moving anything.) With the pods' capacity known, only a pod that also expects more
  requests in flight than it runs at once (each model's averaged in flight split over its
  copies): above the average is no reason for a copy while the pod keeps up.
* **Scale down**: a model whose copies exceed what it would need with 25 % more demand (a
  band, so copies do not flap at a boundary) for ``scaleDownDelay``, and whose remaining
  copies' pods would not become hot, loses its least used copy, one per delay. A copy nobody
  used for ``idleUnloadAfter`` is unloaded, the last one too: an adapter with no demand frees
  its slot (scale to zero per model).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import xxhash

from epp.datalayer.datastore import CatalogueModel
from epp.placement.config import PlacementConfig
from epp.placement.fleet import Copy, Fleet, ModelState, PodView, per_copy_demand, per_copy_rate

COLD = "cold"
SCALE_UP = "scale_up"
IDLE = "idle"
SCALE_DOWN = "scale_down"
EVICTED = "evicted"
#: a cold miss evicts the least asked-for idle copy however young, except one loaded this
#: moment (its held requests may not be routed yet) while any other can go
COLD_GRACE = 5.0
#: a copy is surplus only if it would be with this much more demand (no flapping at a boundary)
SURPLUS_SLACK = 1.25


@dataclass(slots=True, frozen=True)
class Load:
    model: str
    pod: str
    reason: str  # COLD | SCALE_UP
    evict: str | None = None  # unloaded from the pod first (reason EVICTED)


@dataclass(slots=True, frozen=True)
class Unload:
    model: str
    pod: str
    reason: str  # IDLE | SCALE_DOWN


Action = Load | Unload


def loadable(model: str, catalogue: Mapping[str, CatalogueModel]) -> bool:
    """Placement may load (and so unload) only catalogue adapters: it knows their path."""
    entry = catalogue.get(model)
    return entry is not None and entry.path is not None


def _idle(pod: PodView, model: str, copy: Copy) -> bool:
    return copy.inflight == 0 and model not in pod.active and not pod.busy(model)


def _tie(pod: str, model: str) -> int:
    """A stable per-(pod, model) order among equal pods: spreads models, same on every replica."""
    return xxhash.xxh64_intdigest(f"{pod}\0{model}".encode())


def victim(pod: PodView, fleet: Fleet, models: Mapping[str, ModelState],
           catalogue: Mapping[str, CatalogueModel], now: float,
           min_age: float, keep: frozenset[str] = frozenset()) -> tuple[float, float, float, str] | None:
    """The copy on ``pod`` to unload for another one: idle, loaded at least ``min_age`` ago, not
    in ``keep``, the least asked for (request rate per copy), the least recently used among
    equals. Returns (rate per copy, last use, demand per copy, model)."""
    best: tuple[float, float, float, str] | None = None
    for m, c in pod.adapters.items():
        if (not loadable(m, catalogue) or not _idle(pod, m, c) or now - c.since < min_age
                or m in keep):
            continue
        cand = (per_copy_rate(m, models, fleet), c.last_used, per_copy_demand(m, models, fleet), m)
        if best is None or cand < best:
            best = cand
    return best


def choose_pod(model: str, fleet: Fleet, models: Mapping[str, ModelState],
               catalogue: Mapping[str, CatalogueModel], cfg: PlacementConfig, now: float, *,
               cold: bool, exclude: frozenset[str] = frozenset(),
               keep: frozenset[str] = frozenset()) -> Load | None:
    """Where a new copy of ``model`` goes (None: nowhere right now).

    Free slot first (the pod expecting the least work from the copies it holds, then the least
    loaded right now), else evict an idle copy (``victim``): for a cold miss the least
    asked-for one across pods, for a scale-up one on the pod expecting the least work. For a
    cold miss any idle copy may go (one loaded in the last ``COLD_GRACE`` seconds only if
    nothing else can); for a scale-up only a copy older than ``minChurnAge`` whose demand
    per copy is ``evictionRatio`` times below the hot model's, and never one of a model in
    ``keep`` (``protected``: an extra copy must not push out a model still asked for).
    """
    st = models.get(model)
    hot = (st.recent_rate if st is not None else 0.0) / max(1, fleet.copies(model))
    best: tuple[tuple[float, ...], Load] | None = None
    for ages in ((min(cfg.min_churn_age, COLD_GRACE), 0.0) if cold else (cfg.min_churn_age,)):
        for pod in fleet.pods.values():
            if (pod.slots <= 0 or pod.key in exclude or pod.serves(model) or pod.loading
                    or pod.busy(model)):
                continue
            expected = pod_demand(pod, models, fleet)
            if pod.free_slots() > 0:
                key = (0, expected, 0.0, pod.load, _tie(pod.key, model))
                load = Load(model, pod.key, COLD if cold else SCALE_UP)
            else:
                v = victim(pod, fleet, models, catalogue, now, ages, frozenset() if cold else keep)
                if v is None or (not cold and v[0] * cfg.eviction_ratio >= hot):
                    continue
                # cold: the least asked-for copy anywhere (the least likely to be missed);
                # scale-up: the pod expecting the least work, the new copy's must go where
                # there is room
                key = ((1, v[0], v[1], expected, _tie(pod.key, model)) if cold
                       else (1, expected - v[0], v[0], v[1], _tie(pod.key, model)))
                load = Load(model, pod.key, COLD if cold else SCALE_UP, evict=v[3])
            if best is None or key < best[0]:
                best = (key, load)
        if best is not None:
            break
    return None if best is None else best[1]


def copies_needed(model: ModelState, totals: tuple[float, float], capable_pods: int,
                  cfg: PlacementConfig, capacity: int = 0) -> float:
    """Fractional copies ``model`` needs: its share of the pool's requests in pods' worth at
    ``copyLoadFactor``; capped by the copies its in-flight requests keep busy (module doc).
    ``totals``: (request rate, in flight) over every model.

    ``capacity`` (requests a pod runs at once, learned from the pods' metrics; 0: unknown) adds
    the copies its requests in flight fill (``concurrency / capacity``: more than one pod's
    worth only when the model alone keeps its copies full). Unknown, the share of the
    requests in flight stands in for it (which grows when its copies queue — but also with a
    burst of arrivals, so it over-copies: each extra copy evicts a rarer model that then
    misses)."""
    total_rate, total_inflight = totals
    if capable_pods <= 0:
        return 0.0
    share = 0.0
    if total_rate > 0.0:
        share = model.recent_rate / total_rate
    if capacity <= 0 and total_inflight > 0.0:
        share = max(share, model.concurrency / total_inflight)
    need = share * capable_pods / cfg.copy_load_factor
    if capacity > 0:
        need = max(need, model.concurrency / capacity)
    return min(need, model.concurrency / cfg.min_inflight_per_copy)


def copies_wanted_now(model: ModelState, totals: tuple[float, float], capable_pods: int,
                      cfg: PlacementConfig, capacity: int = 0) -> int:
    """Scale up fast, down slowly: the smoothed need, or the need the requests in flight right
    now show if larger (a model that just turned hot queues on its few copies within seconds,
    long before its averaged rate catches up). ``totals[1]`` must then be the in-flight total
    now. Scale-down decisions use the smoothed need only. With ``capacity`` known, "now" is
    the copies the requests in flight fill: a burst within what its copies run at once adds
    nothing."""
    now = ModelState(model.name, recent_rate=model.recent_rate, concurrency=max(model.concurrency, model.inflight))
    smoothed = copies_needed(model, totals, capable_pods, cfg, capacity)
    return _whole(max(smoothed, copies_needed(now, totals, capable_pods, cfg, capacity)), capable_pods, cfg)


def overloaded(model: ModelState, copies: int, capacity: int) -> bool:
    """The model's requests in flight (now or averaged) are more than its copies run at once:
    its requests queue however the pods are shared. Only then may an extra copy push out the
    only copy of a model still asked for."""
    return capacity > 0 and max(model.inflight, model.concurrency) > max(1, copies) * capacity


def protected(fleet: Fleet, models: Mapping[str, ModelState], cfg: PlacementConfig, now: float) -> frozenset[str]:
    """Models whose only copy a scale-up must not evict: asked for within ``demandWindow``.
    With 32 adapters on 32 slots every extra copy of a hot model pushes one out, and each
    request for it is then a load (stalling its pod): keep every model with recent demand
    resident and give extra copies only free slots, copies nobody asks for, or other
    models' spare copies."""
    return frozenset(m for m, st in models.items()
                     if fleet.copies(m) == 1 and now - st.last_request < cfg.demand_window)


def _whole(need: float, capable_pods: int, cfg: PlacementConfig) -> int:
    if capable_pods <= 0:
        return 0
    return max(1, min(math.ceil(need - 1e-9), capable_pods, cfg.max_copies or capable_pods))


def pod_demand(pod: PodView, models: Mapping[str, ModelState], fleet: Fleet) -> float:
    """Requests per second a pod can expect from the adapters it holds (each model's rate split
    evenly over its copies): where a new copy goes, so hot copies do not pile onto one pod."""
    return sum(per_copy_rate(m, models, fleet) for m in pod.adapters)


def desired_copies(model: ModelState, totals: tuple[float, float], capable_pods: int, cfg: PlacementConfig,
                   slack: float = 1.0, capacity: int = 0) -> int:
    """Whole copies for ``copies_needed`` x ``slack`` (at least 1, at most one per pod)."""
    return _whole(copies_needed(model, totals, capable_pods, cfg, capacity) * slack, capable_pods, cfg)


def plan(fleet: Fleet, models: Mapping[str, ModelState], catalogue: Mapping[str, CatalogueModel],
         cfg: PlacementConfig, now: float, owns: Callable[[str], bool]) -> list[Action]:
    """One reconcile tick: idle unloads, then copies up or down for every model this replica
    decides for (``owns``). Cold loads are not planned here: requests trigger them.

    A surplus copy is first *drained* (this replica routes no new request to it) and unloaded
    once idle, so scaling down never cuts a request short."""
    actions: list[Action] = []
    leaving: set[tuple[str, str]] = set()
    for pod in fleet.pods.values():
        for m, c in pod.adapters.items():
            if not owns(m) or not loadable(m, catalogue) or not _idle(pod, m, c):
                continue
            if m in pod.draining:
                actions.append(Unload(m, pod.key, SCALE_DOWN))
            elif now - c.last_used >= cfg.idle_unload_after:
                actions.append(Unload(m, pod.key, IDLE))
            else:
                continue
            leaving.add((m, pod.key))
    capable = sum(1 for p in fleet.pods.values() if p.slots > 0)
    capacity = fleet.capacity()
    keep = protected(fleet, models, cfg, now) if capacity > 0 else frozenset()
    total = (sum(st.recent_rate for st in models.values()), sum(st.concurrency for st in models.values()))
    total_now = (total[0], sum(max(st.concurrency, st.inflight) for st in models.values()))
    demand_of = {k: pod_demand(p, models, fleet) for k, p in fleet.pods.items() if p.slots > 0}
    limit = cfg.copy_load_factor * sum(demand_of.values()) / max(1, len(demand_of))
    relief = _relief(fleet, models, catalogue, demand_of, limit, owns, capable, cfg, capacity)
    for name, st in models.items():
        if not owns(name) or not loadable(name, catalogue):
            continue
        keys = [k for k in fleet.holders.get(name, ()) if (name, k) not in leaving]
        draining = [k for k in keys if name in fleet.pods[k].draining]
        holders = [k for k in keys if name not in fleet.pods[k].draining]
        if not holders:
            st.surplus_since = None
            continue  # loaded nowhere (or only draining): the next request decides
        loading = sum(1 for p in fleet.pods.values() if name in p.loading)
        want = copies_wanted_now(st, total_now, capable, cfg, capacity)
        if name in relief and loading == 0:
            want = max(want, len(holders) + 1)
        have = len(holders) + loading
        if have < want:
            st.surplus_since = None
            for key in draining[: want - have]:  # demand came back: keep what is still there
                fleet.pods[key].draining.discard(name)
                have += 1
            chosen: set[str] = set()
            for _ in range(want - have):
                load = choose_pod(name, fleet, models, catalogue, cfg, now, cold=False,
                                  exclude=frozenset(chosen),
                                  keep=frozenset() if overloaded(st, have, capacity) else keep)
                if load is None:
                    break
                chosen.add(load.pod)
                actions.append(load)
        elif (len(holders) > desired_copies(st, total, capable, cfg, SURPLUS_SLACK, capacity) and loading == 0
              and not draining):
            if st.surplus_since is None:
                st.surplus_since = now
            elif now - st.surplus_since >= cfg.scale_down_delay:
                drop = _least_used(name, holders, fleet, now, cfg.min_churn_age)
                # only if the copies that stay do not become the hot pods a copy was added for
                more = st.recent_rate / max(1, len(holders) - 1) - st.recent_rate / len(holders)
                if drop is not None and all(demand_of.get(k, 0.0) + more <= limit for k in holders if k != drop):
                    fleet.pods[drop].draining.add(name)
                    st.surplus_since = now  # one copy per delay: copies scale down slowly
        else:
            st.surplus_since = None
    return actions


def _relief(fleet: Fleet, models: Mapping[str, ModelState], catalogue: Mapping[str, CatalogueModel],
            demand_of: Mapping[str, float], limit: float, owns: Callable[[str], bool], capable: int,
            cfg: PlacementConfig, capacity: int = 0) -> set[str]:
    """Models that get one more copy because a pod holding them expects more than
    ``copyLoadFactor`` times the average pod's work — and, with the pods' ``capacity`` known,
    more requests in flight than it runs at once (each model's averaged in flight split over
    its copies): above the average is no reason for a copy when the pod keeps up.
    On each such pod, the model with the most requests per copy (that may still grow).
    Copies first land where the demand was unknown (at start every load is a cold miss); this
    is how a pod that collected several busy models gets relief without moving anything: the
    scheduler shifts the work to the new copy."""
    out: set[str] = set()
    cap = min(capable, cfg.max_copies or capable)
    for key, expected in demand_of.items():
        if limit <= 0.0 or expected <= limit:
            continue
        if capacity > 0 and sum(per_copy_demand(m, models, fleet) for m in fleet.pods[key].adapters) <= capacity:
            continue
        best: tuple[float, str] | None = None
        for m in fleet.pods[key].adapters:
            st = models.get(m)
            busy = 0.0 if st is None else max(st.concurrency, st.inflight) / cfg.min_inflight_per_copy
            # only a model with the work to keep one more copy busy (never for a trickle)
            if owns(m) and loadable(m, catalogue) and fleet.copies(m) < min(cap, busy):
                cand = (per_copy_rate(m, models, fleet), m)
                if best is None or cand > best:
                    best = cand
        if best is not None:
            out.add(best[1])
    return out


def _least_used(model: str, holders: list[str], fleet: Fleet, now: float, min_age: float) -> str | None:
    """The copy to drain: fewest requests in flight, then least recently used."""
    best: tuple[int, float, int, str] | None = None
    for key in holders:
        c = fleet.pods[key].adapters.get(model)
        if c is None or now - c.since < min_age:
            continue
        cand = (c.inflight, c.last_used, _tie(key, model), key)
        if best is None or cand < best:
            best = cand
    return None if best is None else best[3]
