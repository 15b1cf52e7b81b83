"""SIGTERM ends ``epp serve`` in every state, including before it ever became ready (issue 11,
item 8): a picker waiting for an InferencePool that does not exist, that RBAC hides (403), or
on an API server that refuses connections must still exit when the kubelet asks it to,
instead of waiting for SIGKILL.

Real ``epp serve`` processes against the fake API server. The wait for the exit is a hang
guard (before the fix the process never exited); how fast it exits is for benchmarks.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from epp.local.topology import HOST, Topology, free_port_block
from tests.k8s.fakeapi import FakeKube, pod, pool

APP = {"app": "vllm"}


def _setup_missing(kube: FakeKube) -> str:
    kube.add(pod("a", "10.0.0.1", APP))  # pods, but no InferencePool named "pool"
    return "not found; not ready until it exists"


def _setup_forbidden(kube: FakeKube) -> str:
    kube.add(pool("pool", APP, [8000]))
    kube.fail_next(100_000, 403, "/inferencepools")  # RBAC does not allow reading the pool
    return "inferencepool list/watch failed (HTTP 403"


def _setup_unreachable(kube: FakeKube) -> str:
    kube.stop()  # the API server is gone: connections are refused
    return "inferencepool list/watch failed"


@pytest.mark.parametrize("setup", [_setup_missing, _setup_forbidden, _setup_unreachable],
                         ids=["pool-missing", "pool-forbidden", "api-unreachable"])
def test_sigterm_while_waiting_for_the_pool_exits(
        fake_k8s: FakeKube, tmp_path: Path, setup: Callable[[FakeKube], str]) -> None:
    kubeconfig = fake_k8s.kubeconfig(tmp_path / "kubeconfig")
    waiting_for = setup(fake_k8s)
    grpc_port = free_port_block(2)
    with Topology(tmp_path / "procs") as topo:
        proc = topo.start(
            "picker",
            [sys.executable, "-m", "epp", "serve", "--pool-name", "pool", "--pool-namespace", "default",
             "--grpc-port", str(grpc_port), "--grpc-health-port", str(grpc_port + 1), "--metrics-port", "-1",
             "--bind-address", HOST, "--secure-serving=false", "--log-format", "text"],
            env={"KUBECONFIG": kubeconfig},
            ready=lambda: waiting_for in proc_log(topo),
            timeout=60,
        )
        proc.signal(signal.SIGTERM)
        try:
            code = proc.popen.wait(30)  # hang guard: before the fix it waited for SIGKILL
        except subprocess.TimeoutExpired:
            pytest.fail(f"epp serve ignored SIGTERM while starting:\n{proc.log_tail()}")
        assert code == 0, proc.log_tail()
        assert "before the picker was ready" in proc.log_path.read_text()


def proc_log(topo: Topology) -> str:
    try:
        return (topo.workdir / "picker.log").read_text(errors="replace")
    except OSError:
        return ""
