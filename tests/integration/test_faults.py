"""Faults and rollouts through a real Envoy 1.40 (issue 11, items 7 and 9).

* A rolling restart of the picker under streaming load: two ``epp serve`` processes behind one
  Envoy, each restarted in turn with SIGTERM. Every request must get a 200 and a complete SSE
  stream: the draining picker keeps answering while Envoy's health check moves new streams to
  the other one, and no stream (all far shorter than ``--shutdown-grace``) is cut.
* A pod SIGKILLed under load with the default configuration: the picker keeps choosing it
  until its metrics go stale, and every request it chose must still succeed through Envoy's
  retry to another pod.

How many requests are lost, with how much load, is measured in ``benchmarks/faults.py``; here
the assertions are only what a client sees.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
import pytest

from epp.envoy.bootstrap import EnvoySpec
from epp.local.topology import HOST, ManagedProcess, Topology, free_port_block, grpc_serving, http_ok
from tests.promtext import value
from tests.waiting import eventually, wait_until

pytestmark = [pytest.mark.envoy]

MODEL = "sim-model"


@dataclass(slots=True)
class Outcome:
    status: int = 0
    done: bool = False  # the SSE stream ended with [DONE]
    error: str = ""


@dataclass
class Load:
    """Closed-loop streaming clients; every request's outcome is kept."""

    port: int
    outcomes: list[Outcome] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def one(self, s: aiohttp.ClientSession, i: int, max_tokens: int) -> Outcome:
        body = {"model": MODEL, "max_tokens": max_tokens, "stream": True,
                "messages": [{"role": "user", "content": f"tell me a long story number {i}"}]}
        out = Outcome()
        try:
            async with s.post(f"http://{HOST}:{self.port}/v1/chat/completions", data=orjson.dumps(body),
                              headers={"content-type": "application/json"},
                              timeout=aiohttp.ClientTimeout(total=60)) as r:
                out.status = r.status
                data = await r.read()
                out.done = b"data: [DONE]" in data
        except (aiohttp.ClientError, TimeoutError) as exc:
            out.error = f"{type(exc).__name__}: {exc}"
        return out

    async def client(self, s: aiohttp.ClientSession, c: int, max_tokens: int) -> None:
        i = 0
        while not self.stop.is_set():
            self.outcomes.append(await self.one(s, c * 100_000 + i, max_tokens))
            i += 1

    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if not (o.status == 200 and o.done and not o.error)]


@dataclass
class Picker:
    topo: Topology
    name: str
    pool: list[tuple[str, int]]
    ports: tuple[int, int, int]
    extra: tuple[str, ...]
    proc: ManagedProcess | None = None

    def start(self) -> None:
        grpc, health, metrics = self.ports
        self.proc = self.topo.start_picker(self.pool, grpc, health, metrics, secure=False,
                                           extra=self.extra, name=self.name, timeout=60)

    def log(self) -> list[dict[str, object]]:
        assert self.proc is not None
        out = []
        for line in self.proc.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out


@pytest.fixture
def topo(tmp_path: Path) -> Iterator[Topology]:
    with Topology(tmp_path / "procs") as t:
        yield t


def _envoy(topo: Topology, pool: list[tuple[str, int]], pickers: list[tuple[str, int]]) -> tuple[int, int]:
    listen = free_port_block(2)
    spec = EnvoySpec(pool=pool, pickers=pickers, listen=(HOST, listen), admin=(HOST, listen + 1),
                     picker_tls=False, access_log=True)
    topo.start_envoy(spec)
    return listen, listen + 1


def _restart(picker: Picker, topo: Topology) -> dict[str, object]:
    """SIGTERM the picker while it carries streams, wait for its exit, start it again on the
    same ports (a rolling restart). Returns its 'draining' log record."""
    assert picker.proc is not None
    metrics = picker.ports[2]
    wait_until(lambda: value(metrics, "epp_pool_demand_requests", state="inflight") >= 2, timeout=30,
               what=f"{picker.name} carrying streams")
    picker.proc.signal(signal.SIGTERM)
    picker.proc.popen.wait(90)  # hang guard: the drain ends once Envoy moved away and streams ended
    assert picker.proc.popen.returncode == 0, picker.proc.log_tail()
    draining = next(r for r in picker.log() if str(r.get("msg", "")).startswith("draining"))
    ended = next(r for r in picker.log() if str(r.get("msg", "")).startswith("drain ended"))
    assert ended["reason"] == "idle", ended  # not cut by the grace
    topo.processes.remove(picker.proc)
    picker.start()
    return draining


async def test_rolling_restart_of_the_picker_under_streaming_load_loses_nothing(topo: Topology) -> None:
    base = free_port_block(3)
    topo.start_sim(3, base, kv_events_base_port=-1)
    pool = [(HOST, base + i) for i in range(3)]
    pickers = [Picker(topo, f"picker{i}", pool, (p, p + 1, p + 2), ("--shutdown-grace", "60s"))
               for i, p in enumerate(free_port_block(3) for _ in range(2))]
    for p in pickers:
        p.start()
    port, _ = _envoy(topo, pool, [(HOST, p.ports[0]) for p in pickers])

    load = Load(port)
    async with aiohttp.ClientSession() as s:
        clients = [asyncio.create_task(load.client(s, c, max_tokens=120)) for c in range(8)]
        try:
            await eventually(lambda: len(load.outcomes) >= 8, timeout=60, what="load running")
            for p in pickers:  # one at a time, as a Deployment's rolling update does
                draining = await asyncio.to_thread(_restart, p, topo)
                assert int(draining["open_streams"]) >= 1  # it really was carrying streams
                n = len(load.outcomes)
                await eventually(lambda n=n: len(load.outcomes) >= n + 8, timeout=60, what="load after restart")
        finally:
            load.stop.set()
            await asyncio.gather(*clients)
    assert load.outcomes and not load.failures(), (len(load.outcomes), load.failures()[:5])


async def test_requests_picked_for_a_killed_pod_are_retried_on_another(topo: Topology) -> None:
    base = free_port_block(3)
    sims = [topo.start_sim(1, base + i, kv_events_base_port=-1, name=f"sim{i}") for i in range(3)]
    pool = [(HOST, base + i) for i in range(3)]
    g = free_port_block(3)
    topo.start_picker(pool, g, g + 1, g + 2, secure=False, name="picker", timeout=60)  # default config
    port, admin = _envoy(topo, pool, [(HOST, g)])
    system = "You answer questions about the municipal tax code. " * 40  # a long shared prefix

    async def ask(s: aiohttp.ClientSession, i: int) -> tuple[int, str]:
        body = {"model": MODEL, "max_tokens": 4,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": f"rule {i}?"}]}
        async with s.post(f"http://{HOST}:{port}/v1/chat/completions", data=orjson.dumps(body),
                          headers={"content-type": "application/json"},
                          timeout=aiohttp.ClientTimeout(total=30)) as r:
            await r.read()
            return r.status, r.headers.get("x-inference-port", "")

    async with aiohttp.ClientSession() as s:
        served = {await ask(s, i) for i in range(4)}
        assert len(served) == 1 and next(iter(served))[0] == 200, served  # the prefix sticks to one pod
        victim = int(next(iter(served))[1]) - base
        sims[victim].signal(signal.SIGKILL)
        sims[victim].popen.wait(10)
        # The picker still prefers the dead pod (its prefix, its last metrics) until the
        # metrics go stale: every such request must be rescued by a retry elsewhere.
        results = []
        t_end = time.monotonic() + 4.0
        while time.monotonic() < t_end:
            results.append(await ask(s, len(results)))
        async with s.get(f"http://{HOST}:{admin}/stats?filter=cluster.pool.upstream_rq_retry_success") as r:
            retried = int((await r.text()).split(":")[1])
    assert all(status == 200 for status, _ in results), results
    assert all(int(p) != base + victim for _, p in results)
    assert retried >= 1  # the dead pod was picked, and the retry went elsewhere
    assert http_ok(f"http://{HOST}:{base + (victim + 1) % 3}/health")
    assert grpc_serving(HOST, g + 1)
