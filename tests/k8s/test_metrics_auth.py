"""``/metrics`` protected the Kubernetes way (GIE's ``--metrics-endpoint-auth``).

The caller's bearer token goes to the (fake) API server in a TokenReview, the user it names
in a SubjectAccessReview for ``get`` on the non-resource URL ``/metrics``: a scraper whose
ServiceAccount is granted that gets the metrics, anybody else 401 (no or bad token) or 403
(valid token, no grant). The fake API server answers both reviews the way the real one does
(``status.authenticated`` / ``status.user``, ``status.allowed``), from tokens and grants
the test declares.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from prometheus_client import CollectorRegistry, Counter

from epp.local.topology import HOST, Topology, free_port_block, grpc_serving
from epp.runner import cli
from epp.runner.auth import KubernetesMetricsAuth, bearer_token, load_metrics_auth
from epp.runner.metrics_http import start_metrics_server
from tests.k8s.fakeapi import FakeKube, pod, pool

PROMETHEUS_SA = "system:serviceaccount:monitoring:prometheus"
SA_GROUP = "system:serviceaccounts:monitoring"
TOKEN_REVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"
ACCESS_REVIEWS = "/apis/authorization.k8s.io/v1/subjectaccessreviews"


def scrape(port: int, token: str | None = None, path: str = "/metrics") -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(f"http://{HOST}:{port}{path}")
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


class Served:
    """A metrics server with auth against the fake API server, on a free port."""

    def __init__(self, kube: FakeKube, cache_ttl: float) -> None:
        self.registry = CollectorRegistry()
        Counter("epp_test_scrapes", "a metric the test can find", registry=self.registry).inc()
        self.auth = KubernetesMetricsAuth(kube.api_client(), cache_ttl=cache_ttl)
        self.httpd, self.thread = start_metrics_server(self.registry, 0, HOST, self.auth)
        self.port = self.httpd.server_port

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def kube(fake_k8s: FakeKube) -> FakeKube:
    fake_k8s.add_token("prom-token", PROMETHEUS_SA, groups=["system:serviceaccounts", SA_GROUP])
    fake_k8s.add_token("dev-token", "jane@example.com", groups=["developers"])
    fake_k8s.grant(PROMETHEUS_SA, "/metrics", "get")
    return fake_k8s


@pytest.fixture
def served(kube: FakeKube) -> Iterator[Served]:
    s = Served(kube, cache_ttl=0.0)  # every scrape asks the API server
    try:
        yield s
    finally:
        s.close()


def reviews(kube: FakeKube, path: str) -> int:
    return sum(1 for r in kube.requests if r.startswith(f"POST {path}"))


def error_message(body: bytes) -> str:
    doc = orjson.loads(body)
    return str(doc["error"]["message"])


def test_a_granted_service_account_reads_the_metrics(kube: FakeKube, served: Served) -> None:
    status, headers, body = scrape(served.port, "prom-token")
    assert status == 200, body
    assert b"epp_test_scrapes_total 1.0" in body
    assert headers["content-type"].startswith("text/plain")
    # one TokenReview and one SubjectAccessReview, the real API shapes
    assert reviews(kube, TOKEN_REVIEWS) == 1 and reviews(kube, ACCESS_REVIEWS) == 1


def test_valid_token_without_a_grant_is_forbidden(kube: FakeKube, served: Served) -> None:
    status, _, body = scrape(served.port, "dev-token")
    assert status == 403
    assert "jane@example.com" in error_message(body) and "/metrics" in error_message(body)
    assert b"epp_test_scrapes" not in body


@pytest.mark.parametrize("token", [None, "not-a-token", ""])
def test_missing_or_unknown_token_is_unauthorized(served: Served, token: str | None) -> None:
    status, headers, body = scrape(served.port, token)
    assert status == 401
    assert headers["www-authenticate"].startswith("Bearer")
    assert orjson.loads(body)["error"]["type"] == "Unauthorized"
    assert b"epp_test_scrapes" not in body


def test_a_grant_to_the_scrapers_group_is_enough(kube: FakeKube, served: Served) -> None:
    kube.revoke(PROMETHEUS_SA)
    assert scrape(served.port, "prom-token")[0] == 403
    kube.grant(SA_GROUP, "/metrics", "get")
    assert scrape(served.port, "prom-token")[0] == 200


def test_the_review_is_for_the_path_asked(kube: FakeKube, served: Served) -> None:
    """A grant on /metrics does not open other paths of the server (the review carries the
    request's path, as Kubernetes components do)."""
    assert scrape(served.port, "prom-token", "/debug")[0] == 403
    kube.grant("developers", "*", "get")
    assert scrape(served.port, "dev-token", "/debug")[0] == 200


def test_decisions_are_cached_briefly(kube: FakeKube) -> None:
    s = Served(kube, cache_ttl=300.0)
    try:
        for _ in range(3):
            assert scrape(s.port, "prom-token")[0] == 200
            assert scrape(s.port, "dev-token")[0] == 403
            assert scrape(s.port, "bad")[0] == 401
        assert reviews(kube, TOKEN_REVIEWS) == 3  # one per token, not per scrape
        kube.revoke(PROMETHEUS_SA)  # still allowed until the cached decision expires
        assert scrape(s.port, "prom-token")[0] == 200
    finally:
        s.close()
    fresh = Served(kube, cache_ttl=0.0)
    try:
        assert scrape(fresh.port, "prom-token")[0] == 403
    finally:
        fresh.close()


def test_api_server_trouble_is_503_and_not_remembered(kube: FakeKube) -> None:
    s = Served(kube, cache_ttl=300.0)
    try:
        kube.fail_next(1, 500, path_contains="tokenreviews")
        status, _, body = scrape(s.port, "prom-token")
        assert status == 500 and "tokenreviews" in error_message(body)
        kube.stop()
        status, _, body = scrape(s.port, "prom-token")
        assert status == 503 and "unreachable" in error_message(body)
        kube.start()  # same port: the auth's client reaches it again
        assert scrape(s.port, "prom-token")[0] == 200
    finally:
        s.close()


def test_bearer_header_parsing() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer  abc ") == "abc"
    for bad in (None, "", "Basic abc", "Bearer", "Bearer a b"):
        assert bearer_token(bad) is None


def test_without_credentials_the_flag_names_itself(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(OSError, match="--metrics-endpoint-auth"):
        load_metrics_auth()


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    return p.parse_args(list(argv))


def auth_on(*argv: str) -> bool:
    return cli.options_from_args(parse(*argv)).metrics_endpoint_auth


def test_on_by_default_in_kubernetes_mode_off_in_static_mode() -> None:
    assert auth_on("--pool-name", "p") is True
    assert auth_on("--endpoint-selector", "app=x", "--endpoint-target-ports", "8000") is True
    assert auth_on("--pool-name", "p", "--metrics-endpoint-auth=false") is False
    assert auth_on("--endpoints", "10.0.0.1:8000") is False
    assert auth_on("--endpoints", "10.0.0.1:8000", "--metrics-endpoint-auth") is True


def test_epp_serve_in_kubernetes_mode_protects_metrics(kube: FakeKube, tmp_path: Path) -> None:
    """A real ``epp serve --pool-name`` (KUBECONFIG → the fake API server): no flag needed."""
    kube.add(pool("pool", {"app": "vllm"}, [8000]))
    kube.add(pod("m-0", "10.0.0.1", {"app": "vllm"}))
    kubeconfig = kube.kubeconfig(tmp_path / "kubeconfig")
    with Topology(tmp_path / "procs") as topo:
        base = free_port_block(3)
        proc = topo.start("picker", [
            sys.executable, "-m", "epp", "serve", "--pool-name", "pool", "--pool-namespace", "default",
            "--grpc-port", str(base), "--grpc-health-port", str(base + 1), "--metrics-port", str(base + 2),
            "--bind-address", HOST, "--secure-serving=false", "--log-format", "text",
        ], ready=lambda: grpc_serving(HOST, base + 1), timeout=30,
            env={"KUBECONFIG": kubeconfig, "KUBERNETES_SERVICE_HOST": ""})
        assert scrape(base + 2)[0] == 401
        assert scrape(base + 2, "dev-token")[0] == 403
        status, _, body = scrape(base + 2, "prom-token")
        assert status == 200, proc.log_tail()
        assert b"inference_extension_info" in body
