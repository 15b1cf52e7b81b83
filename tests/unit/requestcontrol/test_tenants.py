"""Whose request is it: a verified tenant cannot be overridden by what the client sends."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2

from epp.datalayer.datastore import Datastore
from epp.framework.datalayer import Endpoint
from epp.framework.scheduling import LLMRequest, ProfileRunResult, SchedulingResult
from epp.handlers.extproc import ExtProcServicer
from epp.plugins.flowcontrol.token_fair_share_policy import TierSpec, TokenFairShareParams, TokenFairSharePolicy
from epp.requestcontrol.director import Director
from epp.requestcontrol.tenants import (
    DEFAULT_FAIRNESS_ID,
    FAIRNESS_HEADER,
    JWT_NAMESPACE,
    ClaimsLocation,
    TenantConfigError,
    TenantSource,
    TierNames,
    claim,
)

FORGED = {FAIRNESS_HEADER: "victim"}


def _struct(doc: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(doc)
    return s


@pytest.mark.parametrize("wrap", [dict, _struct], ids=["dict", "protobuf-struct"])
def test_the_verified_claim_wins_over_a_forged_fairness_header(wrap: Any) -> None:
    src = TenantSource(tenant_claim="tenant")
    t = src.resolve(FORGED, wrap({"tenant": "acme", "sub": "u1"}))
    assert (t.tenant, t.fairness_id) == ("acme", "acme")
    # the client's header is not a fallback either: a token without the claim is default-flow
    assert src.resolve(FORGED, wrap({"sub": "u1"})).tenant == DEFAULT_FAIRNESS_ID
    assert src.resolve(FORGED, None).tenant == DEFAULT_FAIRNESS_ID
    assert src.strip_headers == (FAIRNESS_HEADER,)


def test_gie_default_trusts_the_client_header_and_strips_nothing() -> None:
    src = TenantSource()
    assert src.resolve(FORGED).tenant == "victim"
    assert src.resolve({}).tenant == DEFAULT_FAIRNESS_ID
    assert src.strip_headers == ()


def test_trust_modes() -> None:
    # explicit trust: the client's header is the fallback when no verified tenant came
    fallback = TenantSource(tenant_claim="tenant", trust_fairness_header=True)
    assert fallback.resolve(FORGED, {"tenant": "acme"}).tenant == "acme"
    assert fallback.resolve(FORGED, {}).tenant == "victim"
    assert fallback.strip_headers == ()
    # no verified source and no trust: every request is default-flow, the header is stripped
    closed = TenantSource(trust_fairness_header=False)
    assert closed.resolve(FORGED).tenant == DEFAULT_FAIRNESS_ID
    assert closed.strip_headers == (FAIRNESS_HEADER,)


@pytest.mark.parametrize("wrap", [dict, _struct], ids=["dict", "protobuf-struct"])
def test_a_verified_tier_prefixes_the_fairness_id_so_tier_patterns_match(wrap: Any) -> None:
    src = TenantSource(tenant_claim="tenant", tier_claim="plan.tier")
    t = src.resolve({FAIRNESS_HEADER: "platinum/acme"}, wrap({"tenant": "acme", "plan": {"tier": "gold"}}))
    assert (t.tenant, t.tier, t.fairness_id) == ("acme", "gold", "gold/acme")
    policy = TokenFairSharePolicy("fair", TokenFairShareParams(tiers=(
        TierSpec(name="gold", weight=4.0, fairness_ids=("gold/*",)),
        TierSpec(name="basic", weight=1.0, fairness_ids=("basic/*",)),
    )))
    assert policy.weight(t.fairness_id) == 4.0
    basic = src.resolve({}, wrap({"tenant": "acme", "plan": {"tier": "basic"}}))
    assert policy.weight(basic.fairness_id) == 1.0


def test_header_source_reads_the_gateway_set_headers() -> None:
    src = TenantSource(tenant_header="X-EPP-Tenant", tier_header="x-epp-tier")
    t = src.resolve({"x-epp-tenant": "acme", "x-epp-tier": "gold", **FORGED})
    assert (t.tenant, t.tier, t.fairness_id) == ("acme", "gold", "gold/acme")
    assert src.resolve(FORGED).tenant == DEFAULT_FAIRNESS_ID
    assert src.claims_at is None  # nothing read from the metadata


def test_unverified_tier_label_comes_from_the_fair_share_tiers() -> None:
    names = TierNames.from_tiers([("gold", ["city-*"]), ("basic", ["dept-a", "city-x"])])
    src = TenantSource(tiers=names)
    assert src.resolve({FAIRNESS_HEADER: "city-berlin"}).tier == "gold"
    assert src.resolve({FAIRNESS_HEADER: "city-x"}).tier == "basic"  # exact ids before patterns
    assert src.resolve({FAIRNESS_HEADER: "someone"}).tier == "default"


def test_claim_lookup_url_names_nesting_and_types() -> None:
    payload = _struct({"https://example.com/tenant": "acme", "org": {"id": 42, "x.y": "dotted"},
                       "n": 7.5, "flag": True, "list": ["a"], "empty": "  "})
    assert claim(payload, "https://example.com/tenant") == "acme"
    assert claim(payload, "org.id") == "42"  # JSON numbers arrive as doubles: printed as integers
    assert claim(payload, "org.x.y") == "dotted"
    assert claim(payload, "n") == "7.5"
    assert claim(payload, "flag") == "true"
    for absent in ("list", "empty", "missing", "org.missing", "n.deeper", "org"):
        assert claim(payload, absent) is None, absent
    assert "missing" not in payload  # looking a claim up never adds it to the request's metadata


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"tenant_claim": "t", "tenant_header": "h"}, "mutually exclusive"),
        ({"tier_claim": "tier"}, "needs a verified tenant"),
        ({"tenant_claim": "t", "tier_claim": "a", "tier_header": "b"}, "mutually exclusive"),
    ],
)
def test_contradicting_settings_name_the_flags(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(TenantConfigError, match=needle):
        TenantSource(**kwargs)


def test_claims_location_parse() -> None:
    assert ClaimsLocation.parse(f"{JWT_NAMESPACE}/my-provider") == ClaimsLocation(JWT_NAMESPACE, "my-provider")
    assert ClaimsLocation.parse("envoy.filters.http.ext_authz") == ClaimsLocation("envoy.filters.http.ext_authz")
    with pytest.raises(TenantConfigError, match="NAMESPACE"):
        ClaimsLocation.parse("/key")


# ------------------------------------------------ through the ext_proc handler and director


class _First:
    def schedule(self, request: LLMRequest, candidates: Sequence[Endpoint]) -> SchedulingResult:
        return SchedulingResult({"default": ProfileRunResult([candidates[0]])}, "default")


class _Seen(_First):
    def __init__(self) -> None:
        self.fairness: list[str] = []

    def schedule(self, request: LLMRequest, candidates: Sequence[Endpoint]) -> SchedulingResult:
        self.fairness.append(request.fairness_id)
        return super().schedule(request, candidates)


def _headers_msg(headers: dict[str, str], payload: dict[str, Any] | None, eos: bool = False) -> pb.ProcessingRequest:
    from envoy.config.core.v3 import base_pb2

    msg = pb.ProcessingRequest(request_headers=pb.HttpHeaders(
        headers=base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode())
                                            for k, v in headers.items()]),
        end_of_stream=eos))
    if payload is not None:
        msg.metadata_context.filter_metadata[JWT_NAMESPACE].fields["jwt_payload"].struct_value.update(payload)
    return msg


async def _run(servicer: ExtProcServicer, msgs: list[pb.ProcessingRequest]) -> list[pb.ProcessingResponse]:
    async def it() -> Any:
        for m in msgs:
            yield m

    return [r async for r in servicer.Process(it(), None)]


async def test_handler_passes_jwt_metadata_and_strips_the_forged_header() -> None:
    ds = Datastore()
    ds.replace_endpoints([Endpoint("a", "10.0.0.1", 8000)])
    seen = _Seen()
    d = Director(datastore=ds, scheduler=seen, tenants=TenantSource(tenant_claim="tenant", tier_claim="tier"))
    servicer = ExtProcServicer(d)
    body = orjson.dumps({"model": "m", "prompt": "hi"})
    headers = {":path": "/v1/completions", ":method": "POST", **FORGED}
    out = await _run(servicer, [
        _headers_msg(headers, {"tenant": "acme", "tier": "gold"}),
        pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True)),
    ])
    assert seen.fairness == ["gold/acme"]
    mutation = out[0].request_headers.response.header_mutation
    assert FAIRNESS_HEADER in mutation.remove_headers
    # a body-less request (GET /v1/models) loses the forged header too
    out = await _run(servicer, [_headers_msg({":path": "/v1/models", ":method": "GET", **FORGED}, None, eos=True)])
    assert FAIRNESS_HEADER in out[0].request_headers.response.header_mutation.remove_headers


async def test_without_a_verified_source_the_handler_forwards_the_header() -> None:
    ds = Datastore()
    ds.replace_endpoints([Endpoint("a", "10.0.0.1", 8000)])
    seen = _Seen()
    servicer = ExtProcServicer(Director(datastore=ds, scheduler=seen))
    out = await _run(servicer, [
        _headers_msg({":path": "/v1/completions", ":method": "POST", **FORGED}, {"tenant": "ignored"}),
        pb.ProcessingRequest(request_body=pb.HttpBody(body=b'{"model":"m","prompt":"x"}', end_of_stream=True)),
    ])
    assert seen.fairness == ["victim"]
    assert FAIRNESS_HEADER not in out[0].request_headers.response.header_mutation.remove_headers


async def test_a_local_reply_for_a_request_the_picker_never_saw_passes_through() -> None:
    """jwt_authn answers 401 before ext_proc saw the request; Envoy still sends that reply
    through ext_proc, as the first message of a new stream."""
    from envoy.config.core.v3 import base_pb2

    ds = Datastore()
    ds.replace_endpoints([Endpoint("a", "10.0.0.1", 8000)])
    servicer = ExtProcServicer(Director(datastore=ds, scheduler=_First()))
    reply = pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=":status", raw_value=b"401"),
        base_pb2.HeaderValue(key="content-type", raw_value=b"text/plain")])))
    out = await _run(servicer, [reply, pb.ProcessingRequest(
        response_body=pb.HttpBody(body=b"Jwt is missing", end_of_stream=True))])
    assert [r.WhichOneof("response") for r in out] == ["response_headers", "response_body"]
    chunk = out[1].response_body.response.body_mutation.streamed_response
    assert (chunk.body, chunk.end_of_stream) == (b"Jwt is missing", True)
