"""Where ``epp usage`` reads the series: a Prometheus-compatible query API, or a picker's
/metrics page.

The Prometheus HTTP API (``/api/v1/query``) is what Prometheus, Thanos, Mimir, Cortex and
VictoriaMetrics all serve, so one instant query per series — ``sum by (tenant, tier, ...)
(increase(series[<period>]))`` evaluated at the period's end — gives the period's totals
whatever the store. A picker's own counters need no store but only cover its uptime.
"""

from __future__ import annotations

import math
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import orjson
from prometheus_client.parser import text_string_to_metric_families

from epp.usage.series import QUEUE_SECONDS, REQUESTS, TOKENS, TenantUsage, add_sample


class UsageSourceError(RuntimeError):
    """The source could not be read; the message says which URL and why."""


@dataclass(frozen=True, slots=True)
class Access:
    """How to reach a source: a bearer token (a picker's /metrics behind
    ``--metrics-endpoint-auth``, a Prometheus behind an auth proxy) and TLS trust for https."""

    timeout: float = 30.0
    token: str | None = None
    ca_file: str | None = None
    insecure: bool = False

    @classmethod
    def from_files(cls, timeout: float, token_file: str | None, ca_file: str | None,
                   insecure: bool) -> Access:
        """Reads the token file now, so a missing or empty one is an error naming the flag."""
        token = None
        if token_file:
            try:
                token = Path(token_file).read_text().strip()
            except OSError as exc:
                raise UsageSourceError(f"--bearer-token-file {token_file}: {exc.strerror or exc}") from None
            if not token:
                raise UsageSourceError(f"--bearer-token-file {token_file}: the file is empty")
        if ca_file and not Path(ca_file).is_file():
            raise UsageSourceError(f"--ca-file {ca_file}: no such file")
        return cls(timeout, token, ca_file, insecure)

    def context(self) -> ssl.SSLContext | None:
        if self.insecure:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            return ctx
        return ssl.create_default_context(cafile=self.ca_file) if self.ca_file else None


def _get(url: str, access: Access) -> bytes:
    req = urllib.request.Request(url)
    if access.token:
        req.add_header("Authorization", f"Bearer {access.token}")
    try:
        with urllib.request.urlopen(req, timeout=access.timeout, context=access.context()) as resp:
            return bytes(resp.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:300].decode(errors="replace")
        hint = ""
        if exc.code in (401, 403):
            hint = (" (pass a token allowed to read it: --bearer-token-file)" if not access.token
                    else " (the token was refused)")
        raise UsageSourceError(f"{url}: HTTP {exc.code}{hint}: {detail}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise UsageSourceError(f"{url}: {exc}") from None


def _selector(pool: str | None) -> str:
    if not pool:
        return ""
    return '{inference_pool="' + pool.replace("\\", "\\\\").replace('"', '\\"') + '"}'


def query_prometheus(
    base_url: str, start: datetime, end: datetime, pool: str | None = None, access: Access | None = None,
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
        raw = _get(f"{base_url.rstrip('/')}/api/v1/query?{params}", access or Access())
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


def read_picker_metrics(url: str, pool: str | None = None,
                        access: Access | None = None) -> dict[tuple[str, str], TenantUsage]:
    """Counters since the picker started, from its /metrics page (one replica's share)."""
    text = _get(url, access or Access(timeout=10.0)).decode(errors="replace")
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
