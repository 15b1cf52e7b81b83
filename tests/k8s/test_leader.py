"""Leader election (active-passive HA) against the fake API server's Leases, through the real
``kubernetes`` client: one leader at a time, fast failover on release, takeover after expiry,
stepping down when the lease cannot be renewed, and readiness that follows leadership in the
runner (in-process ``PickerServer``) and in real ``epp serve`` processes.

Durations are shortened (lease 1 s, renew deadline 0.6 s, retry 0.1 s) so the suite stays fast.
Nothing here times the election: "not before the lease expired" is read from the Lease's own
acquire/renew timestamps, "fast failover on release" is shown with a 30 s lease that could not
have expired within the test's deadline, and every wait is a poll with a generous deadline.
How fast failover and stepping down actually are is measured by ``benchmarks/k8s_failover.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import sys
import threading
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epp.config.loader import ConfigError
from epp.discovery.kubernetes import KubernetesDiscovery
from epp.discovery.leader import LeaderElector, default_identity, lease_name
from epp.local.topology import HOST, Topology, free_port_block, grpc_serving
from epp.runner import cli
from epp.runner.server import PickerServer, ServeOptions
from tests.k8s.fakeapi import COORDINATION_GROUP, FakeKube, lease, pod, pool
from tests.waiting import eventually, wait_until

LEASE = lease_name("default", "pool")
FAST: dict[str, Any] = {"lease_duration": 1.0, "renew_deadline": 0.6, "retry_period": 0.1}


def holder(kube: FakeKube) -> str:
    try:
        return kube.get("Lease", LEASE, group=COORDINATION_GROUP)["spec"].get("holderIdentity") or ""
    except KeyError:
        return ""


def lease_spec(kube: FakeKube) -> dict[str, Any]:
    spec: dict[str, Any] = kube.get("Lease", LEASE, group=COORDINATION_GROUP)["spec"]
    return spec


def micro_time(text: str) -> datetime:
    """A Lease MicroTime (RFC 3339 with microseconds: ``...05.678901Z`` or, as the ``kubernetes``
    client re-serialises it, ``...05.678901+00:00``)."""
    return datetime.fromisoformat(text)


# Both times in a Lease come from this machine's wall clock: allow for its rounding only.
CLOCK_SLACK = timedelta(milliseconds=10)


def lease_reads_since(kube: FakeKube, t: float) -> int:
    """GETs of the Lease the fake API server answered since monotonic time ``t``."""
    return sum(1 for _, r in kube.requests_since(t, f"/leases/{LEASE}") if r.startswith("GET "))


@pytest.fixture
async def electors(fake_k8s: FakeKube) -> AsyncIterator[list[LeaderElector]]:
    made: list[LeaderElector] = []
    yield made
    for e in made:
        await e.stop()


def elector(kube: FakeKube, made: list[LeaderElector], identity: str, **kw: Any) -> LeaderElector:
    e = LeaderElector(namespace="default", name=LEASE, identity=identity, api_client=kube.api_client(),
                      **{**FAST, **kw})
    made.append(e)
    return e


def leaders(es: list[LeaderElector]) -> list[str]:
    return [e.identity for e in es if e.is_leader]


def test_lease_name_and_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    assert lease_name("llm", "qwen") == "epp-llm-qwen.gateway-api-inference-extension.sigs.k8s.io"
    monkeypatch.setenv("POD_NAME", "qwen-epp-6d9f-abcde")
    assert default_identity() == "qwen-epp-6d9f-abcde"
    monkeypatch.delenv("POD_NAME")
    a, b = default_identity(), default_identity()
    assert a != b  # two processes on one host never share an identity


async def test_exactly_one_leader_that_keeps_the_lease_by_renewing(
        fake_k8s: FakeKube, electors: list[LeaderElector]) -> None:
    kube = fake_k8s
    changes: list[tuple[str, bool]] = []
    for name in ("a", "b"):
        elector(kube, electors, name, on_change=functools.partial(lambda n, v: changes.append((n, v)), name))
    await asyncio.gather(*(e.start() for e in electors))
    await eventually(lambda: len(leaders(electors)) == 1, what="a leader")
    first = leaders(electors)[0]
    assert holder(kube) == first

    def held_for() -> timedelta:
        spec = lease_spec(kube)
        return micro_time(spec["renewTime"]) - micro_time(spec["acquireTime"])

    # renewals keep the lease for more than two lease durations, as the Lease itself records ...
    await eventually(lambda: held_for() > timedelta(seconds=2 * FAST["lease_duration"]),
                     what="the lease renewed for two lease durations")
    # ... and in all that time nobody else led and the leader never lost it
    assert changes == [(first, True)]
    assert leaders(electors) == [first] and holder(kube) == first
    assert lease_spec(kube)["leaseTransitions"] == 0


async def test_a_stopping_leader_releases_the_lease_and_the_standby_takes_over(
        fake_k8s: FakeKube, electors: list[LeaderElector], caplog: pytest.LogCaptureFixture) -> None:
    kube = fake_k8s
    caplog.set_level(logging.INFO, logger="epp.discovery.leader")
    # a 30 s lease: a standby that had to wait for it to expire would miss the deadline below
    a, b = (elector(kube, electors, n, lease_duration=30.0) for n in ("a", "b"))
    await asyncio.gather(a.start(), b.start())
    await eventually(lambda: len(leaders(electors)) == 1, what="a leader")
    lead, standby = (a, b) if a.is_leader else (b, a)
    await eventually(lambda: standby.holder == lead.identity, what="the standby sees the lease held")

    await lead.stop()  # releases the lease
    assert not lead.is_leader
    assert f"released Lease default/{LEASE} as {lead.identity}" in caplog.text
    await eventually(lambda: standby.is_leader, timeout=15.0, what="the standby takes over the released lease")
    spec = lease_spec(kube)
    assert spec["holderIdentity"] == standby.identity and spec["leaseTransitions"] == 1


async def test_crashed_leader_is_replaced_after_the_lease_expires(
        fake_k8s: FakeKube, electors: list[LeaderElector]) -> None:
    kube = fake_k8s
    a = elector(kube, electors, "a")
    await a.start()
    await eventually(lambda: a.is_leader, what="a leads")
    b = elector(kube, electors, "b")
    await b.start()
    await eventually(lambda: b.holder == "a", what="b sees a's lease")
    assert not b.is_leader
    await a.stop(release=False)  # a "crash": nobody renews, nobody releases
    last_renewal = micro_time(lease_spec(kube)["renewTime"])
    await eventually(lambda: b.is_leader, what="b takes over after expiry")
    spec = lease_spec(kube)
    assert spec["holderIdentity"] == "b" and spec["leaseTransitions"] == 1
    # b took the lease only once it had run out: a lease duration after a's last renewal
    assert micro_time(spec["acquireTime"]) - last_renewal >= timedelta(seconds=FAST["lease_duration"]) - CLOCK_SLACK


async def test_foreign_holder_blocks_until_expiry_and_a_stolen_lease_means_stepping_down(
        fake_k8s: FakeKube, electors: list[LeaderElector], caplog: pytest.LogCaptureFixture) -> None:
    kube = fake_k8s
    kube.add(lease(LEASE, "gie-replica", duration=1))  # e.g. a GIE replica holds it
    foreign_renewal = micro_time(lease_spec(kube)["renewTime"])
    a = elector(kube, electors, "a")
    await a.start()
    await eventually(lambda: a.holder == "gie-replica", what="a sees the foreign holder")
    assert not a.is_leader
    await eventually(lambda: a.is_leader, what="a acquires the expired lease")
    spec = lease_spec(kube)
    assert spec["leaseTransitions"] == 1
    assert micro_time(spec["acquireTime"]) - foreign_renewal >= timedelta(seconds=1) - CLOCK_SLACK

    def steal(obj: dict[str, Any]) -> None:
        obj["spec"]["holderIdentity"] = "intruder"
        obj["spec"]["leaseDurationSeconds"] = 30

    caplog.set_level(logging.INFO, logger="epp.discovery.leader")
    kube.update("Lease", LEASE, steal, group=COORDINATION_GROUP)
    await eventually(lambda: not a.is_leader, what="a steps down")
    assert "lost leadership" in caplog.text and "intruder" in caplog.text
    # a campaigns again: it reads the lease over and over and leaves it to the intruder, whose
    # lease is valid for 30 s
    t0 = time.monotonic()
    await eventually(lambda: lease_reads_since(kube, t0) >= 3, what="a re-reads the lease three times")
    assert not a.is_leader and a.holder == "intruder" and holder(kube) == "intruder"


async def test_leader_that_cannot_renew_steps_down_then_recovers(
        fake_k8s: FakeKube, electors: list[LeaderElector], caplog: pytest.LogCaptureFixture) -> None:
    kube = fake_k8s
    a = elector(kube, electors, "a")
    await a.start()
    await eventually(lambda: a.is_leader, what="a leads")
    caplog.set_level(logging.INFO, logger="epp.discovery.leader")
    kube.fail_next(10_000, 503, path_contains="/leases")
    # it gives up once its renew deadline (0.6 s) has passed without a renewal, before the
    # lease (1 s) could expire for anybody else (how soon: benchmarks/k8s_failover.py)
    await eventually(lambda: not a.is_leader, what="a steps down")
    assert "could not renew it for 0.6s" in caplog.text
    kube.clear_failures()
    await eventually(lambda: a.is_leader, what="a leads again")


async def test_stop_is_safe_before_start_and_twice(fake_k8s: FakeKube) -> None:
    e = LeaderElector(namespace="default", name=LEASE, identity="x", api_client=fake_k8s.api_client(), **FAST)
    await e.stop()
    await e.start()
    await eventually(lambda: e.is_leader, what="x leads")
    await e.stop()
    await e.stop()
    assert holder(fake_k8s) == ""


async def test_stop_ends_the_election_even_if_its_cancellation_is_lost(
        fake_k8s: FakeKube, monkeypatch: pytest.MonkeyPatch) -> None:
    """Python 3.11's ``asyncio.wait_for`` returns the result of a call that completes while its
    task is being cancelled, and the cancellation is lost. ``stop()`` waits for the election
    loop to end, so a lost cancellation used to hang it (seen in benchmarks/k8s_failover.py);
    the picker's shutdown then gave up on it and never released the Lease."""
    e = LeaderElector(namespace="default", name=LEASE, identity="x", api_client=fake_k8s.api_client(), **FAST)
    loop = asyncio.get_running_loop()
    in_call, release = asyncio.Event(), threading.Event()

    def lease_call(timeout: float) -> bool:  # a Lease call in flight until stop() cancels
        loop.call_soon_threadsafe(in_call.set)
        release.wait(10)
        return False

    real_wait_for = asyncio.wait_for

    async def wait_for_that_loses_a_cancel(aw: Any, timeout: float | None) -> Any:  # noqa: ASYNC109
        """3.11's race, made deterministic: the call completes as the cancellation arrives."""
        fut = asyncio.ensure_future(aw)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            release.set()
            return await fut  # the call's result wins; the cancellation is dropped

    e._try_acquire_or_renew = lease_call  # type: ignore[method-assign]
    monkeypatch.setattr(asyncio, "wait_for", wait_for_that_loses_a_cancel)
    await e.start()
    await real_wait_for(in_call.wait(), 5)
    stopping = asyncio.create_task(e.stop())
    done, _ = await asyncio.wait({stopping}, timeout=5)  # hang guard (stop() returns at once)
    if not done:
        stopping.cancel()
    assert done, "stop() hung: the election loop survived its cancellation"


def test_invalid_durations_are_rejected() -> None:
    with pytest.raises(ValueError, match="renew deadline"):
        LeaderElector(namespace="d", name="n", identity="i", lease_duration=10, renew_deadline=10)
    with pytest.raises(ValueError, match="retry period"):
        LeaderElector(namespace="d", name="n", identity="i", renew_deadline=2, retry_period=2)


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    return p.parse_args(list(argv))


def test_cli_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_NAME", "epp-0")
    opts = cli.options_from_args(parse("--pool-name", "qwen", "--pool-namespace", "llm",
                                       "--ha-enable-leader-election"))
    le = opts.leader_election
    assert le is not None and le.identity == "epp-0"
    assert le.name == "epp-llm-qwen.gateway-api-inference-extension.sigs.k8s.io" and le.namespace == "llm"
    assert (le.lease_duration, le.renew_deadline, le.retry_period) == (15.0, 10.0, 2.0)
    opts = cli.options_from_args(parse("--pool-name", "qwen", "--ha-enable-leader-election=true",
                                       "--leader-election-lease-duration", "4s",
                                       "--leader-election-renew-deadline", "3s",
                                       "--leader-election-retry-period", "500ms"))
    assert opts.leader_election is not None and opts.leader_election.retry_period == 0.5
    assert cli.options_from_args(parse("--pool-name", "qwen")).leader_election is None
    with pytest.raises(ConfigError, match="needs a Kubernetes pool"):
        cli.options_from_args(parse("--endpoints", "127.0.0.1:8000", "--ha-enable-leader-election"))
    with pytest.raises(ConfigError, match="renew deadline"):
        cli.options_from_args(parse("--pool-name", "q", "--ha-enable-leader-election",
                                    "--leader-election-renew-deadline", "20s"))


# ---- readiness through the runner's health service ----
async def health(port: int, service: str) -> str:
    async with grpc.aio.insecure_channel(f"{HOST}:{port}") as ch:
        resp = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=2)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))


def picker(kube: FakeKube, identity: str) -> PickerServer:
    discovery = KubernetesDiscovery(pool_name="pool", pool_namespace="default", api_client=kube.api_client(),
                                    watch_timeout=5, backoff_max=0.3, absent_retry=0.5)
    le = LeaderElector(namespace="default", name=LEASE, identity=identity, api_client=kube.api_client(), **FAST)
    return PickerServer(ServeOptions(discovery=discovery, leader_election=le, grpc_port=0, grpc_health_port=0,
                                     metrics_port=-1, bind_address=HOST, secure_serving=False, grace_period=0.1))


async def test_readiness_follows_leadership_in_the_runner(fake_k8s: FakeKube) -> None:
    kube = fake_k8s
    kube.add(pool("pool", {"app": "vllm"}, [8000]))
    kube.add(pod("m-0", "10.0.0.1", {"app": "vllm"}))
    servers = {"a": picker(kube, "a"), "b": picker(kube, "b")}
    started: list[PickerServer] = []
    try:
        for s in servers.values():
            await s.start()
            started.append(s)

        async def ready_states() -> dict[str, str]:
            return {k: await health(s.bound_ports["health"], "readiness") for k, s in servers.items()}

        async def one_ready() -> bool:
            return sorted((await ready_states()).values()) == ["NOT_SERVING", "SERVING"]

        await eventually(one_ready, interval=0.1, what="exactly one replica ready")
        states = await ready_states()
        lead = next(k for k, v in states.items() if v == "SERVING")
        standby = "b" if lead == "a" else "a"
        assert holder(kube) == lead
        lp, sp = servers[lead].bound_ports["health"], servers[standby].bound_ports["health"]
        for svc in ("", "envoy.service.ext_proc.v3.ExternalProcessor"):
            assert await health(lp, svc) == "SERVING"
            assert await health(sp, svc) == "NOT_SERVING"
        assert await health(sp, "liveness") == "SERVING"  # a standby is alive, just not ready
        assert len(servers[standby].datastore.endpoints()) == 1  # ... and warm

        await servers[lead].stop()
        started.remove(servers[lead])

        async def standby_ready() -> bool:
            return await health(sp, "readiness") == "SERVING"

        await eventually(standby_ready, interval=0.1, what="the standby ready")
        assert holder(kube) == standby
    finally:
        for s in started:
            await s.stop()


def test_epp_serve_processes_fail_over(fake_k8s: FakeKube, tmp_path: Path) -> None:
    """Two real ``epp serve --ha-enable-leader-election`` processes (KUBECONFIG → the fake API
    server): one is ready; SIGTERM it and the other becomes ready. The lease is 30 s and the
    deadline 15 s, so only a released lease (not an expired one) lets the standby in."""
    kube = fake_k8s
    kube.add(pool("pool", {"app": "vllm"}, [8000]))
    kube.add(pod("m-0", "10.0.0.1", {"app": "vllm"}))
    kubeconfig = kube.kubeconfig(tmp_path / "kubeconfig")
    with Topology(tmp_path / "procs") as topo:
        ports: dict[str, int] = {}
        procs = {}
        for name in ("epp-a", "epp-b"):
            grpc_port = free_port_block(2)
            ports[name] = grpc_port + 1
            procs[name] = topo.start(name, [
                sys.executable, "-m", "epp", "serve", "--pool-name", "pool", "--pool-namespace", "default",
                "--grpc-port", str(grpc_port), "--grpc-health-port", str(grpc_port + 1), "--metrics-port", "-1",
                "--bind-address", HOST, "--secure-serving=false", "--log-format", "text",
                "--ha-enable-leader-election", "--leader-election-lease-duration", "30s",
                "--leader-election-renew-deadline", "2s", "--leader-election-retry-period", "200ms",
            ], ready=functools.partial(grpc_serving, HOST, grpc_port + 1, "liveness"), timeout=30,
                env={"KUBECONFIG": kubeconfig, "POD_NAME": name, "KUBERNETES_SERVICE_HOST": ""})

        def ready() -> list[str]:
            return [n for n, p in ports.items() if grpc_serving(HOST, p)]

        wait_until(lambda: len(ready()) == 1, timeout=30, what=lambda: [p.log_tail() for p in procs.values()])
        lead = ready()[0]
        standby = next(n for n in ports if n != lead)
        assert holder(kube) == lead
        procs[lead].stop()
        wait_until(lambda: grpc_serving(HOST, ports[standby]), timeout=15, what=procs[standby].log_tail)
        assert holder(kube) == standby
        assert "released" in procs[lead].log_tail(50)
