"""The pure translation rules: flag parsing, pool shapes, pod eligibility, precedence."""

from __future__ import annotations

import pytest

from epp.discovery.k8s_model import (
    CRITICALITY_PRIORITY,
    build_model_semantics,
    default_pool_namespace,
    parse_endpoint_selector,
    parse_target_ports,
    pod_endpoints,
    pool_spec,
    standalone_pool_name,
)
from epp.discovery.kubernetes import KubernetesDiscovery
from tests.k8s.fakeapi import inference_model, pod, pool, rewrite


def test_parse_endpoint_selector() -> None:
    assert parse_endpoint_selector("app=vllm, tier==gpu") == {"app": "vllm", "tier": "gpu"}
    for bad, msg in [("", "empty"), ("app", "not key=value"), ("app!=x", "only key=value"),
                     ("a=1,,b=2", "empty entry"), ("a=1,a=2", "given twice"), ("=x", "not key=value")]:
        with pytest.raises(ValueError, match=msg):
            parse_endpoint_selector(bad)


def test_parse_target_ports() -> None:
    assert parse_target_ports("8000, 8001") == [8000, 8001]
    assert parse_target_ports([8000]) == [8000]
    for bad, msg in [("", "need 1-8"), ("x", "not a port"), ("70000", "out of range"),
                     ("1,1", "twice"), (",".join(str(8000 + i) for i in range(9)), "need 1-8")]:
        with pytest.raises(ValueError, match=msg):
            parse_target_ports(bad)


def test_namespace_and_standalone_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NAMESPACE", raising=False)
    assert default_pool_namespace(None) == "default"
    monkeypatch.setenv("NAMESPACE", "ns1")
    assert default_pool_namespace(None) == "ns1" and default_pool_namespace("x") == "x"
    assert standalone_pool_name("epp-5d8c7-abcde") == "epp"
    assert standalone_pool_name("my-epp-5d8c7-abcde") == "my-epp"
    monkeypatch.delenv("POD_NAME", raising=False)
    assert standalone_pool_name() == "standalone"


def test_constructor_validates_flags() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        KubernetesDiscovery()
    with pytest.raises(ValueError, match="exactly one"):
        KubernetesDiscovery(pool_name="p", endpoint_selector={"a": "b"}, target_ports=[1])
    with pytest.raises(ValueError, match="needs --endpoint-target-ports"):
        KubernetesDiscovery(endpoint_selector={"a": "b"})
    with pytest.raises(ValueError, match="only applies"):
        KubernetesDiscovery(pool_name="p", target_ports=[8000])
    with pytest.raises(ValueError, match="--pool-group"):
        KubernetesDiscovery(pool_name="p", pool_group="example.com")


def test_pool_shapes() -> None:
    v1 = pool_spec(pool("p", {"a": "b"}, [8000, 8001]))
    assert (dict(v1.selector), v1.target_ports, v1.app_protocol) == ({"a": "b"}, (8000, 8001), "http")
    legacy = pool_spec(pool("p", {"a": "b"}, [8000], legacy=True), "inference.networking.x-k8s.io")
    assert (dict(legacy.selector), legacy.target_ports) == ({"a": "b"}, (8000,))


def test_pod_eligibility_and_ipv6() -> None:
    spec = pool_spec(pool("p", {"a": "b"}, [8000]))
    assert [e.key for e in pod_endpoints(pod("x", "fd00::1", {"a": "b"}), spec)] == ["[fd00::1]:8000"]
    assert pod_endpoints(pod("x", "10.0.0.1", {"a": "b"}, ready=False), spec) == []
    assert pod_endpoints(pod("x", "10.0.0.1", {"a": "c"}), spec) == []
    deleting = pod("x", "10.0.0.1", {"a": "b"})
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert pod_endpoints(deleting, spec) == []
    no_conditions = pod("x", "10.0.0.1", {"a": "b"})
    no_conditions["status"].pop("conditions")
    assert pod_endpoints(no_conditions, spec) == []


def test_rewrite_skips_unsupported_matches_and_defaults_weight() -> None:
    rw = rewrite("r", "p", [(["m"], [("t", 1)])])
    rw["spec"]["rules"].append({"matches": [{"model": {"type": "Regex", "value": ".*"}}],
                                "targets": [{"modelRewrite": "x"}]})
    rw["spec"]["rules"].append({"targets": [{"modelRewrite": "y"}]})
    rules, _ = build_model_semantics([rw], [], "p")
    assert [(r.matches, r.targets[0].model, r.targets[0].weight) for r in rules] == [
        (("m",), "t", 1), ((), "y", 1)]


def test_criticality_mapping() -> None:
    assert CRITICALITY_PRIORITY == {"Critical": 100, "Standard": 0, "Sheddable": -1}
    _, objs = build_model_semantics([], [inference_model("a", "p", "m", None)], "p")
    assert objs["m"].priority == 0
