"""Verified tenants through a real Envoy 1.40: jwt_authn in front of the picker.

Tokens are RS256, signed in the test (``jwt_tokens.Issuer``); Envoy verifies them against the
JWKS the generated config carries. What the picker decided shows in its per-tenant usage series
and in flow control's fairness ids; what reached the model server is recorded by the pod.
"""

from __future__ import annotations

import csv
import io
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import aiohttp
import orjson
import pytest

from epp.envoy.jwt import JwtSpec
from epp.local.topology import HOST, Topology
from epp.usage.series import QUEUE_SECONDS, REQUESTS, TOKENS
from tests.promtext import scrape, value
from tests.waiting import wait_until

from .conftest import IDLE_VLLM_PAGE, Cluster
from .jwt_tokens import Issuer

pytestmark = [pytest.mark.envoy]

FAIRNESS = "x-gateway-inference-fairness-id"
#: every response of the recording pod: 10 prompt tokens of which 4 cached, 3 completion
USAGE = {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13,
         "prompt_tokens_details": {"cached_tokens": 4}}
FAIR_SHARE_CONFIG = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: queue-scorer
- type: utilization-detector
- name: fair
  type: token-fair-share-policy
  parameters:
    tiers:
    - {name: gold, weight: 3, fairnessIds: ["gold/*"]}
    - {name: basic, weight: 1, fairnessIds: ["basic/*"]}
schedulingProfiles:
- name: default
  plugins: [{pluginRef: queue-scorer}]
saturationDetector: {pluginRef: utilization-detector}
flowControl:
  defaultPriorityBand: {fairnessPolicyRef: fair}
"""


class RecordingPod:
    """An OpenAI-shaped model server that remembers the headers each request arrived with."""

    def __init__(self) -> None:
        self.requests: list[dict[str, str]] = []
        pod = self
        page = IDLE_VLLM_PAGE.encode()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _send(self, body: bytes, ctype: str) -> None:
                self.send_response(200)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                self._send(page, "text/plain")

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("content-length", "0")))
                pod.requests.append({k.lower(): v for k, v in self.headers.items()})
                model = orjson.loads(raw).get("model", "m") if raw else "m"
                self._send(orjson.dumps({"id": "r", "object": "chat.completion", "model": model,
                                         "choices": [{"index": 0, "finish_reason": "stop",
                                                      "message": {"role": "assistant", "content": "ok"}}],
                                         "usage": USAGE}), "application/json")

            def log_message(self, *args: object) -> None:
                return None

        self.server = ThreadingHTTPServer((HOST, 0), Handler)  # the OS picks a free port
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Gateway:
    """Envoy (jwt_authn + ext_proc) → picker → the recording pod."""

    def __init__(self, cluster: Cluster, issuer: Issuer, picker_flags: tuple[str, ...],
                 claim_headers: dict[str, str] | None = None) -> None:
        self.picker = cluster.picker(config=FAIR_SHARE_CONFIG, extra=picker_flags)
        jwks = cluster.topo.workdir / f"jwks-{self.picker['grpc']}.json"
        jwks.write_text(issuer.jwks())
        if claim_headers:  # this one carries the JWKS inline
            spec = JwtSpec(issuer=issuer.issuer, audiences=[issuer.audience], jwks_inline=issuer.jwks(),
                           claim_headers=claim_headers)
        else:
            spec = JwtSpec(issuer=issuer.issuer, audiences=[issuer.audience], jwks_file=str(jwks))
        self.port = cluster.envoy(self.picker, jwt=spec)
        self.metrics = self.picker["metrics"]

    def served(self, tenant: str, tier: str) -> float:
        return value(self.metrics, REQUESTS, tenant=tenant, tier=tier, outcome="served")


@pytest.fixture(scope="module")
def pod() -> Iterator[RecordingPod]:
    p = RecordingPod()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, pod: RecordingPod) -> Iterator[tuple[Gateway, Gateway, Issuer]]:
    issuer = Issuer()
    with Topology(tmp_path_factory.mktemp("tenants")) as topo:
        cluster = Cluster(topo, [pod.port])
        claims = Gateway(cluster, issuer, ("--tenant-claim", "tenant", "--tier-claim", "tier"))
        headers = Gateway(cluster, issuer, ("--tenant-header", "x-epp-tenant", "--tier-header", "x-epp-tier"),
                          claim_headers={"tenant": "x-epp-tenant", "tier": "x-epp-tier"})
        yield claims, headers, issuer


async def post(port: int, token: str | None, headers: dict[str, str] | None = None,
               text: str = "hello") -> tuple[int, bytes]:
    h = {"content-type": "application/json", **(headers or {})}
    if token is not None:
        h["authorization"] = f"Bearer {token}"
    body = {"model": "m", "max_tokens": 3, "messages": [{"role": "user", "content": text}]}
    async with aiohttp.ClientSession() as s, s.post(
        f"http://{HOST}:{port}/v1/chat/completions", data=orjson.dumps(body), headers=h,
        timeout=aiohttp.ClientTimeout(total=30),
    ) as r:
        return r.status, await r.read()


def _tenants(port: int) -> set[str]:
    return {lbl["tenant"] for name in (REQUESTS, TOKENS, QUEUE_SECONDS) for lbl, _ in scrape(port).get(name, [])}


def _fairness_ids(port: int) -> set[str]:
    return {lbl["fairness_id"] for lbl, _ in scrape(port).get("epp_flow_control_tokens_served_total", [])}


async def test_a_forged_fairness_header_is_ignored_for_the_jwt_tenant(
        gw: tuple[Gateway, Gateway, Issuer], pod: RecordingPod) -> None:
    g, _, issuer = gw
    before = g.served("acme", "gold")
    status, body = await post(g.port, issuer.token(tenant="acme", tier="gold", sub="alice"),
                              {FAIRNESS: "victim"})
    assert status == 200, body
    wait_until(lambda: g.served("acme", "gold") == before + 1, what="acme's served request in the usage series")
    assert "victim" not in _tenants(g.metrics)
    # flow control charged <tier>/<tenant>, the id the gold tier's pattern gold/* matches
    wait_until(lambda: "gold/acme" in _fairness_ids(g.metrics), what="flow control's fairness id gold/acme")
    assert not any("victim" in f for f in _fairness_ids(g.metrics))
    # the pod never saw the forged header (stripped by the picker) nor the token (jwt_authn)
    seen = pod.requests[-1]
    assert FAIRNESS not in seen and "authorization" not in seen


async def test_usage_series_carry_the_response_tokens_by_type(gw: tuple[Gateway, Gateway, Issuer]) -> None:
    g, _, issuer = gw
    token = issuer.token(tenant="tokens-co", tier="basic")
    for i in range(3):
        status, _ = await post(g.port, token, text=f"question {i}")
        assert status == 200
    wait_until(lambda: g.served("tokens-co", "basic") == 3, what="three served requests")
    tokens = {t: value(g.metrics, TOKENS, tenant="tokens-co", tier="basic", type=t)
              for t in ("prompt", "cached", "completion")}
    assert tokens == {"prompt": 3 * 6, "cached": 3 * 4, "completion": 3 * 3}
    assert value(g.metrics, REQUESTS, tenant="tokens-co", outcome="rejected") == 0


async def test_the_tier_claim_decides_the_tier(gw: tuple[Gateway, Gateway, Issuer]) -> None:
    g, _, issuer = gw
    # a client asking for gold through the fairness header, with a basic-tier token
    status, _ = await post(g.port, issuer.token(tenant="bob-co", tier="basic"), {FAIRNESS: "gold/bob-co"})
    assert status == 200
    # a token without a tier claim: the tier of the fair-share config (none matches: default)
    status, _ = await post(g.port, issuer.token(tenant="carol-co"), {FAIRNESS: "gold/carol-co"})
    assert status == 200
    wait_until(lambda: g.served("bob-co", "basic") == 1 and g.served("carol-co", "default") == 1,
               what="bob-co in basic, carol-co in default")
    assert value(g.metrics, REQUESTS, tenant="bob-co", tier="gold") == 0
    wait_until(lambda: {"basic/bob-co", "carol-co"} <= _fairness_ids(g.metrics), what="fairness ids")
    assert not {"gold/bob-co", "gold/carol-co"} & _fairness_ids(g.metrics)


@pytest.mark.parametrize(("case", "expected"), [
    ("missing", 401), ("expired", 401), ("other-key", 401), ("garbage", 401),
    ("wrong-audience", 403),  # Envoy: a verified token, not meant for this gateway
])
async def test_a_request_without_a_valid_token_gets_envoys_401(
        gw: tuple[Gateway, Gateway, Issuer], pod: RecordingPod, case: str, expected: int) -> None:
    g, _, issuer = gw
    token: str | None = {
        "missing": lambda: None,
        "expired": lambda: issuer.token(ttl=-3600, tenant="acme"),
        "other-key": lambda: Issuer(kid=issuer.kid).token(tenant="acme"),
        "wrong-audience": lambda: Issuer(audience="elsewhere", key=issuer.key).token(tenant="acme"),
        "garbage": lambda: "not.a.jwt",
    }[case]()
    picker_requests = value(g.metrics, "inference_objective_request_total")
    pod_requests = len(pod.requests)
    status, body = await post(g.port, token, {FAIRNESS: "acme"})
    assert status == expected, body
    # the request went no further than Envoy; a valid one afterwards does (ordering, no sleep)
    status, _ = await post(g.port, issuer.token(tenant="after-401"))
    assert status == 200
    wait_until(lambda: value(g.metrics, "inference_objective_request_total") == picker_requests + 1,
               what="the picker counting only the valid request")
    assert len(pod.requests) == pod_requests + 1


async def test_gateway_set_headers_are_the_tenant_and_client_copies_are_stripped(
        gw: tuple[Gateway, Gateway, Issuer]) -> None:
    _, g, issuer = gw
    forged = {"x-epp-tenant": "victim", "x-epp-tier": "gold", FAIRNESS: "victim"}
    status, _ = await post(g.port, issuer.token(tenant="dora-co", tier="basic"), forged)
    assert status == 200
    # a valid token without the claims: Envoy removed the client's copies before jwt_authn,
    # so nothing names a tenant and the request is default-flow
    status, _ = await post(g.port, issuer.token(sub="no-claims"), forged)
    assert status == 200
    wait_until(lambda: g.served("dora-co", "basic") == 1 and g.served("default-flow", "default") == 1,
               what="dora-co in basic and the claimless request in default-flow")
    assert "victim" not in _tenants(g.metrics)


async def test_epp_usage_prints_the_tenants_after_real_requests(gw: tuple[Gateway, Gateway, Issuer]) -> None:
    g, _, issuer = gw
    for tenant, tier, n in (("report-city", "gold", 3), ("report-dept", "basic", 1)):
        for i in range(n):
            status, _ = await post(g.port, issuer.token(tenant=tenant, tier=tier), text=f"{tenant} {i}")
            assert status == 200
    wait_until(lambda: g.served("report-city", "gold") == 3 and g.served("report-dept", "basic") == 1,
               what="the report's requests in the usage series")
    url = f"http://{HOST}:{g.metrics}/metrics"
    out = _usage("--metrics", url, "--csv")
    rows = {(r["tenant"], r["tier"]): r for r in csv.DictReader(io.StringIO(out))}
    city, dept = rows[("report-city", "gold")], rows[("report-dept", "basic")]
    assert (city["requests"], city["rejected"]) == ("3", "0")
    assert (city["prompt_tokens"], city["cached_tokens"], city["completion_tokens"], city["tokens"]) == (
        "18", "12", "9", "39")
    assert (dept["requests"], dept["tokens"]) == ("1", "13")
    table = _usage("--metrics", url)
    assert f"usage since the picker at {url} started" in table
    assert any(line.split()[:3] == ["report-city", "gold", "3"] for line in table.splitlines())


def _usage(*args: str) -> str:
    res = subprocess.run([sys.executable, "-m", "epp", "usage", *args], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout
