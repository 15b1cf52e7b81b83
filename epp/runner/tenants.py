"""``epp serve``'s tenant and usage flags, and the glue that builds the tenant source.

Default: GIE's behaviour (the client's ``x-gateway-inference-fairness-id`` names the tenant).
With ``--tenant-claim`` or ``--tenant-header`` the tenant comes from what the gateway verified
and the client's header is ignored and stripped (docs/flow-control.md, "Tenants and usage").
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from typing import Any

from epp.config.loader import ConfigError
from epp.framework.plugin import Plugin
from epp.plugins.flowcontrol.token_fair_share_policy import TokenFairSharePolicy
from epp.requestcontrol.tenants import (
    DEFAULT_CLAIMS_METADATA,
    ClaimsLocation,
    TenantConfigError,
    TenantSource,
    TierNames,
)


def add_tenant_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("tenants and usage (docs/flow-control.md)")
    g.add_argument("--tenant-claim", metavar="CLAIM",
                   help="take the tenant from this claim of the JWT the gateway verified: Envoy's jwt_authn "
                        "with payload_in_metadata, its namespace forwarded to ext_proc "
                        "(metadata_options.forwarding_namespaces); clients cannot forge it. Nested claims with "
                        "dots (org.id)")
    g.add_argument("--tier-claim", metavar="CLAIM",
                   help="take the tier from this verified claim: the fairness id becomes <tier>/<tenant>, so "
                        "token-fair-share tiers match it with fairnessIds such as gold/*; it is also the tier "
                        "label of the usage series")
    g.add_argument("--tenant-claims-metadata", metavar="NAMESPACE[/KEY]", default=DEFAULT_CLAIMS_METADATA,
                   help="where the verified claims are in the dynamic metadata: epp envoy-config's jwt_authn "
                        "writes envoy.filters.http.jwt_authn/jwt_payload (the default); Envoy Gateway uses "
                        "the SecurityPolicy provider's name as KEY; ext_authz results: "
                        "envoy.filters.http.ext_authz")
    g.add_argument("--tenant-header", metavar="NAME",
                   help="take the tenant from this header, set by the gateway from the verified token (Envoy "
                        "Gateway SecurityPolicy claimToHeaders). The gateway must remove a client-sent copy "
                        "before authentication (ClientTrafficPolicy headers.earlyRequestHeaders.remove)")
    g.add_argument("--tier-header", metavar="NAME", help="take the tier from this gateway-set header")
    g.add_argument("--trust-fairness-header", choices=("auto", "true", "false"), default="auto",
                   help="use a client-sent x-gateway-inference-fairness-id as the tenant. auto (default): only "
                        "when no verified source (--tenant-claim / --tenant-header) is configured (GIE "
                        "behaviour); otherwise it is ignored and stripped before forwarding. true: the "
                        "fallback when a request carries no verified tenant")
    g.add_argument("--usage-max-tenants", type=int, default=100,
                   help="per-tenant usage series (epp_tenant_*): the first N tenants get their own label "
                        "values, later ones are counted as 'other' (bounded cardinality)")


def tenant_options(args: argparse.Namespace) -> dict[str, Any]:
    """``ServeOptions`` fields from the flags; ConfigError naming the flag."""
    trust = {"auto": None, "true": True, "false": False}[getattr(args, "trust_fairness_header", "auto")]
    max_tenants = getattr(args, "usage_max_tenants", 100)
    if max_tenants < 0:
        raise ConfigError(f"--usage-max-tenants must be >= 0, got {max_tenants}")
    try:
        claims_at = ClaimsLocation.parse(getattr(args, "tenant_claims_metadata", DEFAULT_CLAIMS_METADATA))
        source = TenantSource(
            tenant_claim=_name(args, "tenant_claim"), tier_claim=_name(args, "tier_claim"), claims_at=claims_at,
            tenant_header=_name(args, "tenant_header"), tier_header=_name(args, "tier_header"),
            trust_fairness_header=trust,
        )
    except TenantConfigError as exc:
        raise ConfigError(str(exc)) from None
    return {"tenants": source, "usage_max_tenants": max_tenants}


def _name(args: argparse.Namespace, attr: str) -> str | None:
    value = getattr(args, attr, None)
    if value is None:
        return None
    value = value.strip()
    if not value:
        raise ConfigError(f"--{attr.replace('_', '-')}: empty name")
    return str(value)


def tier_names(plugins: Iterable[Plugin]) -> TierNames | None:
    """The tier names of the configured ``token-fair-share-policy`` plugins (the usage series'
    tier label when no verified tier is configured); None when no tier is configured."""
    tiers = [(t.name, t.fairness_ids) for p in plugins if isinstance(p, TokenFairSharePolicy)
             for t in p.params.tiers]
    return TierNames.from_tiers(tiers) if tiers else None
