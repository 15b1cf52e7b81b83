"""End to end with real processes: simulated pods publishing KV events, `epp serve` pickers
subscribing to them, a real Envoy in front.

* two picker processes fed by the same pods make the same pick for the same request, for
  prefixes that neither of them routed (the pods were warmed directly);
* through Envoy, a prompt whose blocks were evicted on its old pod is no longer sticky there.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator

import aiohttp
import msgpack
import orjson
import pytest
import zmq
import zmq.asyncio

from epp.envoy.bootstrap import EnvoySpec
from epp.local.topology import HOST, Topology, free_port_block
from tests.promtext import value

pytestmark = [pytest.mark.envoy, pytest.mark.slow]

BS = 16


def picker_config(offset: int, replay_offset: int) -> str:
    return f"""\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: precise-prefix-cache-scorer
  parameters:
    kvEventsPortOffsetFromServingPort: {offset}
    kvEventsReplayPortOffsetFromServingPort: {replay_offset}
    tokenizer: builtin   # simulated pods
    speculativeTTL: 2s
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 1
  - pluginRef: precise-prefix-cache-scorer
    weight: 5
"""


class Env:
    def __init__(self, topo: Topology, ports: list[int]) -> None:
        self.topo = topo
        self.ports = ports
        self.replay_ports: list[int] = []
        self.pickers: list[dict[str, int]] = []
        self.envoys: list[int] = []


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    with Topology(tmp_path_factory.mktemp("precise")) as topo:
        base, kv, replay = free_port_block(3), free_port_block(3), free_port_block(3)
        topo.start_sim(3, base, kv_events_base_port=kv, extra=[
            "--kv-events-replay-port", str(replay), "--block-size", str(BS), "--num-gpu-blocks", "96",
            "--time-scale", "0.01"])
        e = Env(topo, [base, base + 1, base + 2])
        e.replay_ports = [replay, replay + 1, replay + 2]
        pool = [(HOST, p) for p in e.ports]
        for i in range(2):
            grpc, health, metrics = (free_port_block(3) + j for j in range(3))
            topo.start_picker(pool, grpc, health, metrics, config_text=picker_config(kv - base, replay - base),
                              extra=("--log-format", "text"), name=f"picker{i}")
            listen = free_port_block(2)
            topo.start_envoy(EnvoySpec(pool=pool, pickers=[(HOST, grpc)], listen=(HOST, listen),
                                       admin=(HOST, listen + 1)), name=f"envoy{i}")
            e.pickers.append({"grpc": grpc, "metrics": metrics})
            e.envoys.append(listen)
        yield e


async def post(port: int, prompt: str) -> tuple[int, int]:
    body = {"model": "sim-model", "prompt": prompt, "max_tokens": 2}
    async with aiohttp.ClientSession() as s, s.post(
            f"http://{HOST}:{port}/v1/completions", data=orjson.dumps(body),
            headers={"content-type": "application/json"}, timeout=aiohttp.ClientTimeout(total=30)) as r:
        await r.read()
        return r.status, int(r.headers.get("x-inference-port", "0"))


async def published_events(env: Env) -> Counter[str]:
    """Events the pods have published so far, by type: the ground truth, read from each pod's
    own replay socket (a DEALER asks from seq 0 and gets every buffered batch, then the end
    marker ``[b"", b"", 0xff*8, b""]``)."""
    counts: Counter[str] = Counter()
    ctx = zmq.asyncio.Context()
    try:
        for port in env.replay_ports:
            sock = ctx.socket(zmq.DEALER)
            sock.connect(f"tcp://{HOST}:{port}")
            try:
                await sock.send_multipart([b"", (0).to_bytes(8, "big")])
                while True:
                    frames = await asyncio.wait_for(sock.recv_multipart(), 10)
                    if frames[2] == b"\xff" * 8:
                        break
                    _, events, _ = msgpack.unpackb(frames[3])
                    counts.update(ev["type"] for ev in events)
            finally:
                sock.close(linger=0)
    finally:
        ctx.term()
    return counts


async def settle(env: Env) -> None:
    """Until every picker has applied exactly the events the pods published (by type). The
    pods publish a request's events before answering it, so after the last answer the target
    is fixed; waiting for it (rather than for the counters to stop moving for a while) also
    shows nothing was lost or applied twice."""
    want = await published_events(env)
    assert want["BlockStored"] > 0, want
    got: list[dict[str, float]] = []
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        got = [{t: value(p["metrics"], "epp_kv_events_total", type=t) for t in want} for p in env.pickers]
        if all(g == want for g in got):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"pickers did not apply the published events {dict(want)}: {got}")


def prompt(tag: str, n: int = 40) -> str:
    return f"Document {tag}: " + " ".join(f"{tag}-word{i}" for i in range(n))


async def test_two_pickers_make_the_same_pick(env: Env) -> None:
    # warm each pod directly (no picker sees this traffic; an approximate index would know nothing)
    prompts = {f"shared-{j}": env.ports[j % 3] for j in range(6)}
    for text, pod in prompts.items():
        status, served = await post(pod, prompt(text))
        assert status == 200 and served == pod
    await settle(env)
    for text, pod in prompts.items():
        picks = [await post(envoy, prompt(text) + " and a new question?") for envoy in env.envoys]
        assert picks == [(200, pod), (200, pod)], (text, picks)


async def test_evicted_prompt_is_no_longer_sticky_on_its_old_pod(env: Env) -> None:
    p = prompt("evict-me", 60)
    status, old = await post(env.envoys[0], p)
    assert status == 200
    status, again = await post(env.envoys[1], p)
    assert (status, again) == (200, old)  # sticky, through the other picker too
    other = next(x for x in env.ports if x != old)
    assert (await post(other, p)) == (200, other)  # the prompt is now cached on another pod too
    removed_before = value(env.pickers[0]["metrics"], "epp_kv_events_total", type="BlockRemoved")
    for i in range(8):  # 96 blocks of 16 tokens: these evict the prompt on its old pod
        assert (await post(old, prompt(f"filler{i}", 120)))[0] == 200
    await settle(env)
    assert value(env.pickers[0]["metrics"], "epp_kv_events_total", type="BlockRemoved") > removed_before
    for envoy in env.envoys:
        assert await post(envoy, p) == (200, other)
