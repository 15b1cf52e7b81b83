"""Whose request is it: the tenant (and tier) the picker's fairness and usage report use.

GIE takes the tenant from ``x-gateway-inference-fairness-id``, which any client can set: a
tenant could claim to be another (and take its share) or invent a fresh id per request (and
get a fresh share each time). With a verified source configured the picker takes the tenant
from what the gateway verified instead:

* **claims** — the JWT payload Envoy's ``jwt_authn`` filter verified and put into dynamic
  metadata (``payload_in_metadata``), forwarded to ext_proc through
  ``metadata_options.forwarding_namespaces``. A client cannot write dynamic metadata, so this
  is the strong source. ``ext_authz`` results (its dynamic metadata namespace) work the same.
* **a gateway-set header** — for gateways that can only copy claims into headers (Envoy
  Gateway's SecurityPolicy ``claimToHeaders``). Only as good as the gateway's removal of the
  client's own copy before authentication (docs/flow-control.md shows how).

The client's fairness header is then ignored and stripped before forwarding, unless trusted
explicitly. A verified tier turns the fairness id into ``<tier>/<tenant>`` so the
``token-fair-share-policy`` tiers' ``fairnessIds`` patterns (``gold/*``) give the tier's
weight without a per-tenant list, and the tier is the ``tier`` label of the usage series.
Without a verified tier that label is the name of the fair-share tier whose ``fairnessIds``
match the fairness id (``TierNames``), or ``default``.

Runs once per request on the hot path: dict lookups only, no logging, no I/O.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

FAIRNESS_HEADER = "x-gateway-inference-fairness-id"
DEFAULT_FAIRNESS_ID = "default-flow"
#: the tier label of a request no tier (verified or configured) applies to
DEFAULT_TIER = "default"
#: where Envoy's jwt_authn filter writes the verified payload (``payload_in_metadata`` key
#: ``jwt_payload`` in the configs ``epp envoy-config`` generates; Envoy Gateway uses the
#: SecurityPolicy provider's name)
JWT_NAMESPACE = "envoy.filters.http.jwt_authn"
DEFAULT_CLAIMS_METADATA = f"{JWT_NAMESPACE}/jwt_payload"


class TenantConfigError(ValueError):
    """A tenant-source setting that cannot work; the message names the flag."""


@dataclass(slots=True, frozen=True)
class ClaimsLocation:
    """Where the verified claims are in the request's dynamic metadata: a namespace, and the
    key of the payload inside it (None: the namespace's fields are the claims, as ext_authz
    writes them)."""

    namespace: str
    key: str | None = None

    @classmethod
    def parse(cls, value: str) -> ClaimsLocation:
        """``NAMESPACE[/KEY]``, e.g. ``envoy.filters.http.jwt_authn/jwt_payload``."""
        namespace, _, key = value.strip().partition("/")
        if not namespace:
            raise TenantConfigError(f"--tenant-claims-metadata {value!r}: expected NAMESPACE[/KEY]")
        return cls(namespace, key or None)


@dataclass(slots=True)
class TierNames:
    """The fair-share tier a fairness id belongs to, by name (exact ids first, then patterns in
    the order configured: the same precedence ``token-fair-share-policy`` gives weights)."""

    exact: dict[str, str] = field(default_factory=dict)
    patterns: list[tuple[str, str]] = field(default_factory=list)
    _cache: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_tiers(cls, tiers: Iterable[tuple[str, Iterable[str]]]) -> TierNames:
        """From (tier name, fairness ids or shell patterns) pairs."""
        out = cls()
        for name, ids in tiers:
            for fid in ids:
                if any(ch in fid for ch in "*?["):
                    out.patterns.append((fid, name))
                else:
                    out.exact.setdefault(fid, name)
        return out

    def name(self, fairness_id: str) -> str:
        found = self._cache.get(fairness_id)
        if found is None:
            found = self.exact.get(fairness_id)
            if found is None:
                found = next((n for p, n in self.patterns if fnmatch.fnmatchcase(fairness_id, p)), DEFAULT_TIER)
            if len(self._cache) > 100_000:  # bounded against fairness-id churn
                self._cache.clear()
            self._cache[fairness_id] = found
        return found


class Tenant(NamedTuple):
    """One request's tenant, tier (the usage label) and the fairness id flow control uses
    (a tuple: built once per request, a frozen dataclass costs several times more)."""

    tenant: str
    tier: str
    fairness_id: str


@dataclass(slots=True)
class TenantSource:
    """How the picker decides a request's tenant and tier (``epp serve --tenant-*`` flags).

    The default (nothing configured) is GIE's behaviour: the client's fairness header.
    """

    #: claim (in the verified payload) naming the tenant; nested claims with dots
    tenant_claim: str | None = None
    #: claim naming the tier (optional)
    tier_claim: str | None = None
    #: where the verified payload is in the dynamic metadata
    claims_at: ClaimsLocation | None = None
    #: a header the gateway sets from the verified token (lower case)
    tenant_header: str | None = None
    tier_header: str | None = None
    #: trust a client-sent fairness header; None: only when no verified source is configured
    trust_fairness_header: bool | None = None
    #: fair-share tier names, for the tier label when no verified tier is configured
    tiers: TierNames | None = None

    def __post_init__(self) -> None:
        if self.tenant_claim is not None and self.tenant_header is not None:
            raise TenantConfigError("--tenant-claim and --tenant-header are mutually exclusive")
        if self.tier_claim is not None and self.tier_header is not None:
            raise TenantConfigError("--tier-claim and --tier-header are mutually exclusive")
        if (self.tier_claim is not None or self.tier_header is not None) and not self.verified:
            raise TenantConfigError("a verified tier (--tier-claim / --tier-header) needs a verified tenant "
                                    "(--tenant-claim or --tenant-header)")
        if self.tenant_header is not None:
            self.tenant_header = self.tenant_header.lower()
        if self.tier_header is not None:
            self.tier_header = self.tier_header.lower()
        if (self.tenant_claim is not None or self.tier_claim is not None) and self.claims_at is None:
            self.claims_at = ClaimsLocation.parse(DEFAULT_CLAIMS_METADATA)
        if self.tenant_claim is None and self.tier_claim is None:
            self.claims_at = None  # nothing to read from the metadata: the handler skips it

    @property
    def verified(self) -> bool:
        """A tenant source the client cannot set is configured."""
        return self.tenant_claim is not None or self.tenant_header is not None

    @property
    def trusts_client_header(self) -> bool:
        return self.trust_fairness_header if self.trust_fairness_header is not None else not self.verified

    @property
    def strip_headers(self) -> tuple[str, ...]:
        """Request headers to remove before forwarding: an untrusted client fairness header."""
        return () if self.trusts_client_header else (FAIRNESS_HEADER,)

    def resolve(self, headers: Mapping[str, str], claims: Any = None) -> Tenant:
        """The request's tenant, tier and fairness id. ``claims``: the verified payload (a
        mapping, or a protobuf ``Struct`` straight from the ext_proc message), or None."""
        tenant: str | None = None
        if self.tenant_claim is not None:
            tenant = claim(claims, self.tenant_claim)
        elif self.tenant_header is not None:
            tenant = _text(headers.get(self.tenant_header))
        if tenant is None and self.trusts_client_header:
            tenant = headers.get(FAIRNESS_HEADER) or None
        if tenant is None:
            tenant = DEFAULT_FAIRNESS_ID
        tier: str | None = None
        if self.tier_claim is not None:
            tier = claim(claims, self.tier_claim)
        elif self.tier_header is not None:
            tier = _text(headers.get(self.tier_header))
        if tier is not None:
            return Tenant(tenant, tier, f"{tier}/{tenant}")
        return Tenant(tenant, self.tiers.name(tenant) if self.tiers is not None else DEFAULT_TIER, tenant)


def claim(claims: Any, name: str) -> str | None:
    """The claim ``name`` as text (None: absent, empty, or not a scalar). A key equal to the
    whole name wins (URL-style claim names such as ``https://example.com/tenant`` contain dots);
    otherwise dots walk into nested objects (``org.id``)."""
    value = _lookup(claims, name)
    return _text(value)


def _lookup(obj: Any, path: str) -> Any:
    if obj is None or not hasattr(obj, "keys"):  # a mapping or a protobuf Struct, nothing else
        return None
    try:
        if path in obj:
            return obj[path]  # Struct: only after `in` (indexing creates a missing key)
        head, dot, rest = path.partition(".")
        while dot:
            if head in obj:
                return _lookup(obj[head], rest)
            more, dot, rest = rest.partition(".")
            head = f"{head}.{more}"
    except (KeyError, TypeError, ValueError):  # Struct raises ValueError for an unset value
        return None
    return None


def _text(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        value = value.strip()
        return value or None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):  # JSON numbers arrive as doubles through a Struct
        return str(int(value)) if value.is_integer() else repr(value)
    return None
