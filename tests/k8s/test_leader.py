"""Leader election (active-passive HA) against the fake API server's Leases, through the real
``kubernetes`` client: one leader at a time, fast failover on release, takeover after expiry,
stepping down when the lease cannot be renewed, and readiness that follows leadership in the
runner (in-process ``PickerServer``) and in real ``epp serve`` processes.

Durations are shortened (lease 1 s, renew deadline 0.6 s, retry 0.1 s) so the suite stays fast;
the bounds below are generous multiples of them, not performance goals.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import sys
import time
from collections.abc import AsyncIterator
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
from tests.k8s.conftest import eventually
from tests.k8s.fakeapi import COORDINATION_GROUP, FakeKube, lease, pod, pool

LEASE = lease_name("default", "pool")
FAST: dict[str, Any] = {"lease_duration": 1.0, "renew_deadline": 0.6, "retry_period": 0.1}


def holder(kube: FakeKube) -> str:
    try:
        return kube.get("Lease", LEASE, group=COORDINATION_GROUP)["spec"].get("holderIdentity") or ""
    except KeyError:
        return ""


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


async def test_exactly_one_leader_and_fast_failover_on_release(
        fake_k8s: FakeKube, electors: list[LeaderElector]) -> None:
    kube = fake_k8s
    a, b = elector(kube, electors, "a"), elector(kube, electors, "b")
    await asyncio.gather(a.start(), b.start())
    await eventually(lambda: len(leaders(electors)) == 1, what="a leader")
    first = leaders(electors)[0]
    assert holder(kube) == first
    for _ in range(15):  # renewals keep it: still exactly one, the same one, for > a lease duration
        await asyncio.sleep(0.1)
        assert leaders(electors) == [first]
    lead, standby = (a, b) if first == "a" else (b, a)

    await lead.stop()  # releases the lease
    assert not lead.is_leader
    # a released lease is free at once: the standby takes over within its retry period,
    # well before the 1 s the lease would otherwise need to expire
    await eventually(lambda: standby.is_leader, timeout=0.9, what="standby takes over")
    spec = kube.get("Lease", LEASE, group=COORDINATION_GROUP)["spec"]
    assert spec["holderIdentity"] == standby.identity and spec["leaseTransitions"] == 1


async def test_crashed_leader_is_replaced_after_the_lease_expires(
        fake_k8s: FakeKube, electors: list[LeaderElector]) -> None:
    kube = fake_k8s
    a = elector(kube, electors, "a")
    await a.start()
    await eventually(lambda: a.is_leader, what="a leads")
    b = elector(kube, electors, "b")
    await b.start()
    await asyncio.sleep(0.3)
    assert not b.is_leader and holder(kube) == "a"
    await a.stop(release=False)  # a "crash": nobody renews, nobody releases
    t0 = time.monotonic()
    await eventually(lambda: b.is_leader, timeout=3.0, what="b takes over after expiry")
    # b may not take over before the lease (1 s) has run out since it last saw a renewal
    assert time.monotonic() - t0 >= 0.5
    assert holder(kube) == "b"


async def test_foreign_holder_blocks_until_expiry_and_a_stolen_lease_means_stepping_down(
        fake_k8s: FakeKube, electors: list[LeaderElector], caplog: pytest.LogCaptureFixture) -> None:
    kube = fake_k8s
    kube.add(lease(LEASE, "gie-replica", duration=1))  # e.g. a GIE replica holds it
    a = elector(kube, electors, "a")
    await a.start()
    await asyncio.sleep(0.4)
    assert not a.is_leader and a.holder == "gie-replica"
    await eventually(lambda: a.is_leader, timeout=3.0, what="a acquires the expired lease")
    assert kube.get("Lease", LEASE, group=COORDINATION_GROUP)["spec"]["leaseTransitions"] == 1

    def steal(obj: dict[str, Any]) -> None:
        obj["spec"]["holderIdentity"] = "intruder"
        obj["spec"]["leaseDurationSeconds"] = 30

    caplog.set_level(logging.INFO, logger="epp.discovery.leader")
    kube.update("Lease", LEASE, steal, group=COORDINATION_GROUP)
    await eventually(lambda: not a.is_leader, timeout=2.0, what="a steps down")
    assert "lost leadership" in caplog.text and "intruder" in caplog.text
    await asyncio.sleep(0.5)
    assert not a.is_leader  # the intruder's lease is valid for 30 s


async def test_leader_that_cannot_renew_steps_down_then_recovers(
        fake_k8s: FakeKube, electors: list[LeaderElector], caplog: pytest.LogCaptureFixture) -> None:
    kube = fake_k8s
    a = elector(kube, electors, "a")
    await a.start()
    await eventually(lambda: a.is_leader, what="a leads")
    caplog.set_level(logging.INFO, logger="epp.discovery.leader")
    kube.fail_next(10_000, 503, path_contains="/leases")
    # it must give up within its renew deadline (0.6 s), before the lease (1 s) could expire
    # for anybody else
    await eventually(lambda: not a.is_leader, timeout=1.5, what="a steps down")
    assert "could not renew" in caplog.text
    kube.clear_failures()
    await eventually(lambda: a.is_leader, timeout=3.0, what="a leads again")


async def test_stop_is_safe_before_start_and_twice(fake_k8s: FakeKube) -> None:
    e = LeaderElector(namespace="default", name=LEASE, identity="x", api_client=fake_k8s.api_client(), **FAST)
    await e.stop()
    await e.start()
    await eventually(lambda: e.is_leader, what="x leads")
    await e.stop()
    await e.stop()
    assert holder(fake_k8s) == ""


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

        deadline = time.monotonic() + 5
        while sorted((await ready_states()).values()) != ["NOT_SERVING", "SERVING"]:
            assert time.monotonic() < deadline, await ready_states()
            await asyncio.sleep(0.1)
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
        deadline = time.monotonic() + 3
        while await health(sp, "readiness") != "SERVING":
            assert time.monotonic() < deadline, "standby never became ready"
            await asyncio.sleep(0.1)
        assert holder(kube) == standby
    finally:
        for s in started:
            await s.stop()


def test_epp_serve_processes_fail_over(fake_k8s: FakeKube, tmp_path: Path) -> None:
    """Two real ``epp serve --ha-enable-leader-election`` processes (KUBECONFIG → the fake API
    server): one is ready; SIGTERM it and the other is ready well within a lease duration."""
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
                "--ha-enable-leader-election", "--leader-election-lease-duration", "3s",
                "--leader-election-renew-deadline", "2s", "--leader-election-retry-period", "200ms",
            ], ready=functools.partial(grpc_serving, HOST, grpc_port + 1, "liveness"), timeout=30,
                env={"KUBECONFIG": kubeconfig, "POD_NAME": name, "KUBERNETES_SERVICE_HOST": ""})

        def ready() -> list[str]:
            return [n for n, p in ports.items() if grpc_serving(HOST, p)]

        deadline = time.monotonic() + 10
        while len(ready()) != 1:
            assert time.monotonic() < deadline, [p.log_tail() for p in procs.values()]
            time.sleep(0.1)
        lead = ready()[0]
        standby = next(n for n in ports if n != lead)
        assert holder(kube) == lead
        procs[lead].stop()
        t0 = time.monotonic()
        while not grpc_serving(HOST, ports[standby]):
            assert time.monotonic() - t0 < 2.5, procs[standby].log_tail()  # released: faster than 3 s
            time.sleep(0.05)
        assert holder(kube) == standby
        assert "released" in procs[lead].log_tail(50)
