"""Scheduling's extension points and the data of one scheduling cycle (GIE §4.1).

``LLMRequest`` is built once by request control (body parsed once, model resolved) and is
read-only for plugins, except ``state`` (the per-request scratch GIE calls CycleState).
A cycle runs the profile handler, then per chosen profile its filters, weighted scorers and
one picker (``epp.scheduling.Scheduler``).

All hooks are synchronous and must not block: no I/O, no sleeping. State they need from
outside (metrics, KV events) is kept fresh by background tasks.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from epp.framework.datalayer import Endpoint
from epp.framework.plugin import Plugin, TypedState


@dataclass(slots=True)
class LLMRequest:
    request_id: str
    #: model after rewrite: what the engine will see (base model or a LoRA adapter name)
    target_model: str
    #: model the client sent
    incoming_model: str
    #: "completions" | "chat/completions" | "responses" | "conversations" | "embeddings" | "other"
    api: str = "completions"
    #: parsed JSON body (mutations go through request control, not plugins)
    body: dict[str, Any] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)
    #: bytes the approximate prefix index hashes (GIE §4.4: prompt text, or JSON of messages)
    prefix_text: bytes = b""
    stream: bool = False
    max_tokens: int | None = None
    #: rough prompt size (chars/4) until a tokenizer gives better
    estimated_prompt_tokens: int = 0
    priority: int = 0
    fairness_id: str = "default-flow"
    objective: str | None = None
    cache_salt: str | None = None
    #: ``incoming_model`` / ``target_model`` as metric label values: names the pool is not
    #: known to serve are folded (request control decides; every layer's series use these)
    model_label: str = ""
    target_label: str = ""
    #: per-request scratch shared by plugins (GIE CycleState), keyed by typed ``StateKey``s
    state: TypedState = field(default_factory=TypedState)

    @property
    def sheddable(self) -> bool:
        return self.priority < 0


@dataclass(slots=True)
class ScoredEndpoint:
    endpoint: Endpoint
    score: float


@dataclass(slots=True)
class ProfileRunResult:
    """What one scheduling profile chose: ordered targets (primary first, then fallbacks)."""

    target_endpoints: list[Endpoint]
    #: every candidate with its final weighted score (set by the scheduler; for debugging)
    scored: Sequence[ScoredEndpoint] = ()

    @property
    def scores(self) -> dict[str, float]:
        """Final weighted scores by endpoint key, built on demand (nothing on the request
        path reads them, so the scheduler does not build this dict per request)."""
        return {se.endpoint.key: se.score for se in self.scored}


@dataclass(slots=True)
class SchedulingResult:
    profile_results: dict[str, ProfileRunResult | None]
    primary_profile_name: str
    #: extra request headers to set upstream (e.g. P/D's x-prefiller-host-port)
    headers: dict[str, str] = field(default_factory=dict)
    #: request headers to strip before forwarding (e.g. a client-sent x-prefiller-host-port)
    remove_headers: list[str] = field(default_factory=list)

    @property
    def primary(self) -> ProfileRunResult:
        res = self.profile_results.get(self.primary_profile_name)
        if res is None:
            raise LookupError(f"primary profile {self.primary_profile_name!r} has no result")
        return res

    @property
    def targets(self) -> list[Endpoint]:
        return self.primary.target_endpoints


class SchedulingError(Exception):
    """No endpoint could be chosen (every endpoint filtered out, ...). Maps to HTTP 429."""


class Filter(Plugin):
    """Drops endpoints. Returning an empty list fails the profile."""

    @abstractmethod
    def filter(self, request: LLMRequest, endpoints: Sequence[Endpoint]) -> list[Endpoint]: ...


class Scorer(Plugin):
    """Scores endpoints in [0, 1] (higher is better); the profile weights and sums them.

    ``category`` is GIE's: "Affinity" (stickiness, e.g. prefix), "Distribution" (spread load),
    "Balance".
    """

    category: ClassVar[str] = "Distribution"

    @abstractmethod
    def score(self, request: LLMRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        """One score per endpoint, same order as ``endpoints``."""


class Picker(Plugin):
    """Chooses the target endpoints (primary first, then fallbacks) from scored candidates."""

    @abstractmethod
    def pick(self, request: LLMRequest, scored: Sequence[ScoredEndpoint]) -> ProfileRunResult: ...


class ProfileHandler(Plugin):
    """Decides which profiles run (possibly in several rounds) and which result is primary."""

    @abstractmethod
    def pick_profiles(
        self,
        request: LLMRequest,
        profiles: Mapping[str, SchedulerProfile],
        results: Mapping[str, ProfileRunResult | None],
    ) -> dict[str, SchedulerProfile]:
        """Profiles to run next; an empty dict ends the cycle."""

    @abstractmethod
    def process_results(
        self, request: LLMRequest, results: Mapping[str, ProfileRunResult | None]
    ) -> SchedulingResult: ...


@dataclass(slots=True)
class WeightedScorer:
    scorer: Scorer
    weight: float


@dataclass(slots=True)
class SchedulerProfile:
    """Filters, then weighted scorers, then one picker (GIE's SchedulerProfile)."""

    name: str
    filters: list[Filter] = field(default_factory=list)
    scorers: list[WeightedScorer] = field(default_factory=list)
    picker: Picker | None = None
