"""Where ``epp usage`` reads the series: a Prometheus-compatible query API, or a picker's
/metrics page.

The Prometheus HTTP API (``/api/v1/query``) is what Prometheus, Thanos, Mimir, Cortex and
VictoriaMetrics all serve, so one instant query per series — ``sum by (tenant, tier, ...)
(increase(series[<period>]))`` evaluated at the period's end — gives the period's totals
whatever the store. A picker's own counters need no store but only cover its uptime.
"""

from __future__ import annotations

import math
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime

import orjson
from prometheus_client.parser import text_string_to_metric_families

from epp.usage.series import QUEUE_SECONDS, REQUESTS, TOKENS, TenantUsage, add_sample


class UsageSourceError(RuntimeError):
    """The source could not be read; the message says which URL and why."""


def _get(url: str, timeout: float) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return bytes(resp.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:300].decode(errors="replace")
        raise UsageSourceError(f"{url}: HTTP {exc.code}: {detail}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise UsageSourceError(f"{url}: {exc}") from None


def _selector(pool: str | None) -> str:
    if not pool:
        return ""
    return '{inference_pool="' + pool.replace("\\", "\\\\").replace('"', '\\"') + '"}'


def query_prometheus(
    base_url: str, start: datetime, end: datetime, pool: str | None = None, timeout: float = 30.0,
) -> dict[tuple[str, str], TenantUsage]:
    """Totals per (tenant, tier) between ``start`` and ``end`` from a Prometheus-compatible API."""
    seconds = max(1, math.ceil((end - start).total_seconds()))
    sel = _selector(pool)
    queries = {
        REQUESTS: f"sum by (tenant, tier, outcome) (increase({REQUESTS}{sel}[{seconds}s]))",
        TOKENS: f"sum by (tenant, tier, type) (increase({TOKENS}{sel}[{seconds}s]))",
        QUEUE_SECONDS: f"sum by (tenant, tier) (increase({QUEUE_SECONDS}{sel}[{seconds}s]))",
    }
    rows: dict[tuple[str, str], TenantUsage] = {}
    for name, promql in queries.items():
        params = urllib.parse.urlencode({"query": promql, "time": f"{end.timestamp():.3f}"})
        raw = _get(f"{base_url.rstrip('/')}/api/v1/query?{params}", timeout)
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise UsageSourceError(f"{base_url}: the answer to {promql!r} is not JSON") from None
        if doc.get("status") != "success":
            raise UsageSourceError(f"{base_url}: query {promql!r} failed: {doc.get('error', doc)}")
        data = doc.get("data") or {}
        if data.get("resultType") != "vector":
            raise UsageSourceError(f"{base_url}: query {promql!r}: expected a vector, got {data.get('resultType')}")
        for sample in data.get("result", []):
            try:
                value = float(sample["value"][1])
            except (KeyError, IndexError, TypeError, ValueError):
                continue
            if math.isfinite(value):
                add_sample(rows, name, sample.get("metric", {}), value)
    return rows


def read_picker_metrics(url: str, pool: str | None = None, timeout: float = 10.0) -> dict[tuple[str, str], TenantUsage]:
    """Counters since the picker started, from its /metrics page (one replica's share)."""
    text = _get(url, timeout).decode(errors="replace")
    rows: dict[tuple[str, str], TenantUsage] = {}
    wanted = {REQUESTS, TOKENS, QUEUE_SECONDS}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name not in wanted:
                continue
            if pool and sample.labels.get("inference_pool") != pool:
                continue
            add_sample(rows, sample.name, sample.labels, float(sample.value))
    return rows
