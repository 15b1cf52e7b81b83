"""The datastore: the one place the pool's current state lives.

Discovery (static file, Kubernetes) *writes* it; the request path and background tasks *read*
it. Writers replace whole endpoint sets or single endpoints; readers take ``endpoints()``,
an immutable tuple snapshot rebuilt only on change, so the hot path never copies or locks.

Everything in here is rebuildable from outside state (the pool definition, the pods, the
CRDs), so several picker replicas can each hold their own copy.

Listeners (``on_endpoints_changed``) let background parts follow the set without polling:
the metrics scraper starts/stops collectors, the prefix index purges removed endpoints,
flow control wakes requests held while the pool was empty.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from epp.framework.datalayer import Endpoint

log = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class Objective:
    """An InferenceObjective (or a legacy InferenceModel's criticality) as the picker uses it."""

    name: str
    priority: int = 0
    created: float = 0.0  # creationTimestamp as epoch seconds; oldest wins on clashes


@dataclass(slots=True, frozen=True)
class RewriteTarget:
    model: str
    weight: int = 1


@dataclass(slots=True, frozen=True)
class RewriteRule:
    """One InferenceModelRewrite rule (or a legacy InferenceModel's targetModels).

    ``matches`` empty = matches every model (a generic rule). ``source`` names the resource
    the rule came from (for the decisions metric); ``created`` orders resources (oldest wins).
    """

    source: str
    matches: tuple[str, ...]
    targets: tuple[RewriteTarget, ...]
    created: float = 0.0


@dataclass(slots=True, frozen=True)
class CatalogueModel:
    """A model the pool may serve (pool file ``models:``, or the model-placement config).

    ``path`` set: a LoRA adapter that model placement loads onto pods at run time (vLLM's
    ``lora_path``); ``base`` names the base model it applies to. ``path`` None: a base model,
    served by the pods started with it (placement routes and holds for it, never loads it).
    """

    name: str
    path: str | None = None
    base: str | None = None


@dataclass(slots=True, frozen=True)
class PoolInfo:
    """What the picker knows of its InferencePool (static pools fill a synthetic one)."""

    name: str = "default"
    namespace: str = "default"
    target_ports: tuple[int, ...] = ()
    app_protocol: str = "http"


EndpointsListener = Callable[[tuple[Endpoint, ...], tuple[Endpoint, ...]], None]
"""Called with (added, removed) after every change of the endpoint set."""


@dataclass(slots=True)
class Datastore:
    pool: PoolInfo = field(default_factory=PoolInfo)
    _endpoints: dict[str, Endpoint] = field(default_factory=dict)
    _snapshot: tuple[Endpoint, ...] = ()
    _by_address: dict[str, tuple[Endpoint, ...]] = field(default_factory=dict)
    #: InferenceObjectives by metadata.name (selected by header x-gateway-inference-objective)
    objectives: dict[str, Objective] = field(default_factory=dict)
    #: legacy InferenceModel criticality, by modelName (used when no objective header matched)
    model_objectives: dict[str, Objective] = field(default_factory=dict)
    #: rewrite rules in precedence order: the request path takes the first whose matches fit
    #: (exact-match rules first, oldest resource first; then generic rules, oldest first)
    rewrites: tuple[RewriteRule, ...] = ()
    #: models the pool may serve, by name (pool file ``models:``; read by model placement)
    catalogue: dict[str, CatalogueModel] = field(default_factory=dict)
    synced: bool = False
    _listeners: list[EndpointsListener] = field(default_factory=list)

    # ---- readers (hot path) ----
    def endpoints(self) -> tuple[Endpoint, ...]:
        """Current endpoints, as an immutable snapshot (safe to hold across awaits)."""
        return self._snapshot

    def get(self, key: str) -> Endpoint | None:
        """Endpoint by ``ip:port``."""
        return self._endpoints.get(key)

    def by_address(self, address: str) -> tuple[Endpoint, ...]:
        """All endpoints (ranks) of one IP: the subset hint may name a pod without a port."""
        return self._by_address.get(address, ())

    # ---- writers (discovery) ----
    def add_listener(self, listener: EndpointsListener) -> None:
        self._listeners.append(listener)

    def replace_endpoints(self, endpoints: Iterable[Endpoint]) -> None:
        """Make the set exactly ``endpoints``. Existing ones (same key) keep their live state
        (metrics, in-flight counts) and take the new name/labels."""
        new: dict[str, Endpoint] = {}
        added: list[Endpoint] = []
        for ep in endpoints:
            old = self._endpoints.get(ep.key)
            if old is not None:
                old.name = ep.name
                old.labels = ep.labels
                old.metrics_host = ep.metrics_host
                old.metrics_port = ep.metrics_port
                new[ep.key] = old
            else:
                new[ep.key] = ep
                added.append(ep)
        removed = [ep for key, ep in self._endpoints.items() if key not in new]
        self._endpoints = new
        self._publish(tuple(added), tuple(removed))

    def upsert_endpoint(self, endpoint: Endpoint) -> None:
        eps = dict(self._endpoints)
        eps[endpoint.key] = endpoint
        self.replace_endpoints(eps.values())

    def remove_endpoint(self, key: str) -> None:
        if key in self._endpoints:
            self.replace_endpoints(ep for k, ep in self._endpoints.items() if k != key)

    def clear(self) -> None:
        """Pool deleted: forget every endpoint."""
        self.replace_endpoints(())

    def _publish(self, added: tuple[Endpoint, ...], removed: tuple[Endpoint, ...]) -> None:
        self._snapshot = tuple(self._endpoints.values())
        by_addr: dict[str, list[Endpoint]] = {}
        for ep in self._snapshot:
            by_addr.setdefault(ep.address, []).append(ep)
        self._by_address = {a: tuple(v) for a, v in by_addr.items()}
        if not added and not removed:
            return
        log.info(
            "endpoints changed",
            extra={"added": [e.key for e in added], "removed": [e.key for e in removed],
                   "total": len(self._snapshot)},
        )
        for listener in list(self._listeners):
            try:
                listener(added, removed)
            except Exception:  # a broken listener must not break discovery
                log.exception("endpoint listener failed")
