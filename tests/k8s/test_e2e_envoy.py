"""Kubernetes semantics end to end: client → real Envoy 1.40 → ``epp serve --pool-name`` (a real
process reading the fake API server through a generated KUBECONFIG) → simulated vLLM pods.

The topology (one per module):

* three simulated vLLM pods (one ``epp sim`` process, ports p0..p2 on 127.0.0.1) and one
  in-test "busy" pod (port pB) whose /metrics reports a long waiting queue and a full KV cache;
* in the fake API server: InferencePool ``pool`` (selector app=vllm, targetPorts
  [p0, p1, p2, pB]) and one Pod object per port, all with IP 127.0.0.1 and the annotation
  ``inference.networking.k8s.io/active-ports: "<its port>"`` so each pod is exactly one
  endpoint (loopback has one IP, so the port is what tells the pods apart);
* one picker, and Envoy in ``override-host`` mode whose static pool lists all four ports
  (Envoy only allows hosts it knows; *which* of them serve is the picker's Kubernetes view).

Every test starts from the same API state (``reset``): the three sim pods Ready, no busy pod,
no objectives/rewrites/models. Which pod served a request is the sim's ``x-inference-port``
response header.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from epp.envoy.bootstrap import EnvoySpec
from epp.local.topology import HOST, Topology, free_port_block, grpc_serving
from tests.k8s.conftest import eventually
from tests.k8s.fakeapi import FakeKube, inference_model, objective, pod, pool, rewrite
from tests.promtext import value

pytestmark = [pytest.mark.envoy]

MODEL = "sim-model"
APP = {"app": "vllm"}
ACTIVE_PORTS = "inference.networking.k8s.io/active-ports"
OBJECTIVE_HEADER = "x-gateway-inference-objective"

# A pod that is up but overloaded: 50 waiting requests (the utilization detector's default
# queue threshold is 5) and 99 % KV cache. Pool saturation is the mean over the candidates,
# so this one pod pushes a pool of itself + three idle sims to (10 + 0 + 0 + 0) / 4 ≥ 1.
BUSY_METRICS = b"""# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="sim-model"} 16.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="sim-model"} 50.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="sim-model"} 0.99
"""


class BusyPod:
    """Serves saturated vLLM metrics, and answers completions (slowly is not needed: the
    scorers never prefer it, but if picked it must still produce a valid response)."""

    def __init__(self) -> None:
        self.port = port = free_port_block(1)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _send(self, body: bytes, ctype: str) -> None:
                self.send_response(200)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(body)))
                self.send_header("x-inference-port", str(port))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                self._send(BUSY_METRICS, "text/plain")

            def do_POST(self) -> None:
                req = orjson.loads(self.rfile.read(int(self.headers.get("content-length") or 0)) or b"{}")
                self._send(orjson.dumps({
                    "id": "busy", "object": "chat.completion", "model": req.get("model"),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "busy"},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}),
                    "application/json")

            def log_message(self, *args: object) -> None:
                return

        self.server = ThreadingHTTPServer((HOST, port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class K8sCluster:
    kube: FakeKube
    sim_ports: list[int]
    busy_port: int
    listen: int
    picker_metrics_port: int
    picker_health_port: int

    def pod_obj(self, i: int, name: str | None = None, ready: bool = True) -> dict[str, Any]:
        port = self.sim_ports[i]
        return pod(name or f"vllm-{i}", HOST, APP, ready=ready, annotations={ACTIVE_PORTS: str(port)})

    def reset(self) -> None:
        """Three Ready sim pods; nothing else that the picker reads (besides the pool).
        Pods already in the wanted state are rewritten in place, not deleted and re-added,
        so the picker never sees an empty pool in between."""
        kube = self.kube
        wanted = {f"vllm-{i}": self.pod_obj(i) for i in range(len(self.sim_ports))}
        for kind, plural in (("Pod", "pods"), ("InferenceObjective", "inferenceobjectives"),
                             ("InferenceModelRewrite", "inferencemodelrewrites"),
                             ("InferenceModel", "inferencemodels")):
            for o in kube._list(kube_key(plural), "default", {}, {})["items"]:
                name = o["metadata"]["name"]
                if kind == "Pod" and name in wanted:
                    kube.replace(wanted.pop(name))
                else:
                    kube.delete(kind, name)
        for obj in wanted.values():
            kube.add(obj)


def kube_key(plural: str) -> tuple[str, str]:
    return ("", plural) if plural == "pods" else ("inference.networking.x-k8s.io", plural)


@pytest.fixture(scope="module")
def k8s(tmp_path_factory: pytest.TempPathFactory) -> Iterator[K8sCluster]:
    workdir: Path = tmp_path_factory.mktemp("k8s-e2e")
    kube = FakeKube(bookmark_interval=0.5).start()
    busy = BusyPod()
    try:
        with Topology(workdir) as topo:
            base = free_port_block(3)
            topo.start_sim(3, base, kv_events_base_port=-1)
            sim_ports = [base, base + 1, base + 2]
            kube.add(pool("pool", APP, [*sim_ports, busy.port]))
            cluster = K8sCluster(kube, sim_ports, busy.port, 0, 0, 0)
            cluster.reset()
            grpc, health, metrics = (free_port_block(3) + i for i in range(3))
            kubeconfig = kube.kubeconfig(workdir / "kubeconfig")
            topo.start("picker", [
                sys.executable, "-m", "epp", "serve",
                "--pool-name", "pool", "--pool-namespace", "default",
                "--grpc-port", str(grpc), "--grpc-health-port", str(health), "--metrics-port", str(metrics),
                "--bind-address", HOST, "--log-format", "text",
                "--metrics-endpoint-auth=false",  # the test scrapes without a token (auth: test_metrics_auth)
            ], ready=lambda: grpc_serving(HOST, health), timeout=30,
                env={"KUBECONFIG": kubeconfig, "KUBERNETES_SERVICE_HOST": ""})
            listen = free_port_block(2)
            topo.start_envoy(EnvoySpec(
                pool=[(HOST, p) for p in [*sim_ports, busy.port]], pickers=[(HOST, grpc)],
                listen=(HOST, listen), admin=(HOST, listen + 1), routing="override-host", access_log=True))
            cluster.listen, cluster.picker_metrics_port, cluster.picker_health_port = listen, metrics, health
            yield cluster
    finally:
        busy.stop()
        kube.stop()


@pytest.fixture
async def cluster(k8s: K8sCluster) -> AsyncIterator[K8sCluster]:
    k8s.reset()
    await until_served_by(k8s, set(k8s.sim_ports), "reset")
    yield k8s


# ---- helpers ----
async def post(port: int, body: dict[str, Any], headers: dict[str, str] | None = None
               ) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as s, s.post(
        f"http://{HOST}:{port}/v1/chat/completions", data=orjson.dumps(body),
        headers={"content-type": "application/json", **(headers or {})},
        timeout=aiohttp.ClientTimeout(total=20),
    ) as r:
        return r.status, {k.lower(): v for k, v in r.headers.items()}, await r.read()


def chat(text: str, model: str = MODEL) -> dict[str, Any]:
    return {"model": model, "max_tokens": 2, "messages": [{"role": "user", "content": text}]}


async def served_ports(c: K8sCluster, n: int = 12, tag: str = "") -> set[int]:
    """Ports that served ``n`` concurrent requests with distinct prompts (all must succeed)."""
    results = await asyncio.gather(*(post(c.listen, chat(f"{tag} question {i} " * 8)) for i in range(n)))
    assert all(s == 200 for s, _, _ in results), [(s, b[:200]) for s, _, b in results]
    return {int(h["x-inference-port"]) for _, h, _ in results}


async def until_served_by(c: K8sCluster, expected: set[int], what: str, limit: float = 10.0) -> None:
    """Wait until a batch of requests lands only on ``expected``, then check a second batch."""
    last: set[int] = set()

    async def check() -> bool:
        nonlocal last
        last = await served_ports(c, 8, what)
        return last <= expected

    deadline = asyncio.get_running_loop().time() + limit
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, f"{what}: still served by {last}, want {expected}"
        await asyncio.sleep(0.1)
    assert await served_ports(c, 12, what + " again") <= expected


# ---- (a) InferenceModelRewrite ----
async def test_model_rewrite_follows_the_api_objects(cluster: K8sCluster) -> None:
    """The sims serve only ``sim-model``: a request for ``alias`` reaches a pod as ``alias``
    (404 from the pod) until an InferenceModelRewrite maps it; then the pod serves
    ``sim-model`` while the client still sees ``alias``; deleting the rewrite undoes it."""
    c = cluster
    status, _, body = await post(c.listen, chat("hello", model="alias"))
    assert status == 404 and b"alias" in body  # the pod saw the client's model name

    c.kube.add(rewrite("alias-to-sim", "pool", [(["alias"], [(MODEL, 100)])]))
    before = value(c.picker_metrics_port, "inference_extension_model_rewrite_decisions_total",
                        model_rewrite_name="alias-to-sim", model_name="alias", target_model=MODEL)

    async def rewritten() -> bool:
        s, _, _ = await post(c.listen, chat("hello", model="alias"))
        return s == 200

    await eventually(rewritten, timeout=15, what="the picker to follow the new InferenceModelRewrite")
    results = await asyncio.gather(*(post(c.listen, chat(f"rewritten {i}", model="alias")) for i in range(5)))
    assert all(s == 200 for s, _, _ in results)
    assert all(orjson.loads(b)["model"] == "alias" for _, _, b in results)  # client's name restored
    after = value(c.picker_metrics_port, "inference_extension_model_rewrite_decisions_total",
                       model_rewrite_name="alias-to-sim", model_name="alias", target_model=MODEL)
    assert after - before >= 6

    c.kube.delete("InferenceModelRewrite", "alias-to-sim")

    async def not_rewritten() -> bool:
        s, _, _ = await post(c.listen, chat("bye", model="alias"))
        return s == 404

    await eventually(not_rewritten, timeout=15, what="the deleted rewrite to stop applying (404 again)")


# ---- (b) InferenceObjective / legacy InferenceModel priority + saturation ----
async def test_sheddable_objective_gets_429_only_while_the_pool_is_saturated(cluster: K8sCluster) -> None:
    c = cluster
    c.kube.add(objective("batch", "pool", -1))
    c.kube.add(objective("interactive", "pool", 5))
    c.kube.add(inference_model("legacy-batch", "pool", "batch-model", "Sheddable", [(MODEL, 100)]))
    # not saturated (three idle sims): sheddable work is admitted
    status, _, _ = await post(c.listen, chat("early batch"), {OBJECTIVE_HEADER: "batch"})
    assert status == 200

    c.kube.add(pod("busy", HOST, APP, annotations={ACTIVE_PORTS: str(c.busy_port)}))
    shed: tuple[int, dict[str, str], bytes] = (0, {}, b"")

    async def is_shed() -> bool:  # once the picker has seen the pod and scraped its metrics
        nonlocal shed
        shed = await post(c.listen, chat("batch job"), {OBJECTIVE_HEADER: "batch"})
        return shed[0] == 429

    await eventually(is_shed, timeout=15, what=lambda: f"sheddable work shed by a saturated pool; last {shed}")
    status, headers, body = shed
    assert status == 429 and headers["content-type"] == "application/json", body
    assert orjson.loads(body)["error"]["code"] == 429

    for i in range(4):  # priority >= 0 and no objective at all: admitted and served by a sim
        for hdr in ({OBJECTIVE_HEADER: "interactive"}, {}):
            status, headers, _ = await post(c.listen, chat(f"user {i}"), hdr)
            assert status == 200
            assert int(headers["x-inference-port"]) in c.sim_ports
    # legacy InferenceModel: criticality Sheddable for model "batch-model" (no header needed),
    # and its targetModels rewrite it to the served model once admitted
    status, _, _ = await post(c.listen, chat("legacy batch", model="batch-model"))
    assert status == 429
    status, _, _ = await post(c.listen, chat("early batch"), {OBJECTIVE_HEADER: "unknown-objective"})
    assert status == 200  # an unknown objective is priority 0

    c.kube.delete("Pod", "busy")  # pool no longer saturated: sheddable work flows again

    async def admitted() -> bool:
        s, _, _ = await post(c.listen, chat("late batch"), {OBJECTIVE_HEADER: "batch"})
        return s == 200

    await eventually(admitted, timeout=15, what="sheddable work admitted once the busy pod is gone")
    status, _, body = await post(c.listen, chat("legacy batch", model="batch-model"))
    assert status == 200 and orjson.loads(body)["model"] == "batch-model"


# ---- (c) pod lifecycle ----
async def test_pod_readiness_and_deletion_steer_traffic(cluster: K8sCluster) -> None:
    c = cluster
    p0, p1, p2 = c.sim_ports
    assert len(await served_ports(c, 16, "all")) >= 2  # distinct prompts spread over the pods

    c.kube.set_pod_ready("vllm-1", False)
    c.kube.mark_deleting("vllm-2")  # terminating: out at once, before the object is gone
    await until_served_by(c, {p0}, "vllm-1 NotReady, vllm-2 terminating")

    c.kube.delete("Pod", "vllm-2")
    c.kube.add(c.pod_obj(2, name="vllm-2-new"))  # its replacement (same port), Ready
    c.kube.set_pod_ready("vllm-0", False)
    await until_served_by(c, {p2}, "new pod vllm-2-new only")

    c.kube.set_pod_ready("vllm-1")
    await until_served_by(c, {p1, p2}, "vllm-1 Ready again")
    ports: set[int] = set()
    for i in range(5):  # and it does get traffic again
        ports |= await served_ports(c, 12, f"spread {i}")
        if p1 in ports:
            break
    assert p1 in ports


# ---- (d) API server restart ----
async def test_api_server_restart_keeps_endpoints_and_watches_resume(cluster: K8sCluster) -> None:
    c = cluster
    stop = asyncio.Event()
    statuses: list[int] = []

    async def traffic() -> None:
        i = 0
        while not stop.is_set():
            s, _, _ = await post(c.listen, chat(f"during restart {i}"))
            statuses.append(s)
            i += 1

    await until_served_by(c, set(c.sim_ports), "before restart")
    tasks = [asyncio.create_task(traffic()) for _ in range(3)]
    try:
        await eventually(lambda: len(statuses) >= 3, what="traffic flowing before the restart")
        ready_while_down: list[bool] = []
        answered_at_down: list[int] = []

        def while_down() -> None:
            answered_at_down.append(len(statuses))
            ready_while_down.append(grpc_serving(HOST, c.picker_health_port))

        await asyncio.to_thread(c.kube.restart, 2.0, False, while_down)  # the outage under test
        answered_during = len(statuses) - answered_at_down[0]
        back = time.monotonic()  # the fake API server's request log uses the same clock
        # keep the traffic going until the picker has re-opened its pod watch on the restarted
        # server (the moment its view of the pool is rebuilt) and a few requests came after that
        await eventually(lambda: any("watch=" in r for _, r in c.kube.requests_since(back, "/pods?")),
                         timeout=15, what="the picker to resume watching pods")
        answered = len(statuses)
        await eventually(lambda: len(statuses) >= answered + 3, what="traffic after the watch resumed")
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    assert statuses and set(statuses) == {200}, statuses
    assert answered_during > 0  # requests were served while the API server was down
    assert ready_while_down == [True]  # the picker stays ready on its last known state
    # the watches resumed: a change made after the restart is followed
    c.kube.set_pod_ready("vllm-0", False)
    await until_served_by(c, set(c.sim_ports[1:]), "vllm-0 NotReady after restart", limit=15)
    await eventually(lambda: grpc_serving(HOST, c.picker_health_port), what="picker ready")
