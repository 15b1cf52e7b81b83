"""Which model names may become metric label values.

The ``model`` of a request is client input. Used as a Prometheus label as-is, a client that
sends many distinct names creates a series per name in every per-model metric (histograms
are ~40 series each): ``/metrics`` grows without bound, renders slower than Prometheus'
scrape timeout and eats the picker's memory. So a name becomes a label only when the pool
is known to serve it:

* a legacy InferenceModel names it (``Datastore.model_objectives``);
* an InferenceModelRewrite rule matches it or targets it;
* a response for it (as the target model) succeeded: the engine served it (base models and
  LoRA adapters nothing declares). This set is capped (``max_observed``) so a backend that
  accepts any name cannot become the unbounded path again.

Every other name is reported as ``OTHER``. The check is a couple of set lookups per request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from epp.datalayer.datastore import Datastore, RewriteRule

#: the label value for model names the pool is not known to serve
OTHER = "other"


@dataclass(slots=True)
class ModelLabels:
    datastore: Datastore
    max_observed: int = 256
    _observed: set[str] = field(default_factory=set)
    _rules: tuple[RewriteRule, ...] | None = None
    _rule_names: frozenset[str] = frozenset()

    def label(self, model: str) -> str:
        """``model`` when the pool serves it, else ``OTHER``."""
        if model in self._observed:
            return model
        ds = self.datastore
        rules = ds.rewrites
        if rules is not self._rules:  # the datastore replaces the tuple on every change
            self._rules = rules
            self._rule_names = frozenset(
                name for r in rules for name in (*r.matches, *(t.model for t in r.targets))
            )
        if model in self._rule_names or model in ds.model_objectives:
            return model
        return OTHER

    def observe_served(self, model: str) -> None:
        """The engine answered a request for ``model`` with success."""
        if model not in self._observed and len(self._observed) < self.max_observed:
            self._observed.add(model)

    def known(self) -> frozenset[str]:
        """Names learnt from responses (tests, debugging)."""
        return frozenset(self._observed)
