"""Request control's extension points: parsing, hooks around scheduling, admission.

``Admission`` is implemented by flow control (``epp.flowcontrol``): the legacy shedding gate,
empty-pool holding, or the flow controller with queues. ``Demand`` is what the KEDA scaler and
the demand gauges read from whichever admission runs. ``Placement`` (``epp.placement``) makes
sure a request's model is loaded on some pod before admission, and ``ModelDemand`` is its
per-model demand for the KEDA scaler.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from epp.framework.datalayer import Endpoint
from epp.framework.plugin import Plugin
from epp.framework.scheduling import LLMRequest, SchedulingResult


@dataclass(slots=True)
class ParsedBody:
    """A request body parsed once: what request control and scheduling need from it."""

    model: str
    #: the parsed JSON object (request control may change ``model``; plugins only read it)
    body: dict[str, Any]
    #: "completions" | "chat/completions" | "responses" | "conversations" | "embeddings" | "other"
    api: str
    #: bytes the approximate prefix index hashes (prompt text, or JSON of messages)
    prefix_text: bytes
    stream: bool = False
    max_tokens: int | None = None
    cache_salt: str | None = None


class Parser(Plugin):
    """Parses a request body (GIE's ``parser``): raise ``RequestError`` (400) on bad input."""

    @abstractmethod
    def parse(self, raw: bytes | bytearray, path: str) -> ParsedBody: ...


class PrepareRequest(Plugin):
    """Runs once per request before admission and scheduling, and may await (GIE's
    PrepareData step): work too slow for the synchronous scheduling hooks, e.g. tokenizing
    the prompt on a worker thread or asking the model server. Must not raise for bad input
    (leave the request unprepared; the scheduling plugins then decide without it)."""

    @abstractmethod
    async def prepare_request(self, request: LLMRequest) -> None: ...


class PreRequest(Plugin):
    """Runs after scheduling, before the request is forwarded (learn the pick, add headers)."""

    @abstractmethod
    def pre_request(self, request: LLMRequest, result: SchedulingResult) -> None: ...


@dataclass(slots=True)
class ResponseInfo:
    """What the picker learned from the response (filled progressively)."""

    status: int = 0
    streaming: bool = False
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    served_endpoint: str | None = None


class ResponseComplete(Plugin):
    """Runs once the response has ended (or the stream was reset: ``response.status`` 0)."""

    @abstractmethod
    def response_complete(
        self, request: LLMRequest, response: ResponseInfo, endpoint: Endpoint | None
    ) -> None: ...


class Admission(Protocol):
    """Decides whether (and when) a request may be scheduled.

    ``candidates`` is re-evaluated by the admission controller when it dispatches, so a
    request that waited in a queue is scheduled on the endpoints that exist *then*.
    Raises RequestError to reject. ``release`` is called exactly once for every request that
    ``admit`` returned for, when its response ends (or its stream is reset).
    """

    async def admit(self, request: LLMRequest, candidates: Callable[[], Sequence[Endpoint]]) -> Sequence[Endpoint]: ...

    def release(self, request: LLMRequest, info: ResponseInfo) -> None: ...


class Demand(Protocol):
    """Queued and in-flight counts, and activity notifications (KEDA scaler, demand gauges)."""

    @property
    def queued(self) -> int: ...

    @property
    def inflight(self) -> int: ...

    def add_activity_listener(self, listener: Callable[[], None]) -> None: ...


class Placement(Protocol):
    """Model placement, as the director drives it (``epp.placement``).

    ``ensure`` runs before admission: it returns at once when the request's target model is
    loaded on some pod, holds the request while a load runs (bounded), and raises
    RequestError (404 unknown model, 503 cannot be loaded in time). ``candidates`` narrows
    the endpoints admission and scheduling see to those serving the model. When ``ensure``
    returned, ``routed`` is called with the pick (if one was made) and ``release`` exactly
    once when the response ends or the stream is reset, with the same endpoint or None.
    """

    async def ensure(self, request: LLMRequest) -> None: ...

    def candidates(self, request: LLMRequest, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]: ...

    def routed(self, request: LLMRequest, endpoint: Endpoint) -> None: ...

    def release(self, request: LLMRequest, endpoint: Endpoint | None) -> None: ...


class ModelDemand(Protocol):
    """Demand per model (KEDA scaler metadata ``model``): requests held for a load, and all
    requests between arrival and response end. None for a model the pool does not know."""

    def model_demand(self, model: str) -> tuple[int, int] | None: ...

    def add_activity_listener(self, listener: Callable[[], None]) -> None: ...
