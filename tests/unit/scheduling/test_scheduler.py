"""The scheduling cycle, and the default configuration end to end."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

import pytest

from epp.config import build_scheduling, load_config
from epp.datalayer.datastore import Datastore
from epp.framework.datalayer import Endpoint
from epp.framework.plugin import PluginContext
from epp.framework.scheduling import (
    Filter,
    LLMRequest,
    ProfileHandler,
    SchedulerProfile,
    SchedulingError,
    SchedulingResult,
    Scorer,
    WeightedScorer,
)
from epp.metrics import EppMetrics
from epp.plugins.scheduling.max_score_picker import MaxScorePicker
from epp.plugins.scheduling.single_profile_handler import SingleProfileHandler
from epp.scheduling.scheduler import Scheduler
from tests.unit.scheduling._helpers import ep, req


class Fixed(Scorer):
    type_name = "test-fixed"

    def __init__(self, name: str, scores: dict[str, float]) -> None:
        super().__init__(name)
        self.scores = scores

    def score(self, request: LLMRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        return [self.scores.get(e.name, 0.0) for e in endpoints]


class Drop(Filter):
    type_name = "test-drop"

    def __init__(self, name: str, drop: set[str]) -> None:
        super().__init__(name)
        self.drop = drop

    def filter(self, request: LLMRequest, endpoints: Sequence[Endpoint]) -> list[Endpoint]:
        return [e for e in endpoints if e.name not in self.drop]


def _sched(filters=(), scorers=(), metrics=None) -> Scheduler:
    prof = SchedulerProfile("default", list(filters), list(scorers), MaxScorePicker("p"))
    return Scheduler(SingleProfileHandler("h"), {"default": prof}, metrics)


def test_weighted_sum_decides():
    a, b = ep("a"), ep("b")
    s = _sched(scorers=[WeightedScorer(Fixed("x", {"a": 1.0, "b": 0.0}), 1),
                        WeightedScorer(Fixed("y", {"a": 0.0, "b": 0.6}), 2)])
    res = s.schedule(req(), [a, b])
    assert res.targets == [b]
    assert res.primary.scores == {a.key: 1.0, b.key: 1.2}


def test_scores_are_clamped():
    a, b = ep("a"), ep("b")
    s = _sched(scorers=[WeightedScorer(Fixed("x", {"a": 50.0, "b": 0.9}), 1),
                        WeightedScorer(Fixed("y", {"a": -3.0, "b": float("nan")}), 1)])
    res = s.schedule(req(), [a, b])
    assert res.primary.scores == {a.key: 1.0, b.key: pytest.approx(0.9)}


def test_filters_run_in_order_and_empty_fails():
    a, b = ep("a"), ep("b")
    assert _sched(filters=[Drop("f", {"a"})]).schedule(req(), [a, b]).targets == [b]
    with pytest.raises(SchedulingError):
        _sched(filters=[Drop("f", {"a"}), Drop("g", {"b"})]).schedule(req(), [a, b])
    with pytest.raises(SchedulingError):
        _sched().schedule(req(), [])


def test_e2e_duration_recorded():
    m = EppMetrics()
    s = _sched(metrics=m)
    s.schedule(req(), [ep()])
    s.schedule(req(), [ep()])
    assert m.registry.get_sample_value(
        "inference_extension_scheduler_e2e_duration_seconds_count") == 2


def test_plugin_durations_are_recorded_for_a_sample_of_cycles():
    m = EppMetrics()
    prof = SchedulerProfile("default", [Drop("f", set())],
                            [WeightedScorer(Fixed("x", {}), 1)], MaxScorePicker("p"))
    s = Scheduler(SingleProfileHandler("h"), {"default": prof}, m, plugin_duration_sample=4)
    for _ in range(8):
        s.schedule(req(), [ep()])
    get = m.registry.get_sample_value
    name = "inference_extension_plugin_duration_seconds_count"
    for point, type_name, plugin in (("Filter", "test-drop", "f"), ("Scorer", "test-fixed", "x"),
                                     ("Picker", "max-score-picker", "p")):
        assert get(name, {"extension_point": point, "plugin_type": type_name, "plugin_name": plugin}) == 2


def test_the_default_picker_configuration_records_plugin_durations():
    from epp.config import build_scheduling, load_config
    from epp.datalayer.datastore import Datastore
    from epp.framework.plugin import PluginContext

    m = EppMetrics()
    bundle = build_scheduling(load_config(None), PluginContext(Datastore(), m))
    bundle.scheduler.schedule(req(), [ep()])
    assert m.registry.get_sample_value(
        "inference_extension_plugin_duration_seconds_count",
        {"extension_point": "Scorer", "plugin_type": "prefix-cache-scorer", "plugin_name": "prefix-cache-scorer"}) == 1


class TwoStage(ProfileHandler):
    """Runs "prefill" then "decode" in two rounds; decode is primary."""

    type_name = "test-two-stage"

    def pick_profiles(self, request, profiles: Mapping, results: Mapping):
        if not results:
            return {"prefill": profiles["prefill"]}
        if "decode" not in results:
            return {"decode": profiles["decode"]}
        return {}

    def process_results(self, request, results) -> SchedulingResult:
        return SchedulingResult(dict(results), "decode")


def test_handler_loops_until_no_profiles_left():
    p, d = ep("p"), ep("d")
    profiles = {
        "prefill": SchedulerProfile("prefill", [Drop("f", {"d"})], [], MaxScorePicker("x")),
        "decode": SchedulerProfile("decode", [Drop("g", {"p"})], [], MaxScorePicker("y")),
    }
    res = Scheduler(TwoStage("h"), profiles).schedule(req(), [p, d])
    assert res.targets == [d]
    prefill = res.profile_results["prefill"]
    assert prefill is not None and prefill.target_endpoints == [p] and prefill.scores == {p.key: 0.0}


def test_failed_non_primary_profile_is_none_but_primary_decides():
    p, d = ep("p"), ep("d")
    profiles = {
        "prefill": SchedulerProfile("prefill", [Drop("f", {"p", "d"})], [], MaxScorePicker("x")),
        "decode": SchedulerProfile("decode", [], [], MaxScorePicker("y")),
    }
    res = Scheduler(TwoStage("h"), profiles).schedule(req(), [p, d])
    assert res.profile_results["prefill"] is None
    assert res.targets[0] in (p, d)


def test_runaway_handler_is_stopped():
    class Forever(TwoStage):
        def pick_profiles(self, request, profiles, results):
            return {"decode": profiles["decode"]}

    profiles = {"decode": SchedulerProfile("decode", [], [], MaxScorePicker("y"))}
    with pytest.raises(SchedulingError, match="rounds"):
        Scheduler(Forever("h"), profiles).schedule(req(), [ep()])


# ---- the default configuration, end to end ----
def _default(n: int):
    ds = Datastore()
    eps = [ep(f"pod{i}") for i in range(n)]
    ds.replace_endpoints(eps)
    bundle = build_scheduling(load_config(None), PluginContext(ds, EppMetrics()))
    return ds, eps, bundle


def _route(bundle, ds, text: bytes, rid: str = "r") -> Endpoint:
    r = req(text, rid=rid)
    result = bundle.scheduler.schedule(r, ds.endpoints())
    for plugin in bundle.pre_request:
        plugin.pre_request(r, result)
    target = result.targets[0]
    return target


def test_default_config_same_prefix_sticks():
    ds, _, bundle = _default(4)
    system = ("You are a helpful assistant. " * 30).encode()
    targets = {_route(bundle, ds, system + f"question {i}".encode(), f"r{i}") for i in range(20)}
    assert len(targets) == 1


def test_default_config_different_prefixes_spread_under_equal_load():
    ds, eps, bundle = _default(4)
    counts: Counter[str] = Counter()
    for i in range(400):
        text = (f"conversation {i:04d} " * 40).encode()
        counts[_route(bundle, ds, text, f"r{i}").name] += 1
    assert set(counts) == {e.name for e in eps}
    assert all(60 < c < 140 for c in counts.values()), counts


def test_default_config_prefers_prefix_until_load_differs_a_lot():
    ds, eps, bundle = _default(2)
    a, b = eps
    text = ("shared prefix " * 50).encode()
    first = _route(bundle, ds, text)
    other = b if first is a else a
    # Much longer queue and fuller cache on the holder: load outweighs prefix (2+2 > 3).
    first.metrics.waiting_queue_size = 10
    first.metrics.kv_cache_usage = 0.95
    assert _route(bundle, ds, text) is other
