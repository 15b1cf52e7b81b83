"""RBAC for the protected ``/metrics`` in every shipped variant: the picker may create exactly
the reviews it sends (read from what it really sends to the fake API server), a scraper role
grants what the SubjectAccessReview asks for, and turning auth off in the chart turns the flag
off too."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from epp.runner import cli as serve_cli
from epp.runner.auth import KubernetesMetricsAuth
from tests.k8s.fakeapi import FakeKube
from tests.k8s.test_manifests import KUSTOMIZE_DIRS, by_kind, helm_render, kustomize, needs_kubectl, one

Rule = tuple[str, str, str]  # (apiGroup, resource, verb)


def picker_calls(kube: FakeKube) -> set[Rule]:
    """The (group, resource, verb) of every call the metrics auth makes for one scrape."""
    kube.add_token("t", "system:serviceaccount:monitoring:prometheus")
    kube.grant("system:serviceaccount:monitoring:prometheus")
    assert KubernetesMetricsAuth(kube.api_client(), cache_ttl=0).check("Bearer t", "/metrics").allowed
    calls = set()
    for r in kube.requests:
        method, path = r.split(" ", 1)
        parts = path.split("?")[0].strip("/").split("/")  # apis/GROUP/VERSION/RESOURCE
        assert method == "POST" and parts[0] == "apis" and len(parts) == 4, r
        calls.add((parts[1], parts[3], "create"))
    return calls


def cluster_grants(objs: list[dict[str, Any]], sa: str, namespace: str | None) -> tuple[set[Rule], set[Rule]]:
    """(resource rules, non-resource rules) the ClusterRoleBindings give ServiceAccount ``sa``."""
    roles = {r["metadata"]["name"]: r for r in by_kind(objs, "ClusterRole")}
    res: set[Rule] = set()
    nonres: set[Rule] = set()
    for b in by_kind(objs, "ClusterRoleBinding"):
        if not any(s["kind"] == "ServiceAccount" and s["name"] == sa and s.get("namespace") == namespace
                   for s in b["subjects"]):
            continue
        for rule in roles[b["roleRef"]["name"]]["rules"]:
            for verb in rule["verbs"]:
                res |= {(g, r, verb) for g in rule.get("apiGroups", []) for r in rule.get("resources", [])}
                nonres |= {("", u, verb) for u in rule.get("nonResourceURLs", [])}
    return res, nonres


def reader_rules(objs: list[dict[str, Any]]) -> set[Rule]:
    return {("", u, v) for role in by_kind(objs, "ClusterRole") for rule in role["rules"]
            for u in rule.get("nonResourceURLs", []) for v in rule["verbs"]}


def auth_flag(objs: list[dict[str, Any]]) -> bool:
    args = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    p = argparse.ArgumentParser()
    serve_cli.add_arguments(p)
    parsed, _ = p.parse_known_args([a for a in args[1:] if not a.startswith("--config-file=")])  # not mounted here
    return bool(serve_cli.options_from_args(parsed).metrics_endpoint_auth)


@pytest.fixture
def calls(fake_k8s: FakeKube) -> set[Rule]:
    return picker_calls(fake_k8s)


@needs_kubectl
@pytest.mark.parametrize("rel", [d for d in KUSTOMIZE_DIRS if not d.startswith("examples")])
def test_kustomize_variants_let_the_picker_review_callers(rel: str, calls: set[Rule]) -> None:
    objs = kustomize(rel)
    sa = one(objs, "ServiceAccount")["metadata"]
    assert auth_flag(objs)  # on: the picker runs with --pool-name / --endpoint-selector
    granted, _ = cluster_grants(objs, sa["name"], sa.get("namespace", "default"))
    assert calls <= granted, calls - granted
    assert {("authentication.k8s.io", "tokenreviews", "create"),
            ("authorization.k8s.io", "subjectaccessreviews", "create")} == calls
    assert ("", "/metrics", "get") in reader_rules(objs)  # what the scraper's SubjectAccessReview asks


def test_chart_default_and_scraper_binding(calls: set[Rule]) -> None:
    objs = helm_render({"inferenceExtension": {"metricsReader": {
        "serviceAccounts": [{"name": "prometheus-k8s", "namespace": "monitoring"}]}}})
    assert auth_flag(objs)
    granted, _ = cluster_grants(objs, "qwen-epp", "llm")
    assert calls <= granted, calls - granted
    _, scraper = cluster_grants(objs, "prometheus-k8s", "monitoring")
    assert scraper == {("", "/metrics", "get")}


def test_chart_with_auth_off_renders_no_review_rights(calls: set[Rule]) -> None:
    objs = helm_render({"inferenceExtension": {"metricsEndpointAuth": False, "metricsReader": {"create": False}}})
    assert not auth_flag(objs)
    granted, _ = cluster_grants(objs, "qwen-epp", "llm")
    assert not (calls & granted)
    assert not by_kind(objs, "ClusterRole")
