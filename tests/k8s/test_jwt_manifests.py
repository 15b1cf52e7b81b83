"""The Envoy Gateway configuration for verified tenants fits together.

Envoy Gateway's CRD schemas are not available offline, so its objects are checked against a
strict schema of the fields these manifests use, written from Envoy Gateway's API types
(``api/v1alpha1``: SecurityPolicy ``jwt.providers[]``, ClientTrafficPolicy
``headers.earlyRequestHeaders``, EnvoyExtensionPolicy ``extProc[].metadata``): a misspelt field
fails here instead of being pruned by the API server. Then the pieces are checked against each
other and against the picker's flags.
"""

from __future__ import annotations

import argparse
from typing import Any

import jsonschema
import pytest

from epp.requestcontrol.tenants import JWT_NAMESPACE
from epp.runner import cli as serve_cli
from epp.runner.tenants import tenant_options
from tests.k8s.crdcheck import strict_json_schema
from tests.k8s.test_manifests import by_kind, check_picker, kustomize, needs_kubectl, one, validate_objects

_STR = {"type": "string"}
_STRS = {"type": "array", "items": _STR}
_TARGETS = {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["group", "kind", "name"],
                                                      "properties": {"group": _STR, "kind": _STR, "name": _STR}}}


def _kind(spec: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "properties": {
        "apiVersion": {"type": "string", "enum": ["gateway.envoyproxy.io/v1alpha1"]}, "kind": _STR,
        "metadata": {"type": "object"}, "spec": spec}}


SCHEMAS = {
    "SecurityPolicy": _kind({"type": "object", "required": ["targetRefs", "jwt"], "properties": {
        "targetRefs": _TARGETS,
        "jwt": {"type": "object", "required": ["providers"], "properties": {
            "optional": {"type": "boolean"},
            "providers": {"type": "array", "minItems": 1, "maxItems": 4, "items": {
                "type": "object", "required": ["name", "remoteJWKS"], "properties": {
                    "name": _STR, "issuer": _STR, "audiences": {**_STRS, "maxItems": 8},
                    "remoteJWKS": {"type": "object", "required": ["uri"], "properties": {"uri": _STR}},
                    "claimToHeaders": {"type": "array", "items": {
                        "type": "object", "required": ["header", "claim"],
                        "properties": {"header": _STR, "claim": _STR}}},
                    "recomputeRoute": {"type": "boolean"}}}}}}}}),
    "ClientTrafficPolicy": _kind({"type": "object", "required": ["targetRefs", "headers"], "properties": {
        "targetRefs": _TARGETS,
        "headers": {"type": "object", "properties": {"earlyRequestHeaders": {"type": "object", "properties": {
            "remove": _STRS, "set": {"type": "array"}, "add": {"type": "array"}}}}}}}),
    "EnvoyExtensionPolicy": _kind({"type": "object", "required": ["targetRefs", "extProc"], "properties": {
        "targetRefs": _TARGETS,
        "extProc": {"type": "array", "items": {"type": "object", "required": ["backendRefs"], "properties": {
            "backendRefs": {"type": "array", "items": {"type": "object", "properties": {
                "group": _STR, "kind": _STR, "name": _STR, "port": {"type": "integer"}}}},
            "processingMode": {"type": "object", "properties": {
                "allowModeOverride": {"type": "boolean"},
                "request": {"type": "object", "properties": {"body": _STR}},
                "response": {"type": "object", "properties": {"body": _STR}}}},
            "messageTimeout": _STR, "failOpen": {"type": "boolean"},
            "metadata": {"type": "object", "properties": {
                "accessibleNamespaces": _STRS, "writableNamespaces": {**_STRS, "maxItems": 8}}}}}}}}),
}
OVERLAYS = ["overlays/envoy-gateway-jwt", "overlays/envoy-gateway-patch-policy-jwt"]


def _check_eg_shapes(objs: list[dict[str, Any]]) -> None:
    for obj in objs:
        schema = SCHEMAS.get(obj["kind"])
        if schema is not None and obj["apiVersion"].startswith("gateway.envoyproxy.io/"):
            try:
                jsonschema.validate(obj, strict_json_schema(schema))
            except jsonschema.ValidationError as exc:
                raise AssertionError(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message} "
                                     f"at {list(exc.absolute_path)}") from None


def _picker_args(objs: list[dict[str, Any]]) -> argparse.Namespace:
    args = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    p = argparse.ArgumentParser()
    serve_cli.add_arguments(p)
    return p.parse_args(args[1:])


def _targets(obj: dict[str, Any], objs: list[dict[str, Any]]) -> None:
    """Every targetRef names an object of these manifests."""
    present = {(o["kind"], o["metadata"]["name"]) for o in objs}
    for ref in obj["spec"]["targetRefs"]:
        assert ref["group"] == "gateway.networking.k8s.io"
        assert (ref["kind"], ref["name"]) in present, f"{obj['kind']} targets a missing {ref}"


def _provider(objs: list[dict[str, Any]]) -> dict[str, Any]:
    sp = one(objs, "SecurityPolicy")
    _targets(sp, objs)
    assert one(objs, "HTTPRoute")["metadata"]["name"] in {r["name"] for r in sp["spec"]["targetRefs"]}
    (provider,) = sp["spec"]["jwt"]["providers"]
    assert not sp["spec"]["jwt"].get("optional"), "a request without a token must get the gateway's 401"
    assert provider["remoteJWKS"]["uri"].startswith("https://")
    assert provider["issuer"] and provider["audiences"]
    return dict(provider)


@needs_kubectl
@pytest.mark.parametrize("rel", OVERLAYS)
def test_overlay_renders_valid_objects(rel: str) -> None:
    objs = kustomize(rel)
    validate_objects(objs, rel)
    check_picker(objs)
    _check_eg_shapes(objs)


@needs_kubectl
def test_header_path_copies_claims_into_headers_the_gateway_strips_first() -> None:
    objs = kustomize("overlays/envoy-gateway-jwt")
    provider = _provider(objs)
    claim_headers = {c["claim"]: c["header"] for c in provider["claimToHeaders"]}
    ctp = one(objs, "ClientTrafficPolicy")
    _targets(ctp, objs)
    assert [r["kind"] for r in ctp["spec"]["targetRefs"]] == ["Gateway"]  # every listener, before routing
    removed = set(ctp["spec"]["headers"]["earlyRequestHeaders"]["remove"])
    args = _picker_args(objs)
    # the picker reads exactly the headers the JWT fills, and those are removed from client requests
    assert (args.tenant_header, args.tier_header) == (claim_headers["tenant"], claim_headers["tier"])
    assert {args.tenant_header, args.tier_header} <= removed
    src = tenant_options(args)["tenants"]
    assert src.verified and not src.trusts_client_header


@needs_kubectl
def test_metadata_path_forwards_the_jwt_namespace_the_picker_reads() -> None:
    objs = kustomize("overlays/envoy-gateway-patch-policy-jwt")
    provider = _provider(objs)
    ext = one(objs, "EnvoyExtensionPolicy")
    (proc,) = ext["spec"]["extProc"]
    assert JWT_NAMESPACE in proc["metadata"]["accessibleNamespaces"]
    assert not by_kind(objs, "ClientTrafficPolicy")
    src = tenant_options(_picker_args(objs))["tenants"]
    # Envoy Gateway's jwt_authn writes the payload under the provider's name
    assert src.claims_at is not None
    assert (src.claims_at.namespace, src.claims_at.key) == (JWT_NAMESPACE, provider["name"])
    assert (src.tenant_claim, src.tier_claim) == ("tenant", "tier")
    assert src.resolve({"x-gateway-inference-fairness-id": "forged"},
                       {"tenant": "acme", "tier": "gold"}).fairness_id == "gold/acme"


def test_the_shape_check_rejects_a_misspelt_field() -> None:
    bad = {"apiVersion": "gateway.envoyproxy.io/v1alpha1", "kind": "SecurityPolicy", "metadata": {"name": "x"},
           "spec": {"targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "r"}],
                    "jwt": {"providers": [{"name": "p", "remoteJWKS": {"uri": "https://x"},
                                           "claimsToHeaders": []}]}}}
    with pytest.raises(AssertionError, match="claimsToHeaders"):
        _check_eg_shapes([bad])
