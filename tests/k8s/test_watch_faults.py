"""Kubernetes faults that must not leave the picker with stale or invisible state (issue 11,
item 10), against the fake API server through the real ``kubernetes`` client:

* an optional CRD deleted while the picker was disconnected: the resumed watch gets 404 and
  the objects it described must go (not be kept forever while the watch retries);
* RBAC on an optional CRD revoked: 403 on the watch clears its objects, and they come back
  once access is granted again;
* Lease calls refused (403, no RBAC for leases): a warning at the default level, once per
  spell rather than once per retry, so an HA replica that never becomes ready says why.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

import pytest

from epp.datalayer.datastore import Datastore
from epp.discovery.kubernetes import KubernetesDiscovery
from epp.discovery.leader import LeaderElector, lease_name
from tests.k8s.fakeapi import FakeKube, inference_model, objective, pod, pool
from tests.waiting import eventually

APP = {"app": "vllm"}
ABSENT_RETRY = 0.5


def make(kube: FakeKube) -> KubernetesDiscovery:
    return KubernetesDiscovery(pool_name="pool", pool_namespace="default", api_client=kube.api_client(),
                               watch_timeout=30, backoff_max=0.3, absent_retry=ABSENT_RETRY)


async def start(kube: FakeKube, discoveries: list[Any]) -> tuple[KubernetesDiscovery, Datastore]:
    kube.add(pool("pool", APP, [8000]))
    kube.add(pod("a", "10.0.0.1", APP))
    d = make(kube)
    ds = Datastore()
    discoveries.append(d)
    await asyncio.wait_for(d.start(ds), 10)
    return d, ds


async def test_crd_deleted_while_disconnected_clears_its_objects(
        fake_k8s: FakeKube, discoveries: list[Any]) -> None:
    kube = fake_k8s
    kube.add(inference_model("chat", "pool", "chat-model", "Critical", [("chat-v3", 1)]))
    d, ds = await start(kube, discoveries)
    assert set(ds.model_objectives) == {"chat-model"} and [r.source for r in ds.rewrites] == ["chat"]
    await eventually(lambda: kube.open_watches("inferencemodels") == 1, what="InferenceModel watch open")

    # The CRD goes away while the picker cannot see the API server: its resumed watch gets 404.
    await asyncio.to_thread(kube.restart, 0.2, False, lambda: kube.uninstall("inferencemodels"))
    await eventually(lambda: not ds.model_objectives and not ds.rewrites,
                     what="InferenceModel objects dropped after the 404 on the watch")
    assert ds.synced and {e.key for e in ds.endpoints()} == {"10.0.0.1:8000"}  # nothing else lost
    await eventually(lambda: not d.stale, what="a CRD that is gone is not a failing API server")

    # Not a hot loop: once absent it is re-listed on the slow retry (spacing as the server saw it).
    t0 = kube.requests_since(0.0, "/inferencemodels")[-1][0]
    await eventually(lambda: len(kube.requests_since(t0, "/inferencemodels")) >= 3, timeout=20,
                     what="slow re-lists of the missing CRD")
    times = [t for t, _ in kube.requests_since(t0, "/inferencemodels")]
    assert all(b - a >= ABSENT_RETRY * 0.9 for a, b in itertools.pairwise(times)), times

    # Reinstalled: the next slow retry finds the objects again.
    kube.install("inferencemodels")
    await eventually(lambda: set(ds.model_objectives) == {"chat-model"}, timeout=20,
                     what="InferenceModel back after the CRD is reinstalled")


async def test_rbac_revoked_on_a_watch_clears_objects_until_granted_again(
        fake_k8s: FakeKube, discoveries: list[Any]) -> None:
    kube = fake_k8s
    kube.add(objective("premium", "pool", 10))
    _, ds = await start(kube, discoveries)
    assert set(ds.objectives) == {"premium"}
    await eventually(lambda: kube.open_watches("inferenceobjectives") == 1, what="objective watch open")

    kube.fail_next(100_000, 403, "/inferenceobjectives")  # every list and watch: Forbidden
    await asyncio.to_thread(kube.restart, 0.1)  # the open watch ends; the next one is refused
    await eventually(lambda: ds.objectives == {}, what="objectives dropped after 403 on the watch")
    assert ds.synced and {e.key for e in ds.endpoints()} == {"10.0.0.1:8000"}

    kube.clear_failures()
    await eventually(lambda: set(ds.objectives) == {"premium"}, timeout=20,
                     what="objectives back once RBAC allows reading them")


async def test_lease_403_is_a_rate_limited_warning(fake_k8s: FakeKube, caplog: pytest.LogCaptureFixture) -> None:
    kube = fake_k8s
    name = lease_name("default", "pool")
    kube.fail_next(100_000, 403, "/leases")
    caplog.set_level(logging.DEBUG, logger="epp.discovery.leader")
    e = LeaderElector(namespace="default", name=name, identity="me", api_client=kube.api_client(),
                      lease_duration=1.0, renew_deadline=0.6, retry_period=0.1)
    try:
        await e.start()
        await eventually(lambda: len(kube.requests_since(0.0, "/leases")) >= 8,
                         what="several refused Lease attempts")
        warnings = [r for r in caplog.records if r.name == "epp.discovery.leader" and r.levelno >= logging.WARNING]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        text = warnings[0].getMessage()
        assert "403" in text and "leases" in text and "coordination.k8s.io" in text
        assert not e.is_leader

        kube.clear_failures()
        await eventually(lambda: e.is_leader, what="leader once the Lease is allowed")
        assert any("succeed again" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    finally:
        await e.stop()
