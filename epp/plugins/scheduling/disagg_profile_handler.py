"""``disagg-profile-handler`` (llm-d): prefill/decode disaggregation in the scheduling cycle.

Round 1 runs the decode profile (its pick is always the primary target: the request goes to
the decode pod). Then the prefill decider — named under ``deciders.prefill`` — looks at the
chosen decode endpoint; if it says "disaggregate", round 2 runs the prefill profile. When a
prefill endpoint is found (and it is not the decode endpoint itself), the result carries
``x-prefiller-host-port: <ip:port>``; the sidecar next to the decode engine reads it and
runs the prefill leg there first (``epp pd-sidecar``). A client-sent value of that header
is always removed (a client must not choose where its prompt is sent).

The prefix index learns the prompt on both pods (``prefix-cache-scorer`` learns the primary
target and the first endpoint of the profile named ``prefill``).

Parameters (llm-d's nested form, or its legacy flat form; not both)::

    profiles: {decode: decode, prefill: prefill}    # profile names (these defaults)
    deciders: {prefill: my-decider}                 # no prefill decider = P/D disabled
    # legacy: decodeProfile, prefillProfile, deciderPluginName / prefillDeciderPluginName

The decider is resolved by name when the config is loaded (``bind``: plugins may be declared
in any order); a name that matches no decider plugin fails at start, naming it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Self

from pydantic import BaseModel, model_validator

from epp.framework.datalayer import Endpoint
from epp.framework.plugin import Plugin, PluginContext, PluginParams, StateKey
from epp.framework.scheduling import (
    LLMRequest,
    ProfileHandler,
    ProfileRunResult,
    SchedulerProfile,
    SchedulingError,
    SchedulingResult,
)
from epp.plugins.scheduling.pd_deciders import PDDecider, PDDecision

if TYPE_CHECKING:
    from epp.metrics import EppMetrics


PREFILLER_HEADER = "x-prefiller-host-port"
#: LLMRequest.state key of this cycle's PDDecision
STATE_KEY: StateKey[PDDecision] = StateKey("pd-decision")

DISAGGREGATED = "disaggregated"
AGGREGATED = "aggregated"
REASON_PD_DISABLED = "pd-disabled"
REASON_NO_PREFILL_PROFILE = "no-prefill-profile"
REASON_NO_PREFILL_ENDPOINT = "no-prefill-endpoint"
REASON_SAME_ENDPOINT = "prefill-is-decode-endpoint"


class _Profiles(PluginParams):
    decode: str = "decode"
    prefill: str = "prefill"


class _Deciders(PluginParams):
    prefill: str | None = None


class DisaggParams(PluginParams):
    profiles: _Profiles | None = None
    deciders: _Deciders | None = None
    # legacy flat parameters (llm-d pd-profile-handler / early disagg handler)
    decode_profile: str | None = None
    prefill_profile: str | None = None
    decider_plugin_name: str | None = None
    prefill_decider_plugin_name: str | None = None

    @model_validator(mode="after")
    def _not_mixed(self) -> Self:
        nested = self.profiles is not None or self.deciders is not None
        flat = any(v is not None for v in (self.decode_profile, self.prefill_profile,
                                            self.decider_plugin_name, self.prefill_decider_plugin_name))
        if nested and flat:
            raise ValueError(
                "use either profiles/deciders or the legacy decodeProfile/prefillProfile/"
                "deciderPluginName parameters, not both")
        if self.decider_plugin_name and self.prefill_decider_plugin_name and \
                self.decider_plugin_name != self.prefill_decider_plugin_name:
            raise ValueError("deciderPluginName and prefillDeciderPluginName name different deciders")
        return self

    def resolved(self) -> tuple[str, str, str | None]:
        """(decode profile, prefill profile, prefill decider name or None)."""
        if self.profiles is not None or self.deciders is not None:
            p = self.profiles or _Profiles()
            return p.decode, p.prefill, (self.deciders.prefill if self.deciders else None)
        return (self.decode_profile or "decode", self.prefill_profile or "prefill",
                self.prefill_decider_plugin_name or self.decider_plugin_name)


class DisaggProfileHandler(ProfileHandler):
    """Decode profile first, then the decider, then (maybe) the prefill profile."""

    type_name = "disagg-profile-handler"
    Params = DisaggParams

    def __init__(self, name: str, decode_profile: str = "decode", prefill_profile: str = "prefill",
                 decider: str | PDDecider | None = None, metrics: EppMetrics | None = None) -> None:
        super().__init__(name)
        self.decode_profile = decode_profile
        self.prefill_profile = prefill_profile
        self._decider_name = decider.name if isinstance(decider, PDDecider) else decider
        self._decider: PDDecider | None = decider if isinstance(decider, PDDecider) else None
        self._metrics = metrics
        self._decision_children: dict[tuple[str, str], Any] = {}
        self._prefill_children: dict[str, Any] = {}

    @classmethod
    def from_config(cls, name: str, params: BaseModel, ctx: PluginContext) -> Self:
        assert isinstance(params, DisaggParams)
        decode, prefill, decider = params.resolved()
        if decode == prefill:
            raise ValueError(f"the decode and prefill profiles must differ (both {decode!r})")
        return cls(name, decode, prefill, decider, ctx.metrics)

    # ------------------------------------------------------------------ decisions
    def bind(self, plugins: Mapping[str, Plugin]) -> None:
        name = self._decider_name
        if name is None or self._decider is not None:
            return
        found = plugins.get(name)
        if not isinstance(found, PDDecider):
            deciders = sorted(n for n, p in plugins.items() if isinstance(p, PDDecider))
            raise ValueError(f"deciders.prefill {name!r} is not a configured P/D decider plugin "
                             f"(deciders: {', '.join(deciders) or 'none'})")
        self._decider = found

    def _decide(self, request: LLMRequest, decode: Endpoint,
                profiles: Mapping[str, SchedulerProfile]) -> PDDecision:
        decider = self._decider
        if decider is None:
            return PDDecision(False, REASON_PD_DISABLED)
        if self.prefill_profile not in profiles:
            return PDDecision(False, REASON_NO_PREFILL_PROFILE)
        return decider.decide(request, decode)

    # ------------------------------------------------------------------ handler API
    def pick_profiles(
        self,
        request: LLMRequest,
        profiles: Mapping[str, SchedulerProfile],
        results: Mapping[str, ProfileRunResult | None],
    ) -> dict[str, SchedulerProfile]:
        dname = self.decode_profile
        if dname not in results:
            prof = profiles.get(dname)
            if prof is None:
                raise SchedulingError(
                    f"{self.type_name} {self.name!r}: no scheduling profile named {dname!r} "
                    "(set profiles.decode)")
            return {dname: prof}
        if STATE_KEY in request.state:
            return {}
        decoded = results[dname]
        if decoded is None or not decoded.target_endpoints:
            return {}
        decision = self._decide(request, decoded.target_endpoints[0], profiles)
        request.state.set(STATE_KEY, decision)
        if decision.disaggregate:
            return {self.prefill_profile: profiles[self.prefill_profile]}
        return {}

    def process_results(
        self, request: LLMRequest, results: Mapping[str, ProfileRunResult | None]
    ) -> SchedulingResult:
        dname = self.decode_profile
        res = results if isinstance(results, dict) else dict(results)
        out = SchedulingResult(profile_results=res, primary_profile_name=dname)
        decoded = res.get(dname)
        if decoded is None or not decoded.target_endpoints:
            out.remove_headers.append(PREFILLER_HEADER)
            return out  # the scheduler turns this into "no endpoint fits"
        decision = request.state.get(STATE_KEY)
        verdict, reason = AGGREGATED, REASON_PD_DISABLED
        prefill_ep: Endpoint | None = None
        if decision is not None:
            reason = decision.reason
            if decision.disaggregate:
                pres = res.get(self.prefill_profile)
                if pres is None or not pres.target_endpoints:
                    reason = REASON_NO_PREFILL_ENDPOINT
                elif pres.target_endpoints[0].key == decoded.target_endpoints[0].key:
                    reason = REASON_SAME_ENDPOINT
                else:
                    prefill_ep = pres.target_endpoints[0]
                    verdict = DISAGGREGATED
        if prefill_ep is not None:
            # set with overwrite semantics: replaces any client-sent value
            out.headers[PREFILLER_HEADER] = prefill_ep.key
        else:
            out.remove_headers.append(PREFILLER_HEADER)
        if self._metrics is not None:
            self._record(verdict, reason, prefill_ep)
        return out

    def _record(self, verdict: str, reason: str, prefill: Endpoint | None) -> None:
        m = self._metrics
        assert m is not None
        key = (verdict, reason)
        child = self._decision_children.get(key)
        if child is None:
            child = self._decision_children[key] = m.pd_decisions.labels(verdict, reason)
        child.inc()
        if prefill is not None:
            pc = self._prefill_children.get(prefill.key)
            if pc is None:
                if len(self._prefill_children) > 4096:  # pods churn; keep the cache bounded
                    self._prefill_children.clear()
                pc = self._prefill_children[prefill.key] = m.pd_prefill_endpoint.labels(prefill.key)
            pc.inc()
