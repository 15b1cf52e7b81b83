"""P/D scheduling: role filters, deciders and the disagg profile handler, through the real
config loader and scheduler (what `epp serve --config-file pd-config.yaml` builds)."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import generate_latest

from epp.config.loader import ConfigError, build_scheduling, load_config
from epp.datalayer.datastore import Datastore
from epp.framework.datalayer import ROLE_LABEL, Endpoint
from epp.framework.plugin import PluginContext
from epp.framework.scheduling import LLMRequest, SchedulingError, SchedulingResult
from epp.local.pd import pd_picker_config
from epp.metrics import EppMetrics
from epp.plugins.scheduling.decode_filter import DecodeFilter
from epp.plugins.scheduling.disagg_profile_handler import PREFILLER_HEADER
from epp.plugins.scheduling.prefill_filter import PrefillFilter

ROOT = Path(__file__).resolve().parents[2]


def _ep(i: int, role: str | None) -> Endpoint:
    return Endpoint(name=f"pod-{i}", address=f"10.0.0.{i}", port=8000,
                    labels={ROLE_LABEL: role} if role else {})


def _req(text: str, rid: str = "r") -> LLMRequest:
    raw = text.encode()
    return LLMRequest(request_id=rid, target_model="m", incoming_model="m", body={"prompt": text},
                      prefix_text=raw, estimated_prompt_tokens=max(1, len(raw) // 4))


class PD:
    """A scheduler built from a config, plus the pre-request hooks the director would run."""

    def __init__(self, config: str, endpoints: list[Endpoint]) -> None:
        self.metrics = EppMetrics()
        self.ds = Datastore()
        self.ds.replace_endpoints(endpoints)
        self.bundle = build_scheduling(load_config(config), PluginContext(self.ds, self.metrics))

    def schedule(self, req: LLMRequest) -> SchedulingResult:
        result = self.bundle.scheduler.schedule(req, self.ds.endpoints())
        for hook in self.bundle.pre_request:
            hook.pre_request(req, result)
        return result

    def metric(self, name: str, **labels: str) -> float:
        total = 0.0
        for fam in self.metrics.registry.collect():
            for s in fam.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total


LONG = "The quarterly report covers revenue, costs, staffing and the outlook. " * 60  # ~1050 tokens
SHORT = "What time is it?"


# ---- filters ----
def test_role_filters_follow_llm_d_semantics() -> None:
    eps = [_ep(1, "prefill"), _ep(2, "decode"), _ep(3, "prefill-decode"), _ep(4, None), _ep(5, "both"),
           _ep(6, "encode")]
    r = _req("x")
    assert [e.name for e in DecodeFilter("d").filter(r, eps)] == ["pod-2", "pod-3", "pod-4", "pod-5"]
    assert [e.name for e in PrefillFilter("p").filter(r, eps)] == ["pod-1", "pod-3", "pod-5"]


# ---- the whole cycle ----
def test_long_uncached_prompt_is_disaggregated_and_learned_on_both_pods() -> None:
    pd = PD(pd_picker_config(256, 512), [_ep(1, "prefill"), _ep(2, "decode")])
    res = pd.schedule(_req(LONG))
    assert res.primary_profile_name == "decode"
    assert res.targets[0].name == "pod-2"  # the request goes to the decode pod
    assert res.headers == {PREFILLER_HEADER: "10.0.0.1:8000"}
    assert PREFILLER_HEADER not in res.remove_headers  # set (overwrite) replaces a client value
    assert pd.metric("epp_pd_decisions_total", decision="disaggregated", reason="uncached-prompt") == 1
    assert pd.metric("epp_pd_prefill_endpoint_total", endpoint="10.0.0.1:8000") == 1
    # The same prompt again: the decode pod now holds it → no prefill leg.
    again = pd.schedule(_req(LONG, "r2"))
    assert again.headers == {} and PREFILLER_HEADER in again.remove_headers
    assert pd.metric("epp_pd_decisions_total", decision="aggregated", reason="cached-on-decode") == 1
    # ... and the prefill pod holds it too (a prefill-decode pod would be scored with it).
    index = next(p for p in pd.bundle.plugins.values() if type(p).__name__ == "PrefixCacheScorer").index  # type: ignore[attr-defined]
    assert set(index.endpoints()) == {"10.0.0.1:8000", "10.0.0.2:8000"}


def test_shared_prefix_with_a_long_new_tail_is_disaggregated_again() -> None:
    pd = PD(pd_picker_config(256, 512), [_ep(1, "prefill"), _ep(2, "decode")])
    pd.schedule(_req(LONG))
    tail = " Now a brand new long question follows here with lots of new detail." * 30  # ~500 tokens
    res = pd.schedule(_req(LONG + tail, "r2"))
    assert PREFILLER_HEADER in res.headers


@pytest.mark.parametrize(("non_cached", "prompt_tokens", "text", "reason"), [
    (256, 512, SHORT, "short-prompt"),
    (256, 2000, LONG, "short-prompt"),  # promptTokens gate
    (0, 0, LONG, "threshold-disabled"),  # nonCachedTokens 0 = never (llm-d)
])
def test_short_prompts_and_disabled_threshold_are_not_disaggregated(
        non_cached: int, prompt_tokens: int, text: str, reason: str) -> None:
    pd = PD(pd_picker_config(non_cached, prompt_tokens), [_ep(1, "prefill"), _ep(2, "decode")])
    res = pd.schedule(_req(text))
    assert res.headers == {} and res.remove_headers == [PREFILLER_HEADER]
    assert res.targets[0].name == "pod-2"
    assert pd.metric("epp_pd_decisions_total", decision="aggregated", reason=reason) == 1


def test_no_prefill_pod_serves_aggregated_on_the_decode_pod() -> None:
    pd = PD(pd_picker_config(always=True), [_ep(2, "decode"), _ep(3, None)])
    res = pd.schedule(_req(LONG))
    assert res.headers == {} and res.targets[0].name in {"pod-2", "pod-3"}
    assert pd.metric("epp_pd_decisions_total", decision="aggregated", reason="no-prefill-endpoint") == 1


def test_a_prefill_decode_pod_chosen_for_both_legs_is_not_sent_a_prefill_leg() -> None:
    pd = PD(pd_picker_config(always=True), [_ep(3, "prefill-decode")])
    res = pd.schedule(_req(LONG))
    assert res.headers == {} and res.targets[0].name == "pod-3"
    assert pd.metric("epp_pd_decisions_total", reason="prefill-is-decode-endpoint") == 1


def test_no_decode_pod_fails_the_request() -> None:
    pd = PD(pd_picker_config(always=True), [_ep(1, "prefill")])
    with pytest.raises(SchedulingError):
        pd.schedule(_req(LONG))


def test_decider_declared_after_the_handler_and_legacy_flat_parameters() -> None:
    config = """
plugins:
- {type: disagg-profile-handler, parameters: {decodeProfile: d, prefillProfile: p, deciderPluginName: dec}}
- {type: prefill-filter}
- {type: decode-filter}
- {type: always-disagg-pd-decider, name: dec}
schedulingProfiles:
- {name: d, plugins: [{pluginRef: decode-filter}]}
- {name: p, plugins: [{pluginRef: prefill-filter}]}
"""
    pd = PD(config, [_ep(1, "prefill"), _ep(2, "decode")])
    assert pd.schedule(_req(SHORT)).headers == {PREFILLER_HEADER: "10.0.0.1:8000"}


def test_unknown_decider_name_fails_at_start_naming_it() -> None:
    config = pd_picker_config(always=True).replace("deciders: {prefill: decider}", "deciders: {prefill: nope}")
    with pytest.raises(ConfigError, match=r"deciders.prefill 'nope' is not a configured P/D decider plugin "
                                          r"\(deciders: decider\)"):
        PD(config, [_ep(1, "prefill"), _ep(2, "decode")])


@pytest.mark.parametrize(("params", "needle"), [
    ("{profiles: {decode: x}, decodeProfile: y}", "not both"),
    ("{profiles: {decode: same, prefill: same}}", "must differ"),
    ("{deciders: {prefil: x}}", "prefil"),
])
def test_bad_handler_parameters_fail_at_start(params: str, needle: str) -> None:
    config = f"""
plugins:
- {{type: disagg-profile-handler, parameters: {params}}}
- {{type: decode-filter}}
schedulingProfiles:
- {{name: decode, plugins: [{{pluginRef: decode-filter}}]}}
- {{name: prefill, plugins: [{{pluginRef: decode-filter}}]}}
"""
    with pytest.raises(ConfigError, match=needle):
        build_scheduling(load_config(config), PluginContext(Datastore()))


def test_shipped_pd_config_loads_and_disaggregates() -> None:
    text = (ROOT / "manifests" / "config" / "pd-config.yaml").read_text()
    pd = PD(text, [_ep(1, "prefill"), _ep(2, "decode")])
    assert PREFILLER_HEADER in pd.schedule(_req(LONG)).headers
    assert b"epp_pd_decisions_total" in generate_latest(pd.metrics.registry)
