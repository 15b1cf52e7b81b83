"""The placement policy once the pods have shown their capacity (requests one runs at once,
learned from their metrics): extra copies only for work a copy cannot run, and never at the
cost of pushing out a model still asked for unless the hot one is overloaded
(epp/placement/policy.py, fake clock, no I/O)."""

from __future__ import annotations

from collections.abc import Iterable

from epp.datalayer.datastore import CatalogueModel
from epp.placement.config import parse_placement_config
from epp.placement.fleet import Fleet, ModelState, PodView
from epp.placement.policy import SCALE_UP, Load, plan

CFG = parse_placement_config("idleUnloadAfter: 5m\nminChurnAge: 10s\nscaleDownDelay: 30s\n")
CATALOGUE = {f"a{i}": CatalogueModel(f"a{i}", f"/adapters/a{i}") for i in range(40)}
NOW = 100.0


def always(_: str) -> bool:
    return True


def fleet(pods: dict[str, Iterable[str]], slots: int, capacity: int) -> Fleet:
    """Pods whose adapters were loaded at 0 and last used at 99, seen full at ``capacity``."""
    f = Fleet()
    f.sync(pods)
    for key, adapters in pods.items():
        pod = f.pods[key]
        pod.slots = slots
        f.apply_report(key, 0, adapters, ["base"], 0.0)
        for c in pod.adapters.values():
            c.last_used = 99.0
        if capacity:
            pod.observe_load(running=capacity, waiting=1, inflight=0)
    return f


def model(name: str, rate: float, inflight: float, asked: float = NOW - 1.0) -> ModelState:
    """``rate`` requests per second, ``inflight`` of them in flight (now and on average), the
    last one ``NOW - asked`` seconds ago."""
    return ModelState(name, inflight=round(inflight), concurrency=inflight, recent_rate=rate, rate=rate,
                      last_request=asked)


def loads(f: Fleet, models: dict[str, ModelState]) -> list[Load]:
    return [a for a in plan(f, models, CATALOGUE, CFG, NOW, always) if isinstance(a, Load)]


def test_a_pods_capacity_is_learned_only_when_it_was_seen_full() -> None:
    pod = PodView("p0")
    pod.observe_load(running=3, waiting=0, inflight=3)
    assert pod.capacity == 0 and pod.load == 6        # never full: not known
    pod.observe_load(running=4, waiting=2, inflight=6)
    pod.observe_load(running=2, waiting=1, inflight=3)  # held back by something else
    assert pod.capacity == 4
    f = fleet({"p0": [], "p1": []}, slots=4, capacity=0)
    assert f.capacity() == 0
    f.pods["p1"].observe_load(running=4, waiting=1, inflight=5)
    assert f.capacity() == 4


def zipf_fleet(capacity: int) -> tuple[Fleet, dict[str, ModelState]]:
    """32 adapters on 8 pods x 4 slots, every slot taken; the head a0 (28 % of 11.2 req/s) on two
    pods; a burst has put 7 of its requests in flight right now."""
    names = [f"a{i}" for i in range(32)]
    pods: dict[str, list[str]] = {f"p{i}": [] for i in range(8)}
    pods["p0"].append("a0")
    pods["p1"].append("a0")
    for i, name in enumerate(names[1:31]):
        pods[f"p{(i + 2) % 8}"].append(name)
    f = fleet(pods, slots=4, capacity=capacity)
    weights = [1.0 / (k ** 1.1) for k in range(1, 33)]
    share = {n: w / sum(weights) for n, w in zip(names, weights, strict=True)}
    models = {n: model(n, 11.2 * s, 11.2 * 1.2 * s) for n, s in share.items()}
    models["a0"].inflight = 7
    return f, models


def test_a_burst_its_copies_can_run_adds_no_copy_and_evicts_nothing() -> None:
    """Without the pods' capacity the burst's share of the requests in flight asks for a third
    copy of a0, which pushes out a rare adapter (that then misses: a load). Its two copies run
    8 requests at once: the burst fits, nothing changes."""
    f, models = zipf_fleet(capacity=4)
    assert loads(f, models) == []
    f, models = zipf_fleet(capacity=0)
    assert [(a.model, a.reason) for a in loads(f, models)] == [("a0", SCALE_UP)]


def two_full_pods() -> Fleet:
    return fleet({"p0": ["a1", "a2"], "p1": ["a3", "a4"]}, slots=2, capacity=4)


def test_an_extra_copy_does_not_push_out_a_model_still_asked_for() -> None:
    """a1's share asks for a second copy (copyLoadFactor 1), but both slots of p1 hold models
    asked for within demandWindow, and a1's two requests in flight run on its one copy: no
    copy. Once a3 has not been asked for in demandWindow (60 s), it makes room."""
    cfg = CFG.model_copy(update={"copy_load_factor": 1.0})
    models = {"a1": model("a1", 6.0, 3.0), "a2": model("a2", 0.5, 0.5), "a3": model("a3", 0.1, 0.1),
              "a4": model("a4", 2.0, 2.0)}
    actions = plan(two_full_pods(), models, CATALOGUE, cfg, NOW, always)
    assert [a for a in actions if isinstance(a, Load)] == []
    models["a3"].last_request = NOW - 61.0
    actions = plan(two_full_pods(), models, CATALOGUE, cfg, NOW, always)
    assert [a for a in actions if isinstance(a, Load)] == [Load("a1", "p1", SCALE_UP, evict="a3")]


def test_an_overloaded_model_may_push_out_a_rare_one() -> None:
    """a1 has more requests in flight than its one copy runs at once (it queues whatever the
    pods do): the rarest model asked for recently makes room after all."""
    cfg = CFG.model_copy(update={"copy_load_factor": 1.0})
    models = {"a1": model("a1", 6.0, 9.0), "a2": model("a2", 0.5, 0.5), "a3": model("a3", 0.1, 0.1),
              "a4": model("a4", 2.0, 2.0)}
    actions = plan(two_full_pods(), models, CATALOGUE, cfg, NOW, always)
    assert [a for a in actions if isinstance(a, Load)] == [Load("a1", "p1", SCALE_UP, evict="a3")]


def test_a_busy_pod_that_keeps_up_gets_no_relief_one_that_queues_does() -> None:
    """p0 collected a1 and a2 and expects twice the average pod's work; with 12 requests in
    flight it is relieved only if it runs fewer than 12 at once."""
    models = {"a1": model("a1", 6.4, 6.4), "a2": model("a2", 5.6, 5.6), "a3": model("a3", 4.0, 4.0),
              "a4": model("a4", 4.0, 4.0), "a5": model("a5", 1.2, 1.2)}
    pods = {"p0": ["a1", "a2"], "p1": ["a3"], "p2": ["a4"], "p3": ["a5"]}
    assert loads(fleet(pods, slots=2, capacity=16), models) == []
    assert loads(fleet(pods, slots=2, capacity=8), models) == [Load("a1", "p3", SCALE_UP)]


def test_a_model_that_just_turned_hot_still_gets_copies_in_one_tick() -> None:
    """Popularity shift: a1's averages still say 'rare', but 14 of its requests are in flight on
    its one copy (which runs 4): the copies they fill are added this tick, on free slots, or —
    every slot taken by models asked for recently — in place of the rarest of those."""
    models = {m: model(m, 0.5, 0.5) for m in ("a2", "a3", "a4")}
    models["a1"] = ModelState("a1", inflight=14, concurrency=0.5, recent_rate=0.5, rate=0.5, last_request=NOW)
    f = fleet({"p0": ["a1"], "p1": ["a2"], "p2": ["a3"], "p3": ["a4"]}, slots=4, capacity=4)
    got = loads(f, models)
    assert {a.model for a in got} == {"a1"} and len(got) == 3 and len({a.pod for a in got}) == 3
    models["a3"] = model("a3", 0.1, 0.1)
    f = fleet({"p0": ["a1", "a2"], "p1": ["a3", "a4"]}, slots=2, capacity=4)
    assert loads(f, models) == [Load("a1", "p1", SCALE_UP, evict="a3")]


def test_a_cold_miss_evicts_the_rarest_copy_even_a_young_one() -> None:
    """a3 (rare) was loaded 10 s ago for its own miss; a2 is older but asked for 20x more.
    Sparing a3 for its youth would push the miss onto a2, whose next request misses in turn:
    misses would spread over every model. Only a copy loaded this moment (a4: its held
    requests may not be routed yet) goes last."""
    from epp.placement.fleet import Copy
    from epp.placement.policy import COLD, choose_pod

    cfg = CFG.model_copy(update={"min_churn_age": 30.0})
    f = fleet({"p0": ["a1", "a2"], "p1": ["a3", "a4"]}, slots=2, capacity=4)
    f.pods["p1"].adapters["a3"] = Copy(since=NOW - 10.0, last_used=NOW - 9.0)
    f.pods["p1"].adapters["a4"] = Copy(since=NOW - 1.0, last_used=NOW - 1.0)
    models = {"a1": model("a1", 5.0, 0.0), "a2": model("a2", 2.0, 0.0), "a3": model("a3", 0.1, 0.0),
              "a4": model("a4", 0.05, 0.0)}
    f.pods["p0"].adapters["a1"].inflight = 1
    assert choose_pod("a9", f, models, CATALOGUE, cfg, NOW, cold=True) == Load("a9", "p1", COLD, evict="a3")
    f.pods["p1"].adapters["a3"].inflight = 1
    f.pods["p0"].adapters["a2"].inflight = 1
    assert choose_pod("a9", f, models, CATALOGUE, cfg, NOW, cold=True) == Load("a9", "p1", COLD, evict="a4")

