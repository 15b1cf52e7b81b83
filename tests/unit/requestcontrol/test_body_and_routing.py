"""Request parsing, model rewrite precedence, priorities and subset hints."""

from __future__ import annotations

import random

import orjson
import pytest

from epp.datalayer.datastore import Datastore, Objective, RewriteRule, RewriteTarget
from epp.framework.datalayer import Endpoint
from epp.framework.errors import RequestError
from epp.plugins.requestcontrol.openai_parser import api_kind, parse_body
from epp.requestcontrol.candidates import subset_candidates
from epp.requestcontrol.objectives import resolve_priority
from epp.requestcontrol.rewrite import resolve_target_model


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("/v1/chat/completions", "chat/completions"),
        ("/v1/completions?x=1", "completions"),
        ("/openai/v1/responses", "responses"),
        ("/v1/embeddings", "embeddings"),
        ("/v1/models", "other"),
    ],
)
def test_api_kind_from_path_suffix(path: str, kind: str) -> None:
    assert api_kind(path) == kind


def test_chat_prefix_text_is_messages_json_so_system_prompt_leads() -> None:
    msgs = [{"role": "system", "content": "S" * 100}, {"role": "user", "content": "q"}]
    parsed = parse_body(orjson.dumps({"model": "m", "messages": msgs, "stream": True}), "/v1/chat/completions")
    assert parsed.prefix_text == orjson.dumps(msgs)
    assert parsed.stream is True
    assert parsed.model == "m"


def test_completions_prefix_is_prompt_and_max_tokens_read() -> None:
    parsed = parse_body(b'{"model":"m","prompt":"hello world","max_tokens":7}', "/v1/completions")
    assert parsed.prefix_text == b"hello world"
    assert parsed.max_tokens == 7


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1,2]", "JSON object"),
        (b'{"prompt":"x"}', "model not found"),
        (b'{"model":""}', "model not found"),
        (b'{"model":"m","max_tokens":"lots"}', "max_tokens"),
    ],
)
def test_bad_bodies_are_400_with_a_message(raw: bytes, needle: str) -> None:
    with pytest.raises(RequestError) as ei:
        parse_body(raw, "/v1/completions")
    assert ei.value.status == 400
    body = orjson.loads(ei.value.body())
    assert needle in body["error"]["message"]
    assert body["error"]["code"] == 400


def _rule(source: str, matches: tuple[str, ...], *targets: tuple[str, int]) -> RewriteRule:
    return RewriteRule(source, matches, tuple(RewriteTarget(m, w) for m, w in targets))


def test_header_rewrite_applies_before_rules() -> None:
    rules = (_rule("r", ("canary",), ("canary-v2", 1)),)
    target, rule = resolve_target_model("base", "canary", rules, random.Random(1))
    assert (target, rule.source if rule else None) == ("canary-v2", "r")


def test_first_matching_rule_wins_and_generic_matches_all() -> None:
    rules = (_rule("exact", ("a",), ("a-new", 1)), _rule("generic", (), ("fallback", 1)))
    assert resolve_target_model("a", None, rules, random.Random(1))[0] == "a-new"
    assert resolve_target_model("b", None, rules, random.Random(1))[0] == "fallback"
    assert resolve_target_model("b", None, (), random.Random(1)) == ("b", None)


def test_weighted_split_follows_weights() -> None:
    rules = (_rule("split", ("m",), ("x", 3), ("y", 1)),)
    rng = random.Random(7)
    picks = [resolve_target_model("m", None, rules, rng)[0] for _ in range(4000)]
    share = picks.count("x") / len(picks)
    assert 0.70 < share < 0.80


def test_zero_weights_split_uniformly() -> None:
    rules = (_rule("split", ("m",), ("x", 0), ("y", 0)),)
    rng = random.Random(3)
    picks = [resolve_target_model("m", None, rules, rng)[0] for _ in range(2000)]
    assert 0.4 < picks.count("x") / len(picks) < 0.6


def test_priority_from_objective_header_then_legacy_model_then_zero() -> None:
    ds = Datastore()
    ds.objectives["premium"] = Objective("premium", 10)
    ds.model_objectives["batch-model"] = Objective("batch-model", -1)
    assert resolve_priority(ds, "premium", "any") == 10
    assert resolve_priority(ds, "unknown", "any") == 0
    assert resolve_priority(ds, None, "batch-model") == -1
    assert resolve_priority(ds, "premium", "batch-model") == 10


def _pool() -> Datastore:
    ds = Datastore()
    ds.replace_endpoints([
        Endpoint("a-0", "10.0.0.1", 8000), Endpoint("a-1", "10.0.0.1", 8002),
        Endpoint("b-0", "10.0.0.2", 8000), Endpoint("v6", "fd00::1", 8000),
    ])
    return ds


def test_subset_hint_list_and_comma_string_ip_and_ip_port() -> None:
    ds = _pool()
    keys = lambda eps: sorted(e.key for e in eps)  # noqa: E731
    assert keys(subset_candidates(ds, ["10.0.0.1"])) == ["10.0.0.1:8000", "10.0.0.1:8002"]
    assert keys(subset_candidates(ds, "10.0.0.1:8002, 10.0.0.2")) == ["10.0.0.1:8002", "10.0.0.2:8000"]
    assert keys(subset_candidates(ds, ["[fd00::1]:8000"])) == ["[fd00::1]:8000"]
    assert subset_candidates(ds, ["10.9.9.9", "garbage:xx"]) == []
    assert subset_candidates(ds, []) == []
