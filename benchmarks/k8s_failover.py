"""Benchmark: how fast leader-election failover, stepping down and discovery shutdown are.

Run from the repository root (it uses the tests' fake Kubernetes API server,
``tests/k8s/fakeapi.py``, which speaks the real list/watch and Lease protocol)::

    .venv/bin/python -m benchmarks.k8s_failover --trials 5

The tests assert that these things happen (tests/k8s/test_leader.py, test_discovery.py);
this measures how long they take:

* **processes**: two real ``epp serve --ha-enable-leader-election`` replicas. The leader gets
  SIGTERM (it releases the Lease on the way out) or SIGKILL (nobody releases: the standby
  waits for the lease to expire); the time is from the signal to the standby's gRPC
  ``readiness`` answering SERVING (polled every 20 ms). The stopped replica is started again
  as the next standby and left to warm up for ``--settle`` seconds, so each trial fails over
  in the other direction to a standby that has been running for a while, as in a deployment.
* **in-process electors** (the tests' short durations): release and crash failover to
  ``is_leader``; and a leader whose renewals fail (503): the time from its last successful
  renewal (the Lease's ``renewTime``) to stepping down, which must stay below the lease
  duration (after that another replica may take over: two leaders).
* **discovery stop**: ``KubernetesDiscovery.stop()`` with a 300 s pod watch open.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any


def _fake_kube() -> Any:
    try:
        from tests.k8s.fakeapi import FakeKube
    except ImportError:  # the benchmarks ship without the tests
        sys.exit("benchmarks.k8s_failover needs the repository checkout (tests/k8s/fakeapi.py); "
                 "run it from the repository root")
    return FakeKube(bookmark_interval=0.5).start()


def _summary(xs: list[float]) -> str:
    return (f"{min(xs):.3f} / {statistics.median(xs):.3f} / {max(xs):.3f}" if xs else "—")


def _wait(pred: Callable[[], bool], timeout: float, what: str, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise RuntimeError(f"benchmark: {what} did not happen within {timeout}s")
        time.sleep(interval)


async def _await(pred: Callable[[], bool], what: str, within: float = 30.0, interval: float = 0.005) -> None:
    deadline = time.monotonic() + within
    while not pred():
        if time.monotonic() > deadline:
            raise RuntimeError(f"benchmark: {what} did not happen within {within}s")
        await asyncio.sleep(interval)


# ---- real processes ----
def processes(trials: int, mode: str, lease: float, renew: float, retry: float,
              workdir: Path | None = None, settle: float = 10.0) -> list[float]:
    """Failover times (s) of ``trials`` leader stops by SIGTERM (``release``) or SIGKILL; the
    replicas' logs go to ``workdir`` (kept) or a temporary directory."""
    import signal

    from epp.local.topology import HOST, ManagedProcess, Topology, free_port_block, grpc_serving
    from tests.k8s.fakeapi import pod, pool

    kube = _fake_kube()
    kube.add(pool("pool", {"app": "vllm"}, [8000]))
    kube.add(pod("m-0", "10.0.0.1", {"app": "vllm"}))
    out: list[float] = []
    with tempfile.TemporaryDirectory() as tmp, Topology((workdir or Path(tmp)) / mode) as topo:
        kubeconfig = kube.kubeconfig(Path(tmp) / "kubeconfig")
        health: dict[str, int] = {}
        procs: dict[str, ManagedProcess] = {}
        started = 0

        def start(name: str) -> None:
            nonlocal started
            started += 1
            grpc_port = free_port_block(2)
            health[name] = grpc_port + 1
            procs[name] = topo.start(f"{name}-{started}", [
                sys.executable, "-m", "epp", "serve", "--pool-name", "pool", "--pool-namespace", "default",
                "--grpc-port", str(grpc_port), "--grpc-health-port", str(grpc_port + 1), "--metrics-port", "-1",
                "--bind-address", HOST, "--secure-serving=false", "--log-format", "text",
                "--ha-enable-leader-election", "--leader-election-lease-duration", f"{lease}s",
                "--leader-election-renew-deadline", f"{renew}s", "--leader-election-retry-period", f"{retry}s",
            ], ready=lambda: grpc_serving(HOST, grpc_port + 1, "liveness"), timeout=60,
                env={"KUBECONFIG": kubeconfig, "POD_NAME": name, "KUBERNETES_SERVICE_HOST": ""})

        def ready() -> list[str]:
            return [n for n, p in health.items() if grpc_serving(HOST, p)]

        start("epp-a")
        start("epp-b")
        _wait(lambda: len(ready()) == 1, lease + 30, "a first leader")
        time.sleep(settle)
        for _ in range(trials):
            lead = ready()[0]
            standby = next(n for n in health if n != lead)
            t0 = time.monotonic()
            if mode == "release":
                procs[lead].signal(signal.SIGTERM)
            else:
                procs[lead].signal(signal.SIGKILL)
            _wait(functools.partial(grpc_serving, HOST, health[standby]), lease + 30, "failover")
            out.append(time.monotonic() - t0)
            procs[lead].stop()
            del health[lead]
            start(lead)  # the next standby
            _wait(lambda: len(ready()) == 1, lease + 30, "one ready replica")
            time.sleep(settle)  # a warm standby, as in a running deployment (pacing, not synchronisation)
    kube.stop()
    return out


# ---- in-process electors ----
FAST = {"lease_duration": 1.0, "renew_deadline": 0.6, "retry_period": 0.1}


async def electors(trials: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"release": [], "crash": [], "step_down": []}
    for trial in range(trials):
        kube = _fake_kube()
        try:
            for mode in ("release", "crash"):
                out[mode].append(await _failover(kube, f"{mode}{trial}", release=(mode == "release")))
            out["step_down"].append(await _step_down(kube, f"renew{trial}"))
        finally:
            kube.stop()
    return out


def _elector(kube: Any, identity: str, changed: dict[str, float]) -> Any:
    from epp.discovery.leader import LeaderElector, lease_name

    def note(leader: bool) -> None:
        changed[f"{identity}:{leader}"] = time.monotonic()

    return LeaderElector(namespace="default", name=lease_name("default", "pool"), identity=identity,
                         api_client=kube.api_client(), on_change=note, **FAST)


async def _failover(kube: Any, tag: str, release: bool) -> float:
    """Seconds from the leader's stop() to the standby leading."""
    changed: dict[str, float] = {}
    a, b = _elector(kube, f"a-{tag}", changed), _elector(kube, f"b-{tag}", changed)
    await a.start()
    await _await(lambda: a.is_leader, "a leads")
    await b.start()
    await _await(lambda: b.holder == a.identity, "b sees a's lease")
    t0 = time.monotonic()
    await a.stop(release=release)
    await _await(lambda: b.is_leader, "b takes over")
    await b.stop()
    return changed[f"{b.identity}:True"] - t0


async def _step_down(kube: Any, tag: str) -> float:
    """Renewals fail (503): seconds from the last successful renewal to stepping down."""
    from tests.k8s.fakeapi import COORDINATION_GROUP

    changed: dict[str, float] = {}
    c = _elector(kube, f"c-{tag}", changed)
    await c.start()
    await _await(lambda: c.is_leader, "c leads")
    await asyncio.sleep(0.35)  # a few renewals in (benchmark pacing, not synchronisation)
    kube.fail_next(10_000, 503, path_contains="/leases")
    await _await(lambda: not c.is_leader, "c steps down")
    down_wall = time.time() - (time.monotonic() - changed[f"{c.identity}:False"])
    spec = kube.get("Lease", c.name, group=COORDINATION_GROUP)["spec"]
    kube.clear_failures()
    await c.stop()
    return down_wall - datetime.fromisoformat(spec["renewTime"]).timestamp()


async def discovery_stop(trials: int) -> list[float]:
    out: list[float] = []
    for _ in range(trials):
        kube = _fake_kube()
        try:
            out.append(await _stop_once(kube))
        finally:
            kube.stop()
    return out


async def _stop_once(kube: Any) -> float:
    from epp.datalayer.datastore import Datastore
    from epp.discovery.kubernetes import KubernetesDiscovery
    from tests.k8s.fakeapi import pod, pool

    kube.add(pool("pool", {"app": "vllm"}, [8000]))
    kube.add(pod("m-0", "10.0.0.1", {"app": "vllm"}))
    d = KubernetesDiscovery(pool_name="pool", pool_namespace="default", api_client=kube.api_client(),
                            watch_timeout=300)
    await d.start(Datastore())
    await _await(lambda: kube.open_watches("pods") > 0, "the pod watch")
    t0 = time.monotonic()
    await d.stop()
    return time.monotonic() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--lease-duration", type=float, default=15.0, help="processes: seconds (GIE default 15)")
    ap.add_argument("--renew-deadline", type=float, default=10.0, help="processes: seconds (GIE default 10)")
    ap.add_argument("--retry-period", type=float, default=2.0, help="processes: seconds (GIE default 2)")
    ap.add_argument("--skip-processes", action="store_true", help="only the in-process measurements")
    ap.add_argument("--skip-crash", action="store_true", help="processes: no SIGKILL trials (each ~ a lease)")
    ap.add_argument("--skip-in-process", action="store_true", help="only the epp serve processes")
    ap.add_argument("--workdir", type=Path, help="keep the replicas' logs here")
    ap.add_argument("--settle", type=float, default=10.0,
                    help="processes: seconds a (re)started standby runs before the next trial; a replica's "
                         "first Lease calls are slow while it starts up")
    args = ap.parse_args(argv)
    if args.trials < 1:
        ap.error("--trials must be at least 1")

    rows: list[tuple[str, str, list[float]]] = []
    durations = f"lease {args.lease_duration:g} s, renew {args.renew_deadline:g} s, retry {args.retry_period:g} s"
    if not args.skip_processes:
        for mode in ("release",) if args.skip_crash else ("release", "crash"):
            times = processes(args.trials, mode, args.lease_duration, args.renew_deadline, args.retry_period,
                              args.workdir, args.settle)
            what = "SIGTERM (lease released)" if mode == "release" else "SIGKILL (lease expires)"
            rows.append((f"`epp serve` failover, {what}", durations, times))
    if not args.skip_in_process:
        inproc = asyncio.run(electors(args.trials))
        fast = "lease 1 s, renew 0.6 s, retry 0.1 s"
        rows.append(("elector failover, lease released", fast, inproc["release"]))
        rows.append(("elector failover, leader crashed", fast, inproc["crash"]))
        rows.append(("renewals fail: last renewal → stepped down", fast, inproc["step_down"]))
        rows.append(("`KubernetesDiscovery.stop()`, 300 s watch open", "—",
                     asyncio.run(discovery_stop(args.trials))))

    print("| what | durations | trials | min / median / max s |")
    print("|---|---|---|---|")
    for what, dur, xs in rows:
        print(f"| {what} | {dur} | {len(xs)} | {_summary(xs)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
