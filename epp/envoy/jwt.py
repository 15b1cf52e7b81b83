"""The JWT part of a generated Envoy config: verified tenants for the picker.

``jwt_authn`` runs before ext_proc on every route: a request without a valid token gets
Envoy's 401 and never reaches the picker. The verified payload goes into dynamic metadata
(``payload_in_metadata``), which ext_proc forwards to the picker (``forwarding_namespaces``);
the picker reads its tenant / tier claims there (``epp serve --tenant-claim``). Clients cannot
write dynamic metadata, so a forged fairness header changes nothing.

``claim_headers`` also copies claims into request headers (``claim_to_headers``), for pickers
configured with ``--tenant-header`` (what Envoy Gateway's ``claimToHeaders`` gives); a
``header_mutation`` filter first removes client-sent copies of those headers, so a token
without the claim cannot let a client's own value through.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from envoy_data_plane.envoy.config.common.mutation_rules import v3 as mutation_rules
from envoy_data_plane.envoy.config.core import v3 as core
from envoy_data_plane.envoy.config.route import v3 as route
from envoy_data_plane.envoy.extensions.filters.http.header_mutation import v3 as header_mutation
from envoy_data_plane.envoy.extensions.filters.http.jwt_authn import v3 as jwt_authn
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager import v3 as hcm
from envoy_data_plane.google.protobuf import Any as PbAny

#: dynamic metadata namespace jwt_authn writes (and ext_proc must forward)
JWT_NAMESPACE = "envoy.filters.http.jwt_authn"
#: key of the verified payload in that namespace (the picker's default --tenant-claims-metadata)
PAYLOAD_KEY = "jwt_payload"


@dataclass(slots=True)
class JwtSpec:
    """A JWT provider every request must satisfy. One of ``jwks_file`` / ``jwks_inline``."""

    issuer: str
    audiences: list[str] = field(default_factory=list)
    #: a JWKS document on Envoy's file system (Envoy reads it at start)
    jwks_file: str | None = None
    #: a JWKS document inline in the config
    jwks_inline: str | None = None
    #: claim → request header (claim_to_headers), for a picker reading --tenant-header
    claim_headers: dict[str, str] = field(default_factory=dict)
    provider: str = "tenants"

    def __post_init__(self) -> None:
        if (self.jwks_file is None) == (self.jwks_inline is None):
            raise ValueError("JWT: give exactly one of a JWKS file or an inline JWKS")
        if not self.issuer:
            raise ValueError("JWT: the issuer is required")


def jwt_filters(spec: JwtSpec) -> list[hcm.HttpFilter]:
    """The HTTP filters to put before ext_proc: strip client copies of the claim headers, then
    verify the token (401 without a valid one)."""
    filters: list[hcm.HttpFilter] = []
    if spec.claim_headers:
        strip = header_mutation.HeaderMutation(mutations=header_mutation.Mutations(request_mutations=[
            mutation_rules.HeaderMutation(remove=h.lower()) for h in spec.claim_headers.values()
        ]))
        filters.append(hcm.HttpFilter(name="envoy.filters.http.header_mutation", typed_config=PbAny.pack(strip)))
    if spec.jwks_file is not None:
        jwks = core.DataSource(filename=spec.jwks_file)
    else:
        jwks = core.DataSource(inline_string=spec.jwks_inline)
    provider = jwt_authn.JwtProvider(
        issuer=spec.issuer,
        audiences=list(spec.audiences),
        local_jwks=jwks,
        payload_in_metadata=PAYLOAD_KEY,
        claim_to_headers=[jwt_authn.JwtClaimToHeader(header_name=h.lower(), claim_name=c)
                          for c, h in spec.claim_headers.items()],
    )
    cfg = jwt_authn.JwtAuthentication(
        providers={spec.provider: provider},
        rules=[jwt_authn.RequirementRule(
            match=route.RouteMatch(prefix="/"), requires=jwt_authn.JwtRequirement(provider_name=spec.provider),
        )],
    )
    filters.append(hcm.HttpFilter(name="envoy.filters.http.jwt_authn", typed_config=PbAny.pack(cfg)))
    return filters
