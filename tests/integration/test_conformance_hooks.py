"""GIE conformance hooks (``--enable-conformance-hooks``) through a real Envoy 1.40.

What a gateway's GIE conformance suite relies on: the ``test-epp-endpoint-selection`` request
header decides where the request goes (in order: the first entry is the primary, the rest the
fallbacks), and the ``x-conformance-test-served-endpoint`` response header says which endpoint
served it, as the gateway reported it. Without the flag the header changes nothing.
"""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest

from epp.local.topology import HOST, free_port_block

from .conftest import Cluster
from .test_envoy_picker import chat, post

pytestmark = [pytest.mark.envoy]

SELECT = "test-epp-endpoint-selection"
SERVED = "x-conformance-test-served-endpoint"


@pytest.fixture(scope="module")
def dead_port() -> int:
    """A pool member nobody listens on (a pod that died after the picker saw it)."""
    return free_port_block(1)


@pytest.fixture(scope="module")
def hooks_route(cluster: Cluster, dead_port: int) -> int:
    pool = [*cluster.pool, (HOST, dead_port)]
    picker = cluster.picker(pool, extra=("--enable-conformance-hooks",))
    return cluster.envoy(picker, pool=pool)


async def test_the_header_chooses_the_endpoint_and_the_served_one_is_reported(
        cluster: Cluster, hooks_route: int) -> None:
    for port in cluster.pod_ports:
        results = await asyncio.gather(*(
            post(hooks_route, chat(f"conformance {port} {i} " * 20), {SELECT: f"{HOST}:{port}"}) for i in range(6)))
        for status, headers, body in results:
            assert status == 200, body
            assert int(headers["x-inference-port"]) == port
            assert headers[SERVED] == f"{HOST}:{port}"


async def test_the_list_is_primary_then_fallbacks(cluster: Cluster, hooks_route: int, dead_port: int) -> None:
    """The dead endpoint first: Envoy retries on the next entry of the picker's list, and the
    served header reports the endpoint that really served (the gateway's report), not the pick."""
    second = cluster.pod_ports[1]
    for i in range(4):
        status, headers, body = await post(
            hooks_route, chat(f"fallback {i}"), {SELECT: f"{HOST}:{dead_port},{HOST}:{second}"})
        assert status == 200, body
        assert int(headers["x-inference-port"]) == second
        assert headers[SERVED] == f"{HOST}:{second}"


async def test_a_bare_ip_allows_every_port_of_that_pod(cluster: Cluster, hooks_route: int) -> None:
    status, headers, _ = await post(hooks_route, chat("bare ip"), {SELECT: HOST})
    assert status == 200
    # every pool member has this address; the first listed one that is up served
    assert int(headers["x-inference-port"]) in cluster.pod_ports
    assert headers[SERVED] == f"{HOST}:{headers['x-inference-port']}"


async def test_streaming_and_body_less_requests_follow_the_header(cluster: Cluster, hooks_route: int) -> None:
    third = cluster.pod_ports[2]
    status, headers, body = await post(hooks_route, chat("stream", stream=True), {SELECT: f"{HOST}:{third}"})
    assert status == 200 and b"data: [DONE]" in body
    assert int(headers["x-inference-port"]) == third and headers[SERVED] == f"{HOST}:{third}"
    async with aiohttp.ClientSession() as s, s.get(f"http://{HOST}:{hooks_route}/v1/models",
                                                   headers={SELECT: f"{HOST}:{third}"}) as r:
        assert r.status == 200
        assert int(r.headers["x-inference-port"]) == third
        assert r.headers[SERVED] == f"{HOST}:{third}"


async def test_no_endpoint_of_the_pool_in_the_header_is_503(hooks_route: int) -> None:
    status, headers, body = await post(hooks_route, chat("nowhere"), {SELECT: "10.255.255.1:8000"})
    assert status == 503
    assert SELECT in orjson.loads(body)["error"]["message"]
    assert SERVED not in headers


async def test_without_the_flag_the_header_changes_nothing(cluster: Cluster) -> None:
    port = cluster.envoy(cluster.picker())
    first = cluster.pod_ports[0]
    results = await asyncio.gather(*(
        post(port, chat(f"unrelated {i} " * 60, system=f"persona {i} " * 30), {SELECT: f"{HOST}:{first}"})
        for i in range(12)))
    assert all(status == 200 for status, _, _ in results)
    assert all(SERVED not in headers for _, headers, _ in results)
    assert len({h["x-inference-port"] for _, h, _ in results}) >= 2  # scheduled, not forced onto one pod
