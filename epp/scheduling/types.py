"""Data that flows through one scheduling cycle.

``LLMRequest`` is built once by request control (body parsed once, model resolved) and is
read-only for plugins, except ``state`` (the per-cycle scratch space GIE calls CycleState).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from epp.datalayer.endpoint import Endpoint


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
    #: per-cycle scratch shared by plugins (GIE CycleState); keyed by plugin-chosen strings
    state: dict[str, Any] = field(default_factory=dict)

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
    #: final weighted scores, for debugging/metrics (endpoint key -> score)
    scores: dict[str, float] = field(default_factory=dict)


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
