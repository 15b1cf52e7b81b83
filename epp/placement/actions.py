"""Carrying out the policy's decisions on the pods: loads (with the eviction that makes room)
and unloads, with their metrics, always in background tasks.

A pod is marked busy with a model (``loading`` / ``unloading``) the moment an action is
decided, before its task runs, so the next plan and the routing index see it at once: a copy
being unloaded gets no new request from this replica, a pod being loaded gets no second load.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from epp.datalayer.datastore import CatalogueModel
from epp.placement import client as calls
from epp.placement.client import CallResult, PodClient
from epp.placement.config import PlacementConfig
from epp.placement.fleet import Fleet
from epp.placement.metrics import PlacementMetrics
from epp.placement.policy import EVICTED, Action, Load

log = logging.getLogger(__name__)


def pod_url(key: str) -> str:
    """The model server behind an endpoint key (``ip:port``; IPv6 comes bracketed)."""
    return f"http://{key}"


@dataclass(slots=True)
class Actions:
    fleet: Fleet
    client: PodClient
    cfg: PlacementConfig
    catalogue: Callable[[], dict[str, CatalogueModel]]
    #: called after a copy appeared (held requests re-check)
    loaded: Callable[[], None]
    spawn: Callable[[Coroutine[Any, Any, Any]], Any]
    metrics: PlacementMetrics | None = None
    clock: Callable[[], float] = time.monotonic

    def start(self, action: Action) -> None:
        """Mark the pod busy now and run ``action`` in the background."""
        pod = self.fleet.pods.get(action.pod)
        if pod is None:
            return
        if isinstance(action, Load):
            pod.loading.add(action.model)
            self.spawn(self.load(action))
        else:
            pod.unloading.add(action.model)
            self.fleet.reindex()
            self.spawn(self.unload(action.pod, action.model, action.reason))

    async def load(self, load: Load) -> CallResult:
        """Evict (if the plan says so), then load; the copy counts once the pod confirmed it."""
        pod = self.fleet.pods.get(load.pod)
        entry = self.catalogue().get(load.model)
        if pod is None or entry is None or entry.path is None:
            return CallResult(calls.FAILED, "the pod or the catalogue entry went away")
        pod.loading.add(load.model)
        try:
            if load.evict is not None and not await self.unload(load.pod, load.evict, EVICTED):
                return CallResult(calls.FAILED, f"could not evict {load.evict!r} to free a slot")
            t0 = self.clock()
            result = await self.client.load(pod_url(load.pod), load.model, entry.path, self.cfg.load_timeout)
            if self.metrics is not None:
                pool = self.metrics.pool()
                self.metrics.loads.labels(pool, load.model, result.outcome).inc()
                if result.outcome == calls.SUCCESS:
                    self.metrics.load_duration.labels(pool).observe(self.clock() - t0)
            if result.present:
                self.fleet.loaded(load.pod, load.model, self.clock())
                log.debug("model loaded", extra={"model": load.model, "pod": load.pod, "reason": load.reason})
                self.loaded()
            return result
        finally:
            pod.loading.discard(load.model)

    async def unload(self, key: str, model: str, reason: str) -> bool:
        """True when the model is gone from the pod (unloaded, or it was not there)."""
        pod = self.fleet.pods.get(key)
        if pod is None:
            return False
        if model not in pod.unloading:
            pod.unloading.add(model)
            self.fleet.reindex()
        try:
            result = await self.client.unload(pod_url(key), model, self.cfg.unload_timeout)
            if self.metrics is not None:
                self.metrics.unloads.labels(self.metrics.pool(), model, reason, result.outcome).inc()
            if result.outcome in (calls.SUCCESS, calls.NOT_FOUND):
                self.fleet.unloaded(key, model)
                return True
            log.warning("model unload failed", extra={"model": model, "pod": key, "error": result.message})
            return False
        finally:
            pod.unloading.discard(model)
            self.fleet.reindex()
