"""The placement policy with a fake clock: where loads go, what is evicted, how many copies,
what is unloaded and when (epp/placement/policy.py)."""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from epp.datalayer.datastore import CatalogueModel
from epp.placement.config import PlacementConfig, parse_placement_config
from epp.placement.fleet import Copy, Fleet, ModelState
from epp.placement.peers import Ownership
from epp.placement.policy import (
    COLD,
    IDLE,
    SCALE_DOWN,
    SCALE_UP,
    Load,
    Unload,
    choose_pod,
    desired_copies,
    plan,
)

CFG = parse_placement_config("idleUnloadAfter: 60s\nminChurnAge: 10s\nscaleDownDelay: 30s\n")
CATALOGUE = {f"a{i}": CatalogueModel(f"a{i}", f"/adapters/a{i}") for i in range(40)}


def always(_: str) -> bool:
    return True


def fleet(pods: dict[str, Iterable[str]], slots: int = 2, now: float = 0.0, used: float | None = None) -> Fleet:
    """Pods with adapters loaded at ``now`` and last used at ``used`` (default: ``now``)."""
    f = Fleet()
    f.sync(pods)
    for key, adapters in pods.items():
        f.pods[key].slots = slots
        f.apply_report(key, 0, adapters, ["base"], now)
        for c in f.pods[key].adapters.values():
            c.last_used = now if used is None else used
    return f


def demand(**conc: float) -> dict[str, ModelState]:
    """Models with ``conc`` requests in flight, arriving at ``conc`` per second (1 s each)."""
    return {m: ModelState(m, concurrency=c, inflight=round(c), recent_rate=c, rate=c) for m, c in conc.items()}


def test_a_cold_miss_takes_the_free_slot_of_the_least_loaded_pod() -> None:
    f = fleet({"p1": ["a1", "a2"], "p2": ["a3"], "p3": ["a4"]})
    f.pods["p2"].load = 5
    f.pods["p3"].load = 1
    assert choose_pod("a9", f, {}, CATALOGUE, CFG, 100.0, cold=True) == Load("a9", "p3", COLD)


def test_a_full_fleet_evicts_the_least_asked_for_idle_copy_lru_among_equals() -> None:
    f = fleet({"p1": ["a1", "a2"], "p2": ["a3", "a4"]}, used=90.0)
    models = {m: ModelState(m, concurrency=c) for m, c in {"a1": 3.0, "a2": 0.5, "a3": 2.0, "a4": 1.0}.items()}
    # nothing known of request rates yet (a fresh replica): least recently used, then least in flight
    assert choose_pod("a9", f, models, CATALOGUE, CFG, 100.0, cold=True) == Load("a9", "p1", COLD, evict="a2")
    f.pods["p2"].adapters["a3"].last_used = 80.0
    assert choose_pod("a9", f, models, CATALOGUE, CFG, 100.0, cold=True) == Load("a9", "p2", COLD, evict="a3")
    for m, rate in {"a1": 2.0, "a2": 0.5, "a3": 1.0, "a4": 0.2}.items():
        models[m].rate = rate
    # the rarest goes first, however recently it was used
    assert choose_pod("a9", f, models, CATALOGUE, CFG, 100.0, cold=True) == Load("a9", "p2", COLD, evict="a4")


def test_copies_in_use_are_never_evicted_and_a_full_busy_fleet_has_no_room() -> None:
    f = fleet({"p1": ["a1", "a2"], "p2": ["a3", "a4"]})
    f.pods["p1"].adapters["a2"].inflight = 1        # this replica has a request there
    f.pods["p2"].active = frozenset({"a3", "a4"})   # the pod's metrics show them running
    assert choose_pod("a9", f, demand(a2=0.1), CATALOGUE, CFG, 100.0, cold=True) == Load(
        "a9", "p1", COLD, evict="a1")
    f.pods["p1"].adapters["a1"].inflight = 1
    assert choose_pod("a9", f, {}, CATALOGUE, CFG, 100.0, cold=True) is None


def test_adapters_outside_the_catalogue_are_never_evicted() -> None:
    f = fleet({"p1": ["static-x", "a1"]})
    assert choose_pod("a9", f, {}, CATALOGUE, CFG, 100.0, cold=True) == Load("a9", "p1", COLD, evict="a1")
    f = fleet({"p1": ["static-x", "static-y"]})
    assert choose_pod("a9", f, {}, CATALOGUE, CFG, 100.0, cold=True) is None


def test_young_copies_go_only_when_nothing_older_can() -> None:
    f = fleet({"p1": ["a1", "a2"], "p2": ["a3", "a4"]}, now=0.0)
    f.pods["p2"].adapters["a3"] = Copy(since=95.0, last_used=95.0)  # 5 s old: below minChurnAge
    f.pods["p1"].adapters["a1"].inflight = f.pods["p1"].adapters["a2"].inflight = 1
    f.pods["p2"].adapters["a4"].inflight = 1
    # a cold miss may take the young copy (a request waits); a scale-up may not
    assert choose_pod("a9", f, {}, CATALOGUE, CFG, 100.0, cold=True) == Load("a9", "p2", COLD, evict="a3")
    assert choose_pod("a9", f, demand(a9=50.0), CATALOGUE, CFG, 100.0, cold=False) is None


@pytest.mark.parametrize("share, want", [
    (0.285, 2),   # the Zipf(1.1) head of 32 adapters: 2.3 average pods' share, 1.5 at 1.5x each
    (0.133, 1),   # 1.06 average pods: within the 1.5x a copy may take
    (0.2, 2),
    (0.02, 1),    # tail: one copy
    (1.0, 6),     # everything: 8 average pods at 1.5x each
])
def test_copies_follow_the_models_share_of_the_requests(share: float, want: int) -> None:
    total = 40.0  # requests per second over the pool, as many in flight (5 per pod)
    st = ModelState("m", recent_rate=share * total, concurrency=share * total)
    assert desired_copies(st, (total, total), 8, CFG) == want
    loose = CFG.model_copy(update={"copy_load_factor": 1.0})
    everything = ModelState("m", recent_rate=total, concurrency=total)
    assert desired_copies(everything, (total, total), 8, loose) == 8  # never more
    queued = ModelState("m", recent_rate=0.1 * total, concurrency=0.3 * total)  # its copies queue
    assert desired_copies(queued, (total, total), 8, CFG) == 2


def test_little_work_spreads_over_no_more_copies_than_it_keeps_busy() -> None:
    """The only model of a quiet pool has all the share but 1 request in flight: one copy, not
    six; with 6 in flight, three (minInflightPerCopy = 2 each)."""
    assert desired_copies(ModelState("m", recent_rate=1.0, concurrency=1.0), (1.0, 1.0), 8, CFG) == 1
    assert desired_copies(ModelState("m", recent_rate=6.0, concurrency=6.0), (6.0, 6.0), 8, CFG) == 3


def test_a_hot_model_gets_copies_on_free_slots_in_one_tick() -> None:
    f = fleet({f"p{i}": [] for i in range(4)} | {"p0": ["a1"]}, slots=4, used=99.0)
    models = demand(a1=20.0, a2=1.0)
    actions = plan(f, models, CATALOGUE, CFG, 100.0, always)
    loads = [a for a in actions if isinstance(a, Load)]
    assert {a.reason for a in loads} == {SCALE_UP}
    # a1 carries 20 of 21 requests in flight: 3 copies at 1.5x the average pod (7.9) each
    assert len(loads) == 2 and len({a.pod for a in loads}) == 2 and all(a.model == "a1" for a in loads)


def test_a_scale_up_evicts_only_much_colder_copies() -> None:
    f = fleet({"p0": ["a1", "a2"], "p1": ["a3", "a4"]}, slots=2, now=0.0, used=99.0)
    cfg = CFG.model_copy(update={"copy_load_factor": 1.0})
    hot = demand(a1=12.0, a2=0.5, a3=0.3, a4=4.0)  # a1 wants 2 copies; a3 is 40x colder per copy
    loads = [a for a in plan(f, hot, CATALOGUE, cfg, 100.0, always) if isinstance(a, Load)]
    assert loads == [Load("a1", "p1", SCALE_UP, evict="a3")]
    warm = demand(a1=12.0, a2=0.5, a3=3.0, a4=4.0)  # a3 per copy (3) x 4 >= a1 per copy (12)
    assert [a for a in plan(f, warm, CATALOGUE, cfg, 100.0, always) if isinstance(a, Load)] == []


def test_idle_copies_are_unloaded_after_the_idle_time_even_the_last_one() -> None:
    f = fleet({"p0": ["a1", "static-x"]}, now=0.0)
    assert plan(f, {}, CATALOGUE, CFG, 59.0, always) == []
    assert plan(f, {}, CATALOGUE, CFG, 60.0, always) == [Unload("a1", "p0", IDLE)]  # not static-x
    f.pods["p0"].adapters["a1"].inflight = 1
    assert plan(f, {}, CATALOGUE, CFG, 600.0, always) == []


def test_a_surplus_copy_is_drained_then_unloaded_once_idle() -> None:
    f = fleet({"p0": ["a1"], "p1": ["a1"], "p2": ["a1"]}, slots=2, now=0.0)
    models = demand(a1=1.0)  # wants 1 copy, has 3
    for c in (f.pods[k].adapters["a1"] for k in ("p0", "p1", "p2")):
        c.last_used = 100.0
    f.pods["p0"].adapters["a1"].inflight = 1
    assert plan(f, models, CATALOGUE, CFG, 100.0, always) == []         # surplus starts
    assert plan(f, models, CATALOGUE, CFG, 129.0, always) == []
    assert plan(f, models, CATALOGUE, CFG, 130.0, always) == []         # one copy drained
    drained = [k for k, p in f.pods.items() if "a1" in p.draining]
    assert len(drained) == 1 and drained[0] != "p0"                     # not the busy one
    f.reindex()
    assert drained[0] not in f.routable["a1"] and drained[0] in f.holders["a1"]
    assert plan(f, models, CATALOGUE, CFG, 131.0, always) == [Unload("a1", drained[0], SCALE_DOWN)]


def test_demand_coming_back_cancels_a_drain() -> None:
    f = fleet({"p0": ["a1"], "p1": ["a1"]}, slots=2, now=0.0, used=99.0)
    f.pods["p1"].draining.add("a1")
    f.pods["p1"].adapters["a1"].inflight = 1  # not idle yet: not unloaded
    assert plan(f, demand(a1=8.0), CATALOGUE, CFG, 100.0, always) == []
    assert not f.pods["p1"].draining


def test_models_owned_by_another_replica_are_left_alone() -> None:
    f = fleet({"p0": ["a1"], "p1": []}, slots=2, now=0.0)
    assert plan(f, demand(a1=20.0), CATALOGUE, CFG, 1000.0, lambda m: m != "a1") == []


def test_a_models_report_older_than_our_own_change_is_ignored() -> None:
    f = fleet({"p0": ["a1"]})
    version = f.pods["p0"].version  # a poll is sent now ...
    f.loaded("p0", "a2", 1.0)       # ... our load completes before its answer arrives
    assert not f.apply_report("p0", version, ["a1"], ["base"], 2.0)
    assert f.holders["a2"] == {"p0"}


def test_every_replica_computes_the_same_owner_and_the_same_successor() -> None:
    peers = ("http://a:1", "http://b:1", "http://c:1")
    views = [Ownership(self_url=p, peers=peers) for p in peers]
    for model in (f"m{i}" for i in range(50)):
        owners = {v.owner(model) or v.self_url for v in views}
        assert len(owners) == 1
    spread = {views[0].owner(f"m{i}") or views[0].self_url for i in range(50)}
    assert spread == set(peers)  # the models are spread over the replicas
    model = next(f"m{i}" for i in range(50) if (views[0].owner(f"m{i}") or peers[0]) == peers[2])
    for v in views[:2]:
        v.unreachable(peers[2])
    successors = {v.owner(model) or v.self_url for v in views[:2]}
    assert len(successors) == 1 and peers[2] not in successors


def test_config_errors_name_the_field() -> None:
    from epp.placement.config import PlacementConfigError

    with pytest.raises(PlacementConfigError, match=r"idleUnloadAfter|idle_unload_after"):
        parse_placement_config("idleUnloadAfter: soon\n", "p.yaml")
    with pytest.raises(PlacementConfigError, match=r"p.yaml: mode: expected one of observe, manage"):
        parse_placement_config("mode: auto\n", "p.yaml")
    with pytest.raises(PlacementConfigError, match=r"p.yaml: models\[1\].name: duplicate model 'x'"):
        parse_placement_config("models: [{name: x, path: /a}, {name: x, path: /b}]\n", "p.yaml")
    with pytest.raises(PlacementConfigError, match=r"p.yaml: holdTimeoutt: Extra inputs"):
        parse_placement_config("holdTimeoutt: 1s\n", "p.yaml")
    assert isinstance(parse_placement_config(None), PlacementConfig)


def test_a_copy_being_unloaded_takes_no_request_and_a_draining_one_only_as_the_last_resort() -> None:
    f = fleet({"p0": ["a1"], "p1": ["a1"]})
    f.pods["p0"].unloading.add("a1")
    f.pods["p1"].draining.add("a1")
    f.reindex()
    assert f.routable["a1"] == {"p1"}      # draining, but the only copy that stays
    f.pods["p1"].unloading.add("a1")
    f.reindex()
    assert "a1" not in f.routable          # every copy is leaving: requests are held
    assert f.holders["a1"] == {"p0", "p1"}


def test_a_pod_that_collected_busy_models_gets_relief_where_the_least_work_is_expected() -> None:
    """a1 and a2 each need one copy by their share, but both landed on p0, which now expects
    twice the average pod's work: the busier of them gets a second copy on the quietest pod."""
    f = fleet({"p0": ["a1", "a2"], "p1": ["a3"], "p2": ["a4"], "p3": ["a5"]}, slots=2, used=99.0)
    models = demand(a1=6.4, a2=5.6, a3=4.0, a4=4.0, a5=1.2)
    loads = [a for a in plan(f, models, CATALOGUE, CFG, 100.0, always) if isinstance(a, Load)]
    assert loads == [Load("a1", "p3", SCALE_UP)]
    # the same models spread over the pods: nothing to relieve
    f = fleet({"p0": ["a1", "a5"], "p1": ["a2"], "p2": ["a3"], "p3": ["a4"]}, slots=2, used=99.0)
    assert [a for a in plan(f, models, CATALOGUE, CFG, 100.0, always) if isinstance(a, Load)] == []


def test_a_model_that_just_turned_hot_gets_copies_before_its_averages_catch_up() -> None:
    """Its averages still say 'rare', but 12 of its requests are in flight right now (they
    queue on its one copy): copies are added this tick. Down is slow: the averages only."""
    f = fleet({"p0": ["a1"], "p1": ["a2"], "p2": ["a3"], "p3": ["a4"]}, slots=4, used=99.0)
    models = demand(a2=0.5, a3=0.5, a4=0.5)
    models["a1"] = ModelState("a1", inflight=12, concurrency=0.5, recent_rate=0.5, rate=0.5)
    loads = [a for a in plan(f, models, CATALOGUE, CFG, 100.0, always) if isinstance(a, Load)]
    assert {a.model for a in loads} == {"a1"} and len(loads) >= 2


def test_a_trickle_gets_no_extra_copy_however_lopsided_the_pods_look() -> None:
    """One adapter on one of two pods is 'all the expected work' of that pod, but with a
    request now and then it keeps no second copy busy."""
    f = fleet({"p0": ["a1"], "p1": []}, slots=2, used=99.0)
    models = {"a1": ModelState("a1", inflight=1, concurrency=0.2, recent_rate=0.2, rate=0.2)}
    assert [a for a in plan(f, models, CATALOGUE, CFG, 100.0, always) if isinstance(a, Load)] == []
