"""The plugin interfaces: one abstract class per extension point (GIE's framework).

A plugin is a class with a GIE type name (``type_name``), constructed from its YAML
``parameters`` by ``from_config``. One class may implement several extension points (the
prefix scorer is a Scorer *and* a PreRequest that learns the pick). Plugins are found by the
registry (``epp.plugins.registry``): adding one is a new module under
``epp/scheduling/plugins/`` (or an ``epp.plugins`` entry point) plus a line of config.

All hooks on the request path are synchronous and must not block: no I/O, no sleeping.
State they need from outside (metrics, KV events) is kept fresh by background tasks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict

from epp.datalayer.endpoint import Endpoint
from epp.scheduling.types import LLMRequest, ProfileRunResult, SchedulingResult, ScoredEndpoint

if TYPE_CHECKING:
    from epp.datalayer.datastore import Datastore
    from epp.metrics import EppMetrics


class NoParameters(BaseModel):
    """Parameters model for plugins that take none (unknown keys are rejected)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


@dataclass(slots=True)
class PluginContext:
    """What a plugin may use at construction: shared, long-lived objects (no request state).

    ``shared`` lets cooperating plugins find each other's state by a well-known key (e.g.
    the prefix index shared by a producer and a scorer) without global singletons.
    """

    datastore: Datastore
    metrics: EppMetrics | None = None
    staleness_threshold: float = 2.0
    shared: dict[str, Any] = field(default_factory=dict)


class Plugin(ABC):  # noqa: B024 - a base with no abstract methods on purpose
    """Base of every plugin. ``Params`` is a pydantic model (extra keys rejected)."""

    type_name: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = NoParameters

    def __init__(self, name: str) -> None:
        self.name = name

    @classmethod
    def from_config(cls, name: str, params: BaseModel, ctx: PluginContext) -> Self:
        """Build from validated parameters. Override when the plugin takes any."""
        return cls(name)

    def bind(self, plugins: Mapping[str, Plugin]) -> None:
        """Resolve references to other plugins, once all are built (config order does not
        matter). Raise ValueError naming the problem; the loader reports it at this plugin's
        location, so a bad reference fails at start, never at the first request."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


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


class SaturationDetector(Plugin):
    """Tells whether the candidate endpoints can take more work (admission, flow control)."""

    @abstractmethod
    def saturation(self, endpoints: Sequence[Endpoint]) -> float:
        """Pool saturation; >= 1.0 means saturated."""

    def is_saturated(self, endpoints: Sequence[Endpoint]) -> bool:
        return self.saturation(endpoints) >= 1.0


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
