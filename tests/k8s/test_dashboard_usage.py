"""The dashboard has the per-tenant usage panels, built on the series `epp usage` reads."""

from __future__ import annotations

from epp.usage.series import QUEUE_SECONDS, REQUESTS, TOKENS
from tests.k8s.test_dashboard import EXPORTED, all_panels, dashboard, selectors_and_groupings


def _panels_using(name: str) -> dict[str, list[tuple[str, set[str]]]]:
    """Panel title -> [(expr, by-labels)] for the panels whose queries read ``name``."""
    out: dict[str, list[tuple[str, set[str]]]] = {}
    for p in all_panels(dashboard()["panels"]):
        for t in p.get("targets", []):
            selectors, groupings = selectors_and_groupings(t["expr"])
            if any(s == name for s, _ in selectors):
                out.setdefault(p["title"], []).append((t["expr"], set().union(*groupings) if groupings else set()))
    return out


def test_usage_series_are_exported_under_the_names_epp_usage_reads() -> None:
    for name in (REQUESTS, TOKENS, QUEUE_SECONDS):
        assert name in EXPORTED and {"tenant", "tier", "inference_pool"} <= EXPORTED[name]


def test_per_tenant_usage_panels() -> None:
    tokens = _panels_using(TOKENS)
    assert any({"tenant", "type"} <= by for uses in tokens.values() for _, by in uses), tokens  # tokens by type
    assert any(by == {"tier"} and "$__range" in expr for uses in tokens.values() for expr, by in uses), tokens
    requests = _panels_using(REQUESTS)
    assert any({"tenant", "outcome"} <= by for uses in requests.values() for _, by in uses), requests
    queue = _panels_using(QUEUE_SECONDS)
    # mean queueing time: queue seconds divided by served requests, per tenant
    assert any(REQUESTS in expr and 'outcome="served"' in expr and "tenant" in by
               for uses in queue.values() for expr, by in uses), queue
    variables = {v["name"] for v in dashboard()["templating"]["list"]}
    assert {"tenant", "tier"} <= variables
