"""What model placement knows: which pod holds which model, and how much each model is asked for.

Everything here is rebuilt from the pods' own reports — ``GET /v1/models`` (every adapter and
base model a pod serves) and ``vllm:lora_requests_info`` (adapters with running or waiting
requests, scraped by the data layer) — plus this replica's own completed loads and unloads.
So any picker replica can route correctly without talking to the one that decides.

A ``/v1/models`` answer can be older than a load or unload this replica just completed (the
poll was sent before): each pod carries a ``version`` bumped by every completed load/unload,
and an answer is applied only if the version did not change while it was in flight.

No I/O and no clock of its own: times are passed in, so the policy is tested with a fake clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


@dataclass(slots=True)
class Copy:
    """One model loaded on one pod."""

    #: when this replica first saw it there, or finished loading it
    since: float
    #: last time a request was routed there by this replica or seen running/waiting there
    last_used: float
    #: this replica's requests routed to this copy and not finished
    inflight: int = 0


@dataclass(slots=True)
class PodView:
    """One endpoint as placement sees it."""

    key: str
    #: LoRA adapters registered on the pod (``/v1/models`` entries with a parent)
    adapters: dict[str, Copy] = field(default_factory=dict)
    #: base models the pod serves
    bases: frozenset[str] = frozenset()
    #: ``/v1/models`` answered at least once
    reported: bool = False
    #: adapters with running or waiting requests on the pod (its metrics): never unloaded
    active: frozenset[str] = frozenset()
    #: adapter slots (config ``slotsPerPod``, else the pod's ``max_lora``); 0 = cannot load
    slots: int = 0
    #: queue + running + this picker's in flight: the tie-breaker between equal pods
    load: float = 0.0
    #: requests the pod runs at once when it is full: the most seen running while requests
    #: waited (its ``max_num_seqs`` or KV-cache bound, learned from its own metrics); 0 = never
    #: seen full, so not known
    capacity: int = 0
    #: models with a load (``loading``) or an unload (``unloading``) in flight on this pod
    loading: set[str] = field(default_factory=set)
    unloading: set[str] = field(default_factory=set)
    #: surplus copies being drained: no new requests from this replica, unloaded once idle
    draining: set[str] = field(default_factory=set)
    version: int = 0

    def free_slots(self) -> int:
        return self.slots - len(self.adapters) - len(self.loading)

    def busy(self, model: str) -> bool:
        """A load or unload of ``model`` is in flight here."""
        return model in self.loading or model in self.unloading

    def serves(self, model: str) -> bool:
        return model in self.adapters or model in self.bases

    def observe_load(self, running: int, waiting: int, inflight: int) -> None:
        """The pod's scraped gauges and this picker's in-flight count: ``load`` now, and
        ``capacity`` once the pod has been seen full (requests waiting behind running ones)."""
        self.load = waiting + running + inflight
        if waiting > 0 and running > self.capacity:
            self.capacity = running


@dataclass(slots=True)
class ModelState:
    """Demand for one model, as this replica sees it."""

    name: str
    #: requests between ``ensure`` and ``release`` (waiting, queued or being served)
    inflight: int = 0
    #: of those, requests held because the model is loaded nowhere
    held: int = 0
    #: ``inflight`` and the request rate (req/s) averaged over ``scaleWindow``: what copies
    #: are sized on (the share of the requests, as far as they keep copies busy)
    concurrency: float = 0.0
    recent_rate: float = 0.0
    #: the request rate averaged over ``demandWindow``: which idle copy to evict (the least
    #: asked-for goes first)
    rate: float = 0.0
    #: requests since the last reconcile tick
    arrivals: int = 0
    last_request: float = 0.0
    #: since when the model has had more copies than it needs (None: not in surplus)
    surplus_since: float | None = None
    #: a failed load: requests fail fast until then, with ``failure`` as the reason
    failed_until: float = 0.0
    failure: str = ""


@dataclass(slots=True)
class Fleet:
    pods: dict[str, PodView] = field(default_factory=dict)
    #: model → keys of the pods serving it (adapters and base models); rebuilt on change
    holders: dict[str, frozenset[str]] = field(default_factory=dict)
    #: model → the holders new requests may go to: never a copy being unloaded; a draining
    #: copy only when no other is left (a model whose every copy is being unloaded has none:
    #: its requests are held like those for a model loaded nowhere)
    routable: dict[str, frozenset[str]] = field(default_factory=dict)

    # ---- the endpoint set
    def sync(self, keys: Iterable[str]) -> bool:
        """Follow the pool: add views for new endpoints, drop removed ones. True if changed."""
        keys = set(keys)
        changed = False
        for gone in [k for k in self.pods if k not in keys]:
            del self.pods[gone]
            changed = True
        for k in keys:
            if k not in self.pods:
                self.pods[k] = PodView(k)
                changed = True
        if changed:
            self.reindex()
        return changed

    def all_reported(self) -> bool:
        """Every pod has told which models it serves (and there is at least one pod)."""
        return bool(self.pods) and all(p.reported for p in self.pods.values())

    # ---- reports
    def apply_report(self, key: str, version: int, adapters: Iterable[str], bases: Iterable[str],
                     now: float) -> bool:
        """A ``/v1/models`` answer, requested when the pod was at ``version``. True if applied."""
        pod = self.pods.get(key)
        if pod is None or pod.version != version:
            return False
        names = set(adapters)
        for gone in [m for m in pod.adapters if m not in names and m not in pod.loading]:
            del pod.adapters[gone]
            pod.draining.discard(gone)
        for m in names:
            if m not in pod.adapters:
                pod.adapters[m] = Copy(since=now, last_used=now)
        pod.bases = frozenset(bases)
        pod.reported = True
        self.reindex()
        return True

    def observe_active(self, key: str, active: frozenset[str], now: float, seen: float | None = None) -> None:
        """Adapters the pod's metrics show running or waiting: loaded there, and in use at ``seen``
        (when the pod made that report, on our clock; ``now`` when unknown). A report older than
        this picker's own last use of a copy does not make that copy look more recent (LRU)."""
        used_at = now if seen is None else min(now, seen)
        pod = self.pods.get(key)
        if pod is None:
            return
        pod.active = active
        added = False
        for m in active:
            c = pod.adapters.get(m)
            if c is None:
                pod.adapters[m] = Copy(since=now, last_used=now)
                added = True
            elif used_at > c.last_used:
                c.last_used = used_at
        if added:
            self.reindex()

    # ---- this replica's own changes
    def loaded(self, key: str, model: str, now: float) -> None:
        pod = self.pods.get(key)
        if pod is None:
            return
        pod.version += 1
        if model not in pod.adapters:
            pod.adapters[model] = Copy(since=now, last_used=now)
        self.reindex()

    def unloaded(self, key: str, model: str) -> None:
        pod = self.pods.get(key)
        if pod is None:
            return
        pod.version += 1
        pod.adapters.pop(model, None)
        pod.draining.discard(model)
        self.reindex()

    # ---- queries
    def copies(self, model: str) -> int:
        return len(self.holders.get(model, ()))

    def capacity(self) -> int:
        """Requests one pod runs at once, as far as the pods have shown it (0: none has been
        seen full yet). The largest seen: a pool's pods run one server configuration, and a pod
        seen full with fewer running was held back by something else (its KV cache, a load)."""
        return max((p.capacity for p in self.pods.values() if p.slots > 0), default=0)

    def reindex(self) -> None:
        """Rebuild ``holders`` / ``routable`` (after any change of copies, draining or unloading)."""
        holders: dict[str, set[str]] = {}
        unloading: dict[str, set[str]] = {}
        draining: dict[str, set[str]] = {}
        for pod in self.pods.values():
            for m in pod.adapters:
                holders.setdefault(m, set()).add(pod.key)
                if m in pod.unloading:
                    unloading.setdefault(m, set()).add(pod.key)
                elif m in pod.draining:
                    draining.setdefault(m, set()).add(pod.key)
            for m in pod.bases:
                holders.setdefault(m, set()).add(pod.key)
        self.holders = {m: frozenset(v) for m, v in holders.items()}
        routable: dict[str, frozenset[str]] = {}
        for m, v in holders.items():
            if m not in unloading and m not in draining:
                routable[m] = self.holders[m]
                continue
            staying = v - unloading.get(m, set())
            preferred = staying - draining.get(m, set())
            if preferred or staying:
                routable[m] = frozenset(preferred or staying)
        self.routable = routable


def per_copy_demand(model: str, models: Mapping[str, ModelState], fleet: Fleet) -> float:
    """Smoothed requests in flight per loaded copy of ``model`` (0 for a model nobody asks for)."""
    st = models.get(model)
    if st is None:
        return 0.0
    return st.concurrency / max(1, fleet.copies(model))


def per_copy_rate(model: str, models: Mapping[str, ModelState], fleet: Fleet) -> float:
    """Averaged requests per second per loaded copy of ``model``."""
    st = models.get(model)
    if st is None:
        return 0.0
    return st.rate / max(1, fleet.copies(model))
