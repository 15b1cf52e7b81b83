"""Model placement's metrics, registered on the picker's registry (``EppMetrics.registry``).

GIE-style names; labels stay bounded: ``model_name`` takes only catalogue models and models the
pods report (both bounded by what an operator deployed), never a client's free text, and
``outcome`` / ``reason`` are fixed sets.

* ``inference_extension_model_copies`` (gauge; inference_pool, model_name)
* ``inference_extension_model_loads_total`` (counter; inference_pool, model_name, outcome:
  success, already_loaded, not_found, failed, timeout)
* ``inference_extension_model_unloads_total`` (counter; inference_pool, model_name, reason:
  idle, scale_down, evicted; outcome)
* ``inference_extension_model_load_duration_seconds`` (histogram; inference_pool)
* ``inference_extension_model_held_requests`` (gauge; inference_pool, model_name)
* ``inference_extension_model_holds_total`` (counter; inference_pool, model_name,
  outcome: loaded, timeout, failed)
* ``inference_extension_model_not_found_total`` (counter; inference_pool)
* ``epp_model_demand_requests`` (gauge; inference_pool, model_name, state: held, inflight)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0)
#: at most this many model label values per gauge (a guard; catalogues are far smaller)
MAX_MODELS = 512


class PlacementMetrics:
    def __init__(self, registry: CollectorRegistry, pool: Callable[[], str]) -> None:
        self.pool = pool
        r = registry
        self.copies = Gauge("inference_extension_model_copies",
                            "Pods holding the model (LoRA adapters and base models), as the pods report.",
                            ("inference_pool", "model_name"), registry=r)
        self.loads = Counter("inference_extension_model_loads_total",
                             "Adapter loads this picker asked a pod for, by outcome.",
                             ("inference_pool", "model_name", "outcome"), registry=r)
        self.unloads = Counter("inference_extension_model_unloads_total",
                               "Adapter unloads this picker asked a pod for, by reason and outcome.",
                               ("inference_pool", "model_name", "reason", "outcome"), registry=r)
        self.load_duration = Histogram("inference_extension_model_load_duration_seconds",
                                       "Time of a successful adapter load (the pod's answer).",
                                       ("inference_pool",), buckets=_LOAD_BUCKETS, registry=r)
        self.held = Gauge("inference_extension_model_held_requests",
                          "Requests waiting for their model to be loaded somewhere.",
                          ("inference_pool", "model_name"), registry=r)
        self.held_total = Counter("inference_extension_model_holds_total",
                                  "Requests that waited for a load, by how the wait ended.",
                                  ("inference_pool", "model_name", "outcome"), registry=r)
        self.not_found = Counter("inference_extension_model_not_found_total",
                                 "Requests answered 404: the model is in no catalogue and on no pod.",
                                 ("inference_pool",), registry=r)
        self.demand = Gauge("epp_model_demand_requests",
                            "Requests for the model this picker holds for a load (state=held) or has "
                            "between arrival and response end (state=inflight, incl. queued): the "
                            "per-model KEDA scaling signal.",
                            ("inference_pool", "model_name", "state"), registry=r)
        self._copies_labels: set[str] = set()
        self._demand_labels: set[str] = set()

    def set_copies(self, copies: Iterable[tuple[str, int]]) -> None:
        """Replace the copies gauge (models that left are removed, not left at a stale value)."""
        pool = self.pool()
        seen: set[str] = set()
        for model, n in copies:
            if len(seen) >= MAX_MODELS:
                break
            seen.add(model)
            self.copies.labels(pool, model).set(n)
        for gone in self._copies_labels - seen:
            try:
                self.copies.remove(pool, gone)
            except KeyError:
                pass
        self._copies_labels = seen

    def set_demand(self, demand: Iterable[tuple[str, int, int]]) -> None:
        pool = self.pool()
        seen: set[str] = set()
        for model, held, inflight in demand:
            if len(seen) >= MAX_MODELS:
                break
            seen.add(model)
            self.demand.labels(pool, model, "held").set(held)
            self.demand.labels(pool, model, "inflight").set(inflight - held)
        for gone in self._demand_labels - seen:
            for state in ("held", "inflight"):
                try:
                    self.demand.remove(pool, gone, state)
                except KeyError:
                    pass
        self._demand_labels = seen
