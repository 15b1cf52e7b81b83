"""Metric label cardinality: client-chosen model names cannot grow /metrics without bound."""

from __future__ import annotations

from collections.abc import Sequence

import orjson
from prometheus_client import generate_latest

from epp.datalayer.datastore import Datastore, Objective, RewriteRule, RewriteTarget
from epp.framework.datalayer import Endpoint
from epp.framework.scheduling import LLMRequest, ProfileRunResult, SchedulingResult
from epp.metrics import EppMetrics, ModelSeriesCache
from epp.requestcontrol.director import Director
from epp.requestcontrol.modellabels import OTHER


class _First:
    def schedule(self, request: LLMRequest, candidates: Sequence[Endpoint]) -> SchedulingResult:
        return SchedulingResult({"default": ProfileRunResult([candidates[0]])}, "default")


def _director() -> Director:
    ds = Datastore()
    ds.replace_endpoints([Endpoint("a", "10.0.0.1", 8000), Endpoint("b", "10.0.0.2", 8000)])
    ds.model_objectives["legacy-model"] = Objective("legacy-model", 1)
    ds.rewrites = (RewriteRule("r", ("alias",), (RewriteTarget("base", 1),)),)
    return Director(datastore=ds, scheduler=_First(), metrics=EppMetrics())


async def _request(d: Director, model: str, status: int) -> None:
    ctx = d.new_context({":path": "/v1/completions"})
    await d.route(ctx, orjson.dumps({"model": model, "prompt": "hi"}))
    d.response_headers(ctx, {":status": str(status)}, "10.0.0.1:8000")
    d.complete(ctx)


def _model_labels(d: Director) -> set[str]:
    assert d.metrics is not None
    return {s.labels["model_name"] for fam in d.metrics.request_total.collect() for s in fam.samples}


async def test_a_flood_of_unknown_model_names_keeps_metrics_small() -> None:
    d = _director()
    assert d.metrics is not None
    await _request(d, "warm-up", 404)
    baseline = len(generate_latest(d.metrics.registry))
    for i in range(10_000):
        await _request(d, f"no-such-model-{i}", 404)  # the pod refuses every one of them
    size = len(generate_latest(d.metrics.registry))
    assert size < baseline + 4096, (baseline, size)
    assert _model_labels(d) == {OTHER}
    errors = d.metrics.request_error_total.labels(OTHER, OTHER, "ModelServerError")._value.get()
    assert errors == 10_001


async def test_models_the_pool_serves_keep_their_own_label() -> None:
    d = _director()
    await _request(d, "legacy-model", 200)  # an InferenceModel names it
    await _request(d, "alias", 200)  # a rewrite rule matches it (and targets "base")
    await _request(d, "discovered", 404)  # refused: folded
    await _request(d, "discovered", 200)  # served once: known from now on
    await _request(d, "discovered", 200)
    labels = _model_labels(d)
    assert {"legacy-model", "alias", "discovered", OTHER} == labels
    assert d.metrics is not None
    assert d.metrics.request_total.labels("discovered", "discovered", "0")._value.get() == 1
    targets = {s.labels["target_model_name"] for fam in d.metrics.request_total.collect() for s in fam.samples}
    assert "base" in targets


async def test_observed_models_are_capped() -> None:
    d = _director()
    assert d._labels is not None
    d._labels.max_observed = 3
    for i in range(10):
        await _request(d, f"anything-{i}", 200)  # a backend that accepts any name
        await _request(d, f"anything-{i}", 200)
    assert len(_model_labels(d) - {OTHER}) == 3


def test_clearing_the_series_cache_removes_the_exported_series() -> None:
    m = EppMetrics()
    cache = ModelSeriesCache(m, max_entries=2)
    for model in ("a", "b"):
        s = cache.get(model, model)
        s.requests(0).inc()
        s.errors("BadRequest").inc()
        s.duration.observe(0.1)
        s.running.inc()
        s.running.dec()
    page = generate_latest(m.registry)
    assert b'model_name="a"' in page and b'model_name="b"' in page
    cache.get("c", "c").requests(0).inc()  # over max_entries: a and b are evicted, children and all
    page = generate_latest(m.registry)
    assert b'model_name="a"' not in page and b'model_name="b"' not in page
    assert b'model_name="c"' in page
