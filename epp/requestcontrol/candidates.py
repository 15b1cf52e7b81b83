"""Candidate endpoints for a request: the whole pool, or the gateway's subset hint.

The hint (``envoy.lb.subset_hint`` / ``x-gateway-destination-endpoint-subset``) may be a
list or a comma-separated string of ``ip`` or ``ip:port`` (different Envoy control paths
produce different shapes). A bare ``ip`` allows every rank of that pod; ``ip:port`` only
that rank (port-aware, as GIE's reference picker at HEAD).
"""

from __future__ import annotations

from collections.abc import Iterable

from epp.datalayer.datastore import Datastore
from epp.framework.datalayer import Endpoint, parse_hostport

SUBSET_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"


def split_hint(value: str | Iterable[str]) -> list[str]:
    items = value.split(",") if isinstance(value, str) else list(value)
    out: list[str] = []
    for item in items:
        out.extend(p.strip() for p in str(item).split(",") if p.strip())
    return out


def subset_candidates(datastore: Datastore, hint: str | Iterable[str]) -> list[Endpoint]:
    """Endpoints named by the hint that are in the pool (unknown or malformed entries skipped)."""
    seen: set[str] = set()
    out: list[Endpoint] = []
    for entry in split_hint(hint):
        try:
            host, port = parse_hostport(entry)
        except ValueError:
            continue
        for ep in datastore.by_address(host):
            if (port is None or ep.port == port) and ep.key not in seen:
                seen.add(ep.key)
                out.append(ep)
    return out
