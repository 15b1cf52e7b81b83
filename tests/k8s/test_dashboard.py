"""The Grafana dashboard only queries metrics the picker exports, with labels they have.

Every panel's PromQL (and every templating query) is parsed with a real PromQL parser
(``promql-parser``); each metric selector must be a series a fresh ``EppMetrics`` registry
exposes (a counter ``x`` as ``x_total``, a histogram ``x`` as ``x_bucket``/``x_sum``/``x_count``),
each label it matches or aggregates by must be one of that metric's labels, and the ConfigMap in
manifests/grafana carries the JSON unchanged with the sidecar's ``grafana_dashboard`` label.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import Metric

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "manifests" / "grafana"
DASHBOARD_FILE = GRAFANA / "epp-dashboard.json"
# Grafana's interval variables stand where PromQL wants a duration
GRAFANA_DURATIONS = re.compile(r"\$__(rate_interval|interval|range)|\$\{__(rate_interval|interval|range)\}")
# labels Prometheus adds when it scrapes the picker (target labels), usable in any selector
TARGET_LABELS = {"job", "instance", "namespace", "pod", "container", "service", "endpoint"}


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD_FILE.read_text())
    return data


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        yield p
        yield from all_panels(p.get("panels", []))  # collapsed rows keep their panels inside


def exported_series() -> dict[str, set[str]]:
    """Series name -> label names, for everything a fresh EppMetrics registry exports."""
    from epp.metrics import EppMetrics

    metrics = EppMetrics()
    labels_of: dict[str, set[str]] = {}
    for attr in vars(metrics).values():
        name, labelnames = getattr(attr, "_name", None), getattr(attr, "_labelnames", None)
        if isinstance(name, str) and labelnames is not None:
            labels_of[name] = set(labelnames)
    series: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        assert isinstance(family, Metric)
        base = family.name
        labels = labels_of.get(base) or labels_of.get(f"{base}_total") or set()
        if family.type == "counter":
            series[f"{base}_total"] = labels
        elif family.type == "histogram":
            series.update({f"{base}_bucket": labels | {"le"}, f"{base}_sum": labels, f"{base}_count": labels})
        else:
            series[base] = labels
    return series


EXPORTED = exported_series()


def promql_exprs() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    out = []
    for p in all_panels(dashboard()["panels"]):
        for t in p.get("targets", []):
            out.append((f"panel {p['title']!r} {t.get('refId')}", t["expr"]))
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", q)
            assert m, f"variable {var['name']}: unsupported query {q!r}"
            out.append((f"variable {var['name']}", f"count by ({m.group(2)}) ({m.group(1)})"))
    return out


def selectors_and_groupings(expr: str) -> tuple[list[tuple[str, set[str]]], list[set[str]]]:
    """(metric name, matcher labels) of every vector selector, and the label sets of every by(...)."""
    pp = pytest.importorskip("promql_parser", reason="promql-parser not installed")
    ast = pp.parse(GRAFANA_DURATIONS.sub("5m", expr))
    selectors: list[tuple[str, set[str]]] = []
    groupings: list[set[str]] = []

    def visit(node: Any) -> bool:
        if isinstance(node, pp.VectorSelector):
            names = {m.name for m in node.matchers.matchers} if node.matchers else set()
            selectors.append((node.name or "", names - {"__name__"}))
        elif isinstance(node, pp.AggregateExpr) and node.modifier is not None:
            if node.modifier.type == pp.AggModifierType.By:  # by (...), not without (...)
                groupings.append(set(node.modifier.labels))
        return True

    pp.walk(ast, visit)
    return selectors, groupings


def test_dashboard_json_is_valid_and_identified() -> None:
    d = dashboard()
    assert d["uid"] and re.fullmatch(r"[a-zA-Z0-9_-]{1,40}", d["uid"])
    assert d["title"]
    ids = [p["id"] for p in all_panels(d["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    rows = [p["title"] for p in d["panels"] if p["type"] == "row"]
    for wanted in ("Pool", "Objectives", "Flow control", "Tenants"):
        assert any(r.startswith(wanted) for r in rows), f"no {wanted} row in {rows}"
    for p in all_panels(d["panels"]):
        if p["type"] != "row":
            assert p["targets"], f"panel {p['title']!r} has no query"
            assert p["datasource"]["uid"] == "${datasource}"  # portable: the data source is a variable


def test_every_query_parses_and_uses_exported_metrics_and_labels() -> None:
    exprs = promql_exprs()
    assert len(exprs) > 40
    used: set[str] = set()
    for where, expr in exprs:
        selectors, groupings = selectors_and_groupings(expr)
        assert selectors, f"{where}: no metric in {expr!r}"
        available: set[str] = set()
        for name, matchers in selectors:
            assert name in EXPORTED, f"{where}: {name} is not exported by EppMetrics"
            unknown = matchers - EXPORTED[name] - TARGET_LABELS
            assert not unknown, f"{where}: {name} has no label(s) {sorted(unknown)}"
            available |= EXPORTED[name]
            used.add(name)
        for by in groupings:
            unknown = by - available - TARGET_LABELS
            assert not unknown, f"{where}: by ({', '.join(sorted(by))}) names labels no metric has: {unknown}"
    # the families the issue asks for are on the dashboard
    for needed in ("inference_pool_ready_pods", "inference_pool_average_kv_cache_utilization",
                   "inference_pool_average_queue_size", "inference_objective_request_total",
                   "inference_objective_request_error_total", "inference_objective_request_duration_seconds_bucket",
                   "inference_extension_scheduler_e2e_duration_seconds_bucket",
                   "inference_objective_running_requests", "inference_extension_flow_control_queue_size",
                   "inference_extension_flow_control_request_queue_duration_seconds_bucket",
                   "epp_flow_control_tokens_served_total"):
        assert needed in used, f"{needed} is not on the dashboard"


def test_the_metric_check_can_fail() -> None:
    pytest.importorskip("promql_parser", reason="promql-parser not installed")
    selectors, _ = selectors_and_groupings(
        'sum by (le) (rate(inference_objective_request_duration_seconds_bucket{model_name="x"}[$__rate_interval]))')
    assert selectors == [("inference_objective_request_duration_seconds_bucket", {"model_name"})]
    assert "inference_objective_request_duration_seconds" not in EXPORTED  # histograms only as series
    assert "inference_objective_request_total" in EXPORTED and "inference_objective_request" not in EXPORTED
    assert "inference_pool_ready_pods_total" not in EXPORTED
    assert "pool" not in EXPORTED["inference_pool_ready_pods"]  # its label is name


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_configmap_ships_the_dashboard_for_the_grafana_sidecar() -> None:
    out = subprocess.run(["kubectl", "kustomize", str(GRAFANA)], capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stderr
    (cm,) = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert cm["kind"] == "ConfigMap"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["epp-dashboard.json"]) == dashboard()
    assert len(out.stdout.encode()) < 256 * 1024  # fits kubectl apply's last-applied annotation
