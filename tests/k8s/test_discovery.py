"""Kubernetes discovery driven through the real ``kubernetes`` client against the fake API
server: the endpoint set, readiness and the model semantics a user would observe.

Every wait is for an observable condition (``tests.waiting.eventually``, bounded by a generous
deadline); how fast discovery stops is measured in ``benchmarks/k8s_failover.py``."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any

import pytest

from epp.datalayer.datastore import Datastore, Objective, RewriteRule, RewriteTarget
from epp.discovery.kubernetes import LEGACY_POOL_GROUP, KubernetesDiscovery
from tests.k8s.fakeapi import (
    FakeKube,
    inference_model,
    objective,
    pod,
    pool,
    rewrite,
)
from tests.waiting import eventually

APP = {"app": "vllm"}


def keys(ds: Datastore) -> set[str]:
    return {e.key for e in ds.endpoints()}


def names(ds: Datastore) -> dict[str, str]:
    return {e.key: e.name for e in ds.endpoints()}


def make(kube: FakeKube, **kw: Any) -> KubernetesDiscovery:
    kw.setdefault("pool_name", None if "endpoint_selector" in kw else "pool")
    kw.setdefault("pool_namespace", "default")
    return KubernetesDiscovery(api_client=kube.api_client(), watch_timeout=kw.pop("watch_timeout", 5),
                               backoff_max=kw.pop("backoff_max", 0.3),
                               absent_retry=kw.pop("absent_retry", 0.5), **kw)


# Hang guard for start(): the first use of the kubernetes client in a process is slow (its
# pydantic models), and the machine may be busy; a hang is what this catches, not slowness.
START_DEADLINE = 30


async def start(d: KubernetesDiscovery, started: list[Any], ds: Datastore | None = None) -> Datastore:
    ds = ds or Datastore()
    started.append(d)
    await asyncio.wait_for(d.start(ds), START_DEADLINE)
    return ds


async def test_pod_lifecycle(fake_k8s: FakeKube, discoveries: list[Any]) -> None:
    kube = fake_k8s
    kube.add(pool("pool", APP, [8000]))
    kube.add(pod("a", "10.0.0.1", {**APP, "role": "decode"}))
    kube.add(pod("b", "10.0.0.2", APP, ready=False))
    kube.add(pod("other", "10.0.0.9", {"app": "other"}))
    kube.add(pod("pending", None, APP))  # Ready but no IP yet: not routable
    ds = await start(make(kube), discoveries)

    assert ds.synced
    assert keys(ds) == {"10.0.0.1:8000"}
    ep = ds.get("10.0.0.1:8000")
    assert ep is not None and ep.name == "a-rank-0" and ep.labels == {"app": "vllm", "role": "decode"}
    assert ds.pool.name == "pool" and ds.pool.target_ports == (8000,)

    kube.set_pod_ready("b")
    await eventually(lambda: keys(ds) == {"10.0.0.1:8000", "10.0.0.2:8000"}, what="b ready")
    kube.set_pod_ready("a", False)
    await eventually(lambda: keys(ds) == {"10.0.0.2:8000"}, what="a not ready")
    kube.set_pod_ip("b", "10.0.0.3")
    await eventually(lambda: keys(ds) == {"10.0.0.3:8000"}, what="b new IP")
    kube.set_pod_ip("pending", "10.0.0.4")
    await eventually(lambda: keys(ds) == {"10.0.0.3:8000", "10.0.0.4:8000"}, what="pending got IP")
    kube.mark_deleting("b")
    await eventually(lambda: keys(ds) == {"10.0.0.4:8000"}, what="b terminating")
    kube.delete("Pod", "pending")
    await eventually(lambda: keys(ds) == set(), what="pending deleted")
    kube.set_labels("Pod", "other", APP)  # a pod joins by relabelling
    await eventually(lambda: keys(ds) == {"10.0.0.9:8000"}, what="other relabelled in")
    kube.set_labels("Pod", "other", {"app": "x"})
    await eventually(lambda: keys(ds) == set(), what="other relabelled out")
    assert ds.synced


async def test_target_ports_and_active_ports(fake_k8s: FakeKube, discoveries: list[Any]) -> None:
    kube = fake_k8s
    kube.add(pool("pool", APP, [8000, 8001, 8002]))
    kube.add(pod("a", "10.0.0.1", APP))
    ann = "inference.networking.k8s.io/active-ports"
    kube.add(pod("b", "10.0.0.2", APP, annotations={ann: "8002, 8001,junk"}))
    ds = await start(make(kube), discoveries)
    assert names(ds) == {
        "10.0.0.1:8000": "a-rank-0", "10.0.0.1:8001": "a-rank-1", "10.0.0.1:8002": "a-rank-2",
        "10.0.0.2:8001": "b-rank-1", "10.0.0.2:8002": "b-rank-2",
    }
    assert {e.key for e in ds.by_address("10.0.0.2")} == {"10.0.0.2:8001", "10.0.0.2:8002"}

    def set_ann(p: dict[str, Any]) -> None:
        p["metadata"]["annotations"] = {ann: "8000"}
    kube.update("Pod", "b", set_ann)
    await eventually(lambda: {k for k in keys(ds) if k.startswith("10.0.0.2")} == {"10.0.0.2:8000"},
                     what="annotation narrowed to 8000")

    def drop_ann(p: dict[str, Any]) -> None:
        p["metadata"].pop("annotations")
    kube.update("Pod", "b", drop_ann)
    await eventually(lambda: len(keys(ds)) == 6, what="annotation removed: all ranks")


async def test_pool_changes_relist_pods(fake_k8s: FakeKube, discoveries: list[Any]) -> None:
    kube = fake_k8s
    kube.add(pool("pool", APP, [8000]))
    kube.add(pod("a", "10.0.0.1", APP))
    kube.add(pod("n", "10.0.1.1", {"app": "new"}))
    ds = await start(make(kube), discoveries)
    assert keys(ds) == {"10.0.0.1:8000"}
    lists_before = sum(1 for r in kube.requests if "/pods" in r and "watch=" not in r)

    def ports(p: dict[str, Any]) -> None:
        p["spec"]["targetPorts"] = [{"number": 9000}, {"number": 9001}]
    kube.update("InferencePool", "pool", ports)
    await eventually(lambda: keys(ds) == {"10.0.0.1:9000", "10.0.0.1:9001"}, what="new ports")
    assert ds.pool.target_ports == (9000, 9001)

    def selector(p: dict[str, Any]) -> None:
        p["spec"]["selector"]["matchLabels"] = {"app": "new"}
    kube.update("InferencePool", "pool", selector)
    await eventually(lambda: keys(ds) == {"10.0.1.1:9000", "10.0.1.1:9001"}, what="new selector")
    assert sum(1 for r in kube.requests if "/pods" in r and "watch=" not in r) > lists_before
    assert any("labelSelector=app%3Dnew" in r for r in kube.requests)
    # the watch now follows the new selector
    kube.add(pod("n2", "10.0.1.2", {"app": "new"}))
    await eventually(lambda: "10.0.1.2:9000" in keys(ds), what="pod of the new selector")
    kube.set_pod_ready("a", False)  # old-selector pod: no longer our business
    # n3 is written after a's change: once the (ordered) pod stream has delivered n3, it would
    # have delivered a's change too, had discovery still been following the old selector
    kube.add(pod("n3", "10.0.1.3", {"app": "new"}))
    await eventually(lambda: "10.0.1.3:9000" in keys(ds), what="pod added after a's change")
    assert keys(ds) == {f"10.0.1.{i}:{p}" for i in (1, 2, 3) for p in (9000, 9001)}


async def test_pool_deleted_and_recreated(fake_k8s: FakeKube, discoveries: list[Any]) -> None:
    kube = fake_k8s
    kube.add(pool("pool", APP, [8000]))
    kube.add(pool("another", APP, [7000]))  # same namespace, other pool: ignored
    kube.add(pod("a", "10.0.0.1", APP))
    ds = await start(make(kube), discoveries)
    assert keys(ds) == {"10.0.0.1:8000"} and ds.synced

    kube.delete("InferencePool", "pool")
    await eventually(lambda: not ds.synced and keys(ds) == set(), what="cleared on pool deletion")
    # without a pool there is no selector, so discovery stops following pods altogether
    await eventually(lambda: kube.open_watches("pods") == 0, what="pod watch closed")
    kube.add(pod("b", "10.0.0.2", APP))  # while there is no pool: nothing to route to
    assert keys(ds) == set()

    kube.add(pool("pool", APP, [8000]))
    await eventually(lambda: ds.synced and keys(ds) == {"10.0.0.1:8000", "10.0.0.2:8000"},
                     what="pool re-created")


async def test_ready_only_after_pool_exists(fake_k8s: FakeKube, discoveries: list[Any],
                                           caplog: pytest.LogCaptureFixture) -> None:
    kube = fake_k8s
    kube.add(pod("a", "10.0.0.1", APP))
    caplog.set_level(logging.WARNING, logger="epp.discovery.kubernetes")
    d = make(kube)
    discoveries.append(d)
    ds = Datastore()
    task = asyncio.create_task(d.start(ds))
    # discovery has listed the pools and found none: it says so, and stays not ready
    await eventually(lambda: "not found; not ready until it exists" in caplog.text, what="pool-absent warning")
    assert not task.done() and not ds.synced and keys(ds) == set()
    kube.add(pool("pool", APP, [8000]))
    await asyncio.wait_for(task, START_DEADLINE)
    assert ds.synced and keys(ds) == {"10.0.0.1:8000"}


async def test_synced_only_after_first_full_sync(fake_k8s: FakeKube, discoveries: list[Any]) -> None:
    """The first pod LIST fails twice: start() waits (not ready) and then succeeds."""
    kube = fake_k8s
    kube.add(pool("pool", APP, [8000]))
    kube.add(pod("a", "10.0.0.1", APP))
    kube.fail_next(2, 503, path_contains="/pods")
    ds = Datastore()
    seen: list[bool] = []
    ds.add_listener(lambda added, removed: seen.append(ds.synced))
    await start(make(kube), discoveries, ds=ds)
    assert ds.synced and keys(ds) == {"10.0.0.1:8000"}
    assert seen == [False]  # the endpoints were written first, then the pool became ready
    assert sum(1 for r in kube.requests if "/pods" in r and "watch=" not in r) == 3


async def test_standalone_selector_mode(fake_k8s: FakeKube, discoveries: list[Any],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    kube = fake_k8s
    monkeypatch.setenv("NAMESPACE", "team")
    monkeypatch.setenv("POD_NAME", "my-epp-7d9f8b-x2x9q")
    kube.add(pod("a", "10.0.0.1", {"app": "vllm", "tier": "gpu"}, namespace="team"))
    kube.add(pod("b", "10.0.0.2", {"app": "vllm"}, namespace="team"))
    kube.add(pod("c", "10.0.0.3", {"app": "vllm", "tier": "gpu"}))  # other namespace
    d = make(kube, endpoint_selector={"app": "vllm", "tier": "gpu"}, target_ports=[8000, 8001],
             pool_namespace=None)
    ds = await start(d, discoveries)
    assert keys(ds) == {"10.0.0.1:8000", "10.0.0.1:8001"}
    assert (ds.pool.name, ds.pool.namespace, ds.pool.target_ports) == ("my-epp", "team", (8000, 8001))
    assert not any("inference" in r for r in kube.requests)  # no CRD watches in this mode
    kube.set_labels("Pod", "b", {"app": "vllm", "tier": "gpu"}, namespace="team")
    await eventually(lambda: len(keys(ds)) == 4, what="b joins")


async def test_legacy_v1alpha2_pool(fake_k8s: FakeKube, discoveries: list[Any]) -> None:
    kube = fake_k8s
    kube.add(pool("pool", APP, [8000], legacy=True))
    kube.add(pool("pool", {"app": "nope"}, [9999]))  # the v1 one of the same name is not ours
    kube.add(pod("a", "10.0.0.1", APP))
    ds = await start(make(kube, pool_group=LEGACY_POOL_GROUP), discoveries)
    assert names(ds) == {"10.0.0.1:8000": "a-rank-0"}

    def port(p: dict[str, Any]) -> None:
        p["spec"]["targetPortNumber"] = 8100
    kube.update("InferencePool", "pool", port, group="inference.networking.x-k8s.io")
    await eventually(lambda: keys(ds) == {"10.0.0.1:8100"}, what="legacy port change")


async def test_objectives_rewrites_and_legacy_models(fake_k8s: FakeKube, discoveries: list[Any]) -> None:
    kube = fake_k8s
    kube.add(pool("pool", APP, [8000]))
    kube.add(objective("premium", "pool", 10, created_offset=-100))
    kube.add(objective("batch", "pool", -1))
    kube.add(objective("default-prio", "pool"))
    kube.add(objective("elsewhere", "other-pool", 50))
    # generic rule in the OLDEST resource must still lose to every exact rule
    kube.add(rewrite("catch-all", "pool", [([], [("base", 1)])], created_offset=-300))
    kube.add(rewrite("new-split", "pool", [(["m1"], [("m1-v2", 1)])], created_offset=-10))
    kube.add(rewrite("old-split", "pool",
                     [(["m1", "m2"], [("m1-v1", 90), ("m1-v2", 10)]), ([], [("fallback", 1)])],
                     created_offset=-200))
    kube.add(rewrite("not-ours", "other-pool", [(["m1"], [("x", 1)])], created_offset=-1000))
    kube.add(inference_model("chat", "pool", "chat-model", "Critical", [("chat-v3", 1)],
                             created_offset=-50))
    kube.add(inference_model("chat-dup", "pool", "chat-model", "Sheddable", [("chat-v9", 1)],
                             created_offset=-5))
    kube.add(inference_model("cheap", "pool", "cheap-model", "Sheddable"))
    kube.add(inference_model("std", "pool", "std-model"))
    ds = await start(make(kube), discoveries)

    assert {n: o.priority for n, o in ds.objectives.items()} == {
        "premium": 10, "batch": -1, "default-prio": 0}
    assert ds.objectives["premium"].created < ds.objectives["batch"].created
    assert {m: (o.name, o.priority) for m, o in ds.model_objectives.items()} == {
        "chat-model": ("chat", 100), "cheap-model": ("cheap", -1), "std-model": ("std", 0)}
    assert [(r.source, r.matches) for r in ds.rewrites] == [
        ("old-split", ("m1", "m2")),   # exact, oldest (-200)
        ("chat", ("chat-model",)),      # exact, legacy InferenceModel (-50)
        ("new-split", ("m1",)),         # exact (-10)
        ("catch-all", ()),              # generic, oldest (-300)
        ("old-split", ()),              # generic (-200)
    ]
    assert ds.rewrites[0].targets == (RewriteTarget("m1-v1", 90), RewriteTarget("m1-v2", 10))
    assert ds.rewrites[1] == RewriteRule("chat", ("chat-model",), (RewriteTarget("chat-v3", 1),),
                                         ds.rewrites[1].created)

    # updates and deletes flow through
    def prio(o: dict[str, Any]) -> None:
        o["spec"]["priority"] = 5
    kube.update("InferenceObjective", "batch", prio)
    await eventually(lambda: ds.objectives["batch"].priority == 5, what="objective update")
    kube.delete("InferenceObjective", "premium")
    await eventually(lambda: "premium" not in ds.objectives, what="objective delete")
    kube.delete("InferenceModelRewrite", "old-split")
    await eventually(lambda: [r.source for r in ds.rewrites] == ["chat", "new-split", "catch-all"],
                     what="rewrite delete")
    kube.delete("InferenceModel", "chat")  # the younger duplicate takes over the name
    await eventually(lambda: ds.model_objectives["chat-model"] == Objective(
        "chat-dup", -1, ds.model_objectives["chat-model"].created), what="legacy clash handover")
    assert [r.source for r in ds.rewrites] == ["new-split", "chat-dup", "catch-all"]  # -10 < -5

    def retarget(o: dict[str, Any]) -> None:
        o["spec"]["rules"][0]["targets"] = [{"modelRewrite": "base-v2", "weight": 3}]
    kube.update("InferenceModelRewrite", "catch-all", retarget)
    await eventually(lambda: ds.rewrites[-1].targets == (RewriteTarget("base-v2", 3),),
                     what="rewrite update")


async def test_missing_crds_do_not_block(fake_k8s: FakeKube, discoveries: list[Any]) -> None:
    kube = fake_k8s
    for plural in ("inferenceobjectives", "inferencemodelrewrites", "inferencemodels"):
        kube.uninstall(plural)
    kube.add(pool("pool", APP, [8000]))
    kube.add(pod("a", "10.0.0.1", APP))
    ds = await start(make(kube), discoveries)
    assert ds.synced and ds.objectives == {} and ds.rewrites == ()
    # CRD installed later: picked up on the slow retry
    kube.install("inferenceobjectives")
    kube.add(objective("late", "pool", 3))
    await eventually(lambda: "late" in ds.objectives, what="objective after CRD install")


async def test_api_server_restart_keeps_endpoints(fake_k8s: FakeKube, discoveries: list[Any]) -> None:
    kube = fake_k8s
    kube.add(pool("pool", APP, [8000]))
    kube.add(pod("a", "10.0.0.1", APP))
    kube.add(pod("b", "10.0.0.2", APP))
    d = make(kube)
    ds = await start(d, discoveries)
    assert keys(ds) == {"10.0.0.1:8000", "10.0.0.2:8000"}
    watches_before = kube.watch_count()

    def while_down() -> None:
        kube.add(pod("c", "10.0.0.3", APP))

    await asyncio.to_thread(kube.restart, 1.0, False, while_down)
    # while it was down nothing was dropped; the state is flagged stale until resumed
    assert keys(ds) == {"10.0.0.1:8000", "10.0.0.2:8000"}
    await eventually(lambda: "10.0.0.3:8000" in keys(ds), what="resumed watch sees pod c")
    await eventually(lambda: not d.stale, what="stale flag cleared")
    assert kube.watch_count() > watches_before
    # resumed from the resourceVersion, not re-listed
    pod_lists = [r for r in kube.requests if "/pods" in r and "watch=" not in r]
    assert len(pod_lists) == 1
    assert ds.synced


async def test_gone_410_relists(fake_k8s: FakeKube, discoveries: list[Any]) -> None:
    kube = fake_k8s
    kube.add(pool("pool", APP, [8000]))
    kube.add(pod("a", "10.0.0.1", APP))
    kube.add(pod("b", "10.0.0.2", APP))
    ds = await start(make(kube), discoveries)

    def while_down() -> None:
        kube.delete("Pod", "a")
        kube.add(pod("c", "10.0.0.3", APP))

    await asyncio.to_thread(kube.restart, 0.3, True, while_down)
    await eventually(lambda: keys(ds) == {"10.0.0.2:8000", "10.0.0.3:8000"}, what="relist after 410")
    pod_lists = [r for r in kube.requests if "/pods" in r and "watch=" not in r]
    assert len(pod_lists) == 2


async def test_5xx_backoff_then_recovery(fake_k8s: FakeKube, discoveries: list[Any]) -> None:
    kube = fake_k8s
    kube.add(pool("pool", APP, [8000]))
    kube.add(pod("a", "10.0.0.1", APP))
    d = make(kube, watch_timeout=1)  # watches end every second: the failures hit the re-watch
    ds = await start(d, discoveries)
    kube.fail_next(4, 500, path_contains="/pods")
    t0 = time.monotonic()
    await eventually(lambda: d.stale, what="watch failing")
    kube.add(pod("b", "10.0.0.2", APP))
    assert keys(ds) >= {"10.0.0.1:8000"}  # kept while failing
    await eventually(lambda: keys(ds) == {"10.0.0.1:8000", "10.0.0.2:8000"} and not d.stale,
                     what="recovered")
    # Not a hot loop: as the API server saw them, the four failed requests and the one that
    # succeeded are each at least the backoff's floor apart (base 0.2 s, jittered to [0.1, 0.2]
    # s, then doubling up to backoff_max 0.3 s). Slowness can only widen these gaps.
    times = [at for at, _ in kube.requests_since(t0, "/pods")][:5]
    assert len(times) == 5
    assert min(b - a for a, b in itertools.pairwise(times)) >= 0.09  # 0.1, less clock rounding


async def test_stop_is_bounded(fake_k8s: FakeKube) -> None:
    kube = fake_k8s
    kube.add(pool("pool", APP, [8000]))
    d = make(kube, watch_timeout=300)
    await asyncio.wait_for(d.start(Datastore()), START_DEADLINE)
    # a watch may stream for 300 s: stop() must close it, not wait for it (a thread still alive
    # after stop() means its 5 s join gave up). How long stop() takes: benchmarks/k8s_failover.py
    await asyncio.wait_for(d.stop(), 30)
    await asyncio.wait_for(d.stop(), 30)  # idempotent
    assert all(not w._thread.is_alive() for w in d._watchers.values())


async def test_stop_before_start_is_safe() -> None:
    await KubernetesDiscovery(pool_name="p", api_client=None).stop()
